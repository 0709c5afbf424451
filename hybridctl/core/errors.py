"""User-facing errors: the CLI prints their message as one line and exits non-zero, without a traceback."""

import difflib


class HybridctlError(Exception):
    """A problem the user can fix; the message names it and says how."""

    exit_code = 1


class ConfigError(HybridctlError):
    pass


class DataError(HybridctlError):
    pass


class CheckpointError(HybridctlError):
    pass


class RunError(HybridctlError):
    pass


class TrainingError(HybridctlError):
    pass


class Diverged(TrainingError):
    """The run's loss stopped being finite: training ended there, summary.json says "diverged", and the exit code
    (3) tells a script that the run is a result, not a failure to run. `problem` is what was seen, without the
    advice (a sweep gives its own); `step` the first step whose loss was not finite."""

    exit_code = 3

    def __init__(self, message: str, problem: str, step: int):
        super().__init__(message)
        self.problem, self.step = problem, step


class Terminated(BaseException):
    """SIGTERM outside the training loop (which saves a checkpoint first): unwinds the stack, so the cleanup of
    half-written files runs, where the default action would kill the process on the spot. Not a KeyboardInterrupt,
    which Typer turns into a silent exit."""


def suggest(word: str, choices) -> str:
    """A ' (did you mean ...?)' hint for an error message, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
