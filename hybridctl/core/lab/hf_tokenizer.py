"""The run's tokenizer as the files transformers reads (tokenizer.json, tokenizer_config.json,
special_tokens_map.json), encoding text to the ids the model was trained on.

- `bytes`: byte-level BPE with no merges, so each UTF-8 byte b is id b, and end-of-document "<|endoftext|>" is
  id 256 (GPT-2's byte-to-character alphabet, no splitting before it).
- a subword tokenizer (hub name, tokenizer.json, bpe:N): the `tokenizers` object the run used, with its
  post-processor removed, because hybridctl encodes without BOS/EOS templates.
- `synthetic:mqar`: a word-level vocabulary of the numbers 1..V-1 (text is ids written as numbers), id 0 being
  "<|endoftext|>".

One difference stays: hybridctl reads "<|endoftext|>" inside a text as plain text, and tokenizer.json cannot
record that choice, so transformers reads it as the end-of-document id. No BOS is declared: lm-evaluation-harness
then starts an empty context with the end-of-document id, the token that precedes every document in training.
"""

from __future__ import annotations

import json
from typing import Any

from hybridctl.core.config import Config
from hybridctl.core.data.tokenizer import ByteTokenizer

EOS_TEXT = "<|endoftext|>"


def byte_chars() -> list[str]:
    """GPT-2's printable stand-in character for each byte (tokenizers' ByteLevel pre-tokenizer uses the same)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    spare = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(spare)) for b in range(256)]


def bytes_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(byte_chars())}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOS_TEXT, special=True)])
    return tokenizer


def mqar_tokenizer(vocab_size: int):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {EOS_TEXT: 0, **{str(i): i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))  # not in the vocabulary: refused
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(EOS_TEXT, special=True)])
    return tokenizer


def run_tokenizer(cfg: Config) -> tuple[Any, int]:
    """(a `tokenizers.Tokenizer` that encodes as the run did, end-of-document id)."""
    if cfg.data.dataset.startswith("synthetic:"):
        from hybridctl.core.data import synthetic

        _, options = synthetic.parse_spec(cfg.data.dataset)
        return mqar_tokenizer(options["vocab"]), synthetic.MQARTokenizer.eos_id
    if cfg.data.tokenizer == "bytes":
        return bytes_tokenizer(), ByteTokenizer.eos_id
    from hybridctl.core.data.subword import load_tokenizer

    loaded = load_tokenizer(cfg.data.tokenizer, cfg.data)
    return loaded.tokenizer, loaded.eos_id


def tokenizer_files(cfg: Config) -> tuple[dict[str, str], int]:
    """{file name: text} for the export folder, and the end-of-document id."""
    tokenizer, eos_id = run_tokenizer(cfg)
    data = json.loads(tokenizer.to_str())
    data["post_processor"] = None  # hybridctl adds no BOS/EOS when it encodes
    data["padding"] = data["truncation"] = None
    eos = tokenizer.id_to_token(eos_id)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "model_max_length": cfg.train.seq_len,
        "clean_up_tokenization_spaces": False,
    }
    files = {
        "tokenizer.json": json.dumps(data, ensure_ascii=False),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps({"eos_token": eos}, indent=2, ensure_ascii=False) + "\n",
    }
    return files, eos_id
