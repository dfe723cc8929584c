"""Learning-rate schedules of the recipes (fairseq's tri-stage)."""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def tri_stage_factor(step: int, total_steps: int, phase_ratio=(0.03, 0.9, 0.07), init_lr_scale: float = 0.01,
                     final_lr_scale: float = 0.05) -> float:
    """fairseq `tri_stage`: linear warm-up from `init_lr_scale` to 1, hold at 1, exponential decay to
    `final_lr_scale`, then stay there. Returns the multiplier of the peak learning rate."""
    warmup = int(total_steps * phase_ratio[0])
    hold = int(total_steps * phase_ratio[1])
    decay = max(total_steps - warmup - hold, 0) if len(phase_ratio) < 3 else int(total_steps * phase_ratio[2])
    if step < warmup:
        return init_lr_scale + (1.0 - init_lr_scale) * step / warmup
    step -= warmup
    if step < hold:
        return 1.0
    step -= hold
    if step < decay:
        return math.exp(math.log(final_lr_scale) * step / decay)
    return final_lr_scale


def tri_stage_schedule(optimizer, total_steps: int, phase_ratio=(0.03, 0.9, 0.07), init_lr_scale: float = 0.01,
                       final_lr_scale: float = 0.05) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: tri_stage_factor(step, total_steps, phase_ratio, init_lr_scale,
                                                             final_lr_scale))
