"""Output that fits where it goes: tables whole in pipes and files, fitted to a terminal; the training progress
advancing every step on a terminal, and plain lines with elapsed time and ETA anywhere else."""

import io
import json
import re

from rich.console import Console

from conftest import MICRO_SPEED, cli_args_for_micro, run_cli
from hybridctl.core.lab import render as render_module, render_findings
from hybridctl.core.lab.charts import Chart, Series
from hybridctl.core.lab.render import TrainProgress, fmt_clock, print_chart
from hybridctl.core.lab.render_findings import VERDICT_LEGEND, fit_columns, print_group_table
from hybridctl.core.lab.tables import print_table, text_table

HEADERS = ["#", "run", "attn", "val loss", "acc", "ppl", "time", "tok/s", "Δ vs best", "ARC acc", "status"]
ROWS = [
    ["1", "hybrid_sparse_with_a_long_name", "16.7%", "4.0551", "31.20%", "57.71", "12.5m", "48.1K", "best", "25.10%", "complete"],
    ["2", "transformer", "100.0%", "4.1023", "30.80%", "60.44", "14.2m", "41.0K", "+1.16%", "24.80%", "diverged (120/300)"],
]


def render(table, terminal: bool, width: int = 80) -> str:
    buffer = io.StringIO()
    out = Console(file=buffer, force_terminal=terminal, width=width, color_system=None)
    print_table(table, out)
    return buffer.getvalue()


def table_lines(text: str, first_header: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(first_header))
    return lines[start:]


def assert_rows_whole(text: str, headers: list[str], rows: list[list[str]]) -> None:
    """Header on one line, a rule, then one line per row holding every cell in order: nothing cut, nothing wrapped."""
    assert "…" not in text
    lines = table_lines(text, headers[0])
    assert re.fullmatch(r"\s*" + r"\s+".join(map(re.escape, headers)) + r"\s*", lines[0]), lines[0]
    assert set(lines[1].strip()) == {"─"}
    for row, line in zip(rows, lines[2:]):
        assert re.fullmatch(r"\s*" + r"\s+".join(map(re.escape, row)) + r"\s*", line), (row, line)


def test_piped_table_is_whole_at_any_width():
    text = render(text_table(HEADERS, ROWS, title="2 runs ranked by best_val_loss, " + "a long title " * 8), terminal=False, width=40)
    assert_rows_whole(text, HEADERS, ROWS)
    assert max(len(line) for line in text.splitlines()) > 80  # laid out wider than the console: no wrapping
    assert text.splitlines()[0].startswith("2 runs ranked") and "a long title " * 8 in text.splitlines()[0]


def test_terminal_table_keeps_essential_columns_whole_and_leaves_out_the_rest():
    text = render(text_table(HEADERS, ROWS), terminal=True, width=80)
    assert "…" not in text
    assert all(len(line) <= 80 for line in text.splitlines())
    body = table_lines(text, "#")
    for row in ROWS:  # rank, run, attention share, metric and Δ: whole, on the row's own line
        line = next(line for line in body if line.lstrip().startswith(row[0] + " "))
        for cell in (row[0], row[1], row[2], row[3], row[8]):
            assert cell in line
    note = text.strip().splitlines()[-1]
    assert note.startswith("not shown at 80 columns:") and note.endswith("ARC acc, status")
    assert "status" not in body[0]  # left out, last column first


def test_terminal_table_that_fits_is_printed_whole():
    text = render(text_table(HEADERS, ROWS), terminal=True, width=200)
    assert_rows_whole(text, HEADERS, ROWS)
    assert "left out" not in text


