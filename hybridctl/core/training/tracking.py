"""Experiment trackers: sinks that mirror what a run writes (metrics.jsonl lines and summary.json) to TensorBoard
or Weights & Biases, chosen by `train.log_to`. metrics.jsonl stays the record; a tracker only shows it.

    tensorboard   event files in RUN/tensorboard/ (torch.utils.tensorboard.SummaryWriter); `tensorboard --logdir
                  runs` lists each run by its path, so a sweep's runs sit under the sweep's folder name
    wandb         one wandb run per run folder: name = the run's, group = its sweep's name, files in RUN/wandb/;
                  train.wandb_mode (online, offline, disabled) wins over WANDB_MODE, which wandb reads otherwise

Each metrics record goes to `log(record, kind)`: kind "train" (a log line), "eval" (a validation line) or "summary"
(summary.json), told apart by its keys when not given. Every number in it is logged at the record's step under
"<kind>/<key>" (train/loss, eval/val_loss, summary/best_val_loss), the same key and value as in the file.

The trackers' packages are optional extras, imported only when train.log_to names them: `pip install
"hybridctl[tracking]"` (TensorBoard), `pip install "hybridctl[wandb]"` (quoted: zsh reads [...] as a pattern).
Only the process that writes the run folder (rank 0) makes sinks.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from hybridctl.core.config import Config, config_to_toml
from hybridctl.core.errors import ConfigError
from hybridctl.core.training.runs import SWEEP_FILE, RunDir

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # wandb makes RUN/wandb/ itself (its `dir` is the run folder)
WANDB_ID_FILE = "hybridctl-run-id"  # in RUN/wandb/: a resumed run continues the same wandb run
WANDB_PROJECT = "hybridctl"  # unless WANDB_PROJECT says otherwise
EXTRAS = {"tensorboard": ("tracking", "tensorboard"), "wandb": ("wandb", "wandb")}  # tracker: (extra, package)
KINDS = ("train", "eval", "summary")


class Sink(Protocol):
    def log(self, record: dict[str, Any], kind: str | None = None) -> None: ...

    def close(self) -> None: ...


def record_kind(record: dict[str, Any]) -> str:
    """A validation line has val_loss, summary.json a status; anything else is a training log line."""
    if "val_loss" in record:
        return "eval"
    return "summary" if "status" in record else "train"


def record_step(record: dict[str, Any], kind: str) -> int:
    return int(record.get("steps" if kind == "summary" else "step", 0) or 0)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a record, but its step: what a tracker plots."""
    return {key: float(value) for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "steps")}


def _import(tracker: str):
    """The tracker's writer, or one ConfigError that names the extra to install."""
    extra, package = EXTRAS[tracker]
    try:
        if tracker == "tensorboard":
            import tensorboard  # noqa: F401  (torch's writer needs the package; said here, in its name)
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter
        import wandb

        return wandb
    except ImportError as e:
        raise ConfigError(f"train.log_to names '{tracker}', but {package} cannot be imported ({e}); "
                          f"`pip install \"hybridctl[{extra}]\"` (or `pip install {package}`), or leave '{tracker}' out of "
                          "train.log_to") from None


def check_trackers(cfg: Config) -> None:
    """Refuse a train.log_to tracker that is not installed: called before a run folder is written."""
    for tracker in cfg.train.log_to:
        _import(tracker)


def sweep_group(run: RunDir) -> str:
    """The name of the sweep the run belongs to (sweep.json beside it), '' for a run of no sweep."""
    path = run.path.parent / SWEEP_FILE
    if not path.is_file():
        return ""
    try:
        name = json.loads(path.read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    return name if isinstance(name, str) and name else run.path.parent.name


class TensorBoardSink:
    """Scalars into RUN/tensorboard/. A resumed run starts a new event file that purges the steps after its
    checkpoint from the earlier files (as the trainer drops them from metrics.jsonl), so no step shows twice."""

    def __init__(self, cfg: Config, run: RunDir, resume_step: int | None = None):
        writer_class = _import("tensorboard")
        log_dir = run.path / TENSORBOARD_DIR
        purge_step = None
        if resume_step is not None:
            purge_step = resume_step + 1
            _after_earlier_files(log_dir)
        self.writer = writer_class(log_dir=str(log_dir), purge_step=purge_step, flush_secs=30)
        if resume_step is None:
            group = sweep_group(run)
            header = f"run **{run.name}**" + (f" of sweep **{group}**" if group else "")
            toml = "\n".join("    " + line for line in config_to_toml(cfg).splitlines())  # a Markdown code block
            self.writer.add_text("config", f"{header}\n\n{toml}", 0)

    def log(self, record: dict[str, Any], kind: str | None = None) -> None:
        kind = kind or record_kind(record)
        step = record_step(record, kind)
        for key, value in scalars(record).items():
            self.writer.add_scalar(f"{kind}/{key}", value, step)
        if kind != "train":
            self.writer.flush()  # an eval or the end shows at once; log lines follow within flush_secs

    def close(self) -> None:
        self.writer.close()


def _after_earlier_files(log_dir: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and a name starts with the second it was made in:
    a resumed run's file must not share its second with an earlier one (it could sort first, and its purge of the
    abandoned steps would come before them)."""
    seconds = [int(p.name.split(".")[3]) for p in log_dir.glob("events.out.tfevents.*") if p.name.split(".")[3].isdigit()]
    while seconds and time.time() < max(seconds) + 1:
        time.sleep(max(seconds) + 1 - time.time())


class WandbSink:
    """One wandb run per run folder, continued by a resumed run (its id is kept in RUN/wandb/)."""

    def __init__(self, cfg: Config, run: RunDir, resume_step: int | None = None):
        wandb = _import("wandb")
        id_file = run.path / WANDB_DIR / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
        id_file.parent.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT, name=run.name, group=sweep_group(run) or None,
            dir=str(run.path), config=cfg.to_dict(), mode=cfg.train.wandb_mode or None,
            id=run_id, resume="allow" if run_id else None,
        )
        id_file.write_text(self.run.id + "\n")

    def log(self, record: dict[str, Any], kind: str | None = None) -> None:
        kind = kind or record_kind(record)
        values = {f"{kind}/{key}": value for key, value in scalars(record).items()}
        if kind == "summary":
            self.run.summary.update({k: v for k, v in values.items() if math.isfinite(v)})
        else:
            self.run.log(values, step=record_step(record, kind))

    def close(self) -> None:
        self.run.finish()


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink}


def make_sinks(cfg: Config, run: RunDir, resume_step: int | None = None) -> list[Sink]:
    """A sink per tracker of train.log_to, for a new run or one resumed from the checkpoint of `resume_step`.
    Every tracker is checked before any is started, so a missing one leaves nothing half made."""
    check_trackers(cfg)
    sinks: list[Sink] = []
    try:
        for tracker in cfg.train.log_to:
            sinks.append(SINKS[tracker](cfg, run, resume_step))
    except BaseException:
        close_sinks(sinks)
        raise
    return sinks


def close_sinks(sinks: list[Sink]) -> None:
    for sink in sinks:
        sink.close()
