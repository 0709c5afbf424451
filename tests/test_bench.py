import json
import math
import re
import signal
import socket
import statistics
import time
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import MICRO_SPEED, micro_config, run_cli, write_plugin
from hybridctl.cli import main
from hybridctl.core.training import checkpoint as ckpt
from hybridctl.core.training import checkpoint_files
from hybridctl.core.lab import arc
from hybridctl.core.lab import flops
from hybridctl.core.lab import speed
from hybridctl.core.lab import trained_model
from hybridctl.core.data.tokenizer import ByteTokenizer
from hybridctl.core.model.hybrid_lm import build_model
from hybridctl.core.training.runs import RunDir

LONG = "a long answer that keeps going for many characters"


def record(i, question, texts, answer, labels=None):
    labels = labels or list("ABCDE"[: len(texts)])
    return {"id": f"q{i}", "question": question, "choices": {"text": texts, "label": labels}, "answerKey": answer}


# Ordinary questions (3 to 5 choices, numeric labels too) and questions whose gold answer is much longer than the
# other choices: its summed log-likelihood is far lower, its per-character one is not, so acc and acc_norm differ.
RECORDS = [
    record(0, "Which gas do plants take in for photosynthesis?", ["oxygen", "carbon dioxide", "helium", "argon"], "B"),
    record(1, "What is frozen water called?", ["ice", "steam", "sand"], "A"),
    record(2, "How many legs does a spider have?", ["six", "eight", "ten", "four", "two"], "2", labels=list("12345")),
    record(3, "Which one is long?", ["x", LONG, "y", "z"], "B"),
    record(4, "Pick the sentence.", [LONG + " indeed", "q", "r"], "A"),
    record(5, "And again?", ["k", "m", LONG.upper()], "C"),
]


# Subprocesses run serial as the tests do (see conftest.one_thread).
SERIAL = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder with a randomly initialised micro model (wide init, so choices are far from tied)."""
    cfg = micro_config(["train.seq_len=256", "model.vocab_size=257", "model.init_std=0.3"])
    root = tmp_path_factory.mktemp("bench")
    run = RunDir(root / "runs" / "micro")
    run.create(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    ckpt.save_checkpoint(run.checkpoints_dir / checkpoint_files.step_dir_name(2), model, None, {"step": 2})
    ckpt.save_checkpoint(run.best_dir, model, None, {"step": 2})
    run.release_lock()
    data = root / "arc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return run, model, data


def cli(capsys, *args):
    """The CLI in this process (for errors raised before any model work): exit code and stderr."""
    code = main(list(args))
    return code, capsys.readouterr().err


def reference_logliks(model, question, max_len=None):
    """Each choice's log-likelihood from its own unbatched forward pass over the full logits."""
    tok = ByteTokenizer()
    context = f"Question: {question.question}\nAnswer:"
    out = []
    for text in question.choices:
        whole = tok.encode(context + " " + text)
        n_cont = len(whole) - len(tok.encode(context))
        if max_len:
            whole = whole[-(max_len + 1):]
        with torch.no_grad():
            logp = model(torch.tensor([whole[:-1]])).logits[0].float().log_softmax(-1)
        positions = range(len(whole) - 1 - n_cont, len(whole) - 1)
        out.append(sum(logp[p, whole[p + 1]].item() for p in positions))
    return out


def first_max(values):
    return values.index(max(values))


