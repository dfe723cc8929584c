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
