"""Which Gated DeltaNet path runs here, and fla's ops that the layer calls one by one.

fla needs Triton and a GPU, so it is imported inside these functions, only when a CUDA tensor asks for it; the
decisions are made once per process (and per shape) and warn once when a requested path cannot run.
"""

from __future__ import annotations

import functools
import warnings

import torch


@functools.lru_cache(maxsize=None)
def fla_status(head_dim: int) -> tuple[bool, str]:
    """Whether fla's chunk kernel may be used for this head dim, decided once per process, and why not.

    fla 0.6.0 refuses the gated-delta backward on Hopper with Triton >= 3.4 and < 3.7.1 (a Triton miscompile
    reported at key block size 64). For head_dim 128 the fla path was checked against the PyTorch reference
    (core/model/gated_delta.py) on an H100 with that stack (tests/test_gpu.py, bf16 and fp32) and matches, so
    the guard is lifted there; for other head dims on an affected stack the PyTorch path is used instead.
    """
    try:
        import fla.ops.common.chunk_o as chunk_o  # noqa: F401  (import is what checks Triton)
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401
    except Exception as e:  # ImportError, or Triton failing to initialise
        return False, f"flash-linear-attention is unavailable ({type(e).__name__}: {e})"
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0

    affected = IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not chunk_o.TRITON_ABOVE_3_7_1
    if affected:
        if head_dim not in VERIFIED_HOPPER_HEAD_DIMS:
            return False, (
                f"fla's gated-delta backward is unverified on Hopper with this Triton for head_dim {head_dim}; "
                "upgrade Triton to >= 3.7.1 or use model.gdn.head_dim = 128"
            )
        chunk_o.TRITON_ABOVE_3_7_1 = True  # lift fla's guard: verified for this head dim (see docstring)
    return True, ""


VERIFIED_HOPPER_HEAD_DIMS = frozenset({128})


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _fla_or_reference(is_cuda: bool, head_dim: int, backend: str) -> str:
    """Whether fla's kernels may run here for this head dim and backend: "fla", else "torch" (with a warning when
    the backend asked for fla's kernels)."""
    if backend == "torch" or not is_cuda:
        if backend in ("fla", "fused") and not is_cuda:
            _warn_once(f"model.gdn.backend = '{backend}' needs CUDA; using the PyTorch reference on this device")
        return "torch"
    ok, why = fla_status(head_dim)
    if not ok:
        _warn_once(f"{why}; Gated DeltaNet falls back to the PyTorch reference (slower)")
        return "torch"
    return "fla"


def use_fla(x: torch.Tensor, head_dim: int, backend: str) -> bool:
    """Whether `gated_delta_rule` runs fla's kernel for this input."""
    return _fla_or_reference(x.is_cuda, head_dim, backend) == "fla"


@functools.lru_cache(maxsize=None)
def _layer_path(is_cuda: bool, head_dim: int, head_v_dim: int, conv_size: int, backend: str) -> str:
    path = _fla_or_reference(is_cuda, head_dim, backend)
    if path == "torch" or backend == "fla":
        return path
    from hybridctl.core.kernels import gdn_fused  # registers the op that forward() calls (Triton: CUDA only)

    if gdn_fused.shape_supported(head_dim, head_v_dim, conv_size) and gdn_fused.fla_internals_available():
        return "fused"
    if backend == "fused":
        _warn_once(f"the fused Gated DeltaNet op does not cover head_dim {head_dim}, value head {head_v_dim}, "
                   f"conv {conv_size} with this fla; using fla's own ops (model.gdn.backend = 'fla')")
    return "fla"


@torch.compiler.assume_constant_result  # decided once, outside the compiled graph
def layer_path(is_cuda: bool, head_dim: int, head_v_dim: int, conv_size: int, backend: str) -> str:
    """How a Gated DeltaNet layer runs: "fused" (gdn_fused's op: this project's conv and norm kernels around
    fla's chunk kernels, one graph node), "fla" (fla's public ops, one by one) or "torch" (the reference).
    backend "auto" takes the first that works on this device and shape."""
    return _layer_path(is_cuda, head_dim, head_v_dim, conv_size, backend)


@torch.compiler.disable
def fla_short_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fla's Triton causal conv + SiLU; reads a strided x (a slice of the fused projection) in place."""
    from fla.modules.causal_conv1d import causal_conv1d

    return causal_conv1d(x, weight, activation="silu")[0]


@torch.compiler.disable
def fla_gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    from fla.modules.fused_norm_gate import rms_norm_gated

    return rms_norm_gated(x, gate, norm.weight, None, activation="swish", eps=norm.eps)
