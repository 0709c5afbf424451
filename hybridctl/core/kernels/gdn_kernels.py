"""Triton kernels for the parts of the Gated DeltaNet layer around fla's chunk recurrence, and one inside it.

- `short_conv_fwd` / `short_conv_bwd`: the depthwise causal convolution + SiLU over q, k and v in one launch,
  reading their columns of the fused projection in place (a strided view) and, for q and k, the L2 norm over
  each head on top; q, k and v come out contiguous in one buffer. Each kernel walks spans of time, so the
  forward loads each row of the input once. The backward recomputes the convolution from the projection instead
  of saving its output, in one kernel that walks time backwards: the pre-activation gradient (through the L2
  norm and SiLU), from it and the same loads of the input the weight gradient (per-program partial sums, then
  one sum: deterministic, no atomics), and the input gradient (its shifted sum, carried in registers and written
  straight into the caller's gradient buffer). On an H200 at the study shape, per layer: forward 0.20 ms (0.24
  ms as one tile of time steps per program), backward 0.443 ms (0.575 ms as two kernels with the pre-activation
  gradient between them in memory, 0.61 ms with a launch per q, k and v, 0.86 ms with the weight gradient in a
  kernel of its own); fla's convolution (no L2 norm) takes 3.9 ms forward + backward.
- `gated_rms_norm_fwd` / `gated_rms_norm_bwd`: RMSNorm over each head's value vector times SiLU(gate), the gate
  read from (and its gradient written to) the fused projection in place.
- `gate_beta_grad`: the backward of the decay gate and of beta = sigmoid(b), written as the gradient of the
  [a | b] logits in one kernel (in place of fla's gate backward, beta's sigmoid and their concatenation).
- `state_grad`: the chunked recurrence's backward through its states (fla's intra-chunk value gradient and
  state-gradient kernels in one: 0.60 against 0.75 ms per layer for fla's pair at its own configs on an H200).

They compute the same functions as `causal_conv_silu`, `l2norm` and `GatedRMSNorm` in gated_delta.py, and
gate_beta_grad and state_grad the gradients that autograd takes through the gates and the recurrence (tests run
them through Triton's interpreter on CPU against those). Importing this module needs Triton; gated_delta.py
imports it only on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridctl.core.kernels.pdl import launch_options, wait_then_release


# ---------------------------------------------------------------------------------------------------------
# Short convolution (+ SiLU, + per-head L2 norm)

# Forward and backward: (spans of time walked at once per program, time steps per span, warps, pipeline stages of
# the loop's loads), measured best on an H200 at the study shape (benchmarks/gdn_layer.py --sweep). A program's
# channels are one head.
CONV_FWD_TILES = (2, 32, 1, 3)
CONV_BWD_TILES = (2, 64, 1, 4)


@triton.jit
def _qkv_block(i_c, KD, VD, BC: tl.constexpr):
    """Channel block i_c of [q | k | v] (q and k: KD channels each, v: VD; BC channels per block, one head of q
    or k): (segment 0 / 1 / 2, the block's columns within its segment, which of those columns lie inside it, the
    same columns counted over all three segments). A segment's blocks are contiguous, and v's last one may be
    partial (columns past VD are masked)."""
    key_blocks = KD // BC
    seg = tl.minimum(i_c // key_blocks, 2)
    cols = (i_c - seg * key_blocks) * BC + tl.arange(0, BC)
    return seg, cols, cols < tl.where(seg == 2, VD, KD), seg * KD + cols


@triton.jit
def _qkv_rows(rows, seg, KD, VD):
    """Offsets of `rows` (tokens, [len] int64) in a [q | k | v] buffer of three contiguous [tokens, width] blocks.
    Each branch is a multiple of its width, so Triton still sees 16-element alignment and vectorizes."""
    return tl.where(seg == 2, rows * VD, rows * KD)


@triton.jit
def _load_shifted(x, x_row_stride, row0, rows, cols, T, col_ok, SHIFT: tl.constexpr):
    """x at time steps rows + SHIFT of the sequence starting at row0, zero outside it: [len(rows), BC] fp32."""
    src = rows + SHIFT
    ok = ((src >= 0) & (src < T))[:, None] & col_ok[None, :]
    return tl.load(x + (row0 + src)[:, None] * x_row_stride + cols[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _tap(w, channels, col_ok, W: tl.constexpr, J: tl.constexpr):
    """Tap J of the block's channels of w [C, W], [BC] fp32; zero for a tap that is not there (J < 0 or J >= W)."""
    return tl.load(w + channels * W + J, mask=col_ok & (J >= 0) & (J < W), other=0.0).to(tl.float32)


