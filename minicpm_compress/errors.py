"""The kinds of failure a user sees, each with its own exit code (documented in the README).

    2  bad input or an impossible request (CompressError)
    3  an accuracy gate failed (GateFailure)
    4  the machine lacks the memory or disk the run needs (ResourceError)
    130 / 143  interrupted by SIGINT / SIGTERM (Interrupted)
"""


class CompressError(Exception):
    """Bad input or an impossible request: one line that names the file, key or tensor. Exit code 2."""

    exit_code = 2


class DestinationBusy(CompressError):
    """Another live run holds the lock of the output folder (or cache entry) this one would write."""


class SettingError(ValueError):
    """A check across several settings that blames one of them (`key`): a recipe error shows it at that key,
    as if the key's own type had refused the value."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class GateFailure(CompressError):
    """A stage's accuracy gate was exceeded; nothing after it ran. Exit code 3.

    `record_dir` is the folder holding the failed run's manifest and report (no artifacts)."""

    exit_code = 3

    def __init__(self, message: str, record_dir=None):
        super().__init__(message)
        self.record_dir = record_dir


class ResourceError(CompressError):
    """Not enough memory or disk for what was asked (estimated before starting, or hit while writing). Exit code 4."""

    exit_code = 4


class Interrupted(BaseException):
    """SIGTERM, raised where the process is so that every staging folder is cleaned up (like KeyboardInterrupt)."""

    exit_code = 143
