import math

import pytest
import torch

from hybridctl.core.model.attention import CausalSelfAttention
from hybridctl.core.config import ModelConfig
from hybridctl.core.model.sparse_attention import DeepSeekSparseAttention, topk_mask

D_MODEL, N_HEADS, T = 32, 4, 24


def sparse_layer(topk: int, seed: int = 0, window: int = 0) -> DeepSeekSparseAttention:
    cfg = ModelConfig(d_model=D_MODEL, n_heads=N_HEADS)
    cfg.dsa.topk, cfg.dsa.indexer_heads, cfg.dsa.indexer_dim = topk, 3, 8
    cfg.attention.window = window
    torch.manual_seed(seed)
    return DeepSeekSparseAttention(cfg).double()


def inputs(seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(2, T, D_MODEL, dtype=torch.float64)


def masked_attention(layer, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Explicit softmax attention with the layer's weights and RoPE over the keys in `allowed` [B, T, T]."""
    B, T, C = x.shape
    q, k, v = layer.qkv_proj(x).view(B, T, 3, layer.n_heads, layer.head_dim).permute(2, 0, 3, 1, 4)
    q, k = layer.rotary(q), layer.rotary(k)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(layer.head_dim)).masked_fill(~allowed[:, None], float("-inf"))
    return layer.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("topk", [T, 1000])
def test_topk_at_least_length_equals_full_causal_attention(topk):
    layer = sparse_layer(topk)
    full = CausalSelfAttention(D_MODEL, N_HEADS).double()
    full.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("indexer.")})
    x = inputs()
    for training in (True, False):  # training also runs the indexer; the output must not change
        layer.train(training)
        torch.testing.assert_close(layer(x), full(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("topk", [1, 5, 11])
def test_each_query_attends_to_its_topk_only(topk):
    layer = sparse_layer(topk)
    x = inputs()
    scores = layer.indexer(x)
    selected = topk_mask(scores, topk)
    t = torch.arange(T)
    # k keys per query (all of them while fewer than k exist), never a future one, and no unselected earlier
    # key scores higher than a selected one (ties may go either way).
    assert torch.equal(selected.sum(-1), torch.minimum(t + 1, torch.tensor(topk)).expand(2, T))
    assert not (selected & (t[None, :] > t[:, None])).any()
    earlier = t[None, :] <= t[:, None]
    lowest_kept = scores.masked_fill(~selected, math.inf).amin(-1)
    highest_dropped = scores.masked_fill(selected | ~earlier, -math.inf).amax(-1)
    assert (lowest_kept >= highest_dropped).all()
    torch.testing.assert_close(layer(x), masked_attention(layer, x, selected), rtol=1e-12, atol=1e-12)
    if topk < T:  # really sparse: differs from full causal attention
        assert not torch.allclose(layer(x), masked_attention(layer, x, earlier.expand(2, T, T)))


@pytest.mark.parametrize("topk", [7, 1000])
def test_window_limits_the_keys_like_a_sliding_window_f_layer(topk):
    """model.attention.window applies to D layers too: with topk >= window the layer is exactly the windowed F
    layer; with fewer, every selected key lies inside the window."""
    window = 7
    layer = sparse_layer(topk, window=window)
    x = inputs()
    t = torch.arange(T)
    in_window = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    if topk >= window:
        windowed = CausalSelfAttention(D_MODEL, N_HEADS, window=window).double()
        windowed.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("indexer.")})
        for training in (True, False):
            layer.train(training)
            torch.testing.assert_close(layer(x), windowed(x), rtol=1e-12, atol=1e-12)
    small = sparse_layer(3, window=window)
    selected = topk_mask(small.indexer(x, window), 3, window)
    assert not (selected & ~in_window).any()
    assert torch.equal(selected.sum(-1), torch.minimum(t + 1, torch.tensor(3)).expand(2, T))
    torch.testing.assert_close(small(x), masked_attention(small, x, selected), rtol=1e-12, atol=1e-12)


def test_causal():
    layer = sparse_layer(topk=4)
    x = inputs()
    changed = x.clone()
    changed[:, 15:] = torch.randn_like(changed[:, 15:])
    a, b = layer(x), layer(changed)
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=0)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def reference_kl(layer, x: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(I)) over the selected keys, p = attention summed over heads and L1-normalised."""
    B, T, _ = x.shape
    scores = layer.indexer(x)
    selected = topk_mask(scores, layer.topk)
    q, k, _ = layer.qkv_proj(x).view(B, T, 3, layer.n_heads, layer.head_dim).permute(2, 0, 3, 1, 4)
    q, k = layer.rotary(q), layer.rotary(k)
    logits = (q @ k.transpose(-1, -2) / math.sqrt(layer.head_dim)).masked_fill(~selected[:, None], float("-inf"))
    p = logits.softmax(-1).sum(1)
    p = p / p.sum(-1, keepdim=True)
    total = 0.0
    for b in range(B):
        for t in range(T):
            keys = selected[b, t]
            p_t, log_q_t = p[b, t, keys], scores[b, t, keys].log_softmax(-1)
            total += (p_t * (p_t.log() - log_q_t)).sum()
    return total / (B * T)


@pytest.mark.parametrize("topk", [5, T])
def test_indexer_kl_value_and_gradients_reach_only_the_indexer(topk):
    layer = sparse_layer(topk).train()
    x = inputs().requires_grad_(True)
    out = layer(x)
    kl = layer.aux_losses["indexer_kl"]
    assert torch.isfinite(kl) and kl.item() > 0
    torch.testing.assert_close(kl, reference_kl(layer, x.detach()), rtol=1e-10, atol=1e-12)
    kl.backward(retain_graph=True)
    for name, p in layer.named_parameters():
        has_grad = p.grad is not None and p.grad.abs().sum() > 0
        assert has_grad == name.startswith("indexer."), name
    assert x.grad is None  # the indexer reads a detached input
    layer.zero_grad(set_to_none=True)
    out.square().sum().backward()  # the language-model side never reaches the indexer (top-k has no gradient)
    assert all(p.grad is None for p in layer.indexer.parameters())
    assert layer.qkv_proj.weight.grad is not None and x.grad is not None


def test_indexer_learns_from_kl_and_eval_has_no_aux_loss():
    layer = sparse_layer(topk=6).float()
    x = inputs().float()
    optimizer = torch.optim.Adam(layer.indexer.parameters(), lr=1e-2)
    kls = []
    for _ in range(40):
        layer(x)
        kl = layer.aux_losses["indexer_kl"]
        optimizer.zero_grad()
        kl.backward()
        optimizer.step()
        kls.append(kl.item())
    assert kls[-1] < 0.5 * kls[0]
    layer.eval()
    layer(x)
    assert layer.aux_losses == {}
