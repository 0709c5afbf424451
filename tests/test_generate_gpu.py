"""GPU checks of decoding with caches: the CUDA path (fla's chunk kernel from a state for the prompt, its fused
recurrent kernel for each step, the RoPE / add-norm / SwiGLU kernels, flash attention) against the CPU path on
the same weights. Run on a CUDA machine with `pytest -m gpu tests/test_generate_gpu.py -s`; skipped elsewhere.
Gated DeltaNet heads as in the study presets (6 of 128, values 256), so fla's tuned kernels are reused."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import micro_config
from hybridctl.core.lab.decode_bench import cache_nbytes, measure_decode
from hybridctl.core.lab.generate import Sampling, cast_for_inference, generate, prefill
from hybridctl.core.model.graphed_step import GraphedStep, graph_capacity
from hybridctl.core.model.gdn_dispatch import fla_status
from hybridctl.core.model.hybrid_lm import build_model

pytestmark = pytest.mark.gpu

VOCAB = 512
SHAPE = ["model.d_model=256", "model.n_heads=4", "model.gdn.num_heads=6", "model.gdn.head_dim=128",
         "model.gdn.chunk_size=64", "model.dsa.indexer_heads=16"]


def model_for(pattern: str, extra: list[str] = ()):
    cfg = micro_config([*SHAPE, f'model.pattern="{pattern}"', f"model.n_layers={len(pattern)}", *extra])
    cfg.model.vocab_size = VOCAB
    torch.manual_seed(0)
    return build_model(cfg.model).eval()


def cached_logits(model, idx: torch.Tensor, prompt: int) -> torch.Tensor:
    cache = model.new_cache(idx.shape[1])
    with torch.inference_mode():
        outs = [model.forward_cached(idx[:, :prompt], cache, all_logits=True)]
        outs += [model.forward_cached(idx[:, t : t + 1], cache) for t in range(prompt, idx.shape[1])]
    return torch.cat(outs, 1).float().cpu()


@pytest.fixture
def fla_calls(monkeypatch):
    """Counts of fla's chunk and fused recurrent calls: the CUDA path must take them."""
    import fla.ops.gated_delta_rule as ops

    calls = {"chunk_gated_delta_rule": 0, "fused_recurrent_gated_delta_rule": 0}
    for name in calls:
        original = getattr(ops, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)
    return calls


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_cuda_bf16_decoding_matches_cpu(fla_calls):
    assert fla_status(128)[0], fla_status(128)[1]
    model = model_for("LFLD", ["model.dsa.topk=512"])
    idx = torch.randint(0, VOCAB, (3, 100), generator=torch.Generator().manual_seed(0))
    reference = cached_logits(model, idx, 70)  # CPU fp32, equal to the full forward (tests/test_generate.py)
    gpu = cast_for_inference(copy.deepcopy(model).cuda(), torch.bfloat16)
    got = cached_logits(gpu, idx.cuda(), 70)
    error = rel_err(got, reference)
    print(f"\nbf16 CUDA decoding vs fp32 CPU: relative error {error:.2e}, max abs {(got - reference).abs().max():.2e}")
    assert error < 3e-2
    assert fla_calls["chunk_gated_delta_rule"] == 2 and fla_calls["fused_recurrent_gated_delta_rule"] == 2 * 30


