"""Reliability and security of the pretraining checkpoints (issue: no code execution on resume)."""

import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_pretrain_script import COMMON, _env, _launch

pytestmark = pytest.mark.slow


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_payload_never_runs_on_resume(tmp_path):
    """Plant a payload in every pickle-format file of a checkpoint in turn, resume: the payload never runs, the
    resume fails with an error naming the checkpoint. No file is unpickled with weights_only=False (the LR
    scheduler is rebuilt from the step instead of being pickled by accelerate)."""
    out = tmp_path / "run"
    _launch(COMMON + ["--output_dir", str(out), "--max_steps", "2", "--save_steps", "2"])
    checkpoint = out / "checkpoints" / "checkpoint-2"
    pickled = sorted(p for p in checkpoint.iterdir() if p.suffix in (".pkl", ".bin", ".pt"))
    assert {p.name for p in pickled} >= {"optimizer.bin", "random_states_0.pkl", "training_state_rank0.pt"}, pickled
    assert not (checkpoint / "custom_checkpoint_0.pkl").exists()
    # an old-style custom_checkpoint_0.pkl (accelerate's registered objects) is planted too: it must be ignored
    pickled.append(checkpoint / "custom_checkpoint_0.pkl")
    for target in pickled:
        original = target.read_bytes() if target.exists() else None
        marker = tmp_path / f"ran-{target.name}"
        torch.save({"state": _Payload(marker)}, target)
        result = subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines",
             "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "training/pretrain.py")]
            + COMMON + ["--output_dir", str(out), "--max_steps", "3", "--save_steps", "100",
                        "--resume_from_checkpoint", str(checkpoint)],
            capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
        assert not marker.exists(), f"the payload in {target.name} ran"
        if target.name == "custom_checkpoint_0.pkl":
            assert result.returncode == 0, result.stderr[-2000:]  # never read
            target.unlink()
        else:
            assert result.returncode != 0 and f"{target.name}: refusing to resume" in result.stderr, \
                result.stderr[-2000:]
        if original is not None:
            target.write_bytes(original)


def test_nonfinite_updates_are_skipped_never_saved_and_stop_the_run(tmp_path):
    """lr 1e4 makes the loss NaN within a few updates: those updates are skipped (weights stay finite), every
    checkpoint written is finite, and after --max_nonfinite_updates in a row the run exits non-zero saying why."""
    from safetensors.torch import load_file

    out = tmp_path / "nan"
    result = subprocess.run(
        [sys.executable, str(ROOT / "training/pretrain.py")] + COMMON
        + ["--output_dir", str(out), "--max_steps", "40", "--save_steps", "1", "--learning_rate", "1e4",
           "--max_nonfinite_updates", "3"],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert result.returncode != 0, result.stdout[-1000:]
    assert "3 consecutive updates had a non-finite loss or gradient norm" in result.stderr, result.stderr[-2000:]
    assert "skipped (1 in a row)" in result.stderr
    assert not (out / "model.safetensors").exists()  # no final model from a failed run
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, "the finite updates before the blow-up were checkpointed"
    for checkpoint in checkpoints:
        weights = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), checkpoint


def _tiny_ctc_setup(tmp_path):
    from data2vec_aqc_hf.finetuning import CTCDataset, build_vocab, load_ctc_model, make_processor, normalize_text
    from data2vec_aqc_hf.finetuning import read_manifest
    from conftest import DEMO

    rows = [r for r in read_manifest(DEMO / "metadata.csv") if r["speaker_id"] == "fsdd_lucas"][:24]
    processor = make_processor(build_vocab([normalize_text(r["text"]) for r in rows]), tmp_path / "proc")
    torch.manual_seed(0)  # the same random init in every run
    model = load_ctc_model(None, processor, mask_time_prob=0.0, layerdrop=0.0, model_preset="tiny")
    return model, processor, CTCDataset(rows, processor)


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    values = dict(output_dir=str(tmp_path / "ft"), per_device_train_batch_size=4, learning_rate=1e-3,
                  report_to="none", use_cpu=True, save_steps=2, logging_steps=1, seed=0, disable_tqdm=True)
    return TrainingArguments(**{**values, **kw})


