import sys
from pathlib import Path

import torch

from data2vec_aqc_hf.profiling import profiled, step_part

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from profile_step import attribute  # noqa: E402


@profiled("big")
def big(x):
    return (x @ x).tanh()


@profiled("small")
def small(x):
    return x * 2.0


def test_profiled_parts_get_their_forward_and_backward_time():
    """A part 100x costlier than another gets more operator time, and its backward (the matmul's gradient, run by
    autograd outside any part) is charged back to it through the sequence numbers."""
    x = torch.randn(300, 300, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with step_part("step"):
            y = big(x).sum() + small(x).sum()
            with step_part("backward"):
                y.backward()
    times, total = attribute(prof.events())
    assert total > 0
    assert {"big", "small", "big (backward)", "small (backward)"} <= set(times)
    assert times["big"] > times["small"] and times["big (backward)"] > times["small (backward)"]
    assert sum(times.values()) <= total * 1.05  # self times of the step's operators: no double counting


def test_profiled_function_compiles_without_graph_breaks():
    explanation = torch._dynamo.explain(lambda x: big(x) + small(x))(torch.randn(4, 4))
    assert explanation.graph_break_count == 0
