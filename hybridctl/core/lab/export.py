"""`hybridctl export`: a trained run as a folder that transformers + flash-linear-attention load as it is
(fla's GatedDeltaNetForCausalLM), and such a folder read back into hybridctl's model.

    OUT/config.json              fla's GatedDeltaNetConfig (hf_export.hf_config), with a "hybridctl" block
    OUT/model.safetensors        fla's tensor names and layouts (hf_export.to_hf_tensors), fp32
    OUT/tokenizer.json, tokenizer_config.json, special_tokens_map.json   (hf_tokenizer.py)
    OUT/generation_config.json

The folder is written into a temporary sibling and renamed into place; --force replaces only an earlier export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hybridctl.core.errors import CheckpointError, ConfigError, RunError
from hybridctl.core.files import cannot_make, move_into_place
from hybridctl.core.lab.hf_export import check_exportable, from_hf_tensors, hf_config, model_config_from_hf, to_hf_tensors
from hybridctl.core.lab.trained_model import check_finite, locate_checkpoint
from hybridctl.core.training import checkpoint as ckpt

FORMATS = ("hf",)
CONFIG_FILE, WEIGHTS_FILE, GENERATION_FILE = "config.json", "model.safetensors", "generation_config.json"
EXPORT_FILES = {CONFIG_FILE, WEIGHTS_FILE, GENERATION_FILE, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


def read_export_config(folder: Path) -> dict[str, Any] | None:
    """config.json of a folder written by `hybridctl export`, or None when it is not one."""
    try:
        config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) and isinstance(config.get("hybridctl"), dict) else None


def is_export_dir(folder: Path) -> bool:
    folder = Path(folder)
    return (folder.is_dir() and read_export_config(folder) is not None
            and {p.name for p in folder.iterdir()} <= EXPORT_FILES)


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse, before any work, an --out that is a file, or an existing folder (without --force, or with --force
    when it holds anything but an earlier export: --force must not wipe a run or other files)."""
    out = Path(out)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise RunError(f"--out {out}: {blocker} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not is_export_dir(out):
            raise RunError(f"--out {out} already exists and is not an export folder; choose a new folder "
                           "(--force replaces only an earlier export)")
        if not force:
            raise RunError(f"--out {out} already holds an export; pass --force to replace it or choose another folder")
    why = cannot_make(out)
    if why:
        raise RunError(f"--out: {why}; choose another folder")


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"--format '{fmt}' is unknown; choose one of: {', '.join(FORMATS)}")




def export_run(target: Path, out: Path, force: bool = False, which: str | None = None, fmt: str = "hf") -> dict[str, Any]:
    """Export the run's checkpoint (best/ by default, like `bench arc`) to `out`; returns what was written."""
    from hybridctl.core.lab.hf_tokenizer import tokenizer_files
    from hybridctl.core.model.hybrid_lm import build_model, padded_vocab

    check_format(fmt)
    check_out_dir(out, force)
    run, checkpoint = locate_checkpoint(Path(target), which)
    cfg = run.load_config()
    if cfg.model.vocab_size <= 0:
        raise RunError(f"{run.config_path} has no model.vocab_size (the run never started training); train it first")
    check_exportable(cfg.model)
    tokenizer, eos_id = tokenizer_files(cfg)
    model = build_model(cfg.model)
    state = ckpt.load_checkpoint(checkpoint, model)
    check_finite(model, run, checkpoint, cfg.train.seq_len)  # a diverged run's weights would load, and say nothing
    step = int(state.get("step", 0))
    source = {"run": run.name, "checkpoint": Path(checkpoint).name, "step": step,
              "tokenizer": "mqar" if cfg.data.dataset.startswith("synthetic:") else cfg.data.tokenizer}
    config = hf_config(cfg.model, cfg.train.seq_len, eos_id, source)
    tensors = to_hf_tensors(ckpt.model_tensors(model), cfg.model)
    generation = {"_from_model_config": False, "eos_token_id": eos_id, "pad_token_id": eos_id}
    files = {CONFIG_FILE: json.dumps(config, indent=2) + "\n", GENERATION_FILE: json.dumps(generation, indent=2) + "\n", **tokenizer}
    write_folder(Path(out), files, tensors)
    return {
        "out": str(out), "run": run.name, "checkpoint": Path(checkpoint).name, "step": step,
        "layers": "".join(cfg.model.layer_types()), "vocab_size": cfg.model.vocab_size,
        "dropped_rows": padded_vocab(cfg.model.vocab_size) - cfg.model.vocab_size,
        "tensors": len(tensors), "params": sum(t.numel() for t in tensors.values()),
        "tied": cfg.model.tie_embeddings, "tokenizer": source["tokenizer"], "files": sorted([*files, WEIGHTS_FILE]),
    }


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_folder(out: Path, files: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # "format": "pt" is what transformers requires of a safetensors file's metadata
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        for name, text in files.items():
            (tmp / name).write_text(text)
        mask = current_umask()  # mkdtemp makes the folder private; the export is as readable as any new folder
        tmp.chmod(0o777 & ~mask)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~mask)
        move_into_place(tmp, out)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RunError(f"cannot write the export to {out}: {reason}; free some space or choose another --out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_export(folder: Path):
    """An exported folder back into hybridctl: (HybridLM with its weights, config.json as a dict). The padding
    rows of the embedding (see hf_export) come back as zeros."""
    from hybridctl.core.model.hybrid_lm import build_model

    folder = Path(folder)
    config = read_export_config(folder)
    if config is None:
        raise RunError(f"{folder} is not a folder written by `hybridctl export` (no {CONFIG_FILE} with a hybridctl block)")
    cfg = model_config_from_hf(config)
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {folder / WEIGHTS_FILE} ({e}); export the run again") from None
    state = from_hf_tensors(tensors, cfg)
    model = build_model(cfg)
    for name in ("embed.weight", "lm_head.weight"):
        if name in state:
            full = torch.zeros(model.embed.num_embeddings, cfg.d_model, dtype=state[name].dtype)
            full[: cfg.vocab_size] = state[name]
            state[name] = full
    ckpt.load_model_weights(model, state, source=f"export {folder}")
    return model.eval(), config
