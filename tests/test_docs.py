"""The user docs against the code: every `hybridctl` command in README.md and docs/*.md parses with the options the
CLI has, its presets exist, and the files and links the docs name are there."""

from __future__ import annotations

import re
import shlex

import pytest

from conftest import REPO, check_command

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)


def doc_commands() -> list[tuple[str, list[str]]]:
    """(file, argv after `hybridctl`) for every hybridctl command line in a code block, torchrun's included."""
    found = []
    for doc in DOCS:
        for block in FENCE.findall(doc.read_text()):
            for line in block.replace("\\\n", " ").splitlines():  # a command continued over lines is one
                words = shlex.split(line, comments=True)
                if words[:1] == ["hybridctl"]:
                    found.append((doc.name, words[1:]))
                elif words[:1] == ["torchrun"] and "hybridctl" in words:
                    found.append((doc.name, words[words.index("hybridctl") + 1:]))
    return found


COMMANDS = doc_commands()


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) > 30
    assert {name for name, _ in COMMANDS} >= {"README.md", "data.md", "gpu.md", "sweeps.md"}


@pytest.mark.parametrize("doc,args", COMMANDS, ids=[f"{d}:{' '.join(a)}" for d, a in COMMANDS])
def test_documented_command_parses(cli_group, doc, args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in the examples (runs/...) point nowhere real
    check_command(cli_group, args, doc)
    assert not any(tmp_path.iterdir()), "a silenced command wrote files"


def named_paths(text: str) -> list[str]:
    """Repository paths a doc names in backticks, or links to."""
    ticked = re.findall(r"`((?:hybridctl|benchmarks|docs|tests|presets)/[^`\s{}*<>]+)`", text)
    linked = [link for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in link]
    return ticked + linked


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_named_files_exist(doc):
    text = doc.read_text()
    missing = []
    for path in named_paths(text):
        path = path.split(" ")[0].rstrip(".,;:")
        if not ((REPO / path).exists() or (doc.parent / path).exists()):
            missing.append(path)
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


def test_speed_figures_name_their_result_files():
    text = (REPO / "docs" / "speed.md").read_text()
    results = {p.name for p in (REPO / "docs" / "results").rglob("*") if p.is_file()}
    named = set(re.findall(r"`([\w.-]+\.(?:json|csv))`", text))
    assert named, "docs/speed.md names no result files"
    assert named <= results, f"docs/speed.md names result files that are not in docs/results: {sorted(named - results)}"


UNQUOTED_EXTRA = re.compile(r"pip install (?:-e )?[^\s\"'`]*\[")


def test_pip_install_hints_quote_their_extras():
    """`pip install hybridctl[wandb]` breaks in zsh, which reads [...] as a pattern: every hint, in the docs and in
    the messages and help of the code, quotes the package with its extras."""
    files = [*DOCS, *sorted((REPO / "hybridctl").rglob("*.py"))]
    unquoted = [f"{path.relative_to(REPO)}:{n}" for path in files
                for n, line in enumerate(path.read_text().splitlines(), 1) if UNQUOTED_EXTRA.search(line)]
    assert unquoted == []
    assert UNQUOTED_EXTRA.search("pip install hybridctl[wandb]") and UNQUOTED_EXTRA.search("pip install -e .[hf]")
    assert not UNQUOTED_EXTRA.search('pip install "hybridctl[wandb]"')
