"""Corpora -> tokens -> an on-disk cache, memory-mapped by every later run.

Documents are joined with an end-of-document token and split into train and val by document. The tokens are
written once to cache_root()/tokens/<key>/ (train.bin, val.bin as uint16/uint32, meta.json, and the tokenizer's
tokenizer.json) and memory-mapped from there by every later run, so no run tokenises twice. The trainer needs only
`load_token_data(data_cfg)` (train and val token arrays plus the tokenizer) and batches.py.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from hybridctl.core.config import DataConfig
from hybridctl.core.data.corpora import carves_val, check_val_split, corpus_key, is_val_document, iter_documents, training_documents
from hybridctl.core.data.tokenizer import ByteTokenizer, Tokenizer, get_tokenizer
from hybridctl.core.data.tokens import TokenData, cache_root, token_dtype, write_error
from hybridctl.core.files import make_temp_dir
from hybridctl.core.errors import DataError


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
                from hybridctl.core.data import sources

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


def open_token_cache(folder: Path, data_cfg: DataConfig) -> TokenData:
    meta = json.loads((folder / "meta.json").read_text())
    if data_cfg.tokenizer == "bytes":
        tokenizer = ByteTokenizer()
    else:
        from hybridctl.core.data import subword

        tokenizer = subword.from_file(folder / "tokenizer.json", data_cfg.tokenizer)
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(folder / "val.bin", dtype=dtype, mode="r") if meta["val_tokens"] else np.zeros(0, dtype)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return TokenData(train, val, tokenizer, {**meta, "cache": str(folder), "cache_bytes": size})


def hub_names(data_cfg: DataConfig) -> dict[str, str]:
    """The Hugging Face hub names that loading this data would fetch, by key (data.dataset, data.tokenizer): none
    once its tokens are cached here, and none for built-in, synthetic and local corpora with bytes, bpe:N or local
    tokenizers."""
    from hybridctl.core.data.sources import is_local
    from hybridctl.core.data.subword import is_local_path

    if data_cfg.dataset.startswith("synthetic:") or cache_is_complete(token_cache_dir(data_cfg)):
        return {}
    names = {}
    if not data_cfg.dataset.startswith("builtin:") and not is_local(data_cfg.dataset):
        names["data.dataset"] = data_cfg.dataset
    tokenizer = data_cfg.tokenizer
    if tokenizer != "bytes" and not tokenizer.startswith("bpe:") and not is_local_path(tokenizer):
        names["data.tokenizer"] = tokenizer
    return names


def load_token_data(data_cfg: DataConfig, rebuild: bool = False, progress: Callable[[int], None] | None = None) -> TokenData:
    """Tokenise the configured corpus once and memory-map the cached tokens afterwards.

    `progress(tokens_so_far)` is called while a fresh cache is built; `rebuild` rebuilds it even if present.
    """
    if data_cfg.dataset.startswith("synthetic:"):
        from hybridctl.core.data import synthetic

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
        tmp = make_temp_dir(root.parent, prefix=f".{root.name}.tmp-")
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
