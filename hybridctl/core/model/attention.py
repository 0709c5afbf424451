"""Causal softmax attention with rotary position embeddings, through PyTorch's scaled_dot_product_attention
(flash attention on CUDA in bf16). A sliding window limits each query to its `window` most recent keys."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from hybridctl.core.model.cache import KVCache


class Rotary(nn.Module):
    """Rotate-half RoPE. The cos/sin tables are made in each forward (T x head_dim, next to nothing) rather than
    cached on the module: a cache filled inside a compiled graph is that graph's output, read by the graph that
    its guard then recompiles, and under CUDA graphs that memory is reused by the next replay."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def tables(self, T: int, device: torch.device, start: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, head_dim] for positions start .. start + T - 1 (start: a number, or a 0-d tensor)."""
        t = torch.arange(T, device=device, dtype=torch.float32) + (start.float() if torch.is_tensor(start) else start)
        freqs = torch.outer(t, self.inv_freq.to(device))
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, x: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """x: [B, H, T, D] at positions start .. start + T - 1"""
        cos, sin = self.tables(x.shape[-2], x.device, start)
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (x.float() * cos + rotated * sin).to(x.dtype)

    def split_qkv(self, qkv: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (rotated), k (rotated), v, each [B, H, T, D], from a fused projection [B, T, 3 * H * D]. On CUDA one
        kernel pass (rope.py) writes all three; elsewhere the same function in PyTorch."""
        B, T, _ = qkv.shape
        head_dim = self.inv_freq.numel() * 2
        if qkv.is_cuda:
            from hybridctl.core.kernels import rope  # needs Triton

            if rope.supported(head_dim):
                cos, sin = self.tables(T, qkv.device)
                half = head_dim // 2
                q, k, v = rope.rotary_qkv(qkv, cos[:, :half], sin[:, :half], n_heads)
                return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k, v = qkv.view(B, T, 3, n_heads, head_dim).permute(2, 0, 3, 1, 4)
        return self(q), self(k), v

    def split_qkv_at(self, qkv: torch.Tensor, n_heads: int, start: int | torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """split_qkv for positions start .. start + T - 1 (decoding), as [B, T, H, D] each, the layout of a KV
        cache."""
        B, T, _ = qkv.shape
        head_dim = self.inv_freq.numel() * 2
        if qkv.is_cuda:
            from hybridctl.core.kernels import rope  # needs Triton

            if rope.supported(head_dim):
                cos, sin = self.tables(T, qkv.device, start)
                half = head_dim // 2
                return rope.rotary_qkv(qkv, cos[:, :half], sin[:, :half], n_heads)
        q, k, v = qkv.view(B, T, 3, n_heads, head_dim).permute(2, 0, 3, 1, 4)
        return self(q, start).transpose(1, 2), self(k, start).transpose(1, 2), v.transpose(1, 2)


def sliding_window_mask(T: int, window: int, device) -> torch.Tensor:
    """Boolean [T, T] mask, True where query i may attend key j: i - window < j <= i."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & (j > i - window)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, window: int = 0, rope_theta: float = 10000.0):
        super().__init__()
        self.n_heads, self.head_dim, self.window = n_heads, d_model // n_heads, window
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.rotary = Rotary(self.head_dim, rope_theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.rotary.split_qkv(self.qkv_proj(x), self.n_heads)
        if self.window and self.window < T:
            mask = sliding_window_mask(T, self.window, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))

    def forward_cached(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """forward for the next T positions of the sequences in `cache` (a prompt, or one decoding step), which
        keeps their keys and values."""
        B, T, C = x.shape
        q, k, v = self.rotary.split_qkv_at(self.qkv_proj(x), self.n_heads, cache.length)
        keys, values, _ = cache.append(k, v)
        y = cached_attention(q.transpose(1, 2), keys, values, cache)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))

    def step_at(self, x: torch.Tensor, cache: KVCache, position: torch.Tensor) -> torch.Tensor:
        """forward_cached for one decoding step at `position` (a 0-d device tensor): it attends over every slot of
        the cache, the unseen ones masked, so no shape or index depends on the host (CUDA graphs)."""
        B, _, C = x.shape
        q, k, v = self.rotary.split_qkv_at(self.qkv_proj(x), self.n_heads, position)
        keys, values, visible = cache.write_at(k, v, position)
        with sdpa_kernel(GROWING_KEYS_BACKENDS):
            y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=visible)
        return self.o_proj(y.transpose(1, 2).reshape(B, 1, C))


# cuDNN's attention builds an execution plan for each new key length, which at the study shape took about as long
# as a whole decoding step; a cache grows by one key per step, so cached attention takes the other kernels.
GROWING_KEYS_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def cached_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cache: KVCache,
                     selected: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of q [B, H, T, D] over the keys `cache.append` returned, each query to the keys it may
    see (or to `selected` [B, T, S] of them). Full causal attention over a whole prompt or a chunk of one takes
    the causal kernels (flash attention on CUDA); other masks are given as tensors."""
    with sdpa_kernel(GROWING_KEYS_BACKENDS):
        return _cached_attention(q, keys, values, cache, selected)


def _cached_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cache: KVCache,
                      selected: torch.Tensor | None) -> torch.Tensor:
    T, S = q.shape[-2], keys.shape[-2]
    if selected is not None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=selected[:, None])
    if T > 1 and not cache.window and cache.length - S >= cache.max_pad:  # no window, no padding among the keys
        if S == T:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(T, S))
    visible = cache.visible(T, S, q.device)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=None if visible is None else visible[:, None])
