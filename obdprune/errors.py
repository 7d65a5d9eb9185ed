"""Errors a user can cause. The CLI prints them as one line and exits with their code."""
from __future__ import annotations


class ObdpruneError(Exception):
    """A runtime problem the user can fix (bad file, NaN loss, ...). Exit code 1."""

    exit_code = 1


class UsageError(ObdpruneError, ValueError):
    """Bad arguments or options, with a hint how to fix them. Exit code 2 on the command line.

    A ValueError, so ``except ValueError`` in user code catches it too.
    """

    exit_code = 2


class DataError(ObdpruneError):
    """A dataset file is missing, truncated or malformed. The message names the file."""


class ModelFileError(ObdpruneError):
    """A model file or manifest is unsafe, junk, truncated or inconsistent."""


class TrainingDiverged(ObdpruneError):
    """The loss became NaN or infinite."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; raised at the next step boundary. Exit code 128 + signal number.

    Not an ObdpruneError, so library code that handles user errors never swallows it.
    """

    def __init__(self, signum: int, hint: str = ""):
        super().__init__(signum)
        self.signum = signum
        self.hint = hint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        import signal

        name = signal.Signals(self.signum).name
        return f"interrupted by {name} at a step boundary" + (f"; {self.hint}" if self.hint else "")
