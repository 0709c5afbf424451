"""Checkpoints: safetensors for tensors, JSON for everything else; never pickle.

This module writes and loads them (torch); checkpoint_files.py reads and checks the files without torch.

Layout of one checkpoint folder:
    model.safetensors      weights by parameter name (a tied output head is stored once)
    optimizer.safetensors  AdamW moments and step counts, keyed "<param name>/<state key>"
    state.json             step, RNG states, schedule, data position, the run's config and its hash, and a
                           manifest of the two tensor files (bytes and sha256) that loading verifies

A checkpoint is written into a temporary sibling folder and renamed into place, so a crash mid-write leaves
the previous checkpoints untouched and no half-written folder under a checkpoint's name.

Writing is two parts, so the training loop can leave the second to a thread (checkpoint_writer.py): take_snapshot
copies the tensors to host memory, write_snapshot writes, hashes, fsyncs and renames them. save_checkpoint does
both at once.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from shutil import copyfile
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hybridctl.core.presets import config_diff
from hybridctl.core.files import make_temp_dir, move_into_place
from hybridctl.core.errors import CheckpointError
from hybridctl.core.training.checkpoint_files import FORMAT_VERSION, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, _fsync_dir, sha256_file, verify_checkpoint


def model_tensors(model: torch.nn.Module, on_host: bool = True) -> dict[str, torch.Tensor]:
    """State dict with shared tensors (tied embeddings) stored once, under their first name; with on_host=False
    the tensors stay where they are (for take_snapshot to copy)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu() if on_host else tensor.detach()
    return out


def optimizer_tensors(optimizer: torch.optim.Optimizer, param_names: dict[int, str], on_host: bool = True) -> dict[str, torch.Tensor]:
    out = {}
    for param, state in optimizer.state.items():
        name = param_names[id(param)]
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"{name}/{key}"] = value.detach().contiguous().cpu() if on_host else value.detach()
            else:
                out[f"{name}/{key}"] = torch.tensor(value)
    return out


@dataclass
class Snapshot:
    """A model's (and its optimizer's) tensors as of one moment, in host memory the training no longer changes."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor] | None
    # Where a write of this snapshot already stands, with its manifest: a second destination copies those files.
    written: tuple[Path, dict[str, Any]] | None = None


def _copy_into(sources: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy each tensor into host memory, reusing a buffer of the same shape and dtype from an earlier snapshot
    (a fresh 1.5 GB allocation costs more in page faults than the copy). CUDA copies go to pinned memory without
    waiting; take_snapshot synchronises once after all of them."""
    out = {}
    for name, source in sources.items():
        buffer = buffers.get(name)
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
            buffer = torch.empty(source.shape, dtype=source.dtype, pin_memory=source.is_cuda)
        buffer.copy_(source, non_blocking=source.is_cuda)
        out[name] = buffer
    return out


