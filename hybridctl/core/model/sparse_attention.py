"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2): a small "lightning indexer" scores every earlier token for
each query, and softmax attention runs over the top-k of them only.

Index score, per query t and earlier key s (H_I indexer heads sharing one key per token):

    I(t, s) = sum_j w(t, j) * ReLU(q_I(t, j) . k_I(s))

The top-k selection has no gradient, so the indexer is taught by an auxiliary loss instead: the KL divergence
from the main attention distribution over the selected keys (summed over heads, L1-normalised, detached) to
softmax(I) over the same keys. The indexer reads a detached copy of the layer input, so the KL trains the
indexer alone and the language-modelling loss trains everything else.

The selection becomes a dense [B, T, T] boolean mask for scaled_dot_product_attention: exact and simple, but
O(T^2) in time and memory like full attention; the O(T * k) saving of the real kernel is not realised here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridctl.core.model.attention import Rotary, cached_attention, sliding_window_mask
from hybridctl.core.model.cache import KVCache
from hybridctl.core.config import ModelConfig


def causal_mask(T: int, device, window: int = 0) -> torch.Tensor:
    """Boolean [T, T], True where query i may see key j: j <= i, and with a window W < T also j > i - W (the
    same keys as a sliding-window F layer)."""
    if window and window < T:
        return sliding_window_mask(T, window, device)
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 tensors, fp64 for fp64 ones (tests)."""
    return torch.promote_types(x.dtype, torch.float32)


class LightningIndexer(nn.Module):
    """Scores I(t, s) for all query/key pairs; future keys (and keys outside a window) get -inf. Query and key carry RoPE so that the
    indexer can prefer recent tokens; the key is LayerNorm-ed as in the reference model."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, rope_theta: float = 10000.0):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim)
        self.weights_proj = nn.Linear(d_model, n_heads, bias=False)
        self.rotary = Rotary(head_dim, rope_theta)
        self.scale = (head_dim * n_heads) ** -0.5  # keeps scores O(1) whatever the head count and width

    def forward(self, x: torch.Tensor, window: int = 0) -> torch.Tensor:
        """x: [B, T, C] -> scores [B, T, T] in fp32 (fp64 for fp64 input)."""
        B, T, _ = x.shape
        dtype = compute_dtype(x)
        q = self.rotary(self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2))  # [B, H, T, D]
        k = self.rotary(self.k_norm(self.k_proj(x)).unsqueeze(1))  # [B, 1, T, D]
        per_head = F.relu(q @ k.transpose(-1, -2)).to(dtype)  # [B, H, T, T]
        weights = self.weights_proj(x).to(dtype) * self.scale  # [B, T, H]
        scores = torch.einsum("bhts,bth->bts", per_head, weights)
        return scores.masked_fill(~causal_mask(T, x.device, window), float("-inf"))

    def project(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """forward's query [B, H, T, D], key [B, T, D] and head weights [B, T, H] for positions start ..
        start + T - 1 (decoding: the keys go to the cache)."""
        B, T, _ = x.shape
        q = self.rotary(self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2), start)
        k = self.rotary(self.k_norm(self.k_proj(x)).unsqueeze(1), start).squeeze(1)
        return q, k, self.weights_proj(x).to(compute_dtype(x)) * self.scale

    def cached_scores(self, q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """forward's scores [B, T, S] of `project`'s queries against cached keys [B, S, D], unmasked."""
        per_head = F.relu(q @ keys[:, None].transpose(-1, -2)).to(weights.dtype)  # [B, H, T, S]
        return torch.einsum("bhts,bth->bts", per_head, weights)


def visible_keys(T: int, window: int = 0) -> int:
    """The most keys any query can see."""
    return min(T, window) if window else T


def topk_mask(scores: torch.Tensor, k: int, window: int = 0) -> torch.Tensor:
    """Boolean [B, T, T]: True for the k highest-scoring visible keys (the query itself included) of each query.
    Queries with fewer than k visible keys keep all of them."""
    T = scores.shape[-1]
    visible = causal_mask(T, scores.device, window)
    if k >= visible_keys(T, window):
        return visible.expand(scores.shape)
    chosen = scores.topk(k, dim=-1).indices  # rows with few visible keys may pick -inf slots; the mask drops them
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, chosen, True)
    return mask & visible


def select_topk(scores: torch.Tensor, visible: torch.Tensor | None, k: int) -> torch.Tensor:
    """topk_mask for a decoding cache's keys: [B, T, S] True for the k highest-scoring keys each query may see
    (visible [B or 1, T, S], None: all), or all of them when it sees no more than k."""
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    chosen = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, chosen, True)
    return mask if visible is None else mask & visible


def indexer_kl(q: torch.Tensor, k: torch.Tensor, scores: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(p_t || softmax(I_t)) over the selected keys, where p_t is the main attention
    (q, k: [B, H, T, D] after RoPE) summed over heads and L1-normalised; p is detached."""
    dtype = compute_dtype(scores)
    with torch.no_grad():
        logits = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * q.shape[-1] ** -0.5
        attention = logits.masked_fill(~selected[:, None], float("-inf")).softmax(-1)
        target = attention.sum(1)
        target = target / target.sum(-1, keepdim=True)
    log_pred = scores.masked_fill(~selected, float("-inf")).log_softmax(-1).masked_fill(~selected, 0.0)
    kl = torch.xlogy(target, target) - target * log_pred  # xlogy: 0 * log 0 = 0 for keys attention ignores
    return kl.sum(-1).mean()


class DeepSeekSparseAttention(nn.Module):
    """Causal softmax attention with RoPE (projections as in CausalSelfAttention) over the top-k keys that the
    lightning indexer picks for each query, among the keys model.attention.window allows (all earlier ones when
    it is 0). With topk >= the keys a query can see it is exactly full (or sliding-window) causal attention.

    During training, `aux_losses["indexer_kl"]` holds the indexer's KL loss after each forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.topk, self.window = cfg.dsa.topk, cfg.attention.window
        self.qkv_proj = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rotary = Rotary(self.head_dim, cfg.attention.rope_theta)
        self.indexer = LightningIndexer(cfg.d_model, cfg.dsa.indexer_heads, cfg.dsa.indexer_dim, cfg.attention.rope_theta)
        self.aux_losses: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.rotary.split_qkv(self.qkv_proj(x), self.n_heads)
        sparse = self.topk < visible_keys(T, self.window)
        if self.training or sparse:  # at inference without sparsity every visible key is selected anyway
            scores = self.indexer(x.detach(), self.window)
            selected = topk_mask(scores, self.topk, self.window)
        if sparse:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=selected[:, None])
        elif self.window and self.window < T:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, x.device, self.window))
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        self.aux_losses = {"indexer_kl": indexer_kl(q.detach(), k.detach(), scores, selected)} if self.training else {}
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))

    def forward_cached(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """forward for the next T positions of the sequences in `cache`, which keeps the keys and values of the
        attention and the indexer's keys. Each query takes the top-k keys it may see, as forward does."""
        B, T, C = x.shape
        start = cache.length
        q, k, v = self.rotary.split_qkv_at(self.qkv_proj(x), self.n_heads, start)
        index_q, index_k, index_weights = self.indexer.project(x, start)
        keys, values, index_keys = cache.append(k, v, index_k)
        selected = None
        if self.topk < visible_keys(cache.length, self.window):  # some query sees more than topk keys
            scores = self.indexer.cached_scores(index_q, index_keys, index_weights)
            selected = select_topk(scores, cache.visible(T, keys.shape[-2], x.device), self.topk)
        y = cached_attention(q.transpose(1, 2), keys, values, cache, selected)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))
