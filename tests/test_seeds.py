"""Sweeps over seeds (`ablate --seeds`) and rankings over them: `compare` groups the seeds of a configuration into
one row with mean, std, 95% CI and Welch's t-test against the best row; `report` says whether a margin exceeds the
seed-to-seed noise."""

import json
import re
import shutil
import statistics

import pytest
from scipy import stats

from conftest import MICRO, cli_args_for_micro, run_cli
from hybridctl.cli import main
from hybridctl.core.errors import ConfigError
from hybridctl.core.lab.groups import group_results, rank_groups
from hybridctl.core.lab.render_findings import VERDICT_LEGEND, VERDICT_WORDS, fit_columns, group_rows
from hybridctl.core.lab.report import build_report
from hybridctl.core.lab.results import collect_results
from hybridctl.core.lab.stats import spread, welch_p
from hybridctl.core.lab.sweeps import parse_seeds, plan_arch_sweep, plan_lr_sweep, read_sweep
from hybridctl.core.presets import parse_layouts

LRS = ["1e-3", "3e-3"]
SEEDS = 3
STEPS = 4
SWEEP_ARGS = ["ablate", "lr", "--preset", "tiny", "--values", ",".join(LRS), "--steps", str(STEPS)]


def snapshot(root):
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """Two micro configurations (two LRs) x 3 seeds, made through the CLI."""
    out = tmp_path_factory.mktemp("seeds") / "runs"
    result = run_cli(*SWEEP_ARGS, "--seeds", str(SEEDS), "--out", str(out), *cli_args_for_micro())
    assert result.returncode == 0, result.stderr
    return out, out / "ablations" / "lr_tiny", result


def summaries_by_config(path):
    """{configuration: [best_val_loss of seed 0, 1, 2]} read straight from the summary.json files."""
    found = {}
    for lr in LRS:
        found[f"tiny_lr{lr}"] = [json.loads((path / f"tiny_lr{lr}_s{s}" / "summary.json").read_text())["best_val_loss"]
                                 for s in range(SEEDS)]
    return found


def test_seeded_sweep_names_runs_by_configuration_and_seed(seeded):
    _, path, result = seeded
    state = read_sweep(path)
    names = [f"tiny_lr{lr}_s{s}" for lr in LRS for s in range(SEEDS)]
    assert state["seeds"] == [0, 1, 2] and [e["name"] for e in state["plan"]] == names
    assert [e["seed"] for e in state["plan"]] == [0, 1, 2] * 2
    assert state["status"] == {n: "complete" for n in names}
    for name in names:
        config = (path / name / "config.toml").read_text()
        assert f"seed = {name[-1]}" in config  # train.seed is the run's seed: it drives init and data order
    # different seeds give different runs; the summary line names the best configuration with its spread
    losses = summaries_by_config(path)
    assert len(set(losses["tiny_lr1e-3"])) == SEEDS
    best = min(losses, key=lambda n: statistics.fmean(losses[n]))
    assert re.search(rf"best lr {best.split('_lr')[1]}: mean best_val_loss \d\.\d{{4}} ± \d\.\d{{4}} \(std over 3 seeds\)",
                     result.stdout)


