"""Fine-tuning end to end on real speech (vendored FSDD digits), stock loading without the package, bad input."""

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import DEMO, ROOT, tiny_config
from conftest import run_without_package
from transformers import TrainingArguments

from data2vec_aqc_hf import Data2VecAQCForPreTraining
from data2vec_aqc_hf.finetuning import (
    CTCDataset,
    FinetuneArguments,
    build_vocab,
    make_processor,
    normalize_text,
    run_finetuning,
    split_by_speaker,
)
from data2vec_aqc_hf.metrics import wer_cer


def test_text_vocab_and_speaker_split():
    assert normalize_text("Hello, world!  it's") == "HELLO WORLD IT'S"
    vocab = build_vocab(["AB A", "C'"])
    assert vocab["<pad>"] == 0 and vocab["|"] == 2 and set(vocab) == {"<pad>", "<unk>", "|", "A", "B", "C", "'"}
    rows = [{"speaker_id": s, "text": "X", "audio": ""} for s in "aabbcc"]
    train, evals = split_by_speaker(rows, ["b"])
    assert {r["speaker_id"] for r in evals} == {"b"} and {r["speaker_id"] for r in train} == {"a", "c"}
    with pytest.raises(ValueError, match="not in the data"):
        split_by_speaker(rows, ["z"])
    assert wer_cer(["A B"], ["A C"])["wer"] == 0.5
    # the evaluate metric loads from the package with the Hub offline; one substitution in 2 words / 3 characters
    from data2vec_aqc_hf.metrics import load_metric

    metric = load_metric()
    metric.add_batch(predictions=["A B"], references=["A C"])
    metric.add_batch(predictions=["X"], references=[""])  # empty reference: skipped, as in `wer_cer`
    assert metric.compute() == pytest.approx({"wer": 0.5, "cer": 1 / 3})


