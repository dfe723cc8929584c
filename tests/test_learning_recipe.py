"""The pieces of the recipe that learns at CPU scale: run-length schedules, fine-tuning that trains a random CNN,
masking that leaves short clips visible, noisy test conditions, the experiment's data splits and the experiment
end to end at toy scale."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import DEMO, ROOT, SHARED, tiny_config

from data2vec_aqc_hf import Data2VecAQCConfig, Data2VecAQCForPreTraining
from data2vec_aqc_hf.configuration_data2vec_aqc import PAPER_UPDATES
from data2vec_aqc_hf.finetuning import (
    CTCDataset,
    add_noise,
    babble_noise,
    build_vocab,
    load_ctc_model,
    make_processor,
    masked_time_fraction,
    read_manifest,
)
from data2vec_aqc_hf.quantizer import gumbel_temperature
from data2vec_aqc_hf.teacher import ema_decay


def test_scaled_schedules_cover_the_same_fraction_of_the_run():
    paper = Data2VecAQCConfig()
    same = Data2VecAQCConfig()
    same.scale_schedules_to(PAPER_UPDATES)
    assert (same.ema_anneal_steps, same.ema_decay_start, same.ema_decay_end) == (30000, 0.999, 0.9999)
    assert math.isclose(same.gumbel_temperature_decay, 0.999995, rel_tol=0, abs_tol=1e-15)

    short = Data2VecAQCConfig()
    short.scale_schedules_to(4000)  # 100x shorter
    assert short.ema_anneal_steps == 300
    # the EMA decays keep their floors (teacher horizon >= 100 / 1000 updates) ...
    assert short.ema_decay_start == 0.99 and short.ema_decay_end == 0.999
    long = Data2VecAQCConfig()
    long.scale_schedules_to(100_000)  # ... and scale above them: 1 - (1 - tau) * 4
    assert math.isclose(long.ema_decay_start, 0.996) and math.isclose(long.ema_decay_end, 0.9996)
    short = Data2VecAQCConfig()
    short.scale_schedules_to(4000, min_ema_decay_start=0.0, min_ema_decay_end=0.0)  # scaled all the way
    assert math.isclose(short.ema_decay_start, 0.9) and math.isclose(short.ema_decay_end, 0.99)
    for fraction in (0.0, 0.1, 0.5, 0.69, 1.0):
        # the temperature at the same fraction of either run is the same
        t_paper = gumbel_temperature(int(fraction * PAPER_UPDATES), 2.0, 0.5, paper.gumbel_temperature_decay)
        t_short = gumbel_temperature(int(fraction * 4000), 2.0, 0.5, short.gumbel_temperature_decay)
        assert abs(float(t_paper) - float(t_short)) < 1e-3
    # the teacher's averaging horizon 1 / (1 - tau) is the same fraction of the run
    horizon_paper = 1 / (1 - float(ema_decay(PAPER_UPDATES, 0.999, 0.9999, 30000)))
    horizon_short = 1 / (1 - float(ema_decay(4000, short.ema_decay_start, short.ema_decay_end,
                                             short.ema_anneal_steps)))
    assert math.isclose(horizon_paper / PAPER_UPDATES, horizon_short / 4000, rel_tol=1e-6)
    # 600 updates with the paper's values: the temperature has hardly moved; scaled, it reaches its floor
    assert float(gumbel_temperature(600, 2.0, 0.5, 0.999995)) > 1.99
    tiny_run = Data2VecAQCConfig()
    tiny_run.scale_schedules_to(600)
    assert float(gumbel_temperature(600, 2.0, 0.5, tiny_run.gumbel_temperature_decay)) == 0.5
    with pytest.raises(ValueError, match="total_updates"):
        tiny_run.scale_schedules_to(0)


def test_small_preset_size_and_short_clip_masking():
    config = Data2VecAQCConfig.from_preset("small")
    model = Data2VecAQCForPreTraining(config)
    student = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("teacher."))
    assert 3e6 < student < 8e6
    # a 0.4 s spoken digit has 19 frames: pretraining masking must leave some of it visible
    fraction = masked_time_fraction(config, [19] * 2000)
    assert 0.3 < fraction < 0.8


def test_masked_fraction_matches_transformers_masking():
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

    for prob, length, min_masks in ((0.05, 10, 2), (0.05, 4, 0), (0.5, 10, 2)):
        config = Data2VecAQCConfig(mask_time_prob=prob, mask_time_length=length, mask_time_min_masks=min_masks)
        ours = masked_time_fraction(config, [21] * 4000, seed=1)
        np.random.seed(0)  # transformers draws one rounding jitter per batch (we draw one per utterance): the
        # expected fraction is the same, so average over many batches
        theirs = np.mean([_compute_mask_indices((8, 21), prob, length, min_masks=min_masks).mean()
                          for _ in range(500)])
        assert abs(ours - theirs) < 0.02, (prob, length, min_masks, ours, theirs)
    # the calibration's finding: transformers' default min_masks=2 hides most of a short clip
    assert masked_time_fraction(Data2VecAQCConfig(mask_time_prob=0.05, mask_time_length=10, mask_time_min_masks=2),
                                [21] * 1000) > 0.5
    assert masked_time_fraction(Data2VecAQCConfig(mask_time_prob=0.05, mask_time_length=4, mask_time_min_masks=0),
                                [21] * 1000) < 0.1


def test_ctc_model_trains_a_random_cnn_and_freezes_a_pretrained_one(tmp_path):
    processor = make_processor(build_vocab(["ONE TWO"]), tmp_path / "proc")
    Data2VecAQCForPreTraining(tiny_config()).save_pretrained(tmp_path / "pre")

    def cnn_trainable(model):
        return all(p.requires_grad for p in model.data2vec_audio.feature_extractor.parameters())

    assert not cnn_trainable(load_ctc_model(str(tmp_path / "pre"), processor))  # auto: pretrained -> frozen
    assert cnn_trainable(load_ctc_model(str(tmp_path / "pre"), processor, freeze_feature_encoder="false"))
    scratch = load_ctc_model(None, processor, model_preset="tiny")
    assert cnn_trainable(scratch)  # auto: random -> trained
    assert scratch.config.mask_time_min_masks == 0 and scratch.lm_head.out_features == len(processor.tokenizer)
    assert not cnn_trainable(load_ctc_model(None, processor, model_preset="tiny", freeze_feature_encoder=True))
    with pytest.raises(ValueError, match="model_preset"):
        load_ctc_model(None, processor)
    with pytest.raises(ValueError, match="true, false or auto"):
        load_ctc_model(None, processor, model_preset="tiny", freeze_feature_encoder="sometimes")


def test_noise_is_mixed_at_the_true_snr_and_reproducible():
    rng = np.random.default_rng(0)
    speech = [rng.standard_normal(8000).astype(np.float32) * 0.1, rng.standard_normal(3000).astype(np.float32)]
    bank = [rng.standard_normal(n).astype(np.float32) * s for n, s in ((5000, 1.0), (12000, 3.0), (700, 0.2),
                                                                         (9000, 0.5), (4000, 2.0))]
    for kind in ("white", "babble"):
        for snr in (10.0, 0.0):
            noisy = add_noise(speech, kind, snr, seed=3, babble_bank=bank)
            for clean, mixed in zip(speech, noisy):
                noise = mixed - clean
                measured = 10 * np.log10(np.mean(clean ** 2) / np.mean(noise ** 2))
                assert abs(measured - snr) < 1e-3
            again = add_noise(speech, kind, snr, seed=3, babble_bank=bank)
            assert all(np.array_equal(a, b) for a, b in zip(noisy, again))
    # babble: the sum of 4 unit-power talkers (not white noise): power 4 when they are uncorrelated
    b = babble_noise(2000, bank, generator=torch.Generator().manual_seed(0))
    assert abs(float(b.square().mean()) - 4.0) < 0.6
    with pytest.raises(ValueError, match="babble_bank"):
        add_noise(speech, "babble", 5.0)
    with pytest.raises(ValueError, match="white' or 'babble"):
        add_noise(speech, "pink", 5.0)


def test_low_resource_subset_is_balanced_and_seeded(tmp_path):
    from data2vec_aqc_hf.experiment import low_resource_subset, per_digit_subset

    rows = read_manifest(DEMO / "metadata.csv")
    processor = make_processor(build_vocab([r["text"] for r in rows]), tmp_path)
    data = CTCDataset([r for r in rows if r["speaker_id"] != "fsdd_yweweler"], processor)
    low = low_resource_subset(data, 20, seed=0)
    assert len(low) == 60
    for speaker in ("fsdd_jackson", "fsdd_lucas", "fsdd_nicolas"):
        texts = [e["text"] for e in low.examples if e["speaker_id"] == speaker]
        assert sorted(set(texts)) == sorted({r["text"] for r in rows}) and all(texts.count(t) == 2 for t in texts)
    other = low_resource_subset(data, 20, seed=1)
    assert {e["name"] for e in other.examples} != {e["name"] for e in low.examples}
    assert len(per_digit_subset(data, 3)) == 30


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/speech_corpus (the experiment's corpus)")
def test_experiment_end_to_end_at_toy_scale(tmp_path):
    """The whole experiment (pretraining, fine-tuning, noisy tests, report) at a toy scale: one fold, one seed,
    a few updates, the tiny model; checks the report's structure, not the numbers."""
    from data2vec_aqc_hf.experiment import ExperimentArguments, run_experiment

    args = ExperimentArguments(
        corpus_dir=str(SHARED), output_dir=str(tmp_path / "exp"), results_md=str(tmp_path / "docs" / "RESULTS.md"),
        model_preset="tiny", objectives="aqc,none", test_speakers="fsdd_lucas", seeds="0", label_sets="low",
        low_resource_per_speaker=10, pretrain_steps=3, finetune_steps_low=2, noisy_per_digit=1, snrs="5", jobs=1,
        sanity_steps=0)
    report = run_experiment(args)
    assert {r["init"] for r in report["runs"]} == {"aqc", "none"}
    run = report["runs"][0]
    import importlib.util

    lm = importlib.util.find_spec("pyctcdecode") is not None and importlib.util.find_spec("kenlm") is not None
    assert set(run["wer"]) == {"clean", "white_5", "babble_5"} | ({"clean_lm"} if lm else set())
    assert run["num_train"] == 30
    assert run["test_speaker"] == "fsdd_lucas" and run["num_test"] == 500 and run["num_noisy_test"] == 10
    markdown = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "| aqc | 1 |" in markdown and "| scratch | 1 |" in markdown
    assert (tmp_path / "docs" / "fsdd_ssl_results.png").exists()
    assert (tmp_path / "docs" / "fsdd_ssl_pretrain_aqc.png").exists()
    assert json.loads((tmp_path / "exp" / "pretrain" / "aqc" / "summary.json").read_text())["steps"] == 3
    # a second invocation reuses every finished run and pretraining
    again = run_experiment(args)
    assert [r["total_seconds"] for r in again["runs"]] == [r["total_seconds"] for r in report["runs"]]
    # ... unless a setting it depends on changed
    args.finetune_steps_low = 3
    changed = run_experiment(args)
    assert {r["steps"] for r in changed["runs"]} == {3}
    # self-training: 2 takes per digit of the test speaker become the unlabelled pool and leave every test set
    args.self_training_rounds, args.self_training_pool_per_digit, args.self_training_steps = 1, 2, 1
    args.self_training_labels = "closed_set"  # every clip gets a label (a 3-update model's greedy ones are not words)
    st = run_experiment(args)
    for run in st["runs"]:
        assert run["num_test"] == 480 and {"before_st", "clean"} <= set(run["wer"])
        (record,) = run["self_training"]
        assert record["pool"] == 20 and record["selected"] == 10 and 0.0 <= record["selected_accuracy"] <= 1.0
    markdown = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "| init | runs | before_st | clean |" in markdown and "Self-training: after fine-tuning, 1 round(s)" in markdown


