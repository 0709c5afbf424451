"""Data pipeline throughput on the CPU (a benchmark, not a test).

1. Tokenising + caching: tokens/s of a fresh `load_token_data` (encode, pack, write the memmaps) for the byte
   tokenizer and a byte-level BPE on builtin:stdlib and, with --text, on local .txt files (e.g. WikiText-2);
   BPE training time is reported apart, and so is a cached (second) load.
2. Loader overhead: time of `BatchSampler.batch(step)` as a fraction of a whole training step (forward, backward,
   AdamW) on the `tiny` preset.

    python benchmarks/data_throughput.py [--text 'wikitext-2/*.txt'] [--stdlib-tokens 4000000] [--steps 20]
"""

from __future__ import annotations

import argparse
import glob
import statistics
import tempfile
import time

import torch

from hybridctl.core.config import DataConfig, load_config
from hybridctl.core.data.batches import BatchSampler
from hybridctl.core.data.tokenizer import get_tokenizer
from hybridctl.core.data.token_cache import load_token_data
from hybridctl.core.lab.render import fmt_count
from hybridctl.core.training.steps import build_optimizer, seed_everything
from hybridctl.core.training.trainer import prepare_model


def tokenise(dataset: str, tokenizer: str, max_tokens: int, cache: str) -> dict:
    cfg = DataConfig(dataset=dataset, tokenizer=tokenizer, max_tokens=max_tokens, cache_dir=cache)
    train_s = 0.0
    if tokenizer.startswith("bpe:"):
        start = time.perf_counter()
        get_tokenizer(tokenizer, cfg)  # trains and caches the BPE, so the timing below is encoding alone
        train_s = time.perf_counter() - start
    start = time.perf_counter()
    data = load_token_data(cfg)
    fresh_s = time.perf_counter() - start
    start = time.perf_counter()
    again = load_token_data(cfg)
    cached_s = time.perf_counter() - start
    assert again.info["cached"] and not data.info["cached"]
    tokens = data.info["train_tokens"] + data.info["val_tokens"]
    return {"dataset": dataset, "tokenizer": tokenizer, "tokens": tokens, "bpe_train_s": train_s, "fresh_s": fresh_s,
            "tok_s": tokens / fresh_s, "cached_s": cached_s}


def loader_overhead(steps: int, cache: str) -> dict:
    cfg = load_config("tiny", [f'data.cache_dir="{cache}"', 'train.device="cpu"'])
    t = cfg.train
    seed_everything(t.seed)
    data = load_token_data(cfg.data)
    model = prepare_model(cfg, data)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    sampler = BatchSampler(data.train, t.batch_size, t.seq_len, t.seed)
    batch_times, step_times = [], []
    for step in range(steps + 3):
        start = time.perf_counter()
        x, y = sampler.batch(step)
        fetched = time.perf_counter()
        out = model(x, y)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = time.perf_counter()
        if step >= 3:  # warm-up steps excluded
            batch_times.append(fetched - start)
            step_times.append(done - start)
    batch, whole = statistics.median(batch_times), statistics.median(step_times)
    return {"batch_ms": 1e3 * batch, "step_ms": 1e3 * whole, "fraction": batch / whole,
            "shape": f"{t.batch_size}x{t.seq_len}", "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default="", help="glob of local .txt files to tokenise too (e.g. WikiText-2); skipped if it matches nothing")
    parser.add_argument("--stdlib-tokens", type=int, default=4_000_000, help="max_tokens for builtin:stdlib")
    parser.add_argument("--bpe", default="bpe:8192")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps for the loader overhead")
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="hybridctl-bench-")
    rows = [tokenise("builtin:stdlib", tok, args.stdlib_tokens, cache) for tok in ("bytes", args.bpe)]
    if args.text and glob.glob(args.text):
        rows += [tokenise(args.text, tok, 0, cache) for tok in ("bytes", args.bpe)]
    else:
        print(f"--text {args.text!r} matches no files: local text skipped")
    print(f"tokenising + caching on {torch.get_num_threads()} CPU threads:")
    for r in rows:
        print(f"  {r['dataset']:<28} {r['tokenizer']:<9} {fmt_count(r['tokens']):>7} tokens  "
                      f"{fmt_count(r['tok_s']):>6} tok/s  fresh {r['fresh_s']:.2f}s  cached load {1e3 * r['cached_s']:.1f} ms"
                      + (f"  (BPE training {r['bpe_train_s']:.1f}s)" if r["bpe_train_s"] else ""))
    o = loader_overhead(args.steps, cache)
    print(f"loader overhead, tiny preset ({o['shape']} tokens/step, CPU, {o['threads']} threads): "
                  f"batch {o['batch_ms']:.3f} ms of a {o['step_ms']:.1f} ms step = {100 * o['fraction']:.3f}%")


if __name__ == "__main__":
    main()
