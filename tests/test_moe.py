import math

import pytest
import torch

from hybridctl.core.config import MoEConfig
from hybridctl.core.model.moe import MoE, gather_dispatch, slot_dispatch

D_MODEL, D_FF = 16, 24


def moe_layer(n_experts=4, top_k=2, capacity_factor=1.25, seed=0) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(D_MODEL, D_FF, MoEConfig(n_experts=n_experts, top_k=top_k, capacity_factor=capacity_factor)).double()
    torch.nn.init.normal_(layer.router.weight, 0.0, 1.0)  # decisive routing, few near-ties
    return layer


def loop_reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax, top-k, renormalise; experts take assignments first-choices-first, then in
    token order, until `capacity` is reached."""
    tokens = x.reshape(-1, x.shape[-1])
    N = tokens.shape[0]
    capacity = math.ceil(layer.capacity_factor * N * layer.top_k / layer.n_experts)
    probs = [(layer.router.weight @ tok).softmax(-1) for tok in tokens]
    choices = [p.topk(layer.top_k).indices.tolist() for p in probs]
    used = [0] * layer.n_experts
    out = torch.zeros_like(tokens)
    for rank in range(layer.top_k):
        for n in range(N):
            e = choices[n][rank]
            if used[e] < capacity:
                used[e] += 1
                gate = probs[n][e] / probs[n][choices[n]].sum()
                out[n] += gate * layer.experts[e](tokens[n])
    return out.view(x.shape)


def test_routing_picks_top_k_logits_and_gates_sum_to_one():
    layer = moe_layer(n_experts=6, top_k=3)
    x = torch.randn(40, D_MODEL, dtype=torch.float64)
    routing = layer.route(x)
    logits = x @ layer.router.weight.t()
    expected = logits.argsort(-1, descending=True)[:, :3]
    assert torch.equal(routing.experts, expected)
    torch.testing.assert_close(routing.gates.sum(-1), torch.ones(40, dtype=torch.float64))
    chosen = logits.softmax(-1).gather(-1, expected)
    torch.testing.assert_close(routing.gates, chosen / chosen.sum(-1, keepdim=True))


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25, 4.0])
def test_output_equals_token_loop(capacity_factor):
    layer = moe_layer(capacity_factor=capacity_factor)
    x = torch.randn(3, 7, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(layer(x), loop_reference(layer, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("capacity_factor,top_k", [(0.5, 2), (1.25, 2), (4.0, 2), (1.0, 1)])
def test_fixed_slots_compute_what_the_token_lists_compute(capacity_factor, top_k):
    """The CUDA dispatch (fixed slots per expert, no routing-dependent shapes) against the CPU one (each expert's
    exact tokens): outputs and every gradient, with drops (0.5) and with more slots than tokens (4.0)."""
    results = []
    for dispatch in ("gather", "slots"):
        layer = moe_layer(top_k=top_k, capacity_factor=capacity_factor)
        x = torch.randn(3, 7, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
        tokens = x.reshape(-1, D_MODEL)
        routing = layer.route(tokens)
        if dispatch == "gather":
            out = gather_dispatch(layer.experts, tokens, routing)
        else:
            out = slot_dispatch(layer.experts, tokens, routing, layer.capacity(tokens.shape[0]))
        out.pow(2).sum().backward()
        results.append((out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (out_g, dx_g, grads_g), (out_s, dx_s, grads_s) = results
    torch.testing.assert_close(out_s, out_g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx_s, dx_g, rtol=1e-12, atol=1e-12)
    for name, grad in grads_g.items():
        torch.testing.assert_close(grads_s[name], grad, rtol=1e-12, atol=1e-12, msg=name)


def test_capacity_serves_first_choices_before_second_choices():
    """Tokens 0-4 prefer experts (0, 1), tokens 5-9 prefer (1, 0); capacity = ceil(1.0 * 10 * 2 / 4) = 5."""
    layer = moe_layer(capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0], layer.router.weight[1, 0] = 3.0, 2.0
        layer.router.weight[0, 1], layer.router.weight[1, 1] = 2.0, 3.0
    x = torch.zeros(10, D_MODEL, dtype=torch.float64)
    x[:5, 0], x[5:, 1] = 1.0, 1.0
    x[:, 2:] = torch.randn(10, D_MODEL - 2, dtype=torch.float64)
    assert layer.capacity(10) == 5
    routing = layer.route(x)
    assert routing.experts[:5].tolist() == [[0, 1]] * 5 and routing.experts[5:].tolist() == [[1, 0]] * 5
    # Each expert is filled by the five first choices it gets; every second choice is dropped.
    assert routing.keep.tolist() == [[True, False]] * 10
    out = layer(x)
    for n in range(10):
        e = routing.experts[n, 0]
        torch.testing.assert_close(out[n], routing.gates[n, 0] * layer.experts[e](x[n]), rtol=1e-12, atol=1e-12)


def test_overflow_tokens_contribute_zero():
    """All 8 tokens want expert 0 first; capacity ceil(1.0 * 8 * 1 / 4) = 2 (top-1): tokens 2..7 get nothing."""
    layer = moe_layer(top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 5.0
    x = torch.randn(8, D_MODEL, dtype=torch.float64)
    x[:, 0] = 1.0
    out = layer(x)
    assert layer.capacity(8) == 2
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))
    gates = layer.route(x).gates[:2]
    torch.testing.assert_close(out[:2], gates * layer.experts[0](x[:2]), rtol=1e-12, atol=1e-12)
    assert 0 < gates.min() and gates.max() < 1  # top-1 keeps the raw router probability


def test_balance_loss_falls_when_the_router_is_trained_on_it():
    layer = moe_layer(seed=3).float()
    with torch.no_grad():  # a router that sends nearly every token to expert 0
        layer.router.weight.mul_(0.1)
        layer.router.weight[0] += 0.5
    torch.manual_seed(0)
    x = torch.randn(256, D_MODEL) + 1.0
    optimizer = torch.optim.Adam(layer.router.parameters(), lr=2e-2)
    losses = []
    for _ in range(60):
        layer(x)
        loss = layer.aux_losses["moe_balance"]
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 1.5 and losses[-1] < 1.1 and losses[-1] < losses[0]
    load = torch.bincount(layer.route(x).experts.reshape(-1), minlength=4) / (256 * 2)
    assert load.max() < 0.4  # spread over the experts, not 1/2 each on two of them