def test_quantizer_init_keeps_the_gumbel_softmax_unsaturated():
    """The default logit-projection init gives unit-std logits on layer-normed features (a soft code distribution
    the diversity loss can act on); the reference init (std 1.0) gives logits of std sqrt(d), a one-hot softmax."""
    torch.manual_seed(0)
    features = torch.nn.functional.layer_norm(torch.randn(4000, 256), (256,))

    def stats(**overrides):
        model = Data2VecAQCForPreTraining(Data2VecAQCConfig.from_preset("small", **overrides))
        with torch.no_grad():
            logits = model.quantizer.weight_proj(features)
        probs = (logits.view(4000, 2, -1) / 2.0).softmax(-1)  # the initial Gumbel temperature
        return float(logits.std()), float(probs.max(-1).values.mean())

    std, top = stats()
    assert abs(std - 1.0) < 0.1 and top < 0.3
    std, top = stats(quantizer_init_std=1.0)
    assert abs(std - 16.0) < 1.6 and top > 0.7


def test_padding_leaks_through_stacked_positional_convs_and_sorted_batches_limit_it(tmp_path):
    """transformers' data2vec-audio applies several positional conv layers; after the first, padded positions are
    non-zero and leak into the valid frames, so a clip's logits depend on its batch-mates' lengths (exact with one
    layer). `transcribe_arrays` batches length-sorted arrays (less padding) and returns them in input order."""
    from data2vec_aqc_hf.finetuning import transcribe_arrays
    from data2vec_aqc_hf.modeling_data2vec_aqc import Data2VecAQCForCTC

    torch.manual_seed(0)
    short, long = torch.randn(1, 8000), torch.randn(1, 24000)
    x = torch.zeros(2, 24000)
    x[0, :8000], x[1] = short, long
    mask = torch.zeros(2, 24000, dtype=torch.long)
    mask[0, :8000], mask[1] = 1, 1
    for layers, leaks in ((1, False), (5, True)):
        model = Data2VecAQCForCTC(tiny_config(num_conv_pos_embeddings=layers, vocab_size=12)).eval()
        with torch.no_grad():
            alone = model(short).logits[0]
            padded = model(x, attention_mask=mask).logits[0, : alone.shape[0]]
        assert ((alone - padded).abs().max() > 1e-3) == leaks
    processor = make_processor(build_vocab(["ONE TWO THREE"]), tmp_path)
    model = Data2VecAQCForCTC(tiny_config(vocab_size=len(processor.tokenizer)))
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (9000, 3000, 15000, 5000, 3100)]
    forward = transcribe_arrays(model, processor, arrays, batch_size=2)
    backward = transcribe_arrays(model, processor, arrays[::-1], batch_size=2)
    assert forward == backward[::-1]