def test_finetuning_resumes_from_latest_at_its_step(tmp_path):
    """Interrupted after 4 of 6 updates (checkpoint-4 is the newest), `--resume_from_checkpoint latest` continues
    at update 5 and ends at the same weights as an uninterrupted 6-update run."""
    from data2vec_aqc_hf.finetuning import train_ctc

    model, processor, data = _tiny_ctc_setup(tmp_path / "a")
    full = train_ctc(model, processor, data, None, _args(tmp_path / "a", max_steps=6), print_logs=False)
    model, processor, data = _tiny_ctc_setup(tmp_path / "b")
    train_ctc(model, processor, data, None, _args(tmp_path / "b", max_steps=6, save_steps=4), print_logs=False,
              callbacks=[_StopAt(4)])
    assert (tmp_path / "b/ft/checkpoint-4").is_dir() and not (tmp_path / "b/ft/checkpoint-6").exists()
    model, processor, data = _tiny_ctc_setup(tmp_path / "b")
    counter = _StopAt(10 ** 9)
    resumed = train_ctc(model, processor, data, None,
                        _args(tmp_path / "b", max_steps=6, save_steps=4, resume_from_checkpoint="latest"),
                        print_logs=False, callbacks=[counter])
    # only updates 5 and 6 ran (retraining from 0 would run 6); log_history came back from checkpoint-4
    assert counter.steps_seen == [5, 6] and resumed.state.global_step == 6, counter.steps_seen
    steps_logged = [h["step"] for h in resumed.state.log_history if "loss" in h]
    assert steps_logged == [1, 2, 3, 4, 5, 6], steps_logged
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


class _StopAt:
    """A callback that ends training after `step` updates (an interruption)."""

    def __init__(self, step):
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                outer.steps_seen.append(state.global_step)
                if state.global_step >= outer.step:
                    control.should_training_stop = True
                    control.should_save = True

        self.step, self.callback, self.steps_seen = step, _Callback(), []

    def __getattr__(self, name):
        return getattr(self.callback, name)


def test_finetuning_stops_on_nonfinite_weights_before_saving_them(tmp_path):
    from data2vec_aqc_hf.finetuning import train_ctc

    model, processor, data = _tiny_ctc_setup(tmp_path)
    with pytest.raises(FloatingPointError, match=r"fine-tuning step \d+: the update made weights NaN/inf"):
        train_ctc(model, processor, data, None, _args(tmp_path, max_steps=20, learning_rate=1e9, max_grad_norm=0.0,
                                                        save_steps=1), print_logs=False)
    from safetensors.torch import load_file

    for checkpoint in (tmp_path / "ft").glob("checkpoint-*"):
        weights = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values()), checkpoint


def test_latest_skips_broken_newer_checkpoints_and_an_explicit_broken_one_is_named(tmp_path, caplog):
    """A truncated model.safetensors, a truncated RNG file and an empty newest folder: `latest` falls back to the
    newest complete and readable checkpoint, warning about each skipped one; naming a broken one is an error
    naming the file."""
    from data2vec_aqc_hf.pretraining import resolve_checkpoint

    out = tmp_path / "run"
    _launch(COMMON + ["--output_dir", str(out), "--max_steps", "3", "--save_steps", "1"])
    root = out / "checkpoints"
    weights = root / "checkpoint-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    rng = root / "checkpoint-2" / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:50])
    (root / "checkpoint-4").mkdir()
    with caplog.at_level("WARNING"):
        assert resolve_checkpoint(out, "latest") == root / "checkpoint-1"
    for broken in ("checkpoint-4/model.safetensors: missing", "checkpoint-3/model.safetensors: unreadable",
                   "checkpoint-2/random_states_0.pkl: refusing to resume"):
        assert broken in caplog.text, (broken, caplog.text)
    with pytest.raises(RuntimeError, match=r"checkpoint-3/model\.safetensors: unreadable"):
        resolve_checkpoint(out, str(root / "checkpoint-3"))


@pytest.mark.parametrize("flag", ["--save_steps", "--logging_steps", "--gradient_accumulation_steps"])
def test_zero_step_arguments_are_rejected_up_front(flag):
    from data2vec_aqc_hf.pretraining import PretrainingArguments

    with pytest.raises(ValueError, match=f"{flag} must be >= 1, got 0"):
        PretrainingArguments(train_data="x.csv", **{flag[2:]: 0})


def test_manifest_with_a_byte_order_mark_reads(tmp_path):
    from conftest import DEMO

    from data2vec_aqc_hf.finetuning import read_manifest

    text = (DEMO / "metadata.csv").read_text(encoding="utf-8")
    (tmp_path / "metadata.csv").write_text("\ufeff" + text, encoding="utf-8")  # as Excel saves CSV
    for line in text.splitlines()[1:3]:
        name = line.split(",")[0]
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((DEMO / name).read_bytes())
    rows = read_manifest(tmp_path / "metadata.csv")
    assert len(rows) == len(text.splitlines()) - 1 and rows[0]["text"]


