"""Synthetic tasks with their own vocabulary: `synthetic:mqar`, multi-query associative recall.

Each example shows N key-value pairs, then asks for every key again, in a random order, followed by its value:

    k1 v1  k2 v2  ...  kN vN   k3 v3  k1 v1  ...  (all N keys)        4N tokens per example

A value in the second half can only be predicted by recalling the pair shown earlier in the same example, so the
accuracy on exactly those positions (`val_mqar_acc`) measures associative recall; every other position is random.
Keys are ids 1..K and values K+1..V-1 (K = (V-1) // 2); id 0 is the end-of-document id and never appears. Keys
are distinct within an example, values are not. The tokens are a pure function of the options, whatever
train.seed is (it only sets the order of the examples, as for any corpus):

    dataset = "synthetic:mqar"                            pairs=16, vocab=8192, seed=0
    dataset = "synthetic:mqar:pairs=32,vocab=4096,seed=1"

Size: data.max_tokens training tokens (2M when 0), and val_fraction / (1 - val_fraction) of that for validation.
An example must fit in train.seq_len tokens (check_seq_len).
"""

from __future__ import annotations

import time

import numpy as np

from hybridctl.core.config import DataConfig
from hybridctl.core.data.tokens import TokenData, token_dtype
from hybridctl.core.errors import DataError

TASKS = {"mqar": "multi-query associative recall: key-value pairs, then every key again with its value (offline)"}
MQAR_DEFAULTS = {"pairs": 16, "vocab": 8192, "seed": 0}
DEFAULT_TOKENS = 2_000_000
MIN_VAL_EXAMPLES = 64


class MQARTokenizer:
    """The task's ids are its tokens: text is the ids written as numbers."""

    name = "mqar"
    eos_id = 0

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def parse_spec(spec: str) -> tuple[str, dict[str, int]]:
    """'synthetic:mqar:pairs=16,vocab=512' -> ('mqar', {'pairs': 16, 'vocab': 512, 'seed': 0})."""
    _, _, rest = spec.partition(":")
    task, _, options = rest.partition(":")
    if task not in TASKS:
        raise DataError(f"unknown synthetic task '{spec}'; choose one of: {', '.join('synthetic:' + t for t in TASKS)}")
    values = dict(MQAR_DEFAULTS)
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in values or not value.strip().isdigit():
            raise DataError(f"bad option '{item}' in '{spec}'; options are {', '.join(f'{k}=N' for k in MQAR_DEFAULTS)}, e.g. synthetic:mqar:pairs=16")
        values[key] = int(value)
    n_keys = (values["vocab"] - 1) // 2
    if values["pairs"] < 1 or values["pairs"] > n_keys:
        raise DataError(f"'{spec}': pairs must be in 1..{n_keys} (half the vocabulary, keys are distinct); lower pairs or raise vocab")
    return task, values


def mqar_examples(rng: np.random.Generator, n: int, pairs: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """n examples of 4 * pairs tokens, and for each token its distance back to its example's first token when it
    is an answer (a value in the query half), else 0."""
    n_keys = (vocab - 1) // 2
    keys = np.stack([rng.choice(n_keys, pairs, replace=False) for _ in range(n)]) + 1 if n else np.zeros((0, pairs), np.int64)
    values = rng.integers(n_keys + 1, vocab, size=(n, pairs))
    order = rng.permuted(np.tile(np.arange(pairs), (n, 1)), axis=1)
    tokens = np.empty((n, 4 * pairs), dtype=np.int64)
    tokens[:, 0 : 2 * pairs : 2], tokens[:, 1 : 2 * pairs : 2] = keys, values
    tokens[:, 2 * pairs :: 2] = np.take_along_axis(keys, order, axis=1)
    tokens[:, 2 * pairs + 1 :: 2] = np.take_along_axis(values, order, axis=1)
    distance = np.zeros((n, 4 * pairs), dtype=np.int32)
    distance[:, 2 * pairs + 1 :: 2] = np.arange(2 * pairs + 1, 4 * pairs, 2)
    return tokens.reshape(-1), distance.reshape(-1)


def check_seq_len(data_cfg: DataConfig, seq_len: int) -> None:
    """An answer is scored only when its example starts inside the evaluated window, so examples longer than the
    window leave few or no answers to score, and val_mqar_acc would read 0.0 with nothing measured."""
    _, opts = parse_spec(data_cfg.dataset)
    length = 4 * opts["pairs"]
    if length > seq_len:
        fewer = f"use pairs={seq_len // 4} or fewer, or " if seq_len >= 4 else ""
        raise DataError(f"'{data_cfg.dataset}' makes examples of {length} tokens (4 x pairs), longer than "
                        f"train.seq_len={seq_len}, so val_mqar_acc could score few or none of their answers; "
                        f"{fewer}set train.seq_len={length} or more")


def load(data_cfg: DataConfig):
    start = time.perf_counter()
    task, opts = parse_spec(data_cfg.dataset)
    pairs, vocab, seed = opts["pairs"], opts["vocab"], opts["seed"]
    length = 4 * pairs
    n_train = max(1, (data_cfg.max_tokens or DEFAULT_TOKENS) // length)
    vf = data_cfg.val_fraction
    n_val = max(MIN_VAL_EXAMPLES, round(n_train * vf / (1 - vf))) if vf > 0 else MIN_VAL_EXAMPLES
    dtype = token_dtype(vocab)
    train, _ = mqar_examples(np.random.default_rng([seed, 0]), n_train, pairs, vocab)
    val, val_answers = mqar_examples(np.random.default_rng([seed, 1]), n_val, pairs, vocab)
    info = {
        "dataset": data_cfg.dataset, "tokenizer": "mqar", "vocab_size": vocab, "eos_id": MQARTokenizer.eos_id,
        "train_documents": n_train, "val_documents": n_val, "train_tokens": int(len(train)), "val_tokens": int(len(val)),
        "dtype": np.dtype(dtype).name, "pairs": pairs, "seed": seed, "example_tokens": length,
        "answer_metric": "val_mqar_acc", "seconds": round(time.perf_counter() - start, 3), "cached": False, "generated": True,
    }
    return TokenData(train.astype(dtype), val.astype(dtype), MQARTokenizer(vocab), info, val_answers=val_answers)
