"""Triton kernels for the parts of the Gated DeltaNet layer around fla's chunk recurrence, and one inside it.

The PyTorch reference they replace: `GatedRMSNorm` and autograd through the gates and the recurrence in model/gated_delta.py.


- `gated_rms_norm_fwd` / `gated_rms_norm_bwd`: RMSNorm over each head's value vector times SiLU(gate), the gate
  read from (and its gradient written to) the fused projection in place.
- `gate_beta_grad`: the backward of the decay gate and of beta = sigmoid(b), written as the gradient of the
  [a | b] logits in one kernel (in place of fla's gate backward, beta's sigmoid and their concatenation).
- `state_grad`: the chunked recurrence's backward through its states (fla's intra-chunk value gradient and
  state-gradient kernels in one: 0.60 against 0.75 ms per layer for fla's pair at its own configs on an H200).

The short convolution's kernels are in short_conv.py. They compute the same function as `GatedRMSNorm` in
model/gated_delta.py, and gate_beta_grad and state_grad the gradients that autograd takes through the gates and the
recurrence (tests run them through Triton's interpreter on CPU against those). Importing this module needs Triton;
model/gated_delta.py imports it only on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridctl.core.kernels.pdl import launch_options, wait_then_release


# (token, head) rows per program and warps, measured best on an H200 at the study shape. The backward runs tiles of
# rows, several per program (so the weight gradient's partial sums are few) with the loop's loads pipelined:
# (rows per tile, tiles per program, warps, pipeline stages).
NORM_ROWS, NORM_WARPS = 16, 4


NORM_BWD_TILES = (4, 8, 2, 3)


@triton.jit
def _head_offset(rows, H, V: tl.constexpr, row_stride):
    """Where (token, head) row `rows` starts in a [tokens, H * V] tensor with the given token stride."""
    return (rows // H).to(tl.int64) * row_stride + (rows % H) * V


@triton.jit
def _gated_norm_load(o, gate, gate_row_stride, rows, cols, R, H, V: tl.constexpr):
    ok = (rows < R)[:, None]
    ov = tl.load(o + rows[:, None].to(tl.int64) * V + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    gate_at = _head_offset(rows, H, V, gate_row_stride)
    gv = tl.load(gate + gate_at[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    return ov, gv


@triton.jit
def _gated_norm_fwd_kernel(o, gate, gate_row_stride, w, y, R, H, eps, V: tl.constexpr, BR: tl.constexpr,
                           PDL: tl.constexpr = False):
    wait_then_release(PDL)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, V)
    ov, gv = _gated_norm_load(o, gate, gate_row_stride, rows, cols, R, H, V)
    rstd = tl.rsqrt(tl.sum(ov * ov, axis=1) / V + eps)
    wv = tl.load(w + cols).to(tl.float32)
    out = ov * rstd[:, None] * wv[None, :] * (gv * tl.sigmoid(gv))
    tl.store(y + rows[:, None].to(tl.int64) * V + cols[None, :], out.to(y.dtype.element_ty), mask=(rows < R)[:, None])


@triton.jit
def _gated_norm_bwd_kernel(dy, o, gate, gate_row_stride, w, do, dgate, dgate_row_stride, dw_part, R, H, eps,
                           V: tl.constexpr, BR: tl.constexpr, TILES: tl.constexpr, STAGES: tl.constexpr,
                           PDL: tl.constexpr = False):
    wait_then_release(PDL)
    cols = tl.arange(0, V)
    wv = tl.load(w + cols).to(tl.float32)
    dw_acc = tl.zeros([BR, V], dtype=tl.float32)
    for it in tl.range(0, TILES, num_stages=STAGES):
        rows = (tl.program_id(0) * TILES + it) * BR + tl.arange(0, BR)
        ok = (rows < R)[:, None]
        ov, gv = _gated_norm_load(o, gate, gate_row_stride, rows, cols, R, H, V)
        g = tl.load(dy + rows[:, None].to(tl.int64) * V + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(ov * ov, axis=1) / V + eps)
        normed = ov * rstd[:, None]
        sig = tl.sigmoid(gv)
        act = gv * sig
        d_gate = g * normed * wv[None, :] * sig * (1.0 + gv * (1.0 - sig))
        d_normed = g * wv[None, :] * act
        d_o = (d_normed - normed * (tl.sum(d_normed * normed, axis=1) / V)[:, None]) * rstd[:, None]
        tl.store(do + rows[:, None].to(tl.int64) * V + cols[None, :], d_o.to(do.dtype.element_ty), mask=ok)
        dgate_at = _head_offset(rows, H, V, dgate_row_stride)
        tl.store(dgate + dgate_at[:, None] + cols[None, :], d_gate.to(dgate.dtype.element_ty), mask=ok)
        dw_acc += g * normed * act  # zero past R, where dy is masked to zero
    tl.store(dw_part + tl.program_id(0).to(tl.int64) * V + cols, tl.sum(dw_acc, axis=0))


def _check_norm_input(o: torch.Tensor, gate: torch.Tensor) -> tuple[int, int, int]:
    B, T, H, V = o.shape
    assert o.is_contiguous() and gate.shape == (B, T, H * V) and gate.stride(-1) == 1
    assert gate.stride(0) == T * gate.stride(1), "gate: rows of one stride"
    return B * T * H, H, V


def gated_rms_norm_fwd(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, rows: int = NORM_ROWS,
                       warps: int = NORM_WARPS) -> torch.Tensor:
    """o: [B, T, H, V] contiguous; gate: [B, T, H * V], may be a column slice. Returns [B, T, H * V]."""
    R, H, V = _check_norm_input(o, gate)
    y = torch.empty(gate.shape, dtype=gate.dtype, device=o.device)
    _gated_norm_fwd_kernel[(triton.cdiv(R, rows),)](o, gate, gate.stride(1), weight, y, R, H, eps, V=V, BR=rows,
                                                    num_warps=warps, **launch_options(o.device))
    return y


def gated_rms_norm_bwd(dy: torch.Tensor, o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                       dgate: torch.Tensor, tiles: tuple[int, int, int, int] = NORM_BWD_TILES
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes d gate into `dgate` (gate's shape, may be a column slice); returns (d o, d weight in fp32).
    tiles: (rows per tile, tiles per program, warps, pipeline stages)."""
    R, H, V = _check_norm_input(o, gate)
    assert dy.is_contiguous() and dgate.shape == gate.shape and dgate.stride(-1) == 1
    rows, per_program, warps, stages = tiles
    do = torch.empty_like(o)
    programs = triton.cdiv(R, rows * per_program)
    dw_part = torch.empty(programs, V, dtype=torch.float32, device=o.device)
    _gated_norm_bwd_kernel[(programs,)](dy, o, gate, gate.stride(1), weight, do, dgate, dgate.stride(1), dw_part, R, H,
                                        eps, V=V, BR=rows, TILES=per_program, STAGES=stages,
                                        num_warps=warps, **launch_options(o.device))
    return do, dw_part.sum(0)


