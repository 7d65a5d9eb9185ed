"""Resumable commands: a stage record plus safetensors snapshots, deterministic mode, and clean stops.

A resumable command (``compare``, ``prune``) keeps its progress in a state folder:

- ``state.json``: the command, its normalized arguments, and every finished stage with what it produced;
- ``checkpoints/<stage>-r<round>.safetensors``: the newest snapshot of a pruning path in progress
  (weights, masks, the sampling generator, the results so far), written after every round.

Every file is written atomically, and ``state.json`` is rewritten only after the snapshot it points to is
complete, so a ``kill -9`` at any moment leaves a consistent record: ``--resume`` skips the finished
stages and restarts the round that was running. SIGINT/SIGTERM only set a flag; training checks it
between steps and after every saved stage, and raises :class:`~obdprune.errors.Interrupted`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from obdprune.atomic import atomic_write, atomic_write_json
from obdprune.errors import ModelFileError, OutputExistsError, UsageError
from obdprune.masking import MaskSet
from obdprune.runtime import check_stop

__all__ = ["StudyState", "RoundStore", "RoundState", "normalized_args", "STATE_FILE"]

STATE_FILE = "state.json"
CHECKPOINTS = "checkpoints"
FORMAT = "obdprune-state"
ROUND_FORMAT = "obdprune-round"
# Arguments that change neither what is computed nor where it goes: resuming may change them.
IGNORED_ARGS = frozenset({"resume", "overwrite", "no_progress", "threads"})
PATH_ARGS = ("out", "data_dir", "run")

# ---------------------------------------------------------------------------------------------- arguments


def normalized_args(args: argparse.Namespace | dict) -> dict[str, Any]:
    """The arguments that define a command's results, JSON-able, with paths made absolute."""
    d = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    out = {}
    for k, v in sorted(d.items()):
        if k in IGNORED_ARGS:
            continue
        if k in PATH_ARGS and v is not None:
            v = os.path.abspath(os.fspath(v))
        out[k] = v
    return json.loads(json.dumps(out))


def _show(v: Any) -> str:
    if v is None:
        return "(not given)"
    if isinstance(v, list):
        return " ".join(map(str, v)) or "(none)"
    return str(v)


def argument_differences(old: dict, new: dict) -> list[str]:
    """``--name NEW (was OLD)`` for every argument that differs."""
    return [f"--{k.replace('_', '-')} {_show(new.get(k))} (was {_show(old.get(k))})"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


# ---------------------------------------------------------------------------------------------- rounds


@dataclass
class RoundState:
    """Where one method's pruning path stands after a finished round (round 0: after pre-round training).

    ``results`` and ``held`` are :class:`obdprune.methods.PrunePoint` objects with their state_dicts
    and masks.
    """

    round: int
    model_state: dict[str, torch.Tensor]
    masks: MaskSet
    generator_state: torch.Tensor
    results: list
    held: Any
    failed: bool
    stop: bool
    curvature_seconds: float
    seconds: float
    l1_search: dict | None = None
    val_history: list[float] = field(default_factory=list)


def _put(tensors: dict[str, torch.Tensor], prefix: str, state: dict[str, torch.Tensor], masks: MaskSet) -> None:
    for k, v in state.items():
        tensors[f"{prefix}model/{k}"] = v.detach().cpu().clone().contiguous()
    for k, m in masks.items():
        tensors[f"{prefix}mask/{k}"] = m.detach().cpu().to(torch.uint8).contiguous()


def _take(tensors: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], MaskSet]:
    state = {k[len(prefix) + 6:]: v for k, v in tensors.items() if k.startswith(prefix + "model/")}
    masks = {k[len(prefix) + 5:]: v != 0 for k, v in tensors.items() if k.startswith(prefix + "mask/")}
    return state, MaskSet(masks)