def test_effective_rank_counts_the_directions_used():
    """k orthogonal directions of equal variance -> exactly k; one dominant direction -> close to 1; the
    pretraining diagnostics warn below 10 (the collapsed `small` runs measured 3.6-7.8, a random init ~69)."""
    from data2vec_aqc_hf.pretraining import effective_rank

    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(64, 64, generator=g))[0]
    for k in (1, 5, 20):
        codes = torch.randn(4000, k, generator=g)
        codes = (codes - codes.mean(0)) / codes.std(0)  # equal variance per direction
        codes = torch.linalg.qr(codes)[0] * 10  # exactly orthogonal columns of equal norm
        x = codes @ basis[:k]
        assert abs(effective_rank(x) - k) < 1e-3, k
    skewed = torch.randn(4000, 64, generator=g) * torch.tensor([100.0] + [0.01] * 63)
    assert effective_rank(skewed) < 1.01


@pytest.mark.parametrize("name", ["base_librispeech_960h.yaml", "demo.yaml", "demo_finetune.yaml"])
def test_shipped_yaml_configs_parse_with_their_scripts(name):
    """Every file in configs/ parses into the script's arguments (a renamed or removed flag fails here)."""
    from transformers import TrainingArguments

    from data2vec_aqc_hf.cli import parse_args
    from data2vec_aqc_hf.finetuning import FinetuneArguments
    from data2vec_aqc_hf.pretraining import PretrainingArguments

    path = str(ROOT / "configs" / name)
    if name == "demo_finetune.yaml":
        args, training_args = parse_args((FinetuneArguments, TrainingArguments), [path, "--output_dir", "/tmp/x"])
        assert args.model_name_or_path == "outputs/demo-pretrain" and training_args.max_steps > 0
    else:
        (args,) = parse_args(PretrainingArguments, [path])
        assert args.max_steps > 0 and args.model_preset in ("base", "small")


