import json

import pytest

from conftest import cli_args_for_micro, run_cli, write_plugin

COMMANDS = ["train", "resume", "ablate", "compare", "bench", "report"]


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout


def test_train_then_resume_with_extension(tmp_path):
    out = tmp_path / "runs"
    result = run_cli("train", "--preset", "tiny", "--out", str(out), "--name", "t", *cli_args_for_micro())
    assert result.returncode == 0, result.stderr
    assert "Run summary" in result.stdout and "val loss" in result.stdout
    run = out / "t"
    assert (run / "config.toml").is_file() and (run / "summary.json").is_file()
    assert not (run / "run.lock").exists()

    again = run_cli("resume", str(run))
    assert again.returncode == 1 and "already finished" in again.stderr and "--extend-steps" in again.stderr

    ext = run_cli("resume", str(run), "--extend-steps", "3")
    assert ext.returncode == 0, ext.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 9
    assert "steps = 9" in (run / "config.toml").read_text()


def test_folder_that_is_not_a_run_is_not_replaced_even_with_force(tmp_path):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "precious.txt").write_text("keep")
    result = run_cli("train", "--preset", "tiny", "--out", str(tmp_path / "runs"), "--name", "x", "--force", *cli_args_for_micro())
    assert result.returncode == 1
    assert "is not a run folder" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (run / "precious.txt").read_text() == "keep"


@pytest.mark.parametrize("args,needle", [
    (["train", "--preset", "tiny", "--set", "train.stpes=3"], "did you mean 'train.steps'"),
    (["train"], "no preset given"),
    (["train", "--preset", "nope_preset"], "unknown preset"),
    (["resume", "/nonexistent/run"], "not a run folder"),
    (["train", "--preset", "tiny", "--bogus"], "No such option"),
])
def test_bad_input_is_one_line(args, needle):
    result = run_cli(*args)
    assert result.returncode != 0
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_list_presets():
    result = run_cli("train", "--list-presets")
    assert result.returncode == 0 and "hybrid_sparse" in result.stdout and "tiny" in result.stdout


def _write_plugin(root, body: str):
    write_plugin(root, "hybridctl_demo_plugin", body, "hybridctl.commands", "demo = hybridctl_demo_plugin:hello")


def test_third_party_command_through_entry_point(tmp_path):
    _write_plugin(tmp_path, """
        import typer
        def hello(who: str = typer.Option("world", "--who")):
            '''Say hello from a plugin.'''
            print(f"hello {who} from a plugin")
    """)
    env = {"PYTHONPATH": str(tmp_path)}
    assert "demo" in run_cli("--help", env=env).stdout
    result = run_cli("demo", "--who", "lab", env=env)
    assert result.returncode == 0 and "hello lab from a plugin" in result.stdout


def test_broken_plugin_warns_but_cli_works(tmp_path):
    _write_plugin(tmp_path, "raise RuntimeError('plugin exploded')\n")
    result = run_cli("--help", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0
    assert "warning: plugin command 'demo'" in result.stderr and "plugin exploded" in result.stderr
    assert "train" in result.stdout


def test_plugin_cannot_replace_a_built_in_command(tmp_path):
    write_plugin(tmp_path, "hybridctl_shadow_plugin", """
        def train():
            print("not the trainer")
    """, "hybridctl.commands", "train = hybridctl_shadow_plugin:train")
    env = {"PYTHONPATH": str(tmp_path)}
    result = run_cli("train", "--list-presets", env=env)
    assert result.returncode == 0 and "hybrid_sparse" in result.stdout and "not the trainer" not in result.stdout
    assert "warning: plugin command 'train' (hybridctl_shadow_plugin:train) has the name of a built-in command" in result.stderr
