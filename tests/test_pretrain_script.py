"""End-to-end: training/pretrain.py under accelerate on real speech (vendored LibriSpeech clips)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
from conftest import DEMO, ROOT, run_without_package
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

COMMON = ["--model_preset", "tiny", "--train_data", str(DEMO / "unlabeled.csv"), "--min_duration_in_seconds", "2",
          "--max_duration_in_seconds", "3", "--max_batch_duration_in_seconds", "12", "--learning_rate", "2e-3",
          "--logging_steps", "1", "--save_total_limit", "5", "--report_to", "tensorboard"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _launch(args, two_ranks=False):
    if two_ranks:  # `--cpu --num_processes 2` silently runs one process; this gives two gloo ranks
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        env = dict(_env(), ACCELERATE_USE_CPU="1")
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        env = _env()
    result = subprocess.run(cmd + [str(ROOT / "training/pretrain.py")] + args, capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("SUMMARY ")][-1]
    return json.loads(line[len("SUMMARY "):]), result


def test_two_ranks_pretrain_falling_loss_checkpoint_and_exact_resume(tmp_path):
    full, res = _launch(COMMON + ["--output_dir", str(tmp_path / "full"), "--max_steps", "8", "--save_steps", "4"],
                        two_ranks=True)
    assert full["world_size"] == 2, "two real ranks expected"
    assert full["steps"] == 8
    assert (tmp_path / "full/checkpoints/checkpoint-8").is_dir()
    assert (tmp_path / "full/model.safetensors").exists() and (tmp_path / "full/preprocessor_config.json").exists()
    assert (tmp_path / "full/loss.png").exists() and (tmp_path / "full/README.md").exists()
    assert list((tmp_path / "full/runs").rglob("events.out.tfevents*")), "no tensorboard events"
    history = full["final"]
    assert all(math.isfinite(v) for v in history.values())
    # the loss falls: rank 0's loss per step (the progress bar's postfix) went 11.5, 10.6, 9.4, 8.6, 8.0, 7.9, 7.1,
    # 6.9 when measured (fixed seeds); the bounds leave room for numerical differences, not for a flat loss
    losses = [float(x) for x in re.findall(r"loss=([0-9.]+)", res.stderr)]
    assert losses and abs(losses[-1] - history["loss"]) < 1e-3, (losses, history["loss"])
    assert history["loss"] < 0.75 * losses[0], (losses, history["loss"])
    assert max(losses[len(losses) // 2 :]) < 0.85 * losses[0], losses

    # stop at step 4, then resume from 'latest' to step 8: same parameters as the uninterrupted run
    _launch(COMMON + ["--output_dir", str(tmp_path / "split"), "--max_steps", "8", "--save_steps", "4",
                      "--stop_after_steps", "4"], two_ranks=True)
    assert not (tmp_path / "split/model.safetensors").exists()
    resumed, res = _launch(COMMON + ["--output_dir", str(tmp_path / "split"), "--max_steps", "8", "--save_steps", "4",
                                     "--resume_from_checkpoint", "latest"], two_ranks=True)
    assert "resumed from" in res.stdout
    a, b = load_file(tmp_path / "full/model.safetensors"), load_file(tmp_path / "split/model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key

    from transformers import AutoModelForPreTraining

    from data2vec_aqc_hf import Data2VecAQCForPreTraining

    model = AutoModelForPreTraining.from_pretrained(tmp_path / "full")
    assert isinstance(model, Data2VecAQCForPreTraining) and model.num_updates.item() == 8


def test_resume_mid_epoch_with_workers_reads_nothing_twice_and_is_exact(tmp_path):
    """Two ranks x two dataloader workers, stopped at an odd step in the middle of an epoch: the resumed run starts
    each worker at its saved position (rotated round-robin) and ends with the same parameters as one run."""
    data = ["--train_data", str(DEMO / "metadata.csv"), "--min_duration_in_seconds", "0.3",
            "--max_duration_in_seconds", "0.75", "--max_batch_duration_in_seconds", "2.5",
            "--dataloader_num_workers", "2", "--max_steps", "8", "--save_steps", "100", "--report_to", "none"]
    _launch(COMMON + data + ["--output_dir", str(tmp_path / "full")], two_ranks=True)
    _launch(COMMON + data + ["--output_dir", str(tmp_path / "split"), "--stop_after_steps", "5"], two_ranks=True)
    resumed, res = _launch(COMMON + data + ["--output_dir", str(tmp_path / "split"),
                                            "--resume_from_checkpoint", "latest"], two_ranks=True)
    assert "continuing epoch 0 at batch 5 from data positions" in res.stdout and "nothing re-read" in res.stdout
    a, b = load_file(tmp_path / "full/model.safetensors"), load_file(tmp_path / "split/model.safetensors")
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key


def test_epochs_stop_criterion_two_ranks_with_accumulation_in_bf16(tmp_path):
    """--num_train_epochs 2: both ranks stop together (no hang) at the first update where every rank has seen its
    whole shard twice; the count is checked against batches actually yielded by each rank's stream."""
    import math

    import torch

    from data2vec_aqc_hf.data import DataStats, PretrainingStream, iterate_batches, local_items

    items = local_items(DEMO / "unlabeled.csv")
    batches = []
    for rank in range(2):
        stream = PretrainingStream(items, min_samples=56000, max_samples=64000, max_batch_samples=64000, seed=0,
                                   rank=rank, world_size=2)  # one utterance per batch; the 3.07 s clip is skipped
        total = 0
        for epoch in range(2):
            stream.set_epoch(epoch)
            total += sum(1 for _ in iterate_batches(torch.utils.data.DataLoader(stream, batch_size=None), DataStats()))
        batches.append(total)
    assert sum(batches) == 2 * (len(items) - 1)
    expected = math.ceil(max(batches) / 2)
    summary, res = _launch(COMMON + ["--output_dir", str(tmp_path), "--num_train_epochs", "2", "--save_steps", "100",
                                     "--gradient_accumulation_steps", "2", "--min_duration_in_seconds", "3.5",
                                     "--max_duration_in_seconds", "4", "--max_batch_duration_in_seconds", "4",
                                     "--mixed_precision", "bf16"],  # and bf16 autocast under DDP
                            two_ranks=True)
    assert summary["world_size"] == 2 and summary["epochs_completed"] == 2
    assert all(math.isfinite(v) for v in summary["final"].values())
    assert summary["steps"] == expected, (summary["steps"], batches)
    print("batches per rank", batches, "updates", expected)
    assert f"2 epoch(s) of {DEMO / 'unlabeled.csv'}: {expected} updates" in res.stdout
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / f"checkpoints/checkpoint-{expected}").is_dir()


