"""`hybridctl bench`: benchmarks as subcommands. Built in: `arc` (ARC-Challenge accuracy of a trained run) and
`speed` (training-step throughput and MFU per architecture). Other packages add benchmarks through the
entry-point group `hybridctl.benchmarks` (value: a Typer app or a function), the same way commands are added."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from hybridctl.cli import commands_in_order, register_entry_points
from hybridctl.commands.train import check_device_for_gpus, check_gpus, launch_on_gpus
from hybridctl.core.config import DEFAULT_VOCAB
from hybridctl.core.errors import ConfigError, RunError
from hybridctl.core.lab.render import fmt_count, fmt_num
from hybridctl.core.lab.tables import console, err_console, new_table, print_table, text_table
from hybridctl.core.presets import LAYOUT_HELP, check_not_a_layout, parse_layouts
from hybridctl.core.training.runs import ensure_new_file

# The benchmarks (torch) are imported inside the commands that run them: `bench --help` loads no torch.

ENTRY_POINT_GROUP = "hybridctl.benchmarks"

# Used when the package runs from a source tree that was never installed (no entry-point metadata).
BUILTIN_BENCHMARKS = {
    "arc": "hybridctl.commands.bench:arc",
    "speed": "hybridctl.commands.bench:speed",
    "decode": "hybridctl.commands.bench_decode:decode",
}


# ---------------------------------------------------------------------------------------------------------
# arc


def arc(
    target: Path = typer.Argument(..., metavar="RUN_OR_CHECKPOINT", help="A run folder, or a checkpoint folder inside one (best/, checkpoints/step_NNNNNN)."),
    split: str = typer.Option("test", "--split", metavar="SPLIT", help="test or validation (with --data: the split the file holds)."),
    limit: Optional[int] = typer.Option(None, "--limit", metavar="N", help="Score only the first N questions."),
    data: Optional[Path] = typer.Option(None, "--data", metavar="FILE", help="Local JSONL or parquet in the ai2_arc schema instead of the hub; results are labelled with its name."),
    batch_size: int = typer.Option(32, "--batch-size", metavar="N", help="Continuations scored per forward pass."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", metavar="CHECKPOINT", help="best, latest or step_NNNNNN (default: best if saved, else latest)."),
    max_len: Optional[int] = typer.Option(None, "--max-len", metavar="N", help="Longest context in tokens (default: the run's train.seq_len)."),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help="auto, cpu, cuda or cuda:N."),
    out: Optional[Path] = typer.Option(None, "--out", metavar="FILE", help="Write the JSON result here (default: RUN/bench/arc.json, which compare shows)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing result file."),
):
    """ARC-Challenge (zero-shot, scored like lm-evaluation-harness) on a trained run; writes RUN/bench/arc.json."""
    from hybridctl.core.lab.arc import bench_arc

    with progress_bar("arc") as update:
        result = bench_arc(target, checkpoint, split, data, limit, batch_size, max_len, device, force, progress=update,
                           out=out)
    console.print(f"[bold]{result['run']}[/] @ {result['checkpoint']} (step {result['checkpoint_step']})", highlight=False)
    print_table(arc_table(result))
    console.print(f"saved {result['path']}", markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def progress_bar(description: str):
    """A Rich bar on stderr (none when stderr is not a terminal); yields the library's progress callback."""
    progress = Progress(TextColumn(f"[bold blue]{description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), console=err_console, transient=True,
                        disable=not err_console.is_terminal)
    task = progress.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    with progress:
        yield update


def arc_table(result: dict[str, Any]) -> Table:
    table = new_table(title=str(result["task"]), caption=f"{result['n']} questions, zero-shot")
    for column in ("metric", "value", "± stderr", "chance"):
        table.add_column(column, justify="left" if column == "metric" else "right", no_wrap=True)
    for metric in ("acc", "acc_norm"):
        table.add_row(metric, fmt_num(result[metric]), fmt_num(result[f"{metric}_stderr"]), fmt_num(result["chance"]))
    return table


# ---------------------------------------------------------------------------------------------------------
# speed


def int_list(text: Optional[str], option: str) -> list[int]:
    if not text:
        return []
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers like 1024,4096, got '{text}'") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{option} values must be positive integers, got '{text}'")
    return values


