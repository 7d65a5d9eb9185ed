"""Output targets: claim a path, refuse to replace what was not meant to be replaced, publish results whole.

Every command that writes an output goes through one of these, and so can a script:

- :class:`OutputTarget` (``claim_output``): a run folder or a file. The path is locked for this process
  (:class:`~obdprune.atomic.OutputLock`: a second claim of the same path, from any process, fails at once
  with :class:`~obdprune.errors.OutputBusyError`), and an existing output is refused with
  :class:`~obdprune.errors.OutputExistsError` unless ``overwrite=True``. The writer itself (``save_run``,
  ``export_onnx``, ...) replaces the path atomically; the lock is checked again at that final rename.
- :class:`StudyFolder`: a study written in place and resumable through its ``state.json``
  (:class:`~obdprune.checkpoint.StudyState`); ``resume=True`` continues it, ``overwrite=True`` starts over.
- :class:`ResultsFolder`: results assembled in the hidden work folder ``.NAME.work`` beside the path, with
  their own ``state.json`` and round snapshots, and moved onto the path whole by :meth:`ResultsFolder.publish`
  (one run folder, or a folder of run folders with ``summary.json``). The old output is replaced only then.

Only outputs obdprune writes are ever replaced: a file where a folder belongs, a folder where a file
belongs, or a non-empty folder holding none of obdprune's files is refused even with ``overwrite=True``.
An I/O failure while writing (disk full, permission denied, read-only file system) raises
:class:`~obdprune.errors.OutputError` naming the path and keeps every finished stage and round, so the
same call with ``resume=True`` continues once the cause is fixed.

Example::

    from obdprune.outputs import ResultsFolder
    with ResultsFolder("runs/obd", "prune", {"sparsity": [0.5, 0.8]}, resume=True) as folder:
        results = prune_dense(run, data, cfg, targets=[0.5, 0.8], out_dir=folder.runs,
                              checkpoint=folder.state.rounds("prune:obd"))
        folder.publish(results, single=False, summary={"dense": run.manifest["metrics"]})
"""
from __future__ import annotations

import contextlib
import enum
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from obdprune.atomic import OutputLock, new_sibling_folder, replace_folder, writing
from obdprune.checkpoint import STATE_FILE, RoundStore, StudyState
from obdprune.runtime import check_stop
from obdprune.errors import ObdpruneError, OutputBusyError, OutputError, OutputExistsError, UsageError

__all__ = ["OutputKind", "OutputTarget", "StudyFolder", "ResultsFolder", "claim_output", "existing_output",
           "OUTPUT_MARKERS", "shared_output", "FollowerOutput"]

# A folder holding any of these was written by obdprune: a run folder, a study, or a folder of runs.
OUTPUT_MARKERS = {"manifest.json": "an obdprune run folder", "model.safetensors": "an obdprune run folder",
                  STATE_FILE: "an obdprune study (with its state.json)",
                  "summary.json": "an obdprune results folder (with its summary.json)",
                  "web.json": "an obdprune web page folder (with its web.json)"}
SUMMARY_FILE = "summary.json"
PUBLISH_STAGE = "publish"  # recorded in a ResultsFolder's state right before its results move onto the path


class OutputKind(enum.Enum):
    """What an output path holds."""

    RUN = "run"          # a run folder: model.safetensors + manifest.json (train, import-torch, export safetensors)
    RESULTS = "results"  # a run folder, or a folder of run folders with summary.json (prune)
    STUDY = "study"      # a folder written in place, resumable through state.json (compare)
    FILE = "file"        # one file (export onnx, sparse)
    WEB = "web"          # a static web page folder (export web)

    @classmethod
    def parse(cls, value: "OutputKind | str") -> "OutputKind":
        try:
            return value if isinstance(value, cls) else cls(value)
        except ValueError:
            raise UsageError(f"unknown output kind {value!r}; choose one of: "
                             f"{', '.join(k.value for k in cls)}") from None


