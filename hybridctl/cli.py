"""The `hybridctl` command: a Typer app whose subcommands, built-in and third-party alike, are found through
the entry-point group `hybridctl.commands` (value: a Typer app, or a function to register as a command).

Exit codes, the same in every command (docs/cli.md):
  0    done (bare `hybridctl` and `--help` print the help and exit 0)
  1    an error: bad input the message says how to fix (HybridctlError), or an unexpected failure
  2    a usage error: an unknown option, a missing or malformed argument
  3    a training run diverged (train, resume): recorded as such in its summary.json, a result rather than a failure
  130  interrupted (Ctrl-C); a training run saves a checkpoint first
  141  the output was closed (`hybridctl ... | head`): the command went on without printing, its files written;
       a training run saves a checkpoint and stops (core/streams.py)
  143  stopped by SIGTERM (a scheduler's or `kill`'s); a training run saves a checkpoint first
Errors print one line; `--debug` anywhere on the line (or HYBRIDCTL_DEBUG=1) adds the traceback. Under torchrun
an error is printed by one process only (see core/training/processes.py).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import signal
import sys
import traceback
from importlib.metadata import entry_points

import click
import typer
import typer.core

from hybridctl import __version__
from hybridctl.core import streams
from hybridctl.core.training import processes
from hybridctl.core.errors import HybridctlError, Terminated

ENTRY_POINT_GROUP = "hybridctl.commands"

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_SIGTERM = 1, 2, 130, 143

# Newer Typer releases carry their own copy of click, whose exceptions do not derive from click's: catch both.
EXIT_ERRORS = (click.exceptions.Exit, typer.Exit)
ABORT_ERRORS = (click.exceptions.Abort, typer.Abort)
USAGE_ERRORS = (click.ClickException, getattr(typer.exceptions, "TyperException", click.ClickException))

# The built-in commands, in the order a user meets them (--help lists them so; plugins follow, by name). Also what
# runs when the package comes from a source tree that was never installed (no entry-point metadata).
BUILTIN_COMMANDS = {
    "train": "hybridctl.commands.train:train",
    "resume": "hybridctl.commands.resume:resume",
    "ablate": "hybridctl.commands.ablate:app",
    "compare": "hybridctl.commands.compare:compare",
    "report": "hybridctl.commands.report:report",
    "bench": "hybridctl.commands.bench:app",
    "data": "hybridctl.commands.data:app",
    "eval": "hybridctl.commands.eval:eval_command",
    "generate": "hybridctl.commands.generate:generate",
    "export": "hybridctl.commands.export:export",
}

DEBUG_FLAG, DEBUG_ENV = "--debug", "HYBRIDCTL_DEBUG"

# The arguments of the command being run: `train --gpus N` starts itself again with them under torchrun.
current_args: list[str] = []


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def quiet_help_types() -> None:
    """Recent Typer releases print a type after every parameter in the rich help: `<bool>` after flags, which take
    no value, and `<list[Path]>` after arguments, whose name (RUN, RUN_OR_SWEEP...) says what they take. Show
    neither. (Older releases print nothing there; the patch is skipped where the method does not exist.)"""
    for name, quiet in (("TyperOption", lambda p: getattr(p, "is_flag", False)),
                        ("TyperArgument", lambda p: p.metavar is not None)):
        cls = getattr(typer.core, name, None)
        shown = getattr(cls, "display_type_rich", None)
        if shown is None or getattr(shown, "quiet_types", False):
            continue

        def display_type_rich(self, ctx, shown=shown, quiet=quiet):
            return None if quiet(self) else shown(self, ctx)

        display_type_rich.quiet_types = True
        cls.display_type_rich = display_type_rich


def commands_in_order(builtins: dict[str, str]) -> type:
    """A Typer group that lists the built-ins in the order of `builtins`, then plugins by name."""
    rank = {name: i for i, name in enumerate(builtins)}

    class OrderedGroup(typer.core.TyperGroup):
        def list_commands(self, ctx):
            return sorted(super().list_commands(ctx), key=lambda name: (rank.get(name, len(rank)), name))

    return OrderedGroup


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


def show_version(value: bool) -> None:
    if value:
        print(f"hybridctl {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    quiet_help_types()
    app = typer.Typer(
        name="hybridctl",
        cls=commands_in_order(BUILTIN_COMMANDS),
        help="A command-line lab for hybrid Gated DeltaNet + attention language models.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def main_options(
        debug: bool = typer.Option(False, DEBUG_FLAG, help=f"Show full tracebacks on errors (anywhere on the line; or {DEBUG_ENV}=1)."),
        version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True, help="Print the version and exit."),
    ):
        """Train, resume, sweep, compare, benchmark and report hybrid language models."""

    return register_entry_points(app, ENTRY_POINT_GROUP, BUILTIN_COMMANDS, kind="command")


def register_entry_points(app: typer.Typer, group: str, builtins: dict[str, str], kind: str) -> typer.Typer:
    """Add the built-ins (from `builtins`, in its order), then every other entry point of `group` (by name).
    An entry point of another package that takes a built-in's name is refused with a warning."""
    for name, spec in builtins.items():
        register(app, name, load_object(spec), spec)
    seen = set(builtins)
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        own = ep.value == builtins.get(ep.name) or getattr(getattr(ep, "dist", None), "name", None) == "hybridctl"
        if ep.name in builtins and not own:
            warn(f"plugin {kind} '{ep.name}' ({ep.value}) has the name of a built-in {kind}; skipping it (rename it in its entry point)")
            continue
        if own or ep.name in seen:  # the package's own entry points are the built-ins (stale metadata lists more)
            continue
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not take the CLI down
            warn(f"plugin {kind} '{ep.name}' ({ep.value}) failed to load: {type(e).__name__}: {e}; skipping it")
            continue
        if register(app, ep.name, obj, ep.value):
            seen.add(ep.name)
    return app


