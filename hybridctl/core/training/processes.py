"""Which process of a torchrun launch this is, read from the environment alone, which process prints an error, and
the signals that stop a process's training.

Apart from distributed.py (which needs torch) so that the CLI can decide who reports an error without loading
torch: a command that never joined a process group needs none of it.
"""

from __future__ import annotations

import contextlib
import os
import signal

from hybridctl.core.errors import Terminated

_joined = False  # whether this process has joined a process group (errors before that are everyone's alike)


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launched() -> bool:
    """Started by torchrun as one of several processes (the process group may not be joined yet)."""
    return env_int("WORLD_SIZE", 1) > 1


def mark_joined() -> None:
    global _joined
    _joined = True


def mark_quiet(error: BaseException) -> BaseException:
    error.quiet = True  # type: ignore[attr-defined]
    return error


def is_quiet(error: BaseException) -> bool:
    return bool(getattr(error, "quiet", False))


def reports(error: BaseException) -> bool:
    """Whether this process prints `error`. Errors marked quiet are printed by another rank. Before the group is
    joined every process runs the same code on the same arguments, so the first process of each machine speaks
    for its machine."""
    if is_quiet(error):
        return False
    if isinstance(error, (KeyboardInterrupt, Terminated)) and launched():  # every process got the signal
        return env_int("RANK", 0) == 0
    if launched() and not _joined:
        return env_int("LOCAL_RANK", 0) == 0
    return True


@contextlib.contextmanager
def stop_on_signals(flag: dict):
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the end of the current step and stops."""
    previous = {}

    def handler(signum, frame):
        if flag.get("signal"):
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        flag["signal"] = signal.Signals(signum).name

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
