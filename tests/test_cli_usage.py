"""Everyday use of the command line: help and version, --debug anywhere, the order of commands, one vocabulary of
options and arguments, exit codes, `train --steps`, `resume --set`, and a --set that replaces a preset's layers."""

import json
import re
import shutil
import sys

import pytest

from conftest import REPO, run_cli
from hybridctl import __version__
from hybridctl.cli import BUILTIN_COMMANDS, main
from hybridctl.core.config import load_config
from hybridctl.core.training.runs import RunDir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_bare_hybridctl_prints_the_help_and_exits_0():
    result = run_cli()
    assert result.returncode == 0 and result.stderr == ""
    assert "Usage: hybridctl" in result.stdout and "train" in result.stdout


@pytest.mark.parametrize("group", ["bench", "data", "ablate"])
def test_a_command_group_without_subcommand_prints_its_help(group, capsys):
    assert main([group]) == 0
    captured = capsys.readouterr()
    assert f"Usage: hybridctl {group}" in captured.out and captured.err == ""


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hybridctl {__version__}"
    with open(REPO / "pyproject.toml", "rb") as f:  # the wheel's version is read from the same place
        assert tomllib.load(f)["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hybridctl.__version__"}


def test_commands_are_listed_in_the_order_a_user_meets_them():
    result = run_cli("--help")
    assert result.returncode == 0
    listed = re.findall(r"^│ (\w+) ", result.stdout.split("Commands")[1], re.M)
    assert listed[: len(BUILTIN_COMMANDS)] == list(BUILTIN_COMMANDS)
    assert list(BUILTIN_COMMANDS)[:7] == ["train", "resume", "ablate", "compare", "report", "bench", "data"]


def test_pyproject_entry_points_are_the_builtin_commands():
    with open(REPO / "pyproject.toml", "rb") as f:
        eps = tomllib.load(f)["project"]["entry-points"]["hybridctl.commands"]
    assert eps == BUILTIN_COMMANDS


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["resume", "--help"], ["bench", "speed", "--help"],
                                  ["bench", "arc", "--help"], ["data", "prepare", "--help"]])
def test_help_shows_no_type_noise_for_flags(args, capsys):
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "<bool>" not in out and "<list[str]>" not in out
    if "--set" in out:
        assert "KEY=VALUE" in out


def all_commands():
    """(path, click command) of every built-in command and subcommand."""
    import typer

    from hybridctl.cli import build_app

    def walk(command, path):
        yield path, command
        for name in getattr(command, "commands", {}):
            yield from walk(command.commands[name], [*path, name])

    return list(walk(typer.main.get_command(build_app()), []))


def help_texts(command) -> list[str]:
    return [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]


def squeezed(text: str) -> str:
    return "".join(text.replace("│", " ").split())


def test_brackets_in_help_texts_are_printed_as_written(capsys):
    """Rich renders the help and reads "[word]" as a style tag, dropping it: `pip install "hybridctl[figures]"` would
    print as `pip install "hybridctl"`. Every bracketed text of a help (an extra, a layout like [3,6]) must be
    printed literally, and the run of the word before it with it."""
    missing = []
    for path, command in all_commands():
        wanted = [m for text in help_texts(command) for m in re.findall(r"[\w.-]*\[[^\]\s]*\]", text.replace("\\[", "["))]
        if not wanted:
            continue
        assert main([*path, "--help"]) == 0
        out = squeezed(capsys.readouterr().out)
        missing += [f"hybridctl {' '.join(path)} --help: {m}" for m in wanted if squeezed(m) not in out]
    assert not missing, "\n".join(missing)


def test_report_help_names_the_figures_extra(capsys):
    assert main(["report", "--help"]) == 0
    assert 'pipinstall"hybridctl[figures]"' in squeezed(capsys.readouterr().out)


ARGUMENT_NAMES = {"RUN", "CHECKPOINT", "SWEEP", "RUN_OR_CHECKPOINT", "RUN_OR_SWEEP"}


def test_every_argument_and_repeated_option_is_named_in_the_vocabulary():
    odd = []
    for path, command in all_commands():
        for param in command.params:
            where = f"hybridctl {' '.join(path)} {param.name}"
            if param.param_type_name == "argument" and param.metavar not in ARGUMENT_NAMES:
                odd.append(f"{where}: argument shown as {param.metavar or param.name}")
            if param.param_type_name == "option" and getattr(param, "multiple", False) and not param.metavar:
                odd.append(f"{where}: a repeatable option without a metavar shows <list[...]>")
            if "--set" in getattr(param, "opts", []) and param.metavar != "KEY=VALUE":
                odd.append(f"{where}: --set shown as {param.metavar}")
    assert not odd, "\n".join(odd)


@pytest.mark.parametrize("args,metavar", [(["resume"], "RUN"), (["bench", "arc"], "RUN_OR_CHECKPOINT")])
def test_arguments_are_named_in_one_vocabulary(args, metavar, capsys):
    assert main([*args, "--help"]) == 0
    usage = capsys.readouterr().out
    assert re.search(rf"\b{metavar}\b", usage) and "run_path" not in usage and "target" not in usage