def existing_output(path: str | os.PathLike, kind: OutputKind | str = OutputKind.RUN) -> str | None:
    """Describe what writing ``kind`` at ``path`` would replace, or None when nothing would be.

    None for a missing path (and for an empty folder where a folder goes). Raises UsageError for what is
    never replaced: a folder where a file goes, a file where a folder goes, a non-empty folder without
    obdprune's files.

    >>> existing_output("/nonexistent/run") is None
    True
    """
    path, kind = Path(path), OutputKind.parse(kind)
    if not os.path.lexists(path):
        return None
    if kind is OutputKind.FILE:
        if path.is_dir():
            raise UsageError(f"{path} is a folder; give the path of a file to write")
        return "a file"
    if not path.is_dir():
        raise UsageError(f"{path} is a file; give the path of a folder to write")
    names = {p.name for p in path.iterdir()}
    if not names:
        return None
    for marker, what in OUTPUT_MARKERS.items():
        if marker in names:
            return what
    if any((path / n / "manifest.json").is_file() for n in names):  # a study whose state was never recorded
        return "a folder of obdprune run folders"
    raise UsageError(f"{path} exists and is not an obdprune output folder; choose a new or empty folder")


def _make_parents(path: Path) -> list[Path]:
    """Create the missing folders above ``path``; returns them, outermost first. UsageError if impossible."""
    missing = []
    probe = path.parent
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot write {path}: {probe} is not a folder")
    missing.reverse()
    for folder in missing:
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            _remove_empty(missing)
            raise UsageError(f"cannot write {path}: {probe} is not a writable folder ({e.strerror})") from None
    return missing


