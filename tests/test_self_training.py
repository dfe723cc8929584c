"""Self-training (pseudo-labelling): confidence, selection, the pseudo-labelled dataset, and one round end to end."""

import math

import numpy as np
import pytest
import torch
from transformers import TrainingArguments

from conftest import tiny_config
from data2vec_aqc_hf.finetuning import (CTCDataset, build_vocab, greedy_confidence, make_processor,
                                        transcribe_arrays)
from data2vec_aqc_hf.self_training import (PseudoLabels, pseudo_label, pseudo_labelled_dataset, select_confident,
                                           self_train)


def test_greedy_confidence_is_the_mean_log_probability_of_the_argmax():
    """Hand-computed: frames with arg-max probabilities 0.5 and 0.5; one certain frame; no frames."""
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.25, 0.25, 0.5]])
    assert greedy_confidence(probs.log()) == pytest.approx(math.log(0.5), abs=1e-6)
    assert greedy_confidence(torch.tensor([[1.0, 1e-12, 1e-12]]).log()) == pytest.approx(0.0, abs=1e-6)
    assert greedy_confidence(torch.zeros(0, 3)) == -math.inf


def test_clip_log_probs_are_each_clips_own_frames_in_input_order(tmp_path):
    """One tensor per clip with exactly its CNN frames, normalised, and the greedy transcript is its arg-max."""
    from data2vec_aqc_hf.finetuning import clip_log_probs
    from data2vec_aqc_hf.modeling_data2vec_aqc import Data2VecAQCForCTC

    processor = make_processor(build_vocab(["ONE TWO THREE"]), tmp_path)
    torch.manual_seed(0)
    model = Data2VecAQCForCTC(tiny_config(vocab_size=len(processor.tokenizer)))
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (9000, 3000, 15000)]
    lps = clip_log_probs(model, processor, arrays, batch_size=2)
    assert [lp.shape[0] for lp in lps] == [int(model._get_feat_extract_output_lengths(len(a))) for a in arrays]
    assert all(torch.allclose(lp.exp().sum(-1), torch.ones(lp.shape[0]), atol=1e-5) for lp in lps)
    pairs = transcribe_arrays(model, processor, arrays, batch_size=2, with_confidence=True)
    assert [t for t, _ in pairs] == [processor.decode(lp.argmax(-1).numpy()) for lp in lps]
    assert [c for _, c in pairs] == [greedy_confidence(lp) for lp in lps]


def test_closed_set_labels_pick_the_most_likely_candidate_with_its_posterior(tmp_path):
    """Hand-built log-probabilities: 3 frames that spell O, N, E (p=0.9 each, rest spread) give ONE; the
    posterior among the candidates is the softmax of their per-frame CTC log-likelihoods (checked against torch's
    CTC loss computed by hand for each candidate); a candidate longer than the clip has likelihood 0."""
    from data2vec_aqc_hf.self_training import closed_set_labels

    processor = make_processor(build_vocab(["ONE TWO"]), tmp_path)
    vocab = processor.tokenizer.get_vocab()
    size = len(processor.tokenizer)
    lp = torch.full((3, size), 0.1 / (size - 1))
    for t, ch in enumerate("ONE"):
        lp[t, vocab[ch]] = 0.9
    lp = lp.log()
    texts, conf = closed_set_labels([lp], processor, ["ONE", "TWO", "ONE TWO"])
    assert texts == ["ONE"]
    lls = []
    for c in ["ONE", "TWO"]:
        ids = torch.tensor(processor.tokenizer(c).input_ids)
        lls.append(-torch.nn.functional.ctc_loss(lp, ids, (3,), (len(ids),), blank=processor.tokenizer.pad_token_id,
                                                 reduction="sum"))
    per_frame = torch.stack(lls) / 3
    expected = per_frame[0] - torch.logsumexp(per_frame, 0)  # "ONE TWO" (7 labels) cannot fit 3 frames
    assert -1.0 < float(expected) < -1e-3  # per frame: not saturated (the whole clip softmax gives about -1e-6 here)
    assert conf[0] == pytest.approx(float(expected), abs=1e-5)
    assert closed_set_labels([lp[:1]], processor, ["ONE", "TWO"]) == ([""], [-math.inf])
    with pytest.raises(ValueError, match="at least one candidate"):
        closed_set_labels([lp], processor, [])


