"""Process-wide runtime settings at the bottom of the import graph: clean stops on SIGINT/SIGTERM and
deterministic kernels. Nothing here imports other obdprune modules except errors.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Iterator

import torch

from obdprune.errors import Interrupted

__all__ = ["check_stop", "stop_on_signals", "deterministic"]

_stop_signal: int | None = None


def check_stop() -> None:
    """Raise Interrupted if SIGINT/SIGTERM arrived inside :func:`stop_on_signals`. Call at step boundaries."""
    if _stop_signal is not None:
        raise Interrupted(_stop_signal)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM set a flag that :func:`check_stop` turns into Interrupted.

    A second signal interrupts at once. Outside the main thread (where handlers cannot be set) this is a
    no-op.
    """
    global _stop_signal
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        global _stop_signal
        if _stop_signal is not None:
            raise Interrupted(signum)
        _stop_signal = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _stop_signal = None
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _stop_signal = None


def deterministic() -> None:
    """Make torch pick deterministic kernels, so one seed gives the same bits on the same machine."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # we never read uninitialized memory; skip the cost
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
