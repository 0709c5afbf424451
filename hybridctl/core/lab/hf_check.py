"""`hybridctl export --check`: load an exported folder with transformers + fla on a CUDA GPU and compare its logits
and greedy continuation with hybridctl's model on the same weights and tokens.

Figures (logits over the real vocabulary, absolute errors against hybridctl in fp32):
    fla_fp32        fla's model in fp32: the same function to rounding, or the export is wrong
    fla_bf16        fla's model in bf16, as lm-evaluation-harness runs it
    hybridctl_bf16  hybridctl itself under bf16 autocast, as it trains and evaluates: the yardstick for bf16
    greedy          the greedy continuation of a prompt, by full forward passes, through fla's cache, and by
                    transformers' generate (reported, not judged: see greedy_figures)
The fp32 reference runs the recurrence through hybridctl's PyTorch code (model.gdn.backend = "torch"), so it
shares no kernel with fla's model; Triton's fp32 products are made IEEE (TRITON_F32_DEFAULT), not TF32.

fla's attention layer calls flash-attn's `flash_attn_func`, which computes in fp16/bf16 only. The fp32 run, and
the bf16 run where flash-attn is not installed, use an exact PyTorch stand-in (scaled_dot_product_attention with
flash-attn's causal and window masks) in its place, and the result says which ran; everything else in fla's
model runs as it is.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hybridctl.core.errors import ConfigError, RunError

DEFAULT_PROMPT = "def fibonacci(n):\n    "


def check_unavailable(device: str = "cuda") -> str | None:
    """Why the check cannot run here (one line), or None."""
    if not torch.cuda.is_available():
        return "--check needs a CUDA GPU, and this machine has none"
    if not str(device).startswith("cuda"):
        return f"--check runs on a CUDA device, not '{device}'"
    try:
        import fla  # noqa: F401
        import transformers  # noqa: F401
    except Exception as e:  # ImportError, or Triton failing to start
        return f"--check needs flash-linear-attention and transformers ({type(e).__name__}: {e})"
    return None


# ---------------------------------------------------------------------------------------------------------
# flash-attn stand-in


def _attend(q, k, v, softmax_scale, causal, window_size):
    """flash-attn's semantics on [B, T, H, D]: causal aligned to the bottom-right corner (a query block that ends
    at the last key), window (left, right), fewer key/value heads shared by groups of query heads."""
    tq, tk = q.shape[1], k.shape[1]
    i = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=q.device)[None, :]
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
    left, right = window_size
    if causal:
        allowed &= j <= i
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=softmax_scale)
    return out.transpose(1, 2)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **_):
    return _attend(q, k, v, softmax_scale, causal, window_size)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), **_):
    outs = []
    for b in range(len(cu_seqlens_q) - 1):
        qs = slice(int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]))
        ks = slice(int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1]))
        outs.append(_attend(q[qs][None], k[ks][None], v[ks][None], softmax_scale, causal, window_size)[0])
    return torch.cat(outs)


def import_fla() -> bool:
    """Import fla (which registers its models with transformers' Auto classes); where flash-attn is missing, give
    fla's attention layer the stand-in above. Returns whether flash-attn itself is in use."""
    import fla  # noqa: F401
    import fla.layers.attn as fla_attn

    if fla_attn.flash_attn_func is not None and fla_attn.flash_attn_func is not flash_attn_func:
        return True
    fla_attn.flash_attn_func, fla_attn.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return False


@contextlib.contextmanager
def attention_stand_in():
    """fla's attention through the stand-in for the duration (flash-attn computes in fp16/bf16 only)."""
    import fla.layers.attn as fla_attn

    before = fla_attn.flash_attn_func, fla_attn.flash_attn_varlen_func
    fla_attn.flash_attn_func, fla_attn.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    try:
        yield
    finally:
        fla_attn.flash_attn_func, fla_attn.flash_attn_varlen_func = before


# ---------------------------------------------------------------------------------------------------------
# The comparison


def abs_errors(a: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = (a.float() - ref.float()).abs()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item()}


@contextlib.contextmanager
def gdn_backend(model, backend: str):
    """Every Gated DeltaNet layer of `model` computed through `backend` for the duration."""
    from hybridctl.core.model.gated_delta import GatedDeltaNet

    layers = [m for m in model.modules() if isinstance(m, GatedDeltaNet)]
    before = [m.backend for m in layers]
    for m in layers:
        m.backend = backend
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m.backend = b


@torch.no_grad()
def hybridctl_logits(model, ids: torch.Tensor, bf16: bool) -> torch.Tensor:
    if not bf16:
        with gdn_backend(model, "torch"):
            return model(ids).logits.float()
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        return model(ids).logits.float()


@torch.no_grad()
def greedy(logits_fn, prompt: list[int], new_tokens: int, device) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy continuation, each step a full forward pass over the sequence so far (no cache); also returns the
    last-position logits of every step."""
    ids, steps = list(prompt), []
    for _ in range(new_tokens):
        last = logits_fn(torch.tensor([ids], device=device))[0, -1]
        steps.append(last)
        ids.append(int(last.argmax()))
    return ids[len(prompt):], steps


def compare_continuations(ref: list[int], ref_steps: list[torch.Tensor], other: list[int]) -> dict[str, Any]:
    """Same tokens, or where they first differ and how close the reference's logits of the two tokens were there
    (a near tie is within the numerical error, not a mapping fault)."""
    first = next((i for i, (a, b) in enumerate(zip(ref, other)) if a != b), None)
    out: dict[str, Any] = {"same": first is None, "first_difference": first}
    if first is not None:
        logits = ref_steps[first]
        out["reference_margin"] = (logits[ref[first]] - logits[other[first]]).item()
    return out


def check_export(folder: Path, reference=None, prompt: str = DEFAULT_PROMPT, new_tokens: int = 24, seq_len: int = 256,
                 batch: int = 2, seed: int = 0, device: str = "cuda") -> dict[str, Any]:
    """Run the comparison; `reference` is hybridctl's model (the run's checkpoint), or None to read the folder's
    own weights back into hybridctl (export.load_export)."""
    why = check_unavailable(device)
    if why:
        raise RunError(why)
    with ieee_fp32_dots():
        return _check_export(Path(folder), reference, prompt, new_tokens, seq_len, batch, seed, device)


@contextlib.contextmanager
def ieee_fp32_dots():
    """fp32 matrix products in Triton kernels as IEEE fp32, not TF32, for the duration: the fp32 comparison is
    then exact to rounding (TF32's 10-bit mantissa would hide a small mapping fault)."""
    before = os.environ.get("TRITON_F32_DEFAULT")
    os.environ["TRITON_F32_DEFAULT"] = "ieee"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_F32_DEFAULT"]
        else:
            os.environ["TRITON_F32_DEFAULT"] = before


def _check_export(folder: Path, reference, prompt: str, new_tokens: int, seq_len: int, batch: int, seed: int,
                  device: str) -> dict[str, Any]:
    from hybridctl.core.lab.export import load_export

    flash_attn = import_fla()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = "the run's checkpoint"
    if reference is None:
        reference, _ = load_export(folder)
        source = "the folder's weights read back into hybridctl"
    ref_model = reference.to(device).eval()
    has_attention = "F" in ref_model.cfg.layer_types()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ref_model.vocab_size, (batch, seq_len), generator=g).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt_ids = tokenizer(prompt)["input_ids"]
    if not prompt_ids:
        raise ConfigError(f"--prompt {prompt!r} has no tokens; give some text for the greedy continuation to start from")

    ref32 = hybridctl_logits(ref_model, ids, bf16=False)
    kernel = "flash-attn" if flash_attn else "PyTorch stand-in for flash_attn_func"
    result: dict[str, Any] = {
        "folder": str(folder), "reference": source, "layers": "".join(ref_model.cfg.layer_types()),
        "tokens": [batch, seq_len], "logit_std": ref32.std().item(),
        "attention_kernel": {"bf16": kernel, "fp32": "PyTorch stand-in for flash_attn_func"} if has_attention else None,
        "triton_fp32_dots": os.environ["TRITON_F32_DEFAULT"],
        "hybridctl_bf16": abs_errors(hybridctl_logits(ref_model, ids, bf16=True), ref32),
    }
    for dtype in (torch.float32, torch.bfloat16):
        name = "fla_bf16" if dtype == torch.bfloat16 else "fla_fp32"
        fla_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        with attention_stand_in() if dtype == torch.float32 else contextlib.nullcontext(), torch.no_grad():
            logits = fla_model(ids).logits.float()
        if logits.shape != ref32.shape:
            raise RunError(f"fla's model gives logits of shape {tuple(logits.shape)}, hybridctl's {tuple(ref32.shape)}")
        result[name] = abs_errors(logits, ref32)
        if dtype == torch.bfloat16:
            result["greedy"] = greedy_figures(fla_model, ref_model, prompt_ids, new_tokens, device, tokenizer)
        del fla_model
    result["problems"] = within_tolerance(result)
    return result


