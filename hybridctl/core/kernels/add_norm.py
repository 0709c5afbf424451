"""The residual add and the RMSNorm after it, in one pass each way on CUDA: a custom op with Triton kernels.

The PyTorch reference it replaces: `RMSNorm.add_and_norm` in model/layers.py.

A pre-norm block adds each sublayer's output to the residual stream and normalises the sum for the next sublayer:
s = x + delta (in x's dtype, fp32 under autocast) and n = s / rms(s) * weight (in the matmul's dtype). The forward
reads x and delta once and writes s and n. The backward takes the gradients of both outputs and writes the sum's
gradient twice, in fp32 for the residual stream and in delta's dtype for the sublayer's output projection, with
per-program partial sums of the weight's gradient (summed after: deterministic, no atomics). Left to
torch.compile, the cast of that gradient to bf16 is a pass of its own over the stream, because inductor does not
fuse it into the kernel that reduces along both the rows (the input's gradient) and the columns (the weight's).

It computes the same function as `x + delta` followed by `F.rms_norm` (tests run the kernels through Triton's
interpreter on CPU against it). Importing this module needs Triton; model/layers.py imports it only on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridctl.core.kernels.pdl import launch_options, wait_then_release

# Measured on an H200 at the study shape (49,152 rows of 768): the forward's rows per program and warps; the
# backward's (rows per tile, tiles per program, warps, pipeline stages of the tile loop's loads).
ROWS, WARPS = 4, 4
BWD_TILES = (2, 64, 4, 3)


@triton.jit
def _add_norm_fwd_kernel(x, delta, w, s, n, R, eps, D: tl.constexpr, BLOCK: tl.constexpr, BR: tl.constexpr,
                         HAS_DELTA: tl.constexpr, PDL: tl.constexpr = False):
    wait_then_release(PDL)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BLOCK)
    ok = (rows < R)[:, None] & (cols < D)[None, :]
    at = rows[:, None].to(tl.int64) * D + cols[None, :]
    sv = tl.load(x + at, mask=ok, other=0.0).to(tl.float32)
    if HAS_DELTA:
        sv = (sv + tl.load(delta + at, mask=ok, other=0.0).to(tl.float32)).to(s.dtype.element_ty)
        tl.store(s + at, sv, mask=ok)
        sv = sv.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sv * sv, axis=1) / D + eps)
    wv = tl.load(w + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(n + at, (sv * rstd[:, None] * wv[None, :]).to(n.dtype.element_ty), mask=ok)


@triton.jit
def _add_norm_bwd_kernel(ds, dn, s, w, dx, d_delta, dw_part, R, eps, D: tl.constexpr, BLOCK: tl.constexpr,
                         BR: tl.constexpr, TILES: tl.constexpr, STAGES: tl.constexpr, HAS_DS: tl.constexpr,
                         HAS_DELTA: tl.constexpr, PDL: tl.constexpr = False):
    wait_then_release(PDL)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < D
    wv = tl.load(w + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BR, BLOCK], dtype=tl.float32)
    for it in tl.range(0, TILES, num_stages=STAGES):
        rows = (tl.program_id(0) * TILES + it) * BR + tl.arange(0, BR)
        ok = (rows < R)[:, None] & col_ok[None, :]
        at = rows[:, None].to(tl.int64) * D + cols[None, :]
        sv = tl.load(s + at, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(dn + at, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(sv * sv, axis=1) / D + eps)
        normed = sv * rstd[:, None]
        d_normed = g * wv[None, :]
        d = (d_normed - normed * (tl.sum(d_normed * normed, axis=1) / D)[:, None]) * rstd[:, None]
        if HAS_DS:
            d += tl.load(ds + at, mask=ok, other=0.0).to(tl.float32)
        tl.store(dx + at, d.to(dx.dtype.element_ty), mask=ok)
        if HAS_DELTA:
            tl.store(d_delta + at, d.to(d_delta.dtype.element_ty), mask=ok)
        dw_acc += g * normed  # zero past R and D, where dn is masked to zero
    tl.store(dw_part + tl.program_id(0).to(tl.int64) * D + cols, tl.sum(dw_acc, axis=0), mask=col_ok)


def _rows(x: Tensor) -> tuple[int, int]:
    assert x.is_contiguous()
    return x.numel() // x.shape[-1], x.shape[-1]


def _forward(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float, out_dtype: torch.dtype
             ) -> tuple[Tensor, Tensor]:
    R, D = _rows(x)
    assert (delta is None or delta.shape == x.shape) and weight.shape == (D,), "delta: x's shape; weight: [D]"
    rows, warps = ROWS, WARPS
    s = torch.empty_like(x) if delta is not None else x
    n = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if R:
        _add_norm_fwd_kernel[(triton.cdiv(R, rows),)](x, delta if delta is not None else x, weight, s, n, R, eps, D=D,
                                                      BLOCK=triton.next_power_of_2(D), BR=rows,
                                                      HAS_DELTA=delta is not None, num_warps=warps,
                                                      **launch_options(x.device))
    return s, n


def _backward(ds: Tensor | None, dn: Tensor, s: Tensor, weight: Tensor, eps: float, delta_dtype: torch.dtype | None
              ) -> tuple[Tensor, Tensor | None, Tensor]:
    """(gradient of x, of delta when delta_dtype is given, of weight in fp32)."""
    s = s.contiguous()
    R, D = _rows(s)
    rows, per_program, warps, stages = BWD_TILES
    dn = dn.contiguous()
    ds = ds.contiguous() if ds is not None else None
    dx = torch.empty_like(s)
    d_delta = torch.empty(s.shape, dtype=delta_dtype, device=s.device) if delta_dtype is not None else None
    programs = triton.cdiv(R, rows * per_program)
    # every program writes its row; zeros only for no rows at all (no program)
    dw_part = (torch.empty if R else torch.zeros)(max(programs, 1), D, dtype=torch.float32, device=s.device)
    if R:
        _add_norm_bwd_kernel[(programs,)](ds if ds is not None else dn, dn, s, weight, dx,
                                          d_delta if d_delta is not None else dx, dw_part, R, eps, D=D,
                                          BLOCK=triton.next_power_of_2(D), BR=rows, TILES=per_program, STAGES=stages,
                                          HAS_DS=ds is not None, HAS_DELTA=d_delta is not None, num_warps=warps,
                                          **launch_options(s.device))
    return dx, d_delta, dw_part.sum(0)


# The residual add + norm: (s, n)

@torch.library.custom_op("hybridctl::add_rms_norm", mutates_args=())
def _add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype
                  ) -> tuple[Tensor, Tensor]:
    return _forward(x.contiguous(), delta.contiguous(), weight, eps, out_dtype)


@_add_rms_norm.register_fake
def _(x, delta, weight, eps, out_dtype):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("hybridctl::add_rms_norm_backward", mutates_args=())
def _add_rms_norm_backward(ds: Tensor | None, dn: Tensor, s: Tensor, weight: Tensor, eps: float, delta_dtype: torch.dtype
                           ) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(ds, dn, s, weight, eps, delta_dtype)


@_add_rms_norm_backward.register_fake
def _(ds, dn, s, weight, eps, delta_dtype):
    return s.new_empty(s.shape), s.new_empty(s.shape, dtype=delta_dtype), weight.new_empty(weight.shape,
                                                                                           dtype=torch.float32)


def _add_setup_context(ctx, inputs, output):
    _, delta, weight, eps, _ = inputs
    ctx.save_for_backward(output[0], weight)
    ctx.eps, ctx.delta_dtype = eps, delta.dtype
    ctx.set_materialize_grads(False)  # an unused sum (the final norm's) gets no gradient: no zeros to write and read


def _add_backward(ctx, ds, dn):
    s, weight = ctx.saved_tensors
    if dn is None:  # only the sum was used
        dn = torch.zeros_like(s)
    dx, d_delta, dw = _add_rms_norm_backward(ds, dn, s, weight, ctx.eps, ctx.delta_dtype)
    return dx, d_delta, dw.to(weight.dtype), None, None


_add_rms_norm.register_autograd(_add_backward, setup_context=_add_setup_context)


# The norm alone (the first block's, whose residual stream is the embedding): n

@torch.library.custom_op("hybridctl::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
    return _forward(x.contiguous(), None, weight, eps, out_dtype)[1]


@_rms_norm.register_fake
def _(x, weight, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("hybridctl::rms_norm_backward", mutates_args=())
def _rms_norm_backward(dn: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    dx, _, dw = _backward(None, dn, x, weight, eps, None)
    return dx, dw


@_rms_norm_backward.register_fake
def _(dn, x, weight, eps):
    return x.new_empty(x.shape), weight.new_empty(weight.shape, dtype=torch.float32)


def _norm_setup_context(ctx, inputs, output):
    x, weight, eps, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _norm_backward(ctx, dn):
    x, weight = ctx.saved_tensors
    dx, dw = _rms_norm_backward(dn, x, weight, ctx.eps)
    return dx, dw.to(weight.dtype), None, None


_rms_norm.register_autograd(_norm_backward, setup_context=_norm_setup_context)


def add_rms_norm(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float, cast_to_autocast: bool = True
                 ) -> tuple[Tensor, Tensor]:
    """(x + delta, rms_norm(x + delta) * weight); x itself and its norm when delta is None. The norm comes out in
    autocast's dtype when autocast is on and cast_to_autocast (for the next matmul), else in x's."""
    device = x.device.type
    cast = cast_to_autocast and torch.is_autocast_enabled(device)
    out_dtype = torch.get_autocast_dtype(device) if cast else x.dtype
    if delta is None:
        return x, _rms_norm(x, weight, eps, out_dtype)
    return _add_rms_norm(x, delta, weight, eps, out_dtype)
