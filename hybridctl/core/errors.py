"""User-facing errors: the CLI prints their message as one line and exits non-zero, without a traceback."""


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
