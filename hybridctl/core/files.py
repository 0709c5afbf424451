"""Small file-system helpers shared by the wings."""

from __future__ import annotations

import secrets
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
