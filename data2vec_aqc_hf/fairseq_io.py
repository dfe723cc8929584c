"""Read fairseq checkpoints without fairseq, without running code from the file.

A fairseq checkpoint is a pickle. `load_fairseq_checkpoint` reads it with `torch.load(weights_only=True)`, whose
unpickler only builds tensors, containers and primitive types, plus an explicit allow-list of the other types such
checkpoints hold:

* `argparse.Namespace` (`args` of older checkpoints);
* inert stand-ins for fairseq's own classes (`fairseq.data.dictionary.Dictionary` in the `task_state` of a
  fine-tuned checkpoint, the metric meters in `extra_state`): plain objects that only receive the pickled
  attributes; none of fairseq's code exists or runs;
* numpy scalars and dtypes (some `extra_state` values);
* omegaconf's containers, when omegaconf is installed (`cfg` of a checkpoint re-saved after
  `fairseq.checkpoint_utils.load_checkpoint_to_cpu`); they are turned into plain dicts.

Anything else (`os.system`, `builtins.eval`, an unknown class) is refused with an error that names the global and
the file. `trust_pickle=True` is for a file the user vouches for: the full pickle machinery, still with fairseq's
classes replaced by the stand-ins, so fairseq need not be installed.
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from pathlib import Path

import torch

__all__ = ["FairseqCheckpointError", "FairseqStandIn", "load_fairseq_checkpoint", "to_plain"]


class FairseqCheckpointError(ValueError):
    """A fairseq checkpoint that cannot be read or converted; the message names the file and the problem."""


class FairseqStandIn:
    """An inert object standing in for a pickled fairseq object: it only stores the pickled attributes."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self):
        return f"<stand-in for {type(self).__module__}.{type(self).__qualname__}>"


# The fairseq classes found pickled inside checkpoints (fairseq 0.10-0.12 and the data2vec-aqc fork).
FAIRSEQ_CLASSES = (
    "fairseq.data.dictionary.Dictionary",
    "fairseq.data.encoders.utils.Dictionary",
    "fairseq.logging.meters.AverageMeter",
    "fairseq.logging.meters.SumMeter",
    "fairseq.logging.meters.TimeMeter",
    "fairseq.logging.meters.StopwatchMeter",
    "fairseq.logging.meters.MetersDict",
)
_STAND_INS: dict[str, type] = {}


def _stand_in(qualified: str) -> type:
    if qualified not in _STAND_INS:
        module, name = qualified.rsplit(".", 1)
        _STAND_INS[qualified] = type(name, (FairseqStandIn,), {"__module__": module, "__qualname__": name})
    return _STAND_INS[qualified]


def _omegaconf_globals() -> list:
    try:
        import omegaconf  # noqa: F401
        from omegaconf import base, dictconfig, listconfig, nodes
    except ImportError:
        return []
    import typing

    classes = [dictconfig.DictConfig, listconfig.ListConfig, base.ContainerMetadata, base.Metadata, typing.Any]
    classes += [getattr(nodes, n) for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode",
                                           "EnumNode", "BytesNode", "PathNode") if hasattr(nodes, n)]
    import collections
    # omegaconf's node metadata names plain types (`ref_type=int`, `object_type=dict`)
    return classes + [dict, list, int, float, str, bool, tuple, collections.defaultdict]


def _numpy_globals() -> list:
    import numpy as np

    scalar = (getattr(np, "_core", None) or np.core).multiarray.scalar
    out = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    out += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return out


def allowed_globals() -> list:
    """What `torch.load(weights_only=True)` may build besides tensors and plain containers."""
    return ([argparse.Namespace] + [(_stand_in(q), q) for q in FAIRSEQ_CLASSES] + _numpy_globals()
            + _omegaconf_globals())


class _TrustedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "fairseq" or module.startswith("fairseq."):
            return _stand_in(f"{module}.{name}")
        return super().find_class(module, name)


class _TrustedPickleModule:
    Unpickler = _TrustedUnpickler
    load = pickle.load
    __name__ = "data2vec_aqc_hf_trusted_pickle"


def load_fairseq_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict:
    """The checkpoint's top-level dict with `cfg` (and `args`, when a `Namespace`) as plain dicts. Raises
    `FairseqCheckpointError` naming the file for a missing, truncated or foreign file and for a pickled global
    outside the allow-list (unless `trust_pickle`)."""
    path = Path(path)
    if not path.is_file():
        raise FairseqCheckpointError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise FairseqCheckpointError(
            f"{path}: not a PyTorch zip checkpoint (truncated, still downloading, or another format); "
            f"{path.stat().st_size} bytes")
    try:
        if trust_pickle:  # the user's explicit choice (--trust_pickle): full pickle, fairseq classes still stand-ins
            import warnings

            warnings.warn(f"{path}: unpickling with trust_pickle=True; code in this file can run", stacklevel=2)
            state = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TrustedPickleModule)
        else:
            with torch.serialization.safe_globals(allowed_globals()):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = found.group(1) if found else str(error).splitlines()[0]
        if what.startswith("omegaconf") and not _omegaconf_globals():
            raise FairseqCheckpointError(
                f"{path}: its cfg is an omegaconf DictConfig (a checkpoint re-saved after fairseq's "
                f"load_checkpoint_to_cpu); install omegaconf to read it: pip install omegaconf") from None
        raise FairseqCheckpointError(
            f"{path}: refusing to unpickle {what}: not a type fairseq checkpoints are known to contain, and "
            f"unpickling it could run code. If you trust this file, pass --trust_pickle "
            f"(trust_pickle=True)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise FairseqCheckpointError(f"{path}: unreadable checkpoint ({error})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise FairseqCheckpointError(f"{path}: not a fairseq checkpoint (no 'model' entry at the top level)")
    for key in ("cfg", "args"):
        if state.get(key) is not None:
            state[key] = to_plain(state[key])
    return state


def to_plain(value):
    """Nested plain dicts/lists from an omegaconf container, an `argparse.Namespace` or a plain dict."""
    if isinstance(value, argparse.Namespace):
        return {k: to_plain(v) for k, v in vars(value).items()}
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    except ImportError:
        pass
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