def test_bad_examples_are_reported_by_file(tmp_path, caplog):
    good = DEMO / "audio/fsdd/jackson/0_jackson_0.flac"
    sf.write(tmp_path / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    (tmp_path / "broken.wav").write_bytes(b"xx")
    processor = make_processor(build_vocab(["ZERO"]), tmp_path / "proc")
    rows = [{"audio": str(good), "text": "ZERO", "speaker_id": "s"},
            {"audio": str(good), "text": "", "speaker_id": "s"},
            {"audio": str(tmp_path / "silent.wav"), "text": "ZERO", "speaker_id": "s"},
            {"audio": str(tmp_path / "broken.wav"), "text": "ZERO", "speaker_id": "s"},
            {"audio": str(good), "text": "ZEBRA", "speaker_id": "s"}]
    with caplog.at_level(logging.WARNING):
        ds = CTCDataset(rows, processor)
    assert len(ds) == 2 and len(ds.skipped) == 3
    assert "empty transcript" in caplog.text and "silent.wav" in caplog.text and "broken.wav" in caplog.text
    assert "not in the vocabulary" in caplog.text and "'B'" in caplog.text
    unk = processor.tokenizer.convert_tokens_to_ids("<unk>")
    assert unk in ds[1]["labels"]
    # an 8 kHz file is resampled, not rejected: FSDD is 8 kHz
    assert abs(len(ds[0]["input_values"]) - 2 * sf.info(good).frames) <= 2


@pytest.mark.slow
def test_finetune_save_stock_and_pipeline_without_package(tmp_path, monkeypatch):
    pre = Data2VecAQCForPreTraining(tiny_config())
    pre.save_pretrained(tmp_path / "pre")
    calls = []
    import huggingface_hub

    def create_repo(self, repo_id, **kw):
        calls.append(repo_id)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(kw["folder_path"]))
    args = FinetuneArguments(model_name_or_path=str(tmp_path / "pre"), train_manifest=str(DEMO / "metadata.csv"),
                             eval_speakers="fsdd_yweweler", mask_time_prob=0.05, layerdrop=0.0)
    targs = TrainingArguments(output_dir=str(tmp_path / "ft"), max_steps=6, per_device_train_batch_size=4,
                              learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no",
                              push_to_hub=True, hub_model_id="me/aqc-digits")
    metrics = run_finetuning(args, targs)
    final = tmp_path / "ft" / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == "data2vec-audio"
    assert (final / "vocab.json").exists()
    assert (final / "preprocessor_config.json").exists() or (final / "processor_config.json").exists()
    card = (final / "README.md").read_text()
    assert f"value: {metrics['wer']:.4f}" in card and "fsdd_yweweler" in card and "model-index" in card
    assert "| weights saved | 6 (the last update) |" in card
    assert "me/aqc-digits" in calls and calls[-1] == str(final)  # Trainer's repo init, then our upload

    from data2vec_aqc_hf.transcription import build_pipeline, transcribe_files

    clips = [DEMO / "audio/fsdd/yweweler/3_yweweler_0.flac", DEMO / "audio/fsdd/lucas/5_lucas_1.flac"]
    asr = build_pipeline(str(final))
    ours = [text for _, text, _ in transcribe_files(asr, clips)]
    from transformers import AutoModelForCTC, AutoProcessor

    from data2vec_aqc_hf.audio import load_audio
    from data2vec_aqc_hf.finetuning import transcribe_arrays

    direct = transcribe_arrays(AutoModelForCTC.from_pretrained(final), AutoProcessor.from_pretrained(final),
                               [load_audio(c) for c in clips], batch_size=1)
    assert ours == direct
    arrays = {str(i): load_audio(c) for i, c in enumerate(clips)}
    np.savez(tmp_path / "clips.npz", **arrays)
    out = run_without_package(f"""
        import json, numpy as np
        from transformers import AutoModelForCTC, pipeline
        m = AutoModelForCTC.from_pretrained({str(final)!r})
        assert type(m).__name__ == "Data2VecAudioForCTC"
        asr = pipeline("automatic-speech-recognition", model={str(final)!r})
        clips = np.load({str(tmp_path / 'clips.npz')!r})
        print("TEXTS" + json.dumps([asr({{"raw": clips[k], "sampling_rate": 16000}})["text"] for k in sorted(clips)]))
    """, tmp_path)
    stock = json.loads([l for l in out.splitlines() if l.startswith("TEXTS")][-1][5:])
    assert stock == ours


def test_hub_split_reader_on_local_parquet_with_hub_schema(tmp_path):
    """The Hub path of fine-tuning (`load_dataset` + `Audio(decode=False)`) on a local parquet of the same schema."""
    import datasets

    from data2vec_aqc_hf.finetuning import read_hub_split

    files = sorted((DEMO / "audio/fsdd/lucas").glob("*.flac"))[:3]
    struct = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    ds = datasets.Dataset.from_dict(
        {"audio": [{"bytes": f.read_bytes(), "path": f.name} for f in files], "sentence": ["ZERO"] * 3,
         "client_id": ["lucas"] * 3},
        features=datasets.Features({"audio": struct, "sentence": datasets.Value("string"),
                                    "client_id": datasets.Value("string")}))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    rows = read_hub_split("parquet", None, "train", text_column="sentence", speaker_column="client_id",
                          data_files={"train": str(tmp_path / "train.parquet")})
    processor = make_processor(build_vocab(["ZERO"]), tmp_path / "proc")
    dataset = CTCDataset(rows, processor)
    assert len(dataset) == 3 and dataset[0]["speaker_id"] == "lucas" and dataset[0]["text"] == "ZERO"