def test_cuda_fp32_sparse_windowed_and_moe_decoding_matches_cpu(fla_calls, monkeypatch):
    """fp32 on CUDA (TF32 off in PyTorch; fla's chunk kernel keeps its own): the sparse layer's top-k picks the
    same keys, and the MoE router the same experts, as on the CPU (in bf16 near-uniform untrained routers and
    near-tied indexer scores would pick others)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    layouts = [("DLFL", ["model.dsa.topk=8"]), ("DLFL", ["model.dsa.topk=8", "model.attention.window=16"]),
               ("LFLF", ["model.moe.n_experts=4", "model.moe.moe_every=2"])]
    for pattern, extra in layouts:
        model = model_for(pattern, extra)
        idx = torch.randint(0, VOCAB, (2, 90), generator=torch.Generator().manual_seed(1))
        reference = cached_logits(model, idx, 40)
        got = cached_logits(copy.deepcopy(model).cuda(), idx.cuda(), 40)
        print(f"\nfp32 CUDA vs CPU {pattern} {extra}: max abs {(got - reference).abs().max():.2e}")
        torch.testing.assert_close(got, reference, atol=1e-3, rtol=1e-2)
    assert fla_calls["fused_recurrent_gated_delta_rule"] > 0


def test_cuda_padded_batch_equals_each_prompt_alone(fla_calls, monkeypatch):
    """Left padding on CUDA (fla's chunk kernel with the pads' gates zeroed) leaves each row as it is alone."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = model_for("LFLD", ["model.dsa.topk=8"]).cuda()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (70, 9, 33)]
    batch, _ = generate(model, prompts, 16, Sampling(greedy=True))
    for prompt, row in zip(prompts, batch):
        alone, _ = generate(model, [prompt], 16, Sampling(greedy=True))
        assert row.tokens == alone[0].tokens
    assert fla_calls["chunk_gated_delta_rule"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_steps_equal_eager_steps(dtype, monkeypatch):
    """Steps replayed from a CUDA graph (GraphedStep) give the eager steps' logits on the same tokens, for a
    left-padded batch, with a full and a windowed attention layer; capturing leaves the states as they were."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    for extra in ([], ["model.attention.window=16"]):
        model = cast_for_inference(model_for("LFLF", extra).cuda(), dtype)
        idx = torch.randint(0, VOCAB, (3, 100), generator=torch.Generator().manual_seed(3)).cuda()
        pad = torch.tensor([0, 5, 20]).cuda()
        eager, fixed = model.new_cache(100, pad), model.new_cache(graph_capacity(100), pad)
        with torch.inference_mode():
            for cache in (eager, fixed):
                prefill(model, idx[:, :60], cache)
            step = GraphedStep(model, fixed, 3)
            expected = torch.cat([model.forward_cached(idx[:, t : t + 1], eager) for t in range(60, 100)], 1)
            got = torch.cat([step(idx[:, t : t + 1]).clone() for t in range(60, 100)], 1)
        error = rel_err(got.float(), expected.float())
        print(f"\ngraphed vs eager steps {dtype} {extra}: relative error {error:.2e}")
        assert error < (1e-4 if dtype == torch.float32 else 1e-2)
        assert fixed.length == 100


def test_generate_replays_a_graph_on_cuda(monkeypatch):
    import hybridctl.core.lab.generate as generate_module

    captured = []
    monkeypatch.setattr(generate_module, "GraphedStep", lambda *a: captured.append(1) or GraphedStep(*a))
    model = cast_for_inference(model_for("LFLF").cuda(), torch.bfloat16)
    rows, timing = generate(model, [[1, 2, 3], [4, 5, 6, 7, 8]], 12, Sampling(greedy=True))
    assert captured == [1] and timing.decode_steps == 11 and all(len(r.tokens) == 12 for r in rows)
    assert timing.cuda_graph
    eager_rows, eager_timing = generate(model, [[1, 2, 3], [4, 5, 6, 7, 8]], 12, Sampling(greedy=True), cuda_graph=False)
    assert captured == [1] and not eager_timing.cuda_graph and [r.tokens for r in eager_rows] == [r.tokens for r in rows]


def test_decode_bench_row_on_cuda():
    cfg = micro_config([*SHAPE, 'model.pattern="LLFL"', "model.n_layers=4"])
    cfg.model.vocab_size = VOCAB
    row = measure_decode(cfg, 2048, 4, torch.device("cuda"), torch.bfloat16, steps=8, warmup=2)
    assert row["error"] is None and row["cuda_graph"], row
    assert row["cache_bytes"] == cache_nbytes(cfg.model, 4, graph_capacity(2048 + 10), torch.bfloat16)
    assert row["peak_memory_bytes"] >= row["cache_bytes"] and row["decode_tok_s"] > 0
    print(f"\n{row}")
