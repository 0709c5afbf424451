"""The library's layout: wings whose imports follow the data, no import circles, and commands that read JSON and
TOML without loading torch."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_args_for_micro, run_cli

PACKAGE = Path(__file__).resolve().parents[1] / "hybridctl"

# What each wing may import at module level (function-level imports are how a wing reaches further, lazily).
ALLOWED = {
    "core": {"core"},  # config.py, presets.py, errors.py
    "data": {"core", "data"},
    "model": {"core", "model"},
    "kernels": {"kernels"},
    "training": {"core", "data", "model", "training"},
    "lab": {"core", "data", "model", "training", "lab"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def wing(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] != ["hybridctl", "core"]:
        return None
    return parts[2] if len(parts) > 3 else "core"


def top_level_imports(path: Path) -> set[str]:
    """hybridctl modules imported when `path` is imported (not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hybridctl"):
            for alias in node.names:  # `from pkg import module` imports the module
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").is_file()
                found.add(candidate if is_module else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hybridctl")}
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): top_level_imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_import_circles():
    graph = import_graph()
    done, path = set(), []

    def visit(module):
        if module in path:
            cycle = path[path.index(module):] + [module]
            pytest.fail("import circle: " + " -> ".join(cycle))
        if module in done or module not in graph:
            return
        path.append(module)
        for dep in graph[module]:
            visit(dep)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_wings_import_down_the_flow():
    wrong = []
    for module, deps in import_graph().items():
        own = wing(module)
        if own is None:
            continue
        wrong += [f"{module} imports {dep}" for dep in deps if wing(dep) is not None and wing(dep) not in ALLOWED[own]]
    assert not wrong, "\n".join(wrong)


def test_no_module_is_long():
    long = [f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 420]
    assert not long, "split these along a seam: " + ", ".join(long)


TORCH_PROBE = """
import json, sys
from hybridctl.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print(json.dumps({"code": code, "torch": loaded[:5]}), file=sys.stderr)
"""


def torch_modules_loaded(*args: str, cwd: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", TORCH_PROBE, *args], capture_output=True, text=True, cwd=cwd)
    return json.loads(result.stderr.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("layout") / "runs"
    result = run_cli("train", "--preset", "tiny", "--out", str(out), "--name", "r", *cli_args_for_micro())
    assert result.returncode == 0, result.stderr
    return out / "r"


@pytest.mark.parametrize("args", [["--help"], ["train", "--list-presets"], ["compare", "RUN"], ["report", "RUN", "--out", "REPORT"],
                                  ["data", "list"], ["bench", "--help"], ["ablate", "lr", "--preset", "tiny", "--dry-run", "--out", "SWEEPS"]])
def test_read_only_commands_load_no_torch(args, finished_run, tmp_path):
    args = [a.replace("REPORT", str(tmp_path / "report.md")).replace("SWEEPS", str(tmp_path / "sweeps"))
            .replace("RUN", str(finished_run)) for a in args]
    probe = torch_modules_loaded(*args, cwd=tmp_path)
    assert probe["code"] in (0, None), probe
    assert probe["torch"] == [], f"`hybridctl {' '.join(args)}` imported {probe['torch']}"