def test_evaluate_per_speaker_noise_and_script(random_ctc_dir, tmp_path):
    """Per-speaker numbers add up to the overall WER (FSDD: one word per utterance, so WER is a per-utterance mean);
    noise at 0 dB changes what the model hears; the script filters speakers and writes the same JSON."""
    from transformers import AutoModelForCTC, AutoProcessor

    from data2vec_aqc_hf.finetuning import evaluate_rows, read_manifest

    model = AutoModelForCTC.from_pretrained(random_ctc_dir)
    processor = AutoProcessor.from_pretrained(random_ctc_dir)
    rows = [r for r in read_manifest(DEMO / "metadata.csv") if r["speaker_id"] in {"fsdd_lucas", "fsdd_jackson"}]
    dataset = CTCDataset(rows, processor)
    clean = evaluate_rows(model, processor, dataset)
    assert clean["num_utterances"] == len(rows) and set(clean["per_speaker"]) == {"fsdd_lucas", "fsdd_jackson"}
    counts = {s: sum(r["speaker_id"] == s for r in rows) for s in clean["per_speaker"]}
    pooled = sum(clean["per_speaker"][s]["wer"] * n for s, n in counts.items()) / len(rows)
    assert clean["wer"] == pytest.approx(pooled)
    noisy = evaluate_rows(model, processor, dataset, snr_db=0.0)
    assert [e["prediction"] for e in noisy["examples"]] != [e["prediction"] for e in clean["examples"]]

    out = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, str(ROOT / "training/evaluate_asr.py"), str(random_ctc_dir),
                             str(DEMO / "metadata.csv"), "--speakers", "fsdd_lucas,fsdd_jackson", "--output", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(out.read_text())["wer"] == pytest.approx(clean["wer"])


