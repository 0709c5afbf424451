"""`hybridctl data`: tokenise and cache a preset's data ahead of time (`prepare`); show corpora and caches (`list`)."""

from __future__ import annotations

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from hybridctl.core.config import load_config
from hybridctl.core.data.corpora import BUILTIN_CORPORA
from hybridctl.core.data.tokens import cache_root
from hybridctl.core.data.token_cache import cached_token_sets, load_token_data
from hybridctl.commands.train import PRESET_HELP
from hybridctl.core.lab.render import data_table, fmt_bytes, fmt_count
from hybridctl.core.lab.tables import console, err_console, print_table, text_table
from hybridctl.core.data.synthetic import TASKS, check_seq_len

app = typer.Typer(help="Prepare (tokenise and cache) and list training data.", no_args_is_help=True)


@app.command()
def prepare(
    preset: str = typer.Option(..., "--preset", "-p", metavar="NAME", help=PRESET_HELP),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a config key, e.g. --set data.tokenizer=bpe:8192 (repeatable)."),
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
    print_table(data_table(data.info, title=f"Data for {cfg.name}"))


@app.command("list")
def list_data():
    """Built-in corpora and synthetic tasks (all offline), then the token sets already in the cache."""
    rows = [[f"builtin:{name}", what] for name, what in BUILTIN_CORPORA.items()]
    rows += [[f"synthetic:{name}", what] for name, what in TASKS.items()]
    rows += [["PATH or GLOB", "local .txt (one document per paragraph), .jsonl or .parquet files"],
             ["OWNER/NAME", "a Hugging Face hub dataset (data.config, data.split, data.streaming)"]]
    print_table(text_table(["name", "what"], rows, title="Offline datasets (data.dataset)"))
    cached = cached_token_sets()
    if not cached:
        console.print(f"no token sets cached under {cache_root()} yet; make one with `hybridctl data prepare --preset NAME`",
                      markup=False, highlight=False, soft_wrap=True)
        return
    rows = [[m.get("dataset"), str(m.get("tokenizer")), fmt_count(m.get("train_tokens")), fmt_count(m.get("val_tokens")),
             fmt_bytes(m.get("cache_bytes")), m["cache"].rsplit("/", 1)[-1],
             "ready" if m["complete"] else "incomplete: tokenised again at its next use"] for m in cached]
    print_table(text_table(["dataset", "tokenizer", "train", "val", "size", "folder", "state"], rows,
                           title=f"Cached token sets ({cache_root()})", essential={"dataset", "tokenizer", "state"}))
