"""A decoding step captured once as a CUDA graph and replayed for every token.

Eager decoding of a small batch is bound by the host: a step of the study's model launches some 300 small
kernels from Python, 12-13 ms on an H100 whatever the batch or the context. Replaying a graph launches them all
at once. HybridLM.step_at makes this possible: the step reads its token and position from fixed device tensors,
attends over the whole (masked) cache, and updates every state in place, so one capture stays valid as the cache
fills.
"""

from __future__ import annotations

import math

import torch

from hybridctl.core.model.cache import DeltaNetState, ModelCache
from hybridctl.core.model.hybrid_lm import HybridLM, can_step_at


def graph_capacity(positions: int) -> int:
    """Room for `positions`, rounded up to whole 64s: a graphed step attends over every slot of the cache, and
    the attention kernels read a mask of an aligned width without copying it."""
    return 64 * math.ceil(positions / 64)


def can_graph(model: HybridLM) -> bool:
    """Whether GraphedStep can decode this model: on CUDA, with L and F layers and dense MLPs."""
    return model.embed.weight.is_cuda and can_step_at(model.cfg)


class GraphedStep:
    """Decoding steps of `model` over `cache` (filled by a prompt), replayed from one CUDA graph; call it with
    the next tokens [B, 1] for the logits [B, 1, V] after them (valid until the next call)."""

    def __init__(self, model: HybridLM, cache: ModelCache, batch_size: int, warmup: int = 2):
        device = model.embed.weight.device
        self.cache = cache
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.position = torch.full((), cache.length, dtype=torch.long, device=device)
        # Warming up (Triton compiles and autotunes outside the capture) and capturing run the step for real. The
        # KV slot they write is the next one, which the first replay writes again before it reads it; the Gated
        # DeltaNet states are changed in place, so they are put back.
        states = [t for layer in cache.layers if isinstance(layer, DeltaNetState) for t in layer.tensors()]
        saved = [t.clone() for t in states]
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    model.step_at(self.tokens, cache, self.position)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = model.step_at(self.tokens, cache, self.position)
        finally:  # also when capturing fails: the caller may decode the same cache step by step instead
            for state, kept in zip(states, saved):
                state.copy_(kept)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache.length >= self.cache.capacity:
            raise ValueError(f"the cache holds {self.cache.capacity} positions; {self.cache.length + 1} were asked for")
        self.tokens.copy_(tokens)
        self.position.fill_(self.cache.length)
        self.graph.replay()
        self.cache.advance(1)
        return self.logits