def test_compare_json_groups_seeds_with_their_statistics(seeded):
    _, path, _ = seeded
    result = run_cli("compare", str(path), "--json")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    losses = summaries_by_config(path)
    assert sorted(r["name"] for r in records) == sorted(losses) and [r["rank"] for r in records] == [1, 2]
    for r in records:
        values = losses[r["name"]]
        assert r["n"] == SEEDS and r["seeds"] == [0, 1, 2] and len(r["runs"]) == SEEDS
        assert r["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
        assert r["std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
        half = stats.t.ppf(0.975, SEEDS - 1) * statistics.stdev(values) / SEEDS ** 0.5
        assert (r["ci95_low"], r["ci95_high"]) == pytest.approx((r["mean"] - half, r["mean"] + half), rel=1e-12)
    best, other = records
    assert best["mean"] < other["mean"] and best["verdict"] == "best" and best["p_value"] is None
    expected = stats.ttest_ind(losses[other["name"]], losses[best["name"]], equal_var=False).pvalue
    assert other["p_value"] == pytest.approx(expected, rel=1e-12)
    assert other["delta"] == pytest.approx(other["mean"] - best["mean"], rel=1e-12)
    assert other["verdict"] == ("worse" if expected < 0.05 else "not distinguishable from best")

    # --per-seed: one record per run, as without seeds
    per_run = json.loads(run_cli("compare", str(path), "--json", "--per-seed").stdout)
    assert len(per_run) == 2 * SEEDS and all("n" not in r for r in per_run)


def test_same_configuration_under_two_names_is_not_distinguishable(seeded, tmp_path):
    _, path, _ = seeded
    for s in range(SEEDS):  # the same three runs again, under another configuration name
        shutil.copytree(path / f"tiny_lr1e-3_s{s}", tmp_path / f"twin_s{s}")
        shutil.copytree(path / f"tiny_lr1e-3_s{s}", tmp_path / f"tiny_lr1e-3_s{s}")
    rows = rank_groups(group_results(collect_results([tmp_path])))
    assert sorted(r.group.label for r in rows) == ["tiny_lr1e-3", "twin"]
    assert rows[0].verdict == "best" and rows[1].verdict == "not distinguishable from best"
    assert rows[1].p_value == pytest.approx(1.0) and rows[1].delta == 0


def test_runs_that_differ_in_more_than_the_seed_stay_apart(seeded, tmp_path):
    _, path, _ = seeded
    copy = tmp_path / "lr_tiny"
    shutil.copytree(path, copy)
    config = copy / "tiny_lr1e-3_s1" / "config.toml"
    config.write_text(config.read_text().replace("max_tokens = 60000", "max_tokens = 50000"))
    rows = rank_groups(group_results(collect_results([copy])))
    sizes = {r.group.label: r.stats.n for r in rows}
    assert sizes == {"tiny_lr3e-3": 3, "tiny_lr1e-3 (seeds 0,2)": 2, "tiny_lr1e-3_s1": 1}
    single = next(r for r in rows if r.stats.n == 1)
    assert single.p_value is None and single.verdict == "single run" and single.stats.std is None


def test_compare_table_prints_whole_in_a_pipe(seeded, tmp_path):
    _, path, _ = seeded
    md = tmp_path / "ranking.md"
    result = run_cli("compare", str(path), "--no-plots", "--markdown", str(md), env={"COLUMNS": "50"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # a pipe gets the table at full width whatever COLUMNS says (only a terminal needs it to fit), and the path
    # whole, however long
    assert "…" not in result.stdout and f"wrote {md}" in lines
    printed = [line.split() for line in lines if re.match(r"^\d\s+tiny_lr", line)]
    headers, cells = group_rows(rank_groups(group_results(collect_results([path]))), "best_val_loss")
    assert printed == cells  # every cell whole, on its row's line: nothing cut, nothing wrapped
    assert all(h in result.stdout for h in headers) and "not shown at this width" not in result.stdout
    assert VERDICT_LEGEND in lines  # the legend is not wrapped either
    table = [line for line in md.read_text().splitlines() if line.startswith("|")]
    assert table[0] == "| " + " | ".join(headers) + " |" and [r.split(" | ")[1] for r in table[2:]] == [c[1] for c in cells]


def test_more_seeds_train_only_the_new_runs(seeded, tmp_path):
    out, _, _ = seeded
    copy = tmp_path / "runs"
    shutil.copytree(out, copy)
    path = copy / "ablations" / "lr_tiny"
    assert run_cli("report", str(path)).returncode == 0  # a report of the first part
    before = snapshot(path)
    args = [*SWEEP_ARGS, "--seeds", "4", "--out", str(copy), *cli_args_for_micro()]
    dry = run_cli(*args, "--dry-run")
    assert dry.returncode == 0 and snapshot(path) == before
    assert len(re.findall(r"finished: skip", dry.stdout)) == 2 * SEEDS and len(re.findall(r" train\s*$", dry.stdout, re.M)) == 2
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    trained = re.findall(r"\] (\S+): training", result.stderr)
    assert trained == ["tiny_lr1e-3_s3", "tiny_lr3e-3_s3"]
    assert f"report with `hybridctl report {path} --force`" in result.stdout  # the report to redo is there
    after = snapshot(path)
    assert {k: v for k, v in after.items() if k in before and "sweep.json" not in k} == \
        {k: v for k, v in before.items() if "sweep.json" not in k}
    assert read_sweep(path)["seeds"] == [0, 1, 2, 3]
    records = json.loads(run_cli("compare", str(path), "--json").stdout)
    assert [r["n"] for r in records] == [4, 4]


def test_fewer_seeds_than_a_grown_sweep_holds_name_its_seeds_and_delete_nothing(seeded, tmp_path):
    """Rerunning the first command of a sweep grown seed by seed (--seeds 1, then --seeds 3) asks for fewer seeds
    than it holds: refused in one line that names the seeds to go on with, and nothing on disk changes."""
    out, path, _ = seeded
    before = snapshot(path)
    result = run_cli(*SWEEP_ARGS, "--seeds", "1", "--out", str(out), *cli_args_for_micro())
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "-tiny_lr1e-3_s1" in result.stderr and "it holds seeds 0,1,2: pass --seeds 0,1,2 to go on" in result.stderr
    assert "--force to delete the runs this command leaves out" in result.stderr
    longer = run_cli(*SWEEP_ARGS[:-1], str(STEPS + 1), "--seeds", "1", "--out", str(out), *cli_args_for_micro())
    assert longer.returncode == 1 and f"steps {STEPS} vs {STEPS + 1}" in longer.stderr
    assert "it holds seeds" not in longer.stderr  # other steps: more seeds would not go on with it
    assert snapshot(path) == before


@pytest.mark.parametrize("seeds, message", [
    ("0", "for seed 0 alone give --seeds 1"), ("-1", "at least one seed"), ("a,b", "'a' is not a seed"),
    ("1,2,1", "seed 1 twice"), ("x", "'x' is not a number"),
])
def test_bad_seeds_are_one_line_and_write_nothing(seeds, message, tmp_path, capsys):
    code = main(["ablate", "lr", "--preset", "tiny", f"--seeds={seeds}", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_seeds_conflict_with_a_set_seed(tmp_path, capsys):
    code = main(["ablate", "arch", "--preset", "tiny", "--seeds", "2", "--set", "train.seed=5", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "--seeds sets train.seed" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_seed_parsing_and_plans():
    assert parse_seeds(None) is None and parse_seeds("3") == [0, 1, 2] and parse_seeds("0,3,7") == [0, 3, 7]
    plan = plan_lr_sweep("tiny", [1e-3], 5, list(MICRO), seeds=[0, 3])
    assert [(r.name, r.cfg.train.seed) for r in plan.runs] == [("tiny_lr1e-3_s0", 0), ("tiny_lr1e-3_s3", 3)]
    unseeded = plan_lr_sweep("tiny", [1e-3], 5, list(MICRO))  # as before seeds: the name and plan entry unchanged
    assert unseeded.runs[0].name == "tiny_lr1e-3" and "seed" not in unseeded.runs[0].to_dict()
    arch = plan_arch_sweep(["tiny"], 5, list(MICRO), seeds=[1])
    assert arch.runs[0].name == "tiny_s1"


def test_statistics_helpers_match_scipy():
    a, b = [5.1, 5.3, 5.2], [5.6, 5.4, 5.9, 5.5]
    s = spread(a)
    low, high = stats.t.interval(0.95, 2, loc=statistics.fmean(a), scale=stats.sem(a))
    assert (s.n, s.min, s.max) == (3, 5.1, 5.3) and (s.ci_low, s.ci_high) == pytest.approx((low, high))
    assert welch_p(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert welch_p(a, [5.0]) is None and spread([5.0]).std is None
    assert welch_p([1.0, 1.0], [1.0, 1.0]) == 1.0 and welch_p([1.0, 1.0], [2.0, 2.0]) == 0.0  # no noise at all


def test_report_states_winner_margin_and_noise(seeded, tmp_path):
    _, path, _ = seeded
    report = build_report(collect_results([path]), sweep=read_sweep(path))
    text = "\n".join(p for s in report.sections for p in s.paragraphs)
    losses = summaries_by_config(path)
    best, other = sorted(losses, key=lambda n: statistics.fmean(losses[n]))
    p = stats.ttest_ind(losses[other], losses[best], equal_var=False).pvalue
    margin = statistics.fmean(losses[other]) - statistics.fmean(losses[best])
    assert f"Winner: {best} " in text and f"Margin over the runner-up {other} " in text and f": {margin:.4f} (" in text
    assert ("exceeds the seed-to-seed noise" if p < 0.05 else "within the seed-to-seed noise") in text
    noise = max(statistics.stdev(v) for v in losses.values())
    assert f"Noise floor: the largest seed-to-seed std is {noise:.4f}" in text
    headings = [s.heading for s in report.sections]
    assert "Throughput vs quality" not in headings and "Learning-rate sensitivity" in headings
    chart = next(c for s in report.sections for c in s.charts if c.name == "loss_vs_lr")
    assert [s.label for s in chart.series] == ["mean", "min", "max"]
    mins = dict(zip(chart.series[1].xs, chart.series[1].ys))
    assert mins[1e-3] == min(losses["tiny_lr1e-3"]) and mins[3e-3] == min(losses["tiny_lr3e-3"])


def test_report_on_a_single_run_names_no_winner(seeded):
    _, path, _ = seeded
    report = build_report(collect_results([path / "tiny_lr1e-3_s0"]))
    text = "\n".join(p for s in report.sections for p in s.paragraphs)
    assert "no winner" in text and "Winner:" not in text and "Noise floor" not in text
    assert [s.heading for s in report.sections] == ["Summary", "Result", "Training curves"]


def test_legend_says_what_every_verdict_means(seeded, tmp_path):
    """A configuration ranked best on a single run leaves the others untested: the table says `untested` and the
    legend under it says what that means, as it does for every verdict a table can show."""
    _, path, _ = seeded
    losses = summaries_by_config(path)
    best, other = sorted(losses, key=lambda n: statistics.fmean(losses[n]))
    seed = min(range(SEEDS), key=lambda s: losses[best][s])  # at most the best mean, below the other's mean
    shutil.copytree(path / f"{best}_s{seed}", tmp_path / f"{best}_s{seed}")
    for s in range(SEEDS):
        shutil.copytree(path / f"{other}_s{s}", tmp_path / f"{other}_s{s}")
    result = run_cli("compare", str(tmp_path), "--no-plots")
    assert result.returncode == 0, result.stderr
    row = next(line.split() for line in result.stdout.splitlines() if re.match(r"2\s+tiny_", line))
    assert row[1] == other and row[-1] == "untested"
    legend = " ".join(VERDICT_LEGEND.split())
    assert legend in " ".join(result.stdout.split())
    for word in set(VERDICT_WORDS.values()) - {"best"}:
        assert f"{word} = " in legend, word
    assert "2 configurations of 4 runs ranked by mean" in result.stdout


def test_counts_of_one_are_singular(seeded, tmp_path):
    _, path, _ = seeded
    shutil.copytree(path / "tiny_lr1e-3_s0", tmp_path / "one" / "tiny_lr1e-3_s0")
    shown = run_cli("compare", str(tmp_path / "one"), "--no-plots")
    assert shown.returncode == 0 and shown.stdout.startswith("1 run ranked by best_val_loss"), shown.stdout
    for s in range(SEEDS):
        shutil.copytree(path / f"tiny_lr1e-3_s{s}", tmp_path / "seeds" / f"tiny_lr1e-3_s{s}")
    grouped = run_cli("compare", str(tmp_path / "seeds"), "--no-plots")
    assert grouped.returncode == 0 and grouped.stdout.startswith("1 configuration of 3 runs ranked by mean"), grouped.stdout
    planned = run_cli("ablate", "arch", "--preset", "tiny", "--patterns", "LL", "--steps", "1", "--dry-run",
                      "--out", str(tmp_path / "runs"))
    assert planned.returncode == 0, planned.stderr
    assert "Sweep arch_tiny_LL (arch): 1 run, 1 step each" in planned.stdout and "in 1 run\n" in planned.stdout
    assert "1 runs" not in planned.stdout + shown.stdout and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------
# option vocabulary: --preset names presets, --patterns layer layouts


def test_layouts_apply_to_one_base_preset():
    assert parse_layouts("LLFL,FFLL") == ["LLFL", "FFLL"] and parse_layouts("[3,6];[2, 5]") == ["[3,6]", "[2,5]"]
    assert parse_layouts("[3,6],[2,5]") == ["[3,6]", "[2,5]"]
    warnings = []
    assert parse_layouts("LF,LF", warnings) == ["LF"] and "LF more than once" in warnings[0]
    plan = plan_arch_sweep(["tiny"], 3, [s for s in MICRO if "pattern" not in s and "n_layers" not in s],
                           layouts=["LLFL", "[0,2]"], seeds=[0])
    assert [r.name for r in plan.runs] == ["tiny_LLFL_s0", "tiny_attn0-2_s0"]
    assert [r.cfg.model.layer_types() for r in plan.runs] == [list("LLFL"), list("FLFL")]
    assert plan.name == "arch_tiny_LLFL-attn0-2"
    with pytest.raises(ConfigError, match="is a preset; name presets with --preset deltanet"):
        parse_layouts("deltanet")
    with pytest.raises(ConfigError, match="one base preset"):
        plan_arch_sweep(["tiny", "deltanet"], 3, layouts=["LF"])


def test_wide_tables_leave_out_columns_in_order_rather_than_wrap():
    headers = ["#", "config", "layers", "attn", "lr", "n", "mean", "std", "95% CI", "Δ best", "p", "verdict"]
    rows = [["1", "hybrid_alternating", "LFLFLFLFLFLF", "50.0%", "1.5e-3", "3", "3.1234", "0.0123", "±0.0306", "-",
             "-", "best"],
            ["10", "hybrid_sparse_top", "LLLLLLLLLLLF", "8.3%", "1.5e-3", "3", "3.2357", "0.0123", "±0.0306",
             "+0.1123", "<0.001", "worse"]]
    kept, cut, dropped = fit_columns(headers, rows, 80)
    assert dropped == ["lr", "95% CI"] and kept == [h for h in headers if h not in dropped]  # the LR they share
    assert all(sum(max(len(h), len(c)) for h, c in zip(kept, row)) + len(kept) - 1 <= 80 for row in cut)
    assert fit_columns(headers, rows, 200)[2] == []


def test_arch_dry_run_with_layouts_and_seeds(tmp_path):
    result = run_cli("ablate", "arch", "--preset", "tiny", "--patterns", "LLFL;[0,3];LLFL", "--seeds", "2", "--dry-run",
                     "--out", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    assert "--patterns lists LLFL more than once" in result.stderr
    for name, layers in (("tiny_LLFL_s0", "LLFL"), ("tiny_LLFL_s1", "LLFL"), ("tiny_attn0-3_s0", "FLLF")):
        assert re.search(rf"^{name}\s+{layers}\s", result.stdout, re.M), name
    assert not (tmp_path / "runs").exists()
    for args, message in ((["--patterns", "LLFL"], "name it with --preset"),
                          (["--preset", "tiny", "--patterns", "hybrid_sparse"], "is a preset"),
                          (["--preset", "tiny,deltanet", "--patterns", "LF"], "one base preset")):
        refused = run_cli("ablate", "arch", *args, "--dry-run")
        assert refused.returncode == 1 and message in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------
# sweep warnings


def test_warnings_are_said_and_kept_and_a_run_that_never_started_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["ablate", "lr", "--preset", "tiny", "--values", "1e-3,2e-3,1e-3", "--seeds", "2", "--steps", "3",
            "--out", str(out), *cli_args_for_micro(), "--set", f'data.dataset="{tmp_path / "missing.txt"}"']
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1 and "warning: --values lists 1e-3 more than once; each runs once" in err
    assert "error: " in err and "missing.txt" in err
    path = out / "ablations" / "lr_tiny"
    state = read_sweep(path)
    assert state["warnings"] == ["--values lists 1e-3 more than once; each runs once"]
    assert sorted(p.name for p in path.iterdir()) == ["sweep.json"]  # no half-made run folder for compare to list
    assert set(state["status"].values()) == {"pending"}


def test_best_lr_at_the_edge_is_warned_and_kept(seeded):
    _, path, result = seeded
    losses = summaries_by_config(path)
    best = min(losses, key=lambda n: statistics.fmean(losses[n])).split("_lr")[1]
    edge = "largest tried; try above" if best == LRS[-1] else "smallest tried; try below"
    line = f"best LR {best} is the {edge} {best}"
    assert f"warning: {line}" in result.stderr and line in read_sweep(path)["warnings"]


def test_compare_shows_the_lr_a_short_warmup_never_reached(seeded, tmp_path):
    from conftest import micro_config
    from hybridctl.core.lab.results import rank_results
    from hybridctl.core.lab.render import results_rows
    from hybridctl.core.training.runs import RunDir
    from hybridctl.core.training.trainer import train

    _, path, _ = seeded
    cfg = micro_config(["train.warmup_steps=8", "train.steps=4", "train.lr=2e-3"])  # warmup outlasts the run
    run = RunDir(tmp_path / "long_warmup")
    run.create(cfg)
    try:
        train(cfg, run)
    finally:
        run.release_lock()
    shutil.copytree(path / "tiny_lr1e-3_s0", tmp_path / "normal")
    peak = max(r["lr"] for r in run.read_metrics() if "lr" in r)
    assert peak == pytest.approx(2e-3 * 4 / 8)
    headers, cells = results_rows(rank_results(collect_results([tmp_path])), "best_val_loss")
    lr_col, reached_col = headers.index("lr"), headers.index("lr reached")
    assert reached_col == lr_col + 1
    rows = {row[1]: row for row in cells}
    assert rows["long_warmup"][lr_col] == "2e-3" and float(rows["long_warmup"][reached_col]) == pytest.approx(peak)
    assert rows["normal"][reached_col] == "1e-3"  # reached its configured LR


def test_grouped_compare_and_report_load_no_torch(seeded, tmp_path):
    from test_layout import torch_modules_loaded

    _, path, _ = seeded
    for args in (["compare", str(path), "--no-plots"], ["report", str(path), "--out", str(tmp_path / "r.md")]):
        probe = torch_modules_loaded(*args, cwd=tmp_path)
        assert probe["code"] in (0, None) and probe["torch"] == [], probe