GATE_ROWS, GATE_WARPS = 256, 4  # tokens per program


@triton.jit
def _gate_beta_grad_kernel(ab, A_log, dt_bias, dg, beta, dbeta, d_ab, d_part, R, H: tl.constexpr, BR: tl.constexpr,
                           BH: tl.constexpr, PDL: tl.constexpr = False):
    """Backward of g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b), over BR tokens: d_ab = [d a | d b]
    from g's gradient dg and beta's dbeta, and this program's partial sums of d A_log and d dt_bias (d_part[pid]:
    [2, BH]). softplus as fla's: x past 20 is its own value."""
    wait_then_release(PDL)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    heads = tl.arange(0, BH)
    ok = (rows < R)[:, None] & (heads < H)[None, :]
    at = rows[:, None].to(tl.int64) * H + heads[None, :]
    at_ab = rows[:, None].to(tl.int64) * (2 * H) + heads[None, :]
    a = tl.load(ab + at_ab, mask=ok, other=0.0).to(tl.float32)
    dyg = tl.load(dg + at, mask=ok, other=0.0).to(tl.float32)
    neg_exp_A = -tl.exp(tl.load(A_log + heads, mask=heads < H, other=0.0).to(tl.float32))
    x = a + tl.load(dt_bias + heads, mask=heads < H, other=0.0).to(tl.float32)[None, :]
    softplus = tl.where(x < 20.0, tl.log(1.0 + tl.exp(x)), x)
    da = neg_exp_A[None, :] * dyg * tl.sigmoid(x)  # zero where masked: dyg is
    b = tl.load(beta + at, mask=ok, other=0.0).to(tl.float32)
    db = tl.load(dbeta + at, mask=ok, other=0.0).to(tl.float32) * b * (1.0 - b)
    tl.store(d_ab + at_ab, da.to(d_ab.dtype.element_ty), mask=ok)
    tl.store(d_ab + at_ab + H, db.to(d_ab.dtype.element_ty), mask=ok)
    part = d_part + tl.program_id(0).to(tl.int64) * 2 * BH + heads
    tl.store(part, tl.sum(dyg * neg_exp_A[None, :] * softplus, axis=0))
    tl.store(part + BH, tl.sum(da, axis=0))