def test_loss_falls_over_a_short_run(tmp_path):
    summary, res = _launch(COMMON + ["--output_dir", str(tmp_path), "--max_steps", "30", "--save_steps", "30",
                                     "--logging_steps", "1", "--dataloader_num_workers", "2"])
    # several epochs through two worker processes: their counts reach the trainer (8 clips per epoch)
    assert summary["epochs_completed"] >= 2 and summary["data"]["loaded"] >= 8 * summary["epochs_completed"]
    import re

    losses = [float(x) for x in re.findall(r"loss=([0-9.]+)", res.stderr)]
    assert losses and summary["final"]["loss"] < 0.7 * losses[0], (losses[:3], summary["final"]["loss"])


def test_push_to_hub_with_only_the_network_replaced(tmp_path, monkeypatch):
    """The real push path (card, create_repo, upload_folder) with HfApi's two network calls replaced."""
    import huggingface_hub

    from data2vec_aqc_hf.pretraining import PretrainingArguments, run_pretraining

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw["repo_id"], kw.get("path_in_repo"),
                                                         sorted(os.listdir(kw["folder_path"])))))
    args = PretrainingArguments(output_dir=str(tmp_path), model_preset="tiny", train_data=str(DEMO / "unlabeled.csv"),
                                max_duration_in_seconds=3, max_batch_duration_in_seconds=12, max_steps=2,
                                save_steps=2, push_to_hub=True, hub_model_id="me/aqc-tiny", push_checkpoints=True,
                                report_to="none")
    run_pretraining(args)
    assert ("create", "me/aqc-tiny") in calls
    uploads = [c for c in calls if c[0] == "upload"]
    assert uploads[0][2] == "checkpoints/checkpoint-2"
    final = uploads[-1]
    assert final[2] is None and {"README.md", "config.json", "model.safetensors"} <= set(final[3])
    card = (tmp_path / "README.md").read_text()
    assert "me/aqc-tiny" in card and "| optimizer updates | 2 |" in card
    assert "datasets:" not in card.split("---")[1]  # local data: no made-up dataset id in the metadata
    assert "preset `tiny`, from a random initialisation" in card
    # the card's usage block runs as written in plain transformers (no data2vec_aqc_hf), with the Hub (the network)
    # replaced by the folder that was uploaded
    (block,) = re.findall(r"```python\n(.*?)```", card, re.S)
    code = block.replace("me/aqc-tiny", str(tmp_path)) + "\nprint(model.config.vocab_size, type(model).__name__)\n"
    printed = run_without_package(code, tmp_path).split("\n")
    assert printed[0].startswith("(1, ") and printed[1] == "32 Data2VecAQCForCTC", printed
    # a pushed checkpoint folder is a model folder too (config + auto_map + code + feature extractor beside
    # accelerate's weights): plain transformers loads it with remote code, with the weights of that update
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    assert {"config.json", "preprocessor_config.json", "modeling_data2vec_aqc.py"} <= set(uploads[0][3])
    code = (f"import torch\nfrom transformers import AutoModelForPreTraining\n"
            f"m = AutoModelForPreTraining.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)\n"
            f"print(type(m).__name__, float(sum(p.double().sum() for p in m.state_dict().values())))\n")
    name, total = run_without_package(code, tmp_path).strip().splitlines()[-1].split()
    from safetensors.torch import load_file

    weights = load_file(checkpoint / "model.safetensors")
    assert name == "Data2VecAQCForPreTraining"
    assert float(total) == pytest.approx(float(sum(t.double().sum() for t in weights.values())), rel=1e-9)


