"""Triton kernels for the Gated DeltaNet layer's short convolution (+ SiLU, + per-head L2 norm) over q, k and v.

The PyTorch reference they replace: `causal_conv_silu` and `l2norm` in model/gated_delta.py (tests run them through
Triton's interpreter on CPU against those). Importing this module needs Triton.

`short_conv_fwd` / `short_conv_bwd` run the depthwise causal convolution + SiLU over q, k and v in one launch,
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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridctl.core.kernels.pdl import launch_options, wait_then_release


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
