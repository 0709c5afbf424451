"""Terminal rendering: Rich progress, tables, charts and reports. The library reports events and data; this
module draws them."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from hybridctl.core import streams
from hybridctl.core.lab.charts import TABLE_ROWS, chart_size
from hybridctl.core.lab.tables import (SETTING_HEADERS, UNBOUNDED, console, err_console, is_essential, key_value_table,
                                      print_table, text_table, varied_settings)


def fmt_num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def fmt_lr(value: float, digits: int | None = None) -> str:
    """1.5e-3 -> '1.5e-3', 0.0003 -> '3e-4': short, exact, and safe in a folder name; rounded to `digits`
    significant digits when given (0.0028454 -> '2.8e-3' with 2)."""
    if digits:
        value = float(f"{value:.{digits}g}")
    mantissa, exponent = f"{value:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def loss_view(metric: str) -> str:
    """'final' when ranking by a final_* metric, else 'best': which loss, acc and ppl a ranking shows."""
    return "final" if metric.startswith("final_") else "best"


def as_sentence(note: str) -> str:
    """A lower-case note (as warnings print it) as a sentence of a document: capitalised, with a full stop."""
    return f"{note[:1].upper()}{note[1:]}." if note else ""


def fmt_n(n: int, noun: str) -> str:
    """A count and its noun: 1 run, 2 runs."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m"


def fmt_clock(seconds: float | None) -> str:
    """12.3 -> '0:12', 3725 -> '1:02:05': elapsed time and ETA as a clock reads them."""
    if seconds is None:
        return "-:--"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class FittingProgress(Progress):
    """A Rich progress line that fits its console at every refresh: the first of `layouts` (lists of columns, the
    fullest first) that fits, with a bar in the room the fullest leaves (up to 40 columns, none under 5). On a
    narrow terminal the bar goes first, then the fields the later layouts leave out; the last should keep what
    matters most (the step count and the ETA)."""

    def __init__(self, *layouts, **kwargs):
        self.layouts, self.bar = layouts, BarColumn()
        super().__init__(*layouts[0], **kwargs)

    def _width(self, table: Table) -> int:
        return Measurement.get(self.console, self.console.options.update_width(UNBOUNDED), table).maximum

    def make_tasks_table(self, tasks) -> Table:
        tasks = list(tasks)
        if not tasks:  # nothing to show (as when Progress.__init__ makes its first frame, before self.console works)
            return super().make_tasks_table(tasks)
        width = self.console.width
        for columns in self.layouts:
            self.columns = tuple(columns)
            table = super().make_tasks_table(tasks)
            used = self._width(table)
            if used <= width:
                if columns is self.layouts[0] and width - used - 1 >= 5:
                    self.bar.bar_width = min(40, width - used - 1)
                    self.columns = (columns[0], self.bar, *columns[1:])
                    table = super().make_tasks_table(tasks)
                return table
        return table


