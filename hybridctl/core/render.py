"""Terminal rendering: Rich progress and tables. The library reports events; this module draws them."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


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


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m"


class TrainProgress:
    """Callback for core.trainer.train: a live Rich bar on a terminal, plain log lines otherwise."""

    def __init__(self, title: str, console: Console = err_console):
        self.console, self.title = console, title
        self.live = console.is_terminal
        self.progress: Progress | None = None
        self.task = None
        self.last = time.monotonic()

    def __call__(self, kind: str, record: dict[str, Any]) -> None:
        getattr(self, f"on_{kind}", lambda r: None)(record)

    def on_start(self, r):
        self.console.print(
            f"[bold]{self.title}[/]: {fmt_count(r['params'])} params, layers {r['layer_types']}, "
            f"{fmt_count(r['train_tokens'])} train tokens, device {r['device']}"
        )
        if self.live:
            self.progress = Progress(
                TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                TextColumn("{task.fields[tok_s]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=r["steps"], completed=r["step"], loss="-", lr="-", tok_s="-")

    def on_log(self, r):
        if self.progress is not None:
            self.progress.update(self.task, completed=r["step"], loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.2e}",
                                 tok_s=fmt_count(r["tok_s"]))
        else:
            self.console.print(f"step {r['step']:>6}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  {fmt_count(r['tok_s'])} tok/s")

    def on_eval(self, r):
        line = f"step {r['step']:>6}  val_loss {r['val_loss']:.4f}  val_acc {r['val_acc']:.4f}  val_ppl {r['val_ppl']:.2f}"
        if "val_mqar_acc" in r:
            line += f"  mqar_acc {r['val_mqar_acc']:.4f}"
        (self.progress.console if self.progress else self.console).print(line)

    def on_skip(self, r):
        (self.progress.console if self.progress else self.console).print(
            f"[yellow]step {r['step']}: loss not finite, update skipped ({r['in_row']} in a row)[/]"
        )

    def close(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    on_end = lambda self, r: self.close()  # noqa: E731


def summary_table(summary: dict[str, Any], title: str = "Run summary") -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    rows = [
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
        ("throughput", f"{fmt_count(summary.get('tok_s'))} tok/s"),
        ("wall time", fmt_duration(summary.get("wall_time_s"))),
        ("device", summary.get("device")),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    return table


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
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    status = "generated (not cached)" if info.get("generated") else ("cached" if info.get("cached") else "fresh")
    rows = [
        ("dataset", info.get("dataset")),
        ("tokenizer", f"{info.get('tokenizer')} (vocab {info.get('vocab_size')}, eos id {info.get('eos_id')})"),
        ("documents", f"{info.get('train_documents')} train, {info.get('val_documents')} val"),
        ("tokens", f"{fmt_count(info.get('train_tokens'))} train, {fmt_count(info.get('val_tokens'))} val ({info.get('dtype')})"),
        ("cache", info.get("cache", "-")),
        ("size", fmt_bytes(info.get("cache_bytes"))),
        ("time", fmt_duration(info.get("seconds"))),
        ("status", status),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    return table
