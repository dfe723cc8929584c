"""Long-audio chunking (same stitching as transformers' pipeline) and KenLM decoding through pyctcdecode."""

import importlib.util
import math
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import DEMO, ROOT, demo_unlabeled_paths

from data2vec_aqc_hf.audio import load_audio
from data2vec_aqc_hf.finetuning import build_vocab, make_processor
from data2vec_aqc_hf.lm import build_lm_decoder, chunked_ctc_logits, ctc_labels, write_bigram_arpa

HAVE_LM = importlib.util.find_spec("pyctcdecode") is not None and importlib.util.find_spec("kenlm") is not None
needs_lm = pytest.mark.skipif(not HAVE_LM, reason="pyctcdecode/kenlm not installed (pip install -e '.[lm]' && "
                                                  "pip install --no-deps pyctcdecode==0.5.0; .ci/run does)")


def test_chunked_logits_equal_the_pipeline_chunking(random_ctc_dir, tmp_path):
    from transformers import AutoModelForCTC, AutoProcessor

    from data2vec_aqc_hf.transcription import build_pipeline, transcribe_files

    model = AutoModelForCTC.from_pretrained(random_ctc_dir).eval()
    processor = AutoProcessor.from_pretrained(random_ctc_dir)
    audio = np.concatenate([load_audio(p) for p in demo_unlabeled_paths()[2:7:2]])  # ~12 s of real speech
    sf.write(tmp_path / "long.wav", audio, 16000)

    # one chunk = the plain forward pass, bit for bit
    full = chunked_ctc_logits(model, processor.feature_extractor, audio)
    with torch.no_grad():
        inputs = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt")
        direct = model(inputs["input_values"]).logits[0].numpy()
    assert np.array_equal(full, direct)

    chunked = chunked_ctc_logits(model, processor.feature_extractor, audio, chunk_length_s=2.0, stride_length_s=0.4)
    assert abs(len(chunked) - len(full)) <= 2  # the stride frames are dropped, the timeline is kept
    n = min(len(chunked), len(full))
    assert not np.allclose(chunked[:n], full[:n])  # chunking did happen

    asr = build_pipeline(str(random_ctc_dir))
    [(_, piped, error)] = list(transcribe_files(asr, [tmp_path / "long.wav"], chunk_length_s=2.0,
                                                stride_length_s=0.4))
    ours = processor.tokenizer.decode(chunked.argmax(-1))
    assert error is None and len(set(ours.replace(" ", ""))) >= 3, "the test needs a varied transcript"
    assert piped == ours
    unchunked = processor.tokenizer.decode(full.argmax(-1))
    assert piped != unchunked


@needs_lm
def test_bigram_arpa_values_and_normalisation(tmp_path):
    import kenlm

    path = write_bigram_arpa(["A B", "A"], tmp_path / "lm.arpa", discount=0.5)
    lm = kenlm.Model(str(path))
    # by hand: unigram counts A:2 B:1 </s>:2 over vocab {A, B, </s>, <unk>}: p1 = (c+1)/9
    p1 = {"A": 3 / 9, "B": 2 / 9, "</s>": 3 / 9}
    p_a_bos = (2 - 0.5) / 2 + 0.25 * p1["A"]  # <s>: one follower, count 2 -> lambda 0.25
    p_b_a = (1 - 0.5) / 2 + 0.5 * p1["B"]  # A: two followers, count 2 -> lambda 0.5
    p_eos_b = (1 - 0.5) / 1 + 0.5 * p1["</s>"]
    assert lm.score("A B", bos=True, eos=True) == pytest.approx(math.log10(p_a_bos * p_b_a * p_eos_b), abs=1e-5)
    p_b_bos, p_a_b, p_eos_a = 0.25 * p1["B"], 0.5 * p1["A"], 0.25 + 0.5 * p1["</s>"]  # unseen bigrams back off
    assert lm.score("B A", bos=True, eos=True) == pytest.approx(math.log10(p_b_bos * p_a_b * p_eos_a), abs=1e-5)

    # every history's distribution sums to one over the vocabulary
    for history in [[], ["A"], ["B"]]:
        state, nxt = kenlm.State(), kenlm.State()
        lm.BeginSentenceWrite(state)
        for word in history:
            lm.BaseScore(state, word, nxt)
            state, nxt = nxt, kenlm.State()
        total = sum(10 ** lm.BaseScore(state, w, kenlm.State()) for w in ["A", "B", "</s>", "<unk>"])
        assert total == pytest.approx(1.0, abs=1e-5), history
    with pytest.raises(ValueError, match="no non-empty text"):
        write_bigram_arpa(["  "], tmp_path / "x.arpa")


