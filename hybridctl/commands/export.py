"""`hybridctl export`: a trained run as a folder that transformers + flash-linear-attention load as it is, and
`--check` (CUDA + fla) that fla's model from it computes what hybridctl's does. Library: core/lab/export.py,
hf_export.py (the tensor and config mapping), hf_tokenizer.py, hf_check.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from hybridctl.core.errors import ConfigError, RunError
from hybridctl.core.lab.render import fmt_count
from hybridctl.core.lab.tables import console, print_table

def export(
    target: Path = typer.Argument(..., metavar="RUN_OR_CHECKPOINT", help="A run folder, or a checkpoint folder inside one (best/, checkpoints/step_NNNNNN); with --check and no --out, an export folder."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder to write: config.json, model.safetensors, tokenizer and generation files."),
    fmt: str = typer.Option("hf", "--format", help="hf: fla's GatedDeltaNetForCausalLM for transformers (the only format)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="best, latest or step_NNNNNN (default: best if saved, else latest)."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier export in --out (and an existing --json file)."),
    check: bool = typer.Option(False, "--check", help="On a CUDA GPU with fla: load the folder with transformers and compare its logits and greedy continuation with hybridctl's."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="With --check: write the figures to this JSON file too."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="With --check: the prompt whose greedy continuation is compared (default: a line of Python)."),
):
    """Write a run's checkpoint in fla's Hugging Face format (GatedDeltaNetForCausalLM); --check compares it on a GPU."""
    if out is None and not check:
        raise ConfigError("give --out DIR, the folder to write (or --check to check an export folder on a GPU)")
    if prompt is not None and not prompt.strip():
        raise ConfigError("--prompt is empty; give some text for the greedy continuation to start from")
    if json_path is not None and not check:
        raise ConfigError("--json writes the figures of --check; add --check, or leave --json out")
    if json_path is not None:
        from hybridctl.core.training.runs import ensure_new_file

        ensure_new_file(json_path, force)
    if check:
        from hybridctl.core.lab.hf_check import check_unavailable

        why = check_unavailable()
        if why and out is not None:
            raise RunError(f"{why}; export without --check here, then run `hybridctl export --check {out}` on a CUDA machine with fla")
        if why:
            raise RunError(f"{why}; run it on a CUDA machine with fla and transformers")
    reference = None
    if out is not None:
        from hybridctl.core.lab.export import export_run

        result = export_run(target, out, force=force, which=checkpoint, fmt=fmt)
        print_export(result)
        folder = out
    else:
        from hybridctl.core.lab.export import read_export_config

        if read_export_config(target) is None:
            raise RunError(f"{target} is not an export folder (no config.json from `hybridctl export`); "
                           "export a run with --out DIR, adding --check to check it")
        folder = target
    if check:
        from hybridctl.core.lab.hf_check import check_export

        if out is not None:
            from hybridctl.core.lab.trained_model import load_trained_model

            reference = load_trained_model(target, checkpoint).model
        figures = check_export(folder, reference=reference, **({"prompt": prompt} if prompt is not None else {}))
        print_check(figures)
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(figures, indent=2) + "\n")
            console.print(f"saved {json_path}", markup=False, highlight=False, soft_wrap=True)
        if figures["problems"]:
            raise RunError(f"fla's model from {folder} does not match hybridctl's: {'; '.join(figures['problems'])}")


def print_export(result: dict[str, Any]) -> None:
    padding = f", {result['dropped_rows']} padding rows left out" if result["dropped_rows"] else ""
    console.print(
        f"exported [bold]{result['run']}[/] @ {result['checkpoint']} (step {result['step']}) to {result['out']}: "
        f"layers {result['layers']}, {fmt_count(result['params'])} parameters in {result['tensors']} tensors, "
        f"vocabulary {result['vocab_size']}{padding}, {'tied' if result['tied'] else 'separate'} embeddings, "
        f"tokenizer {result['tokenizer']}", highlight=False, soft_wrap=True)
    console.print(f"load: on a CUDA machine with fla (and flash-attn for attention layers), import fla, then "
                  f"transformers.AutoModelForCausalLM.from_pretrained('{result['out']}') (docs/export.md)",
                  markup=False, highlight=False, soft_wrap=True)


def print_check(figures: dict[str, Any]) -> None:
    table = Table(title=f"fla vs hybridctl fp32, {figures['tokens'][0]} x {figures['tokens'][1]} tokens "
                        f"(logit std {figures['logit_std']:.3g}; reference: {figures['reference']})", title_justify="left")
    for column in ("model", "max abs error", "mean abs error"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for key, label in (("fla_fp32", "fla, fp32"), ("fla_bf16", "fla, bf16"), ("hybridctl_bf16", "hybridctl, bf16 autocast")):
        table.add_row(label, f"{figures[key]['max_abs']:.3g}", f"{figures[key]['mean_abs']:.3g}")
    if figures["attention_kernel"]:
        table.caption = f"attention: bf16 through {figures['attention_kernel']['bf16']}, fp32 through {figures['attention_kernel']['fp32']}"
    print_table(table)
    greedy = figures["greedy"]
    for key, label in (("fla_vs_hybridctl", "fla bf16"), ("cached_vs_hybridctl", "fla bf16 with its cache"),
                       ("generate_vs_hybridctl", f"transformers {greedy['transformers']} generate()")):
        cmp = greedy.get(key)
        if cmp is None:
            continue
        same = "same as hybridctl" if cmp["same"] else (
            f"differs from token {cmp['first_difference']} (hybridctl's margin there {cmp['reference_margin']:.3g})")
        console.print(f"greedy {greedy['new_tokens']} tokens, {label}: {same}", markup=False, highlight=False)
    if "generate_error" in greedy:
        console.print(f"generate() failed: {greedy['generate_error']}", markup=False, highlight=False)
    elif not greedy["generate_vs_cached"]:
        console.print(f"warning: transformers {greedy['transformers']} generate() does not continue as fla's own cached "
                      "decoding does: this fla and this transformers disagree on the cache (not an export fault)",
                      markup=False, highlight=False, soft_wrap=True)
    verdict = "matches" if not figures["problems"] else "does NOT match"
    console.print(f"fla's model {verdict} hybridctl's", markup=False, highlight=False)