def gate_beta_grad(ab: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, dg: torch.Tensor,
                   beta: torch.Tensor, dbeta: torch.Tensor, rows: int = GATE_ROWS, warps: int = GATE_WARPS
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the gate and beta from their logits ab = [a | b] ([B, T, 2H], contiguous): (d ab in ab's
    dtype, d A_log, d dt_bias in fp32), given dg (g's gradient, [B, T, H]), beta = sigmoid(b) as the forward kept
    it and its gradient dbeta. fla's gdn_gate_bwd, beta's sigmoid and their concatenation in one kernel."""
    H = A_log.numel()
    ab = ab.contiguous()
    R = ab.numel() // (2 * H)
    assert ab.shape[-1] == 2 * H
    assert all(t.is_contiguous() and t.numel() == R * H for t in (dg, beta, dbeta))
    BH = triton.next_power_of_2(H)
    programs = triton.cdiv(R, rows)
    d_ab = torch.empty_like(ab)
    d_part = torch.empty(programs, 2, BH, dtype=torch.float32, device=ab.device)
    _gate_beta_grad_kernel[(programs,)](ab, A_log, dt_bias, dg, beta, dbeta, d_ab, d_part, R, H=H, BR=rows, BH=BH,
                                        num_warps=warps, **launch_options(ab.device))
    # Two sums, not views of one: a custom op's outputs may not share storage.
    return d_ab, d_part[:, 0, :H].sum(0), d_part[:, 1, :H].sum(0)


# (value columns per program, warps, pipeline stages of the chunk loop's loads); measured on an H200 at the study
# shape (benchmarks/gdn_layer.py --sweep). The loop unpipelined (1 stage) faulted there with an illegal address
# (Triton 3.6; the interpreter computes the right values, and so do the pipelined configs the tests run), so it
# takes 2 or more.
STATE_GRAD_TILES = (32, 4, 2)


@triton.jit
def _state_grad_kernel(q, k, w, g, do, dh, dv, T, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                       BT: tl.constexpr, BV: tl.constexpr, NT: tl.constexpr, STAGES: tl.constexpr,
                       PDL: tl.constexpr = False):
    """One program per (sequence, head, BV value columns) walks the chunks backwards. The gradient dh_t [K, BV] of
    the state leaving chunk t (stored first) gives the gradient of the chunk's corrected values, to which the
    intra-chunk attention's share is added here (scale * k_j . q_i * 2^(g_i - g_j) for i >= j, times do_i); then
    the gradient of the state entering the chunk, which left chunk t - 1:

        dv = 2^(g_last - g) * (k @ dh_t) + A^T @ do
        dh_t-1 = 2^g_last * dh_t + scale * (2^g * q)^T @ do - w^T @ dv

    The attention's share is independent of the chain over chunks, so the pipelined loads and its matmul overlap
    the chain's. g is the chunk-local cumulative log2 gate. NT, the number of chunks, is a compile-time constant
    (Triton's interpreter cannot loop over a run-time count), so each sequence length compiles its own kernel."""
    wait_then_release(PDL)
    NV: tl.constexpr = (V + BV - 1) // BV
    pid = tl.program_id(0)
    i_v, i_bh = pid % NV, pid // NV  # a head's value blocks are neighbours: they read the same q, k, w
    i_b, i_h = i_bh // H, i_bh % H
    row0 = i_b.to(tl.int64) * T
    q += (row0 * H + i_h) * K
    k += (row0 * H + i_h) * K
    w += (row0 * H + i_h) * K
    do += (row0 * H + i_h) * V
    dv += (row0 * H + i_h) * V
    g += row0 * H + i_h
    dh += (i_b.to(tl.int64) * NT * H + i_h) * K * V
    t_in = tl.arange(0, BT)
    cols_k = tl.arange(0, K)
    cols_v = i_v * BV + tl.arange(0, BV)
    v_ok = cols_v < V
    later = t_in[:, None] <= t_in[None, :]  # A^T: row j, column i >= j
    b_dh = tl.zeros([K, BV], dtype=tl.float32)
    for step in tl.range(0, NT, num_stages=STAGES):
        i_t = NT - 1 - step
        tl.store(dh + i_t.to(tl.int64) * H * K * V + cols_k[:, None] * V + cols_v[None, :],
                 b_dh.to(dh.dtype.element_ty), mask=v_ok[None, :])
        rows = i_t * BT + t_in
        ok = rows < T
        b_g = tl.load(g + rows * H, mask=ok, other=0.0).to(tl.float32)
        g_last = tl.load(g + (tl.minimum(i_t * BT + BT, T) - 1) * H).to(tl.float32)
        at_k = rows[:, None] * (H * K) + cols_k[None, :]
        b_q = tl.load(q + at_k, mask=ok[:, None], other=0.0)
        b_k = tl.load(k + at_k, mask=ok[:, None], other=0.0)
        b_w = tl.load(w + at_k, mask=ok[:, None], other=0.0)
        at_v = rows[:, None] * (H * V) + cols_v[None, :]
        ok_v = ok[:, None] & v_ok[None, :]
        b_do = tl.load(do + at_v, mask=ok_v, other=0.0)
        a_t = tl.dot(b_k, tl.trans(b_q)) * scale
        a_t = tl.where(later & ok[None, :], a_t * tl.math.exp2(b_g[None, :] - b_g[:, None]), 0.0)
        b_dv = tl.dot(b_k, b_dh.to(b_k.dtype)) * tl.where(ok, tl.math.exp2(g_last - b_g), 0.0)[:, None]
        b_dv = tl.dot(a_t.to(b_do.dtype), b_do, b_dv)
        tl.store(dv + at_v, b_dv.to(dv.dtype.element_ty), mask=ok_v)
        b_qg = (b_q * tl.math.exp2(b_g)[:, None]).to(b_q.dtype)
        b_dh = b_dh * tl.math.exp2(g_last) + tl.dot(tl.trans(b_qg), b_do) * scale
        b_dh -= tl.dot(tl.trans(b_w), b_dv.to(b_w.dtype))


def state_grad(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, g: torch.Tensor, do: torch.Tensor, scale: float,
               chunk: int = 64, tiles: tuple[int, int, int] = STATE_GRAD_TILES) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked gated delta rule's state gradients dh [B, NT, H, K, V] (dh[:, t]: of the state leaving chunk t,
    zero for the last, as fla's chunk kernels take it) and the gradient of the corrected values v_new = u - w @ h
    [B, T, H, V], from the output's gradient do, where o = scale * (2^g * q) @ h_t + the causal intra-chunk
    attention over v_new.
    q, k, w: [B, T, H, K]; g: [B, T, H] fp32, chunk-local cumulative log2 gates; do: [B, T, H, V].
    tiles: (value columns per program, warps, pipeline stages)."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    assert all(t.is_contiguous() for t in (q, k, w, g, do)) and k.shape == w.shape == q.shape
    assert g.shape == (B, T, H) and do.shape[:3] == (B, T, H)
    columns, warps, stages = tiles
    assert stages >= 2, "the unpipelined loop faults on Hopper (see STATE_GRAD_TILES)"
    BV = min(columns, V)
    NT = triton.cdiv(T, chunk)
    dh = q.new_empty(B, NT, H, K, V)
    dv = torch.empty_like(do)
    _state_grad_kernel[(triton.cdiv(V, BV) * B * H,)](q, k, w, g, do, dh, dv, T, scale, H=H, K=K, V=V, BT=chunk, BV=BV,
                                                      NT=NT, STAGES=stages, num_warps=warps,
                                                      **launch_options(q.device))
    return dh, dv
