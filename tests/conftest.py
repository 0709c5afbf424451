"""Shared fixtures: an isolated data cache and micro-sized configs so the whole suite stays fast on 2 cores."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import typer

REPO = Path(__file__).resolve().parents[1]

# Without a GPU, the project's Triton kernels run in Triton's interpreter (tests/test_kernels.py). Triton reads
# the switch when it is first imported (torch.compile's machinery imports it too), so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Micro model and data used by most training tests: seconds per run on a CPU.
MICRO = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", 'model.pattern="LF"',
    "model.gdn.num_heads=2", "model.gdn.head_dim=16", "model.gdn.chunk_size=16",
    "train.seq_len=32", "train.batch_size=4", "train.steps=6", "train.warmup_steps=2",
    "train.eval_every=3", "train.eval_batches=1", "train.save_every=3", "train.log_every=1",
    "data.max_tokens=60000",
]

# `bench speed` options for a model as small as MICRO's.
MICRO_SPEED = ["--set", "model.d_model=32", "--set", "model.n_heads=2", "--set", "model.gdn.num_heads=2",
               "--set", "model.gdn.head_dim=16", "--set", "model.gdn.chunk_size=16", "--vocab", "300"]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hybridctl-cache")
    os.environ["HYBRIDCTL_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    return cache


@pytest.fixture(scope="module")
def one_thread():
    """Micro models gain nothing from threads, and on a shared 2-core machine a second thread mostly waits: a
    module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def micro_overrides():
    return list(MICRO)


def micro_config(extra: list[str] | None = None, preset: str = "tiny"):
    from hybridctl.core.config import load_config

    return load_config(preset, MICRO + (extra or []))


@pytest.fixture(scope="session")
def finished_micro_run(tmp_path_factory) -> Path:
    """A finished micro run (checkpoints at steps 3 and 6, best/); copy it before changing anything in it."""
    from hybridctl.core.training.runs import RunDir
    from hybridctl.core.training.trainer import train

    cfg = micro_config()
    run = RunDir(tmp_path_factory.mktemp("finished") / "micro")
    run.create(cfg)
    try:
        train(cfg, run)
    finally:
        run.release_lock()
    return run.path


class StopAfter:
    """Callback that simulates a crash right after the checkpoint of a given step is taken (train() still waits
    for its write before the exception leaves it)."""

    def __init__(self, step):
        self.step = step

    def __call__(self, kind, record):
        if kind == "checkpoint" and record["step"] == self.step:
            raise KeyboardInterrupt


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run the real `hybridctl` entry point in a child process (`input`: its standard input)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hybridctl", *args], cwd=cwd, env=full_env,
        capture_output=True, text=True, timeout=timeout, input=input,
    )


def cli_args_for_micro(extra: list[str] | None = None) -> list[str]:
    out = []
    for item in MICRO + (extra or []):
        out += ["--set", item]
    return out


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_plugin(root: Path, module: str, body: str, group: str, entry: str) -> None:
    """An installed-looking plugin distribution in `root` (put it on PYTHONPATH): module.py with `body`, and a
    dist-info whose entry_points.txt registers `entry` (name = module:attr) in `group`."""
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    dist = root / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n{entry}\n")


def silenced(command, calls: list) -> None:
    """Replace every command's action by one that records its name, keeping its options and their types (Typer's
    commands may be its own copy of click's classes, so groups are told apart by their `commands`)."""
    if hasattr(command, "commands"):
        for sub in command.commands.values():
            silenced(sub, calls)
    else:
        command.callback = lambda **kwargs: calls.append(command.name)


@pytest.fixture(scope="module")
def cli_group():
    """The CLI's click group with every command silenced, and the list of the commands it reached."""
    from hybridctl import cli

    calls: list[str] = []
    group = typer.main.get_command(cli.build_app())
    silenced(group, calls)
    return group, calls


def check_command(cli_group, args: list[str], where: str) -> None:
    """`hybridctl ARGS` (as written in `where`) parses and reaches one command, its presets exist and its layer
    layouts are valid."""
    from hybridctl.core.lab.sweep_plans import ARCH_GROUPS
    from hybridctl.core.presets import available_presets, parse_layouts

    group, calls = cli_group
    calls.clear()
    group.main(args=list(args), prog_name="hybridctl", standalone_mode=False)
    assert len(calls) == 1, f"{where}: `hybridctl {' '.join(args)}` reached no command"
    for i, word in enumerate(args[:-1]):
        if word in ("--preset", "-p"):
            for name in args[i + 1].split(","):
                known = available_presets() + (list(ARCH_GROUPS) if args[:2] == ["ablate", "arch"] else [])
                assert name in known, f"{where}: preset {name} does not exist"
        if word == "--patterns":
            parse_layouts(args[i + 1])  # a layer layout, or the one-line error a user would get