def test_select_confident_keeps_the_most_confident_in_lexicon_share_of_the_pool():
    texts = ["ONE", "", "TWO", "TOO", "THREE", "ONE"]
    conf = [-0.1, -0.01, -0.5, -0.05, -0.3, -0.2]
    # the empty transcript never counts; "TOO" is rejected by the lexicon; 0.5 of 6 clips = 3 kept
    assert select_confident(texts, conf, 0.5, {"ONE", "TWO", "THREE"}) == ([0, 4, 5], 1)
    assert select_confident(texts, conf, 0.5) == ([0, 3, 5], 0)
    assert select_confident(texts, conf, 1.0, {"ONE", "TWO", "THREE"}) == ([0, 2, 4, 5], 1)
    with pytest.raises(ValueError, match="keep_fraction"):
        select_confident(texts, conf, 0.0)
    with pytest.raises(ValueError, match="confidences"):
        select_confident(texts, conf[:2], 0.5)


def test_pseudo_labelled_dataset_uses_the_tokenizer_and_drops_clips_ctc_cannot_align(tmp_path):
    processor = make_processor(build_vocab(["ONE TWO THREE"]), tmp_path)
    arrays = [np.zeros(8000, np.float32), np.zeros(400, np.float32), np.zeros(16000, np.float32)]
    labels = PseudoLabels(["ONE", "THREE", "TWO"], [-0.1, -0.2, -0.3], [0, 1, 2], names=["a.flac", "b.flac", "c.flac"])
    ds = pseudo_labelled_dataset(processor, arrays, labels)
    # 400 samples give 1 CNN frame, too few for THREE (5 labels + a blank between the two E's)
    assert [e["name"] for e in ds.examples] == ["a.flac", "c.flac"]
    assert ds.examples[0]["labels"] == processor.tokenizer("ONE").input_ids
    assert ds.examples[1]["text"] == "TWO" and ds.examples[1]["speaker_id"] == "pseudo-labelled"
    assert len(ds.concat(ds)) == 4


