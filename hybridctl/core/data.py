"""Training data: corpora -> tokens -> an on-disk cache -> deterministic batches.

The trainer needs only `load_token_data(data_cfg)` (train and val token arrays plus the tokenizer) and
`BatchSampler`, whose batch for step s depends only on (seed, s): resuming at step s therefore continues with
exactly the batches an uninterrupted run would have seen.

Built-in corpora work offline on any machine: `builtin:stdlib` is the Python standard library's own source,
`builtin:python` adds every installed package's source (tens of millions of tokens).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from hybridctl.core.config import DataConfig
from hybridctl.core.errors import DataError


def cache_root(data_cfg: DataConfig | None = None) -> Path:
    if data_cfg is not None and data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    return Path(os.environ.get("HYBRIDCTL_CACHE", "~/.cache/hybridctl")).expanduser()


# ---------------------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes; id 256 is end-of-document."""

    name = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def get_tokenizer(spec: str, data_cfg: DataConfig | None = None, texts: Iterator[str] | None = None) -> Tokenizer:
    if spec == "bytes":
        return ByteTokenizer()
    from hybridctl.core import tokenizers as hf_tokenizers  # real tokenizers live with the `tokenizers` code

    return hf_tokenizers.load_tokenizer(spec, data_cfg, texts)


# ---------------------------------------------------------------------------------------------------------
# Corpora: each yields documents (strings) in a fixed order.


def python_source_files(include_site_packages: bool) -> list[Path]:
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"])]
    if include_site_packages:
        roots += sorted({Path(paths["purelib"]), Path(paths["platlib"])})
    files: list[Path] = []
    for root in roots:
        for p in sorted(root.rglob("*.py")):
            rel = p.relative_to(root).parts
            if not include_site_packages and rel and rel[0] in ("site-packages", "dist-packages"):
                continue
            files.append(p)
    return files


def builtin_documents(name: str) -> Iterator[str]:
    if name not in BUILTIN_CORPORA:
        raise DataError(f"unknown built-in corpus 'builtin:{name}'; choose one of: {', '.join('builtin:' + n for n in BUILTIN_CORPORA)}")
    for path in python_source_files(include_site_packages=(name == "python")):
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test fixtures are deliberately not UTF-8


BUILTIN_CORPORA = {
    "stdlib": "Python standard library source (offline, ~10M tokens)",
    "python": "standard library plus every installed package's source (offline, tens of millions of tokens)",
}


def is_val_document(index: int, val_fraction: float) -> bool:
    """Deterministic train/val split by document, so no document straddles the two."""
    if val_fraction <= 0:
        return False
    return (zlib.crc32(str(index).encode()) % 10_000) < val_fraction * 10_000


def iter_documents(data_cfg: DataConfig) -> Iterator[str]:
    spec = data_cfg.dataset
    if spec.startswith("builtin:"):
        yield from builtin_documents(spec.split(":", 1)[1])
        return
    from hybridctl.core import sources  # hub names and local files, through `datasets`

    yield from sources.iter_documents(data_cfg)


# ---------------------------------------------------------------------------------------------------------
# Tokenised cache


@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    info: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def cache_key(data_cfg: DataConfig) -> str:
    key = {
        "dataset": data_cfg.dataset, "config": data_cfg.config, "split": data_cfg.split,
        "val_split": data_cfg.val_split, "text_field": data_cfg.text_field,
        "val_fraction": data_cfg.val_fraction, "max_tokens": data_cfg.max_tokens,
        "tokenizer": data_cfg.tokenizer, "format": 1,
    }
    if data_cfg.dataset.startswith("builtin:"):
        key["python"] = sys.version.split()[0]  # the corpus is this interpreter's own source
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _tokenize_documents(docs: Iterator[str], tokenizer: Tokenizer, data_cfg: DataConfig):
    """Documents joined with EOS; split into train and val by document; train capped at max_tokens."""
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    parts = {"train": [], "val": []}
    counts = {"train": 0, "val": 0, "documents": 0}
    limit = data_cfg.max_tokens
    val_limit = max(1, int(limit * data_cfg.val_fraction / max(1e-9, 1 - data_cfg.val_fraction))) if limit else 0
    encode_array = getattr(tokenizer, "encode_array", None)
    for i, text in enumerate(docs):
        if not text:
            continue
        split = "val" if is_val_document(i, data_cfg.val_fraction) else "train"
        cap = val_limit if split == "val" else limit
        if cap and counts[split] >= cap:
            if counts["train"] >= limit and (counts["val"] >= val_limit or data_cfg.val_fraction == 0):
                break
            continue
        ids = encode_array(text) if encode_array else np.asarray(tokenizer.encode(text), dtype=dtype)
        parts[split] += [ids.astype(dtype, copy=False), eos]
        counts[split] += len(ids) + 1
        counts["documents"] += 1
    train = np.concatenate(parts["train"]) if parts["train"] else np.zeros(0, dtype)
    val = np.concatenate(parts["val"]) if parts["val"] else np.zeros(0, dtype)
    if limit:
        train = train[:limit]
    return train, val, counts["documents"]


