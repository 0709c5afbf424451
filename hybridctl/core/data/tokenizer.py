"""The tokenizer interface, the byte tokenizer, and `get_tokenizer` for every `data.tokenizer` spelling.

`bytes` is here; hub names, tokenizer.json files and `bpe:N` go to subword.py, which alone imports `tokenizers`.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import numpy as np

from hybridctl.core.config import DataConfig


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
    from hybridctl.core.data import subword  # `tokenizers` is imported only for subword tokenizers

    return subword.load_tokenizer(spec, data_cfg, texts)