def test_pseudo_label_matches_transcribe_arrays_and_self_train_runs_a_round(tmp_path):
    """The pseudo-labels are exactly the greedy transcripts; a round trains on labelled + selected clips
    (the optimizer really moves the weights) and reports the pseudo-labels' accuracy against given references."""
    from data2vec_aqc_hf.modeling_data2vec_aqc import Data2VecAQCForCTC

    processor = make_processor(build_vocab(["ONE TWO THREE"]), tmp_path / "p")
    torch.manual_seed(0)
    model = Data2VecAQCForCTC(tiny_config(vocab_size=len(processor.tokenizer), mask_time_prob=0.0))
    rng = np.random.default_rng(0)
    arrays = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (9000, 12000, 15000, 10000)]
    labels = pseudo_label(model, processor, arrays, keep_fraction=1.0)
    assert labels.texts == transcribe_arrays(model, processor, arrays)
    labelled = CTCDataset.from_examples([
        {"input_values": arrays[0], "labels": processor.tokenizer("ONE").input_ids, "text": "ONE",
         "speaker_id": "a", "name": "x"}])
    # a random model's transcripts are often empty: force a selection of every clip through a permissive stand-in
    labels_all = PseudoLabels(["ONE"] * 4, [0.0] * 4, [0, 1, 2, 3])
    assert len(pseudo_labelled_dataset(processor, arrays, labels_all)) == 4
    before = [p.detach().clone() for p in model.parameters()]
    args = TrainingArguments(output_dir=str(tmp_path / "o"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    trainer, history = self_train(model, processor, labelled, arrays, args, rounds=1, keep_fraction=1.0,
                                  references=["ONE", "TWO", "THREE", "ONE"], print_logs=False)
    assert history[0]["pool"] == 4 and history[0]["round"] == 1
    assert 0.0 <= history[0]["pool_accuracy"] <= 1.0 and trainer.state.global_step == 2
    assert any((a - b).abs().max() > 0 for a, b in zip(before, trainer.model.parameters()))
    with pytest.raises(ValueError, match="pool is empty"):
        self_train(model, processor, labelled, [], args)


def test_finetune_cli_self_training_round_is_recorded_and_overlap_with_evaluation_warned(tmp_path, caplog):
    """`run_finetuning` with `--self_training_rounds 1 --unlabelled_data DIR`: the round runs after fine-tuning, its
    record reaches the metrics and the model card, and unlabelled files that are also evaluation files are warned
    about (the WER would then score clips the model was self-trained on)."""
    import logging
    import shutil
    from pathlib import Path

    from conftest import DEMO
    from data2vec_aqc_hf import Data2VecAQCForPreTraining
    from data2vec_aqc_hf.finetuning import FinetuneArguments, run_finetuning

    pre = Data2VecAQCForPreTraining(tiny_config())
    pre.save_pretrained(tmp_path / "pre")
    pool = tmp_path / "pool"
    pool.mkdir()
    clips = sorted((DEMO / "audio/fsdd/yweweler").glob("*.flac"))[:6]
    for c in clips:
        shutil.copy(c, pool / c.name)
    (pool / "broken.flac").write_bytes(b"not audio")
    common = dict(model_name_or_path=str(tmp_path / "pre"), train_manifest=str(DEMO / "metadata.csv"),
                  eval_speakers="fsdd_yweweler", mask_time_prob=0.05, layerdrop=0.0)
    targs = TrainingArguments(output_dir=str(tmp_path / "ft"), max_steps=2, per_device_train_batch_size=4,
                              learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no")
    args = FinetuneArguments(**common, unlabelled_data=str(pool), self_training_rounds=1, self_training_steps=2,
                             self_training_keep_fraction=1.0)
    with caplog.at_level(logging.WARNING):
        metrics = run_finetuning(args, targs)
    assert "broken.flac" in caplog.text  # named, skipped
    assert "also evaluation files" not in caplog.text  # copies elsewhere are not the evaluation's files
    (record,) = metrics["self_training"]
    assert record["pool"] == 6 and record["round"] == 1
    card = (tmp_path / "ft/final/README.md").read_text()
    assert f"round 1: {record['selected']} of 6 clips" in card
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_finetuning(FinetuneArguments(**common, unlabelled_data=str(DEMO / "audio/fsdd/yweweler"),
                                         self_training_rounds=1, self_training_steps=1), targs)
    assert "120 of the 320 unlabelled files are also evaluation files" in caplog.text
    with pytest.raises(ValueError, match="needs --unlabelled_data"):
        FinetuneArguments(**common, self_training_rounds=1)
    with pytest.raises(ValueError, match="only used for self-training"):
        FinetuneArguments(**common, unlabelled_data=str(pool))


def test_demo_self_training_pool_is_the_unseen_speakers_other_clips():
    """data/demo/unlabelled_digits.csv, the README's self-training pool for the demo fine-tuning: 20 takes per digit
    of its unseen speaker, none of them a clip the demo scores, every file readable and credited in provenance.csv."""
    import csv

    import yaml
    from conftest import DEMO
    from data2vec_aqc_hf.finetuning import read_unlabelled

    config = yaml.safe_load(open(DEMO.parents[1] / "configs/demo_finetune.yaml"))
    assert config["eval_speakers"] == "fsdd_yweweler"
    assert "--unlabelled_data data/demo/unlabelled_digits.csv" in (DEMO.parents[1] / "README.md").read_text()
    pool = [r["file_name"] for r in csv.DictReader(open(DEMO / "unlabelled_digits.csv"))]
    scored = {r["file_name"] for r in csv.DictReader(open(DEMO / "metadata.csv"))
              if r["speaker_id"] == config["eval_speakers"]}
    assert len(pool) == len(set(pool)) == 200 and len(scored) == 120 and not set(pool) & scored
    digits = [name.rsplit("/", 1)[-1].split("_")[0] for name in pool]
    assert all(name.startswith("audio/fsdd/yweweler/") for name in pool)
    assert {d: digits.count(d) for d in set(digits)} == {str(d): 20 for d in range(10)}
    credited = {r["file_name"] for r in csv.DictReader(open(DEMO / "provenance.csv"))}
    assert set(pool) <= credited
    arrays, names = read_unlabelled(DEMO / "unlabelled_digits.csv")
    assert len(arrays) == 200 and all(0.1 < len(a) / 16000 < 2.5 for a in arrays)


def test_label_constraints_and_round_arguments(tmp_path):
    """Each labelling mode's constraint from the labelled transcripts; a round's Trainer options keep the run's
    batch and seed but take the round's length, LR, 10 % warm-up and folder, and never resume a checkpoint."""
    from data2vec_aqc_hf.self_training import label_constraints, round_arguments

    texts = ["ONE", "TWO ONE", "ONE"]
    assert label_constraints("greedy", texts) == (None, None)
    assert label_constraints("lexicon", texts) == ({"ONE", "TWO"}, None)
    assert label_constraints("closed_set", texts) == (None, ["ONE", "TWO ONE"])
    with pytest.raises(ValueError, match="greedy, lexicon or closed_set"):
        label_constraints("beam", texts)
    base = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=800, learning_rate=1e-3, warmup_steps=80,
                             logging_steps=50, per_device_train_batch_size=16, seed=3, report_to="none", use_cpu=True,
                             resume_from_checkpoint=str(tmp_path / "run/checkpoint-400"))
    r = round_arguments(base, 300, 5e-4, tmp_path / "st")
    assert (r.max_steps, r.learning_rate, r.warmup_steps, r.logging_steps) == (300, 5e-4, 30, 30)
    assert (r.per_device_train_batch_size, r.seed, r.resume_from_checkpoint) == (16, 3, None)
    assert r.output_dir == str(tmp_path / "st") and base.max_steps == 800
    assert round_arguments(base, 1000, 5e-4, tmp_path / "st").logging_steps == 50
