"""`hybridctl bench decode`: prefill time, decoding tok/s and cache memory per architecture, context and batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

DEFAULT_PRESETS = ["deltanet", "hybrid_sparse", "transformer"]


def decode(
    presets: list[str] = typer.Option([], "--preset", "-p", metavar="NAMES", help="Architectures: presets, comma-separated or repeated (default: deltanet,hybrid_sparse,transformer)."),
    context: Optional[str] = typer.Option(None, "--context", help="Prompt lengths, e.g. 1024,4096 (default: 1024,4096,16384,32768); may pass train.seq_len."),
    batch: Optional[str] = typer.Option(None, "--batch", help="Batch sizes, e.g. 1,32 (default: 1,32)."),
    steps: int = typer.Option(32, "--steps", help="Timed decoding steps."),
    warmup: int = typer.Option(4, "--warmup", help="Untimed decoding steps first."),
    dtype: str = typer.Option("auto", "--dtype", help="Weights and caches: fp32 or bf16 (auto: bf16 on CUDA, fp32 on CPU)."),
    max_memory: Optional[float] = typer.Option(None, "--max-memory", help="Skip shapes whose caches would take more than this many GiB (marked in the table)."),
    prefill_tokens: Optional[int] = typer.Option(None, "--prefill-tokens", help="Prompt tokens per parallel prefill pass, over the batch (default: 65536)."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a key for every architecture, e.g. --set model.d_model=64."),
    vocab: Optional[int] = typer.Option(None, "--vocab", help="Vocabulary size (default: the preset's when known, else 49152)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (default: the preset's train.device)."),
    out: Path = typer.Option(Path("runs"), "--out", help="Folder that holds run folders; results go to OUT/bench/decode-<time>.json."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results to this file instead."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --json file."),
    eager: bool = typer.Option(False, "--eager", help="Time the step as Python launches it, without replaying a CUDA graph."),
):
    """Decoding speed and the memory caches and states hold, per architecture (untrained weights)."""
    from hybridctl.commands.bench import int_list, keeps_partial_results
    from hybridctl.core.lab.decode_bench import PREFILL_TOKENS, bench_decode, check_decode_counts, default_decode_path
    from hybridctl.core.lab.tables import console, err_console, print_table
    from hybridctl.core.lab.speed import speed_configs
    from hybridctl.core.training.runs import ensure_new_file

    names = [p.strip() for item in presets for p in item.split(",") if p.strip()] or DEFAULT_PRESETS
    contexts, batches = int_list(context, "--context"), int_list(batch, "--batch")
    max_bytes = None if max_memory is None else max_memory * 2**30
    check_decode_counts(contexts, batches, steps, warmup, max_bytes)
    if prefill_tokens is not None and prefill_tokens < 1:
        from hybridctl.core.errors import ConfigError

        raise ConfigError(f"--prefill-tokens must be >= 1, got {prefill_tokens}")
    if json_path is not None:
        ensure_new_file(json_path, force)  # a folder or a kept result: refused before anything is measured
    if device is not None:
        overrides = [*overrides, f'train.device="{device}"']
    configs = speed_configs(names, [], overrides, vocab)
    path = json_path if json_path is not None else default_decode_path(out)

    def on_start(name: str, ctx: int, batch_size: int) -> None:
        err_console.print(f"{name}: context {ctx}, batch {batch_size} ...", highlight=False)

    with keeps_partial_results(path, remove_unwritten=False):
        report = bench_decode(configs, contexts, batches, steps, warmup, dtype, max_bytes, path,
                              force or json_path is None, on_start, prefill_tokens or PREFILL_TOKENS,
                              cuda_graph=not eager)
    print_table(decode_table(report))
    console.print(f"saved {report['path']}", markup=False, highlight=False, soft_wrap=True)


def decode_table(report: dict[str, Any]):
    from hybridctl.commands.bench import fmt_memory
    from hybridctl.core.lab.render import fmt_count
    from hybridctl.core.lab.tables import text_table

    gpu = report["device"] != "cpu"
    headers = ["arch", "context", "batch", "prefill s", "prefill tok/s", "decode tok/s", "ms/step", "cache",
               *(["peak mem"] if gpu else [])]
    cells = []
    for r in report["results"]:
        head = [r["name"], str(r["context"]), str(r["batch_size"])]
        if r.get("error"):
            cells.append([*head, r["error"], "-", "-", "-", fmt_memory(r["cache_bytes_expected"]), *(["-"] if gpu else [])])
            continue
        cells.append([*head, f"{r['prefill_seconds']:.3g}", fmt_count(r["prefill_tok_s"]), fmt_count(r["decode_tok_s"]),
                      f"{r['step_ms']:.3g}", fmt_memory(r["cache_bytes"]),
                      *([fmt_memory(r["peak_memory_bytes"])] if gpu else [])])
    table = text_table(headers, cells, f"Decoding on {report['device']} ({report['dtype']})",
                       essential={"arch", "context", "batch", "decode tok/s", "cache"})
    table.caption = ("decode tok/s: batch x steps / time; cache: every KV cache and recurrent state tensor"
                     + ("; peak mem: torch.cuda.max_memory_allocated" if gpu else "")
                     + ("; steps replayed from a CUDA graph (--eager: launched one by one)"
                        if any(r.get("cuda_graph") for r in report["results"]) else ""))
    return table