def test_ctc_model_casts_int16_and_float64_input():
    from conftest import tiny_config

    from data2vec_aqc_hf import Data2VecAQCForCTC

    model = Data2VecAQCForCTC(tiny_config(vocab_size=9)).eval()
    x = torch.randn(1, 8000)
    with torch.no_grad():
        reference = model(x).logits
        assert torch.equal(model(x.double()).logits, reference)
        pcm = (x * 1000).to(torch.int16)
        assert torch.equal(model(pcm).logits, model(pcm.float()).logits)


def test_short_clips_are_skipped_with_the_reason_derived_from_the_model(tmp_path, caplog):
    """Pretraining's minimum follows from the mask span (samples_for_frames inverts the CNN's length formula);
    fine-tuning skips a clip that has fewer frames than CTC needs for its transcript, naming it."""
    import numpy as np
    import soundfile as sf
    from transformers import Data2VecAudioModel

    from data2vec_aqc_hf import Data2VecAQCConfig
    from data2vec_aqc_hf.finetuning import CTCDataset, build_vocab, ctc_min_frames, make_processor
    from data2vec_aqc_hf.modeling_data2vec_aqc import minimum_pretraining_samples, samples_for_frames

    config = Data2VecAQCConfig.from_preset("small")
    backbone = Data2VecAudioModel(Data2VecAQCConfig.from_preset("tiny"))
    for frames in (1, 6, 49):
        n = samples_for_frames(config, frames)
        assert int(backbone._get_feat_extract_output_lengths(n)) == frames
        assert int(backbone._get_feat_extract_output_lengths(n - 1)) == frames - 1
    assert minimum_pretraining_samples(config) == samples_for_frames(config, config.mask_time_length + 1)
    assert ctc_min_frames([1, 2, 2, 3]) == 5

    wave = np.sin(np.arange(16000) / 7.0).astype(np.float32) * 0.3
    sf.write(tmp_path / "long.wav", wave, 16000)
    sf.write(tmp_path / "short.wav", wave[:1600], 16000)  # 0.1 s = 4 frames
    processor = make_processor(build_vocab(["SEVEN HUNDRED"]), tmp_path / "p")
    rows = [{"audio": str(tmp_path / "long.wav"), "text": "SEVEN HUNDRED"},
            {"audio": str(tmp_path / "short.wav"), "text": "SEVEN HUNDRED"}]
    data = CTCDataset(rows, processor)
    assert [e["name"] for e in data.examples] == [str(tmp_path / "long.wav")]
    assert "short.wav: 0.10 s gives 4 frames, too few for its 13 labels (CTC needs 13)" in caplog.text


def test_resume_is_exact_with_dropout_and_layerdrop_on(tmp_path):
    """Dropout and layerdrop draw from the global RNG; the DataLoader must not (it has its own generator), so a run
    stopped at update 3 and resumed ends with the same weights as an uninterrupted one."""
    from safetensors.torch import load_file

    noisy = COMMON + ["--config_overrides", '{"hidden_dropout": 0.1, "attention_dropout": 0.1, "layerdrop": 0.1}',
                      "--max_steps", "6", "--save_steps", "3"]
    _launch(noisy + ["--output_dir", str(tmp_path / "full")])
    _launch(noisy + ["--output_dir", str(tmp_path / "split"), "--stop_after_steps", "3"])
    _launch(noisy + ["--output_dir", str(tmp_path / "split"), "--resume_from_checkpoint", "latest"])
    a, b = load_file(tmp_path / "full/model.safetensors"), load_file(tmp_path / "split/model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6


def test_empty_evaluation_set_is_an_error_not_a_nan_wer(tmp_path):
    from conftest import DEMO
    from transformers import TrainingArguments

    from data2vec_aqc_hf.finetuning import FinetuneArguments, run_finetuning

    rows = (DEMO / "metadata.csv").read_text().splitlines()
    header, lucas = rows[0], [r for r in rows[1:] if "fsdd_lucas" in r][:8]
    manifest = tmp_path / "metadata.csv"
    manifest.write_text("\n".join([header, *lucas, lucas[0].split(",")[0] + ",,fsdd_jackson"]) + "\n")
    for row in lucas:
        (tmp_path / row.split(",")[0]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / row.split(",")[0]).write_bytes((DEMO / row.split(",")[0]).read_bytes())
    args = FinetuneArguments(model_preset="tiny", train_manifest=str(manifest), eval_speakers="fsdd_jackson")
    targs = TrainingArguments(output_dir=str(tmp_path / "ft"), max_steps=1, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=r"no usable evaluation examples \(1 rows, 1 skipped\)"):
        run_finetuning(args, targs)
