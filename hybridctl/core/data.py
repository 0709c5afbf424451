"""Training data: corpora -> tokens -> an on-disk cache -> deterministic batches.

The trainer needs only `load_token_data(data_cfg)` (train and val token arrays plus the tokenizer) and
`BatchSampler`, whose batch for step s depends only on (seed, s): resuming at step s therefore continues with
exactly the batches an uninterrupted run would have seen.

Corpora (`data.dataset`): `builtin:stdlib` is the Python standard library's own source and `builtin:python` adds
every installed package's source (hundreds of MB on a typical machine): both work offline anywhere. Hub names and
local files (.txt, .jsonl, .parquet, globs) go through `datasets` (sources.py); `synthetic:mqar` is generated
(synthetic.py). Tokenizers (`data.tokenizer`): `bytes` here, everything else in tokenization.py.

Documents are joined with an end-of-document token and split into train and val by document. The tokens are
written once to cache_root()/tokens/<key>/ (train.bin, val.bin as uint16/uint32, meta.json, and the tokenizer's
tokenizer.json) and memory-mapped from there by every later run, so no run tokenises twice.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
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
from typing import Callable, Iterable, Iterator, Protocol

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

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def get_tokenizer(spec: str, data_cfg: DataConfig | None = None, texts: Iterable[str] | None = None) -> Tokenizer:
    """`texts` (the training documents) is read only by a `bpe:N` tokenizer that is not cached yet."""
    if spec == "bytes":
        return ByteTokenizer()
    from hybridctl.core import tokenization  # `tokenizers` is imported only for subword tokenizers

    return tokenization.load_tokenizer(spec, data_cfg, texts)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


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
    "python": "standard library plus every installed package's source (offline; hundreds of MB on most machines)",
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


def carves_val(data_cfg: DataConfig) -> bool:
    """Validation comes out of the training documents unless data.val_split names its own documents."""
    return not data_cfg.val_split and data_cfg.val_fraction > 0


def training_documents(data_cfg: DataConfig) -> Iterator[str]:
    """The documents that go to the training split, in order (what a `bpe:N` tokenizer learns from)."""
    carve = carves_val(data_cfg)
    for i, text in enumerate(iter_documents(data_cfg)):
        if text and not (carve and is_val_document(i, data_cfg.val_fraction)):
            yield text


# ---------------------------------------------------------------------------------------------------------
# Tokenised cache


@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    info: dict = field(default_factory=dict)
    # Synthetic tasks: for each val token that is an answer, its distance back to the first token of its example
    # (0 elsewhere); evaluation scores those positions apart (info["answer_metric"]).
    val_answers: np.ndarray | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def corpus_key(data_cfg: DataConfig) -> dict:
    """What determines the documents and their train/val assignment (local files by path, size and mtime)."""
    key = {
        "dataset": data_cfg.dataset, "config": data_cfg.config, "split": data_cfg.split, "val_split": data_cfg.val_split,
        "text_field": data_cfg.text_field, "val_fraction": data_cfg.val_fraction,
    }
    spec = data_cfg.dataset
    if spec.startswith("builtin:"):
        key["python"] = sys.version.split()[0]  # the corpus is this interpreter's own source
        if spec == "builtin:python":
            from importlib.metadata import distributions

            installed = sorted(f"{d.metadata['Name']}=={d.version}" for d in distributions())
            key["packages"] = hashlib.sha256("\n".join(installed).encode()).hexdigest()
    elif not spec.startswith("synthetic:"):
        from hybridctl.core import sources

        key["files"] = sources.fingerprint(spec)
        if data_cfg.val_split and sources.is_local(spec):
            key["val_files"] = sources.fingerprint(data_cfg.val_split, key="data.val_split")
    return key


def cache_key(data_cfg: DataConfig) -> str:
    key = {"corpus": corpus_key(data_cfg), "max_tokens": data_cfg.max_tokens, "tokenizer": data_cfg.tokenizer, "format": 2}
    tokenizer_file = Path(data_cfg.tokenizer).expanduser()
    if data_cfg.tokenizer.endswith(".json") and tokenizer_file.is_file():
        key["tokenizer_file"] = [tokenizer_file.stat().st_size, tokenizer_file.stat().st_mtime_ns]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def token_cache_dir(data_cfg: DataConfig) -> Path:
    return cache_root(data_cfg) / "tokens" / cache_key(data_cfg)


class SplitWriter:
    """Appends documents (each followed by EOS) to a split's .bin file, up to `cap` tokens (0 = no cap)."""

    def __init__(self, path: Path, cap: int, dtype: np.dtype):
        self.file, self.cap, self.dtype = open(path, "wb"), cap, dtype
        self.tokens = self.documents = 0

    def full(self) -> bool:
        return self.cap > 0 and self.tokens >= self.cap

    def add(self, ids: np.ndarray, eos_id: int) -> None:
        if self.full():
            return
        doc = np.empty(len(ids) + 1, dtype=self.dtype)
        doc[:-1], doc[-1] = ids, eos_id
        if self.cap:
            doc = doc[: self.cap - self.tokens]  # the last document is cut at the cap
        self.file.write(doc.tobytes())
        self.tokens += len(doc)
        self.documents += 1


