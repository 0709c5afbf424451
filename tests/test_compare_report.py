"""`compare` and `report` on runs that do not rank like for like: other data, tokenizer or sequence length, a
metric some runs lack, a run that diverged; and the files they write."""

import inspect
import json
import re
import shutil

import pytest

from conftest import MICRO, micro_config, run_cli
from hybridctl.cli import main
from hybridctl.core.lab.results import collect_results, comparability_warning, load_result, rank_results, ranking_warnings, result_record
from hybridctl.core.lab.sweeps import plan_lr_sweep, run_sweep
from hybridctl.core.data.token_cache import load_token_data
from hybridctl.core.errors import ConfigError
from hybridctl.core.training.runs import RunDir
from hybridctl.core.training.trainer import train


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which no other JSON reader accepts."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON output"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four finished micro runs: bytes on the standard library ('stdlib'), a BPE of 300 ids on a local text
    file ('bpe'), bytes with train.seq_len 16 ('short'), and the standard library capped at half the tokens
    ('fewer')."""
    root = tmp_path_factory.mktemp("mixed")
    source = inspect.getsource(inspect)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(source[i:i + 400] for i in range(0, len(source), 400)))
    settings = {
        "stdlib": [],
        "bpe": [f'data.dataset="{corpus}"', 'data.tokenizer="bpe:300"'],
        "short": ["train.seq_len=16"],
        "fewer": ["data.max_tokens=30000"],
    }
    paths = {}
    for name, extra in settings.items():
        cfg = micro_config(extra)
        run = RunDir(root / "runs" / name)
        run.create(cfg)
        try:
            train(cfg, run)
        finally:
            run.release_lock()
        paths[name] = run.path
    return paths


@pytest.fixture(scope="module")
def diverged_sweep(tmp_path_factory):
    """An LR sweep whose first run diverges after one update, its only eval giving a NaN loss."""
    extra = ["train.max_bad_steps=1", "train.grad_clip=0", "train.eval_every=1"]
    plan = plan_lr_sweep("tiny", [1e4, 1e-3], 4, list(MICRO) + extra, name="div")
    path = tmp_path_factory.mktemp("div") / "div"
    state = run_sweep(plan, path)
    assert state["status"] == {"tiny_lr1e4": "diverged", "tiny_lr1e-3": "complete"}
    return path


def cli(capsys, *args) -> tuple[int, str]:
    """The CLI in this process: exit code and stderr."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def table_rows(stdout: str, names) -> dict[str, list[str]]:
    return {line.split()[1]: line.split() for line in stdout.splitlines()
            if re.match(rf"^\s*[\d-]+\s+({'|'.join(map(re.escape, names))})\s", line)}


# ---------------------------------------------------------------------------------------------------------
# data, tokenizer, vocabulary, sequence length


def test_compare_warns_about_runs_on_other_data_or_tokenizers(runs, diverged_sweep, tmp_path):
    result = run_cli("compare", str(runs["stdlib"]), str(runs["bpe"]), "--no-plots")
    assert result.returncode == 0, result.stderr
    warning = result.stderr.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: runs differ in data.dataset, data.tokenizer, model.vocab_size: ")
    assert "stdlib (builtin:stdlib, bytes, 257) vs bpe (" in warning[0] and "bpe:300, 300)" in warning[0]
    assert "not comparable" in warning[0]
    rows = table_rows(result.stdout, ["stdlib", "bpe"])
    assert sorted(r[0] for r in rows.values()) == ["1", "2"]  # a warning: both are still ranked

    short = run_cli("compare", str(runs["stdlib"]), str(runs["short"]), "--json")
    assert short.returncode == 0, short.stderr
    assert "train.seq_len: stdlib (32) vs short (16)" in short.stderr and "data.tokenizer" not in short.stderr
    records = strict_json(short.stdout)  # the warning stays off stdout
    assert {r["name"]: r["seq_len"] for r in records} == {"stdlib": 32, "short": 16}
    assert {r["tokenizer"] for r in records} == {"bytes"}

    # runs on the same data, tokenizer and sequence length: no warning
    same = run_cli("compare", str(runs["stdlib"]), str(diverged_sweep / "tiny_lr1e-3"), "--no-plots")
    assert same.returncode == 0 and "warning" not in same.stderr, same.stderr

    md = tmp_path / "table.md"
    assert run_cli("compare", str(runs["stdlib"]), str(runs["bpe"]), "--markdown", str(md)).returncode == 0
    assert "Warning: runs differ in data.dataset, data.tokenizer, model.vocab_size" in md.read_text()


