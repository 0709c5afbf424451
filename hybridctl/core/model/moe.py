"""Mixture-of-experts MLP: SwiGLU experts behind a token-choice top-k router with a capacity limit.

Routing, per token: softmax over the router logits, keep the top_k experts, renormalise their probabilities
so the gates sum to 1 (with top_k = 1 the gate stays the raw probability, as in Switch). Each expert takes at most capacity = ceil(capacity_factor * tokens * top_k / n_experts)
(token, expert) assignments per forward; slots are filled in priority order (every token's first choice
before any second choice, and within one rank earlier tokens first, batch-major). An assignment past
capacity is dropped: it contributes zero and the gates are not renormalised, so the residual stream alone
carries that part of the token.

Load balancing (Switch Transformer): n_experts * sum_i f_i * P_i, with f_i the fraction of assignments routed
to expert i (before capacity drops) and P_i the mean router probability of expert i. It is 1 for a uniform
router and grows as routing concentrates; only P carries gradient.

Two ways to run the experts, with the same result: on CPU each expert takes exactly its kept tokens
(`gather_dispatch`); on CUDA each expert takes a fixed block of `capacity` slots, unfilled ones with gate 0
(`slot_dispatch`), so no shape depends on the routing and the step never waits for the GPU to say how many
tokens an expert got. That costs up to capacity_factor times the expert work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridctl.core.config import MoEConfig
from hybridctl.core.model.layers import SwiGLU


@dataclass
class Routing:
    probs: torch.Tensor  # [N, E] router softmax
    experts: torch.Tensor  # [N, top_k] chosen experts, best first
    gates: torch.Tensor  # [N, top_k] renormalised weights, sum to 1 per token (top_k > 1)
    slot: torch.Tensor  # [N, top_k] place of the assignment in its expert's queue (priority order)
    keep: torch.Tensor  # [N, top_k] False where the expert was full
    counts: torch.Tensor  # [E] assignments per expert before capacity drops


def one_hot(index: torch.Tensor, classes: int) -> torch.Tensor:
    # A comparison rather than F.one_hot, which checks its input's range on the host (a GPU sync).
    return (index[..., None] == torch.arange(classes, device=index.device)).long()


def balance_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    fraction = counts.to(probs.dtype) / counts.sum()
    return probs.shape[-1] * (fraction * probs.mean(0)).sum()


def run_experts(experts: nn.ModuleList, x: torch.Tensor, picks) -> torch.Tensor:
    """Sum over experts of gate * expert(token) into each token's row; picks yields (tokens, gates) per expert.
    An expert with no tokens still runs (on zero rows) so every parameter gets a gradient, zeros or not."""
    out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    for expert, (token, gate) in zip(experts, picks):
        out.index_add_(0, token, (expert(x[token]) * gate[:, None]).to(out.dtype))
    return out


def gather_dispatch(experts: nn.ModuleList, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Each expert on exactly its kept tokens (shapes depend on the routing)."""
    def picks():
        for e in range(len(experts)):
            token, rank = torch.where((routing.experts == e) & routing.keep)
            yield token, routing.gates[token, rank]
    return run_experts(experts, x, picks())


def slot_dispatch(experts: nn.ModuleList, x: torch.Tensor, routing: Routing, capacity: int) -> torch.Tensor:
    """Each expert on a fixed block of slots: slot s of expert e holds the assignment with that place in e's queue;
    unfilled slots hold token 0 with gate 0 and add exactly nothing."""
    n_tokens, top_k = routing.experts.shape
    n_experts, slots = len(experts), min(capacity, n_tokens)  # an expert gets each token at most once
    spare = n_experts * slots  # where dropped assignments go; cut off below
    where = torch.where(routing.keep, routing.experts * slots + routing.slot, spare).reshape(-1)
    tokens = torch.arange(n_tokens, device=x.device).repeat_interleave(top_k)
    token_at = torch.zeros(spare + 1, dtype=torch.long, device=x.device).scatter(0, where, tokens)[:spare]
    gate_at = routing.gates.new_zeros(spare + 1).scatter(0, where, routing.gates.reshape(-1))[:spare]
    return run_experts(experts, x, zip(token_at.split(slots), gate_at.split(slots)))


class MoE(nn.Module):
    def __init__(self, d_model: int, d_ff: int, cfg: MoEConfig):
        super().__init__()
        self.n_experts, self.top_k, self.capacity_factor = cfg.n_experts, cfg.top_k, cfg.capacity_factor
        self.router = nn.Linear(d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d_model, d_ff) for _ in range(cfg.n_experts))
        self.aux_losses: dict[str, torch.Tensor] = {}

    def capacity(self, n_tokens: int) -> int:
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def route(self, x: torch.Tensor) -> Routing:
        """x: [N, C] tokens."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in fp32 even under bf16 autocast
            logits = F.linear(x.to(dtype), self.router.weight.to(dtype))
        probs = logits.softmax(-1)
        top_probs, experts = probs.topk(self.top_k, dim=-1)
        # A single renormalised gate would be the constant 1 and leave the router without a language-model
        # gradient, so top-1 keeps the raw probability (as Switch does).
        gates = top_probs / top_probs.sum(-1, keepdim=True) if self.top_k > 1 else top_probs
        # Slot of each assignment inside its expert, counted in priority order: rank-major, then token order.
        chosen = one_hot(experts.t().reshape(-1), self.n_experts)  # [top_k * N, E]
        slot = ((chosen.cumsum(0) * chosen).sum(-1) - 1).view(self.top_k, -1).t()
        keep = slot < self.capacity(x.shape[0])
        return Routing(probs, experts, gates, slot, keep, chosen.sum(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = self.route(x)
        if x.is_cuda:
            out = slot_dispatch(self.experts, x, routing, self.capacity(x.shape[0]))
        else:
            out = gather_dispatch(self.experts, x, routing)
        self.aux_losses = {"moe_balance": balance_loss(routing.probs, routing.counts)}
        return out.to(x.dtype).view(shape)

    def forward_without_drops(self, x: torch.Tensor) -> torch.Tensor:
        """forward with no capacity limit, for decoding: every token gets its top_k experts, whatever else is in
        the batch, so a token's output does not depend on the other tokens of its step. On CUDA a step of few
        tokens runs every expert on all of them (gates 0 where not chosen; no shape depends on the routing, so
        the host never waits for the GPU); a prompt runs each expert on its own tokens."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = self.route(x)
        routing.keep = torch.ones_like(routing.keep)
        if x.is_cuda and x.shape[0] <= self.DECODE_TOKENS:
            out = slot_dispatch(self.experts, x, routing, x.shape[0])
        else:
            out = gather_dispatch(self.experts, x, routing)
        return out.to(x.dtype).view(shape)

    DECODE_TOKENS = 256  # up to this many tokens (a decoding step's batch) forward_without_drops runs by slots