FLUSH_CHARS = 1 << 20  # documents are encoded in batches of about this much text


def pack_documents(docs: Iterable[str], tokenizer: Tokenizer, writers: dict[str, SplitWriter],
                   split_of: Callable[[int], str], progress: Callable[[int], None] | None = None) -> None:
    """Encode documents in batches and append each to writers[split_of(index)]; stop once every split is full."""
    encode_batch = getattr(tokenizer, "encode_batch", None) or (lambda texts: [np.asarray(tokenizer.encode(t)) for t in texts])
    batch: list[tuple[SplitWriter, str]] = []
    chars = 0

    def flush():
        for (writer, _), ids in zip(batch, encode_batch([text for _, text in batch])):
            writer.add(ids, tokenizer.eos_id)
        batch.clear()
        if progress:
            progress(sum(w.tokens for w in writers.values()))

    for i, text in enumerate(docs):
        if not text:
            continue
        writer = writers[split_of(i)]
        if writer.full():
            if all(w.full() for w in writers.values()):
                break
            continue
        batch.append((writer, text))
        chars += len(text)
        if chars >= FLUSH_CHARS:
            flush()
            chars = 0
    flush()


def val_cap(data_cfg: DataConfig) -> int:
    """max_tokens caps the training tokens; validation gets val_fraction of the total (no cap without max_tokens)."""
    limit, vf = data_cfg.max_tokens, data_cfg.val_fraction
    return max(1, int(limit * vf / (1 - vf))) if limit and vf > 0 else 0