@needs_lm
def test_lm_beam_search_fixes_a_near_tie_that_greedy_gets_wrong(tmp_path):
    processor = make_processor(build_vocab(["ONE TWO"]), tmp_path / "proc")
    tok = processor.tokenizer
    labels = ctc_labels(tok)
    assert labels[tok.pad_token_id] == "" and labels[tok.convert_tokens_to_ids("|")] == " "
    decoder = build_lm_decoder(tok, write_bigram_arpa(["ONE", "TWO ONE", "ONE TWO"], tmp_path / "lm.arpa"),
                               alpha=1.0, beta=0.0)
    frames = [("O", None), ("N", None), ("O", "E")]  # last frame: O slightly above E
    log_probs = np.full((len(frames) + 1, len(labels)), -8.0, dtype=np.float32)
    for t, (best, second) in enumerate(frames):
        log_probs[t, tok.convert_tokens_to_ids(best)] = math.log(0.55 if second else 0.99)
        if second:
            log_probs[t, tok.convert_tokens_to_ids(second)] = math.log(0.44)
    log_probs[-1, tok.pad_token_id] = math.log(0.99)
    greedy = tok.decode(log_probs.argmax(-1))
    assert greedy == "ONO"
    assert decoder.decode(log_probs, beam_width=16).strip() == "ONE"


@needs_lm
def test_transcribe_cli_with_lm(random_ctc_dir, tmp_path):
    lm = write_bigram_arpa(["ONE TWO", "THREE"], tmp_path / "lm.arpa")
    clips = [DEMO / "audio/fsdd/lucas/5_lucas_1.flac", DEMO / "audio/fsdd/jackson/0_jackson_0.flac"]
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, "-m", "data2vec_aqc_hf.transcription", str(random_ctc_dir),
                             *map(str, clips), "--lm", str(lm), "--output", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and all('"text"' in line for line in lines)
    missing = subprocess.run([sys.executable, "-m", "data2vec_aqc_hf.transcription", str(random_ctc_dir),
                              str(clips[0]), "--lm", str(tmp_path / "nope.arpa")],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert missing.returncode != 0 and "nope.arpa: language model file not found" in missing.stderr


@needs_lm
def test_evaluate_script_with_lm_equals_in_process_lm_scoring(random_ctc_dir, tmp_path):
    """`training/evaluate_asr.py --lm` scores exactly what `evaluate_rows` with an `LMTranscriber` gives, and the
    LM changes the transcripts relative to greedy decoding of the same model."""
    import json

    from transformers import AutoModelForCTC, AutoProcessor

    from data2vec_aqc_hf.finetuning import CTCDataset, evaluate_rows, read_manifest
    from data2vec_aqc_hf.lm import LMTranscriber

    lm = write_bigram_arpa(["ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE"],
                           tmp_path / "digits.arpa")
    model, processor = AutoModelForCTC.from_pretrained(random_ctc_dir), AutoProcessor.from_pretrained(random_ctc_dir)
    rows = [r for r in read_manifest(DEMO / "metadata.csv") if r["speaker_id"] == "fsdd_lucas"][:10]
    dataset = CTCDataset(rows, processor)
    asr = LMTranscriber(model, processor, lm)
    with_lm = evaluate_rows(model, processor, dataset, transcribe=asr.transcribe_arrays)
    greedy = evaluate_rows(model, processor, dataset)
    assert [e["prediction"] for e in with_lm["examples"]] != [e["prediction"] for e in greedy["examples"]]

    manifest = tmp_path / "m.csv"
    manifest.write_text("file_name,text,speaker_id\n" + "".join(
        f"{r['audio']},{r['text']},{r['speaker_id']}\n" for r in rows))
    out = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, str(ROOT / "training/evaluate_asr.py"), str(random_ctc_dir), str(manifest),
                             "--lm", str(lm), "--output", str(out)], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads(out.read_text())
    assert scored["wer"] == pytest.approx(with_lm["wer"]) and scored["cer"] == pytest.approx(with_lm["cer"])
    assert scored["decoding"].startswith("KenLM")
