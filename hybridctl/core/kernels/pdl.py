"""Programmatic dependent launch for the project's Triton kernels (Hopper and newer GPUs).

A kernel launched this way may be scheduled while the kernel before it in the stream is still finishing, so its
launch and its programs' start overlap that kernel's tail. Each kernel that takes `PDL` calls `wait_then_release`
before it reads anything. The wait (PTX `griddepcontrol.wait`) returns once every earlier grid still in flight
has completed and its writes are visible, so a kernel never reads early whatever ran before it. The release then
lets the next kernel be scheduled as soon as every program of this one has passed its wait. torch.compile's
kernels do the same (`trainer.compile_model`). TORCHINDUCTOR_ENABLE_PDL in the environment decides for both when
it is set (1 on, anything else off). Under Triton's interpreter (CPU tests), on other GPUs and with a Triton
without these instructions, the kernels run without it.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def wait_then_release(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def _enabled(device_index: int) -> bool:
    if os.environ.get("TORCHINDUCTOR_ENABLE_PDL", "1") != "1":  # as inductor reads it: 1 is on
        return False
    if _flag("TRITON_INTERPRET") or torch.version.hip is not None or not hasattr(tl.extra.cuda, "gdc_wait"):
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def launch_options(device: torch.device) -> dict:
    """The launch keywords for a kernel that takes `PDL` and runs on `device`."""
    if device.type == "cuda" and _enabled(device.index if device.index is not None else torch.cuda.current_device()):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