# Configurations ranked over seeds: an architecture sweep (layers and attention share vary, the LR does not) and an
# LR sweep (the LR varies; attention share, and the LR reached, do not).
GROUP_HEADERS = ["#", "config", "layers", "attn", "lr", "lr reached", "n", "mean", "std", "95% CI", "Δ best", "p", "verdict"]
ARCH_ROWS = [
    ["1", "tiny_LLLL", "LLLL", "0.0%", "3e-3", "2.7e-3", "2", "2.6150", "0.0745", "±0.6693", "-", "-", "best"],
    ["2", "tiny_FFFF", "FFFF", "100.0%", "3e-3", "2.7e-3", "2", "2.9277", "0.0237", "±0.2125", "+0.3127", "0.083", "tied"],
]
LR_HEADERS = ["#", "config", "attn", "lr", "n", "mean", "std", "95% CI", "Δ best", "p", "verdict"]
LR_ROWS = [
    ["1", "tiny_lr3e-3", "25.0%", "3e-3", "2", "2.5094", "0.0217", "±0.1947", "-", "-", "best"],
    ["2", "tiny_lr1e-3", "25.0%", "1e-3", "2", "3.0662", "0.0064", "±0.0575", "+0.5567", "0.010", "worse"],
]


def test_narrow_group_tables_keep_the_name_what_the_sweep_varied_the_mean_std_and_verdict():
    kept, rows, dropped = fit_columns(GROUP_HEADERS, ARCH_ROWS, 60)
    assert dropped[:2] == ["lr reached", "lr"]  # settings the rows share go first
    assert {"#", "config", "layers", "attn", "mean", "std", "verdict"} <= set(kept)
    assert sum(max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(kept)) + len(kept) - 1 <= 60
    kept, _, dropped = fit_columns(LR_HEADERS, LR_ROWS, 45)
    assert dropped[0] == "attn" and {"#", "config", "lr", "mean", "std", "verdict"} <= set(kept)
    kept, _, _ = fit_columns(GROUP_HEADERS, ARCH_ROWS, 10)  # too narrow for anything: the essentials stay
    assert kept == ["#", "config", "layers", "attn", "mean", "std", "verdict"]
    assert fit_columns(GROUP_HEADERS, ARCH_ROWS, 200)[2] == []


def render_group_table(monkeypatch, terminal: bool, width: int, headers=GROUP_HEADERS, rows=ARCH_ROWS) -> str:
    monkeypatch.setattr(render_findings, "group_rows", lambda ranked, metric: (list(headers), [list(r) for r in rows]))
    buffer = io.StringIO()
    print_group_table([], "best_val_loss", "ranked by mean best_val_loss over seeds",
                      Console(file=buffer, force_terminal=terminal, width=width, color_system=None))
    return buffer.getvalue()


def test_piped_group_table_is_whole_whatever_the_width(monkeypatch):
    text = render_group_table(monkeypatch, terminal=False, width=60)
    assert_rows_whole(text, GROUP_HEADERS, ARCH_ROWS)  # "lr reached" and all: COLUMNS does not matter in a pipe
    assert VERDICT_LEGEND in text.splitlines()  # the legend on one line of its own
    assert "not shown" not in text


def test_terminal_group_table_fits_and_wraps_its_legend_once(monkeypatch):
    text = render_group_table(monkeypatch, terminal=True, width=60)
    lines = text.splitlines()
    assert all(len(line) <= 60 for line in lines) and "…" not in text
    header = table_lines(text, "#")[0].split()
    assert header[:4] == ["#", "config", "layers", "attn"] and {"mean", "std", "verdict"} <= set(header)
    start = next(i for i, line in enumerate(lines) if line.startswith("verdict ("))
    end = next(i for i, line in enumerate(lines) if line.startswith("not shown"))
    legend = [line.rstrip() for line in lines[start:end]]
    assert " ".join(legend) == VERDICT_LEGEND
    for line, after in zip(legend, legend[1:]):  # wrapped where the width ends, not earlier as well
        assert len(line) + 1 + len(after.split()[0]) > 60, (line, after)
    assert " ".join(lines[end:]).startswith("not shown at 60 columns: lr reached, lr,")
    text = render_group_table(monkeypatch, terminal=True, width=45, headers=LR_HEADERS, rows=LR_ROWS)
    assert {"config", "lr", "mean", "std", "verdict"} <= set(table_lines(text, "#")[0].split())