def speed(
    presets: list[str] = typer.Option([], "--preset", "-p", metavar="NAMES", help="Architectures: presets, comma-separated or repeated (default: deltanet,hybrid_sparse,transformer; with --patterns: base_study_a)."),
    patterns: Optional[str] = typer.Option(None, "--patterns", metavar="LAYOUTS", help=f"Architectures as layer layouts on one preset: {LAYOUT_HELP}; e.g. LLLL,LLFL,FFFF or '[3,6];[5]'."),
    seq: Optional[str] = typer.Option(None, "--seq", metavar="LENGTHS", help="Sequence lengths, e.g. 1024,4096,16384 (default: the preset's)."),
    batch: Optional[str] = typer.Option(None, "--batch", metavar="SIZES", help="Batch sizes, e.g. 8,48 (default: the preset's)."),
    tokens_per_step: Optional[int] = typer.Option(None, "--tokens-per-step", metavar="N", help="Batch = N // seq for each seq length (constant work per step)."),
    steps: int = typer.Option(10, "--steps", metavar="N", help="Timed steps."),
    warmup: int = typer.Option(3, "--warmup", metavar="N", help="Untimed steps first (compilation, autotuning, allocator)."),
    forward_only: bool = typer.Option(False, "--forward-only", help="Time inference forward passes instead of training steps."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a config key for every architecture, e.g. --set model.d_model=64."),
    vocab: Optional[int] = typer.Option(None, "--vocab", metavar="N", help=f"Vocabulary size (default: the preset's when known, else {DEFAULT_VOCAB})."),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE", help="auto, cpu, cuda or cuda:N (default: the preset's train.device)."),
    out: Path = typer.Option(Path("runs"), "--out", metavar="DIR", help="Folder that holds run folders; results go to OUT/bench/speed-<time>.json."),
    json_path: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="Write the results to this file instead."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --json file."),
    gpus: Optional[int] = typer.Option(None, "--gpus", metavar="N", help="Measure on N GPUs of this machine: N processes under torchrun, each with its share of every batch, under DDP."),
):
    """Training-step throughput (tok/s), model FLOPs utilisation and peak memory per architecture."""
    from hybridctl.core.lab.speed import bench_speed, check_speed_counts, speed_configs, speed_plan
    from hybridctl.core.training import distributed as dist
    from hybridctl.core.training.steps import resolve_device

    if gpus is not None:
        check_gpus(gpus, "bench speed")
    if json_path is not None:
        ensure_new_file(json_path, force)  # a folder or a kept result: refused before anything is measured
    names = preset_names(presets)
    layouts = parse_layouts(patterns) if patterns is not None else []
    if not names:
        names = ["base_study_a"] if layouts else ["deltanet", "hybrid_sparse", "transformer"]
    if device is not None:
        overrides = [*overrides, f'train.device="{device}"']
    configs = speed_configs(names, layouts, overrides, vocab)
    seqs, batches = int_list(seq, "--seq"), int_list(batch, "--batch")
    if gpus is not None:
        for cfg in configs:
            check_device_for_gpus(cfg, gpus)
    if gpus is not None and gpus > 1:  # what would stop every process, checked here once
        check_speed_counts(steps, warmup, seqs, batches, tokens_per_step)
        speed_plan(configs, seqs, batches, tokens_per_step, gpus)
        return launch_on_gpus(gpus)

    def on_start(name: str, seq_len: int, batch_size: int) -> None:
        if dist.is_main():  # under torchrun, process 0 alone prints
            err_console.print(f"{name}: seq {seq_len}, batch {batch_size} ...", highlight=False)

    with dist.session(resolve_device(configs[0].train.device)):
        main = dist.is_main()
        path, replace = json_path, force
        if json_path is None and main:  # process 0 alone writes the results
            path, replace = reserve_speed_path(out), True  # the empty file it made is this run's to replace
        with keeps_partial_results(path if main else None, remove_unwritten=json_path is None):
            report = bench_speed(configs, seqs, batches, tokens_per_step, steps, warmup, forward_only,
                                 path, replace, on_start=on_start)
    if main:
        print_table(speed_table(report))
        console.print(f"saved {report['path']}", markup=False, highlight=False, soft_wrap=True)


def preset_names(values: list[str]) -> list[str]:
    """--preset a,b --preset c -> [a, b, c]; a layer layout given there is pointed to --patterns."""
    names = [p.strip() for item in values for p in item.split(",") if p.strip()]
    for name in names:
        check_not_a_layout(name)
    return names


@contextlib.contextmanager
def keeps_partial_results(path: Optional[Path], remove_unwritten: bool):
    """Around a benchmark that rewrites `path` after each shape: stopped part-way (Ctrl-C, an error), say in one
    line where the shapes measured so far are; if it wrote nothing there, remove the file when `remove_unwritten`
    (an empty one reserved for it), else leave the file as it was."""
    before = file_state(path)
    try:
        yield
    except BaseException:
        if path is not None and file_state(path) != before:
            err_console.print(f'kept the shapes measured so far in {path} ("complete": false)', markup=False,
                              highlight=False, soft_wrap=True)
        elif remove_unwritten and path is not None:
            path.unlink(missing_ok=True)  # no results: no empty file left behind
        raise


def file_state(path: Optional[Path]) -> Optional[tuple[int, int]]:
    """(modification time, size) of a file, None if there is none: tells whether a run wrote it."""
    try:
        stat = path.stat() if path is not None else None
    except OSError:
        return None
    return None if stat is None else (stat.st_mtime_ns, stat.st_size)


def reserve_speed_path(out: Path) -> Path:
    """A new OUT/bench/speed-<time>[-N].json, created empty at once (O_EXCL): two runs started in the same second
    would otherwise pick the same free name and the later one would write over the earlier one's results."""
    from hybridctl.core.lab.speed import default_speed_path

    while True:
        path = default_speed_path(out)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return path
        except FileExistsError:
            if not path.parent.is_dir():
                raise RunError(f"cannot create {path.parent}: a file of that name is in the way; choose another --out") from None
            continue  # another run took this name since it was found free: find the next
        except OSError as e:
            raise RunError(f"cannot write {path}: {e.strerror}; choose another --out folder") from None


def fmt_memory(n: Optional[float]) -> str:
    """Bytes in GiB, or MiB (KiB) below a tenth of one: the memory columns of every benchmark."""
    if n is None:
        return "-"
    if n >= 2**30 / 10:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.3g} MiB" if n >= 2**20 / 10 else f"{n / 2**10:.3g} KiB"


def memory_caption(report: dict[str, Any]) -> str:
    """What the speed table's memory column measured."""
    if report["device"] != "cpu":
        return "peak mem: torch.cuda.max_memory_allocated while the shape ran"
    if all(r.get("rss_scope") != "process" for r in report["results"]):
        return "peak mem: the process's peak RSS while the shape ran"
    return "peak mem: the process's peak RSS since it started (cannot be reset here; it only grows down the table)"


def speed_table(report: dict[str, Any]) -> Table:
    mode = "inference forward" if report["mode"] == "forward" else "training step"
    peak = report["peak_bf16_tflops"]
    processes = report.get("processes", 1)
    where = report["device"] if processes == 1 else f"{processes} x {report['device']}"
    rows = report["results"]
    show_layers = any(r["name"] != r["layer_types"] for r in rows)  # a --patterns arch is named by its layers
    headers = ["arch", *(["layers"] if show_layers else []), "params", "seq", "batch", "tok/s", "ms/step", "TFLOP/s",
               "MFU", "peak mem"]
    cells = []
    for r in rows:
        head = [r["name"], *([r["layer_types"]] if show_layers else []), fmt_count(r.get("params")), str(r["seq_len"]),
                str(r["batch_size"])]
        if r.get("error"):
            cells.append([*head, r["error"], "-", "-", "-", "-"])
            continue
        memory = r["peak_memory_bytes"] if r["peak_memory_bytes"] is not None else r["rss_bytes"]
        step_ms = r["step_ms"]
        cells.append([*head, fmt_count(r["tok_s"]), f"{step_ms:.0f}" if step_ms >= 100 else f"{step_ms:.1f}",
                      f"{r['tflops']:.3g}", f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-", fmt_memory(memory)])
    title = f"Speed ({mode}) on {where}" + (f", bf16 peak {peak:g} TFLOP/s" if peak else "")
    table = text_table(headers, cells, title, essential={"arch", "layers", "seq", "batch", "tok/s", "MFU"})
    table.caption = (f"tok/s and TFLOP/s: the {processes} processes together; MFU and memory: per process. "
                     if processes > 1 else "") + (
        "model FLOPs: train = 3 x forward, causal attention counts (T+1)/2 keys (see docs/benchmarks.md); ") + (
        memory_caption(report))
    return table


# ---------------------------------------------------------------------------------------------------------
# The bench app: built-in and plugin benchmarks alike come from the entry-point group.


def build_bench_app() -> typer.Typer:
    app = typer.Typer(help="Benchmarks: arc (ARC-Challenge accuracy), speed (throughput and MFU), decode (generation speed and cache memory), and plugins.",
                      cls=commands_in_order(BUILTIN_BENCHMARKS), no_args_is_help=True)
    return register_entry_points(app, ENTRY_POINT_GROUP, BUILTIN_BENCHMARKS, kind="benchmark")


app = build_bench_app()
