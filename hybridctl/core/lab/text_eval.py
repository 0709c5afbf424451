"""Loss, perplexity and next-token accuracy of a trained run on any text the data layer reads.

The text (a local file, folder or glob; a hub dataset; a built-in corpus) is read as documents exactly as
training reads them (sources.py: a .txt file is one document per paragraph), each document is encoded with the
run's tokenizer and followed by its end-of-document token, and the documents are joined into one stream.

The stream is cut into windows like training's (batches.py): window k holds tokens k*T .. k*T + T, with T the
run's train.seq_len; the model reads its first T tokens and predicts its last T, so every token after the first
is predicted once, with between 0 and T - 1 tokens of context from its own window. The tail that does not fill a
whole window (fewer than T tokens) is not scored and is reported as `tail_tokens`: every scored token then has the
context a validation token has in training, and a text eval of the run's own validation tokens is its val_loss.

    loss   mean cross-entropy in nats per token, as training computes it (over the model's whole output layer)
    ppl    exp(loss)
    acc    fraction of tokens whose most likely next token (over the real vocabulary) is the right one

Results go to RUN/eval/<name>.json; `compare` shows them as extra columns.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from hybridctl.core.config import Config, DataConfig
from hybridctl.core.data.tokenizer import Tokenizer, get_tokenizer
from hybridctl.core.errors import ConfigError, DataError, RunError
from hybridctl.core.lab.speed import device_name
from hybridctl.core.lab.trained_model import load_trained_model, locate_checkpoint, write_json
from hybridctl.core.model.hybrid_lm import HybridLM
from hybridctl.core.training.runs import RunDir, ensure_new_file
from hybridctl.core.training.steps import autocast_for, micro_batch_size, resolve_device

EVAL_DIR = "eval"
HEAD_CHUNK = 8192  # tokens per output-layer call: the logits of a whole batch over a large vocabulary need not fit
Progress = Callable[[int, int], None]  # (windows done, windows in all)


def eval_result_path(run: RunDir, name: str) -> Path:
    return run.path / EVAL_DIR / f"{name}.json"


def default_name(spec: str, config: str = "", split: str = "") -> str:
    """A file name for the results of `spec`: wikitext-2/test.txt -> wikitext-2-test, a hub name with its
    config and split -> owner-name-config-split, data/*.txt -> data."""
    path = Path(spec.rstrip("/")).expanduser()
    from hybridctl.core.data import sources

    if spec.startswith(("builtin:", "synthetic:")):
        parts = [spec]
    elif sources.is_local(spec):
        parts = [path.parent.name, path.stem if path.suffix else path.name]
    else:
        parts = [spec, config, split]
    name = re.sub(r"[^A-Za-z0-9._]+", "-", "-".join(p for p in parts if p)).strip("-.")
    return name or "text"


def check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise ConfigError(f"--name '{name}' must be a plain file name (no '/', not starting with '.')")


def check_source(spec: str) -> None:
    """Refuse a --data that names no text (a generated task, an unknown built-in corpus, a path that matches no
    file) before anything else is checked: a missing input is the first thing to hear about. A hub name is only
    asked for when it is read."""
    from hybridctl.core.data import sources
    from hybridctl.core.data.corpora import BUILTIN_CORPORA

    if spec.startswith("synthetic:"):
        raise ConfigError(f"--data '{spec}' is a generated task, not text; give a text file, a glob or a hub dataset")
    if spec.startswith("builtin:"):
        if spec.split(":", 1)[1] not in BUILTIN_CORPORA:
            raise ConfigError(f"--data '{spec}' is not a built-in corpus; choose one of: {', '.join('builtin:' + n for n in BUILTIN_CORPORA)}")
    elif sources.is_local(spec):
        sources.local_files(spec, key="--data")


def text_documents(spec: str, config: str = "", split: str = "test", text_field: str = "text") -> Iterator[str]:
    """The documents of --data, in order, read as training reads a dataset (and named `--data` in errors)."""
    check_source(spec)
    if spec.startswith("builtin:"):
        from hybridctl.core.data.corpora import builtin_documents

        yield from builtin_documents(spec.split(":", 1)[1])
        return
    from hybridctl.core.data import sources

    if sources.is_local(spec):
        yield from sources.iter_local(spec, text_field, key="--data")
    else:
        data_cfg = DataConfig(dataset=spec, config=config, split=split, text_field=text_field, streaming=True)
        yield from sources.iter_hub(data_cfg, split)


def encode_documents(documents: Iterator[str], tokenizer: Tokenizer, max_tokens: int = 0) -> tuple[np.ndarray, int]:
    """One stream: each document's tokens followed by the end-of-document token (as the token cache writes them),
    stopped after max_tokens (0: all). Returns the tokens and the number of documents read."""
    encode = getattr(tokenizer, "encode_array", None) or (lambda text: np.asarray(tokenizer.encode(text), dtype=np.int64))
    parts, total, count = [], 0, 0
    for text in documents:
        if not text:
            continue
        ids = np.asarray(encode(text), dtype=np.int64)
        parts += [ids, np.array([tokenizer.eos_id], dtype=np.int64)]
        total += len(ids) + 1
        count += 1
        if max_tokens and total >= max_tokens:
            break
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return (tokens[:max_tokens] if max_tokens else tokens), count


def window_count(n_tokens: int, seq_len: int) -> int:
    return max(0, (n_tokens - 1) // seq_len)


@torch.inference_mode()
def score_windows(model: HybridLM, tokens: np.ndarray, seq_len: int, device: torch.device, dtype: str = "auto",
                  batch_size: int = 8, progress: Progress | None = None) -> dict[str, float]:
    """Summed cross-entropy (float64) and correct predictions over every whole window of the stream."""
    n_windows = window_count(len(tokens), seq_len)
    loss_sum, correct = 0.0, 0
    model.eval()
    for start in range(0, n_windows, batch_size):
        rows = np.arange(start, min(start + batch_size, n_windows))
        index = rows[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
        data = torch.from_numpy(np.ascontiguousarray(tokens[index])).to(device)
        x, y = data[:, :-1], data[:, 1:].reshape(-1)
        with autocast_for(device, dtype):
            h, _ = model.hidden_states(x)
        h = h.reshape(-1, h.shape[-1])
        for i in range(0, len(y), HEAD_CHUNK):
            with autocast_for(device, dtype):
                logits = model.lm_head(h[i:i + HEAD_CHUNK])
            logits = logits.float()  # the whole output layer, as the training loss sees it
            target = y[i:i + HEAD_CHUNK]
            nll = torch.logsumexp(logits, -1) - logits.gather(1, target[:, None]).squeeze(1)
            loss_sum += float(nll.double().sum())
            correct += int((logits[:, : model.vocab_size].argmax(-1) == target).sum())
        if progress is not None:
            progress(int(rows[-1]) + 1, n_windows)
    return {"loss_sum": loss_sum, "correct": correct, "scored_tokens": n_windows * seq_len, "windows": n_windows}




def check_text_run(cfg: Config, run: RunDir) -> None:
    if cfg.data.dataset.startswith("synthetic:"):
        raise ConfigError(f"run {run.path} was trained on {cfg.data.dataset}, whose tokens are not text; "
                          "eval scores runs trained on text")
    if cfg.model.vocab_size <= 0:
        raise RunError(f"{run.config_path} has no model.vocab_size (the run never started training); train it first")


def eval_text(target: Path, data: str, which: str | None = None, name: str | None = None, config: str = "",
              split: str = "test", text_field: str = "text", max_tokens: int = 0, batch_size: int | None = None,
              device: str = "auto", force: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Score a run's checkpoint on the text of `data` and write RUN/eval/<name>.json; returns what was written and
    its path. Everything that can refuse (run, checkpoint, the text, an existing result, the text's length) is
    checked, in that order, before the model is loaded, and nothing is written unless the scoring finished."""
    if (batch_size is not None and batch_size < 1) or max_tokens < 0:
        raise ConfigError("--batch-size must be a positive integer and --max-tokens >= 0 (0: all the text)")
    name = name if name is not None else default_name(data, config, split)
    check_name(name)
    run, checkpoint = locate_checkpoint(target, which)
    check_source(data)
    out = eval_result_path(run, name)
    ensure_new_file(out, force)
    cfg = run.load_config()
    check_text_run(cfg, run)
    seq_len = cfg.train.seq_len
    start = time.perf_counter()
    tokenizer = get_tokenizer(cfg.data.tokenizer, cfg.data)
    tokens, documents = encode_documents(text_documents(data, config, split, text_field), tokenizer, max_tokens)
    if window_count(len(tokens), seq_len) < 1:
        cap = f" (cut at --max-tokens {max_tokens})" if max_tokens and len(tokens) >= max_tokens else ""
        raise DataError(f"--data '{data}' gives {len(tokens)} tokens{cap} with the run's tokenizer ({cfg.data.tokenizer}), "
                        f"fewer than one window of train.seq_len + 1 = {seq_len + 1}; give more text")
    torch_device = resolve_device(device, "--device")
    trained = load_trained_model(checkpoint, device=torch_device)
    rows = batch_size or micro_batch_size(cfg)
    scores = score_windows(trained.model, tokens, seq_len, torch_device, cfg.train.dtype, rows, progress)
    loss = scores["loss_sum"] / scores["scored_tokens"]
    result = {
        "name": name, "data": data, "config": config or None, "split": split if not _local_or_builtin(data) else None,
        "text_field": text_field, "loss": loss, "ppl": math.exp(min(loss, 50.0)),
        "acc": scores["correct"] / scores["scored_tokens"],
        "documents": documents, "tokens": int(len(tokens)), "scored_tokens": scores["scored_tokens"],
        "windows": scores["windows"], "tail_tokens": int(len(tokens)) - 1 - scores["scored_tokens"],
        "seq_len": seq_len, "max_tokens": max_tokens or None, "tokenizer": cfg.data.tokenizer,
        "run": run.name, "checkpoint": checkpoint.name, "checkpoint_step": trained.step,
        "device": device_name(torch_device), "seconds": round(time.perf_counter() - start, 3),
    }
    path = write_json(out, result, force)
    return {**result, "path": str(path)}


def _local_or_builtin(spec: str) -> bool:
    from hybridctl.core.data import sources

    return spec.startswith("builtin:") or sources.is_local(spec)