@triton.jit
def _pass_on(partial1, partial2, v, r1, r2, r3):
    """The partial sums of the convolution's next three steps, one step on: v's share through taps r1, r2 and r3
    added (the walk's direction decides which taps those are)."""
    return partial1 + v * r1[None, :], partial2 + v * r2[None, :], v * r3[None, :]


@triton.jit
def _short_conv_fwd_kernel(x, x_row_stride, w, y, N, T, KD, VD, eps, W: tl.constexpr, SPANS: tl.constexpr,
                           L: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr = False):
    """A program walks SPANS spans of L time steps at once (one row of its [SPANS, BC] tile per span), forwards in
    time, loading each row of x once: x[t] completes the convolution at t and adds its share to t + 1 .. t + W - 1,
    partial sums carried to the next steps; the loop's loads are pipelined STAGES deep. A walk starts with the
    W - 1 steps before its span, for their share."""
    wait_then_release(PDL)
    i_s, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seg, cols, col_ok, channels = _qkv_block(i_c, KD, VD, BC)  # channels: in x and w
    row0 = i_b.to(tl.int64) * T
    starts = (i_s * SPANS + tl.arange(0, SPANS)) * L  # each span's first time step in its sequence
    # x[t] reaches the output at t + d through tap W - 1 - d (zero past the first)
    r0, r1 = _tap(w, channels, col_ok, W, W - 1), _tap(w, channels, col_ok, W, W - 2)
    r2, r3 = _tap(w, channels, col_ok, W, W - 3), _tap(w, channels, col_ok, W, W - 4)
    # Before the step at t: the output's pre-activation at t, t + 1 and t + 2 summed over the rows walked so far
    partial0 = tl.zeros([SPANS, BC], dtype=tl.float32)
    partial1 = tl.zeros([SPANS, BC], dtype=tl.float32)
    partial2 = tl.zeros([SPANS, BC], dtype=tl.float32)
    for s in tl.static_range(W - 1):  # starts - W + 1 up to starts - 1: their share only
        xt = _load_shifted(x, x_row_stride, row0, starts, channels, T, col_ok, s - (W - 1))
        partial0, partial1, partial2 = _pass_on(partial1, partial2, xt, r1, r2, r3)
    for it in tl.range(0, L, num_stages=STAGES):
        t = starts + it
        xt = _load_shifted(x, x_row_stride, row0, t, channels, T, col_ok, 0)
        z = partial0 + xt * r0[None, :]
        partial0, partial1, partial2 = _pass_on(partial1, partial2, xt, r1, r2, r3)
        out = z * tl.sigmoid(z)
        if seg < 2:  # q, k: one program's channels are exactly one head
            out = out * tl.rsqrt(tl.sum(out * out, axis=1) + eps)[:, None]
        ok = (t < T)[:, None] & col_ok[None, :]
        at = seg.to(tl.int64) * N * KD + _qkv_rows(row0 + t, seg, KD, VD)
        tl.store(y + at[:, None] + cols[None, :], out.to(y.dtype.element_ty), mask=ok)


