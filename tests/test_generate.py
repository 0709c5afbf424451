"""Decoding with caches (model/cache.py, forward_cached), generation (lab/generate.py), `hybridctl generate` and
`bench decode`: cached logits against the full forward pass, cached generation against recomputation, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import micro_config, run_cli
from hybridctl.cli import main
from hybridctl.core.lab.decode_bench import cache_nbytes, measure_decode
from hybridctl.core.lab.generate import Sampling, TextStream, context_limit, generate, prefill, sample
from hybridctl.core.model.graphed_step import graph_capacity
from hybridctl.core.model.hybrid_lm import build_model

VOCAB = 300
# relu in the indexer scores makes exact ties (keys whose every head is negative score 0); with 16 heads they are
# rare enough that no top-k boundary here falls on one, where the full pass and the cache may pick different keys
DSA = ["model.dsa.topk=3", "model.dsa.indexer_heads=16"]
LAYOUTS = {
    "deltanet": ['model.pattern="LL"'],
    "attention": ['model.pattern="FF"'],
    "windowed": ['model.pattern="FF"', "model.attention.window=5"],
    "sparse": ['model.pattern="DD"', *DSA],
    "sparse_windowed": ['model.pattern="DD"', *DSA, "model.attention.window=6"],
    "moe": ['model.pattern="LF"', "model.moe.n_experts=4", "model.moe.moe_every=1", "model.moe.capacity_factor=2.0"],
    "mixed": ['model.pattern="LFDL"', "model.n_layers=4", *DSA],
    "mixed_windowed": ['model.pattern="DLFL"', "model.n_layers=4", *DSA, "model.attention.window=4"],
}


def micro_model(extra: list[str], seed: int = 0):
    cfg = micro_config(extra)
    cfg.model.vocab_size = VOCAB
    torch.manual_seed(seed)
    return build_model(cfg.model).eval()


def cached_logits(model, idx: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of every position, the sequence fed in pieces of these lengths (then one token per call)."""
    cache = model.new_cache(idx.shape[1])
    outs, start = [], 0
    for length in chunks + [1] * (idx.shape[1] - sum(chunks)):
        outs.append(model.forward_cached(idx[:, start : start + length], cache, all_logits=True))
        start += length
    return torch.cat(outs, 1)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("chunks", [[], [7], [5, 8]], ids=["steps", "prompt+steps", "two-pieces+steps"])
def test_cached_decoding_matches_full_forward(layout, chunks):
    model = micro_model(LAYOUTS[layout])
    idx = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx).logits
        torch.testing.assert_close(cached_logits(model, idx, chunks), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["deltanet", "attention", "windowed", "mixed_lf"])
@pytest.mark.parametrize("prompt", [3, 12], ids=["prompt-within-window", "prompt-past-window"])
def test_fixed_shape_steps_match_eager_steps(layout, prompt):
    """HybridLM.step_at, what a CUDA graph replays (the position from a tensor, every slot of an oversized cache
    read and masked, states updated in place), gives the logits of forward_cached's steps, for a left-padded
    batch (and one without padding), before and past a windowed layer's ring."""
    extra = {"mixed_lf": ['model.pattern="LFLF"', "model.n_layers=4", "model.attention.window=6"]}
    model = micro_model(LAYOUTS.get(layout) or extra[layout])
    gen = torch.Generator().manual_seed(6)
    idx = torch.randint(0, VOCAB, (3, 30), generator=gen)
    pad = None if prompt < 4 else torch.tensor([0, 4, 9])  # no padding: the unfilled slots alone are masked
    eager, fixed = model.new_cache(30, pad), model.new_cache(graph_capacity(30), pad)
    with torch.no_grad():
        for cache in (eager, fixed):
            prefill(model, idx[:, :prompt], cache)
        for t in range(prompt, 30):
            expected = model.forward_cached(idx[:, t : t + 1], eager)
            got = model.step_at(idx[:, t : t + 1], fixed, torch.tensor(fixed.length))
            fixed.advance(1)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert fixed.length == eager.length == 30 and all(layer.length == 30 for layer in fixed.layers)


