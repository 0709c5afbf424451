"""Run folders: everything a run writes, and everything `resume`, `compare`, `report` and `bench` read back.

    runs/<name>/config.toml     the resolved config
    runs/<name>/metrics.jsonl   one JSON object per logged step or eval
    runs/<name>/summary.json    final and best values, throughput, wall time, params
    runs/<name>/run.lock        pid of the process writing the run, locked with flock while it runs (so a
                                crashed owner's lock is free again at once)
    runs/<name>/checkpoints/step_NNNNNN/   and   runs/<name>/best/
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from hybridctl.core.training import checkpoint_files
from hybridctl.core.config import Config, config_to_toml, load_config_file
from hybridctl.core.errors import CheckpointError, RunError
from hybridctl.core.files import cannot_make, finite_or_null, write_json_atomic, write_text_atomic

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOCK_FILE = "run.lock"
SWEEP_FILE = "sweep.json"  # a sweep folder's plan and status (lab/sweeps.py)
SWEEP_LOCK = "sweep.lock"


# Locks this process holds, by run folder: {real path: open file descriptor of its run.lock}. flock belongs to the
# open file, so several RunDir objects for one folder in one process share the entry instead of locking each other out.
_held_locks: dict[str, int] = {}


def _flock_briefly(fd: int, tries: int = 5, wait_s: float = 0.02) -> None:
    """The exclusive lock, tried for about 0.1 s: lock_owner() holds a shared lock for a moment while compare or
    report looks at a run, and that must not refuse a process that starts the run just then."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError:
            if attempt == tries - 1:
                raise
            time.sleep(wait_s)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except OSError:
        return False


def ensure_new_file(path: Path, force: bool) -> None:
    """Refuse, before any work, an output target that is a folder, a run's or sweep's own file, or (without force)
    any existing file."""
    path = Path(path)
    if path.is_dir():
        raise RunError(f"{path} is a folder; give a file path")
    # --force replaces earlier output, never the files a run or sweep is read and resumed from
    if ((path.name in (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, LOCK_FILE) and is_run_dir(path.parent))
            or (path.name in (SWEEP_FILE, SWEEP_LOCK) and (path.parent / SWEEP_FILE).is_file())):
        raise RunError(f"{path} is one of the files of {path.parent}; choose another file")
    if path.exists() and not force:
        raise RunError(f"{path} already exists; pass --force to replace it or choose another file")
    why = cannot_make(path.parent)
    if why:
        raise RunError(f"{why}; choose another file than {path}")


def check_run_name(name: str, what: str = "run name") -> None:
    """A run's (or sweep's) name is one folder under --out: a path in it could point --force at any folder on the
    disk, and a leading dot would hide the run from compare and report."""
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise RunError(f"{what} '{name}' must be a plain folder name (no '/', not starting with '.'); choose the parent folder with --out")