@pytest.mark.parametrize("batch_size,max_len", [(4, None), (1, None), (7, 64)])
def test_arc_scores_match_direct_computation(tiny_run, batch_size, max_len):
    _, model, data = tiny_run
    questions = arc.read_arc_file(data)
    result = arc.score_arc(model, ByteTokenizer(), questions, torch.device("cpu"), batch_size=batch_size, max_len=max_len)
    acc, acc_norm = [], []
    for r, q, got in zip(RECORDS, questions, result["questions"]):
        assert (q.choices, q.gold) == (r["choices"]["text"], r["choices"]["label"].index(r["answerKey"]))
        ref = reference_logliks(model, q, max_len)
        assert got["logliks"] == pytest.approx(ref, rel=1e-5, abs=1e-4)
        gaps = sorted(ref)
        assert gaps[-1] - gaps[-2] > 1e-3, "choices nearly tied: the comparison below would be meaningless"
        pred, pred_norm = first_max(ref), first_max([ll / len(t) for ll, t in zip(ref, q.choices)])
        assert (got["pred"], got["pred_norm"], got["gold"]) == (pred, pred_norm, q.gold)
        acc.append(float(pred == q.gold))
        acc_norm.append(float(pred_norm == q.gold))
    assert result["n"] == len(RECORDS)
    assert result["acc"] == pytest.approx(statistics.mean(acc))
    assert result["acc_norm"] == pytest.approx(statistics.mean(acc_norm))
    assert result["acc_stderr"] == pytest.approx(statistics.stdev(acc) / math.sqrt(len(acc)))
    assert result["acc_norm_stderr"] == pytest.approx(statistics.stdev(acc_norm) / math.sqrt(len(acc)))
    assert result["chance"] == pytest.approx(statistics.mean(1 / len(r["choices"]["text"]) for r in RECORDS))
    # the long-answer questions: length normalisation changes the pick, and so the score
    for got in result["questions"][3:]:
        assert got["pred"] != got["pred_norm"]
    assert result["acc"] != result["acc_norm"]