def _remove_empty(folders: Sequence[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def _remove_folder(path: Path) -> None:
    """Delete an output folder: moved aside first, so a crash never leaves half of it at ``path``."""
    with writing(path):
        aside = new_sibling_folder(path, "old")
        os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


class OutputTarget:
    """``path`` claimed for writing by this process: locked, and checked against replacing an existing output.

    Use it as a context manager around the work that writes ``path``. On entry, the hidden lock file
    ``.NAME.lock`` beside ``path`` is taken (OutputBusyError at once if another process holds it) and an
    existing output at ``path`` is refused unless ``overwrite`` (OutputExistsError; see
    :func:`existing_output` for what is never replaced). A folder that cannot be written gives UsageError.
    Writers that replace ``path`` check the lock again at their final rename. On exit the lock is released.

    Example::

        with OutputTarget("runs/dense", "run", overwrite=False):
            save_run("runs/dense", model, manifest)
    """

    def __init__(self, path: str | os.PathLike, kind: OutputKind | str = OutputKind.RUN, *,
                 overwrite: bool = False):
        self.path = Path(path)
        self.kind = OutputKind.parse(kind)
        self.overwrite = bool(overwrite)
        self.lock: OutputLock | None = None
        self._created: list[Path] = []
        if not self.path.name or self.path.name in (".", ".."):
            raise UsageError(f"{path}: give a path that names the output, not {path!r}")

    def __enter__(self) -> "OutputTarget":
        self._created = _make_parents(self.path)
        lock = OutputLock(self.path, may_replace=self.overwrite)
        try:
            lock.acquire()
        except OutputBusyError:
            _remove_empty(self._created)
            raise
        except OSError as e:
            _remove_empty(self._created)
            raise UsageError(f"cannot write {self.path}: {self.path.parent} is not a writable folder "
                             f"({e.strerror})") from None
        self.lock = lock
        try:
            self._check()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._release()

    def _check(self) -> None:
        """Refuse an existing output unless ``overwrite``. Runs with the lock held."""
        what = existing_output(self.path, self.kind)
        if what is not None and not self.overwrite:
            raise OutputExistsError(self.path, what)

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        _remove_empty(self._created)


def claim_output(path: str | os.PathLike, kind: OutputKind | str = OutputKind.RUN, *,
                 overwrite: bool = False) -> OutputTarget:
    """Claim ``path`` for one output of ``kind`` (``run``, ``file``); a context manager, see :class:`OutputTarget`.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "model.onnx"
    >>> with claim_output(out, "file"):
    ...     _ = out.write_bytes(b"onnx")
    >>> with claim_output(out, "file"):  # doctest: +ELLIPSIS
    ...     pass
    Traceback (most recent call last):
    obdprune.errors.OutputExistsError: ... already holds a file; choose another path or pass overwrite=True to replace it
    """
    return OutputTarget(path, kind, overwrite=overwrite)


class StudyFolder(OutputTarget):
    """A resumable study written in place: its stages are recorded in ``path/state.json`` (:attr:`state`).

    With ``resume`` a recorded study continues (its arguments must match ``args``); with ``overwrite`` an
    existing output at ``path`` is deleted on entry and the study starts over; with neither, an existing
    output is refused. ``command`` and ``args`` are what :class:`StudyState` records.
    """

    def __init__(self, path: str | os.PathLike, command: str, args: dict[str, Any], *, overwrite: bool = False,
                 resume: bool = False):
        super().__init__(path, OutputKind.STUDY, overwrite=overwrite)
        self.command, self.args, self.resume = command, args, bool(resume)
        self.state: StudyState | None = None

    def _check(self) -> None:
        recorded = (self.path / STATE_FILE).is_file()
        if not (self.resume and recorded):
            what = existing_output(self.path, self.kind)
            if what is not None:
                if not self.overwrite:
                    raise OutputExistsError(self.path, what, resumable=recorded)
                _remove_folder(self.path)
        self.state = StudyState.open(self.path, self.command, self.args, resume=self.resume)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc is not None and not (self.path / STATE_FILE).exists():
                shutil.rmtree(self.path, ignore_errors=True)  # nothing recorded: nothing a resume could use
        finally:
            self._release()


class ResultsFolder(OutputTarget):
    """Results built in the hidden work folder ``.NAME.work`` beside ``path``, then moved onto ``path`` whole.

    :attr:`state` is a :class:`StudyState` in the work folder (finished stages, round snapshots) and
    :attr:`runs` the folder where the run folders go. :meth:`publish` moves them into place and removes the
    work folder. Until then an existing output at ``path`` is untouched.

    On entry: a recorded, unpublished run in the work folder continues with ``resume`` (``overwrite``
    without ``resume`` discards it); an existing output at ``path`` is refused unless ``overwrite``, or unless
    resuming a run that had already begun to publish. :meth:`run_stage` runs and records one stage.
    """

    def __init__(self, path: str | os.PathLike, command: str, args: dict[str, Any], *, overwrite: bool = False,
                 resume: bool = False):
        super().__init__(path, OutputKind.RESULTS, overwrite=overwrite)
        self.command, self.args, self.resume = command, args, bool(resume)
        self.work = self.path.parent / f".{self.path.name}.work"
        self.runs = self.work / "runs"
        self.state: StudyState | None = None

    def _check(self) -> None:
        recorded = (self.work / STATE_FILE).is_file()
        if recorded and not self.resume:
            if not self.overwrite:
                raise OutputExistsError(self.path, f"an interrupted run, kept in {self.work}", resumable=True)
            recorded = False
        if not recorded and self.work.exists():  # a run that failed before recording anything
            with writing(self.work):
                shutil.rmtree(self.work)
        self.state = StudyState.open(self.work, self.command, self.args, resume=self.resume)
        what = existing_output(self.path, self.kind)
        if what is not None and not self.overwrite and not self.state.done(PUBLISH_STAGE):
            raise OutputExistsError(self.path, what)

    def run_stage(self, stage: str, compute: Callable[[RoundStore], Any]) -> Any:
        """What ``stage`` recorded earlier, or ``compute(checkpoint)`` recorded as it.

        ``checkpoint`` keeps the stage's round snapshots. An interruption or an I/O failure (OutputError)
        keeps them for ``resume``; any other obdprune error, which a resume would repeat, deletes the work
        folder.
        """
        done = self.state.done(stage)
        if done is not None:
            return done
        try:
            value = compute(self.state.rounds(stage))
            self.state.finish(stage, value)
        except (OutputError, OutputBusyError, OutputExistsError):
            raise
        except ObdpruneError:
            self.discard()
            raise
        return value

    def discard(self) -> None:
        """Delete the work folder: what a resume would need is gone."""
        shutil.rmtree(self.work, ignore_errors=True)

    def publish(self, results: list[dict], *, single: bool, summary: dict[str, Any] | None = None) -> list[dict]:
        """Move the finished run folders (``results[i]['path']`` under :attr:`runs`) onto ``path``.

        ``single``: ``path`` becomes the one result's run folder. Otherwise ``path`` becomes a folder of run
        folders with ``summary.json`` = ``summary`` plus ``results``. Returns the results with their published
        paths. Safe to repeat after a kill: what was already moved is not moved again.
        """
        if single and len(results) != 1:
            raise UsageError(f"a single result was asked for, but there are {len(results)}")
        labels = [Path(r["path"]).name for r in results]
        results = [dict(r) for r in results]
        if single:
            src = self.runs / labels[0]
            results[0]["path"] = str(self.path)
        else:
            src = self.runs
            for r, label in zip(results, labels):
                r["path"] = str(self.path / label)
            if src.is_dir():
                from obdprune.report import write_summary

                write_summary(src / SUMMARY_FILE, {**(summary or {}), "results": results})
        self.state.finish(PUBLISH_STAGE, str(self.path))  # a resume after a kill here may replace ``path``
        if src.exists():  # else a killed earlier attempt already moved it
            replace_folder(src, self.path)
        self.discard()
        return results


# ---------------------------------------------------------------------------------------------- torchrun


class _FollowerRounds:
    """A rank other than 0 saves no round snapshot; on resume it gets rank 0's (see ``prune_model``)."""

    def load(self) -> None:
        return None

    def save(self, st: Any) -> None:
        check_stop()


class _FollowerState:
    """Rank 0's finished stages, as a rank other than 0 follows them; records nothing on disk."""

    def __init__(self, stages: dict[str, Any]):
        self.stages = dict(stages)

    def done(self, stage: str) -> Any:
        return self.stages.get(stage)

    def rounds(self, key: str) -> _FollowerRounds:
        return _FollowerRounds()

    def finish(self, stage: str, value: Any = True) -> None:
        self.stages[stage] = value
        check_stop()

    def complete(self) -> None:
        pass


class FollowerOutput:
    """What a rank other than 0 holds in place of rank 0's output: the same finished stages, no files.

    ``runs`` is None, so run folders are not written, and :meth:`publish` moves nothing.
    """

    def __init__(self, path: Path, stages: dict[str, Any]):
        self.path, self.state, self.runs, self.work = path, _FollowerState(stages), None, None

    def run_stage(self, stage: str, compute: Callable[[Any], Any]) -> Any:
        done = self.state.done(stage)
        if done is not None:
            return done
        value = compute(self.state.rounds(stage))
        self.state.finish(stage, value)
        return value

    def publish(self, results: list[dict], **_: Any) -> list[dict]:
        """The results as rank 0 publishes them; paths name the output rank 0 writes."""
        return [{**r, "path": r.get("path", str(self.path))} for r in results]


@contextlib.contextmanager
def shared_output(world: Any, make: Callable[[], OutputTarget]):
    """``make()`` entered on rank 0 (locks, checks, resume record) and a :class:`FollowerOutput` with rank 0's
    finished stages on the other ranks; one process: ``make()`` itself. If rank 0 cannot open its output,
    every rank raises.

    Example::

        with shared_output(world, lambda: ResultsFolder(out, "prune", args, resume=True)) as folder:
            results = folder.run_stage("prune:obd", lambda checkpoint: prune_dense(..., checkpoint=checkpoint))
    """
    from obdprune.distributed import broadcast_object

    if not world.distributed:
        with make() as target:
            yield target
        return
    if not world.writer:
        told = broadcast_object(world, None)
        if "error" in told:
            raise ObdpruneError(f"rank 0 could not open its output: {told['error']}")
        yield FollowerOutput(Path(told["path"]), told["stages"])
        return
    with contextlib.ExitStack() as stack:
        try:
            target = stack.enter_context(make())
        except BaseException as e:
            broadcast_object(world, {"error": str(e)})
            raise
        state = getattr(target, "state", None)
        broadcast_object(world, {"path": str(target.path), "stages": dict(state.stages) if state is not None else {}})
        yield target
