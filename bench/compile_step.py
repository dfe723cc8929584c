"""Eager vs `torch.compile(fullgraph=True)` pretraining updates, from the same weights, batch and seed.

    python bench/compile_step.py --objective aqc --threads 1 --steps 10

Two copies of one model train side by side on the same real speech batch, one update of each in turn (forward +
backward + AdamW + EMA teacher update); the step's draws come from `sample_step_randomness` with a generator of the
same seed in both. Prints one JSON line: every update's loss in both, their largest relative difference, ms per
update (median and min after the first, compiling, update) and the first compiled update's time.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from step_time import speech_batch

from data2vec_aqc_hf import Data2VecAQCConfig, Data2VecAQCForPreTraining


def trainer(model: Data2VecAQCForPreTraining, x, mask, seed: int, compiled: bool):
    """One update per call; returns its loss."""
    optimizer = torch.optim.AdamW(model.student_parameters(), lr=5e-4)
    forward = torch.compile(model, fullgraph=True) if compiled else model
    generator = torch.Generator(device=x.device).manual_seed(seed)

    def update() -> float:
        randomness = model.sample_step_randomness(x, mask, generator)
        out = forward(x, mask, randomness=randomness)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_teacher()
        return float(out.loss.detach())

    return update


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"])
    parser.add_argument("--objective", default="aqc", choices=["aqc", "data2vec"])
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=10, help="timed updates of each, after the first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, mask = speech_batch(args.batch_size, args.seconds, device)
    torch.manual_seed(args.seed)
    config = Data2VecAQCConfig.from_preset(args.preset, objective=args.objective)
    model = Data2VecAQCForPreTraining(config).to(device).train()
    eager = trainer(copy.deepcopy(model), x, mask, args.seed + 1, compiled=False)
    compiled = trainer(model, x, mask, args.seed + 1, compiled=True)
    start = time.perf_counter()
    losses = {"compiled": [compiled()], "eager": [eager()]}
    first_compiled = time.perf_counter() - start
    times = {"eager": [], "compiled": []}
    for _ in range(args.steps):
        for name, update in (("eager", eager), ("compiled", compiled)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            losses[name].append(update())
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(1000 * (time.perf_counter() - start))
    print(json.dumps({
        "preset": args.preset, "objective": args.objective, "threads": args.threads, "device": str(device),
        "first_compiled_update_s": round(first_compiled, 1),
        "eager_ms_median": round(statistics.median(times["eager"])), "eager_ms_min": round(min(times["eager"])),
        "compiled_ms_median": round(statistics.median(times["compiled"])),
        "compiled_ms_min": round(min(times["compiled"])),
        "max_relative_loss_difference": max(abs(a - b) / abs(a) for a, b in zip(losses["eager"], losses["compiled"])),
        "eager_losses": losses["eager"], "compiled_losses": losses["compiled"],
    }))


if __name__ == "__main__":
    main()