@torch.no_grad()
def greedy_cached(fla_model, prompt: list[int], new_tokens: int, device) -> list[int]:
    """Greedy continuation through fla's cache (recurrent states, convolution and key/value caches), one token per
    forward pass, as generation runs."""
    out = fla_model(torch.tensor([prompt], device=device), use_cache=True)
    ids = [int(out.logits[0, -1].argmax())]
    for _ in range(new_tokens - 1):
        out = fla_model(torch.tensor([[ids[-1]]], device=device), past_key_values=out.past_key_values, use_cache=True)
        ids.append(int(out.logits[0, -1].argmax()))
    return ids


def greedy_figures(fla_model, ref_model, prompt_ids: list[int], new_tokens: int, device, tokenizer) -> dict[str, Any]:
    import transformers

    ref, ref_steps = greedy(lambda x: hybridctl_logits(ref_model, x, bf16=False), prompt_ids, new_tokens, device)
    full, _ = greedy(lambda x: fla_model(x).logits.float(), prompt_ids, new_tokens, device)
    cached = greedy_cached(fla_model, prompt_ids, new_tokens, device)
    out = {"prompt_tokens": len(prompt_ids), "new_tokens": new_tokens, "hybridctl_fp32": tokenizer.decode(ref),
           "fla_bf16": tokenizer.decode(full), "fla_bf16_cached": tokenizer.decode(cached),
           "fla_vs_hybridctl": compare_continuations(ref, ref_steps, full),
           "cached_vs_hybridctl": compare_continuations(ref, ref_steps, cached)}
    # transformers' generate() drives fla's cache through its own keyword names, which change across transformers
    # releases: reported apart, since a mismatch there is between fla and this transformers, not in the export
    out["transformers"] = transformers.__version__
    try:
        with torch.no_grad():
            generated = fla_model.generate(torch.tensor([prompt_ids], device=device), max_new_tokens=new_tokens,
                                           do_sample=False, pad_token_id=tokenizer.eos_token_id)
        generated = generated[0, len(prompt_ids):].tolist()
        out["generate"] = tokenizer.decode(generated)
        out["generate_vs_hybridctl"] = compare_continuations(ref, ref_steps, generated)
        out["generate_vs_cached"] = generated == cached
    except Exception as e:
        out["generate_error"] = f"{type(e).__name__}: {e}"
    return out


