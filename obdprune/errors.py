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


class OutputError(ObdpruneError, OSError):
    """Writing an output failed: no space left, permission denied, read-only file system, ... Exit code 1.

    Also an OSError, with ``errno``, ``strerror`` and ``filename`` (the path being written). Whatever was
    finished before the failure stays in place, so a resumable command can continue once the cause is fixed.
    """

    def __init__(self, errno: int, strerror: str, filename: str, hint: str = ""):
        OSError.__init__(self, errno, strerror, filename)
        self.hint = hint

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}" + (f"; {self.hint}" if self.hint else "")

    def __reduce__(self):
        return type(self), (self.errno, self.strerror, self.filename, self.hint)


class OutputBusyError(ObdpruneError):
    """Another process is writing the same output path (it holds the path's lock). Exit code 1."""

    def __init__(self, path, pid: int | None):
        super().__init__(path, pid)
        self.path, self.pid = path, pid

    def __str__(self) -> str:
        who = f"another obdprune process (pid {self.pid})" if self.pid else "another obdprune process"
        return f"{self.path} is being written by {who}; wait for it to finish or choose another path"


class OutputExistsError(UsageError):
    """The output path already holds something that may only be replaced with ``overwrite=True``. Exit code 2.

    ``what`` describes what is there; ``resumable`` says whether it holds a run that ``resume=True`` continues.
    The message names the Python parameters; the command line phrases its own (``--overwrite``, ``--resume``).
    """

    def __init__(self, path, what: str, *, resumable: bool = False):
        super().__init__(path, what, resumable)
        self.path, self.what, self.resumable = path, what, resumable

    def __str__(self) -> str:
        fix = "choose another path, resume it with resume=True," if self.resumable else "choose another path"
        return f"{self.path} already holds {self.what}; {fix} or pass overwrite=True to replace it"


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