def test_arc_cli_writes_results_and_keeps_them(tiny_run, capsys):
    run, model, data = tiny_run
    (run.path / "bench" / "arc.json").unlink(missing_ok=True)
    result = run_cli("bench", "arc", str(run.path), "--data", str(data), "--batch-size", "5", env=SERIAL)
    assert result.returncode == 0, result.stderr
    assert "acc_norm" in result.stdout and "chance" in result.stdout and "best" in result.stdout
    saved = trained_model.read_bench_result(run, "arc")
    expected = arc.score_arc(model, ByteTokenizer(), arc.read_arc_file(data), torch.device("cpu"), max_len=256)
    for key in ("n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "chance"):
        assert saved[key] == pytest.approx(expected[key]), key
    assert saved["task"] == data.name and saved["split"] == "test"  # a local file is named, not claimed to be ARC
    assert re.search(rf"^{re.escape(data.name)}$", result.stdout, re.M)
    assert saved["checkpoint"] == "best" and saved["checkpoint_step"] == 2
    assert json.loads((run.path / "bench" / "arc.json").read_text()) == saved

    code, err = cli(capsys, "bench", "arc", str(run.path), "--data", str(data))
    assert code == 1 and "--force" in err and len(err.strip().splitlines()) == 1
    assert trained_model.read_bench_result(run, "arc") == saved


def test_arc_cli_checkpoint_folder_parquet_and_limit(tiny_run, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    run, _, _ = tiny_run
    data = tmp_path / "arc.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), data)
    step = run.checkpoints_dir / "step_000002"
    result = run_cli("bench", "arc", str(step), "--data", str(data), "--limit", "2", "--force", env=SERIAL)
    assert result.returncode == 0, result.stderr
    saved = trained_model.read_bench_result(run, "arc")
    assert saved["n"] == 2 and saved["checkpoint"] == "step_000002" and saved["limit"] == 2


def test_arc_out_chooses_where_the_result_goes(tiny_run, tmp_path, capsys):
    run, _, data = tiny_run
    before = trained_model.read_bench_result(run, "arc")
    out = tmp_path / "results" / "arc_micro.json"
    assert main(["bench", "arc", str(run.path), "--data", str(data), "--limit", "2", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["n"] == 2 and saved["task"] == data.name and f"saved {out}" in capsys.readouterr().out
    assert trained_model.read_bench_result(run, "arc") == before  # RUN/bench/arc.json untouched
    code, err = cli(capsys, "bench", "arc", str(run.path), "--data", str(data), "--out", str(out))
    assert code == 1 and "--force" in err and json.loads(out.read_text()) == saved


def test_arc_offline_without_data_is_one_line_error(tiny_run, tmp_path):
    run, _, _ = tiny_run
    # an empty hub cache, so a copy of ARC downloaded earlier on this machine is not found
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = run_cli("bench", "arc", str(run.path), "--force", env=env)
    assert result.returncode == 1
    assert "pass --data FILE" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_arc_with_the_hub_unreachable_fails_fast_without_retries(tiny_run, tmp_path):
    run, _, _ = tiny_run
    with socket.socket() as s:  # a local port nothing listens on: every connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{port}",
           "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
    start = time.perf_counter()
    result = run_cli("bench", "arc", str(run.path), "--force", env=env)
    elapsed = time.perf_counter() - start
    assert result.returncode == 1 and "Traceback" not in result.stderr
    # without the probe, `datasets` retries the request five times, sleeping over 20 s in all
    assert "Retrying" not in result.stderr and elapsed < 15
    assert f"the hub (http://127.0.0.1:{port}) is unreachable and it is not in the local cache" in result.stderr
    assert "pass --data FILE" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("case,needle", [
    ("not_a_run", "neither a run folder"),
    ("missing_data", "does not exist"),
    ("bad_json", "line 2 is not valid JSON"),
    ("bad_answer", "answerKey 'Z' is not one of the labels"),
    ("no_answer", "line 1: no answerKey (the label of the right choice)"),
    ("bad_split", "unknown ARC split"),
    ("bad_checkpoint", "has no checkpoint 'step_000009'"),
    ("checkpoint_and_folder", "pass --checkpoint only with a run folder"),
])
def test_arc_cli_errors_are_one_line(tiny_run, tmp_path, capsys, case, needle):
    run, _, data = tiny_run
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({**RECORDS[1], "answerKey": "Z"}) + "\n")
    unanswered = tmp_path / "unanswered.jsonl"
    unanswered.write_text(json.dumps({k: v for k, v in RECORDS[1].items() if k != "answerKey"}) + "\n")
    args = {
        "not_a_run": [str(tmp_path), "--data", str(data)],
        "missing_data": [str(run.path), "--data", str(tmp_path / "nope.jsonl")],
        "bad_json": [str(run.path), "--data", str(bad)],
        "bad_answer": [str(run.path), "--data", str(wrong)],
        "no_answer": [str(run.path), "--data", str(unanswered)],
        "bad_split": [str(run.path), "--split", "train"],
        "bad_checkpoint": [str(run.path), "--checkpoint", "step_000009", "--data", str(data)],
        "checkpoint_and_folder": [str(run.best_dir), "--checkpoint", "best", "--data", str(data)],
    }[case]
    code, err = cli(capsys, "bench", "arc", *args, "--force")
    assert code == 1
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_speed_cli_on_cpu(tmp_path):
    out = tmp_path / "speed.json"
    result = run_cli("bench", "speed", "--patterns", "LF,LL", "--seq", "16,32", "--tokens-per-step", "64",
                     "--steps", "2", "--warmup", "1", "--json", str(out), *MICRO_SPEED, env=SERIAL)
    assert result.returncode == 0, result.stderr
    assert "tok/s" in result.stdout and "MFU" in result.stdout and str(out.name) in result.stdout
    report = json.loads(out.read_text())
    assert report["task"] == "speed" and report["device"] == "cpu" and report["mode"] == "train"
    assert report["complete"] is True
    rows = report["results"]
    assert [(r["layer_types"], r["seq_len"], r["batch_size"]) for r in rows] == [
        ("LF", 16, 4), ("LF", 32, 2), ("LL", 16, 4), ("LL", 32, 2)]
    for r in rows:
        assert r["tok_s"] > 0 and r["step_ms"] > 0 and r["tokens_per_step"] == 64
        assert r["flops_per_token"] == pytest.approx(3 * r["flops_breakdown"]["forward"])
        assert r["mfu"] is None and r["peak_memory_bytes"] is None and r["rss_bytes"] > 0
        assert r["error"] is None
    lf = rows[0]["flops_breakdown"]
    assert lf["attention"] > 0 and lf["gdn"] > 0 and rows[2]["flops_breakdown"]["attention"] == 0
    assert "tok/s" in result.stdout and "LF" in result.stdout

    before = out.read_text()
    code = main(["bench", "speed", "--patterns", "LL", "--seq", "16", "--batch", "2", "--json", str(out), *MICRO_SPEED])
    assert code == 1 and out.read_text() == before


def test_speed_forward_only_default_path(tmp_path):
    result = run_cli("bench", "speed", "--patterns", "FL", "--seq", "32", "--batch", "2", "--steps", "1",
                     "--warmup", "0", "--forward-only", "--out", str(tmp_path), *MICRO_SPEED, env=SERIAL)
    assert result.returncode == 0, result.stderr
    (path,) = (tmp_path / "bench").glob("speed-*.json")
    report = json.loads(path.read_text())
    (row,) = report["results"]
    assert report["mode"] == "forward" and row["mode"] == "forward" and row["tok_s"] > 0
    assert row["flops_per_token"] == pytest.approx(row["flops_breakdown"]["forward"])


def test_speed_memory_is_each_shapes_own_peak(tmp_path):
    """On CPU the peak RSS is reset before each shape: a small shape measured after a large one reports less (the
    process's peak since it started would only grow); the footer says what was measured and where FLOPs are told."""
    if not speed.reset_peak_rss():
        pytest.skip("the peak RSS cannot be reset on this system")
    out = tmp_path / "speed.json"
    result = run_cli("bench", "speed", "--patterns", "LF", "--seq", "256,16", "--batch", "64,2", "--steps", "1",
                     "--warmup", "0", "--json", str(out), *MICRO_SPEED, env=SERIAL)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["seq_len"], r["batch_size"]) for r in rows] == [(256, 64), (256, 2), (16, 64), (16, 2)]
    assert all(r["rss_scope"] == "shape" for r in rows)
    assert rows[-1]["rss_bytes"] < rows[0]["rss_bytes"] - 50 * 2**20, [r["rss_bytes"] for r in rows]
    assert "(see docs/benchmarks.md)" in result.stdout and "README" not in result.stdout
    assert "peak mem: the process's peak RSS while the shape ran" in result.stdout
    assert f"{rows[-1]['rss_bytes'] / 2**30:.2f} GiB" in result.stdout.splitlines()[-3]


def test_peak_rss_reset_forgets_an_earlier_peak():
    if not speed.reset_peak_rss():
        pytest.skip("the peak RSS cannot be reset on this system")
    big = torch.ones(64 * 2**20)  # 256 MiB, touched
    del big
    high = speed.peak_rss_bytes(since_reset=True)
    assert speed.reset_peak_rss()
    assert speed.peak_rss_bytes(since_reset=True) < high - 128 * 2**20


def test_speed_memory_caption_says_when_the_peak_is_the_processes():
    from hybridctl.commands.bench import fmt_memory, speed_table

    row = {"name": "LL", "layer_types": "LL", "params": 1000, "seq_len": 16, "batch_size": 2, "tok_s": 10.0,
           "step_ms": 5.0, "tflops": 0.001, "mfu": None, "peak_memory_bytes": None, "rss_bytes": 3 * 2**29,
           "rss_scope": "process", "error": None}
    report = {"mode": "train", "peak_bf16_tflops": None, "device": "cpu", "results": [row]}
    assert "peak RSS since it started" in speed_table(report).caption
    row["rss_scope"] = "shape"
    assert "peak RSS while the shape ran" in speed_table(report).caption
    assert [fmt_memory(n) for n in (None, 3 * 2**29, 317440, 5 * 2**20, 2000)] == [
        "-", "1.50 GiB", "0.303 MiB", "5 MiB", "1.95 KiB"]


def test_speed_runs_started_in_one_second_keep_both_results(tmp_path, capsys, monkeypatch):
    """A second `bench speed` that starts while the first measures, in the same second, gets a file of its own."""
    now = time.localtime()
    monkeypatch.setattr(time, "strftime", lambda fmt, t=None, strftime=time.strftime: strftime(fmt, now))
    args = ["bench", "speed", "--patterns", "LL", "--seq", "16", "--batch", "2", "--steps", "1", "--warmup", "0",
            "--out", str(tmp_path), *MICRO_SPEED]
    measure, started, codes = speed.measure_speed, [], []

    def measure_and_start_another(*a, **k):
        if not started:
            started.append(True)
            codes.append(main(args))
        return measure(*a, **k)

    monkeypatch.setattr(speed, "measure_speed", measure_and_start_another)
    assert main(args) == 0 and codes == [0], capsys.readouterr().err
    out = capsys.readouterr().out
    saved = re.findall(r"^saved (.+)$", out, re.M)
    files = sorted((tmp_path / "bench").iterdir())
    assert len(set(saved)) == 2 and sorted(map(Path, saved)) == files
    assert [json.loads(f.read_text())["task"] for f in files] == ["speed", "speed"]


def test_speed_stopped_part_way_keeps_the_shapes_it_measured(tmp_path, capsys, monkeypatch):
    """Stopped during its second shape, a run leaves the first one's row in its file (marked incomplete); stopped
    during its first, it leaves no file of its own and a --json file it was to replace untouched."""
    measure, stop_at = speed.measure_speed, []

    def measure_until_stopped(*a, **k):
        stop_at[0] -= 1
        if stop_at[0] == 0:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C, through the CLI's own handler
        return measure(*a, **k)

    monkeypatch.setattr(speed, "measure_speed", measure_until_stopped)
    args = ["bench", "speed", "--patterns", "LL,LF", "--seq", "16", "--batch", "2", "--steps", "1", "--warmup", "0",
            *MICRO_SPEED]
    stop_at[:] = [2]
    assert main([*args, "--out", str(tmp_path / "a")]) == 130
    (path,) = (tmp_path / "a" / "bench").glob("speed-*.json")
    report = json.loads(path.read_text())
    assert report["complete"] is False and [r["layer_types"] for r in report["results"]] == ["LL"]
    assert capsys.readouterr().err.splitlines()[-2:] == [
        f'kept the shapes measured so far in {path} ("complete": false)', "error: interrupted"]

    stop_at[:] = [1]
    assert main([*args, "--out", str(tmp_path / "b")]) == 130
    assert not list((tmp_path / "b").rglob("*.json"))
    assert capsys.readouterr().err.splitlines()[-1] == "error: interrupted"  # said even with nothing measured
    kept = tmp_path / "kept.json"
    kept.write_text("an earlier result")
    stop_at[:] = [1]
    assert main([*args, "--json", str(kept), "--force"]) == 130
    assert kept.read_text() == "an earlier result" and "kept the shapes" not in capsys.readouterr().err


def test_speed_json_that_is_a_folder_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(speed, "measure_speed", lambda *a, **k: pytest.fail("measured before checking --json"))
    code, err = cli(capsys, "bench", "speed", "--patterns", "LL", "--seq", "16", "--batch", "2", "--json", str(tmp_path),
                    "--force", *MICRO_SPEED)
    assert code == 1 and err.strip() == f"error: {tmp_path} is a folder; give a file path"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("")
    code, err = cli(capsys, "bench", "speed", "--patterns", "LL", "--json", str(run / "config.toml"), "--force", *MICRO_SPEED)
    assert code == 1 and "is one of the files of" in err and (run / "config.toml").read_text() == ""


@pytest.mark.parametrize("args,needle", [
    (["--batch", "2", "--tokens-per-step", "64"], "not both"),
    (["--seq", "10,x"], "comma-separated integers"),
    (["--seq", "64", "--tokens-per-step", "32"], "less than one sequence"),
    (["--preset", "tiny,deltanet", "--patterns", "LL"], "one preset"),
    (["--preset", "nope_preset"], "unknown preset"),
    (["--patterns", "LXL"], "unknown letter 'X'"),
    (["--patterns", "tiny"], "'tiny' is a preset; name presets with --preset tiny"),
    (["--patterns", "[3,6"], "unclosed '['"),
    (["--patterns", "[3,x]"], "not a list of layer indices"),
    (["--preset", "LLFL"], "pass it as --patterns LLFL"),
])
def test_speed_cli_errors(capsys, args, needle):
    code, err = cli(capsys, "bench", "speed", *args)
    assert code != 0
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_speed_layouts_are_patterns_or_attention_indices_on_one_preset():
    from hybridctl.core.presets import parse_layouts

    layouts = parse_layouts("LLFL,[1];[2, 0],LLFL")
    assert layouts == ["LLFL", "[1]", "[0,2]"]
    configs = speed.speed_configs(["tiny"], layouts, [], vocab=300)
    assert [(c.name, "".join(c.model.layer_types())) for c in configs] == [
        ("LLFL", "LLFL"), ("attn1", "LFLL"), ("attn0-2", "FLFL")]
    assert all(c.model.d_model == 128 and c.model.vocab_size == 300 for c in configs)  # the rest is tiny's


def test_forward_flops_match_pytorch_flop_counter():
    """The formula's forward FLOPs against torch's own count of the model's matmuls. The counter sees every key of
    attention (the math backend computes the full T x T scores) and has no count for the triangular solve, so those
    two are put on its footing."""
    T, B = 64, 2
    for pattern in ("LL", "FF", "LF"):
        cfg = micro_config([f'model.pattern="{pattern}"', "model.vocab_size=257"]).model
        model = build_model(cfg)
        x = torch.randint(0, 257, (B, T))
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x)
        f = flops.flops_per_token(model, T)
        comparable = f["dense"] + f["head"] + f["gdn"] + f["attention"] * T / flops.keys_per_query(T)
        assert counter.get_total_flops() / (B * T) == pytest.approx(comparable, rel=1e-9), pattern


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_speed_on_gpu_reports_memory_and_mfu():
    configs = speed.speed_configs(["tiny"], ["LLFL"], ['train.device="cuda"'])
    report = speed.bench_speed(configs, [256], [4], steps=2, warmup=2)
    (row,) = report["results"]
    assert row["error"] is None and row["tok_s"] > 0 and row["peak_memory_bytes"] > 0
    assert (row["mfu"] is not None) == (flops.peak_bf16_tflops(report["device"]) is not None)


