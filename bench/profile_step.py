"""Where a pretraining step's time goes: our step profiled by part, forward and backward.

    python bench/profile_step.py --preset small --threads 1          # CPU
    python bench/profile_step.py --preset base --efficient            # the efficient mode

One full update as `training/pretrain.py` does it (forward, backward, AdamW, EMA teacher update), on the real speech
batch of `bench/step_time.py`, under `torch.profiler`. The model marks its parts (`data2vec_aqc_hf.profiling`): the
CNN (both views), augmentation, teacher, student (projection + transformer, or the kept frames in the efficient
mode), decoder, quantizer, k-means, contrastive losses (negatives, logits), regression loss. Every operator is
charged to the innermost part around it; a backward operator is charged to the part of the forward operator it
differentiates (autograd's sequence numbers), so "cnn" includes the CNN's backward. The optimizer step and the EMA
update are parts of their own; what no part claims is "other" (feature projection, masking, loss assembly, autograd
bookkeeping). Reports each part's share of the step (median over `--steps` profiled updates after `--warmup`) and
the issue's measure: augmentation + quantizer + k-means as a share of the step (target <= 10 %). Writes JSON and a
PNG bar chart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from step_time import speech_batch  # noqa: E402

from data2vec_aqc_hf import Data2VecAQCConfig, Data2VecAQCForPreTraining  # noqa: E402
from data2vec_aqc_hf.profiling import PART_PREFIX, step_part  # noqa: E402

BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
TARGET_PARTS = ("augmentation", "quantizer", "kmeans")


def part_of(event) -> str | None:
    """The innermost `aqc::` part enclosing a profiler event (None outside every part)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(PART_PREFIX):
            name = parent.name[len(PART_PREFIX):]
            return None if name == "step" else name  # the whole update's marker: ops in no part are "other"
        parent = parent.cpu_parent
    return None


def attribute(events) -> tuple[dict[str, float], float]:
    """Self CPU time (us) per part, forward and backward, and the step's total, from one profiled update."""
    forward_part = {}
    for e in events:  # forward ops carry the sequence number their backward node gets
        if e.sequence_nr >= 0 and not e.name.startswith(BACKWARD_PREFIX):
            part = part_of(e)
            if part not in (None, "backward") and e.sequence_nr not in forward_part:
                forward_part[e.sequence_nr] = part
    times = defaultdict(float)
    step_total = 0.0
    for e in events:
        if e.name == PART_PREFIX + "step":
            step_total = e.cpu_time_total
        if e.name.startswith(PART_PREFIX) or e.name.startswith(BACKWARD_PREFIX):
            continue  # markers and autograd wrappers: their ops are counted below
        part = part_of(e)
        if part == "backward":  # find the backward node enclosing this op, then its forward's part
            node = e.cpu_parent
            while node is not None and not node.name.startswith(BACKWARD_PREFIX):
                node = node.cpu_parent
            origin = forward_part.get(node.sequence_nr) if node is not None else None
            part = f"{origin} (backward)" if origin else "other (backward)"
        times[part or "other"] += e.self_cpu_time_total
    return dict(times), step_total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", choices=["tiny", "small", "base"])
    p.add_argument("--objective", default="aqc", choices=["aqc", "data2vec"])
    p.add_argument("--efficient", action="store_true", help="efficient_mode=True (data2vec 2.0 with AQC)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=str(ROOT / "outputs/bench"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    config = Data2VecAQCConfig.from_preset(a.preset, layerdrop=0.0, objective=a.objective, efficient_mode=a.efficient)
    model = Data2VecAQCForPreTraining(config).train()
    optimizer = torch.optim.AdamW(model.student_parameters(), lr=5e-4)
    generator = torch.Generator().manual_seed(0)
    x, mask = speech_batch(a.batch_size, a.seconds, torch.device("cpu"))

    def update():
        with step_part("step"):
            out = model(x, attention_mask=mask, generator=generator)
            with step_part("backward"):
                out.loss.backward()
            with step_part("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            with step_part("ema"):
                model.update_teacher()

    for _ in range(a.warmup):
        update()
    per_step = []
    for _ in range(a.steps):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            update()
        per_step.append(attribute(prof.events()))

    parts = sorted({k for times, _ in per_step for k in times})
    median = {k: statistics.median(times.get(k, 0.0) for times, _ in per_step) / 1e3 for k in parts}
    step_ms = statistics.median(total for _, total in per_step) / 1e3
    accounted = sum(median.values())
    name = f"{a.preset}-{a.objective}{'-efficient' if a.efficient else ''}"
    print(f"{name}: {a.batch_size} x {a.seconds:g} s, {torch.get_num_threads()} thread(s); step {step_ms:.0f} ms "
          f"(profiled; the profiler adds overhead), {accounted:.0f} ms in operators")
    print(f"{'part':<28} {'ms':>8} {'share':>7}")
    rows = sorted(median.items(), key=lambda kv: -kv[1])
    for part, ms in rows:
        print(f"{part:<28} {ms:>8.1f} {100 * ms / accounted:>6.1f}%")
    target = sum(ms for part, ms in median.items() if part.split(" ")[0] in TARGET_PARTS)
    share = 100 * target / accounted
    print(f"augmentation + quantizer + k-means, forward and backward: {target:.0f} ms = {share:.1f} % of the step "
          f"(target <= 10 %)")

    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    result = {"name": name, "preset": a.preset, "batch_size": a.batch_size, "seconds": a.seconds,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "step_ms": step_ms,
              "parts_ms": median, "target_parts_share": share}
    (out / f"profile_{name}.json").write_text(json.dumps(result, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.2))
        ax.barh([r[0] for r in rows][::-1], [100 * r[1] / accounted for r in rows][::-1], color="tab:blue")
        ax.set_xlabel("share of the step's operator time (%)")
        ax.set_title(f"{name}, {a.batch_size} x {a.seconds:g} s, CPU, {torch.get_num_threads()} thread(s)")
        fig.tight_layout()
        fig.savefig(out / f"profile_{name}.png", dpi=120)
        print(f"plot: {out / f'profile_{name}.png'}")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
