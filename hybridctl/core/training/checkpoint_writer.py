"""Checkpoints written in the background, so the training loop does not wait for the disk.

`CheckpointWriter.save()` returns once the checkpoint is taken: the model's and AdamW's tensors copied to host
memory (into buffers kept for the next save: pinned ones on CUDA; on CPU a copy too, since training changes the
weights in place), with state.json's content and the RNG states of that moment. One background thread then
writes, hashes, fsyncs and renames it into place (checkpoint.write_snapshot) and runs what must follow it (the
trainer prunes older step checkpoints there). The rules:

- One snapshot at a time: a save of another version (the trainer's step) first waits until every write of the
  previous one is done, then reuses its buffers. A save of the same version (best/ and step_NNNNNN at one step)
  shares the snapshot; its write queues behind the first and copies that one's files.
- Writes run one at a time, in the order they were saved.
- A failed write is not lost: its error (a CheckpointError for the disk) is raised by the next save, or by
  wait() or close(), which the trainer calls before it reports the end of a run or a stop.
- The thread is a daemon: a process that ends normally has waited (close), and one that is killed, or stopped
  at once by a second Ctrl-C, leaves at most a temporary folder that `resume` removes, as kill -9 does.
"""

from __future__ import annotations

import functools
import queue
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Hashable

import torch

from hybridctl.core.training import checkpoint as ckpt

# Writers that may have writes in flight, for wait_for_pending_writes.
_writers: "weakref.WeakSet[CheckpointWriter]" = weakref.WeakSet()


class _Job:
    def __init__(self, work: Callable[[], None]):
        self.work, self.done, self.error = work, threading.Event(), None

    def run(self) -> None:
        try:
            self.work()
        except BaseException as error:  # kept for the training thread to raise
            self.error = error
        finally:
            self.done.set()


def _work_through(jobs: queue.SimpleQueue) -> None:
    while (job := jobs.get()) is not None:
        job.run()


class CheckpointWriter:
    def __init__(self) -> None:
        self._jobs: list[_Job] = []  # saved and not yet waited for, in order
        self._queue: queue.SimpleQueue | None = None  # the thread's; made with the thread at the first save
        self._thread: threading.Thread | None = None
        self._snapshot: ckpt.Snapshot | None = None
        self._version: Hashable = None
        _writers.add(self)

    def save(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any],
             version: Hashable = None, then: Callable[[], None] | None = None) -> None:
        """Take a checkpoint of `model` and `optimizer` for `path` now; write it in the background. Equal `version`s
        (not None) promise equal tensors, so the snapshot is shared. `state`: state.json's content (the RNG states
        are added here). `then()` runs in the writer's thread once the checkpoint is in place."""
        if version is None or version != self._version or self._snapshot is None:
            self.wait()
            # Cleared first: a copy that fails half-way must not leave a half-filled snapshot to share.
            reuse, self._snapshot, self._version = self._snapshot, None, None
            self._snapshot = ckpt.take_snapshot(model, optimizer, reuse=reuse)
            self._version = version
        elif any(job.done.is_set() and job.error is not None for job in self._jobs):
            self.wait()  # raises: a write of this snapshot failed already
        job = _Job(functools.partial(self._write, path, self._snapshot, {**state, "rng": ckpt.rng_state()}, then))
        self._jobs.append(job)
        self._thread_queue().put(job)

    @staticmethod
    def _write(path: Path, snapshot: ckpt.Snapshot, state: dict[str, Any], then: Callable[[], None] | None) -> None:
        ckpt.write_snapshot(path, snapshot, state)
        if then is not None:
            then()

    def _thread_queue(self) -> queue.SimpleQueue:
        if self._queue is None:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=_work_through, args=(self._queue,), name="checkpoint-writer", daemon=True)
            self._thread.start()
        return self._queue

    def pending(self) -> bool:
        return any(not job.done.is_set() for job in self._jobs)

    def wait(self) -> None:
        """Until every write saved so far is done; raises the first failed one's error."""
        self.wait_quietly()
        jobs, self._jobs = self._jobs, []
        failed = next((job.error for job in jobs if job.error is not None), None)
        if failed is not None:
            raise failed

    def wait_quietly(self) -> None:
        for job in list(self._jobs):
            job.done.wait()

    def close(self) -> None:
        """Wait for the writes (raising a failed one's error), then end the thread and free the buffers."""
        try:
            self.wait()
        finally:
            if self._queue is not None:
                self._queue.put(None)
                if not self.pending():
                    # Joined: a thread that has used torch and still ends while the interpreter exits can abort the
                    # process ("terminate called without an active exception").
                    self._thread.join()
                self._queue, self._thread = None, None
            self._snapshot, self._version = None, None
            _writers.discard(self)


def wait_for_pending_writes() -> None:
    """Until no writer of this process has a write in flight (their errors are their owners' to raise)."""
    for writer in list(_writers):
        writer.wait_quietly()