class RoundStore:
    """Round snapshots of one stage of a :class:`StudyState`; what ``prune_model(checkpoint=...)`` takes."""

    def __init__(self, state: "StudyState", key: str):
        self.state, self.key = state, key

    def branch(self, name: str) -> "RoundStore":
        """The store of a second path of the same stage (``stage:name``); it goes when the stage finishes."""
        return RoundStore(self.state, f"{self.key}:{name}")

    def load(self) -> RoundState | None:
        """The newest saved round, or None when the path has not started."""
        from obdprune.methods import PrunePoint

        name = self.state.round_files.get(self.key)
        if name is None:
            return None
        path = self.state.folder / name
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {})["round_state"])
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            state, masks = _take(tensors, "")

            def result(i: int | str, d: dict) -> PrunePoint:
                sd, m = _take(tensors, f"{i}/")
                return PrunePoint(**d, state_dict=sd, masks=m)

            return RoundState(
                round=int(meta["round"]), model_state=state, masks=masks, generator_state=tensors["generator"],
                results=[result(f"result{i}", d) for i, d in enumerate(meta["results"])],
                held=result("held", meta["held"]) if meta["held"] is not None else None,
                failed=bool(meta["failed"]), stop=bool(meta["stop"]),
                curvature_seconds=float(meta["curvature_seconds"]), seconds=float(meta["seconds"]),
                l1_search=meta.get("l1_search"), val_history=[float(v) for v in meta.get("val_history", [])])
        except (SafetensorError, OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise ModelFileError(f"{path}: unreadable round snapshot ({e}); delete {self.state.folder} to start "
                                 f"over") from None

    def save(self, st: RoundState) -> None:
        """Write the snapshot, then point state.json at it, then drop the previous one."""
        tensors: dict[str, torch.Tensor] = {"generator": st.generator_state.detach().cpu().clone()}
        _put(tensors, "", st.model_state, st.masks)
        for i, r in enumerate(st.results):
            _put(tensors, f"result{i}/", r.state_dict, r.masks)
        if st.held is not None:
            _put(tensors, "held/", st.held.state_dict, st.held.masks)
        meta = {"round": st.round, "failed": st.failed, "stop": st.stop,
                "curvature_seconds": st.curvature_seconds, "seconds": st.seconds,
                "results": [r.to_dict() for r in st.results],
                "held": st.held.to_dict() if st.held is not None else None, "l1_search": st.l1_search,
                "val_history": list(st.val_history)}
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.key)
        name = f"{CHECKPOINTS}/{slug}-r{st.round:04d}.safetensors"
        atomic_write(self.state.folder / name, lambda tmp: save_file(
            tensors, str(tmp), metadata={"format": ROUND_FORMAT, "round_state": json.dumps(meta)}))
        old = self.state.round_files.get(self.key)
        self.state.round_files[self.key] = name
        self.state.write()
        if old and old != name:
            (self.state.folder / old).unlink(missing_ok=True)
        check_stop()


# ---------------------------------------------------------------------------------------------- stages


class StudyState:
    """The stage record of a resumable command in ``folder``: ``state.json`` plus round snapshots.

    Nothing is written until the first stage finishes, so a command that fails early leaves no state.
    """

    def __init__(self, folder: str | Path, command: str, args: dict, stages: dict | None = None,
                 round_files: dict | None = None):
        self.folder = Path(folder)
        self.command, self.args = command, args
        self.stages: dict[str, Any] = dict(stages or {})
        self.round_files: dict[str, str] = dict(round_files or {})
        self.status = "running"

    @property
    def path(self) -> Path:
        return self.folder / STATE_FILE

    @classmethod
    def open(cls, folder: str | Path, command: str, args: dict, *, resume: bool) -> "StudyState":
        """Start a fresh record, or continue the one in ``folder`` (``resume``) if the arguments match.

        Without ``resume``, a folder holding a record is refused: finished work is never overwritten.
        """
        folder = Path(folder)
        path = folder / STATE_FILE
        if not path.exists():
            return cls(folder, command, args)
        if not resume:
            raise OutputExistsError(folder, f"an earlier {command} run ({STATE_FILE})", resumable=True)
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            if rec.get("format") != FORMAT:
                raise ValueError(f"format is not {FORMAT!r}")
            stages, round_files, old_args = dict(rec["stages"]), dict(rec["rounds"]), dict(rec["args"])
            old_command = str(rec["command"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelFileError(f"{path} is not a readable obdprune state record ({e}); choose another output folder") from None
        if old_command != command:
            raise UsageError(f"{folder} holds an `obdprune {old_command}` run, not `{command}`; choose another output folder")
        diffs = argument_differences(old_args, args)
        if diffs:
            raise UsageError(f"cannot resume {folder}: it was started with other arguments: {'; '.join(diffs)}. "
                             f"Rerun with the original arguments, or choose another output folder")
        _remove_stale_partials(folder)
        return cls(folder, command, args, stages, round_files)

    def done(self, stage: str) -> Any:
        """What a finished stage recorded, or None if it has not finished."""
        return self.stages.get(stage)

    def rounds(self, key: str) -> RoundStore:
        return RoundStore(self, key)

    def finish(self, stage: str, value: Any = True) -> None:
        """Record ``stage`` as finished (its round snapshots go), then stop here if a signal came."""
        self.stages[stage] = value
        old = [self.round_files.pop(k) for k in list(self.round_files) if k == stage or k.startswith(f"{stage}:")]
        self.write()
        for name in old:
            (self.folder / name).unlink(missing_ok=True)
        check_stop()

    def complete(self) -> None:
        self.status = "complete"
        self.round_files.clear()
        self.write()
        shutil.rmtree(self.folder / CHECKPOINTS, ignore_errors=True)

    def write(self) -> None:
        from obdprune.runfile import versions

        atomic_write_json(self.path, {
            "format": FORMAT, "command": self.command, "status": self.status, "args": self.args,
            "stages": self.stages, "rounds": self.round_files, "versions": versions()})


def _remove_stale_partials(folder: Path) -> None:
    """Temp files and folders a killed process left, in our own output folder and its direct subfolders."""
    parents = [folder, *(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))]
    for parent in parents:
        for p in parent.iterdir():
            if p.name.startswith(".") and p.name.endswith((".partial", ".tmp")):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):  # best effort: a read-only disk fails at the next write
                        p.unlink(missing_ok=True)