def test_base_preset_is_the_papers_95m_model():
    """The `base` preset builds; its trained parameters (student + heads, no teacher) are the paper's ~95 M."""
    from data2vec_aqc_hf import Data2VecAQCConfig, Data2VecAQCForPreTraining

    config = Data2VecAQCConfig.from_preset("base")
    assert (config.hidden_size, config.num_hidden_layers, config.conv_dim[0], config.num_target_layers) == (768, 12, 512, 8)
    model = Data2VecAQCForPreTraining(config)
    trained = sum(p.numel() for p in model.student_parameters())
    assert 93e6 < trained < 96e6, trained


def test_loss_reproducibility_with_dropout_needs_the_global_seed_too():
    """What the README promises: without dropout/layerdrop the loss is a function of weights, inputs and the
    generator alone; with them (the base recipe) torch's global RNG must be seeded as well."""
    from data2vec_aqc_hf import Data2VecAQCForPreTraining

    x = torch.randn(2, 8000, generator=torch.Generator().manual_seed(1))

    def loss(model, global_seed):
        torch.manual_seed(global_seed)
        return model(x, generator=torch.Generator().manual_seed(0)).loss.item()

    plain = Data2VecAQCForPreTraining(tiny_config()).train()
    assert loss(plain, 1) == loss(plain, 2)
    noisy = Data2VecAQCForPreTraining(tiny_config(hidden_dropout=0.1, attention_dropout=0.1, layerdrop=0.05)).train()
    assert loss(noisy, 1) == loss(noisy, 1) and loss(noisy, 1) != loss(noisy, 2)