def test_pretraining_names_skipped_clips_once_and_sums_each_epoch(tmp_path, caplog):
    """A pretraining run with dataloader workers (recreated every epoch) over a folder with short clips: the first
    five skipped files are named once for the whole run, then one line per epoch gives that epoch's counts."""
    import logging
    import shutil

    import numpy as np
    import soundfile as sf
    from conftest import demo_unlabeled_paths

    from data2vec_aqc_hf.pretraining import PretrainingArguments, run_pretraining

    data = tmp_path / "data"
    data.mkdir()
    for i, path in enumerate(demo_unlabeled_paths()[:3]):
        shutil.copy(path, data / f"good{i}.flac")
    for i in range(7):
        sf.write(data / f"short{i}.wav", np.random.default_rng(i).standard_normal(800).astype(np.float32), 16000)
    args = PretrainingArguments(output_dir=str(tmp_path / "out"), model_preset="tiny", train_data=str(data),
                                num_train_epochs=3, dataloader_num_workers=2, max_duration_in_seconds=2,
                                max_batch_duration_in_seconds=4, report_to="none")
    with caplog.at_level(logging.WARNING, logger="data2vec_aqc_hf"):
        summary = run_pretraining(args)
    lines = [r.getMessage() for r in caplog.records]
    named = [line for line in lines if line.startswith("skipping") and "short" in line]
    assert len(named) == 5 and len(set(named)) == 5, lines
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert epochs == [f"epoch {e}: 7 clip(s) skipped (7 distinct file(s)), 3 loaded" for e in range(3)], lines
    assert summary["data"]["skipped"] == 21 and summary["epochs_completed"] == 3