def test_compare_warns_about_runs_validated_on_other_tokens(runs):
    """data.max_tokens caps the validation split too (at val_fraction of the total), so the eval windows differ."""
    val = {name: load_token_data(micro_config(extra).data).val for name, extra in
           (("stdlib", []), ("fewer", ["data.max_tokens=30000"]))}
    assert len(val["fewer"]) < len(val["stdlib"])
    warning = comparability_warning(collect_results([runs["stdlib"], runs["fewer"]]))
    assert warning.startswith("runs differ in data.max_tokens: stdlib (60000) vs fewer (30000); ")
    assert "data.val" not in warning and "data.dataset" not in warning
    records = [result_record(row, "best_val_loss") for row in rank_results(collect_results([runs["fewer"]]))]
    assert (records[0]["max_tokens"], records[0]["val_fraction"], records[0]["val_split"]) == (30000, 0.05, "")


def test_compare_warns_about_runs_scored_on_other_eval_windows(runs, tmp_path):
    """batch_size × eval_batches windows are spread over the validation tokens: another count scores other
    tokens. A copy of a run whose config asks for twice the windows stands in for such a run."""
    other = tmp_path / "more_windows"
    shutil.copytree(runs["stdlib"], other)
    config = other / "config.toml"
    text = config.read_text()
    assert "eval_batches = 1" in text
    config.write_text(text.replace("eval_batches = 1", "eval_batches = 2"))
    warning = comparability_warning(collect_results([runs["stdlib"], other]))
    assert warning.startswith("runs differ in train.batch_size × train.eval_batches: stdlib (4) vs more_windows (8); ")
    records = [result_record(row, "best_val_loss") for row in rank_results(collect_results([other]))]
    assert records[0]["eval_windows"] == 8


def test_report_says_when_runs_are_not_comparable(runs, tmp_path):
    folder = tmp_path / "runs"
    for name in ("stdlib", "bpe"):
        shutil.copytree(runs[name], folder / name)
    result = run_cli("report", str(folder))
    assert result.returncode == 0, result.stderr
    text = (folder / "report.md").read_text()
    assert "Not comparable: runs differ in data.dataset, data.tokenizer, model.vocab_size: " in text
    assert "Winner:" in text  # still ranked


# ---------------------------------------------------------------------------------------------------------
# a metric that some or all runs lack


def test_metric_no_run_has_is_an_error(runs, tmp_path):
    result = run_cli("compare", str(runs["stdlib"]), str(runs["short"]), "--metric", "arc_acc")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: none of the 2 runs has arc_acc; measure it with `hybridctl bench arc RUN`, or rank by another --metric"
    ]
    assert "ranked by" not in result.stdout

    folder = tmp_path / "runs"
    for name in ("stdlib", "short"):
        shutil.copytree(runs[name], folder / name)
    report = run_cli("report", str(folder), "--metric", "final_val_mqar_acc")
    assert report.returncode == 1
    assert "none of the 2 runs has final_val_mqar_acc; only runs on data.dataset = synthetic:mqar" in report.stderr
    assert not (folder / "report.md").exists()

    (folder / "short" / "bench").mkdir()
    (folder / "short" / "bench" / "arc.json").write_text(json.dumps({"acc": 0.25, "acc_norm": 0.27, "n": 1172}))
    some = run_cli("compare", str(folder), "--metric", "arc_acc", "--no-plots")
    assert some.returncode == 0, some.stderr
    assert some.stderr.strip() == ("warning: 1 of 2 runs has no arc_acc and is not ranked (stdlib); "
                                   "measure it with `hybridctl bench arc RUN`")
    assert "1 of 2 runs ranked by arc_acc" in some.stdout
    rows = table_rows(some.stdout, ["stdlib", "short"])
    assert rows["short"][0] == "1" and rows["stdlib"][0] == "-"


def test_ranking_warnings_name_what_differs_and_what_is_missing(runs):
    """compare (strict: a metric no run has is an error) and ablate (not strict: its sweep still shows) share
    these warnings."""
    results = collect_results([runs["stdlib"], runs["short"]])
    with pytest.raises(ConfigError, match="none of the 2 runs has arc_acc"):
        ranking_warnings(results, "arc_acc")
    assert ranking_warnings(results, "arc_acc", strict=False) == [
        "none of the 2 runs has arc_acc; measure it with `hybridctl bench arc RUN`, or rank by another --metric"]
    (warning,) = ranking_warnings(results, "best_val_loss")
    assert warning.startswith("runs differ in train.seq_len") and "short" in warning and "stdlib" in warning


