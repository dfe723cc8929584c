"""What keeps a pretraining run's work safe when something outside it goes wrong.

* `StopRequests`: SIGTERM / SIGINT (and, under `accelerate launch` or torchrun, the launcher exiting) ask the run to
  stop after its current update, with a checkpoint;
* `RankVote`: flags agreed by every rank (a stop, a rank without data), so that all ranks take the same branch;
* `OutputDirLock`: one run per output directory (two runs would overwrite each other's checkpoints);
* `explained_write_errors`: a failed checkpoint write (disk full gives torch's "basic_ios::clear") names the path,
  the free space and the space needed.

How signals reach the training processes (accelerate 1.x, torch 2.x):
* `accelerate launch` with one process starts the script with `subprocess.Popen` in the same process group and does
  not forward signals. Ctrl-C in the terminal reaches both; `kill <launcher pid>` reaches only the launcher, which
  dies at once: the training process was left running, orphaned.
* with several processes (`--multi_gpu`, torchrun) the workers run in their own session; the launcher (torch
  elastic's agent) forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to them and sends SIGKILL 30 s later (torch's default
  `--shutdown_timeout`, which accelerate does not expose). A launcher killed with SIGKILL forwards nothing.
Hence `watch_launcher`: a process started by such a launcher asks the kernel for SIGTERM when its parent dies
(Linux `prctl(PR_SET_PDEATHSIG)`) and also polls its parent pid, so it checkpoints and stops instead of running on.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

LOCK_NAME = "pretraining.lock"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LAUNCHER_MARKERS = ("accelerate launch", "accelerate.commands.launch", "accelerate-launch", "torch.distributed.run",
                    "torchrun")


# ----- stop requests ----------------------------------------------------------------------------------------------
class StopRequests:
    """Within the `with` block, SIGTERM and SIGINT do not kill the process: they set `reason` (the first one wins;
    repeats are logged, `kill -9` still stops at once), and the training loop stops at its next update boundary
    after writing a checkpoint. Handlers can only be installed in the main thread; elsewhere signals keep their
    default action. Under a launcher (`watch_launcher`) the launcher's exit is a stop request too."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.reason: str | None = None  # "SIGTERM", "SIGINT", ... once a stop was asked for
        self.detail = ""
        self.launcher: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            self.launcher = watch_launcher()
        return self

    def __exit__(self, *exc) -> None:
        if self.launcher is not None:
            set_parent_death_signal(0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.reason is not None:
            logger.warning(f"received {name} again: already stopping after the current update")
            return
        self.reason = name
        if self.launcher is not None and os.getppid() != self.launcher:
            self.detail = f" (the launcher, pid {self.launcher}, exited)"
        logger.warning(f"received {name}{self.detail}: finishing the current update, then writing a checkpoint "
                       f"and stopping (kill -9 stops at once and loses the updates since the last checkpoint)")

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for; also notices a launcher that exited (if its SIGTERM never came)."""
        if self.reason is None and self.launcher is not None and os.getppid() != self.launcher:
            self.reason, self.detail = "SIGTERM", f" (the launcher, pid {self.launcher}, exited)"
            logger.warning(f"the launcher (pid {self.launcher}) exited: finishing the current update, then writing "
                           f"a checkpoint and stopping")
        return self.reason is not None


def launcher_pid() -> int | None:
    """The parent's pid when the parent is `accelerate launch` or torchrun (its command line says so; Linux /proc),
    else None (a shell, nohup, pytest, ...: their exit must not stop the run)."""
    parent = os.getppid()
    try:
        command = Path(f"/proc/{parent}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return parent if any(marker in command for marker in LAUNCHER_MARKERS) else None


def set_parent_death_signal(signum: int) -> bool:
    """`prctl(PR_SET_PDEATHSIG, signum)`: the kernel sends `signum` to this process when its parent dies (0: never).
    False where that is not available (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_launcher() -> int | None:
    """Under a launcher, get SIGTERM when it dies (so a launcher killed on its own leaves no orphaned training
    process); returns the launcher's pid, which `StopRequests.requested` also polls (it covers a launcher that died
    before this call, and systems without prctl)."""
    parent = launcher_pid()
    if parent is not None:
        set_parent_death_signal(signal.SIGTERM)
    return parent


# ----- agreement of all ranks -------------------------------------------------------------------------------------
class RankVote:
    """Small integer flags and counts combined over every rank: one all-reduce of a CPU tensor over a gloo group,
    so a vote never waits on the GPU; with one process, the local values. Every rank must vote at the same points."""

    def __init__(self, num_processes: int):
        self.group = torch.distributed.new_group(backend="gloo") if num_processes > 1 else None

    def _reduce(self, values, op) -> list[int]:
        if self.group is None:
            return [int(v) for v in values]
        tensor = torch.tensor([int(v) for v in values], dtype=torch.long)
        torch.distributed.all_reduce(tensor, op=op, group=self.group)
        return tensor.tolist()

    def max(self, *values) -> list[int]:
        return self._reduce(values, torch.distributed.ReduceOp.MAX)

    def sum(self, *values) -> list[int]:
        return self._reduce(values, torch.distributed.ReduceOp.SUM)

    def all(self, flag: bool) -> bool:
        return not self.max(int(not flag))[0]

    def gather(self, obj) -> list:
        """`obj` of every rank, in rank order (small, picklable objects made by this code)."""
        if self.group is None:
            return [obj]
        out = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out


# ----- one run per output directory -------------------------------------------------------------------------------
class OutputDirLockedError(RuntimeError):
    """Another run is writing into the output directory."""


class OutputDirLock:
    """`output_dir/pretraining.lock`, created atomically (`O_CREAT | O_EXCL`) with this process's pid and host by
    `acquire`, removed by `release` when the run ends. A lock of a live process (or of another host, where the pid
    cannot be checked) is refused unless `overwrite`; one left by a dead process (kill -9, a crash) is taken over
    with a warning."""

    def __init__(self, output_dir, overwrite: bool = False):
        self.path = Path(output_dir) / LOCK_NAME
        self.overwrite = overwrite
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over(read_lock(self.path))
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self_description(), f)
            self.held = True
            return
        raise OutputDirLockedError(f"{self.path}: another run took this lock at the same moment; use another "
                                   f"--output_dir")

    def _take_over(self, holder: dict | None) -> None:
        """Remove the lock of `holder` if it is stale (or `overwrite`), else refuse naming the holder."""
        who = describe_holder(holder)
        if holder is not None and holder_alive(holder):
            if not self.overwrite:
                raise OutputDirLockedError(
                    f"{self.path.parent}: another pretraining run ({who}) is writing into this directory (lock file "
                    f"{self.path}); two runs would overwrite each other's checkpoints. Use another --output_dir, wait "
                    f"for that run to end, or pass --overwrite_output_dir to take the lock over")
            logger.warning(f"--overwrite_output_dir: taking over {self.path} from {who}")
        else:
            logger.warning(f"taking over the stale lock {self.path} of {who} (that process is gone)")
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if it is still this process's (an --overwrite_output_dir run may have taken it)."""
        if self.held and (read_lock(self.path) or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


def self_description() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:500]}