def test_greedy_decoding_never_reads_padded_frames(tmp_path):
    """A padded row's frames past its length are padding: decoding must stop at the row's own frames. Logits whose
    padded frames argmax to a letter decode to the unpadded text with lengths (and with `blank_padded_frames`), to a
    longer, wrong text without."""
    from data2vec_aqc_hf.finetuning import blank_padded_frames, decode_predictions, valid_frame_lengths
    from data2vec_aqc_hf.modeling_data2vec_aqc import Data2VecAQCForCTC

    processor = make_processor(build_vocab(["ONE TWO"]), tmp_path)
    vocab = processor.tokenizer.get_vocab()
    path = ["O", "N", "E", "<pad>", "<pad>", "T", "W", "O"]  # 8 frames of real audio; then 4 padded frames
    logits = torch.full((1, 12, len(vocab)), -5.0)
    for t, c in enumerate(path + ["N", "E", "N", "E"]):
        logits[0, t, vocab[c]] = 5.0
    assert decode_predictions(processor, logits.numpy()) == ["ONETWONENE"]
    lengths = torch.tensor([8])
    assert decode_predictions(processor, logits.numpy(), lengths) == ["ONETWO"]
    blanked = blank_padded_frames(logits, lengths, processor.tokenizer.pad_token_id)
    assert decode_predictions(processor, blanked.numpy()) == ["ONETWO"]
    assert torch.equal(blanked[0, :8], logits[0, :8])
    # valid frames from the attention mask follow the CNN length formula
    model = Data2VecAQCForCTC(tiny_config(vocab_size=len(vocab)))
    mask = torch.zeros(2, 16000, dtype=torch.long)
    mask[0, :16000], mask[1, :8000] = 1, 1
    assert valid_frame_lengths(model, mask, 49, 2).tolist() == [49, 24]


def test_speed_perturbation_scales_length_and_pitch():
    """`speed_perturb(x, f)` plays x f times faster: length / f and every frequency x f (a 440 Hz tone at factor 1.1
    peaks at 484 Hz); factor 1 is the identity; the collator draws factors from torch's global RNG (seeded runs
    repeat) and leaves audio untouched without `speed_perturbation`."""
    from data2vec_aqc_hf.finetuning import CTCCollator, speed_perturb

    sr = 16000
    t = np.arange(sr) / sr
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    for factor in (0.9, 1.1):
        out = speed_perturb(tone, factor)
        assert abs(len(out) - len(tone) / factor) <= 1
        spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
        peak_hz = np.argmax(spectrum) * sr / len(out)
        assert abs(peak_hz - 440 * factor) < 2, (factor, peak_hz)
    assert speed_perturb(tone, 1.0) is tone
    from data2vec_aqc_hf.finetuning import speed_range

    assert speed_range(0.15) == (0.85, 1.15) and speed_range(0.0) is None
    with pytest.raises(ValueError):
        speed_range(1.0)
    with pytest.raises(ValueError):
        speed_perturb(tone, 0.0)

    import tempfile

    processor = make_processor(build_vocab(["ONE"]), tempfile.mkdtemp())
    features = [{"input_values": tone, "labels": [3, 4, 5]}]
    plain = CTCCollator(processor)(features)
    assert plain["input_values"].shape[1] == len(tone)
    collator = CTCCollator(processor, speed_perturbation=(0.8, 1.2))
    torch.manual_seed(3)
    a = collator(features)["input_values"]
    torch.manual_seed(3)
    b = collator(features)["input_values"]
    assert torch.equal(a, b) and a.shape[1] != len(tone)
    assert int(round(len(tone) / 1.2)) - 1 <= a.shape[1] <= int(round(len(tone) / 0.8)) + 1