# ---------------------------------------------------------------------------------------------------------
# diverged runs


def test_diverged_run_is_shown_as_diverged(diverged_sweep, tmp_path):
    result = run_cli("compare", str(diverged_sweep), "--no-plots", env={"COLUMNS": "80"})  # a pipe's width
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout, ["tiny_lr1e4", "tiny_lr1e-3"])
    assert rows["tiny_lr1e-3"][0] == "1"
    diverged = " ".join(rows["tiny_lr1e4"])
    assert rows["tiny_lr1e4"][0] == "-" and "diverged (2/4)" in diverged  # stopped at step 2, its first bad one
    assert "nan" not in diverged.lower() and "partial" not in diverged

    records = {r["name"]: r for r in strict_json(run_cli("compare", str(diverged_sweep), "--json").stdout)}
    assert records["tiny_lr1e4"]["status"] == "diverged" and records["tiny_lr1e4"]["rank"] is None
    assert records["tiny_lr1e4"]["value"] is None and records["tiny_lr1e4"]["delta_pct"] is None

    md = tmp_path / "report.md"
    report = run_cli("report", str(diverged_sweep), "--out", str(md))
    assert report.returncode == 0, report.stderr
    text = md.read_text()
    assert "Diverged (loss not finite): tiny_lr1e4; not ranked." in text
    assert "- tiny_lr1e4: LR 1e4 is too high: run the ablate command again with --force and --values without it" in text
    assert "nan%" not in text.lower() and "--from best" not in text and "Not ranked (unfinished)" not in text

    # outside a sweep, a last eval that is not finite says the same
    alone = tmp_path / "alone"
    shutil.copytree(diverged_sweep / "tiny_lr1e4", alone)
    result = load_result(RunDir(alone))
    assert result.status == "diverged" and result.get("best_val_loss") is None


def test_a_sweep_stopped_before_some_runs_says_which_are_not_started(diverged_sweep, tmp_path):
    folder = tmp_path / "div"
    shutil.copytree(diverged_sweep, folder)
    assert run_cli("compare", str(folder), "--no-plots").stderr == ""  # every planned run has its folder
    shutil.rmtree(folder / "tiny_lr1e-3")
    note = ("1 planned run of sweep div not started yet (tiny_lr1e-3); run the same `hybridctl ablate` command "
            "again to train them")
    result = run_cli("compare", str(folder), "--no-plots")
    assert result.returncode == 0 and f"warning: {note}" in result.stderr
    assert run_cli("report", str(folder)).returncode == 0
    assert f"{note[0].upper()}{note[1:]}." in (folder / "report.md").read_text()


# ---------------------------------------------------------------------------------------------------------
# files written


def test_report_keeps_the_plots_of_an_earlier_report(diverged_sweep, tmp_path):
    folder = tmp_path / "div"
    shutil.copytree(diverged_sweep, folder)
    assert run_cli("report", str(folder)).returncode == 0
    (folder / "report.md").unlink()
    kept = sorted((folder / "report_plots").iterdir())[0]
    kept.write_text("edited by hand")
    result = run_cli("report", str(folder))
    assert result.returncode == 1 and result.stderr.strip() == (
        f"error: {folder / 'report_plots'} already exists; pass --force to replace the plots in it or choose another --out")
    assert kept.read_text() == "edited by hand" and not (folder / "report.md").exists()
    assert run_cli("report", str(folder), "--force").returncode == 0
    assert kept.read_text() != "edited by hand" and (folder / "report.md").is_file()


def test_report_out_must_be_markdown(diverged_sweep, tmp_path, capsys):
    folder = tmp_path / "div"
    shutil.copytree(diverged_sweep, folder)
    config = folder / "tiny_lr1e-3" / "config.toml"
    before = config.read_text()
    for target in (config, tmp_path / "notes.txt"):
        code, err = cli(capsys, "report", folder, "--out", target, "--force")
        assert code == 1 and err.strip() == f"error: --out {target} is not a Markdown file; give a path ending in .md"
    assert config.read_text() == before and not (tmp_path / "notes.txt").exists()
    assert not list(tmp_path.rglob("*_plots"))