def build_token_cache(data_cfg: DataConfig, folder: Path, progress: Callable[[int], None] | None = None) -> dict:
    """Tokenise the corpus into folder/{train,val}.bin (+ tokenizer.json); returns the metadata."""
    start = time.perf_counter()
    docs = iter_documents(data_cfg)
    first = next(docs, None)  # open the corpus first: a missing dataset is reported before a missing tokenizer
    docs = itertools.chain([] if first is None else [first], docs)
    tokenizer = get_tokenizer(data_cfg.tokenizer, data_cfg, texts=training_documents(data_cfg))
    dtype = token_dtype(tokenizer.vocab_size)
    train = SplitWriter(folder / "train.bin", data_cfg.max_tokens, dtype)
    val = SplitWriter(folder / "val.bin", val_cap(data_cfg), dtype)

    def carved_split(index: int) -> str:
        return "val" if is_val_document(index, data_cfg.val_fraction) else "train"

    with train.file, val.file:
        if carves_val(data_cfg):
            pack_documents(docs, tokenizer, {"train": train, "val": val}, carved_split, progress)
        else:
            pack_documents(docs, tokenizer, {"train": train}, lambda i: "train", progress)
            if data_cfg.val_split:
                from hybridctl.core import sources

                val_docs = sources.iter_documents(data_cfg, split=data_cfg.val_split)
                pack_documents(val_docs, tokenizer, {"val": val}, lambda i: "val", progress)
    if train.tokens == 0:
        raise DataError(f"dataset '{data_cfg.dataset}' produced no training tokens; check the path, split and text_field")
    if hasattr(tokenizer, "save"):
        tokenizer.save(folder / "tokenizer.json")
    return {
        "dataset": data_cfg.dataset, "config": data_cfg.config, "split": data_cfg.split, "val_split": data_cfg.val_split,
        "tokenizer": data_cfg.tokenizer, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
        "train_documents": train.documents, "val_documents": val.documents,
        "train_tokens": train.tokens, "val_tokens": val.tokens, "dtype": dtype.name,
        "seconds": round(time.perf_counter() - start, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def check_val_split(data_cfg: DataConfig) -> None:
    """A data.val_split must name documents that training never sees."""
    if not data_cfg.val_split:
        return
    if data_cfg.dataset.startswith("builtin:"):
        raise DataError(f"data.val_split is for hub and local datasets; '{data_cfg.dataset}' takes its validation documents "
                        "from data.val_fraction, so unset data.val_split")
    from hybridctl.core import sources

    sources.check_val_split(data_cfg)


def cache_is_complete(folder: Path) -> bool:
    """meta.json is written last, and the .bin files must hold the tokens it counts (a copy cut short does not)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        sizes = [(folder / f"{split}.bin").stat().st_size for split in ("train", "val")]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if meta.get("tokenizer") != "bytes" and not (folder / "tokenizer.json").is_file():
        return False
    return sizes == [meta["train_tokens"] * itemsize, meta["val_tokens"] * itemsize]


def write_error(error: OSError, folder: Path, what: str = "token cache") -> DataError:
    """The one-line error for a cache that cannot be written (disk full, file too large, no permission)."""
    reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
    if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        fix = "free some space, or set HYBRIDCTL_CACHE or data.cache_dir to a folder on a disk with room"
    else:
        fix = "set HYBRIDCTL_CACHE or data.cache_dir to a folder you can write to"
    return DataError(f"cannot write {what} {folder}: {reason}; {fix}")


def open_token_cache(folder: Path, data_cfg: DataConfig) -> TokenData:
    meta = json.loads((folder / "meta.json").read_text())
    if data_cfg.tokenizer == "bytes":
        tokenizer = ByteTokenizer()
    else:
        from hybridctl.core import tokenization

        tokenizer = tokenization.from_file(folder / "tokenizer.json", data_cfg.tokenizer)
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(folder / "val.bin", dtype=dtype, mode="r") if meta["val_tokens"] else np.zeros(0, dtype)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return TokenData(train, val, tokenizer, {**meta, "cache": str(folder), "cache_bytes": size})


def load_token_data(data_cfg: DataConfig, rebuild: bool = False, progress: Callable[[int], None] | None = None) -> TokenData:
    """Tokenise the configured corpus once and memory-map the cached tokens afterwards.

    `progress(tokens_so_far)` is called while a fresh cache is built; `rebuild` rebuilds it even if present.
    """
    if data_cfg.dataset.startswith("synthetic:"):
        from hybridctl.core import synthetic

        return synthetic.load(data_cfg)  # generated in well under a second: nothing to cache
    check_val_split(data_cfg)
    start = time.perf_counter()
    root = token_cache_dir(data_cfg)
    if not rebuild and cache_is_complete(root):
        data = open_token_cache(root, data_cfg)
        data.info.update(cached=True, seconds=round(time.perf_counter() - start, 3))
        return data
    if not rebuild and root.exists():  # said, since tokenising a large corpus again takes a while
        print(f"note: the token cache {root} is incomplete (a copy cut short, or a file missing); tokenising again",
              file=sys.stderr)
    tmp = None
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        meta = build_token_cache(data_cfg, tmp, progress)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if root.exists() and (rebuild or not cache_is_complete(root)):
            shutil.rmtree(root)  # the old cache, or one left incomplete or cut short
        try:
            os.replace(tmp, root)
        except OSError:
            if not cache_is_complete(root):
                raise
            shutil.rmtree(tmp)  # another process finished the same cache first; its tokens are the same
    except OSError as e:  # the half-written folder is hidden and removed below, so no later run reads it
        raise write_error(e, root) from None
    finally:
        if tmp is not None and tmp.exists() and tmp != root:
            shutil.rmtree(tmp, ignore_errors=True)
    data = open_token_cache(root, data_cfg)  # memory-mapped like every later run, so both see the same arrays
    data.info.update(cached=False, seconds=round(time.perf_counter() - start, 3))
    return data


def cached_token_sets(data_cfg: DataConfig | None = None) -> list[dict]:
    """meta.json of every token cache under cache_root(), newest first, with whether the cache is complete (one
    cut short or missing a file is tokenised again at its next use)."""
    found = []
    for meta_path in (cache_root(data_cfg) / "tokens").glob("*/meta.json"):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        size = sum(p.stat().st_size for p in meta_path.parent.iterdir() if p.is_file())
        found.append({**meta, "cache": str(meta_path.parent), "cache_bytes": size,
                      "complete": cache_is_complete(meta_path.parent)})
    return sorted(found, key=lambda m: m.get("created", ""), reverse=True)


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