def read_lock(path: Path) -> dict | None:
    """The holder written in a lock file; None when missing, empty or unreadable (a writer that died mid-write)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def holder_alive(holder: dict) -> bool:
    """True unless the holder is provably gone: on this host, a pid that no longer exists (or is this process,
    i.e. a lock left by an earlier run in this interpreter). Another host's pid cannot be checked: alive."""
    if holder.get("host") != socket.gethostname():
        return True
    if holder["pid"] == os.getpid():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def describe_holder(holder: dict | None) -> str:
    if holder is None:
        return "an unreadable lock"
    return f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


# ----- checkpoint writes ------------------------------------------------------------------------------------------
class CheckpointWriteError(OSError):
    """A checkpoint or the final model could not be written (disk full, quota, permissions)."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def free_bytes(path: Path) -> int | None:
    """Free space on the file system holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


@contextmanager
def explained_write_errors(what: str, target: Path, needed_bytes: int, partial: Path | None = None,
                           kept: list[Path] = ()):
    """Turn an OSError or RuntimeError raised while writing `target` (torch.save on a full disk says only
    "basic_ios::clear" or "file write failed") into a `CheckpointWriteError` naming the path, the free space, the
    space needed and what is kept; the `partial` folder is removed first (it frees the space it took)."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        free = free_bytes(target)
        full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
        kept_text = ", ".join(str(p) for p in kept) if kept else "none"
        raise CheckpointWriteError(
            f"writing {what} {target} failed: {type(error).__name__}: {str(error).strip()[:300]}. "
            f"{'The disk is full: ' if full else ''}{human_bytes(free) if free is not None else 'unknown space'} free "
            f"on the file system of {target.parent}, {what} needs about {human_bytes(needed_bytes)}. Free space or "
            f"use another --output_dir (lower --save_total_limit keeps fewer checkpoints). Kept, complete: "
            f"{kept_text}") from error