@pytest.mark.parametrize("where", ["front", "middle", "end"])
def test_debug_works_anywhere_on_the_line(where, tmp_path):
    args = ["compare", str(tmp_path / "nothing")]
    at = {"front": 0, "middle": 1, "end": len(args)}[where]
    result = run_cli(*args[:at], "--debug", *args[at:])
    assert result.returncode == 1
    assert "Traceback" in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_debug_from_the_environment(tmp_path):
    quiet = run_cli("compare", str(tmp_path / "nothing"))
    loud = run_cli("compare", str(tmp_path / "nothing"), env={"HYBRIDCTL_DEBUG": "1"})
    assert quiet.returncode == loud.returncode == 1
    assert "Traceback" not in quiet.stderr and len(quiet.stderr.strip().splitlines()) == 1
    assert "Traceback" in loud.stderr


@pytest.mark.parametrize("args,code", [
    (["train", "--bogus"], 2),             # usage: an unknown option
    (["train", "--preset"], 2),            # usage: an option without its value
    (["resume"], 2),                       # usage: a missing argument
    (["nosuchcommand"], 2),
    (["train", "--preset", "nope_preset"], 1),   # user error: the message says what to fix
    (["compare", "/nonexistent/runs"], 1),
])
def test_exit_codes(args, code, capsys):
    assert main(args) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args,said", [
    (["train", "--bogus"], "No such option: --bogus (see"),  # nothing is close: no option offered
    (["bench", "speed", "--bogus"], "No such option: --bogus (see"),
    (["train", "--stpes", "3"], "No such option: --stpes; did you mean --steps? (see"),
    (["train", "--presets", "tiny"], "No such option: --presets; did you mean --preset or --list-presets? (see"),
    (["ablate", "lr", "--nmae", "x"], "No such option: --nmae; did you mean --name? (see `hybridctl ablate lr --help`)"),
])
def test_an_unknown_option_suggests_only_close_ones(args, said, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {said}") and len(err.strip().splitlines()) == 1, err


def test_train_steps_is_a_shorthand_and_warnings_reach_stderr_and_summary(tmp_path, micro_overrides, capsys):
    out = tmp_path / "runs"
    sets = [a for item in micro_overrides for a in ("--set", item)]  # they set pattern LF over tiny's LLFL
    assert main(["train", "--preset", "tiny", "--out", str(out), "--name", "r", *sets, "--steps", "2"]) == 0
    summary = json.loads((out / "r" / "summary.json").read_text())
    assert summary["steps"] == 2 and RunDir(out / "r").load_config().train.steps == 2
    replaced = '--set model.pattern="LF" replaces the layers preset tiny sets (LLFL) with LF'
    assert summary["warnings"][0] == replaced
    assert "train.warmup_steps (2) is at least half of train.steps (2)" in summary["warnings"][1]
    err = capsys.readouterr().err
    assert [line[len("warning: "):] for line in err.splitlines() if line.startswith("warning: ")] == summary["warnings"]
    assert RunDir(out / "r").load_config().description == 'tiny with layers LF (set by --set model.pattern="LF")'


def test_resume_set_changes_what_leaves_model_and_data_alone(finished_micro_run, tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    shutil.copytree(finished_micro_run, run.path)
    config_before = run.config_path.read_text()
    metrics_before = run.metrics_path.read_text()

    code = main(["resume", str(run.path), "--set", "train.lr=1.0", "--extend-steps", "2"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "resume --set cannot change train.lr" in err and "hybridctl train --set train.lr=1.0" in err
    assert run.config_path.read_text() == config_before and run.metrics_path.read_text() == metrics_before

    assert main(["resume", str(run.path), "--extend-steps", "2", "--set", "train.eval_every=1",
                 "--set", "train.keep_checkpoints=1"]) == 0
    cfg = run.load_config()
    assert (cfg.train.eval_every, cfg.train.keep_checkpoints, cfg.train.steps) == (1, 1, 8)
    evals = [r["step"] for r in run.read_metrics() if "val_loss" in r]
    assert evals == [3, 6, 7, 8]  # every 3 steps, then every step
    assert [p.name for p in run.step_checkpoints()] == ["step_000008"]


@pytest.mark.parametrize("override, message", [
    ("train.eval_evry=5", "unknown key 'train.eval_evry' (did you mean 'train.eval_every'?); resume --set takes "),
    ("steps=5", "unknown key 'steps' (did you mean 'train.steps'?); resume --set takes "),
])
def test_resume_set_names_a_typo_before_what_resume_may_change(finished_micro_run, tmp_path, capsys, override, message):
    """A typo'd key is an unknown key (with the key meant), not a setting `resume` keeps: the refusal must not
    offer `hybridctl train --set <the typo>`, which fails too."""
    run = RunDir(tmp_path / "run")
    shutil.copytree(finished_micro_run, run.path)
    config_before = run.config_path.read_text()
    code = main(["resume", str(run.path), "--set", override, "--extend-steps", "2"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {message}") and "eval_every, save_every" in err and "hybridctl train" not in err
    assert run.config_path.read_text() == config_before


def test_set_that_replaces_a_presets_layers_says_so():
    notes = []
    cfg = load_config("tiny", ["model.attention_layers=[1]"], notes)
    assert "".join(cfg.model.layer_types()) == "LFLL"
    assert notes == ["--set model.attention_layers=[1] replaces the layers preset tiny sets (LLFL) with LFLL"]
    assert "LFLL" in cfg.description and "LLFL" not in cfg.description
    same = []
    assert load_config("hybrid_sparse", ["model.attention_layers=[6, 3]"], same).description.startswith("Study A winner")
    assert same == []  # the same layers: nothing replaced
    untouched = []
    assert load_config("tiny", ["train.lr=1e-3"], untouched).description.startswith("Laptop-sized") and untouched == []