@triton.jit
def _conv_pre_grad(x, x_row_stride, dy, dk2, row0, t, seg, cols, channels, col_ok, T, dk2_rows, KD, VD, w0, w1, w2,
                   w3, eps, W: tl.constexpr, HAS_DK2: tl.constexpr):
    """At time steps t (one per row): the gradient dz of the convolution's output before SiLU, through q's and k's
    L2 norm (one program's channels are exactly one head), and the taps' inputs x[t - W + 1 + j] (fp32, zero
    outside the sequence), for the weight gradient. The incoming gradient is dy's, plus dk2's in k's blocks."""
    x0 = _load_shifted(x, x_row_stride, row0, t, channels, T, col_ok, 1 - W)
    z = x0 * w0[None, :]
    x1, x2, x3 = x0, x0, x0  # placeholders for the taps past W (unused)
    if W > 1:
        x1 = _load_shifted(x, x_row_stride, row0, t, channels, T, col_ok, 2 - W)
        z += x1 * w1[None, :]
    if W > 2:
        x2 = _load_shifted(x, x_row_stride, row0, t, channels, T, col_ok, 3 - W)
        z += x2 * w2[None, :]
    if W > 3:
        x3 = _load_shifted(x, x_row_stride, row0, t, channels, T, col_ok, 4 - W)
        z += x3 * w3[None, :]
    ok = (t < T)[:, None] & col_ok[None, :]
    at = _qkv_rows(row0 + t, seg, KD, VD)[:, None] + cols[None, :]  # within the segment of [q | k | v]
    g = tl.load(dy + at, mask=ok, other=0.0).to(tl.float32)
    if HAS_DK2:
        g += tl.load(dk2 + at, mask=(t < dk2_rows)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    sig = tl.sigmoid(z)
    if seg < 2:  # q, k
        act = z * sig
        rstd = tl.rsqrt(tl.sum(act * act, axis=1) + eps)
        normed = act * rstd[:, None]
        g = (g - normed * tl.sum(g * normed, axis=1)[:, None]) * rstd[:, None]
    return g * sig * (1.0 + z * (1.0 - sig)), x0, x1, x2, x3  # SiLU'; zero past T, where g is


@triton.jit
def _short_conv_bwd_kernel(x, x_row_stride, w, dq, dk, dv, dk2, dx, dx_row_stride, dw_part, T, KD, VD, eps,
                           W: tl.constexpr, SPANS: tl.constexpr, L: tl.constexpr, BC: tl.constexpr,
                           STAGES: tl.constexpr, HAS_DK2: tl.constexpr, PDL: tl.constexpr = False):
    """The whole backward in one pass: the pre-activation gradient dz (through q's and k's L2 norm and SiLU), the
    weight gradient (tap j = sum over t of dz[t] x[t - W + 1 + j]) and the input gradient (dx[t] = sum over s of
    w[W - 1 - s] dz[t + s]), without dz ever leaving registers.

    A program walks SPANS spans of L time steps each at once (one row of its [SPANS, BC] tile per span),
    backwards in time. dz[t] completes dx[t] and adds its share to dx[t - 1 .. t - W + 1], partial sums carried to
    the next steps. A walk starts with the W - 1 steps past its span, in the next one, for their share. The
    incoming gradient is dq, dk or dv, by the program's segment of [q | k | v]; k's is dk plus dk2 if given. Up to
    4 taps. The loop's loads are software-pipelined STAGES deep. Triton 3.6 left them unpipelined when the loop
    carried a window of dz or of x's rows instead (0.64 against 0.445 ms per layer on an H200), hence the partial
    sums and x loaded afresh each step, its shifted rows from the cache."""
    wait_then_release(PDL)
    i_s, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seg, cols, col_ok, channels = _qkv_block(i_c, KD, VD, BC)  # channels: in x and w
    dy = tl.where(seg == 0, dq, tl.where(seg == 1, dk, dv))
    dk2_rows = tl.where(seg == 1, T, 0)  # dk2's loads masked off outside k's blocks (a mask of tensors alone)
    row0 = i_b.to(tl.int64) * T
    ends = (i_s * SPANS + tl.arange(0, SPANS)) * L + L  # each span's end (exclusive) in its sequence
    w0, w1 = _tap(w, channels, col_ok, W, 0), _tap(w, channels, col_ok, W, 1)
    w2, w3 = _tap(w, channels, col_ok, W, 2), _tap(w, channels, col_ok, W, 3)
    # dz[t] reaches dx[t - d] through tap W - 1 - d: the taps the other way round, zero past the first
    r0, r1 = _tap(w, channels, col_ok, W, W - 1), _tap(w, channels, col_ok, W, W - 2)
    r2, r3 = _tap(w, channels, col_ok, W, W - 3), _tap(w, channels, col_ok, W, W - 4)
    # Before the step at t: dx[t], dx[t - 1] and dx[t - 2] summed over the dz walked so far
    partial0 = tl.zeros([SPANS, BC], dtype=tl.float32)
    partial1 = tl.zeros([SPANS, BC], dtype=tl.float32)
    partial2 = tl.zeros([SPANS, BC], dtype=tl.float32)
    for s in tl.static_range(W - 1):  # the next span's first steps, ends + W - 2 down to ends: their share only
        dz, _, _, _, _ = _conv_pre_grad(x, x_row_stride, dy, dk2, row0, ends + (W - 2 - s), seg, cols, channels,
                                        col_ok, T, dk2_rows, KD, VD, w0, w1, w2, w3, eps, W, HAS_DK2)
        partial0, partial1, partial2 = _pass_on(partial1, partial2, dz, r1, r2, r3)
    acc0 = tl.zeros([SPANS, BC], dtype=tl.float32)
    acc1 = tl.zeros([SPANS, BC], dtype=tl.float32)
    acc2 = tl.zeros([SPANS, BC], dtype=tl.float32)
    acc3 = tl.zeros([SPANS, BC], dtype=tl.float32)
    for it in tl.range(0, L, num_stages=STAGES):
        t = ends - 1 - it
        dz, x0, x1, x2, x3 = _conv_pre_grad(x, x_row_stride, dy, dk2, row0, t, seg, cols, channels, col_ok, T,
                                            dk2_rows, KD, VD, w0, w1, w2, w3, eps, W, HAS_DK2)
        ok = (t < T)[:, None] & col_ok[None, :]
        tl.store(dx + (row0 + t)[:, None] * dx_row_stride + channels[None, :],
                 (partial0 + dz * r0[None, :]).to(dx.dtype.element_ty), mask=ok)
        acc0 += dz * x0
        if W > 1:
            acc1 += dz * x1
        if W > 2:
            acc2 += dz * x2
        if W > 3:
            acc3 += dz * x3
        partial0, partial1, partial2 = _pass_on(partial1, partial2, dz, r1, r2, r3)
    part = dw_part + (i_b * tl.num_programs(0) + i_s).to(tl.int64) * (2 * KD + VD) * W + channels * W
    tl.store(part, tl.sum(acc0, axis=0), mask=col_ok)
    if W > 1:
        tl.store(part + 1, tl.sum(acc1, axis=0), mask=col_ok)
    if W > 2:
        tl.store(part + 2, tl.sum(acc2, axis=0), mask=col_ok)
    if W > 3:
        tl.store(part + 3, tl.sum(acc3, axis=0), mask=col_ok)


def _check_conv_input(x: torch.Tensor, weight: torch.Tensor, key_dim: int, value_dim: int,
                      head_dim: int) -> tuple[int, int, int]:
    B, T, _ = x.shape
    C = 2 * key_dim + value_dim
    assert x.shape[-1] >= C and x.stride(-1) == 1 and x.stride(0) == T * x.stride(1), \
        "x: [B, T, >= C] rows of one stride, channels contiguous"
    assert weight.shape[0] == C and weight.is_contiguous() and key_dim % head_dim == 0
    return B, T, C


def _conv_grid(B: int, T: int, key_dim: int, value_dim: int, head_dim: int, steps_per_program: int) -> tuple:
    """The convolution kernels' grid: programs along time, channel blocks of one head (`_qkv_block`), sequences."""
    return triton.cdiv(T, steps_per_program), 2 * key_dim // head_dim + triton.cdiv(value_dim, head_dim), B


def qkv_views(qkv: torch.Tensor, B: int, T: int, H: int, K: int, V: int) -> tuple[torch.Tensor, ...]:
    """q, k [B, T, H, K] and v [B, T, H, V], each contiguous, from the flat buffer the convolution writes."""
    q, k, v = qkv.split([B * T * H * K, B * T * H * K, B * T * H * V])
    return q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, V)