def test_fixed_shape_steps_refuse_sparse_attention_and_moe():
    for layout in ("sparse", "moe"):
        model = micro_model(LAYOUTS[layout])
        cache = model.new_cache(8)
        with torch.no_grad():
            prefill(model, torch.zeros(1, 4, dtype=torch.long), cache)
            with pytest.raises(ValueError, match="forward_cached"):
                model.step_at(torch.zeros(1, 1, dtype=torch.long), cache, torch.tensor(4))


def test_moe_decoding_drops_no_token():
    """With a capacity that drops tokens in the full pass, the cache path keeps every token: its steps equal one
    parallel pass without capacity, and differ from the capacity-limited forward."""
    model = micro_model(['model.pattern="LF"', "model.moe.n_experts=4", "model.moe.moe_every=1",
                         "model.moe.capacity_factor=0.5"])
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stepwise = cached_logits(model, idx, [])
        one_pass = cached_logits(model, idx, [16])
        dropping = model(idx).logits
    torch.testing.assert_close(stepwise, one_pass, atol=1e-5, rtol=0)
    assert (stepwise - dropping).abs().max() > 1e-3


def recompute_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding without a cache: the whole sequence through forward at every step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("layout", ["mixed", "mixed_windowed", "moe"])
def test_cached_greedy_generation_equals_recomputation(layout):
    """A batch of prompts of different lengths (left-padded, decoded together) gives each prompt what greedy
    decoding that recomputes the whole sequence at every step gives it alone."""
    model = micro_model(LAYOUTS[layout])
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (9, 3, 14)]
    rows, timing = generate(model, prompts, 12, Sampling(greedy=True))
    for prompt, row in zip(prompts, rows):
        assert row.tokens == recompute_greedy(model, prompt, 12)
        assert row.stop == "length"
    assert timing.decode_steps == 11


def test_generation_decodes_step_by_step_when_the_graph_cannot_be_captured(monkeypatch):
    """A failed CUDA graph capture costs speed, not the completion: generate warns and gives the same tokens."""
    import hybridctl.core.lab.generate as generate_module

    def no_capture(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    model = micro_model(['model.pattern="LFLF"', "model.n_layers=4"])
    prompts = [[5, 6, 7], [8, 9]]
    expected, _ = generate(model, prompts, 8, Sampling(greedy=True))
    monkeypatch.setattr(generate_module, "can_graph", lambda model: True)
    monkeypatch.setattr(generate_module, "GraphedStep", no_capture)
    with pytest.warns(RuntimeWarning, match="CUDA graph failed"):
        rows, _ = generate(model, prompts, 8, Sampling(greedy=True))
    assert [r.tokens for r in rows] == [r.tokens for r in expected]


def test_generation_stops_at_eos_and_context_limit():
    model = micro_model(LAYOUTS["mixed"])
    prompt = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(4)).tolist()
    expected = recompute_greedy(model, prompt, 10)
    rows, _ = generate(model, [prompt], 10, Sampling(greedy=True), eos_id=expected[3])
    assert rows[0].tokens == expected[: expected.index(expected[3]) + 1] and rows[0].stop == "eos"
    rows, _ = generate(model, [prompt, prompt[:2]], 10, Sampling(greedy=True), limit=9)
    # a row reads at most 9 tokens: its prompt and all it sampled but the last
    assert [len(r.tokens) for r in rows] == [4, 8] and [r.stop for r in rows] == ["context", "context"]


def test_context_limit_only_for_full_attention():
    assert context_limit(micro_config(['model.pattern="LF"'])) == 32
    assert context_limit(micro_config(['model.pattern="LD"'])) == 32
    assert context_limit(micro_config(['model.pattern="LL"'])) is None
    assert context_limit(micro_config(['model.pattern="LF"', "model.attention.window=8"])) is None