def test_terminal_ranking_leaves_out_a_setting_the_runs_share_before_one_they_differ_in(monkeypatch):
    headers = ["#", "run", "attn", "lr", "val loss", "acc", "ppl", "time", "tok/s", "Δ vs best"]
    rows = [["1", "tiny_lr3e-3", "25.0%", "3e-3", "2.6330", "36.17%", "13.91", "5.7s", "7.9K", "best"],
            ["2", "tiny_lr1e-3", "25.0%", "1e-3", "3.0264", "36.13%", "20.62", "7.3s", "8.1K", "+14.94%"]]
    monkeypatch.setattr(render_module, "results_rows", lambda ranked, metric: (headers, rows))
    text = render(render_module.results_table([], "best_val_loss"), terminal=True, width=40)
    assert table_lines(text, "#")[0].split() == ["#", "run", "lr", "val", "loss", "Δ", "vs", "best"]
    note = text[text.index("not shown"):].split()
    assert " ".join(note) == "not shown at 40 columns: attn, acc, ppl, time, tok/s"


def test_chart_legend_shows_at_60_columns():
    labels = [f"tiny_{layers}_s{seed}" for layers in ("LLLL", "LLFL", "FFFF") for seed in (0, 1)]
    chart = Chart("train_loss", "training loss vs steps", "step", "training loss",
                  [Series(label, [1, 10, 20, 30], [5.4 - i / 10, 3.8, 2.8, 2.6]) for i, label in enumerate(labels)])
    buffer = io.StringIO()
    print_chart(chart, Console(file=buffer, force_terminal=True, width=60, color_system=None))
    text = buffer.getvalue()
    assert all(label in text for label in labels) and max(len(line) for line in text.splitlines()) <= 60


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


START = {"step": 0, "steps": 10, "params": 1000, "device": "cpu", "train_tokens": 5000, "val_tokens": 100,
         "layer_types": "LLFL", "tokens": 0}


def test_progress_lines_off_a_terminal_carry_elapsed_and_eta():
    buffer, clock = io.StringIO(), FakeClock()
    progress = TrainProgress("run", Console(file=buffer, force_terminal=False, width=40), clock=clock)
    progress("start", {**START, "warnings": ["training repeats its data"]})
    for step in range(1, 5):
        clock.now += 2.0
        progress("step", {"step": step, "tokens": 64 * step})
    progress("log", {"step": 4, "loss": 2.5, "lr": 1e-3, "tok_s": 32.0, "tokens": 256})
    clock.now += 2.0
    progress("eval", {"step": 5, "val_loss": 2.4, "val_acc": 0.3, "val_ppl": 11.0})
    lines = buffer.getvalue().splitlines()
    assert lines[0].startswith("run: 1.0K params, layers LLFL")
    assert lines[1] == "warning: training repeats its data"
    # 4 of 10 steps in 8 s: 12 s to go; then 5 steps in 10 s: 10 s to go (one line each, however narrow the console)
    assert lines[2] == "step      4/10  loss 2.5000  lr 1.00e-03  32 tok/s  elapsed 0:08  ETA 0:12"
    assert lines[3] == "step      5/10  val_loss 2.4000  val_acc 0.3000  val_ppl 11.00  elapsed 0:10  ETA 0:10"
    assert len(lines) == 4  # step events print nothing off a terminal


def test_progress_bar_advances_every_step_on_a_terminal():
    buffer, clock = io.StringIO(), FakeClock()
    progress = TrainProgress("run", Console(file=buffer, force_terminal=True, width=120), clock=clock)
    progress("start", {**START, "step": 2, "tokens": 128})  # resumed at step 2
    task = progress.progress.tasks[0]
    assert (task.completed, task.total) == (2, 10)
    for step in (3, 4, 5):
        clock.now += 1.0
        progress("step", {"step": step, "tokens": 64 * step})
        assert task.completed == step
    assert task.fields["tok_s"] == "64" and task.fields["loss"] == "-"  # 192 tokens of this process in 3 s
    progress("log", {"step": 5, "loss": 2.5, "lr": 1e-3, "tok_s": 70.0})
    assert task.fields["loss"] == "2.5000" and task.completed == 5
    progress.close()


