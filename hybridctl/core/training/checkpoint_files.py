"""A checkpoint folder's files read and checked without loading a tensor (no torch): names of step folders, state.json,
the manifest's sizes and hashes. What `compare`, `report` and run folders need; checkpoint.py writes and loads.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from hybridctl.core.errors import CheckpointError


MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
FORMAT_VERSION = 1


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of_dir(path: Path) -> int:
    """The step a step_NNNNNN folder is named for (step_dir_name's inverse), without reading its state."""
    return int(Path(path).name.removeprefix("step_"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_state(path: Path) -> dict[str, Any]:
    state_path = Path(path) / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a checkpoint (no {STATE_FILE}); pick one listed under the run's checkpoints/") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{state_path} is corrupt (not valid JSON); resume from an earlier checkpoint with --from (and --force)") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{state_path} was not written by hybridctl (no step number); resume from another checkpoint with --from (and --force)")
    return state


def safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a .safetensors file, or None when the file does not start with a readable one."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= min(100_000_000, Path(path).stat().st_size - 8):
                return None
            header = json.loads(f.read(size))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return header if isinstance(header, dict) else None


def damage(f: Path, expected: dict[str, Any]) -> str | None:
    """Why a manifest file fails its check, in words; None when it passes."""
    size = f.stat().st_size
    if size == expected["bytes"] and sha256_file(f) == expected["sha256"]:
        return None
    header = safetensors_header(f) if f.suffix == ".safetensors" else {}
    if header is None:
        return "is corrupt (not readable as safetensors)"
    metadata = header.get("__metadata__")
    if f.suffix == ".safetensors" and not (isinstance(metadata, dict) and metadata.get("format") == "hybridctl"):
        names = ", ".join(k for k in header if k != "__metadata__")
        return f"was not written by hybridctl (it holds tensors {names[:80] or 'none'})"
    if size != expected["bytes"]:
        return f"is truncated or altered ({size} bytes, expected {expected['bytes']})"
    return "is corrupt (checksum mismatch)"


def verify_checkpoint(path: Path, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check the manifest (sizes, then hashes); raise CheckpointError naming the damaged file."""
    state = read_state(path) if state is None else state
    for name, expected in state.get("files", {}).items():
        f = Path(path) / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}; resume from an earlier checkpoint with --from (and --force)")
        problem = damage(f, expected)
        if problem:
            raise CheckpointError(f"checkpoint file {f} {problem}; resume from an earlier checkpoint with --from (and --force)")
    return state


def is_complete(path: Path) -> bool:
    return (Path(path) / STATE_FILE).is_file() and not Path(path).name.startswith(".")
