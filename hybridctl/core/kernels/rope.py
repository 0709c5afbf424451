"""Rotary position embedding of q and k, straight from the attention's fused projection, on CUDA as a custom op.

The PyTorch reference it replaces: `Rotary` in model/attention.py.

qkv = [q | k | v] is the projection's output, [B, T, 3 * H * D]. The forward writes q and k rotated and v copied,
each [B, T, H, D] contiguous (scaled_dot_product_attention takes them transposed to [B, H, T, D]); the backward
rotates the gradients of q and k back and writes them, with v's, into one gradient shaped like qkv. In the
compiled transformer at the study shape on an H200, inductor's kernels for this took 3.4 ms per step and these
2.9 ms (0.24 ms per layer, about 78% of the memory bandwidth the traffic needs).

It computes what `Rotary` in attention.py computes (rotate-half RoPE in fp32; tests run the kernel through
Triton's interpreter on CPU against it). Importing this module needs Triton; attention.py imports it only on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridctl.core.kernels.pdl import launch_options, wait_then_release

ROWS, WARPS = 32, 4  # time steps per program and warps; a program holds one head of one sequence


@triton.jit
def _rotary_kernel(src, src_b, src_t, src_h, dst, dst_b, dst_t, dst_h, cos, sin, table_stride, T,
                   HALF: tl.constexpr, BT: tl.constexpr, ROTATE: tl.constexpr, INVERSE: tl.constexpr,
                   PDL: tl.constexpr = False):
    """dst[b, t, h] = src[b, t, h] rotated by +angle(t) (or -angle(t), the backward) in pairs (i, i + HALF), or
    copied (v). A plain copy from the strided projection ran at a third of the bandwidth."""
    wait_then_release(PDL)
    i_t, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = i_t * BT + tl.arange(0, BT)
    cols = tl.arange(0, HALF)
    ok = (rows < T)[:, None]
    at = b * src_b + h * src_h + rows[:, None] * src_t + cols[None, :]
    x1 = tl.load(src + at, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + at + HALF, mask=ok, other=0.0).to(tl.float32)
    if ROTATE:
        table = rows[:, None] * table_stride + cols[None, :]
        c = tl.load(cos + table, mask=ok, other=0.0)
        s = tl.load(sin + table, mask=ok, other=0.0)
        if INVERSE:
            s = -s
        x1, x2 = x1 * c - x2 * s, x2 * c + x1 * s
    out = b * dst_b + h * dst_h + rows[:, None] * dst_t + cols[None, :]
    tl.store(dst + out, x1.to(dst.dtype.element_ty), mask=ok)
    tl.store(dst + out + HALF, x2.to(dst.dtype.element_ty), mask=ok)


def supported(head_dim: int) -> bool:
    """A program holds half a head: head sizes are powers of two."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _rotate(src: Tensor, dst: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False, rotate: bool = True) -> None:
    """src, dst: [B, T, H, D] with unit stride over D; cos, sin: [T, D // 2] fp32 with unit stride over D // 2."""
    B, T, H, D = src.shape
    if src.numel():
        _rotary_kernel[(triton.cdiv(T, ROWS), H, B)](
            src, src.stride(0), src.stride(1), src.stride(2), dst, dst.stride(0), dst.stride(1), dst.stride(2),
            cos, sin, cos.stride(0), T, HALF=D // 2, BT=ROWS, ROTATE=rotate, INVERSE=inverse, num_warps=WARPS,
            **launch_options(src.device))


def _heads(t: Tensor, n_heads: int) -> Tensor:
    return t.unflatten(-1, (n_heads, t.shape[-1] // n_heads))


@torch.library.custom_op("hybridctl::rotary_qkv", mutates_args=())
def rotary_qkv(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q and k rotated, v copied, each [B, T, H, D], from qkv [B, T, 3 * H * D]; cos, sin: [T, D // 2] fp32."""
    qkv = _unit_last(qkv)
    q_in, k_in, v_in = (_heads(part, n_heads) for part in qkv.chunk(3, dim=-1))
    q, k, v = (torch.empty(part.shape, dtype=qkv.dtype, device=qkv.device) for part in (q_in, k_in, v_in))
    _rotate(q_in, q, cos, sin)
    _rotate(k_in, k, cos, sin)
    _rotate(v_in, v, cos, sin, rotate=False)
    return q, k, v


@rotary_qkv.register_fake
def _(qkv, cos, sin, n_heads):
    shape = (*qkv.shape[:-1], n_heads, qkv.shape[-1] // (3 * n_heads))
    return qkv.new_empty(shape), qkv.new_empty(shape), qkv.new_empty(shape)


@torch.library.custom_op("hybridctl::rotary_qkv_backward", mutates_args=())
def rotary_qkv_backward(dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    B, T, H, D = dq.shape
    d_qkv = dq.new_empty((B, T, 3 * H * D))
    d_q, d_k, d_v = (_heads(part, H) for part in d_qkv.chunk(3, dim=-1))
    _rotate(dq, d_q, cos, sin, inverse=True)
    _rotate(dk, d_k, cos, sin, inverse=True)
    _rotate(dv, d_v, cos, sin, rotate=False)
    return d_qkv


@rotary_qkv_backward.register_fake
def _(dq, dk, dv, cos, sin):
    B, T, H, D = dq.shape
    return dq.new_empty((B, T, 3 * H * D))


def _setup_context(ctx, inputs, output):
    _, cos, sin, _ = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq, dk, dv):
    cos, sin = ctx.saved_tensors
    return rotary_qkv_backward(_unit_last(dq), _unit_last(dk), _unit_last(dv), cos, sin), None, None, None


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


rotary_qkv.register_autograd(_backward, setup_context=_setup_context)
