"""Small file-system helpers shared by the wings."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in `parent` made with the process's umask, like every other folder of a run
    or cache (tempfile.mkdtemp makes 0700 folders, which a checkpoint or cache entry would keep once renamed)."""
    parent = Path(parent)
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary folder name in {parent}")  # 100 random names taken: not expected


def move_into_place(finished: Path, dest: Path) -> None:
    """Rename the complete folder `finished` to `dest`, replacing a folder already there: that one is renamed aside
    first and removed after, so `dest` never names a half-written folder."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(finished, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(finished, dest)
