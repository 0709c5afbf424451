"""The `hybridctl` command: a Typer app whose subcommands, built-in and third-party alike, are found through
the entry-point group `hybridctl.commands` (value: a Typer app, or a function to register as a command).

Errors the user can fix (HybridctlError) print one line and exit non-zero; `--debug` shows the traceback. Under
torchrun an error is printed by one process only (see core/training/processes.py).
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
import traceback
from importlib.metadata import entry_points

import click
import typer

from hybridctl.core.training import processes
from hybridctl.core.errors import HybridctlError, Terminated

ENTRY_POINT_GROUP = "hybridctl.commands"

# Newer Typer releases carry their own copy of click, whose exceptions do not derive from click's: catch both.
EXIT_ERRORS = (click.exceptions.Exit, typer.Exit)
ABORT_ERRORS = (click.exceptions.Abort, typer.Abort)
USAGE_ERRORS = (click.ClickException, getattr(typer.exceptions, "TyperException", click.ClickException))

# Used when the package runs from a source tree that was never installed (no entry-point metadata).
BUILTIN_COMMANDS = {
    "train": "hybridctl.commands.train:train",
    "resume": "hybridctl.commands.resume:resume",
    "ablate": "hybridctl.commands.ablate:app",
    "compare": "hybridctl.commands.compare:compare",
    "bench": "hybridctl.commands.bench:app",
    "report": "hybridctl.commands.report:report",
    "data": "hybridctl.commands.data:app",
    "eval": "hybridctl.commands.eval:eval_command",
    "generate": "hybridctl.commands.generate:generate",
    "export": "hybridctl.commands.export:export",
}


# The arguments of the command being run: `train --gpus N` starts itself again with them under torchrun.
current_args: list[str] = []


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def register(app: typer.Typer, name: str, obj, origin: str) -> bool:
    if isinstance(obj, typer.Typer):
        app.add_typer(obj, name=name)
    elif callable(obj):
        app.command(name=name)(obj)
    else:
        warn(f"plugin command '{name}' ({origin}) is neither a Typer app nor a function; skipping it")
        return False
    return True


def load_object(spec: str):
    module, _, attr = spec.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="hybridctl",
        help="A command-line lab for hybrid Gated DeltaNet + attention language models.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def main_options(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
        """Train, resume, sweep, compare, benchmark and report hybrid language models."""

    return register_entry_points(app, ENTRY_POINT_GROUP, BUILTIN_COMMANDS, kind="command")


def register_entry_points(app: typer.Typer, group: str, builtins: dict[str, str], kind: str) -> typer.Typer:
    """Add every entry point of `group` to app; built-ins missing from the metadata come from `builtins`."""
    seen: set[str] = set()
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        own = ep.value == builtins.get(ep.name) or getattr(getattr(ep, "dist", None), "name", None) == "hybridctl"
        if ep.name in builtins and not own:
            warn(f"plugin {kind} '{ep.name}' ({ep.value}) has the name of a built-in {kind}; skipping it (rename it in its entry point)")
            continue
        if ep.name in seen:
            continue
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not take the CLI down
            warn(f"plugin {kind} '{ep.name}' ({ep.value}) failed to load: {type(e).__name__}: {e}; skipping it")
            continue
        if register(app, ep.name, obj, ep.value):
            seen.add(ep.name)
    for name, spec in builtins.items():
        if name not in seen:
            register(app, name, load_object(spec), spec)
    return app


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def sigterm_unwinds():
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    with sigterm_unwinds():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = sys.argv[1:] if argv is None else argv
    current_args[:] = args
    debug = "--debug" in args
    try:
        app = build_app()
        result = app(args=args, prog_name="hybridctl", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except EXIT_ERRORS as e:
        return e.exit_code
    except ABORT_ERRORS:
        print("error: aborted", file=sys.stderr)
        return 130
    except Terminated as e:
        if processes.reports(e):
            print("error: stopped by SIGTERM", file=sys.stderr)
        return 143
    except USAGE_ERRORS as e:
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        print(f"error: {e.format_message()}{hint}", file=sys.stderr)
        return e.exit_code
    except HybridctlError as e:
        if processes.reports(e):
            if debug:
                traceback.print_exc()
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        if processes.reports(e):
            print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if processes.reports(e):
            if debug:
                traceback.print_exc()
            print(f"error: unexpected {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def run() -> None:
    sys.exit(main())
