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
    # pretraining's default minimum is the model's own; a lower given one is raised to it, with a note
    from data2vec_aqc_hf.pretraining import PretrainingArguments, minimum_clip_samples

    assert PretrainingArguments(train_data=str(tmp_path)).min_duration_in_seconds is None
    assert minimum_clip_samples(None, config) == (minimum_pretraining_samples(config), None)
    assert minimum_clip_samples(2.0, config) == (32000, None)
    raised, note = minimum_clip_samples(0.01, config)
    assert raised == minimum_pretraining_samples(config) and "raised from 0.010 s" in note
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


# ----- stop requests (issue 9, item 3) ------------------------------------------------------------------------------
STOP_RUN = COMMON + ["--max_steps", "8", "--save_steps", "100", "--report_to", "none", "--dataloader_num_workers", "2"]


class _Started:
    """A pretraining process whose stderr is collected by a thread (tqdm writes it without newlines)."""

    def __init__(self, cmd, **popen):
        import threading

        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT,
                                     **popen)
        self.err, self.out = bytearray(), bytearray()
        self.readers = [threading.Thread(target=self._read, args=(pipe, buf), daemon=True)
                        for pipe, buf in ((self.proc.stderr, self.err), (self.proc.stdout, self.out))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(pipe, buf):
        import os

        while chunk := os.read(pipe.fileno(), 65536):
            buf.extend(chunk)

    def wait_for(self, text: bytes, timeout=120):
        import time

        deadline = time.time() + timeout
        while text not in self.err and time.time() < deadline:
            assert self.proc.poll() is None, self.text()
            time.sleep(0.05)
        assert text in self.err, self.text()

    def finish(self, timeout=120):
        """Wait until every process writing to the pipes (the training process too) has closed them."""
        for reader in self.readers:
            reader.join(timeout)
            assert not reader.is_alive(), f"still writing after {timeout} s: {self.text()}"
        return self.proc.wait(timeout)

    def text(self):
        return self.out.decode(errors="replace") + self.err.decode(errors="replace").replace("\r", "\n")[-4000:]


def _pretrain_cmd(args):
    return [sys.executable, str(ROOT / "training/pretrain.py")] + args


@pytest.fixture(scope="module")
def uninterrupted_weights(tmp_path_factory):
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("uninterrupted")
    result = subprocess.run(_pretrain_cmd(STOP_RUN + ["--output_dir", str(out)]), capture_output=True, text=True,
                            env=_env(), cwd=ROOT, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out / "model.safetensors")


def _stopped_checkpoint(out):
    from data2vec_aqc_hf.pretraining import checkpoint_problem, list_checkpoints

    checkpoints = list_checkpoints(out)
    assert len(checkpoints) == 1 and checkpoint_problem(checkpoints[0]) is None, checkpoints
    assert not (out / "model.safetensors").exists() and not (out / "pretraining.lock").exists()
    return int(checkpoints[0].name.split("-")[1])


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_after_the_update_with_a_checkpoint_and_the_resume_is_exact(tmp_path, uninterrupted_weights,
                                                                                    signame):
    """SIGTERM to the training process (a pre-empted job), SIGINT to its whole process group (Ctrl-C: the dataloader
    workers get it too): the run finishes its update, writes a normal checkpoint, exits with 128 + the signal's
    number; `--resume_from_checkpoint latest` then ends at the weights of an uninterrupted run."""
    import os
    import signal

    from safetensors.torch import load_file

    sig = getattr(signal, signame)
    out = tmp_path / "run"
    run = _Started(_pretrain_cmd(STOP_RUN + ["--output_dir", str(out)]), start_new_session=True)
    run.wait_for(b"loss=")  # the first update is done
    if sig == signal.SIGINT:
        os.killpg(run.proc.pid, sig)
    else:
        run.proc.send_signal(sig)
    assert run.finish() == 128 + sig, run.text()
    assert f"stopped by {signame} after update" in run.text() and "Traceback" not in run.text(), run.text()
    step = _stopped_checkpoint(out)
    assert 1 <= step < 8, step
    summary = __import__("json").loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == signame and summary["steps"] == step
    result = subprocess.run(_pretrain_cmd(STOP_RUN + ["--output_dir", str(out), "--resume_from_checkpoint", "latest"]),
                            capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600, check=False)
    assert result.returncode == 0 and f"at step {step}" in result.stdout, result.stderr[-3000:]
    resumed = load_file(out / "model.safetensors")
    assert resumed.keys() == uninterrupted_weights.keys()
    difference = max((resumed[k].float() - uninterrupted_weights[k].float()).abs().max().item() for k in resumed)
    print(f"{signame}: stopped after update {step} of 8; resumed: max |difference| {difference:.2g}")
    assert difference <= 1e-6


def _children(pid):
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _exited(pid, timeout):
    """Whether `pid` is gone (or a zombie: exited, not yet reaped by its new parent) within `timeout` seconds."""
    import time
    from pathlib import Path

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc are Linux's")
def test_a_signal_to_the_accelerate_launcher_alone_leaves_no_training_process_running(tmp_path):
    """`accelerate launch` (one process) does not forward signals: SIGTERM to the launcher alone killed the launcher
    and left the training process running on, orphaned. Now the training process gets SIGTERM when its launcher
    dies (prctl PR_SET_PDEATHSIG), checkpoints after its update and exits."""
    import signal
    from pathlib import Path

    out = tmp_path / "run"
    args = STOP_RUN + ["--output_dir", str(out), "--max_steps", "60"]
    run = _Started([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    str(ROOT / "training/pretrain.py")] + args)
    run.wait_for(b"loss=")
    (child,) = [pid for pid in _children(run.proc.pid) if b"pretrain.py" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    run.proc.send_signal(signal.SIGTERM)
    run.proc.wait(60)
    run.finish(timeout=120)  # the training process closed its end of the pipes
    assert _exited(child, timeout=60), "the training process is still running: " + run.text()
    # accelerate < 1.16 forwards nothing: the launcher's death reaches the training process as its parent-death
    # signal; 1.16 forwards SIGTERM itself (and SIGKILLs it 5 s later: docs/RELIABILITY.md). Either way it stops
    # cleanly after its update, with a complete checkpoint.
    assert (f"the launcher, pid {run.proc.pid}, exited" in run.text()
            or "received SIGTERM: finishing the current update" in run.text()), run.text()
    assert "stopped by SIGTERM" in run.text(), run.text()
    assert _stopped_checkpoint(out) < 60


# ----- data checks over all ranks (issue 9, item 5) -----------------------------------------------------------------
def _two_rank_run(args):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "training/pretrain.py")] + args
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(_env(), ACCELERATE_USE_CPU="1"), cwd=ROOT,
                          timeout=300, check=False)