def test_noise_augmentation_replaces_the_picked_clips_by_the_student_view(tmp_path):
    """`CTCCollator(noise_augmentation=p)`: p = 0 leaves the batch as the plain collator makes it; p = 1 changes every
    clip, each again zero-mean unit-variance over its own samples with its padding zero; a seeded call repeats; the
    clips not picked are bit-identical to the plain batch; p outside [0, 1] is refused."""
    from data2vec_aqc_hf.finetuning import CTCCollator

    processor = make_processor(build_vocab(["ONE"]), tmp_path / "p")
    t = np.arange(16000) / 16000
    features = [{"input_values": np.sin(2 * np.pi * 300 * t[:n]).astype(np.float32), "labels": [3, 4, 5]}
                for n in (16000, 9000, 12000, 5000)]
    plain = CTCCollator(processor)(features)
    assert torch.equal(CTCCollator(processor, noise_augmentation=0.0)(features)["input_values"], plain["input_values"])
    torch.manual_seed(0)
    every = CTCCollator(processor, noise_augmentation=1.0)(features)
    x, mask = every["input_values"], every["attention_mask"].bool()
    from data2vec_aqc_hf import Data2VecAQCConfig
    from data2vec_aqc_hf.augment import WaveformAugmenter, normalize_waveform

    torch.manual_seed(0)
    torch.rand(4, 1)  # the collator's pick draw comes first
    view = WaveformAugmenter(Data2VecAQCConfig())(plain["input_values"], mask)
    assert torch.equal(x, normalize_waveform(view, mask))
    assert sum(not torch.allclose(x[i], plain["input_values"][i], atol=0.1) for i in range(4)) >= 2
    for i, n in enumerate((16000, 9000, 12000, 5000)):
        assert abs(float(x[i, :n].mean())) < 1e-4 and abs(float(x[i, :n].std()) - 1.0) < 1e-3
        assert torch.all(x[i, n:] == 0)
    torch.manual_seed(0)
    assert torch.equal(CTCCollator(processor, noise_augmentation=1.0)(features)["input_values"], x)
    collator = CTCCollator(processor, noise_augmentation=0.5)
    torch.manual_seed(1)
    half = collator(features)["input_values"]
    kept = [i for i in range(4) if torch.equal(half[i], plain["input_values"][i])]
    assert 0 < len(kept) < 4  # with seed 1 some clips are picked and some not
    with pytest.raises(ValueError):
        CTCCollator(processor, noise_augmentation=1.5)


def test_trainer_evaluates_on_clean_audio_while_training_on_perturbed(tmp_path):
    """`CTCTrainer` batches evaluation data with the clean collator: an eval batch has the clip's own length,
    a training batch the perturbed one."""
    from data2vec_aqc_hf.finetuning import CTCCollator, CTCTrainer
    from data2vec_aqc_hf.modeling_data2vec_aqc import Data2VecAQCForCTC

    processor = make_processor(build_vocab(["ONE"]), tmp_path / "p")
    data = [{"input_values": np.ones(8000, dtype=np.float32) * 0.1, "labels": [3, 4, 5]}] * 2
    model = Data2VecAQCForCTC(tiny_config(vocab_size=len(processor.tokenizer)))
    from transformers import TrainingArguments

    trainer = CTCTrainer(model=model, args=TrainingArguments(str(tmp_path / "o"), report_to="none", use_cpu=True,
                                                             per_device_train_batch_size=2,
                                                             per_device_eval_batch_size=2),
                         train_dataset=data, eval_dataset=data,
                         data_collator=CTCCollator(processor, speed_perturbation=(0.5, 0.6)),
                         eval_data_collator=CTCCollator(processor))
    assert next(iter(trainer.get_eval_dataloader()))["input_values"].shape[1] == 8000
    assert next(iter(trainer.get_test_dataloader(data)))["input_values"].shape[1] == 8000
    assert next(iter(trainer.get_train_dataloader()))["input_values"].shape[1] > 8000 * 1.6