def test_finetune_script_runs_as_a_script(tmp_path):
    """`python training/finetune.py config.yaml --flags`: the script's folder is first on sys.path, so nothing in
    training/ may shadow a library (a `training/evaluate.py` once hid the `evaluate` package from Trainer's metric)."""
    pre = tmp_path / "pre"
    from data2vec_aqc_hf import Data2VecAQCForPreTraining

    torch.manual_seed(0)
    Data2VecAQCForPreTraining(tiny_config()).save_pretrained(pre)
    result = subprocess.run([sys.executable, str(ROOT / "training/finetune.py"), str(ROOT / "configs/demo_finetune.yaml"),
                             "--model_name_or_path", str(pre), "--output_dir", str(tmp_path / "ft"), "--max_steps", "4",
                             "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--warmup_steps", "0",
                             "--learning_rate", "0.05", "--load_best_model_at_end", "true", "--metric_for_best_model",
                             "loss", "--greater_is_better", "false"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads([line for line in result.stdout.splitlines() if line.startswith("METRICS ")][-1][8:])
    assert metrics["wer"] >= 0.0 and metrics["num_utterances"] == 120
    assert (tmp_path / "ft/final/README.md").exists() and (tmp_path / "ft/final/training_curves.png").exists()
    assert list((tmp_path / "ft/runs").rglob("events.out.tfevents*")), "fine-tuning wrote no tensorboard events"
    # the card names the step of the weights it describes: the best checkpoint's, which the final folder holds
    state = json.loads((tmp_path / "ft/checkpoint-4/trainer_state.json").read_text())
    best_step = int(state["best_model_checkpoint"].rsplit("-", 1)[-1])
    assert best_step == 2  # lr 0.05 overshoots: eval loss ~3.2 at step 2, ~5.0 at 4, so best is not the last
    card = (tmp_path / "ft/final/README.md").read_text()
    assert f"| weights saved | {best_step} (best checkpoint by loss) |" in card, card
    from safetensors.torch import load_file

    final, best = (load_file(tmp_path / f"ft/{d}/model.safetensors") for d in ("final", f"checkpoint-{best_step}"))
    assert all(torch.equal(final[k], best[k]) for k in final)


def test_finetune_logs_to_tensorboard_by_default():
    """Fine-tuning's Trainer options default to tensorboard logging (transformers' default is none)."""
    from data2vec_aqc_hf.cli import parse_args
    from data2vec_aqc_hf.finetuning import FinetuneArguments, TrainerOptions

    _, options = parse_args((FinetuneArguments, TrainerOptions), ["--model_preset", "tiny", "--output_dir", "x"])
    assert options.report_to == ["tensorboard"]
    _, options = parse_args((FinetuneArguments, TrainerOptions),
                            ["--model_preset", "tiny", "--output_dir", "x", "--report_to", "none"])
    assert options.report_to in ([], ["none"], "none")


def test_transcribe_cli_errors_and_exit_codes(tmp_path, random_ctc_dir, capsys):
    """Missing input: exit 2 before a model is loaded; some files failing: exit 1 with a count; a pretraining
    checkpoint: told to fine-tune first; non-audio files in a folder: said, not silent; a very short clip: warned;
    a clip shorter than the CNN's receptive field: that file fails with the reason, the rest are transcribed."""
    import soundfile as sf

    from data2vec_aqc_hf import Data2VecAQCForPreTraining
    from data2vec_aqc_hf.transcription import main

    with pytest.raises(SystemExit) as exit_info:
        main(["/nonexistent/model", str(tmp_path / "nope.wav")])
    assert exit_info.value.code == 2 and "nope.wav" in capsys.readouterr().err
    real = str(DEMO / "audio/fsdd/lucas/5_lucas_1.flac")
    for flags, said in ((["--output", str(tmp_path / "no/such/dir/out.jsonl")], "does not exist"),
                        (["--lm", str(tmp_path / "missing.arpa")], "missing.arpa: language model file not found")):
        with pytest.raises(SystemExit) as exit_info:  # before the (here nonexistent) model is loaded
            main(["/nonexistent/model", real, *flags])
        assert exit_info.value.code == 2 and said in capsys.readouterr().err

    folder = tmp_path / "clips"
    folder.mkdir()
    sf.write(folder / "ok.wav", np.sin(np.arange(16000) / 5.0).astype(np.float32) * 0.3, 16000)
    sf.write(folder / "short.wav", np.sin(np.arange(2000) / 5.0).astype(np.float32) * 0.3, 16000)
    sf.write(folder / "tiny.wav", np.sin(np.arange(200) / 5.0).astype(np.float32) * 0.3, 16000)  # < 25 ms
    (folder / "broken.wav").write_bytes(b"not audio")
    (folder / "notes.txt").write_text("hello")
    code = main([str(random_ctc_dir), str(folder)])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 1 and "2 of 4 file(s) failed" in err and "broken.wav" in err, err
    assert "tiny.wav: " in err and "receptive field" in err, err  # that file fails, the others are transcribed
    assert "ok.wav\t" in captured.out and "short.wav\t" in captured.out, captured.out
    assert "skipping 1 file(s) that are not audio (notes.txt)" in err and "short.wav: 0.12 s is very short" in err

    Data2VecAQCForPreTraining(tiny_config()).save_pretrained(tmp_path / "pre")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "pre"), str(folder / "ok.wav")])
    assert "is a pretraining checkpoint" in capsys.readouterr().err

    # the stock export (what fine-tuning writes to final/) fails inside its convolution on such a clip: the
    # length is checked before, so that file fails and the others are transcribed there too
    from transformers import AutoModelForCTC

    from data2vec_aqc_hf.export import save_as_data2vec_audio

    stock = tmp_path / "stock"
    save_as_data2vec_audio(AutoModelForCTC.from_pretrained(random_ctc_dir), stock)
    from transformers import AutoProcessor

    from data2vec_aqc_hf.modeling_data2vec_aqc import receptive_field

    AutoProcessor.from_pretrained(random_ctc_dir).save_pretrained(stock)
    assert json.loads((stock / "config.json").read_text())["model_type"] == "data2vec-audio"
    code = main([str(stock), str(folder / "ok.wav"), str(folder / "tiny.wav")])
    captured = capsys.readouterr()
    field = receptive_field(tiny_config())
    assert field > 200  # tiny.wav's samples
    assert code == 1 and "1 of 2 file(s) failed" in captured.err, captured.err
    assert f"tiny.wav: 200 samples (0.013 s at 16 kHz) is shorter than the model's receptive field of {field}" \
        in captured.err, captured.err
    assert "ok.wav\t" in captured.out, captured.out


