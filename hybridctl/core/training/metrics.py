"""Where a run's records go. One place records them, so every record reaches every destination alike:

    Metrics.record(kind, record)   a "log" or "eval" record: every sink (metrics.jsonl, ...), then the callback
    Metrics.event(kind, record)    progress alone ("start", "skip", "checkpoint", "end"): the callback
                                   ("checkpoint" comes when it is taken; its files are written in the background)

A sink is anything with `log(record)` and `close()`. metrics.jsonl is one (MetricsFile); the experiment trackers
of train.log_to (tracking.py: TensorBoard, wandb) are others, which the Trainer adds on rank 0. Under torchrun rank 0 alone
records: the other processes get a Metrics with no sink and no callback.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from hybridctl.core.training import distributed as dist
from hybridctl.core.training.runs import RunDir

Callback = Callable[[str, dict[str, Any]], None]


class MetricsSink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class MetricsFile:
    """The run's metrics.jsonl: one JSON object per logged step or eval."""

    def __init__(self, run: RunDir):
        self.run = run

    def log(self, record: dict[str, Any]) -> None:
        self.run.append_metrics(record)

    def close(self) -> None:
        pass  # each record is appended and closed as it comes


class Metrics:
    def __init__(self, callback: Callback | None = None, sinks: list[MetricsSink] | None = None):
        self.callback = callback
        self.sinks = list(sinks or [])

    @classmethod
    def for_run(cls, run: RunDir, callback: Callback | None) -> "Metrics":
        if not dist.is_main():
            return cls()
        return cls(callback, [MetricsFile(run)])

    def record(self, kind: str, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(record)
        self.event(kind, record)

    def event(self, kind: str, record: dict[str, Any]) -> None:
        if self.callback is not None:
            self.callback(kind, record)

    def output_closed(self) -> bool:
        """Whether the callback's output is gone: a callback may say so with `output_closed` (TrainProgress does,
        once the pipe it prints to has lost its reader); the trainer then saves and stops."""
        return bool(getattr(self.callback, "output_closed", False))

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
