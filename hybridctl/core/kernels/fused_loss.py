"""Linear + cross-entropy on CUDA as one custom op whose forward also makes the gradients (train.loss = "fused").

The PyTorch reference it replaces: `linear_cross_entropy` in model/hybrid_lm.py.

For each chunk of tokens: logits = h @ weight.T (bf16, one matmul), then one Triton kernel per row reads the
logits twice (an online max and sum of exponentials, then the softmax) and overwrites them with the gradient of
the mean loss, (softmax - onehot(target)) / tokens; two more matmuls turn that into the gradients of h and of the
weight. The backward only scales the saved gradients by the incoming one.

Against the plain loss under torch.compile (the logits written once by the matmul, read by the loss's forward,
read again and the gradient written by its backward), the logits are written and read once each fewer, and a
chunk's logits live only inside the forward: at the study shape (49,152 tokens, a 49,152-token vocabulary) the
plain loss holds 4.8 GB of bf16 logits from the forward to the backward.

Importing this module needs Triton; model/hybrid_lm.py imports it only when the fused loss runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridctl.core.kernels.pdl import launch_options, wait_then_release

# Vocabulary entries per loop step and warps per row, and tokens per chunk: measured best on an H200 at the study
# shape (benchmarks/loss.py).
BLOCK_V, WARPS = 16384, 16
CHUNK_TOKENS = 16384


@triton.jit
def _softmax_grad_kernel(logits, row_stride, targets, row_loss, grad_scale, V: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr = False):
    """One row: row_loss = logsumexp(x) - x[target]; x is overwritten with (softmax(x) - onehot) * grad_scale."""
    wait_then_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = logits + row * row_stride
    target = tl.load(targets + row)
    cols = tl.arange(0, BLOCK)
    log2e: tl.constexpr = 1.4426950408889634
    # Online max and sum of exp over the row, in base 2 (exp2 is the hardware's instruction).
    m = tl.zeros([], dtype=tl.float32) - float("inf")
    s = tl.zeros([], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(x_row + start + cols, mask=start + cols < V, other=-float("inf")).to(tl.float32) * log2e
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new), axis=0)
        m = m_new
    lse2 = m + tl.log2(s)  # logsumexp in base 2
    x_target = tl.load(x_row + target).to(tl.float32)
    tl.store(row_loss + row, lse2 / log2e - x_target)
    for start in range(0, V, BLOCK):
        ok = start + cols < V
        x = tl.load(x_row + start + cols, mask=ok, other=-float("inf")).to(tl.float32) * log2e
        p = tl.exp2(x - lse2)
        p = tl.where(start + cols == target, p - 1.0, p) * grad_scale
        tl.store(x_row + start + cols, p.to(logits.dtype.element_ty), mask=ok)


def softmax_grad_(logits: Tensor, targets: Tensor, grad_scale: float, block: int = 0, warps: int = 0) -> Tensor:
    """Per-row cross-entropy of `logits` [n, V] against `targets` [n], computed in fp32 whatever the logits' dtype;
    overwrites `logits` with the loss's gradient times grad_scale."""
    n, V = logits.shape
    assert logits.stride(1) == 1 and targets.is_contiguous()
    row_loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _softmax_grad_kernel[(n,)](logits, logits.stride(0), targets, row_loss, grad_scale, V=V,
                                   BLOCK=block or min(BLOCK_V, triton.next_power_of_2(V)), num_warps=warps or WARPS,
                                   **launch_options(logits.device))
    return row_loss


def _matmul_into(acc: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """acc + a @ b, accumulated in fp32 (fp64 for fp64 inputs); bf16 matmuls on CUDA write fp32 directly."""
    wide = torch.promote_types(a.dtype, torch.float32)
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=wide) if acc is None else torch.addmm(acc, a, b, out_dtype=wide)
    product = torch.mm(a, b).to(wide)
    return product if acc is None else acc.add_(product)


@torch.library.custom_op("hybridctl::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_with_grads(h: Tensor, weight: Tensor, targets: Tensor, compute_dtype: torch.dtype,
                                    chunk_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy of (h @ weight.T) against targets, with its gradients for h and weight.
    h: [n, D], weight: [V, D], targets: [n]; matmuls in compute_dtype."""
    n = h.shape[0]
    w = weight.to(compute_dtype)
    grad_h = torch.empty_like(h)
    grad_w = None
    row_loss = torch.empty(n, dtype=torch.float32, device=h.device)
    for start in range(0, n, chunk_tokens):
        stop = min(start + chunk_tokens, n)
        hc = h[start:stop].to(compute_dtype)
        logits = hc @ w.t()
        row_loss[start:stop] = softmax_grad_(logits, targets[start:stop], 1.0 / n)
        grad_h[start:stop] = logits @ w
        grad_w = _matmul_into(grad_w, logits.t(), hc)
    if grad_w is None:
        grad_w = torch.zeros_like(weight)
    return row_loss.sum() / n, grad_h, grad_w.to(weight.dtype)


@linear_cross_entropy_with_grads.register_fake
def _(h, weight, targets, compute_dtype, chunk_tokens):
    return h.new_empty((), dtype=torch.float32), torch.empty_like(h), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, *_unused):
    grad_h, grad_w = ctx.saved_tensors
    # Scaled in fp32: a factor such as 1 / grad_accum rounded to bf16 would bias every gradient below the head.
    scaled = [(g.float() * grad_loss).to(g.dtype) for g in (grad_h, grad_w)]
    return *scaled, None, None, None


linear_cross_entropy_with_grads.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int = 0) -> Tensor:
    """Mean cross-entropy of (h @ weight.T) against targets; h [..., D], targets [...]. The matmuls run in the
    autocast dtype when autocast is on, else in h's dtype."""
    compute = torch.get_autocast_dtype("cuda") if h.is_cuda and torch.is_autocast_enabled("cuda") else h.dtype
    loss, _, _ = linear_cross_entropy_with_grads(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1).contiguous(),
                                                 compute, chunk_tokens or CHUNK_TOKENS)
    return loss
