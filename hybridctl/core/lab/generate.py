"""Text generation from a trained run: prompts in, completions out, with each layer's decoding state kept between
steps (model/cache.py) so that a step costs one token's work whatever the length of the context.

A batch of prompts is left-padded to the longest and decoded together; each row stops at the tokenizer's end of
document, at --max-new-tokens, or where the model's context ends (`context_limit`).
"""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from hybridctl.core.config import Config
from hybridctl.core.errors import ConfigError
from hybridctl.core.lab.trained_model import TrainedModel, load_trained_model, locate_checkpoint
from hybridctl.core.model.cache import ModelCache
from hybridctl.core.model.gated_delta import GatedDeltaNet
from hybridctl.core.model.graphed_step import GraphedStep, can_graph, graph_capacity
from hybridctl.core.model.hybrid_lm import HybridLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PREFILL_TOKENS = 65536  # tokens of a batch's prompts per parallel pass: B x 32K prompts go through in chunks


# ---------------------------------------------------------------------------------------------------------
# Sampling


@dataclass
class Sampling:
    temperature: float = 0.8
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 0.95  # 1: no nucleus cut
    greedy: bool = False  # the most likely token every time (as temperature 0)
    seed: int | None = None  # None: a fresh one, reported in the results

    def check(self) -> None:
        if not 0 <= self.temperature < math.inf:  # inf would sample every token alike: noise, not text
            raise ConfigError(f"--temperature must be a number >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1] (1 keeps every token), got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def unused_by_greedy(self) -> list[str]:
        """The sampling options set away from their defaults that --greedy leaves unused, as options (--top-k)."""
        if not self.greedy:
            return []
        return [f"--{f.name.replace('_', '-')}" for f in fields(self)
                if f.name != "greedy" and getattr(self, f.name) != f.default]


def sampling_record(sampling: Sampling) -> dict[str, Any]:
    """The settings a completion was made with: greedy decoding uses no temperature, cut or seed (null)."""
    if sampling.is_greedy:
        return {"greedy": True, "temperature": None, "top_k": None, "top_p": None, "seed": None}
    return {"greedy": False, "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
            "seed": sampling.seed}


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: argmax when greedy, else a draw from softmax(logits / temperature) cut
    to the top_k tokens and to the smallest set whose probability reaches top_p."""
    logits = logits.float()
    if sampling.is_greedy:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        cut_sorted = before >= sampling.top_p  # never the first: at least one token stays
        logits = logits.masked_fill(torch.zeros_like(cut_sorted).scatter(-1, order, cut_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------
# Decoding


def context_limit(cfg: Config) -> int | None:
    """The most tokens the model should read: train.seq_len when an attention layer (F or D) sees every earlier
    position (it never saw a distance beyond seq_len in training), else None (Gated DeltaNet and windowed layers
    see a fixed span whatever the length)."""
    full_attention = any(kind != "L" for kind in cfg.model.layer_types()) and not cfg.model.attention.window
    return cfg.train.seq_len if full_attention else None


def prefill(model: HybridLM, idx: torch.Tensor, cache: ModelCache, tokens_per_pass: int = PREFILL_TOKENS) -> torch.Tensor:
    """Take a prompt batch idx [B, T] into `cache` in parallel passes of up to tokens_per_pass tokens (chunks of
    whole multiples of 64 positions); returns the logits [B, 1, V] after its last position."""
    T = idx.shape[1]
    step = max(64, tokens_per_pass // idx.shape[0] // 64 * 64)
    for start in range(0, T, step):
        logits = model.forward_cached(idx[:, start : start + step], cache)
    return logits


OnToken = Callable[[int, int, "str | None"], None]  # (row, token, the row's stop reason or None)


@dataclass
class Completion:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    stop: str | None = None  # "eos", "length" or "context"; None while running


@dataclass
class Timing:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    cuda_graph: bool = False  # whether the decoding steps were replayed from a CUDA graph


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model: HybridLM, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling,
             eos_id: int | None = None, limit: int | None = None,
             on_token: OnToken | None = None, cuda_graph: bool = True) -> tuple[list[Completion], Timing]:
    """Complete each prompt (token ids) with up to max_new_tokens tokens, all rows as one batch; a row stops at
    eos_id or once the model would read more than `limit` tokens (None: no limit). on_token(row, token, stop)
    is called for every token kept, as it comes, with the row's stop reason once it is its last. On CUDA the
    decoding step is replayed from a CUDA graph where the model allows (GraphedStep), unless cuda_graph is off."""
    device = model.embed.weight.device
    rows = [Completion(list(p)) for p in prompts]
    longest = max(len(p) for p in prompts)
    # the last token sampled is never read: a row may sample until it has read `limit` tokens
    budgets = [max_new_tokens if limit is None else max(1, min(max_new_tokens, limit - len(p) + 1)) for p in prompts]
    steps = max(budgets)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    fill = eos_id if eos_id is not None else 0
    idx = torch.tensor([[fill] * (longest - len(p)) + list(p) for p in prompts], device=device)
    generator = torch.Generator(device).manual_seed(sampling.seed) if sampling.seed is not None else None
    graphed = cuda_graph and can_graph(model)
    cache = model.new_cache(graph_capacity(longest + steps) if graphed else longest + steps, pad)
    step_from_graph = None
    timing = Timing()
    start = time.perf_counter()
    logits = prefill(model, idx, cache)
    for step in range(steps):
        tokens = sample(logits[:, -1], sampling, generator)
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            if row.stop is not None:
                continue
            row.tokens.append(token)
            if token == eos_id:
                row.stop = "eos"
            elif len(row.tokens) >= budgets[i]:
                row.stop = "length" if budgets[i] == max_new_tokens else "context"
            if on_token is not None:
                on_token(i, token, row.stop)
        if step == 0:
            synchronize(device)
            timing.prefill_seconds = time.perf_counter() - start
            start = time.perf_counter()
        if all(row.stop is not None for row in rows):
            break
        if graphed and step_from_graph is None:  # captured once the prompt has filled the cache (decode time)
            try:
                step_from_graph = GraphedStep(model, cache, len(prompts))
            except RuntimeError as e:  # a kernel that cannot be captured: the eager step gives the same tokens
                warnings.warn(f"decoding step by step: capturing the step as a CUDA graph failed ({e})", RuntimeWarning, stacklevel=2)
                graphed = False
        logits = step_from_graph(tokens[:, None]) if graphed else model.forward_cached(tokens[:, None], cache)
        timing.decode_steps += 1
    synchronize(device)
    timing.decode_seconds = time.perf_counter() - start
    timing.cuda_graph = graphed and step_from_graph is not None
    return rows, timing


class TextStream:
    """The text of a growing list of token ids, piece by piece: `push` returns what is new since the last call,
    holding back a tail that does not decode to whole characters yet (a UTF-8 sequence split between tokens)."""

    def __init__(self, decode: Callable[[list[int]], str], skip: set[int] = frozenset()):
        self.decode, self.skip = decode, skip
        self.ids: list[int] = []
        self.shown = 0

    def push(self, token: int) -> str:
        if token not in self.skip:
            self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown :], len(text)
        return new


# ---------------------------------------------------------------------------------------------------------
# From a run folder


def inference_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec not in DTYPES:
        raise ConfigError(f"--dtype must be auto, fp32 or bf16, got '{spec}'")
    return DTYPES[spec]


def cast_for_inference(model: HybridLM, dtype: torch.dtype) -> HybridLM:
    """The model's weights in `dtype` (no autocast, so a decoding step casts nothing), but for the Gated DeltaNet
    decay parameters, which stay fp32 as the recurrence reads them."""
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, GatedDeltaNet):
            module.A_log.data, module.dt_bias.data = module.A_log.data.float(), module.dt_bias.data.float()
    return model


def load_generator(target: Path, which: str | None, device: torch.device, dtype: torch.dtype) -> TrainedModel:
    """A trained run's model (best/ by default, as `bench arc`), in `dtype` on `device`, with its tokenizer."""
    locate_checkpoint(target, which)
    trained = load_trained_model(target, which, device)
    cast_for_inference(trained.model, dtype)
    return trained




def encode_prompts(texts: list[str], trained: TrainedModel, allow_long: bool) -> tuple[list[list[int]], int | None]:
    """Token ids of each prompt and the context limit the completions keep to (None: none). An empty prompt, or
    one longer than the limit without allow_long, is refused."""
    limit = context_limit(trained.cfg)
    prompts = []
    for number, text in enumerate(texts, 1):
        ids = trained.tokenizer.encode(text)
        where = "the prompt" if len(texts) == 1 else f"prompt {number}"
        if not ids:
            raise ConfigError(f"{where} is empty; give some text to continue")
        if limit is not None and len(ids) > limit and not allow_long:
            raise ConfigError(
                f"{where} is {len(ids)} tokens, more than the {limit} the model was trained on (train.seq_len), and its "
                "attention layers see every position; shorten it, or pass --allow-long-context to run past "
                "the trained length (quality drops)")
        prompts.append(ids)
    return prompts, None if allow_long else limit


def generate_text(trained: TrainedModel, texts: list[str], max_new_tokens: int, sampling: Sampling,
                  allow_long: bool = False, on_token: OnToken | None = None, cuda_graph: bool = True) -> dict[str, Any]:
    """Complete each text with the run's model and tokenizer; the JSON-ready result (prompt, completion, token
    counts and why each stopped; timings and tok/s for the batch). cuda_graph=False launches every step eagerly."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    sampling.check()
    prompts, limit = encode_prompts(texts, trained, allow_long)
    if sampling.seed is None and not sampling.is_greedy:
        sampling.seed = random.randrange(2**31)
    eos = trained.tokenizer.eos_id
    rows, timing = generate(trained.model, prompts, max_new_tokens, sampling, eos, limit, on_token, cuda_graph)
    new_tokens = sum(len(r.tokens) for r in rows)
    seconds = timing.prefill_seconds + timing.decode_seconds
    decode_tokens = new_tokens - len(rows)  # the first token of each row comes out of the prefill
    return {
        "run": trained.run.name, "checkpoint": trained.checkpoint.name, "checkpoint_step": trained.step,
        "device": str(trained.model.embed.weight.device), "dtype": str(trained.model.embed.weight.dtype).removeprefix("torch."),
        "sampling": sampling_record(sampling),
        "max_new_tokens": max_new_tokens, "context_limit": limit,
        "results": [{"prompt": text, "completion": trained.tokenizer.decode([t for t in r.tokens if t != eos]),
                     "prompt_tokens": len(r.prompt), "completion_tokens": len(r.tokens), "stop": r.stop}
                    for text, r in zip(texts, rows)],
        "prefill_seconds": timing.prefill_seconds, "decode_seconds": timing.decode_seconds,
        "cuda_graph": timing.cuda_graph, "tok_s": new_tokens / seconds if seconds > 0 else None,
        "decode_tok_s": decode_tokens / timing.decode_seconds if timing.decode_seconds > 0 and decode_tokens > 0 else None,
    }
