"""Corpora: each yields documents (strings) in a fixed order, split into train and val by document.

`builtin:stdlib` is the Python standard library's own source and `builtin:python` adds every installed package's
source (hundreds of MB on a typical machine): both work offline anywhere. Hub names and local files (.txt, .jsonl,
.parquet, globs) go through `datasets` (sources.py); `synthetic:mqar` is generated (synthetic.py).
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
import zlib
from pathlib import Path
from typing import Iterator

from hybridctl.core.config import DataConfig
from hybridctl.core.errors import DataError


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
    from hybridctl.core.data import sources  # hub names and local files, through `datasets`

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
        from hybridctl.core.data import sources

        key["files"] = sources.fingerprint(spec)
        if data_cfg.val_split and sources.is_local(spec):
            key["val_files"] = sources.fingerprint(data_cfg.val_split, key="data.val_split")
    return key


def check_val_split(data_cfg: DataConfig) -> None:
    """A data.val_split must name documents that training never sees."""
    if not data_cfg.val_split:
        return
    if data_cfg.dataset.startswith("builtin:"):
        raise DataError(f"data.val_split is for hub and local datasets; '{data_cfg.dataset}' takes its validation documents "
                        "from data.val_fraction, so unset data.val_split")
    from hybridctl.core.data import sources

    sources.check_val_split(data_cfg)