def _raise_terminated(signum, frame):
    raise Terminated


interrupted: list[int] = []  # SIGINTs that reached the CLI's own handler (a training run handles its own)


def _note_interrupt(signum, frame):
    interrupted.append(signum)
    signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as without this handler


@contextlib.contextmanager
def signals_unwind():
    """SIGTERM raises Terminated; SIGINT raises KeyboardInterrupt as usual and is noted, since Typer turns a
    KeyboardInterrupt inside a command into a silent exit code 130."""
    try:
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated),
                    signal.SIGINT: signal.signal(signal.SIGINT, _note_interrupt)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    with signals_unwind(), streams.pipe_safe():
        code = _main(argv)
        streams.flush()  # output still buffered: a pipe closed before its end counts too
        return streams.EXIT_PIPE if code == 0 and streams.closed() else code


def split_debug(args: list[str]) -> tuple[list[str], bool]:
    """The arguments without --debug, and whether it (or HYBRIDCTL_DEBUG=1) asked for tracebacks."""
    rest = [a for a in args if a != DEBUG_FLAG]
    return rest, len(rest) < len(args) or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def _main(argv: list[str] | None) -> int:
    args, debug = split_debug(sys.argv[1:] if argv is None else list(argv))
    if not args:
        args = ["--help"]  # a bare `hybridctl` asks what there is
    current_args[:] = ([DEBUG_FLAG] if debug else []) + args
    try:
        app = build_app()
        interrupted.clear()
        result = app(args=args, prog_name="hybridctl", standalone_mode=False)
        if result == EXIT_INTERRUPTED and interrupted and processes.reports(KeyboardInterrupt()):
            print("error: interrupted", file=sys.stderr)  # what Typer left unsaid
        return result if isinstance(result, int) else 0
    except EXIT_ERRORS as e:
        return e.exit_code
    except ABORT_ERRORS:
        print("error: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated as e:
        if processes.reports(e):
            print("error: stopped by SIGTERM", file=sys.stderr)
        return EXIT_SIGTERM
    except USAGE_ERRORS as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `hybridctl bench`: the help is the answer, not an error
            message = e.format_message()  # empty where Typer's rich help has printed itself already
            if message.strip():
                print(message)
            return 0
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        print(f"error: {usage_message(e)}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except HybridctlError as e:
        if processes.reports(e):
            if debug:
                traceback.print_exc()
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        if processes.reports(e):
            print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except streams.OutputClosed:
        return streams.EXIT_PIPE
    except Exception as e:
        if isinstance(e, BrokenPipeError) and streams.silence_closed():  # a stream kept from before pipe_safe()
            return streams.EXIT_PIPE
        if processes.reports(e):
            if debug:
                traceback.print_exc()
            print(f"error: unexpected {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR


def usage_message(e: Exception) -> str:
    """A usage error's message; an unknown option suggests only the command's options that are close to it."""
    ctx = getattr(e, "ctx", None)
    if type(e).__name__ != "NoSuchOption" or ctx is None:
        return e.format_message()
    near = close_options(e.option_name, ctx.command)
    return e.message + (f"; did you mean {' or '.join(near)}?" if near else "")


def close_options(name: str, command) -> list[str]:
    """The command's long options that look like a mistyped `name`, closest first. Compared without their dashes,
    which make any two options look alike (click's own suggestions offer --gpus and --out for --bogus)."""
    options = {o.lstrip("-"): o for param in command.params for o in (*param.opts, *param.secondary_opts)
               if o.startswith("--")}
    return [options[m] for m in difflib.get_close_matches(name.lstrip("-"), options, n=3, cutoff=0.7)]


def run() -> None:
    sys.exit(main())