def test_cache_memory_per_layer_kind():
    """Gated DeltaNet's state does not grow with the context; a KV cache grows with it, a windowed one stops at
    its window; the bytes counted from the tensors are what cache_nbytes predicts."""
    def measured(layout: list[str], context: int) -> int:
        model = micro_model(layout)
        cache = model.new_cache(context)
        with torch.no_grad():
            prefill(model, torch.randint(0, VOCAB, (2, context)), cache)
        assert cache.nbytes() == cache_nbytes(model.cfg, 2, context, torch.float32)
        return cache.nbytes()

    assert measured(LAYOUTS["deltanet"], 16) == measured(LAYOUTS["deltanet"], 64)
    assert measured(LAYOUTS["attention"], 64) == 4 * measured(LAYOUTS["attention"], 16)
    assert measured(LAYOUTS["windowed"], 64) == measured(LAYOUTS["windowed"], 16) == 2 * 2 * 2 * 5 * 32 * 4
    assert measured(LAYOUTS["sparse"], 24) > measured(LAYOUTS["attention"], 24)  # the indexer keys too


def test_sampling_cuts():
    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0, -2.0]]).repeat(400, 1)
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, Sampling(greedy=True)).tolist() == [0] * 400
    assert sample(logits, Sampling(temperature=0)).tolist() == [0] * 400
    assert sample(logits, Sampling(temperature=1.0, top_k=1, top_p=1.0), gen).unique().tolist() == [0]
    drawn = sample(logits, Sampling(temperature=1.0, top_k=2, top_p=1.0), gen)
    assert set(drawn.tolist()) == {0, 1}
    # p = softmax: 0.66, 0.24, 0.09, ...: top_p 0.8 keeps the first two tokens, 0.5 the first alone
    assert set(sample(logits, Sampling(temperature=1.0, top_p=0.8), gen).tolist()) == {0, 1}
    assert set(sample(logits, Sampling(temperature=1.0, top_p=0.5), gen).tolist()) == {0}
    wide = sample(logits, Sampling(temperature=1.0, top_p=1.0), gen)
    assert set(wide.tolist()) >= {0, 1, 2}
    again = sample(logits, Sampling(temperature=1.0, top_p=1.0), torch.Generator().manual_seed(5))
    assert again.tolist() == sample(logits, Sampling(temperature=1.0, top_p=1.0), torch.Generator().manual_seed(5)).tolist()


def test_text_stream_holds_split_characters():
    from hybridctl.core.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    stream = TextStream(tok.decode, skip={tok.eos_id})
    pieces = [stream.push(t) for t in tok.encode("aé€b") + [tok.eos_id]]
    assert pieces == ["a", "", "é", "", "", "€", "b", ""]


def test_measure_decode_row():
    cfg = micro_config(LAYOUTS["mixed"])
    cfg.model.vocab_size = VOCAB
    row = measure_decode(cfg, 40, 2, torch.device("cpu"), torch.float32, steps=3, warmup=1)
    assert row["error"] is None and row["decode_tok_s"] > 0 and row["prefill_seconds"] > 0
    assert row["cache_bytes"] == row["cache_bytes_expected"] == cache_nbytes(cfg.model, 2, 44, torch.float32)
    skipped = measure_decode(cfg, 40, 2, torch.device("cpu"), torch.float32, max_memory=1000)
    assert skipped["error"] == "over --max-memory"


# ---------------------------------------------------------------------------------------------------------
# The commands