def test_keys_per_query_counts_causal_and_windowed_keys():
    for T, window in ((8, 0), (8, 3), (5, 8)):
        seen = [min(i + 1, window) if window else i + 1 for i in range(T)]
        assert flops.keys_per_query(T, window) == pytest.approx(sum(seen) / T)


def test_peak_table_by_device_name():
    assert flops.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989
    assert flops.peak_bf16_tflops("NVIDIA H100 PCIe") == 756
    assert flops.peak_bf16_tflops("NVIDIA H200") == 989
    assert flops.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert flops.peak_bf16_tflops("Tesla T4") is None


def _write_plugin(root, body):
    write_plugin(root, "hybridctl_bench_plugin", body, "hybridctl.benchmarks", "hellaswag = hybridctl_bench_plugin:hellaswag")


def test_plugin_benchmark_through_entry_point(tmp_path):
    _write_plugin(tmp_path, """
        import typer
        def hellaswag(limit: int = typer.Option(10, "--limit")):
            '''HellaSwag from a plugin.'''
            print(f"hellaswag on {limit} questions")
    """)
    env = {"PYTHONPATH": str(tmp_path)}
    listing = run_cli("bench", "--help", env=env)
    assert listing.returncode == 0 and "hellaswag" in listing.stdout and "arc" in listing.stdout
    result = run_cli("bench", "hellaswag", "--limit", "3", env=env)
    assert result.returncode == 0 and "hellaswag on 3 questions" in result.stdout


def test_broken_plugin_benchmark_warns_but_bench_works(tmp_path):
    _write_plugin(tmp_path, "raise RuntimeError('benchmark exploded')\n")
    result = run_cli("bench", "--help", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0
    assert "warning: plugin benchmark 'hellaswag'" in result.stderr and "benchmark exploded" in result.stderr
    assert "arc" in result.stdout and "speed" in result.stdout