def test_a_folder_given_as_an_output_file_is_refused(diverged_sweep, tmp_path, capsys):
    folder = tmp_path / "out.md"
    folder.mkdir()
    for args in (["report", diverged_sweep, "--out", folder], ["compare", diverged_sweep, "--json-out", folder],
                 ["compare", diverged_sweep, "--markdown", folder]):
        code, err = cli(capsys, *args, "--force")
        assert code == 1 and err.strip() == f"error: {folder} is a folder; give a file path", args
    assert not list(folder.iterdir()) and not (tmp_path / "out_plots").exists()


def test_compare_never_writes_over_a_runs_own_files(diverged_sweep, tmp_path, capsys):
    folder = tmp_path / "div"
    shutil.copytree(diverged_sweep, folder)
    for target in (folder / "tiny_lr1e-3" / "summary.json", folder / "sweep.json"):
        before = target.read_text()
        code, err = cli(capsys, "compare", folder, "--json-out", target, "--force")
        assert code == 1 and err.strip() == f"error: {target} is one of the files of {target.parent}; choose another file"
        assert target.read_text() == before


def test_compare_makes_the_folders_of_its_output_files(diverged_sweep, tmp_path, capsys):
    json_out, markdown = tmp_path / "new" / "rank.json", tmp_path / "other" / "deeper" / "rank.md"
    code, _ = cli(capsys, "compare", diverged_sweep, "--json-out", json_out, "--markdown", markdown)
    assert code == 0
    assert {r["name"] for r in json.loads(json_out.read_text())} and "Ranked by best_val_loss" in markdown.read_text()


def test_a_run_stopped_before_its_first_eval_is_partial_at_its_checkpoint(finished_micro_run, tmp_path):
    """A stop saves a checkpoint at its step without logging a line: the run is listed at that step, resumable."""
    run = RunDir(tmp_path / "stopped")
    shutil.copytree(finished_micro_run, run.path)
    run.summary_path.unlink()
    run.truncate_metrics(2)  # the evals at steps 3 and 6 and the log lines after step 2 never made it
    result = load_result(run)
    assert (result.status, result.get("steps")) == ("partial", 6)


# ---------------------------------------------------------------------------------------------------------
# the LR a run's schedule reached


@pytest.fixture(scope="module")
def warmups(tmp_path_factory):
    """Two finished micro runs at train.lr 2e-3, logged every 5 steps: 'short' warms up over 2 of its 8 steps (its
    log lines at steps 1 and 5 both show less than the peak it reached at step 2), 'long' over 7 steps of its 4
    (its LR stops at 2e-3 * 4 / 7)."""
    root = tmp_path_factory.mktemp("warmups")
    settings = {"short": ["train.steps=8", "train.warmup_steps=2"], "long": ["train.steps=4", "train.warmup_steps=7"]}
    for name, extra in settings.items():
        cfg = micro_config(["train.lr=2e-3", "train.log_every=5", "train.eval_every=4", *extra])
        run = RunDir(root / name)
        run.create(cfg)
        try:
            train(cfg, run)
        finally:
            run.release_lock()
    return root


def test_lr_reached_is_the_schedules_peak_not_the_largest_logged_lr(warmups, tmp_path):
    logged = max(r["lr"] for r in RunDir(warmups / "short").read_metrics() if "lr" in r)
    assert logged < 0.95 * 2e-3  # the log lines miss the end of warmup
    records = {r["name"]: r for r in strict_json(run_cli("compare", str(warmups), "--json").stdout)}
    assert records["short"]["peak_lr"] == 2e-3  # exactly train.lr
    assert records["long"]["peak_lr"] == pytest.approx(2e-3 * 4 / 7)

    # a run that reached its LR needs no "lr reached" column
    alone = tmp_path / "alone"
    shutil.copytree(warmups / "short", alone / "short")
    result = run_cli("compare", str(alone), "--no-plots")
    assert result.returncode == 0, result.stderr
    assert "lr reached" not in result.stdout

    # beside one that did not, it shows its LR reached as the lr column shows an LR, to 2 significant digits
    result = run_cli("compare", str(warmups), "--no-plots", env={"COLUMNS": "60"})
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("#"))
    lr, reached = header.index(" lr "), header.index("lr reached")
    rows = table_rows(result.stdout, ["short", "long"])
    assert rows["short"][3:5] == ["2e-3", "2e-3"] and rows["long"][3:5] == ["2e-3", "1.1e-3"], (header, rows)
    assert 0 < lr < reached and "not shown" not in result.stdout

    md = tmp_path / "long.md"
    assert run_cli("report", str(warmups / "long"), "--out", str(md)).returncode == 0
    assert "| lr reached | 1.1e-3 |" in md.read_text()
