"""Small file-system helpers shared by the wings."""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any


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


def cannot_make(folder: Path) -> str | None:
    """Why `folder` cannot be made (or written in, where it exists), as "cannot create folder X (reason)" naming
    the first folder to be made; None where it can. Found by making a folder in the nearest existing one and
    removing it at once: /proc, a read-only disk or a folder without write permission refuse it, so the error
    names the folder before a later check (free space) speaks of it."""
    folder = Path(folder)
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"cannot create folder {folder}: {blocker} is a file"
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    nearest = folder.parents[len(missing) - 1] if missing else folder
    try:
        make_temp_dir(nearest, ".write-test-").rmdir()
    except OSError as e:
        why = e.strerror or str(e)
        return f"cannot create folder {missing[-1]} ({why})" if missing else f"cannot write to folder {folder} ({why})"
    return None


def write_text_atomic(path: Path, text: str) -> None:
    """A crash leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def finite_or_null(record: dict[str, Any]) -> dict[str, Any]:
    """The record with each float that is not finite (a diverged run's loss) as None: JSON has no NaN, and jq and
    other strict readers refuse the bare NaN that json.dumps writes."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in record.items()}


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
