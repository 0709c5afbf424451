"""The project's Triton kernels against the PyTorch code they replace on CUDA: the Gated DeltaNet short convolution
(+ SiLU + L2 norm) and gated RMSNorm, on column slices of a wider projection as the fused op passes them, and the
chunk recurrence's state gradients (against autograd); the fused linear + cross-entropy; SwiGLU's activation; the
rotary embedding. Forward and gradients. Without a GPU they run in Triton's interpreter on the CPU; on a GPU,
compiled."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU, conftest.py switches Triton to its interpreter
pytest.importorskip("triton")

from hybridctl.core.kernels import add_norm, fused_loss, gdn_kernels, rope, short_conv, swiglu  # noqa: E402
from hybridctl.core.model.attention import Rotary  # noqa: E402
from hybridctl.core.model.gated_delta import GatedRMSNorm, causal_conv_silu, l2norm  # noqa: E402

SENTINEL = 7.0  # fills gradient buffers: columns a kernel must not write keep it


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("width,tiles,two_sources,value_heads", [
    (4, None, False, 2), (2, None, False, 2), (1, None, False, 2), (4, (4, 3, 2, 2), True, 2),
    (3, (8, 2, 2, 3), False, 2), (4, (2, 5, 1, 1), True, 2), (4, (1, 2, 1, 2), False, 2), (4, None, True, 1)])
def test_short_conv_matches_reference(width, tiles, two_sources, value_heads):
    """q, k and v in one launch, read from the fused projection's first columns in place: q's and k's
    channels L2-normalised per head, v's not. tiles: both kernels at several programs along T, each walking one or
    more spans of time, some shorter than the taps' reach into the next, with or without pipelined loads, the last
    program past T (None: the defaults).
    two_sources: k's incoming gradient given as two tensors that the backward sums. value_heads: v's width in
    heads of q's size; at 1, v has half a head's channels per head (expand_v 0.5), so its last block is partial."""
    torch.manual_seed(0)
    B, T, H, K = 2, 45, 2, 16  # T is not a multiple of any tile
    V = K * value_heads // 2
    KD, VD = H * K, H * V
    C = 2 * KD + VD
    proj = torch.randn(B, T, C + 24, device=DEVICE)  # + a gate's columns, which the kernels must leave alone
    weight = torch.randn(C, width, device=DEVICE)

    x_ref, w_ref = proj[..., :C].double().requires_grad_(), weight.double().requires_grad_()
    conv = causal_conv_silu(x_ref, w_ref)
    q, k, v = conv.split([KD, KD, VD], dim=-1)
    refs = [l2norm(q.reshape(B, T, H, K)).reshape(B, T, KD), l2norm(k.reshape(B, T, H, K)).reshape(B, T, KD), v]
    grads = [torch.randn(B, T, n, device=DEVICE) for n in (KD, KD, VD)]
    torch.autograd.backward(refs, [g.double() for g in grads])

    y = short_conv.short_conv_fwd(proj, weight, KD, VD, K, **({"tiles": tiles} if tiles else {}))
    d_proj = torch.full_like(proj, SENTINEL)
    dq, dk, dv = grads
    dk2 = None
    if two_sources:
        dk, dk2 = dk * 0.25, dk * 0.75
    dw = short_conv.short_conv_bwd(proj, weight, dq, dk, dv, d_proj[..., :C], KD, VD, K, dk2=dk2,
                                    **({"tiles": tiles} if tiles else {}))

    outs = short_conv.qkv_views(y, B, T, H, K, V)
    for out, ref in zip(outs, refs):
        assert out.is_contiguous() and max_rel(out.reshape(ref.shape), ref) < 1e-5
    assert max_rel(d_proj[..., :C], x_ref.grad) < 1e-5
    assert max_rel(dw, w_ref.grad) < 1e-5
    assert (d_proj[..., C:] == SENTINEL).all()


def test_short_conv_never_mixes_sequences():
    """The convolution looks back within its own sequence only: changing the end of sequence 0 leaves the
    start of sequence 1 untouched."""
    torch.manual_seed(1)
    x = torch.randn(2, 20, 48, device=DEVICE)
    weight = torch.randn(48, 4, device=DEVICE)
    y = short_conv.short_conv_fwd(x, weight, 16, 16, 16).view(3, 2, 20, 16)
    x2 = x.clone()
    x2[0, -3:] += 5.0
    y2 = short_conv.short_conv_fwd(x2, weight, 16, 16, 16).view(3, 2, 20, 16)
    assert torch.equal(y[:, 1], y2[:, 1]) and not torch.equal(y[:, 0, -3:], y2[:, 0, -3:])


@pytest.mark.parametrize("rows", [None, 16])
def test_gate_beta_grad_matches_autograd(rows):
    """The decay's and beta's backward in one kernel against autograd through g = -exp(A_log) * softplus(a +
    dt_bias) and beta = sigmoid(b), with logits past softplus's threshold, several programs, the last short, and a
    head count that is not a power of two."""
    torch.manual_seed(5)
    B, T, H = 2, 21, 3
    ab = torch.randn(B, T, 2 * H, device=DEVICE) * 4
    ab[0, 0, 0] = 25.0  # softplus(x) = x there
    A_log, dt_bias = torch.randn(H, device=DEVICE), torch.randn(H, device=DEVICE)
    a_ref, b_ref = ab[..., :H].double().requires_grad_(), ab[..., H:].double().requires_grad_()
    A_ref, bias_ref = A_log.double().requires_grad_(), dt_bias.double().requires_grad_()
    g = -A_ref.exp() * F.softplus(a_ref + bias_ref)
    beta = torch.sigmoid(b_ref)
    dg, dbeta = torch.randn(B, T, H, device=DEVICE), torch.randn(B, T, H, device=DEVICE)
    torch.autograd.backward([g, beta], [dg.double(), dbeta.double()])

    d_ab, dA, dbias = gdn_kernels.gate_beta_grad(ab, A_log, dt_bias, dg, beta.detach().float(), dbeta,
                                                 **({"rows": rows} if rows else {}))
    assert d_ab.shape == ab.shape and dA.shape == dbias.shape == (H,)
    assert dA.untyped_storage().data_ptr() != dbias.untyped_storage().data_ptr()  # the fused op returns both
    assert max_rel(d_ab[..., :H], a_ref.grad) < 1e-5 and max_rel(d_ab[..., H:], b_ref.grad) < 1e-5
    assert max_rel(dA, A_ref.grad) < 1e-5 and max_rel(dbias, bias_ref.grad) < 1e-5


@pytest.mark.parametrize("tiles", [None, (4, 3, 2, 2), (2, 4, 1, 1)])
def test_gated_rms_norm_matches_reference(tiles):
    """tiles: the backward at several programs, each over several tiles with or without pipelined loads, the last
    one short (None: the defaults)."""
    torch.manual_seed(2)
    B, T, H, V = 2, 9, 3, 32  # B * T * H rows is not a multiple of the row tile
    o = torch.randn(B, T, H, V, device=DEVICE)
    proj = torch.randn(B, T, 3 * H * V, device=DEVICE)
    gate = proj[..., H * V : 2 * H * V]
    norm = GatedRMSNorm(V, 1e-5).to(DEVICE).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    weight = norm.weight.detach().float()

    o_ref, gate_ref = o.double().requires_grad_(), gate.double().requires_grad_()
    ref = norm(o_ref, gate_ref.view(B, T, H, V)).reshape(B, T, H * V)
    dy = torch.randn(B, T, H * V, device=DEVICE)
    ref.backward(dy.double())

    y = gdn_kernels.gated_rms_norm_fwd(o, gate, weight, norm.eps)
    d_proj = torch.full_like(proj, SENTINEL)
    do, dw = gdn_kernels.gated_rms_norm_bwd(dy, o, gate, weight, norm.eps, d_proj[..., H * V : 2 * H * V],
                                            **({"tiles": tiles} if tiles else {}))

    assert max_rel(y, ref) < 1e-5
    assert max_rel(do, o_ref.grad) < 1e-5
    assert max_rel(d_proj[..., H * V : 2 * H * V], gate_ref.grad) < 1e-5
    assert max_rel(dw, norm.weight.grad) < 1e-5
    assert (d_proj[..., : H * V] == SENTINEL).all() and (d_proj[..., 2 * H * V :] == SENTINEL).all()


def chunk_recurrence(q, k, w, u, g, scale, chunk):
    """The chunked gated delta rule's state recurrence and output, from the WY factor w and values u (g: the
    chunk-local cumulative log2 gate), and the state leaving each chunk, kept for its gradient."""
    B, T, H, K = q.shape
    h = torch.zeros(B, H, K, u.shape[-1], dtype=q.dtype)
    states, outs = [], []
    for t0 in range(0, T, chunk):
        qc, kc, wc, uc = (x[:, t0 : t0 + chunk].transpose(1, 2) for x in (q, k, w, u))  # [B, H, L, *]
        gc = g[:, t0 : t0 + chunk].transpose(1, 2)  # [B, H, L]
        v_new = uc - wc @ h
        causal = torch.ones(gc.shape[-1], gc.shape[-1], dtype=torch.bool).tril()
        decay = torch.exp2(torch.where(causal, gc[..., :, None] - gc[..., None, :], float("-inf")))
        outs.append(scale * ((qc * torch.exp2(gc)[..., None]) @ h + (qc @ kc.transpose(-1, -2) * decay) @ v_new))
        g_last = gc[..., -1:]
        h = h * torch.exp2(g_last)[..., None] + (kc * torch.exp2(g_last - gc)[..., None]).transpose(-1, -2) @ v_new
        h.retain_grad()
        states.append(h)
    return torch.cat(outs, dim=2).transpose(1, 2), states


@pytest.mark.parametrize("tiles", [None, (16, 2, 2), (32, 8, 2), (64, 8, 3)])
def test_state_grad_matches_autograd(tiles):
    """The state and corrected-value gradients against autograd through the recurrence in fp64, over three chunks
    (the last one short), and (16, ...) splits the value columns over two programs per head."""
    torch.manual_seed(8)
    B, T, H, K, V, chunk = 2, 150, 2, 16, 32, 64
    q, k, w = (torch.randn(B, T, H, K, device=DEVICE) * 0.5 for _ in range(3))
    u, do = torch.randn(B, T, H, V, device=DEVICE), torch.randn(B, T, H, V, device=DEVICE)
    g = torch.cat([-(torch.rand(B, n, H, device=DEVICE) * 0.2).cumsum(1) for n in (chunk, chunk, T - 2 * chunk)], 1)
    scale = K**-0.5
    u_ref = u.double().requires_grad_()
    o, states = chunk_recurrence(*(x.double().cpu() for x in (q, k, w)), u_ref.cpu(), g.double().cpu(), scale, chunk)
    o.backward(do.double().cpu())

    dh, dv = gdn_kernels.state_grad(q, k, w, g, do, scale, chunk, **({"tiles": tiles} if tiles else {}))
    tol = 1e-5 if DEVICE == "cpu" else 5e-3  # a GPU multiplies fp32 tiles in TF32
    assert dh.shape == (B, 3, H, K, V) and dv.shape == u.shape
    assert max_rel(dv, u_ref.grad) < tol
    last = states[-1]  # the output does not depend on the final state
    assert last.grad is None and (dh[:, -1] == 0).all()
    assert max_rel(dh[:, :-1].cpu(), torch.stack([s.grad for s in states[:-1]], dim=1)) < tol


@pytest.mark.parametrize("delta_dtype,tiles,sum_used", [(torch.bfloat16, None, True), (torch.float32, (2, 4, 2, 2), True),
                                                        (torch.float32, None, False), (None, None, True),
                                                        (None, (2, 4, 2, 2), True)])
def test_add_rms_norm_matches_autograd(delta_dtype, tiles, sum_used, monkeypatch):
    """s = x + delta and its RMSNorm, forward and both gradients, against autograd through x + delta and
    F.rms_norm in fp64. 50 rows of 96 (neither a whole number of tiles nor a power of two); (2, 4, ...) runs 4
    tiles per program over 7 programs, so the weight gradient sums partials. sum_used False: only the norm gets a
    gradient (the final norm's case), so the backward runs without one for the sum."""
    if tiles:
        monkeypatch.setattr(add_norm, "BWD_TILES", tiles)
    torch.manual_seed(10)
    R, D, eps = 50, 96, 1e-5
    x = (torch.randn(R, D, device=DEVICE) * 2).requires_grad_()
    delta = torch.randn(R, D, device=DEVICE).to(delta_dtype).requires_grad_() if delta_dtype else None
    weight = (1 + torch.randn(D, device=DEVICE) * 0.1).requires_grad_()
    ds, dn = torch.randn(R, D, device=DEVICE), torch.randn(R, D, device=DEVICE)
    if not sum_used:
        ds = torch.zeros_like(ds)
    s, n = add_norm.add_rms_norm(x, delta, weight, eps)
    assert s.dtype == n.dtype == torch.float32
    if sum_used:
        torch.autograd.backward([s, n], [ds, dn])  # one backward kernel takes both gradients
    else:
        n.backward(dn)

    leaves = [t.detach().double().cpu().requires_grad_() for t in (x, weight) + ((delta,) if delta is not None else ())]
    s_ref = leaves[0] + leaves[2] if delta is not None else leaves[0]
    n_ref = F.rms_norm(s_ref, (D,), leaves[1], eps)
    ((s_ref * ds.double().cpu()).sum() + (n_ref * dn.double().cpu()).sum()).backward()
    tol = 1e-5
    assert max_rel(s.detach().cpu(), s_ref.detach()) < tol and max_rel(n.detach().cpu(), n_ref.detach()) < tol
    assert max_rel(x.grad.cpu(), leaves[0].grad) < tol
    assert max_rel(weight.grad.cpu(), leaves[1].grad) < tol
    if delta is not None:
        assert delta.grad.dtype == delta_dtype
        assert max_rel(delta.grad.cpu(), leaves[2].grad) < (1e-2 if delta_dtype == torch.bfloat16 else tol)


def test_add_rms_norm_rejects_other_shapes_and_takes_strided_input():
    """delta must have x's shape (no broadcasting: the kernel reads x's rows from it); a strided x is read as a
    contiguous copy, forward and backward."""
    x, w = torch.randn(8, 16, device=DEVICE), torch.ones(16, device=DEVICE)
    with pytest.raises(AssertionError, match="shape"):
        add_norm.add_rms_norm(x, torch.randn(1, 16, device=DEVICE), w, 1e-5)
    xt = torch.randn(16, 8, device=DEVICE).t().requires_grad_()
    n = add_norm.add_rms_norm(xt, None, w, 1e-5)[1]
    n.sum().backward()
    ref = xt.detach().clone().requires_grad_()
    F.rms_norm(ref, (16,), w, 1e-5).sum().backward()
    assert max_rel(n, F.rms_norm(ref, (16,), w, 1e-5)) < 1e-5 and max_rel(xt.grad, ref.grad) < 1e-4


def test_add_rms_norm_compiled_matches_eager():
    """Two chained add + norm ops under torch.compile, registered with inductor as the trainer registers them,
    against the same calls run eagerly: outputs and every gradient. The last sum is unused (no gradient for it)."""
    from hybridctl.core.kernels import inductor_fallbacks

    assert inductor_fallbacks.register()
    torch.manual_seed(3)
    leaves = [torch.randn(6, 32, device=DEVICE).requires_grad_() for _ in range(3)]
    weights = [(1 + 0.1 * torch.randn(32, device=DEVICE)).requires_grad_() for _ in range(2)]

    def chain(x, d1, d2, w1, w2):
        s1, n1 = add_norm.add_rms_norm(x, d1, w1, 1e-5)
        return add_norm.add_rms_norm(s1, d2 * n1, w2, 1e-5)[1]

    results = []
    for fn in (chain, torch.compile(chain, fullgraph=True)):
        out = fn(*leaves, *weights)
        grads = torch.autograd.grad((out * out).sum(), leaves + weights)
        results.append((out.detach(), grads))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert max_rel(compiled, eager) < 1e-6
    assert all(max_rel(a, b) < 1e-5 for a, b in zip(compiled_grads, eager_grads))


def test_model_through_the_add_norm_op_matches_pytorch(monkeypatch):
    """The model's blocks wired through the op (as on CUDA) against the PyTorch path, on layers of every kind
    (Gated DeltaNet, attention, sparse attention) with an MoE layer: loss and every gradient."""
    from conftest import micro_config
    from hybridctl.core.model import layers
    from hybridctl.core.model.hybrid_lm import build_model

    cfg = micro_config(['model.pattern="LDLF"', "model.n_layers=4", "model.moe.n_experts=4"])
    cfg.model.vocab_size = 256
    torch.manual_seed(0)
    model = build_model(cfg.model).to(DEVICE)
    tokens = torch.randint(0, 256, (2, 33), device=DEVICE)

    def plain(self, x, delta):  # what CPU runs; on CUDA the model would take the op itself
        s = x if delta is None else x + delta
        return s, self(s)

    def through_the_op(self, x, delta):
        return add_norm.add_rms_norm(x, delta, self.weight, self.eps, self.cast_to_autocast)

    results = []
    for add_and_norm in (plain, through_the_op):
        monkeypatch.setattr(layers.RMSNorm, "add_and_norm", add_and_norm)
        model.zero_grad(set_to_none=True)
        loss = model(tokens[:, :-1], tokens[:, 1:]).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (ref_loss, ref_grads), (loss, grads) = results
    assert max_rel(loss, ref_loss) < 1e-6
    assert all(max_rel(a, b) < 1e-4 for a, b in zip(grads, ref_grads))


def test_add_rms_norm_outputs_autocast_dtype():
    """Under autocast the norm comes out in the matmul's dtype; the residual stream keeps x's."""
    x, delta = torch.randn(3, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE, dtype=torch.bfloat16)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        s, n = add_norm.add_rms_norm(x, delta, torch.ones(8, device=DEVICE), 1e-5)
    assert s.dtype == torch.float32 and n.dtype == torch.bfloat16
    assert max_rel(n.float(), F.rms_norm(x + delta.float(), (8,), eps=1e-5)) < 1e-2
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # for a reader in fp32 (the MoE router), as F.rms_norm gives
        n32 = add_norm.add_rms_norm(x, delta, torch.ones(8, device=DEVICE), 1e-5, cast_to_autocast=False)[1]
    assert n32.dtype == torch.float32
    assert max_rel(n32, F.rms_norm(x + delta.float(), (8,), eps=1e-5)) < 1e-5


def test_every_custom_op_is_registered_with_inductor():
    """Each op the package's source defines gets its fallback (with the layout constraint inductor would pick)
    before compiling, so an op in a module left off the list fails here rather than slowing compiles down at
    depth."""
    from torch._inductor.lowering import lowerings, maybe_layout_constraints, tag_to_layout_constraint
    from torch._library.utils import get_layout_constraint_tag

    from hybridctl.core.kernels import inductor_fallbacks

    import pathlib
    import re

    assert inductor_fallbacks.register()
    package = pathlib.Path(inductor_fallbacks.__file__).parents[1]
    defined = {(path.stem, name) for path in package.rglob("*.py")  # every op the package's source defines
               for name in re.findall(r'custom_op\(\s*"hybridctl::(\w+)"', path.read_text())}
    assert {module for module, _ in defined} == set(inductor_fallbacks.OP_MODULES)
    names = inductor_fallbacks.op_names()
    assert sorted(names) == sorted(name for _, name in defined)
    for name in names:
        op = getattr(torch.ops.hybridctl, name).default
        assert op in lowerings
        expected = tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
        assert expected is not None and maybe_layout_constraints(op) is expected


def test_fused_loss_scales_bf16_gradients_in_fp32():
    """The fused loss's gradients, made in the forward, are scaled by the incoming gradient (1 / grad_accum) in
    fp32: the bf16 result is the unscaled one times 1/3 rounded once, with no bf16-rounded 1/3 in it."""
    torch.manual_seed(4)
    h = torch.randn(64, 32, device=DEVICE).bfloat16().requires_grad_()
    w = (torch.randn(100, 32, device=DEVICE) * 0.1).bfloat16().requires_grad_()
    y = torch.randint(0, 100, (64,), device=DEVICE)
    fused_loss.fused_linear_cross_entropy(h, w, y, 32).backward()
    unscaled = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (fused_loss.fused_linear_cross_entropy(h, w, y, 32) / 3).backward()
    third = torch.tensor(1 / 3)
    assert all(torch.equal(g, (u.float() * third).bfloat16()) for g, u in zip((h.grad, w.grad), unscaled))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_grad_kernel_matches_cross_entropy(dtype):
    """Per-row loss and in-place gradient against autograd through F.cross_entropy in fp64, with a vocabulary that
    is not a multiple of the block and targets at both ends of it."""
    torch.manual_seed(3)
    n, V = 7, 1000
    x = (torch.randn(n, V, device=DEVICE) * 4).to(dtype)
    targets = torch.randint(0, V, (n,), device=DEVICE)
    targets[0], targets[1] = 0, V - 1
    x_ref = x.double().requires_grad_()
    ref = F.cross_entropy(x_ref, targets, reduction="none")
    (ref.sum() * 0.25).backward()

    grad = x.clone()
    row_loss = fused_loss.softmax_grad_(grad, targets, 0.25, block=256, warps=4)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the gradient is rounded to 8 bits of mantissa
    assert max_rel(row_loss, ref) < 1e-6
    assert max_rel(grad, x_ref.grad) < tol
    assert grad.dtype == dtype


@pytest.mark.parametrize("n,chunk", [(37, 10), (37, 37), (5, 64)])
def test_fused_linear_cross_entropy_matches_autograd(n, chunk):
    """Loss and gradients of h and weight against F.cross_entropy(h @ weight.T) in fp64, over several chunks (the
    last one short), one chunk, and fewer tokens than a chunk; the upstream gradient scales both."""
    torch.manual_seed(4)
    D, V = 16, 300
    h = torch.randn(n, D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    weight = torch.randn(V, D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, V, (n,), device=DEVICE)
    (3.0 * fused_loss.fused_linear_cross_entropy(h, weight, targets, chunk_tokens=chunk)).backward()
    h_ref, w_ref = h.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = F.cross_entropy(h_ref @ w_ref.t(), targets)
    (3.0 * ref).backward()
    loss = fused_loss.fused_linear_cross_entropy(h.detach(), weight.detach(), targets, chunk_tokens=chunk)
    assert abs(loss.item() - ref.item()) < 1e-6 * ref.item()  # the kernel computes in fp32
    assert max_rel(h.grad, h_ref.grad) < 1e-6
    assert max_rel(weight.grad, w_ref.grad) < 1e-6


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_swiglu_matches_reference(dtype, tol):
    """silu(gate) * up and its gradient for [gate | up] against autograd in fp64; rows x width is not a multiple of
    the block, and the width is not a power of two."""
    torch.manual_seed(5)
    gate_up = (torch.randn(3, 13, 2 * 48, device=DEVICE) * 3).to(dtype)
    ref_in = gate_up.double().requires_grad_()
    gate, up = ref_in.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    dh = torch.randn(ref.shape, device=DEVICE).to(dtype)
    ref.backward(dh.double())

    x = gate_up.clone().requires_grad_()
    h = swiglu.swiglu(x)
    h.backward(dh)
    assert h.shape == ref.shape and h.dtype == dtype and x.grad.dtype == dtype
    assert max_rel(h, ref) < tol
    assert max_rel(x.grad[..., :48], ref_in.grad[..., :48]) < tol  # gate half
    assert max_rel(x.grad[..., 48:], ref_in.grad[..., 48:]) < tol  # up half


def test_rotary_qkv_matches_reference():
    """q and k rotated and v copied out of a fused projection, and the projection's gradient, against Rotary in
    fp64; T is not a multiple of the row tile, and the incoming gradients are laid out [B, H, T, D] as attention
    returns them."""
    torch.manual_seed(6)
    B, T, H, D = 2, 37, 3, 16
    rotary = Rotary(D).to(DEVICE)
    qkv = torch.randn(B, T, 3 * H * D, device=DEVICE)
    ref_in = qkv.double().requires_grad_()
    q_ref, k_ref, v_ref = ref_in.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    refs = (rotary(q_ref), rotary(k_ref), v_ref)  # [B, H, T, D]
    grads = [torch.randn(B, H, T, D, device=DEVICE) for _ in range(3)]
    torch.autograd.backward(refs, [g.double() for g in grads])

    x = qkv.clone().requires_grad_()
    cos, sin = rotary.tables(T, qkv.device)
    outs = [o.transpose(1, 2) for o in rope.rotary_qkv(x, cos[:, : D // 2], sin[:, : D // 2], H)]
    torch.autograd.backward(outs, grads)
    for out, ref in zip(outs, refs):
        assert max_rel(out, ref) < 1e-6
    assert max_rel(x.grad, ref_in.grad) < 1e-6


COMPILE_FOR_HOPPER = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hybridctl.core.kernels import add_norm as an
from hybridctl.core.kernels import fused_loss as fl
from hybridctl.core.kernels import gdn_kernels as gk
from hybridctl.core.kernels import short_conv
from hybridctl.core.kernels import rope
from hybridctl.core.kernels import swiglu as sw

conv = {"W": 4, "BC": 128}


def tiles(t, rows):  # (rows per tile, tiles per program, warps, stages) -> the kernel's constexprs
    return {rows: t[0], "TILES": t[1], "STAGES": t[3]}


def spans(t):  # (spans per program, steps per span, warps, stages) -> the kernel's constexprs
    return {"SPANS": t[0], "L": t[1], "STAGES": t[3]}


cases = [  # (kernel, signature of its tensor and scalar arguments, constexprs, warps): the defaults launch these
    (short_conv._short_conv_fwd_kernel, "x:*bf16 x_row_stride:i32 w:*fp32 y:*bf16 N:i32 T:i32 KD:i32 VD:i32 eps:fp32",
     {**conv, **spans(short_conv.CONV_FWD_TILES)}, short_conv.CONV_FWD_TILES[2]),
    (short_conv._short_conv_bwd_kernel, "x:*bf16 x_row_stride:i32 w:*fp32 dq:*bf16 dk:*bf16 dv:*bf16 dk2:*bf16 dx:*bf16 "
     "dx_row_stride:i32 dw_part:*fp32 T:i32 KD:i32 VD:i32 eps:fp32",
     {**conv, **spans(short_conv.CONV_BWD_TILES), "HAS_DK2": True}, short_conv.CONV_BWD_TILES[2]),
    (gk._gated_norm_fwd_kernel, "o:*bf16 gate:*bf16 gate_row_stride:i32 w:*fp32 y:*bf16 R:i32 H:i32 eps:fp32",
     {"V": 256, "BR": gk.NORM_ROWS}, gk.NORM_WARPS),
    (gk._gated_norm_bwd_kernel, "dy:*bf16 o:*bf16 gate:*bf16 gate_row_stride:i32 w:*fp32 do:*bf16 dgate:*bf16 "
     "dgate_row_stride:i32 dw_part:*fp32 R:i32 H:i32 eps:fp32", {"V": 256, **tiles(gk.NORM_BWD_TILES, "BR")},
     gk.NORM_BWD_TILES[2]),
    (an._add_norm_fwd_kernel, "x:*fp32 delta:*bf16 w:*fp32 s:*fp32 n:*bf16 R:i32 eps:fp32",
     {"D": 768, "BLOCK": 1024, "BR": an.ROWS, "HAS_DELTA": True}, an.WARPS),
    (an._add_norm_bwd_kernel, "ds:*fp32 dn:*bf16 s:*fp32 w:*fp32 dx:*fp32 d_delta:*bf16 dw_part:*fp32 R:i32 eps:fp32",
     {"D": 768, "BLOCK": 1024, **tiles(an.BWD_TILES, "BR"), "HAS_DS": True, "HAS_DELTA": True}, an.BWD_TILES[2]),
    (fl._softmax_grad_kernel, "logits:*bf16 row_stride:i32 targets:*i64 row_loss:*fp32 grad_scale:fp32",
     {"V": 49152, "BLOCK": fl.BLOCK_V}, fl.WARPS),
    (rope._rotary_kernel, "src:*bf16 src_b:i32 src_t:i32 src_h:i32 dst:*bf16 dst_b:i32 dst_t:i32 dst_h:i32 "
     "cos:*fp32 sin:*fp32 table_stride:i32 T:i32", {"HALF": 32, "BT": rope.ROWS, "ROTATE": True, "INVERSE": False},
     rope.WARPS),
    (gk._gate_beta_grad_kernel, "ab:*bf16 A_log:*fp32 dt_bias:*fp32 dg:*fp32 beta:*bf16 dbeta:*bf16 d_ab:*bf16 "
     "d_part:*fp32 R:i32", {"H": 6, "BR": gk.GATE_ROWS, "BH": 8}, gk.GATE_WARPS),
    (gk._state_grad_kernel, "q:*bf16 k:*bf16 w:*bf16 g:*fp32 do:*bf16 dh:*bf16 dv:*bf16 T:i32 scale:fp32",
     {"H": 6, "K": 128, "V": 256, "BT": 64, "BV": gk.STATE_GRAD_TILES[0], "NT": 16, "STAGES": gk.STATE_GRAD_TILES[2]},
     gk.STATE_GRAD_TILES[1]),
    (sw._swiglu_fwd_kernel, "gate_up:*bf16 h:*bf16 n:i64", {"F": 2048, "BLOCK": sw.BLOCK}, sw.WARPS),
    (sw._swiglu_bwd_kernel, "dh:*bf16 gate_up:*bf16 d_gate_up:*bf16 n:i64", {"F": 2048, "BLOCK": sw.BLOCK}, sw.WARPS),
]
# Every kernel of these modules that takes PDL is launched that way on Hopper, so every one is checked here.
with_pdl = {f.fn.__name__ for module in (an, fl, gk, short_conv, rope, sw) for f in vars(module).values()
            if isinstance(f, triton.runtime.jit.JITFunction) and "PDL" in f.arg_names
            and f.fn.__module__ == module.__name__}
assert with_pdl == {kernel.fn.__name__ for kernel, *_ in cases}, with_pdl
for kernel, signature, constexprs, warps in cases:
    constexprs = {**constexprs, "PDL": True}  # as Hopper launches them (pdl.py)
    sig = dict(item.split(":") for item in signature.split())
    # A launch marks the pointers and integers divisible by 16 as such (all are at the study shape), which is what
    # lets loads vectorize and loops pipeline
    aligned = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in sig.items()
               if kind[0] == "*" or kind == "i32"}
    sig.update({name: "constexpr" for name in constexprs})
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=aligned),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "launch_pdl": True})
    assert len(compiled.asm["cubin"]) > 0 and compiled.metadata.launch_pdl
    ptx = compiled.asm["ptx"]
    first_read = min(ptx.find(op) for op in ("ld.global", "cp.async") if op in ptx)
    assert ptx.index("griddepcontrol.wait") < first_read, "waits before its first read of global memory"
    if "STAGES" in constexprs:  # the tile loop's loads copied ahead into shared memory (see the kernels' notes)
        assert "cp.async" in ptx, f"{compiled.metadata.name}: the loop's loads are not pipelined"
    print(compiled.metadata.name)
'''


def test_kernels_compile_for_hopper():
    """The interpreter is lenient: compile every kernel at its default tiles to Hopper machine code (Triton's own
    ptxas; no GPU needed), as a CUDA run would, with the programmatic dependent launch's wait before any load and,
    in the kernels that loop over tiles, the loop's loads pipelined."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["_short_conv_fwd_kernel", "_short_conv_bwd_kernel",
                                     "_gated_norm_fwd_kernel", "_gated_norm_bwd_kernel", "_add_norm_fwd_kernel",
                                     "_add_norm_bwd_kernel", "_softmax_grad_kernel", "_rotary_kernel", "_gate_beta_grad_kernel",
                                     "_state_grad_kernel",
                                     "_swiglu_fwd_kernel", "_swiglu_bwd_kernel"]


# ---------------------------------------------------------------------------------------------------------
# Launch settings (no GPU needed)


@pytest.mark.parametrize("env,capability,expected", [
    ({}, (9, 0), True), ({}, (10, 0), True), ({}, (8, 0), False),
    ({"TORCHINDUCTOR_ENABLE_PDL": "0"}, (9, 0), False), ({"TORCHINDUCTOR_ENABLE_PDL": "1"}, (9, 0), True),
    ({"TORCHINDUCTOR_ENABLE_PDL": "false"}, (9, 0), False), ({"TRITON_INTERPRET": "1"}, (9, 0), False)])
def test_dependent_launch_options(monkeypatch, env, capability, expected):
    """The project's kernels launch as programmatic dependent launches on CUDA from compute capability 9, unless
    the environment turns it off (the switch inductor reads) or the interpreter runs them."""
    from hybridctl.core.kernels import pdl

    for name in ("TORCHINDUCTOR_ENABLE_PDL", "TRITON_INTERPRET"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    pdl._enabled.cache_clear()
    try:
        assert pdl.launch_options(torch.device("cuda", 0)) == ({"PDL": True, "launch_pdl": True} if expected else {"PDL": False})
        assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}
    finally:
        pdl._enabled.cache_clear()


@pytest.mark.parametrize("env,options", [({}, {"triton.enable_pdl": True}), ({"TORCHINDUCTOR_ENABLE_PDL": "0"}, None)])
def test_compile_model_asks_inductor_for_dependent_launch(monkeypatch, env, options):
    from hybridctl.core.training import steps

    monkeypatch.delenv("TORCHINDUCTOR_ENABLE_PDL", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: calls.append(kwargs) or module)
    module = torch.nn.Linear(2, 2)
    assert steps.compile_model(module) is module
    assert calls == [{"options": options} if options else {}]
