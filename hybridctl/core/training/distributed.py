"""Data-parallel processes: joining the process group, and the few small collectives the trainer needs.

torchrun (which `hybridctl train --gpus N` starts) sets RANK, WORLD_SIZE and LOCAL_RANK. With WORLD_SIZE > 1,
`session(device)` joins the process group: NCCL on CUDA, where process LOCAL_RANK uses cuda:LOCAL_RANK, and gloo
on CPU. A single process joins no group and runs no collective: every helper here then answers as rank 0 of 1
and `together()` is an empty block.

Errors. A failure on one process must end all of them, be printed once, and never leave a process waiting in a
collective for a peer that has gone. Where rank 0 alone does something the others depend on (create the run
folder, write a checkpoint), the work runs inside `together()`, which ends with an agreement: an error on any
rank becomes an error on every rank. Only the first failing rank prints its message; the others raise errors
marked `quiet`, which the CLI does not print (`reports`).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import traceback
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from hybridctl.core.errors import HybridctlError
from hybridctl.core.training import processes
from hybridctl.core.training.processes import env_int, is_quiet, launched, mark_quiet

T = TypeVar("T")


class PeerFailed(HybridctlError):
    """Another process of the run failed and printed why; this one stops without repeating it."""

    quiet = True

def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    """This process's index on its machine (its GPU, on CUDA)."""
    return env_int("LOCAL_RANK", rank()) if active() or launched() else 0


def is_main() -> bool:
    return rank() == 0


# ---------------------------------------------------------------------------------------------------------
# Joining and leaving


def init(device: torch.device) -> None:
    """Join the process group when torchrun started several processes; nothing otherwise."""
    if not launched() or dist.is_initialized():
        return
    # The other processes wait in a collective while process 0 alone tokenises data, evaluates or writes a
    # checkpoint; NCCL's default 10-minute timeout would abort them during a long one.
    timeout = datetime.timedelta(seconds=env_int("HYBRIDCTL_COLLECTIVE_TIMEOUT", 3600))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    processes.mark_joined()


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def peer_lost(error: BaseException) -> bool:
    """Whether an error is a collective failing because another process died (gloo says 'closed by peer')."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "by peer" in str(error))


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[None]:
    """The process group for the length of a command: joined at the start (under torchrun), left at the end.

    A collective that fails because a peer died becomes PeerFailed: the peer printed the cause, and torchrun
    stops the rest. After such an error, or any other that is not a HybridctlError (those are raised by every
    rank alike, past their collectives), the group is not destroyed: tearing down a communicator with a collective
    still pending can hang, and the process is about to exit anyway.

    Before the group is destroyed, what still holds it goes: a DDP model keeps a reference to it, from the local
    variables of the frames an error passes through and from reference cycles. Left to the interpreter's exit,
    the group's destructor ran there and sometimes aborted the process ("terminate called without an active
    exception", seen on gloo after Ctrl-C)."""
    init(device)
    leave = True
    try:
        yield
    except HybridctlError as error:
        leave = not getattr(error, "abandon_group", False)
        if leave:
            traceback.clear_frames(error.__traceback__)  # their locals; the traceback still prints
        raise
    except BaseException as error:
        leave = False
        if active() and isinstance(error, Exception) and peer_lost(error):
            raise PeerFailed(f"process {rank()} stopped: another process of this run failed") from error
        raise
    finally:
        if leave:
            gc.collect()
            close()


# ---------------------------------------------------------------------------------------------------------
# Collectives


def _collective_device() -> torch.device:
    # NCCL reduces only CUDA tensors, gloo CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over ranks (in place, and returned)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world_size()
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def max_over_ranks(value: float) -> float:
    """The largest of every rank's `value` (a number on the host; in one process, the number itself)."""
    if not active():
        return value
    return float(all_reduce_max(torch.tensor([value], dtype=torch.float64, device=_collective_device())).item())


def share_text(text: str) -> str:
    """Rank 0's `text` on every rank (as UTF-8 bytes in a tensor: nothing is pickled)."""
    if not active():
        return text
    device = _collective_device()
    data = text.encode() if is_main() else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if is_main() and data:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return bytes(buffer.cpu().tolist()).decode()


def _first_failed(failed: bool) -> int | None:
    """The lowest rank that failed, or None; every rank must call this at the same point."""
    n = world_size()
    flag = torch.tensor([rank() if failed else n], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    first = int(flag.item())
    return None if first == n else first


@contextlib.contextmanager
def together() -> Iterator[None]:
    """A block that every rank finishes before any goes on, and that fails on every rank if it fails on one.

    The first failing rank raises (and prints) its own error; other failing ranks raise theirs quietly, and ranks
    that did not fail raise PeerFailed. Without the agreement, a rank whose partner failed would wait in its next
    collective until torchrun killed it."""
    if not active():
        yield
        return
    try:
        yield
    except BaseException as error:
        # An error that is already quiet was reported by another rank in an inner block: it is not a new one.
        if _first_failed(not is_quiet(error)) not in (None, rank()):
            mark_quiet(error)
        raise
    first = _first_failed(False)
    if first is not None:
        raise PeerFailed(f"process {rank()} stopped: process {first} failed")


def local_first(load: Callable[[], T]) -> T:
    """load() on each machine's first process, then on the others: what the first builds (a token cache), the
    others then read instead of building it again at the same time."""
    if not active():
        return load()
    result = None
    with together():
        if local_rank() == 0:
            result = load()
    with together():
        if local_rank() != 0:
            result = load()
    return result


def abandon_group(error: HybridctlError) -> HybridctlError:
    """An error raised by one process while the others may be inside a collective (out of memory in a step, say):
    `session` then leaves the process group as it is, since tearing it down could hang, and torchrun ends the
    other processes when this one exits."""
    error.abandon_group = True
    return error


def shared(error: HybridctlError) -> HybridctlError:
    """An error that every rank raises at the same point (an agreed decision): rank 0 alone prints it."""
    if not is_main():
        mark_quiet(error)
    return error