@pytest.fixture(scope="module")
def micro_run(finished_micro_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("generate") / "micro"
    shutil.copytree(finished_micro_run, run)
    return run


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json(micro_run, capsys):
    code, out, err = cli(capsys, "generate", str(micro_run), "--prompt", "def f(x):", "-n", "12", "--greedy", "--json")
    assert code == 0, err
    result = json.loads(out)
    (row,) = result["results"]
    assert row["prompt"] == "def f(x):" and row["prompt_tokens"] == 9
    assert 1 <= row["completion_tokens"] <= 12 and row["stop"] in ("eos", "length")
    assert result["checkpoint"] == "best" and result["tok_s"] > 0
    # greedy: no temperature, cut or seed was used, so none is listed
    assert result["sampling"] == {"greedy": True, "temperature": None, "top_k": None, "top_p": None, "seed": None}
    # greedy: the same completion every time, and the one the cache-free recomputation gives
    from hybridctl.core.lab.trained_model import load_trained_model

    trained = load_trained_model(micro_run)
    expected = recompute_greedy(trained.model, trained.tokenizer.encode("def f(x):"), row["completion_tokens"])
    assert trained.tokenizer.decode([t for t in expected if t != trained.tokenizer.eos_id]) == row["completion"]
    # no CUDA graph on a CPU; --eager asks for none and decodes the same tokens
    code, out, err = cli(capsys, "generate", str(micro_run), "--prompt", "def f(x):", "-n", "12", "--greedy", "--json", "--eager")
    assert code == 0, err
    eager = json.loads(out)
    assert result["cuda_graph"] is False and eager["cuda_graph"] is False
    assert eager["results"][0]["completion"] == row["completion"]


def test_generate_streams_text_and_batches(micro_run, tmp_path, capsys):
    code, out, err = cli(capsys, "generate", str(micro_run), "--prompt", "import os", "-n", "8", "--seed", "3")
    assert code == 0, err
    assert out.startswith("import os") and "tokens in" in err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("class A:\n\n  return\nx = 1\n")
    code, out, err = cli(capsys, "generate", str(micro_run), "--prompt-file", str(prompts), "-n", "6", "--seed", "3")
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith("--- ")] == ["--- 1/3 ---", "--- 2/3 ---", "--- 3/3 ---"]
    code, out, _ = cli(capsys, "generate", str(micro_run), "--prompt-file", str(prompts), "-n", "6", "--seed", "3", "--json")
    assert [r["prompt"] for r in json.loads(out)["results"]] == ["class A:", "  return", "x = 1"]
    assert json.loads(out)["sampling"] == {"greedy": False, "temperature": 0.8, "top_k": 0, "top_p": 0.95, "seed": 3}
    piped = run_cli("generate", str(micro_run), "--prompt-file", "-", "-n", "6", "--seed", "3", "--json",
                    input=prompts.read_text())  # `--prompt-file -` reads standard input
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["results"] == json.loads(out)["results"]
    code, out, _ = cli(capsys, "generate", str(micro_run), "--prompt", "x", "-n", "2", "--temperature", "0", "--json")
    assert code == 0 and json.loads(out)["sampling"]["greedy"] is True and json.loads(out)["sampling"]["top_p"] is None


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "the prompt is empty"),
    ([], "give the text to continue"),
    (["--prompt", "x" * 40], "more than the 32 the model was trained on"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature must be a number >= 0"),
    (["--prompt", "x", "--temperature", "inf"], "--temperature must be a number >= 0 (0 is greedy), got inf"),
    (["--prompt", "x", "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--prompt", "x", "--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--prompt", "x", "--top-k", "-3"], "--top-k must be >= 0"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompt-file", "missing.txt"], "does not exist"),
    (["--prompt", "x", "--checkpoint", "step_000999"], "has no checkpoint 'step_000999'"),
])
def test_generate_bad_input(micro_run, capsys, args, message):
    code, out, err = cli(capsys, "generate", str(micro_run), *args)
    assert code != 0 and out == ""
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_a_batch_says_which_prompts_reached_the_trained_length(micro_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("x" * 30 + "\nimport os\n")  # 30 of the 32 positions the micro run was trained on
    code, out, err = cli(capsys, "generate", str(micro_run), "--prompt-file", str(prompts), "-n", "8", "--greedy")
    assert code == 0, err
    assert "warning: prompt 1 stopped where the model has read 32 tokens, the length it was trained on" in err


def test_greedy_says_which_sampling_options_it_does_not_use(micro_run, capsys):
    code, out, err = cli(capsys, "generate", str(micro_run), "--prompt", "x", "-n", "2", "--greedy",
                         "--temperature", "1.5", "--seed", "4", "--json")
    assert code == 0 and json.loads(out)["sampling"]["temperature"] is None
    assert "warning: --greedy takes the most likely token every time; --temperature, --seed are not used" in err
    code, _, err = cli(capsys, "generate", str(micro_run), "--prompt", "x", "-n", "2", "--greedy", "--json")
    assert code == 0 and "warning" not in err


def test_long_prompt_allowed_when_asked(micro_run, capsys):
    code, out, err = cli(capsys, "generate", str(micro_run), "--prompt", "x" * 40, "-n", "3", "--allow-long-context",
                         "--json")
    assert code == 0, err
    assert json.loads(out)["results"][0]["prompt_tokens"] == 40


def test_generate_run_without_checkpoint(tmp_path, capsys):
    from hybridctl.core.training.runs import RunDir

    run = RunDir(tmp_path / "fresh")
    run.create(micro_config())
    run.release_lock()
    code, out, err = cli(capsys, "generate", str(run.path), "--prompt", "x")
    assert code != 0 and "has no checkpoint yet" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "generate", str(tmp_path / "nothing"), "--prompt", "x")
    assert code != 0 and err.strip() == (f"error: {tmp_path / 'nothing'} does not exist; pass a run folder made by "
                                         "`hybridctl train`, or a checkpoint folder in one")
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, "generate", str(tmp_path / "empty"), "--prompt", "x")
    assert code != 0 and "neither a run folder" in err


