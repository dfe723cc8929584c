"""The data2vec teacher: EMA schedule and update, and regression targets from its top layers (spec section 2)."""

from __future__ import annotations

import functools

import torch
from torch import nn


def ema_decay(num_updates: torch.Tensor | int, start: float, end: float, anneal_steps: int) -> torch.Tensor:
    """tau: linear from `start` to `end` over the first `anneal_steps` updates, then `end` (data2vec)."""
    num_updates = torch.as_tensor(num_updates, dtype=torch.float64)
    if anneal_steps <= 0:
        return torch.full_like(num_updates, end)
    progress = torch.clamp(num_updates / anneal_steps, max=1.0)
    return start + (end - start) * progress


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, decay: float, copy_prefixes: tuple[str, ...] = ()) -> None:
    """theta_teacher <- decay * theta_teacher + (1 - decay) * theta_student, in place, for matching parameters and
    floating buffers; those whose name starts with one of `copy_prefixes` are copied instead of averaged."""
    student_params = dict(student.named_parameters())
    averaged_t, averaged_s = [], []
    for name, t_param in teacher.named_parameters():
        s_param = student_params[name].detach().to(t_param.dtype)
        if name.startswith(copy_prefixes):
            t_param.copy_(s_param)
        else:
            averaged_t.append(t_param)
            averaged_s.append(s_param)
    if averaged_t:
        torch._foreach_lerp_(averaged_t, averaged_s, 1.0 - float(decay))
    student_buffers = dict(student.named_buffers())
    for name, t_buf in teacher.named_buffers():
        if name in student_buffers and t_buf.is_floating_point():
            t_buf.copy_(student_buffers[name])


def masked_instance_norm(x: torch.Tensor, frame_mask: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """Normalise `x` `(batch, frames, channels)` to zero mean, unit (biased) variance over time, per utterance and
    channel, using only the valid frames; equals `F.instance_norm` on `(B, C, T)` when nothing is padded."""
    x = x.float()
    if frame_mask is None:
        frame_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    w = frame_mask.to(x.dtype)[..., None]
    count = w.sum(1, keepdim=True).clamp(min=1.0)
    mean = (x * w).sum(1, keepdim=True) / count
    var = ((x - mean).square() * w).sum(1, keepdim=True) / count
    return (x - mean) / torch.sqrt(var + eps) * w


def average_layer_targets(
    layer_outputs: list[torch.Tensor], frame_mask: torch.Tensor | None, instance_norm: bool = True
) -> torch.Tensor:
    """data2vec v1 targets: instance-normalise each of the top-K layers' outputs, then average them."""
    if instance_norm:
        layer_outputs = [masked_instance_norm(y, frame_mask) for y in layer_outputs]
    return torch.stack([y.float() for y in layer_outputs]).mean(0)


class FeedForwardRecorder:
    """Records the output of each given module (the FFN blocks of the teacher's layers, i.e. the FFN output before
    the residual add) on every forward, with forward hooks on transformers' own modules."""

    def __init__(self, modules: list[nn.Module]):
        self.outputs: list[torch.Tensor | None] = [None] * len(modules)
        # hooks are bound methods (not closures): `copy.deepcopy` and pickling of the model then carry a recorder
        # attached to the copy's own teacher
        self.handles = [m.register_forward_hook(functools.partial(self._record, i)) for i, m in enumerate(modules)]

    def _record(self, index: int, module, args, output):
        self.outputs[index] = output

    def pop(self) -> list[torch.Tensor]:
        outputs, self.outputs = self.outputs, [None] * len(self.outputs)
        if any(o is None for o in outputs):
            raise RuntimeError("a teacher target layer did not run (layerdrop must be off in the teacher)")
        return outputs
