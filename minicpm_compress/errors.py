"""The two kinds of failure a user sees, each with its own exit code."""


class CompressError(Exception):
    """Bad input or an impossible request: one line that names the file, key or tensor. Exit code 2."""

    exit_code = 2


class GateFailure(CompressError):
    """A stage's accuracy gate was exceeded; nothing after it ran. Exit code 3."""

    exit_code = 3