def test_transcribe_cli_names_a_hub_pretraining_checkpoint(tmp_path, random_ctc_dir, monkeypatch, capsys):
    """A Hub id of a pretraining checkpoint gets the same one-line 'fine-tune it first' (not a tokenizer
    traceback); a Hub CTC model without a vocabulary is named too. Only the download is replaced: it serves a
    local folder as the Hub repo and raises the Hub's own error for a file the repo lacks."""
    from huggingface_hub.errors import EntryNotFoundError

    from data2vec_aqc_hf import Data2VecAQCForPreTraining
    from data2vec_aqc_hf.transcription import main

    Data2VecAQCForPreTraining(tiny_config()).save_pretrained(tmp_path / "pre")
    (tmp_path / "ctc_no_vocab").mkdir()
    shutil.copy(random_ctc_dir / "config.json", tmp_path / "ctc_no_vocab" / "config.json")
    repos = {"someone/aqc-pretrained": tmp_path / "pre", "someone/ctc-no-vocab": tmp_path / "ctc_no_vocab"}
    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        path = repos[repo_id] / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    clip = tmp_path / "ok.wav"
    sf.write(clip, np.sin(np.arange(16000) / 5.0).astype(np.float32) * 0.3, 16000)
    with pytest.raises(SystemExit) as exit_info:
        main(["someone/aqc-pretrained", str(clip)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "someone/aqc-pretrained is a pretraining checkpoint" in err, err
    assert "fine-tune it first" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["someone/ctc-no-vocab", str(clip)])
    assert "someone/ctc-no-vocab: no vocab.json / tokenizer" in capsys.readouterr().err
    assert ("someone/aqc-pretrained", "config.json") in asked and ("someone/ctc-no-vocab", "vocab.json") in asked


def test_model_card_example_runs_in_plain_transformers_on_8khz_audio(tmp_path, random_ctc_dir):
    """The card's usage block, as written (model id and file name filled in), runs where this package cannot be
    imported, on an 8 kHz FSDD file (the resampling step is needed), and gives the pipeline's transcript."""
    import re

    from transformers import AutoProcessor

    from data2vec_aqc_hf import Data2VecAQCForCTC
    from data2vec_aqc_hf.cards import render_card
    from data2vec_aqc_hf.export import save_as_data2vec_audio
    from data2vec_aqc_hf.finetuning import card_base_model

    stock = tmp_path / "stock"  # what fine-tuning saves: a stock data2vec-audio model + processor
    save_as_data2vec_audio(Data2VecAQCForCTC.from_pretrained(random_ctc_dir), stock)
    AutoProcessor.from_pretrained(random_ctc_dir).save_pretrained(stock)

    values = dict(model_name="m", dataset_id="custom", datasets_line="", dataset_description="d", train_hours="0.1", num_train=1,
                  num_eval=1, eval_speakers="s", wer="1", cer="1", wer_fraction="0.01", cer_fraction="0.01",
                  learning_rate=1e-3, max_steps=10, weights_step="10 (the last update)", batch_size=1, freeze_steps=0,
                  cnn="trained", self_training="none", repo_id=str(stock), **card_base_model(str(random_ctc_dir), None))
    card = render_card("finetuned.md", values)
    assert "base_model:" not in card.split("---")[1]  # a local path is not metadata
    block = re.findall(r"```python\n(.*?)```", card, re.S)[0]
    clip = DEMO / "audio/fsdd/lucas/5_lucas_1.flac"
    assert __import__("soundfile").info(clip).samplerate == 8000
    shutil.copy(clip, tmp_path / "speech.flac")
    out = run_without_package(block, tmp_path)
    assert out.strip() and "Traceback" not in out


def test_evaluation_shows_a_progress_bar_with_the_time_left(random_ctc_dir, capsys):
    """Evaluating or transcribing many clips shows a bar on stderr (clips done, time left); a handful show none."""
    from transformers import AutoModelForCTC, AutoProcessor

    from data2vec_aqc_hf.finetuning import PROGRESS_MIN_CLIPS, transcribe_arrays

    model, processor = AutoModelForCTC.from_pretrained(random_ctc_dir), AutoProcessor.from_pretrained(random_ctc_dir)
    clips = [np.random.default_rng(i).standard_normal(1600).astype(np.float32) for i in range(PROGRESS_MIN_CLIPS)]
    texts = transcribe_arrays(model, processor, clips, batch_size=16)
    err = capsys.readouterr().err
    assert len(texts) == len(clips) and "transcribing (greedy)" in err and f"{len(clips)}/{len(clips)}" in err, err
    assert "<" in err  # tqdm's elapsed<left
    transcribe_arrays(model, processor, clips[:4])
    assert "transcribing" not in capsys.readouterr().err


def test_reading_a_labelled_corpus_shows_a_progress_bar(random_ctc_dir, capsys):
    """CTCDataset reads every file up front (fine-tuning and evaluate_asr): for many files a bar says so, with
    the time left, instead of minutes of silence; a handful show none."""
    from transformers import AutoProcessor

    from data2vec_aqc_hf.finetuning import PROGRESS_MIN_CLIPS, read_manifest

    processor = AutoProcessor.from_pretrained(random_ctc_dir)
    rows = read_manifest(DEMO / "metadata.csv")[:PROGRESS_MIN_CLIPS]
    data = CTCDataset(rows, processor)
    err = capsys.readouterr().err
    assert len(data) > 0 and "reading and checking audio" in err and f"{len(rows)}/{len(rows)}" in err, err
    CTCDataset(rows[:4], processor)
    assert "reading and checking audio" not in capsys.readouterr().err


def test_card_base_model_metadata_only_for_a_hub_id(tmp_path):
    """`base_model:` (Hub metadata) is written for a Hub id, with a link to it; a local folder is named in the
    text only; no initialisation gives no base model."""
    from data2vec_aqc_hf.finetuning import card_base_model

    hub = card_base_model("someone/aqc-base", None)
    assert hub["base_model_line"] == "base_model: someone/aqc-base\n"
    assert "(https://huggingface.co/someone/aqc-base)" in hub["base_model_text"]
    (tmp_path / "my-pretrain").mkdir()
    local = card_base_model(str(tmp_path / "my-pretrain"), None)
    assert local["base_model_line"] == "" and str(tmp_path) not in local["base_model_text"]
    assert "`my-pretrain`" in local["base_model_text"]
    scratch = card_base_model(None, "small")
    assert scratch["base_model_line"] == "" and "preset `small`" in scratch["base_model_text"]


def test_card_templates_have_no_placeholder_links():
    """Every link in the card templates points somewhere (no bare `https://github.com/` or empty targets)."""
    import re

    for template in sorted((ROOT / "model_cards").glob("*.md")):
        text = template.read_text()
        for url in re.findall(r"\]\(([^)]*)\)", text):
            assert url and url.rstrip("/") not in ("https://github.com", "https://huggingface.co", "#"), \
                f"{template.name}: placeholder link {url!r}"
            assert url.startswith(("https://", "$")), f"{template.name}: link {url!r}"


def test_weight_ema_callback_hand_computed_and_applied_at_the_end():
    """The average after three updates equals the formula written out; the model holds it at the end and the raw
    last weights are kept; frozen parameters stay exactly as they were; a bad decay is refused."""
    from data2vec_aqc_hf.finetuning import WeightEMACallback

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[1].weight.requires_grad_(False)
    frozen = model[1].weight.detach().clone()
    callback = WeightEMACallback(model, decay=0.9)
    seen = []
    for step in range(3):
        with torch.no_grad():
            model[0].weight.add_(float(step + 1))  # a stand-in optimizer step
        seen.append(model[0].weight.detach().clone())
        callback.on_step_end(None, None, None)
    expected = 0.9 * (0.9 * seen[0] + 0.1 * seen[1]) + 0.1 * seen[2]
    assert torch.allclose(callback.averaged_state()["0.weight"], expected, atol=1e-6)
    callback.on_train_end(None, None, None)
    assert torch.allclose(model[0].weight, expected, atol=1e-6)
    assert torch.equal(callback.raw_state["0.weight"], seen[2])
    assert torch.equal(model[1].weight, frozen)
    with pytest.raises(ValueError, match="decay"):
        WeightEMACallback(model, decay=1.0)