def take_snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, reuse: Snapshot | None = None) -> Snapshot:
    """Copies of the model's and the optimizer's tensors, into `reuse`'s buffers where they fit (`reuse` must no
    longer be written from)."""
    reuse = reuse or Snapshot({}, {})
    sources = model_tensors(model, on_host=False)
    model_copy = _copy_into(sources, reuse.model)
    optimizer_copy = None
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        optimizer_copy = _copy_into(optimizer_tensors(optimizer, names, on_host=False), reuse.optimizer or {})
    if any(t.is_cuda for t in sources.values()):
        torch.cuda.synchronize()  # the non-blocking copies have landed before anyone reads the buffers
    return Snapshot(model_copy, optimizer_copy)


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_names: dict[int, str]) -> None:
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("/")
        by_name.setdefault(name, {})[field] = value
    # Through load_state_dict, so torch puts each state tensor where this optimizer (fused or not) wants it.
    current = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, param in enumerate(params):
        found = by_name.pop(param_names[id(param)], None)
        if found is not None:
            state[index] = found
    if by_name:
        raise CheckpointError(f"optimizer state has tensors for unknown parameter '{next(iter(by_name))}'; the checkpoint belongs to another model")
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def rng_state() -> dict[str, str]:
    enc = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    state = {"torch": enc(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = enc(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, str]) -> None:
    dec = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(dec(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(dec(state["cuda"]))


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> Path:
    """Write a complete checkpoint at `path` atomically (replacing one already there)."""
    names = {id(p): n for n, p in model.named_parameters()}
    snapshot = Snapshot(model_tensors(model), optimizer_tensors(optimizer, names) if optimizer is not None else None)
    write_snapshot(path, snapshot, {**state, "rng": rng_state()})
    return Path(path)


def write_snapshot(path: Path, snapshot: Snapshot, state: dict[str, Any]) -> dict[str, Any]:
    """Write `snapshot` as a complete checkpoint at `path` atomically (replacing one already there), with `state`
    (RNG states included) as state.json; returns the manifest. Safe to run in a thread other than the training's:
    it reads nothing but its arguments."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path.parent, prefix=f".{path.name}.tmp-")
    try:
        if snapshot.written is not None and snapshot.written[0].is_dir():
            manifest = _copy_files(snapshot.written, tmp)
        else:
            manifest = _write_files(snapshot, tmp)
        full_state = {"format_version": FORMAT_VERSION, **state, "files": manifest}
        (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=2))
        for name in [*manifest, STATE_FILE]:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        move_into_place(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, SafetensorError) as e:  # disk full, folder gone: the tensor writer reports these too
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split("I/O error: ")[-1]
        raise CheckpointError(f"cannot write checkpoint {path}: {reason}; earlier checkpoints are intact") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    snapshot.written = (path, manifest)
    return manifest


def _write_files(snapshot: Snapshot, folder: Path) -> dict[str, Any]:
    save_file(snapshot.model, str(folder / MODEL_FILE), metadata={"format": "hybridctl", "version": str(FORMAT_VERSION)})
    files = [MODEL_FILE]
    if snapshot.optimizer is not None:
        save_file(snapshot.optimizer, str(folder / OPTIMIZER_FILE), metadata={"format": "hybridctl"})
        files.append(OPTIMIZER_FILE)
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)} for name in files}


def _copy_files(written: tuple[Path, dict[str, Any]], folder: Path) -> dict[str, Any]:
    """The tensor files of a checkpoint written from the same snapshot, copied byte for byte (in the kernel):
    no serialising and no hashing again; their manifest holds, which the size check confirms."""
    source, manifest = written
    for name, entry in manifest.items():
        copyfile(source / name, folder / name)
        if (folder / name).stat().st_size != entry["bytes"]:
            raise OSError(f"copy of {source / name} is {(folder / name).stat().st_size} bytes, expected {entry['bytes']}")
    return manifest


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} as safetensors ({e}); the file is corrupt or not a checkpoint") from None


def load_model_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy weights into the model; a name or shape mismatch raises CheckpointError naming the first one."""
    expected = model_tensors(model)
    for name, value in tensors.items():
        if name not in expected:
            raise CheckpointError(f"{source} has tensor '{name}' that this model does not have; the checkpoint was made for another config")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source} tensor '{name}' has shape {tuple(value.shape)} but this model expects {tuple(expected[name].shape)}; "
                "the checkpoint was made for another config"
            )
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"{source} lacks tensor '{missing[0]}' that this model needs; the checkpoint was made for another config")
    model.load_state_dict(tensors, strict=False)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Verify, then load weights (and optimizer state); returns state.json's content."""
    path = Path(path)
    state = verify_checkpoint(path)
    try:
        load_model_weights(model, read_tensors(path / MODEL_FILE), source=f"checkpoint {path}")
    except CheckpointError as e:
        # Name what differs between the checkpoint's config and this model's, not only the first tensor.
        saved, current = state.get("config", {}).get("model"), getattr(model, "cfg", None)
        differences = config_diff(saved, current, "model") if saved and current is not None else []
        if differences:
            raise CheckpointError(f"{e} ({', '.join(differences[:4])}, checkpoint vs this config)") from None
        raise
    if optimizer is not None:
        if not (path / OPTIMIZER_FILE).is_file():
            raise CheckpointError(f"checkpoint {path} has no optimizer state; it can be evaluated but not resumed")
        names = {id(p): n for n, p in model.named_parameters()}
        load_optimizer_tensors(optimizer, read_tensors(path / OPTIMIZER_FILE), names)
    return state


def estimated_bytes(model: torch.nn.Module) -> int:
    """Disk size of one checkpoint with optimizer state, about: the weights plus AdamW's two moments."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters())
