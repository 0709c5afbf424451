"""The wheel carries the presets: built from this checkout, installed elsewhere, `train --list-presets` lists them
all and a preset loads (the full check, training from the installed wheel, is .ci/wheel-check)."""

import os
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO
from hybridctl.core.presets import available_presets, presets_dir


def test_presets_are_read_from_the_package():
    assert presets_dir() == REPO / "hybridctl" / "presets"
    assert "tiny" in available_presets() and len(available_presets()) == len(list(presets_dir().glob("*.toml")))


def test_installed_wheel_lists_and_loads_its_presets(tmp_path):
    pytest.importorskip("setuptools")  # the build backend, used from this environment (no download)
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(dist), str(REPO)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("hybridctl-*.whl")
    with zipfile.ZipFile(wheel) as z:
        packed = {n.rsplit("/", 1)[-1][:-5] for n in z.namelist() if n.startswith("hybridctl/presets/") and n.endswith(".toml")}
    assert packed == set(available_presets())

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import hybridctl, sys; from hybridctl.core.config import load_config; "
             "print(hybridctl.__file__); print(load_config('hybrid_sparse').model.attention_layers); "
             "from hybridctl.cli import main; sys.exit(main(['train', '--list-presets']))")
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "80"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(str(site)) and lines[1] == "[3, 6]"
    listed = {line.split()[0] for line in lines[2:] if line.strip()}
    assert set(available_presets()) <= listed
