"""Subword tokenizers from the `tokenizers` library behind tokenizer.py's Tokenizer interface.

    tokenizer = "HuggingFaceTB/SmolLM-135M"   a hub tokenizer (the repo's tokenizer.json)
    tokenizer = "path/to/tokenizer.json"      a local file, or a folder that holds one
    tokenizer = "bpe:8192"                    byte-level BPE trained on the training documents, cached

End of document is the tokenizer's own end-of-text special token; a tokenizer without one gets "<|endoftext|>"
added (one more id).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from hybridctl.core.data import hub
from hybridctl.core.config import DataConfig
from hybridctl.core.errors import DataError
from hybridctl.core.data.corpora import corpus_key, training_documents
from hybridctl.core.data.sources import is_hub_name
from hybridctl.core.data.tokens import cache_root, write_error

EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")
ADDED_EOS = "<|endoftext|>"
BPE_TRAIN_CHARS = 50_000_000  # text a `bpe:N` tokenizer learns from (the first training documents up to this)
BPE_MIN_VOCAB = 260  # 256 bytes + end-of-text + a few merges
FIX_HINT = "set data.tokenizer to a local tokenizer.json, bpe:8192 (trained on the corpus) or bytes"


class HFTokenizer:
    """A `tokenizers.Tokenizer` with an end-of-document id; encodes without adding BOS/EOS templates."""

    def __init__(self, tokenizer, name: str):
        self.tokenizer, self.name = tokenizer, name
        specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        eos = next((t for t in EOS_TOKENS if t in specials), None)
        if eos is None:
            tokenizer.add_special_tokens([ADDED_EOS])
            eos = ADDED_EOS
        self.eos_id = tokenizer.token_to_id(eos)
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        # "<|endoftext|>" written inside a document (e.g. in source code) is text, not a document boundary
        tokenizer.encode_special_tokens = True
        tokenizer.no_padding()
        tokenizer.no_truncation()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Many documents at once, in parallel threads inside `tokenizers`."""
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [np.asarray(e.ids, dtype=np.int64) for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: Path) -> None:
        self.tokenizer.save(str(path))


def from_file(path: Path, name: str) -> HFTokenizer:
    from tokenizers import Tokenizer

    try:
        return HFTokenizer(Tokenizer.from_file(str(path)), name)
    except Exception as e:  # not JSON, or not a tokenizers file
        raise DataError(f"cannot read tokenizer file {path}: {hub.one_line(e)}; give a tokenizer.json saved by the `tokenizers` library") from None


def from_hub(name: str) -> HFTokenizer:
    reason = hub.offline_reason()
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(name, "tokenizer.json")
    except Exception as e:
        if reason and isinstance(e, OSError):
            raise DataError(f"cannot load tokenizer '{name}' from the Hugging Face hub: {reason} and it is not in the "
                            f"local cache; download it once where the hub is reachable, or {FIX_HINT}") from None
        raise DataError(f"cannot load tokenizer '{name}' from the Hugging Face hub ({hub.one_line(e, 120)}); "
                        f"check the name (a repo with a tokenizer.json), or {FIX_HINT}") from None
    return from_file(Path(path), name)


def train_bpe(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation, every byte in the alphabet, so nothing is ever unknown)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[ADDED_EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def first_chars(texts: Iterable[str], limit: int) -> Iterator[str]:
    """Whole texts until `limit` characters have been given (the last one may cross it)."""
    total = 0
    for text in texts:
        if total >= limit:
            return
        total += len(text)
        yield text


def bpe_path(data_cfg: DataConfig, vocab_size: int) -> Path:
    """Cached next to the token cache, keyed by the corpus (as corpora.corpus_key sees it) and the settings."""
    key = {"corpus": corpus_key(data_cfg), "vocab_size": vocab_size, "chars": BPE_TRAIN_CHARS, "format": 1}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root(data_cfg) / "tokenizers" / f"bpe{vocab_size}-{digest}" / "tokenizer.json"


def as_os_error(error: Exception) -> OSError:
    """`tokenizers` reports a failed write (a full disk) as a plain Exception that ends "(os error N)"."""
    if isinstance(error, OSError):
        return error
    code = re.search(r"\(os error (\d+)\)", str(error))
    if code is None:
        raise error
    return OSError(int(code[1]), os.strerror(int(code[1])))


def bpe_tokenizer(spec: str, data_cfg: DataConfig, texts: Iterable[str] | None) -> HFTokenizer:
    size = spec.split(":", 1)[1]
    if not size.isdigit() or int(size) < BPE_MIN_VOCAB:
        raise DataError(f"data.tokenizer '{spec}': give the vocabulary size as bpe:N with N >= {BPE_MIN_VOCAB}, e.g. bpe:8192")
    vocab_size = int(size)
    path = bpe_path(data_cfg, vocab_size)
    if not path.is_file():
        texts = training_documents(data_cfg) if texts is None else texts
        tokenizer = train_bpe(first_chars(texts, BPE_TRAIN_CHARS), vocab_size)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tokenizer.save(str(tmp))
            os.replace(tmp, path)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            raise write_error(as_os_error(e), path.parent, "tokenizer cache") from None
    return from_file(path, spec)  # the saved file, so a fresh and a cached tokenizer are the same object


def is_local_path(spec: str) -> bool:
    """A tokenizer.json or a folder holding one; a hub name is `owner/name` (sources.is_hub_name), so `nofolder/`
    is a missing folder, not a model to fetch."""
    return (spec.endswith(".json") or spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists()
            or not is_hub_name(spec))


def load_tokenizer(spec: str, data_cfg: DataConfig | None = None, texts: Iterable[str] | None = None) -> HFTokenizer:
    if spec.startswith("bpe:"):
        if data_cfg is None:
            raise ValueError("a bpe:N tokenizer needs the data config of the corpus it is trained on")
        return bpe_tokenizer(spec, data_cfg, texts)
    if is_local_path(spec):
        path = Path(spec).expanduser()
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise DataError(f"data.tokenizer '{spec}': no such file; give a tokenizer.json path, a hub name, bpe:8192 or bytes")
        return from_file(path, spec)
    return from_hub(spec)
