"""`hybridctl eval`: loss, perplexity and next-token accuracy of a trained run on any text (core/lab/text_eval.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def eval_command(
    target: Path = typer.Argument(..., metavar="RUN_OR_CHECKPOINT", help="A run folder, or a checkpoint folder inside one (best/, checkpoints/step_NNNNNN)."),
    data: str = typer.Option(..., "--data", help="The text: a .txt/.jsonl/.parquet file, a folder or a glob, a hub dataset (owner/name), or builtin:stdlib."),
    name: Optional[str] = typer.Option(None, "--name", help="Results go to RUN/eval/NAME.json (default: from --data, e.g. wikitext-2-test)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="best, latest or step_NNNNNN (default: best if saved, else latest)."),
    config: str = typer.Option("", "--config", help="Hub dataset configuration, e.g. wikitext-2-raw-v1."),
    split: str = typer.Option("test", "--split", help="Hub dataset split."),
    text_field: str = typer.Option("text", "--text-field", help="Field that holds the text in .jsonl/.parquet files and hub datasets."),
    max_tokens: int = typer.Option(0, "--max-tokens", help="Score only the first N tokens of the text (0: all)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows per forward pass (default: the run's micro-batch)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON to stdout instead of a table."),
    force: bool = typer.Option(False, "--force", help="Replace an existing RUN/eval/NAME.json."),
):
    """Loss, perplexity and next-token accuracy on a text, over windows of the run's seq_len; writes RUN/eval/NAME.json."""
    # torch and the model code load here, not at import: `hybridctl --help` and read-only commands stay light
    from hybridctl.commands.bench import progress_bar
    from hybridctl.core.lab.tables import console, print_table
    from hybridctl.core.lab.text_eval import eval_text
    from hybridctl.core.training.runs import check_name_option

    check_name_option(name, "a name made from --data")
    with progress_bar("eval") as update:
        result = eval_text(target, data, checkpoint, name, config, split, text_field, max_tokens, batch_size, device,
                           force, progress=update)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console.print(f"[bold]{result['run']}[/] @ {result['checkpoint']} (step {result['checkpoint_step']})", highlight=False)
    print_table(result_table(result))
    console.print(f"saved {result['path']}", markup=False, highlight=False, soft_wrap=True)


def result_table(result: dict):
    from rich.table import Table

    from hybridctl.core.lab.render import fmt_num

    table = Table(title=f"{result['data']}", title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", justify="right")
    rows = [
        ("loss", fmt_num(result["loss"])), ("perplexity", fmt_num(result["ppl"], 2)),
        ("next-token acc", f"{100 * result['acc']:.2f}%"),
        ("tokens", f"{result['scored_tokens']:,} scored of {result['tokens']:,} "
                   f"({result['documents']:,} documents, tokenizer {result['tokenizer']})"),
        ("windows", f"{result['windows']} x {result['seq_len']} tokens, tail of {result['tail_tokens']} not scored"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table
