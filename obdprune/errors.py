"""Errors a user can cause. The CLI prints them as one line and exits with their code."""
from __future__ import annotations


class ObdpruneError(Exception):
    """A runtime problem the user can fix (bad file, NaN loss, ...). Exit code 1."""

    exit_code = 1


class UsageError(ObdpruneError):
    """Bad arguments or options. Exit code 2."""

    exit_code = 2


class DataError(ObdpruneError):
    """A dataset file is missing, truncated or malformed. The message names the file."""


class ModelFileError(ObdpruneError):
    """A model file or manifest is unsafe, junk, truncated or inconsistent."""


class TrainingDiverged(ObdpruneError):
    """The loss became NaN or infinite."""
