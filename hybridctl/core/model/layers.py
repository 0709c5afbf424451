"""The small layers every block uses: RMSNorm (which also does the residual add before it) and the SwiGLU MLP.

On CUDA each calls its Triton kernel (kernels/add_norm.py, kernels/swiglu.py); the PyTorch code here is the
reference those kernels are tested against and what runs everywhere else.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, cast_to_autocast: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # add_and_norm's output on CUDA: in autocast's dtype for the matmul that reads it, or in the residual
        # stream's (fp32, as F.rms_norm gives under autocast) for a reader that computes in fp32 (the MoE router).
        self.cast_to_autocast = cast_to_autocast

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, the sum normalised): a residual add and the norm after it, one kernel each way on CUDA
        (add_norm.py). delta None: (x, x normalised)."""
        if x.is_cuda:
            from hybridctl.core.kernels.add_norm import add_rms_norm  # needs Triton

            return add_rms_norm(x, delta, self.weight, self.eps, self.cast_to_autocast)
        x = x if delta is None else x + delta
        return x, self(x)


def silu_gate(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up]; on CUDA through swiglu.py's kernels (a leaner backward)."""
    if gate_up.is_cuda:
        from hybridctl.core.kernels.swiglu import swiglu  # needs Triton

        return swiglu(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.down(silu_gate(self.gate_up(x)))
