"""Named parts of the pretraining step for `torch.profiler` (read by `bench/profile_step.py`).

`profiled("cnn")` marks a function as one part of the step: while a profiler records, its ops (and, through autograd's
sequence numbers, their backward ops) are attributed to that part. Without a profiler the cost is one
`record_function` enter/exit per call (microseconds); under `torch.compile` it is nothing (the mark is skipped, so
the step still traces as one graph).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch

PART_PREFIX = "aqc::"


def step_part(name: str):
    """Context manager naming a part of the step (`aqc::<name>` in a profile); a no-op while compiling."""
    if torch.compiler.is_compiling():
        return nullcontext()
    return torch.profiler.record_function(PART_PREFIX + name)


def profiled(name: str):
    """Decorator: every call of the function is the step part `name`."""

    def decorate(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with step_part(name):
                return fn(*args, **kwargs)

        return inner

    return decorate
