"""`hybridctl train`: resolve a preset, create the run folder, train."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hybridctl.core.config import available_presets, load_config, read_toml, find_preset
from hybridctl.core.errors import ConfigError
from hybridctl.core.render import TrainProgress, console, summary_table
from hybridctl.core.runs import RunDir
from hybridctl.core.trainer import train as run_training


def train(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Preset name from presets/ or a path to a .toml file."),
    out: Path = typer.Option(Path("runs"), "--out", help="Folder that holds run folders."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name (default: the preset's name)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a key, e.g. --set train.lr=1e-3 (repeatable)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Shorthand for --set train.seed=N."),
    device: Optional[str] = typer.Option(None, "--device", help="Shorthand for --set train.device=cpu|cuda."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder of the same name."),
    list_presets: bool = typer.Option(False, "--list-presets", help="List the presets and exit."),
):
    """Train a model from a preset into runs/<name>/."""
    if list_presets:
        for p in available_presets():
            description = read_toml(find_preset(p)).get("description", "")
            console.print(f"[bold]{p}[/]  {description}")
        return
    if preset is None:
        raise ConfigError("no preset given; pass --preset NAME (see `hybridctl train --list-presets`)")
    overrides = list(overrides)
    if seed is not None:
        overrides.append(f"train.seed={seed}")
    if device is not None:
        overrides.append(f'train.device="{device}"')
    cfg = load_config(preset, overrides)
    if name:
        cfg.name = name
    run = RunDir(out / (name or cfg.name))
    run.create(cfg, force=force)
    progress = TrainProgress(run.name)
    try:
        summary = run_training(cfg, run, callback=progress)
    except BaseException:
        run.discard_if_unstarted()  # failed before step 1 (bad data, no room...): leave nothing that blocks a retry
        raise
    finally:
        progress.close()
        run.release_lock()
    console.print(summary_table(summary, title=f"Run summary: {run.path}"))