def progress_line(width: int) -> str:
    progress = TrainProgress("run", Console(file=io.StringIO(), force_terminal=True, width=width), clock=FakeClock())
    progress("start", {**START, "steps": 10000})
    progress("step", {"step": 1234, "tokens": 64 * 1234})
    progress("log", {"step": 1234, "loss": 2.5, "lr": 1e-3, "tok_s": 8100.0})
    out = Console(file=io.StringIO(), force_terminal=True, width=width, color_system=None)
    with out.capture() as captured:
        out.print(progress.progress.make_tasks_table(progress.progress.tasks))
    progress.close()
    return captured.get().rstrip("\n")


def test_progress_bar_keeps_the_step_count_and_eta_on_a_narrow_terminal():
    wide = progress_line(120)
    assert "━" in wide and all(word in wide for word in ("1234/10000", "loss 2.5000", "lr 1.00e-03", "8.1K tok/s", "ETA"))
    for width in (80, 60, 40, 30):
        line = progress_line(width)
        assert len(line) <= width and "…" not in line, (width, line)
        assert "1234/10000" in line and re.search(r"ETA (-:--:--|\d+:\d\d:\d\d)$", line), (width, line)
    assert "━" not in progress_line(60) and "loss 2.5000" in progress_line(60)  # the bar goes first


def test_fmt_clock():
    assert [fmt_clock(s) for s in (None, 0, 59.6, 61, 3725)] == ["-:--", "0:00", "1:00", "1:01", "1:02:05"]


def test_commands_piped_at_80_columns_print_whole_rows(tmp_path):
    env = {"COLUMNS": "80"}
    presets = run_cli("train", "--list-presets", env=env)
    assert presets.returncode == 0, presets.stderr
    tiny = next(line for line in presets.stdout.splitlines() if line.startswith("tiny "))
    from hybridctl.core.presets import available_presets, find_preset, read_toml

    assert len(tiny) > 80 and read_toml(find_preset("tiny"))["description"] in tiny
    assert len([line for line in presets.stdout.splitlines() if line.split(" ")[0] in available_presets()]) == len(available_presets())
    assert "…" not in presets.stdout

    out = tmp_path / "runs"
    trained = run_cli("train", "--preset", "tiny", "--out", str(out), "--name", "a_run_with_a_rather_long_name",
                      *cli_args_for_micro(["train.steps=2", "train.eval_every=2"]), env=env)
    assert trained.returncode == 0, trained.stderr
    compared = run_cli("compare", str(out), "--no-plots", env=env)
    assert compared.returncode == 0, compared.stderr
    assert "…" not in compared.stdout
    header, body = table_block(compared.stdout)
    assert header.split()[:2] == ["#", "run"] and "Δ vs best" in header
    assert len(body) == 1 and body[0].split()[:2] == ["1", "a_run_with_a_rather_long_name"]  # one run, one line

    speed = run_cli("bench", "speed", "--preset", "tiny", "--steps", "2", "--warmup", "0", "--seq", "32", "--batch", "2",
                    "--device", "cpu", "--json", str(tmp_path / "speed.json"), *MICRO_SPEED, env={**env, "OMP_NUM_THREADS": "1"})
    assert speed.returncode == 0, speed.stderr
    assert "…" not in speed.stdout
    header, body = table_block(speed.stdout)
    assert header.split() == ["arch", "layers", "params", "seq", "batch", "tok/s", "ms/step", "TFLOP/s", "MFU", "peak", "mem"]
    assert len(body) == 1  # one shape, one line
    result = json.loads((tmp_path / "speed.json").read_text())["results"][0]
    cells = body[0].split()
    assert cells[:5] == ["tiny", "LLFL", cells[2], "32", "2"] and f"{result['tflops']:.3g}" in cells
    assert " ".join(cells[-2:]) == f"{result['rss_bytes'] / 2**30:.2f} GiB"


def table_block(text: str) -> tuple[str, list[str]]:
    """The header line of the first table in `text` and its row lines (up to the first line that is not a row)."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.strip() and set(line.strip()) == {"─"})
    body = []
    for line in lines[rule + 1:]:
        if not line.strip() or line.startswith(("model FLOPs", "saved ", "validation", "training")):
            break
        body.append(line)
    return lines[rule - 1], body