def within_tolerance(result: dict[str, Any]) -> list[str]:
    """The verdict: [] when fla's model computes hybridctl's function, else what is off. In fp32 both compute the
    same function to rounding (a swapped or misplaced tensor errs by orders of magnitude more); in bf16, fla's
    whole residual stream is bf16, so it errs more than hybridctl's autocast, and greedy continuations may part
    only at a near tie (a reference margin within twice the bf16 error)."""
    problems = []
    scale = max(result["logit_std"], 1e-3)
    if result["fla_fp32"]["max_abs"] > 1e-3 * max(scale, 1.0):
        problems.append(f"fla fp32 logits differ by up to {result['fla_fp32']['max_abs']:.2e} (logit std {scale:.3g})")
    if result["fla_bf16"]["mean_abs"] > 0.05 * scale:
        problems.append(f"fla bf16 logits differ by {result['fla_bf16']['mean_abs']:.2e} on average (logit std {scale:.3g})")
    tie = 2 * result["fla_bf16"]["max_abs"]
    for key in ("fla_vs_hybridctl", "cached_vs_hybridctl"):
        cmp = result["greedy"][key]
        if not cmp["same"] and abs(cmp["reference_margin"]) > tie:
            problems.append(f"greedy continuation ({key}) differs at token {cmp['first_difference']} where the "
                            f"reference prefers its token by {cmp['reference_margin']:.3f}")
    return problems
