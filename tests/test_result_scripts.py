"""The scripts that reproduce the GPU results (docs/results/**/*.sh) against the CLI: each runs under bash with a
stub `hybridctl` that records its arguments, and every recorded command parses, with presets that exist. A renamed
option or preset is found here rather than on the CUDA machine the scripts are meant for."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, check_command

STUB = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["HYBRIDCTL_STUB_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def script_runs() -> list[tuple[str, list[str]]]:
    """(script, arguments) for each way to run each script that calls hybridctl: once per part where the usage
    line names alternatives (`usage: ... run_more.sh lr|long|placements`), else once with the defaults."""
    runs = []
    for script in sorted((REPO / "docs" / "results").rglob("*.sh")):
        text = script.read_text()
        if not re.search(r"^\s*hybridctl\s", text, re.M):
            continue
        parts = re.search(r"usage:.*?\.sh ((?:\w+\|)+\w+)", text)
        name = str(script.relative_to(REPO))
        runs += [(name, [part]) for part in parts.group(1).split("|")] if parts else [(name, [])]
    return runs


RUNS = script_runs()


def test_the_scripts_are_found():
    assert {s for s, _ in RUNS} >= {"docs/results/study_a_300/run.sh", "docs/results/study_a_300/run_more.sh"}


def run_with_stub(script: str, args: list[str], tmp_path) -> list[list[str]]:
    """Runs a script under bash with the recording `hybridctl` and RUNS=tmp_path/runs; the commands it called."""
    bin_dir, runs = tmp_path / "bin", tmp_path / "runs"
    bin_dir.mkdir(parents=True)
    runs.mkdir(exist_ok=True)
    (bin_dir / "hybridctl").write_text(STUB)
    (bin_dir / "hybridctl").chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RUNS": str(runs),
           "HYBRIDCTL_STUB_LOG": str(log)}
    env.pop("PRESETS", None)  # the scripts' own default presets are what is checked
    done = subprocess.run(["bash", str(REPO / script), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, f"{script} {' '.join(args)} failed: {done.stderr}"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("script,args", RUNS, ids=[" ".join([s, *a]) for s, a in RUNS])
def test_script_commands_parse(cli_group, script, args, tmp_path):
    runs = tmp_path / "runs"
    commands = run_with_stub(script, args, tmp_path)
    assert commands, f"{script} {' '.join(args)} ran no hybridctl command"
    for command in commands:
        check_command(cli_group, command, f"{script} {' '.join(args)}")
    assert not any(runs.iterdir()), "a silenced command wrote files"


def seeds_asked(commands: list[list[str]]) -> list[str]:
    return [command[command.index("--seeds") + 1] for command in commands if "--seeds" in command]


def test_the_long_part_resumes_a_grown_sweep(tmp_path):
    """The 700-step part trains seed 0 of every architecture (--seeds 1) before growing the sweep to two seeds;
    run again once the sweep holds seed 1, it must not ask for one seed, which ablate refuses as a shrinking plan."""
    script = "docs/results/study_a_300/run_more.sh"
    assert seeds_asked(run_with_stub(script, ["long"], tmp_path / "fresh")) == ["1", "2"]
    sweep = tmp_path / "grown" / "runs" / "ablations" / "study_a_700"
    sweep.mkdir(parents=True)
    (sweep / "sweep.json").write_text((REPO / "docs/results/study_a_700/sweep.json").read_text())
    assert seeds_asked(run_with_stub(script, ["long"], tmp_path / "grown")) == ["2"]
