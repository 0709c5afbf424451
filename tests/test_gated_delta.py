import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hybridctl.core.model.gated_delta import (
    GatedDeltaNet, causal_conv_silu, chunk_gated_delta_rule_torch, gated_delta_rule, gdn_decay, l2norm, recurrent_gated_delta_rule,
)


def random_inputs(B, T, H, K, V, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    k = l2norm(torch.randn(B, T, H, K, generator=g, dtype=dtype))
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    decay = -torch.rand(B, T, H, generator=g, dtype=dtype) * 0.5
    beta = torch.rand(B, T, H, generator=g, dtype=dtype)
    h0 = torch.randn(B, H, K, V, generator=g, dtype=dtype) * 0.1
    return q, k, v, decay, beta, h0


@pytest.mark.parametrize("B,T,H,K,V,chunk", [(1, 1, 1, 4, 4, 16), (2, 37, 3, 8, 12, 16), (1, 64, 2, 16, 32, 64), (2, 100, 2, 8, 8, 32)])
def test_chunked_matches_recurrent_outputs_and_gradients(B, T, H, K, V, chunk):
    inputs = [x.requires_grad_() for x in random_inputs(B, T, H, K, V, seed=T)]
    q, k, v, g, beta, h0 = inputs
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, s = chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
    w_o, w_s = torch.randn_like(o), torch.randn_like(s)
    grads_ref = torch.autograd.grad((o_ref * w_o).sum() + (s_ref * w_s).sum(), inputs)
    grads = torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), inputs)
    for name, a, b in zip("q k v g beta h0".split(), grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{name}: {m}")


def test_chunk_size_does_not_change_result():
    q, k, v, g, beta, _ = random_inputs(2, 50, 2, 8, 8, seed=3)
    a, _ = chunk_gated_delta_rule_torch(q, k, v, g, beta, chunk_size=8)
    b, _ = chunk_gated_delta_rule_torch(q, k, v, g, beta, chunk_size=64)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_entry_point_applies_norm_sigmoid_and_gate():
    B, T, H, K, V = 1, 20, 2, 8, 16
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    a, b = torch.randn(B, T, H, generator=gen), torch.randn(B, T, H, generator=gen)
    A_log, dt_bias = torch.randn(H, generator=gen), torch.randn(H, generator=gen)
    o = gated_delta_rule(q, k, v, a, b, A_log, dt_bias, backend="torch", chunk_size=8)
    ref, _ = recurrent_gated_delta_rule(l2norm(q), l2norm(k), v, gdn_decay(a, A_log, dt_bias), torch.sigmoid(b))
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-5)
    assert (gdn_decay(a, A_log, dt_bias) <= 0).all()  # decays never amplify the state


def test_shifted_sum_conv_is_a_causal_depthwise_conv1d():
    gen = torch.Generator().manual_seed(2)
    B, T, C, W = 2, 13, 6, 4
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    weight = torch.randn(C, W, generator=gen, dtype=torch.float64)
    conv = F.conv1d(x.transpose(1, 2), weight[:, None, :], groups=C, padding=W - 1)[..., :T].transpose(1, 2)
    torch.testing.assert_close(causal_conv_silu(x, weight), F.silu(conv), rtol=1e-12, atol=1e-12)


def test_layer_outputs_and_gradients_are_finite():
    torch.manual_seed(0)
    layer = GatedDeltaNet(d_model=32, num_heads=2, head_dim=16, expand_v=2.0, chunk_size=16)
    x = torch.randn(2, 45, 32, requires_grad=True)
    y = layer(x)
    y.pow(2).mean().backward()
    assert y.shape == x.shape and torch.isfinite(y).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert x.grad.abs().sum() > 0


def test_layer_is_causal():
    torch.manual_seed(0)
    layer = GatedDeltaNet(d_model=16, num_heads=2, head_dim=8, expand_v=1.0, chunk_size=8)
    x = torch.randn(1, 30, 16)
    y1 = layer(x)
    x2 = x.clone()
    x2[:, 20:] = torch.randn(1, 10, 16)
    y2 = layer(x2)
    torch.testing.assert_close(y1[:, :20], y2[:, :20])
    assert not torch.allclose(y1[:, 20:], y2[:, 20:])


def test_cpu_training_never_imports_fla():
    code = (
        "import sys, torch\n"
        "from hybridctl.core.config import load_config\n"
        "from hybridctl.core.model.hybrid_lm import HybridLM\n"
        "cfg = load_config('tiny'); cfg.model.vocab_size = 300\n"
        "m = HybridLM(cfg.model)\n"
        "m(torch.randint(0, 300, (1, 70)), torch.randint(0, 300, (1, 70))).loss.backward()\n"
        "assert not any(n == 'fla' or n.startswith('fla.') for n in sys.modules), 'fla was imported'\n"
        "assert 'hybridctl.core.kernels.gdn_kernels' not in sys.modules, 'the Triton kernels were imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_layer_path_on_cpu_is_the_reference():
    from hybridctl.core.model.gdn_dispatch import layer_path

    assert layer_path(False, 128, 256, 4, "auto") == "torch"
    assert layer_path(False, 128, 256, 4, "torch") == "torch"
    with pytest.warns(RuntimeWarning, match="'fused' needs CUDA"):
        assert layer_path(False, 64, 128, 4, "fused") == "torch"


def test_fused_op_shape_limits():
    from hybridctl.core.kernels.gdn_fused import shape_supported

    assert shape_supported(128, 256, 4) and shape_supported(64, 128, 2)
    assert not shape_supported(96, 192, 4)  # a program holds one head: powers of two only
    assert not shape_supported(128, 256, 5)  # the weight-gradient kernel has four taps
    assert not shape_supported(512, 512, 4)  # fla's chunk kernels stop at head_dim 256


def test_fla_launch_configs_only_where_measured(monkeypatch):
    """The fused op's own launch configs for fla's kernels apply on Hopper at the head sizes the GPU tests check;
    other GPUs and shapes get None (fla's autotuned wrapper), and an explicit config passes through."""
    from hybridctl.core.kernels import gdn_fused

    k, v = torch.empty(1, 1, 1, 128), torch.empty(1, 1, 1, 256)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert gdn_fused.launch_config("dqkwg", k, v) == gdn_fused.HOPPER_CONFIGS["dqkwg"]
    assert gdn_fused.launch_config("dqkwg", k[..., :64], v[..., :128]) is None
    assert gdn_fused.launch_config("wy_bwd", k, v) is None  # measured, and no config beat fla's
    assert gdn_fused.launch_config("dqkwg", k, v, config=None) is None
    assert gdn_fused.launch_config("dqkwg", k, v, config={"BV": 32}) == {"BV": 32}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert gdn_fused.launch_config("dqkwg", k, v) is None