def test_linear_probe_reads_linearly_encoded_classes_and_not_noise():
    """The representation probe: classes placed on separate directions (plus noise) are read at 100 % on new
    samples; features independent of the class score near chance (10 classes)."""
    from data2vec_aqc_hf.experiment import linear_probe_accuracy

    g = torch.Generator().manual_seed(0)
    y_train, y_test = torch.arange(10).repeat(20), torch.arange(10).repeat(10)
    centres = 3 * torch.randn(10, 32, generator=g)

    def encoded(y):
        return centres[y] + torch.randn(len(y), 32, generator=g)

    assert linear_probe_accuracy(encoded(y_train), y_train, encoded(y_test), y_test) == 1.0
    noise = linear_probe_accuracy(torch.randn(200, 32, generator=g), y_train, torch.randn(100, 32, generator=g),
                                  y_test)
    assert noise < 0.3


def test_pooled_hidden_states_are_per_layer_time_means(tmp_path):
    """`pooled_hidden_states` = the time mean of each of transformers' `hidden_states` for the clip alone."""
    from transformers import Data2VecAudioModel, Wav2Vec2FeatureExtractor

    from data2vec_aqc_hf.experiment import pooled_hidden_states

    model = Data2VecAudioModel(tiny_config().to_data2vec_audio_config()).eval()
    audio = np.random.default_rng(0).standard_normal(6000).astype(np.float32)
    pooled = pooled_hidden_states(model, [audio])
    x = Wav2Vec2FeatureExtractor(do_normalize=True)(audio, sampling_rate=16000, return_tensors="pt")["input_values"]
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states
    assert pooled.shape == (1, len(hidden), model.config.hidden_size)
    for k, h in enumerate(hidden):
        torch.testing.assert_close(pooled[0, k], h[0].mean(0))


def test_experiment_progress_lines(tmp_path):
    """The experiment's progress: the newest state of a pretraining log's progress bar (not of other bars), and the
    time left from the mean run time and the runs still to do."""
    from data2vec_aqc_hf.experiment import eta_minutes, last_progress

    log = tmp_path / "aqc.log"
    assert last_progress(log) == "starting"
    log.write_text("pretraining:  10%|#  | 30/300 [00:20<03:00,  1.5step/s, loss=4.1]\r"
                   "pretraining:  20%|## | 60/300 [00:40<02:40,  1.5step/s, loss=3.9]\r"
                   "Writing model shards: 100%|##| 1/1 [00:00<00:00, 50.0it/s]")
    assert last_progress(log) == "update 60/300, 00:40 elapsed, 02:40 left"
    assert eta_minutes([300.0, 420.0], 6, 2) == "about 12 min left"  # 4 left, 2 at a time, 6 min each
    assert eta_minutes([60.0] * 3, 3, 2) == "done"


def test_efficient_arms_pretrain_with_the_objective_in_efficient_mode(tmp_path):
    from data2vec_aqc_hf.experiment import ExperimentArguments, pretrain_command

    args = ExperimentArguments(objectives="aqc-efficient,data2vec-efficient,aqc,none", output_dir=str(tmp_path))
    for arm, objective, efficient in [("aqc-efficient", "aqc", True), ("data2vec-efficient", "data2vec", True),
                                      ("aqc", "aqc", False)]:
        cmd = pretrain_command(args, arm, [str(DEMO / "audio/fsdd/jackson/0_jackson_0.flac")], tmp_path / arm)
        flags = dict(zip(cmd[3::2], cmd[4::2]))
        assert flags["--objective"] == objective
        assert (json.loads(flags["--config_overrides"]) == {"efficient_mode": True}) if efficient else (
            "--config_overrides" not in flags)
    # the anti-collapse arms (not part of the method): the objective plus VICReg's weights, the same for both
    args = ExperimentArguments(objectives="aqc-vicreg,data2vec-vicreg,none", output_dir=str(tmp_path))
    for arm, objective in [("aqc-vicreg", "aqc"), ("data2vec-vicreg", "data2vec")]:
        cmd = pretrain_command(args, arm, [str(DEMO / "audio/fsdd/jackson/0_jackson_0.flac")], tmp_path / arm)
        flags = dict(zip(cmd[3::2], cmd[4::2]))
        assert flags["--objective"] == objective
        assert json.loads(flags["--config_overrides"]) == {"variance_loss_weight": 5.0, "covariance_loss_weight": 0.2}
    with pytest.raises(ValueError, match="unknown objective"):
        ExperimentArguments(objectives="aqc-fast")
