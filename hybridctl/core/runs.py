"""Run folders: everything a run writes, and everything `resume`, `compare`, `report` and `bench` read back.

    runs/<name>/config.toml     the resolved config
    runs/<name>/metrics.jsonl   one JSON object per logged step or eval
    runs/<name>/summary.json    final and best values, throughput, wall time, params
    runs/<name>/run.lock        pid of the process writing the run (removed when it ends)
    runs/<name>/checkpoints/step_NNNNNN/   and   runs/<name>/best/
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from hybridctl.core import checkpoint as ckpt
from hybridctl.core.config import Config, config_to_toml, load_config_file
from hybridctl.core.errors import RunError

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOCK_FILE = "run.lock"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    def __init__(self, path: Path | str):
        self.path = Path(path)

    # paths
    @property
    def name(self) -> str:
        return self.path.name

    config_path = property(lambda self: self.path / CONFIG_FILE)
    metrics_path = property(lambda self: self.path / METRICS_FILE)
    summary_path = property(lambda self: self.path / SUMMARY_FILE)
    lock_path = property(lambda self: self.path / LOCK_FILE)
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    best_dir = property(lambda self: self.path / "best")

    def exists(self) -> bool:
        return self.config_path.is_file()

    # creation and locking
    def create(self, cfg: Config, force: bool = False) -> None:
        """Make a fresh run folder; an existing run is kept unless force."""
        if self.path.exists() and any(self.path.iterdir()):
            if not force:
                raise RunError(f"run folder {self.path} already exists; pick another --name, resume it with `hybridctl resume {self.path}`, or pass --force to replace it")
            self.acquire_lock()  # refuse to wipe a run another process is writing
            shutil.rmtree(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"x" * 4096)
            probe.unlink()
        except OSError as e:
            _remove_if_empty(self.path)
            reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise RunError(f"cannot write to {self.path}: {reason}; choose another --out folder") from None
        self.acquire_lock()
        self.config_path.write_text(config_to_toml(cfg))

    def acquire_lock(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.lock_path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _pid_alive(pid):
                    raise RunError(f"run {self.path} is in use by process {pid}; wait for it to finish or stop it first") from None
                if pid == os.getpid():
                    return
                self.lock_path.unlink(missing_ok=True)  # stale lock from a process that died
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return

    def lock_owner(self) -> int | None:
        """pid of the live process writing this run, or None."""
        try:
            pid = int(self.lock_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return None
        return pid if pid and _pid_alive(pid) else None

    def release_lock(self) -> None:
        try:
            if int(self.lock_path.read_text().strip() or 0) == os.getpid():
                self.lock_path.unlink()
        except (OSError, ValueError):
            pass

    # contents
    def load_config(self) -> Config:
        if not self.config_path.is_file():
            raise RunError(f"{self.path} is not a run folder (no {CONFIG_FILE}); pass a folder made by `hybridctl train`")
        return load_config_file(self.config_path)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        return rows

    def truncate_metrics(self, last_step: int) -> None:
        """Drop records after a checkpoint's step, so a resumed run's log has no stale future."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= last_step]
        tmp = self.metrics_path.with_name(f".{METRICS_FILE}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.metrics_path)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.summary_path, summary)

    def read_summary(self) -> dict[str, Any]:
        if not self.summary_path.is_file():
            return {}
        try:
            return json.loads(self.summary_path.read_text())
        except json.JSONDecodeError:
            return {}

    # checkpoints
    def step_checkpoints(self) -> list[Path]:
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.iterdir() if p.name.startswith("step_") and ckpt.is_complete(p)]
        return sorted(found, key=lambda p: p.name)

    def resolve_checkpoint(self, which: str = "latest") -> Path:
        """'latest', 'best', 'step_000200' (or just 200) -> a complete checkpoint folder."""
        if which == "best":
            if ckpt.is_complete(self.best_dir):
                return self.best_dir
            raise RunError(f"run {self.path} has no best checkpoint yet (none is saved before the first eval); use --from latest")
        steps = self.step_checkpoints()
        if which == "latest":
            if not steps:
                raise RunError(f"run {self.path} has no complete checkpoint to resume from; start it again with `hybridctl train --force`")
            return steps[-1]
        name = which if which.startswith("step_") else (ckpt.step_dir_name(int(which)) if which.isdigit() else which)
        for p in steps:
            if p.name == name:
                return p
        have = ", ".join(p.name for p in steps) or "none"
        raise RunError(f"run {self.path} has no checkpoint '{which}'; available: {have}, best, latest")

    def prune_checkpoints(self, keep: int) -> None:
        if keep <= 0:
            return
        for p in self.step_checkpoints()[:-keep]:
            shutil.rmtree(p, ignore_errors=True)

    def remove_partial_checkpoints(self) -> None:
        """Delete leftovers of checkpoint writes that were killed mid-way (the run lock is held)."""
        for folder in (self.checkpoints_dir, self.path):
            if folder.is_dir():
                for p in folder.iterdir():
                    if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name) and p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def find_runs(root: Path) -> Iterator[RunDir]:
    """Every run folder at or below root, in name order."""
    root = Path(root)
    if is_run_dir(root):
        yield RunDir(root)
        return
    if not root.is_dir():
        return
    for config in sorted(root.rglob(CONFIG_FILE)):
        if not any(part.startswith(".") for part in config.relative_to(root).parts):
            yield RunDir(config.parent)