def test_bench_decode_cli(tmp_path, capsys):
    out_json = tmp_path / "decode.json"
    args = ["bench", "decode", "--preset", "tiny", "--set", 'model.pattern="LFDL"', "--set", "model.d_model=32",
            "--set", "model.n_heads=2", "--set", "model.gdn.num_heads=2", "--set", "model.gdn.head_dim=16",
            "--vocab", "300", "--context", "8,20", "--batch", "1,2", "--steps", "2", "--warmup", "1", "--device", "cpu"]
    code, out, err = cli(capsys, *args, "--json", str(out_json))
    assert code == 0, err
    report = json.loads(out_json.read_text())
    assert report["task"] == "decode" and report["complete"]
    assert [(r["context"], r["batch_size"]) for r in report["results"]] == [(8, 1), (8, 2), (20, 1), (20, 2)]
    assert all(r["cache_bytes"] == r["cache_bytes_expected"] for r in report["results"])
    assert "decode tok/s" in out
    # the house table: a rule under one header line, no box; the cache in MiB or KiB, as a number with its unit
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line.strip()) == {"─"})
    assert lines[rule - 1].split() == ["arch", "context", "batch", "prefill", "s", "prefill", "tok/s", "decode",
                                       "tok/s", "ms/step", "cache"]
    assert not set("┏┃│└") & set(out)
    from hybridctl.commands.bench import fmt_memory

    rows = lines[rule + 1:rule + 5]
    assert [" ".join(line.split()[-2:]) for line in rows] == [fmt_memory(r["cache_bytes"]) for r in report["results"]]
    assert all(line.split()[-1] in ("KiB", "MiB") for line in rows)
    code, _, err = cli(capsys, *args, "--json", str(out_json))
    assert code != 0 and "--force" in err  # the kept result is not overwritten
    code, _, err = cli(capsys, "bench", "decode", "--context", "0", "--device", "cpu")
    assert code != 0 and "--context" in err


def test_bench_decode_stopped_part_way_says_where_the_shapes_are(tmp_path, capsys, monkeypatch):
    """Ctrl-C during the second shape: exit 130, the first shape's row in the file (marked incomplete), and one line
    that names the file."""
    from hybridctl.core.lab import decode_bench

    measure, calls = decode_bench.measure_decode, []

    def measure_until_stopped(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(*a, **k)

    monkeypatch.setattr(decode_bench, "measure_decode", measure_until_stopped)
    code, out, err = cli(capsys, "bench", "decode", "--preset", "tiny", "--set", "model.d_model=32", "--set",
                         "model.n_heads=2", "--set", "model.gdn.num_heads=2", "--set", "model.gdn.head_dim=16",
                         "--vocab", "300", "--context", "8", "--batch", "1,2", "--steps", "1", "--warmup", "0",
                         "--device", "cpu", "--out", str(tmp_path))
    assert code == 130 and out == ""
    (path,) = (tmp_path / "bench").glob("decode-*.json")
    report = json.loads(path.read_text())
    assert report["complete"] is False and [r["batch_size"] for r in report["results"]] == [1]
    assert err.strip().splitlines()[-1] == f'kept the shapes measured so far in {path} ("complete": false)'
