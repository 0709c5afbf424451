import math

import pytest
import torch

from hybridctl.core.model.attention import CausalSelfAttention, sliding_window_mask


def reference_attention(layer: CausalSelfAttention, x: torch.Tensor, window: int) -> torch.Tensor:
    """Plain masked softmax with the layer's own weights and RoPE."""
    B, T, C = x.shape
    q, k, v = layer.qkv_proj(x).view(B, T, 3, layer.n_heads, layer.head_dim).permute(2, 0, 3, 1, 4)
    q, k = layer.rotary(q), layer.rotary(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(layer.head_dim)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & ((j > i - window) if window else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = scores.softmax(-1) @ v
    return layer.o_proj(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("window", [0, 1, 5, 16, 100])
def test_sdpa_matches_masked_softmax(window):
    torch.manual_seed(0)
    layer = CausalSelfAttention(d_model=32, n_heads=4, window=window).double()
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference_attention(layer, x, window), rtol=1e-10, atol=1e-10)


def test_window_at_least_length_equals_full_causal():
    torch.manual_seed(0)
    full = CausalSelfAttention(d_model=16, n_heads=2, window=0)
    windowed = CausalSelfAttention(d_model=16, n_heads=2, window=64)
    windowed.load_state_dict(full.state_dict())
    x = torch.randn(1, 64, 16)
    torch.testing.assert_close(full(x), windowed(x))


def test_sliding_window_mask_shape():
    m = sliding_window_mask(5, 2, "cpu")
    assert m.tolist()[4] == [False, False, False, True, True]
    assert m.sum().item() == 9