class TrainProgress:
    """Callback for the trainer: on a terminal a live Rich bar that advances every step (loss and LR as of the last
    log line, tok/s, elapsed, ETA); elsewhere (a pipe, nohup, a scheduler's log) plain lines, each carrying the
    elapsed time and the ETA. `clock` is injectable for tests."""

    def __init__(self, title: str, console: Console = err_console, clock=time.monotonic):
        self.console, self.title, self.clock = console, title, clock
        self.live = console.is_terminal
        self.progress: Progress | None = None
        self.task = None
        self.start_step, self.steps, self.started, self.start_tokens = 0, 0, clock(), 0

    def __call__(self, kind: str, record: dict[str, Any]) -> None:
        getattr(self, f"on_{kind}", lambda r: None)(record)

    @property
    def output_closed(self) -> bool:
        """Whether the stream this prints to lost its reader (`... 2>&1 | head`, see core/streams.py): the trainer
        then saves a checkpoint and stops."""
        try:
            return streams.closed(self.console.file.fileno())
        except (AttributeError, OSError, ValueError):
            return False

    def print(self, text: str, style: str | None = None) -> None:
        (self.progress.console if self.progress else self.console).print(text, style=style, markup=False, highlight=False,
                                                                         soft_wrap=not self.live)

    def timing(self, step: int) -> tuple[float, float | None]:
        """Seconds since this process started training, and the estimated seconds to the last step."""
        elapsed = self.clock() - self.started
        done = step - self.start_step
        return elapsed, (elapsed / done * max(self.steps - step, 0) if done > 0 else None)

    def clock_text(self, step: int) -> str:
        elapsed, eta = self.timing(step)
        return f"elapsed {fmt_clock(elapsed)}  ETA {fmt_clock(eta)}"

    def on_start(self, r):
        self.start_step, self.steps, self.started = r["step"], r["steps"], self.clock()
        self.start_tokens = r.get("tokens", 0)  # a resumed run's tokens so far
        self.console.print(
            f"[bold]{self.title}[/]: {fmt_count(r['params'])} params, layers {r['layer_types']}, "
            f"{fmt_count(r['train_tokens'])} train tokens, device {r['device']}", highlight=False, soft_wrap=not self.live
        )
        for note in r.get("warnings") or []:
            self.print(f"warning: {note}", style="yellow")
        if self.live:
            name, steps = TextColumn("[bold blue]{task.description}"), MofNCompleteColumn()
            loss, lr = TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}")
            tok_s, elapsed = TextColumn("{task.fields[tok_s]} tok/s"), TimeElapsedColumn()
            eta = [TextColumn("ETA"), TimeRemainingColumn()]
            self.progress = FittingProgress(  # narrower: no bar, then no lr or elapsed, no name or tok/s, no loss
                [name, steps, loss, lr, tok_s, elapsed, *eta], [name, steps, loss, tok_s, *eta], [steps, loss, *eta],
                [steps, *eta], console=self.console, transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=r["steps"], completed=r["step"], loss="-", lr="-", tok_s="-")

    def on_step(self, r):
        """Every step (no device sync: the loss is the last logged one); tok/s over this process's steps so far."""
        if self.progress is not None:
            elapsed = self.clock() - self.started
            tokens = r.get("tokens", 0) - self.start_tokens
            fields = {"tok_s": fmt_count(tokens / elapsed)} if elapsed > 0 and tokens > 0 else {}
            self.progress.update(self.task, completed=r["step"], **fields)

    def on_log(self, r):
        if self.progress is not None:
            self.progress.update(self.task, completed=r["step"], loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.2e}",
                                 tok_s=fmt_count(r["tok_s"]))
        else:
            self.print(f"step {r['step']:>6}/{self.steps}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  "
                       f"{fmt_count(r['tok_s'])} tok/s  {self.clock_text(r['step'])}")

    def on_eval(self, r):
        line = f"step {r['step']:>6}/{self.steps}  val_loss {r['val_loss']:.4f}  val_acc {r['val_acc']:.4f}  val_ppl {r['val_ppl']:.2f}"
        if "val_mqar_acc" in r:
            line += f"  mqar_acc {r['val_mqar_acc']:.4f}"
        self.print(line if self.live else f"{line}  {self.clock_text(r['step'])}")

    def on_skip(self, r):
        self.print(f"step {r['step']}: loss not finite, update skipped ({r['in_row']} in a row)", style="yellow")

    def close(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    on_end = lambda self, r: self.close()  # noqa: E731


def summary_table(summary: dict[str, Any], title: str = "Run summary") -> Table:
    return key_value_table([
        ("run", summary.get("name")),
        ("layers", summary.get("layer_types")),
        ("attention", f"{100 * summary.get('attention_fraction', 0):.0f}%"),
        ("params", fmt_count(summary.get("params"))),
        ("steps", summary.get("steps")),
        ("tokens", fmt_count(summary.get("tokens"))),
        ("final val loss", fmt_num(summary.get("final_val_loss"))),
        ("best val loss", f"{fmt_num(summary.get('best_val_loss'))} (step {summary.get('best_step')})"),
        ("val acc", fmt_num(summary.get("final_val_acc"))),
        ("val ppl", fmt_num(summary.get("final_val_ppl"), 2)),
        *([("recall acc (MQAR)", fmt_num(summary["final_val_mqar_acc"]))] if summary.get("final_val_mqar_acc") is not None else []),
        ("throughput", f"{fmt_count(summary.get('tok_s'))} tok/s"),
        ("wall time", fmt_duration(summary.get("wall_time_s"))),
        ("device", summary.get("device")),
        *[("warning", text) for text in summary.get("warnings") or []],
    ], title=title)


def print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def data_table(info: dict[str, Any], title: str = "Data") -> Table:
    """What `hybridctl data prepare` made or found: one token set (load_token_data(...).info)."""
    status = "generated (not cached)" if info.get("generated") else ("cached" if info.get("cached") else "fresh")
    return key_value_table([
        ("dataset", info.get("dataset")),
        ("tokenizer", f"{info.get('tokenizer')} (vocab {info.get('vocab_size')}, eos id {info.get('eos_id')})"),
        ("documents", f"{info.get('train_documents')} train, {info.get('val_documents')} val"),
        ("tokens", f"{fmt_count(info.get('train_tokens'))} train, {fmt_count(info.get('val_tokens'))} val ({info.get('dtype')})"),
        ("cache", info.get("cache", "-")),
        ("size", fmt_bytes(info.get("cache_bytes"))),
        ("time", fmt_duration(info.get("seconds"))),
        ("status", status),
    ], title=title)

# ---------------------------------------------------------------------------------------------------------
# Experiment tables, charts and reports (data from lab/results.py and lab/report.py, charts drawn by lab/plots.py)


def fmt_pct(fraction: float | None, digits: int = 1) -> str:
    return "-" if fraction is None else f"{100 * fraction:.{digits}f}%"


def results_rows(rows, metric: str) -> tuple[list[str], list[list[str]]]:
    """Headers and text cells of a ranking (a list of core.experiments.Ranked); columns that would say
    nothing (one LR for all, every run complete) are left out."""
    view = loss_view(metric)
    results = [row.result for row in rows]
    show_layers = len({r.get("layer_types") for r in results}) > 1  # an architecture sweep: its layouts
    show_reached = any(lr_short_of_peak(r.get("lr"), r.get("peak_lr")) for r in results)
    show_lr = len({r.get("lr") for r in results}) > 1 or show_reached
    show_steps = len({r.get("steps") for r in results}) > 1
    show_arc = any(r.get("arc_acc") is not None for r in results)
    show_mqar = any(r.get("final_val_mqar_acc") is not None for r in results)
    show_status = any(r.status != "complete" for r in results)
    text_evals = sorted({name for r in results for name in (r.get("text_evals") or {})})  # `hybridctl eval` results
    shown_loss = f"{view}_val_loss"
    headers = ["#", "run"] + (["layers"] if show_layers else []) + ["attn"] + (["lr"] if show_lr else [])
    headers += (["lr reached"] if show_reached else []) + (["steps"] if show_steps else [])
    headers += ["val loss" if view == "best" else "final loss", "acc", "ppl", "time", "tok/s", "Δ vs best" if metric == shown_loss else f"Δ {metric}"]
    headers += ["ARC acc", "ARC acc_norm", "ARC n"] if show_arc else []  # n: a --limit or a file of one's own
    headers += ["recall acc"] if show_mqar else []
    headers += [f"{name} ppl" for name in text_evals]
    headers += ["status"] if show_status else []
    table = []
    for row in rows:
        r = row.result
        cells = [str(row.rank) if row.rank else "-", r.label] + ([r.get("layer_types") or "-"] if show_layers else [])
        cells.append(fmt_pct(r.get("attention_fraction")))
        if show_lr:
            cells.append(fmt_lr(r.get("lr")) if r.get("lr") else "-")
        if show_reached:
            cells.append(fmt_lr_reached(r.get("peak_lr")))
        if show_steps:
            cells.append(fmt_num(r.get("steps")))
        cells += [
            fmt_num(r.get(shown_loss)), fmt_pct(r.get(f"{view}_val_acc"), 2), fmt_num(r.get(f"{view}_val_ppl"), 2),
            fmt_duration(r.get("train_time_s")), fmt_count(r.get("tok_s")),
            "best" if row.rank == 1 else ("-" if row.delta_pct is None else f"{row.delta_pct:+.2f}%"),
        ]
        if show_arc:
            cells += [fmt_pct(r.get("arc_acc"), 2), fmt_pct(r.get("arc_acc_norm"), 2), fmt_num(r.get("arc_n"))]
        if show_mqar:
            cells.append(fmt_pct(r.get("final_val_mqar_acc"), 2))
        cells += [fmt_num(((r.get("text_evals") or {}).get(name) or {}).get("ppl"), 2) for name in text_evals]
        if show_status:
            cells.append(r.status if r.status == "complete" else f"{r.status} ({r.get('steps')}/{r.get('planned_steps') or '?'})")
        table.append(cells)
    return headers, table


def fmt_lr_reached(peak: float | None) -> str:
    """The highest LR a schedule reached (results.py's peak_lr) as the lr column shows an LR, to 2 digits."""
    return fmt_lr(peak, 2) if peak else "-"


def lr_short_of_peak(lr: float | None, peak: float | None) -> bool:
    """Whether a run's schedule stopped short of its configured LR (the run ended during warmup): the highest LR
    it reached (results.py's peak_lr) shows below train.lr."""
    return bool(lr and peak and peak < lr and fmt_lr_reached(peak) != fmt_lr_reached(lr))


def results_table(rows, metric: str, title: str | None = None) -> Table:
    """The ranking as a table whose essential columns are the rank, the run, the metric, Δ and the settings the
    runs differ in (a setting they share may be left out on a narrow terminal)."""
    headers, cells = results_rows(rows, metric)
    essential = {h for i, h in enumerate(headers) if is_essential(h, i) and h not in SETTING_HEADERS}
    return text_table(headers, cells, title, essential=essential | varied_settings(headers, cells))


def chart_table(chart) -> Table:
    """A chart's points as a table: what a pipe or a log file gets instead of a plot. Long curves keep evenly
    spaced points, the last among them, so that the table stays readable; the caption says so."""
    ticks = dict(chart.xticks)
    multi = len(chart.series) > 1
    headers = (["run"] if multi else []) + [chart.xlabel, chart.ylabel]
    per_series = max(3, TABLE_ROWS // max(len(chart.series), 1))
    rows, left_out = [], 0
    for s, points in zip(chart.series, chart.sampled(per_series)):
        left_out += len(s.xs) - len(points)
        rows += [([s.label] if multi else []) + [ticks.get(x, f"{x:g}"), fmt_num(y)] for x, y in points]
    table = text_table(headers, rows, title=chart.title)
    if left_out:
        table.caption = (f"at most {per_series} evenly spaced {chart.xlabel} values and each {'run' if multi else 'series'}'s "
                         f"last point ({left_out} points left out; a terminal plots them all)")
    return table


def print_chart(chart, out: Console = console) -> None:
    """A plotext plot on a terminal (sized to it); the same data as a table anywhere else."""
    from hybridctl.core.lab.plots import render_chart  # plotext: loaded only to draw

    if chart.is_empty():
        return
    if out.is_terminal:
        width, height = chart_size(out.width, len(chart.series))
        out.print(Text.from_ansi(render_chart(chart, width, height)), soft_wrap=True)
    else:
        print_table(chart_table(chart), out)


def plan_table(plan, actions) -> Table:
    """A sweep plan (lab/sweeps.py's SweepPlan) with what running it now would do to each run."""
    words = {"start": "train", "done": "finished: skip", "diverged": "diverged: skip"}
    rows = []
    for planned, action in zip(plan.runs, actions):
        t = planned.cfg.train
        rows.append([planned.name, "".join(planned.cfg.model.layer_types()), fmt_lr(t.lr), str(t.steps),
                     fmt_count(planned.tokens), words.get(action.kind, f"resume from step {action.step}")])
    title = f"Sweep {plan.name} ({plan.kind}): {fmt_n(len(plan.runs), 'run')}, {fmt_n(plan.steps, 'step')} each"
    table = text_table(["run", "layers", "lr", "steps", "tokens", "action"], rows, title, no_wrap_column=0)
    return table