def short_conv_fwd(x: torch.Tensor, weight: torch.Tensor, key_dim: int, value_dim: int, head_dim: int,
                   eps: float = 1e-6, tiles: tuple[int, int, int, int] = CONV_FWD_TILES) -> torch.Tensor:
    """SiLU(causal depthwise conv(x)) over the channels [q | k | v] (key_dim, key_dim, value_dim), q and k then
    L2-normalised per head of `head_dim` channels, in one launch. x: [B, T, >= C] with C = 2 key_dim + value_dim,
    the first C channels read (e.g. the fused projection, in place); weight: [C, W]. Returns a flat buffer of q,
    k and v, each contiguous [B, T, width] (`qkv_views`). tiles: (spans of time walked at once per program,
    time steps per span, warps, pipeline stages)."""
    B, T, C = _check_conv_input(x, weight, key_dim, value_dim, head_dim)
    y = torch.empty(B * T * C, dtype=x.dtype, device=x.device)
    spans, steps, warps, stages = tiles
    grid = _conv_grid(B, T, key_dim, value_dim, head_dim, spans * steps)
    _short_conv_fwd_kernel[grid](x, x.stride(1), weight, y, B * T, T, key_dim, value_dim, eps, W=weight.shape[1],
                                 SPANS=spans, L=steps, BC=head_dim, STAGES=stages, num_warps=warps,
                                 **launch_options(x.device))
    return y


