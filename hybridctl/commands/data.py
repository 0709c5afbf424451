"""`hybridctl data`: tokenise and cache a preset's data ahead of time (`prepare`); show corpora and caches (`list`)."""

from __future__ import annotations

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from hybridctl.core.config import load_config
from hybridctl.core.data.corpora import BUILTIN_CORPORA
from hybridctl.core.data.tokens import cache_root
from hybridctl.core.data.token_cache import cached_token_sets, load_token_data
from hybridctl.core.lab.render import console, data_table, err_console, fmt_bytes, fmt_count
from hybridctl.core.data.synthetic import TASKS, check_seq_len

app = typer.Typer(help="Prepare (tokenise and cache) and list training data.", no_args_is_help=True)


@app.command()
def prepare(
    preset: str = typer.Option(..., "--preset", "-p", help="Preset name from presets/ or a path to a .toml file."),
    overrides: list[str] = typer.Option([], "--set", help="Override a key, e.g. --set data.tokenizer=bpe:8192 (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Tokenise again even if the cache already holds this data."),
):
    """Tokenise the preset's dataset into the cache now, so that training starts at once."""
    cfg = load_config(preset, overrides)
    if cfg.data.dataset.startswith("synthetic:"):
        check_seq_len(cfg.data, cfg.train.seq_len)  # the examples must fit a window, whose length only the config knows
    # no spinner when stderr is not a terminal: there it would leave a blank line in front of an error
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err_console, transient=True, disable=not err_console.is_terminal) as progress:
        task = progress.add_task(f"reading {cfg.data.dataset}")
        data = load_token_data(cfg.data, rebuild=force, progress=lambda tokens: progress.update(
            task, description=f"tokenising {cfg.data.dataset}: {fmt_count(tokens)} tokens"))
    console.print(data_table(data.info, title=f"Data for {cfg.name}"))


@app.command("list")
def list_data():
    """Built-in corpora and synthetic tasks (all offline), then the token sets already in the cache."""
    table = Table(title="Offline datasets (data.dataset)", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("what")
    for name, what in BUILTIN_CORPORA.items():
        table.add_row(f"builtin:{name}", what)
    for name, what in TASKS.items():
        table.add_row(f"synthetic:{name}", what)
    table.add_row("PATH or GLOB", "local .txt (one document per paragraph), .jsonl or .parquet files")
    table.add_row("OWNER/NAME", "a Hugging Face hub dataset (data.config, data.split, data.streaming)")
    console.print(table)
    cached = cached_token_sets()
    if not cached:
        console.print(f"no token sets cached under {cache_root()} yet; make one with `hybridctl data prepare --preset NAME`")
        return
    table = Table(title=f"Cached token sets ({cache_root()})", title_justify="left")
    for column in ("dataset", "tokenizer", "train", "val", "size", "folder", "state"):
        table.add_column(column)
    for m in cached:
        state = "ready" if m["complete"] else "incomplete: tokenised again at its next use"
        table.add_row(m.get("dataset"), str(m.get("tokenizer")), fmt_count(m.get("train_tokens")), fmt_count(m.get("val_tokens")),
                      fmt_bytes(m.get("cache_bytes")), m["cache"].rsplit("/", 1)[-1], state)
    console.print(table)