def _write_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(array.tobytes())


def load_token_data(data_cfg: DataConfig, rebuild: bool = False) -> TokenData:
    """Tokenise the configured corpus once and memory-map the cached tokens afterwards."""
    root = cache_root(data_cfg) / "tokens" / cache_key(data_cfg)
    meta_path = root / "meta.json"
    if meta_path.is_file() and not rebuild:
        meta = json.loads(meta_path.read_text())
        tokenizer = get_tokenizer(data_cfg.tokenizer, data_cfg)
        dtype = np.dtype(meta["dtype"])
        train = np.memmap(root / "train.bin", dtype=dtype, mode="r")
        val = np.memmap(root / "val.bin", dtype=dtype, mode="r") if meta["val_tokens"] else np.zeros(0, dtype)
        return TokenData(train, val, tokenizer, {**meta, "cache": str(root), "cached": True})
    start = time.perf_counter()
    tokenizer = get_tokenizer(data_cfg.tokenizer, data_cfg, texts=iter_documents(data_cfg))
    train, val, n_docs = _tokenize_documents(iter_documents(data_cfg), tokenizer, data_cfg)
    if data_cfg.val_split:
        from hybridctl.core import sources

        val_docs = sources.iter_documents(data_cfg, split=data_cfg.val_split)
        val_cfg = DataConfig(**{**data_cfg.__dict__, "val_fraction": 0.0})
        val, _, _ = _tokenize_documents(val_docs, tokenizer, val_cfg)
    if len(train) == 0:
        raise DataError(f"dataset '{data_cfg.dataset}' produced no training tokens; check the path, split and text_field")
    meta = {
        "dataset": data_cfg.dataset, "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
        "documents": n_docs, "train_tokens": int(len(train)), "val_tokens": int(len(val)),
        "dtype": str(train.dtype), "seconds": round(time.perf_counter() - start, 3),
    }
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
    try:
        _write_array(tmp / "train.bin", train)
        _write_array(tmp / "val.bin", val)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenData(train, val, tokenizer, {**meta, "cache": str(root), "cached": False})


# ---------------------------------------------------------------------------------------------------------
# Batches


class BatchSampler:
    """Non-overlapping windows of seq_len + 1 tokens, shuffled per epoch by (seed, epoch).

    The batch for step s is a pure function of (seed, s), so the data position in a checkpoint is its step.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(
                f"the corpus has {len(tokens)} tokens, too few for one sequence of train.seq_len={seq_len}; "
                "lower train.seq_len or use more data"
            )
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def window_indices(self, step: int) -> np.ndarray:
        out = np.empty(self.batch_size, dtype=np.int64)
        for b in range(self.batch_size):
            sample = step * self.batch_size + b
            epoch, pos = divmod(sample, self.n_windows)
            out[b] = self._permutation(epoch)[pos]
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.n_windows

    def batch(self, step: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return windows_to_batch(self.tokens, self.window_indices(step), self.seq_len, device)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int) -> list[np.ndarray]:
    """A fixed set of validation windows spread evenly over the val tokens (same for every eval and run)."""
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        return []
    total = min(n_windows, batch_size * n_batches)
    picks = np.linspace(0, n_windows - 1, total).round().astype(np.int64)
    return [picks[i : i + batch_size] for i in range(0, total, batch_size)]


def windows_to_batch(tokens: np.ndarray, windows: np.ndarray, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for the given window indices."""
    starts = windows * seq_len
    data = torch.from_numpy(np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]], dtype=np.int64))
    if torch.device(device).type == "cuda":
        data = data.pin_memory().to(device, non_blocking=True)
    return data[:, :-1], data[:, 1:]