def short_conv_bwd(x: torch.Tensor, weight: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                   dx: torch.Tensor, key_dim: int, value_dim: int, head_dim: int, eps: float = 1e-6,
                   dk2: torch.Tensor | None = None, tiles: tuple[int, int, int, int] = CONV_BWD_TILES) -> torch.Tensor:
    """Gradients of short_conv_fwd for the incoming gradients of q, k (+ dk2 if given) and v, each contiguous:
    writes d x into `dx` ([B, T, C], may be the first columns of a wider buffer) and returns d weight (fp32,
    [C, W]). tiles: (spans of time walked at once per program, time steps per span, warps, pipeline stages)."""
    B, T, C = _check_conv_input(x, weight, key_dim, value_dim, head_dim)
    W = weight.shape[1]
    grads = (dq, dk, dv) + (() if dk2 is None else (dk2,))
    assert all(g.is_contiguous() for g in grads) and W <= 4
    assert dq.numel() == dk.numel() == B * T * key_dim and dv.numel() == B * T * value_dim
    assert dk2 is None or dk2.numel() == dk.numel()
    assert dx.shape == (B, T, C) and dx.stride(-1) == 1 and dx.stride(0) == T * dx.stride(1)
    spans, steps, warps, stages = tiles
    grid = _conv_grid(B, T, key_dim, value_dim, head_dim, spans * steps)
    dw_part = torch.empty(B * grid[0], C, W, dtype=torch.float32, device=x.device)
    _short_conv_bwd_kernel[grid](x, x.stride(1), weight, dq, dk, dv, dk if dk2 is None else dk2, dx, dx.stride(1),
                                 dw_part, T, key_dim, value_dim, eps, W=W, SPANS=spans, L=steps,
                                 BC=head_dim, STAGES=stages, HAS_DK2=dk2 is not None, num_warps=warps,
                                 **launch_options(x.device))
    return dw_part.sum(0)


# ---------------------------------------------------------------------------------------------------------
# Gated RMSNorm: y = o / rms(o) * weight * SiLU(gate), per head


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


# ---------------------------------------------------------------------------------------------------------
# The decay's and beta's gradients

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


# ---------------------------------------------------------------------------------------------------------
# The chunk recurrence's backward through its states

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
