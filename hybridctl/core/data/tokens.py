"""What the data wing hands on: the token arrays of a corpus (TokenData), and where token caches live.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hybridctl.core.config import DataConfig
from hybridctl.core.data.tokenizer import Tokenizer
from hybridctl.core.errors import DataError


def cache_root(data_cfg: DataConfig | None = None) -> Path:
    if data_cfg is not None and data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    return Path(os.environ.get("HYBRIDCTL_CACHE", "~/.cache/hybridctl")).expanduser()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


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


def write_error(error: OSError, folder: Path, what: str = "token cache") -> DataError:
    """The one-line error for a cache that cannot be written (disk full, file too large, no permission)."""
    reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
    if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        fix = "free some space, or set HYBRIDCTL_CACHE or data.cache_dir to a folder on a disk with room"
    else:
        fix = "set HYBRIDCTL_CACHE or data.cache_dir to a folder you can write to"
    return DataError(f"cannot write {what} {folder}: {reason}; {fix}")
