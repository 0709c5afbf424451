"""`hybridctl train`: resolve a preset, create the run folder, train (on several GPUs with --gpus N)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from hybridctl import cli
from hybridctl.core.config import load_config, preset_layer_types
from hybridctl.core.errors import ConfigError
from hybridctl.core.lab.render import TrainProgress, summary_table
from hybridctl.core.lab.tables import print_table, text_table
from hybridctl.core.presets import available_presets, load_preset_dict
from hybridctl.core.training.processes import launched
from hybridctl.core.training.runs import RunDir, check_name_option, check_run_name
from hybridctl.core.training.tracking import check_trackers

# torch and the trainer are imported inside the functions that use them: `--help` and `--list-presets` load no torch.

GPUS_HELP = "Train on N GPUs of this machine: starts N processes under torchrun, one per GPU (global batch unchanged)."


def without_gpus(args: list[str]) -> list[str]:
    """The command line minus its --gpus option."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            out.append(arg)
    return out


def check_gpus(gpus: int, command: str) -> None:
    import torch

    if launched():
        raise ConfigError("--gpus starts torchrun itself; leave it out when running under torchrun")
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    if not torch.cuda.is_available():
        if gpus == 1:
            raise ConfigError(f"--gpus 1: no CUDA GPU is available here; leave out --gpus to {command} on the CPU")
        raise ConfigError(
            f"--gpus {gpus}: no CUDA GPUs are available here; to run {gpus} processes on CPU, run "
            f"`torchrun --nproc-per-node {gpus} -m hybridctl {command} ...` with the same options, without --gpus"
        )
    if gpus > torch.cuda.device_count():
        raise ConfigError(f"--gpus {gpus}, but only {torch.cuda.device_count()} CUDA GPUs are visible here; pass --gpus {torch.cuda.device_count()} or fewer")


def check_device_for_gpus(cfg, gpus: int) -> None:
    from hybridctl.core.training.steps import resolve_device

    device = resolve_device(cfg.train.device)
    if device.type != "cuda" or device.index is not None:
        raise ConfigError(f"--gpus runs on GPUs {'0' if gpus == 1 else f'0..{gpus - 1}'}, but train.device is '{cfg.train.device}'; "
                          "leave it at auto or set it to cuda (CUDA_VISIBLE_DEVICES picks which GPUs)")


def check_config_for_gpus(cfg, gpus: int) -> None:
    """What would make every process of a --gpus run fail at once, checked here in one process and one line."""
    from hybridctl.core.training.steps import micro_batch_size

    check_device_for_gpus(cfg, gpus)
    micro_batch_size(cfg, gpus)


def launch_on_gpus(gpus: int) -> int:
    """Run this same command as `gpus` processes under torchrun; returns torchrun's exit code."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
            "-m", "hybridctl", *without_gpus(cli.current_args)]
    # torchrun kills the processes 30 s after passing a signal on, by default; they first finish up to the next
    # log step and save a checkpoint, which can take longer.
    env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600", **os.environ}
    child = subprocess.Popen(args, env=env)

    # Ctrl-C reaches torchrun directly (same terminal), and torchrun passes it on to the training processes,
    # which save and stop; a SIGTERM sent to this process alone is passed on here.
    def handler(signum, frame):
        if signum != signal.SIGINT:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
    return 128 - code if code < 0 else code  # killed by a signal: the shell's convention


PRESET_HELP = "A built-in preset's name (see --list-presets) or a path to a .toml file."
SET_HELP = "Override a config key, e.g. --set train.lr=1e-3 (repeatable)."


def list_presets() -> None:
    rows = []
    for name in available_presets():
        data = load_preset_dict(name)
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        rows.append([name, preset_layer_types(model) or "-", data.get("description", "")])
    print_table(text_table(["preset", "layers", "description"], rows, title="Presets (hybridctl train --preset NAME)"))


def train(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", metavar="NAME", help=PRESET_HELP),
    out: Path = typer.Option(Path("runs"), "--out", metavar="DIR", help="Folder that holds run folders."),
    name: Optional[str] = typer.Option(None, "--name", metavar="NAME", help="Run name (default: the preset's name)."),
    steps: Optional[int] = typer.Option(None, "--steps", metavar="N", help="Shorthand for --set train.steps=N."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="N", help="Shorthand for --set train.seed=N."),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE", help="Shorthand for --set train.device=cpu|cuda|cuda:N."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder of the same name."),
    gpus: Optional[int] = typer.Option(None, "--gpus", metavar="N", help=GPUS_HELP),
    list_presets_: bool = typer.Option(False, "--list-presets", help="List the presets and exit."),
):
    """Train a model from a preset into runs/<name>/."""
    if list_presets_:
        list_presets()
        return
    if gpus is not None:
        check_gpus(gpus, "train")
    if preset is None:
        raise ConfigError("no preset given; pass --preset NAME (see `hybridctl train --list-presets`)")
    check_name_option(name, "the preset's name")
    overrides = list(overrides)
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    if seed is not None:
        overrides.append(f"train.seed={seed}")
    if device is not None:
        overrides.append(f'train.device="{device}"')
    notes: list[str] = []
    cfg = load_config(preset, overrides, notes)
    check_trackers(cfg)  # a train.log_to tracker that is not installed: refused before anything is written
    if name:
        cfg.name = name
    check_run_name(name or cfg.name)
    run = RunDir(out / (name or cfg.name))
    if gpus is not None:
        check_config_for_gpus(cfg, gpus)
        if gpus > 1:
            run.check_creatable(force)
            return launch_on_gpus(gpus)
    from hybridctl.core.training import distributed as dist
    from hybridctl.core.training.preflight import check_room_for_a_checkpoint, checkpoint_bytes, load_run_data
    from hybridctl.core.training.steps import resolve_device
    from hybridctl.core.training.trainer import train as run_training

    with dist.session(resolve_device(cfg.train.device)):
        main = dist.is_main()
        with dist.together():  # what would refuse the folder, before the data is built: an existing run, not a run
            if main:
                run.check_creatable(force)
        data = load_run_data(cfg)  # before the folder is made or replaced: a bad dataset costs nothing on disk
        with dist.together():
            if main:  # and room for a checkpoint, counting the run that --force replaces
                check_room_for_a_checkpoint(checkpoint_bytes(cfg, data), run.path, freed=run.disk_bytes() if force else 0)
        with dist.together():  # rank 0 makes the folder (and takes the lock); the others write nothing into it
            if main:
                run.create(cfg, force=force)
        progress = TrainProgress(run.name) if main else None
        try:
            summary = run_training(cfg, run, callback=progress, data=data, notes=notes)
        except BaseException:
            if main:
                run.discard_if_unstarted()  # failed before step 1 (bad data, no room...): leave nothing that blocks a retry
            raise
        finally:
            if progress is not None:
                progress.close()
            if main:
                run.release_lock()
    if main:
        print_table(summary_table(summary, title=f"Run summary: {run.path}"))