def check_name_option(name: str | None, default: str) -> None:
    """An empty --name is refused rather than read as "not given": the run or sweep would take `default` silently."""
    if name is not None and not name.strip():
        raise RunError(f"--name is empty; give a name, or leave --name out to use {default}")


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

    def disk_bytes(self) -> int:
        """What the folder's files take (0 when there is none)."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file()) if self.path.is_dir() else 0

    # creation and locking
    def is_unstarted(self) -> bool:
        """True for a run folder that holds nothing but its config (and lock): training never reached step 1."""
        if not self.path.is_dir():
            return False
        names = {p.name for p in self.path.iterdir() if not p.name.startswith(".")}
        return names <= {CONFIG_FILE, LOCK_FILE}

    def check_creatable(self, force: bool = False) -> None:
        """Raise the RunError that create() would for what is already there, changing nothing (`train --gpus`
        checks this before it starts its processes)."""
        blocker = next((p for p in (self.path, *self.path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise RunError(f"cannot create run folder {self.path}: {blocker} is a file, not a folder; choose another --out or --name")
        if self.path.is_dir() and any(self.path.iterdir()) and not self.is_unstarted():
            if not self.exists():  # a sweep, a folder of runs, anything else: --force replaces runs only
                raise RunError(f"{self.path} already exists and is not a run folder (no {CONFIG_FILE}); pick another --name or --out")
            if not force and not self.step_checkpoints():  # stopped before its first save: nothing to resume
                raise RunError(f"run folder {self.path} already exists but has no checkpoint to resume from; pass --force to start it again, or pick another --name")
            if not force:
                raise RunError(f"run folder {self.path} already exists; pick another --name, resume it with `hybridctl resume {self.path}`, or pass --force to replace it")
        if (problem := cannot_make(self.path)) is not None:  # /proc, a read-only disk: before the free space is looked at
            raise RunError(f"{problem}; choose another --out folder")

    def create(self, cfg: Config, force: bool = False) -> None:
        """Make a fresh run folder; an existing run is kept unless force.

        A folder left by a run that failed before its first step (only config.toml) is reused, so fixing the
        cause and running the same command again works without --force."""
        try:
            self.check_creatable(force)
            if self.path.is_dir() and any(self.path.iterdir()):
                self.acquire_lock()  # refuse to touch a run another process is writing
                if self.exists() and not self.is_unstarted():  # a run, and check_creatable let force replace it
                    shutil.rmtree(self.path)
            probe = self.path / f".write-test-{os.getpid()}"
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                probe.write_bytes(b"x" * 4096)
            finally:
                probe.unlink(missing_ok=True)
            self.acquire_lock()
            self.write_config(cfg)
        except OSError as e:
            self.release_lock()
            _remove_if_empty(self.path)
            reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise RunError(f"cannot write to {self.path}: {reason}; free some space or choose another --out folder") from None

    def write_config(self, cfg: Config) -> None:
        write_text_atomic(self.config_path, config_to_toml(cfg))

    def discard_if_unstarted(self) -> None:
        """Remove what a run that failed before its first step wrote, so a retry starts clean."""
        if self.is_unstarted():
            self.config_path.unlink(missing_ok=True)
            self.release_lock()
            _remove_if_empty(self.path)

    def acquire_lock(self) -> None:
        """Lock the run for this process; another live process holding it raises RunError naming its pid.

        The lock is an flock on run.lock, which the kernel drops when its owner exits, however it exits: a lock
        left by a killed process is free, so it is taken over without guessing from pids (which get reused)."""
        self.path.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        held = _held_locks.get(key)
        if held is not None:
            if _same_file(held, self.lock_path):
                return
            os.close(_held_locks.pop(key))  # the folder was wiped (--force) since: lock it afresh
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _flock_briefly(fd)
            except OSError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunError(f"run {self.path} is in use by process {owner}; wait for it to finish or stop it first") from None
            if not _same_file(fd, self.lock_path):  # the owner removed run.lock just as we opened it: retry
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            _held_locks[key] = fd
            return

    def lock_owner(self) -> int | None:
        """pid of the live process writing this run, or None. The flock on run.lock is held exactly while its
        owner lives, so a file left by a killed process does not count; -1 for an owner that has taken the lock
        but not yet written its pid."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:  # held
                text = os.read(fd, 32).decode(errors="replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release_lock(self) -> None:
        fd = _held_locks.pop(os.path.realpath(self.path), None)
        if fd is None:
            return
        if _same_file(fd, self.lock_path):
            self.lock_path.unlink(missing_ok=True)
        os.close(fd)

    # contents
    def load_config(self) -> Config:
        if not self.config_path.is_file():
            raise RunError(f"{self.path} is not a run folder (no {CONFIG_FILE}); pass a folder made by `hybridctl train`")
        return load_config_file(self.config_path)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(finite_or_null(record)) + "\n")

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
        write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.summary_path, summary)

    def reopen_summary(self) -> None:
        """A resumed run is not finished until it finishes again: its summary stops counting as complete or
        diverged (compare and report then read the metrics), and keeps the totals the next summary adds to."""
        summary = self.read_summary()
        if summary.get("status") in ("complete", "diverged"):
            self.write_summary({**summary, "status": "resumed"})

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
        found = [p for p in self.checkpoints_dir.iterdir() if p.name.startswith("step_") and checkpoint_files.is_complete(p)]
        return sorted(found, key=lambda p: p.name)

    def resolve_checkpoint(self, which: str = "latest", on_skip: Callable[[Path, str], None] | None = None) -> Path:
        """'latest', 'best', 'step_000200' (or step_200, or just 200) -> a complete checkpoint folder.

        'latest' is the newest step checkpoint that passes verification; each newer one that fails is reported
        to on_skip(path, reason) and passed over, so one damaged file does not cost the run."""
        if which == "best":
            if checkpoint_files.is_complete(self.best_dir):
                return self.best_dir
            raise RunError(f"run {self.path} has no best checkpoint yet (none is saved before the first eval); use --from latest")
        steps = self.step_checkpoints()
        if which == "latest":
            if not steps:
                raise RunError(f"run {self.path} has no complete checkpoint to resume from; start it again with `hybridctl train --force`")
            damaged = []
            for path in reversed(steps):
                try:
                    checkpoint_files.verify_checkpoint(path)
                except CheckpointError as e:
                    damaged.append((path, str(e)))
                    continue
                for bad, reason in damaged if on_skip else ():
                    on_skip(bad, reason)
                return path
            raise RunError(f"run {self.path} has no intact checkpoint ({', '.join(p.name for p in steps)} are damaged); start it again with `hybridctl train --force`")
        digits = which.removeprefix("step_")
        name = checkpoint_files.step_dir_name(int(digits)) if digits.isascii() and digits.isdigit() else which
        for p in steps:
            if p.name == name:
                return p
        have = ", ".join(p.name for p in steps) or "none"
        raise RunError(f"run {self.path} has no checkpoint '{which}'; available: {have}, best, latest (a step may be given as step_000200, step_200 or 200)")

    def checkpoints_after(self, step: int) -> list[Path]:
        """The step checkpoints, and best/, saved after `step`: what resuming from `step` abandons."""
        later = [p for p in self.step_checkpoints() if checkpoint_files.step_of_dir(p) > step]
        try:
            if checkpoint_files.is_complete(self.best_dir) and checkpoint_files.read_state(self.best_dir)["step"] > step:
                later.append(self.best_dir)
        except CheckpointError:
            pass  # a damaged best/ names no step; the next eval that improves replaces it
        return later

    def drop_checkpoints_after(self, step: int) -> None:
        """Resuming from `step` starts the run's history again there: a later checkpoint left behind would be
        picked by the next plain resume, and a later best/ would stand for a model the run no longer leads to."""
        for p in self.checkpoints_after(step):
            _remove_checkpoint(p)

    def prune_checkpoints(self, keep: int) -> None:
        if keep <= 0:
            return
        for p in self.step_checkpoints()[:-keep]:
            _remove_checkpoint(p)

    def remove_partial_checkpoints(self) -> None:
        """Clean up after checkpoint writes and deletes that were killed mid-way (the run lock is held).

        A replaced checkpoint is moved to `.NAME.old-PID` just before the new one is renamed into place; if the
        process died between the two renames, the old one is the only copy and is put back."""
        for folder in (self.checkpoints_dir, self.path):
            if not folder.is_dir():
                continue
            for p in sorted(folder.iterdir()):
                if p.name.startswith(".") and ".tmp-" in p.name and p.is_file():
                    p.unlink()  # an atomic write of config.toml, summary.json or metrics.jsonl cut short
                if not (p.name.startswith(".") and p.is_dir()):
                    continue
                if ".old-" in p.name:
                    target = folder / p.name[1:].split(".old-")[0]
                    if not target.exists() and _intact(p):
                        os.replace(p, target)
                        continue
                if any(tag in p.name for tag in (".tmp-", ".old-", ".del-")):
                    shutil.rmtree(p, ignore_errors=True)


def _remove_checkpoint(path: Path) -> None:
    # Renamed away first, so a crash mid-delete never leaves a half-deleted folder under a checkpoint's name.
    trash = path.with_name(f".{path.name}.del-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _intact(path: Path) -> bool:
    try:
        checkpoint_files.verify_checkpoint(path)
        return True
    except CheckpointError:
        return False


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