def _clips_and_broken_files(directory, clips, broken):
    import shutil

    from conftest import demo_unlabeled_paths

    directory.mkdir()
    for path in demo_unlabeled_paths()[:clips]:
        shutil.copy(path, directory / path.name)
    for i in range(broken):
        (directory / f"broken{i}.wav").write_bytes(b"not audio")
    return directory


def test_two_ranks_report_the_data_counts_of_both_ranks(tmp_path):
    """4 clips and 2 broken files, each rank reads its share (3 files, one broken) once: the summary counts both
    shares (it counted rank 0's: 2 loaded, 1 skipped)."""
    from data2vec_aqc_hf.data import PretrainingStream, local_items

    data = _clips_and_broken_files(tmp_path / "data", 4, 2)
    items = local_items(data)
    broken = {i for i, item in enumerate(items) if "broken" in item["audio"]}

    def shares(seed):
        stream = PretrainingStream(items, 1, 48000, 48000, seed=seed, world_size=2)
        return [set(stream._local_order(0, 1, 0, rank)) for rank in range(2)]

    seed = next(s for s in range(100) if all(len(share & broken) == 1 for share in shares(s)))  # equal shares
    result = _two_rank_run(COMMON + ["--train_data", str(data), "--output_dir", str(tmp_path / "out"), "--seed",
                                     str(seed), "--num_train_epochs", "1", "--max_batch_duration_in_seconds", "3",
                                     "--save_steps", "100", "--report_to", "none"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = __import__("json").loads([line for line in result.stdout.splitlines()
                                        if line.startswith("SUMMARY ")][-1][len("SUMMARY "):])
    assert summary["world_size"] == 2 and summary["steps"] == 2, summary
    assert summary["data"] == {"loaded": 4, "cropped": 4, "skipped": 2}, summary["data"]


def test_two_ranks_with_fewer_usable_files_than_processes_stop_together_with_a_clear_error(tmp_path):
    """One clip and one broken file for two processes: one rank's share has no usable audio. Every rank stops at
    once with the counts of both (the rank with the broken file used to raise 'no usable audio' alone, while
    the other waited for it in DDP)."""
    data = _clips_and_broken_files(tmp_path / "data", 1, 1)
    result = _two_rank_run(COMMON + ["--train_data", str(data), "--output_dir", str(tmp_path / "out"),
                                     "--max_steps", "4", "--report_to", "none"])
    assert result.returncode != 0
    message = "found no usable audio in their share of the data (all processes so far: 1 file(s) loaded, 1 skipped"
    for rank in (0, 1):  # raised on both ranks
        assert any(line.startswith(f"[rank{rank}]:") and message in line for line in result.stderr.splitlines()), \
            result.stderr[-4000:]
    assert "broken0.wav: cannot decode audio" in result.stderr and "fewer usable files than processes" in result.stderr


# ----- one run per output directory, disk full, all-zero audio (issue 9, item 9) -----------------------------------
@pytest.fixture
def one_thread():
    """In-process runs on one thread, as the subprocess runs (OMP_NUM_THREADS=1): two threads on two shared cores
    were several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_args(out, **kw):
    from conftest import DEMO

    from data2vec_aqc_hf.pretraining import PretrainingArguments

    values = {"output_dir": str(out), "model_preset": "tiny", "train_data": str(DEMO / "unlabeled.csv"),
              "max_duration_in_seconds": 3, "max_batch_duration_in_seconds": 12, "max_steps": 2, "save_steps": 1,
              "report_to": "none"}
    return PretrainingArguments(**{**values, **kw})


def test_a_second_run_into_a_used_output_dir_is_refused_and_a_stale_lock_is_taken_over(tmp_path, caplog,
                                                                                         one_thread):
    """Run A holds output_dir's lock: run B into the same directory stops before training, naming A's pid and
    --overwrite_output_dir; a lock left by a dead process is taken over with a warning; the lock goes at the end."""
    import json
    import signal
    import socket

    from data2vec_aqc_hf.pretraining import run_pretraining
    from data2vec_aqc_hf.run_control import OutputDirLock, OutputDirLockedError

    out = tmp_path / "run"
    first = _Started(_pretrain_cmd(STOP_RUN + ["--output_dir", str(out), "--max_steps", "200"]))
    try:
        first.wait_for(b"loss=")
        with pytest.raises(OutputDirLockedError, match=rf"another pretraining run \(pid {first.proc.pid} on .*"
                                                       rf"--overwrite_output_dir"):
            run_pretraining(_tiny_args(out))
        assert first.proc.poll() is None  # the first run goes on
        with caplog.at_level("WARNING"):  # a live holder is taken over only with --overwrite_output_dir
            taken = OutputDirLock(out, overwrite=True)
            taken.acquire()
        assert f"--overwrite_output_dir: taking over {out / 'pretraining.lock'} from pid {first.proc.pid}" in caplog.text
        taken.release()
    finally:
        first.proc.send_signal(signal.SIGTERM)
        first.finish()
    assert not (out / "pretraining.lock").exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "pretraining.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with caplog.at_level("WARNING"):
        summary = run_pretraining(_tiny_args(out, resume_from_checkpoint="latest", max_steps=_newest_step(out) + 1))
    assert f"taking over the stale lock {out / 'pretraining.lock'} of pid {dead.pid}" in caplog.text
    assert summary["steps"] == _newest_step(out) and not (out / "pretraining.lock").exists()


def _newest_step(out):
    from data2vec_aqc_hf.pretraining import list_checkpoints

    return int(list_checkpoints(out)[-1].name.split("-")[1])


@pytest.mark.parametrize("error", ["ENOSPC", "basic_ios"])
def test_disk_full_while_checkpointing_names_the_path_and_space_and_keeps_the_older_checkpoint(tmp_path, monkeypatch,
                                                                                                one_thread, error):
    """The second checkpoint's write fails as on a full disk (an OSError ENOSPC, or torch's RuntimeError
    'basic_ios::clear'), after writing part of a file: the error names the checkpoint, the free space and the size
    needed; the first checkpoint is complete and kept (save_total_limit 1 does not rotate it out), the partial
    folder is removed."""
    import errno
    from pathlib import Path

    import accelerate

    from data2vec_aqc_hf.pretraining import checkpoint_problem, run_pretraining
    from data2vec_aqc_hf.run_control import CheckpointWriteError

    real, calls = accelerate.Accelerator.save_state, []

    def full_disk(self, output_dir=None, **kw):
        calls.append(output_dir)
        if len(calls) < 2:
            return real(self, output_dir, **kw)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        if error == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0 basic_ios::clear")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full_disk)
    out = tmp_path / "run"
    with pytest.raises(CheckpointWriteError) as raised:
        run_pretraining(_tiny_args(out, max_steps=3, save_total_limit=1))
    message = str(raised.value)
    root = out / "checkpoints"
    assert f"writing checkpoint {root / 'checkpoint-2'} failed" in message, message
    assert ("No space left on device" if error == "ENOSPC" else "basic_ios::clear") in message
    assert f"free on the file system of {root}, checkpoint needs about" in message and " MB" in message, message
    assert f"Kept, complete: {root / 'checkpoint-1'}" in message, message
    assert checkpoint_problem(root / "checkpoint-1") is None
    assert not (root / ".tmp-checkpoint-2").exists() and not (root / "checkpoint-2").exists()
    assert not (out / "pretraining.lock").exists()


def test_constant_files_and_silent_crops_are_skipped_and_counted_not_trained_on(tmp_path, caplog):
    """A file holding a constant offset and random crops that fall on digital silence normalise to an all-zero
    input (trained on silently before): skipped with a warning naming the file, counted; every batch has signal."""
    import numpy as np
    import soundfile as sf

    from data2vec_aqc_hf.audio import AudioError, load_audio
    from data2vec_aqc_hf.data import DataStats, PretrainingStream, SkipReport, iterate_batches, local_items

    sf.write(tmp_path / "offset.wav", np.full(32000, 0.25, dtype=np.float32), 16000)
    tail = np.zeros(16000 * 8, dtype=np.float32)
    tail[:16000] = 0.3 * np.sin(np.arange(16000) / 5.0)
    sf.write(tmp_path / "speech_then_silence.wav", tail, 16000)
    with pytest.raises(AudioError, match=r"offset\.wav: the audio is silent \(every sample is 0\.25: a constant"):
        load_audio(tmp_path / "offset.wav")
    stream = PretrainingStream(local_items(tmp_path), min_samples=8000, max_samples=16000, max_batch_samples=16000)
    stats, batches = DataStats(), []
    report = SkipReport(max_listed=100)  # names skipped files, as pretraining's main process does
    with caplog.at_level("WARNING"):
        for epoch in range(6):
            stream.set_epoch(epoch)
            batches += list(iterate_batches(stream, stats, report))
    silent_crops = [r for n, r in stats.skipped if "random crop of it is silent" in r]
    assert silent_crops and stats.loaded == len(batches) and len(stats.skipped) == 6 + len(silent_crops)
    assert all(float(b["input_values"].std()) > 0.5 for b in batches)
    assert "offset.wav: the audio is silent" in caplog.text and "random crop of it is silent" in caplog.text
