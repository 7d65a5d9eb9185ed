"""Outputs: no silent overwrite, one winner between concurrent writers, and one line plus a resumable state
when the disk fills up or turns read-only."""
import errno
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import obdprune
from obdprune import atomic
from obdprune.atomic import OutputLock, atomic_write_bytes, lock_path
from obdprune.checkpoint import RoundStore
from obdprune.cli import main
from obdprune.errors import OutputBusyError, OutputError, OutputExistsError, UsageError
from obdprune.outputs import ResultsFolder, claim_output, existing_output
from obdprune.runfile import save_run

DIGITS = ["--dataset", "digits"]
FAST = ["--reg-epochs", "0", "--finetune-epochs", "1", "--no-progress"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("obdprune: error:"), err
    return err


def _files(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("outputs") / "dense"
    assert main(["train", *DIGITS, "--model", "lenet300", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    return out


def _prune(dense: Path, out: Path, *sparsity: str) -> list[str]:
    return ["prune", str(dense), "--method", "magnitude", "--sparsity", *(sparsity or ("0.5", "0.8")), *FAST,
            "--out", str(out)]


# --------------------------------------------------------------------------------------- refuse / overwrite


def _state_dict_file(tmp_path: Path, dense: Path) -> Path:
    path = tmp_path / "sd.pt"
    torch.save(load_file(dense / "model.safetensors"), path)
    return path


COMMANDS = {  # name: (argv without --out, kind of output)
    "train": (lambda d, t: ["train", *DIGITS, "--model", "lenet300", "--epochs", "0", "--no-progress"], "folder"),
    "prune": (lambda d, t: _prune(d, Path("unused"), "0.5")[:-2], "folder"),
    "prune-several": (lambda d, t: _prune(d, Path("unused"))[:-2], "folder"),
    "compare": (lambda d, t: ["compare", *DIGITS, "--model", "lenet300", "--epochs", "0", "--sparsity", "0.5",
                              "--methods", "magnitude", "--no-measure", *FAST], "folder"),
    "export-onnx": (lambda d, t: ["export", str(d), "--format", "onnx", "--check-samples", "16"], "file"),
    "export-sparse": (lambda d, t: ["export", str(d), "--format", "sparse"], "file"),
    "export-safetensors": (lambda d, t: ["export", str(d), "--format", "safetensors"], "folder"),
    "import-torch": (lambda d, t: ["import-torch", str(_state_dict_file(t, d)), "--model", "lenet300", *DIGITS],
                     "folder"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_refuses_an_existing_out_and_replaces_it_with_overwrite(command, dense, tmp_path, capsys):
    make_argv, kind = COMMANDS[command]
    argv = make_argv(dense, tmp_path)
    out = tmp_path / "out"
    if kind == "file":
        out.write_bytes(b"an earlier export")
    else:
        shutil.copytree(dense, out)  # an earlier obdprune output, marked so its replacement shows
        (out / "earlier.txt").write_text("earlier")
    before = _files(out)
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 2
    err = _one_line(capsys)
    assert str(out) in err and "already holds" in err and "--overwrite" in err and "overwrite=True" not in err
    assert _files(out) == before
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0
    after = _files(out)
    assert after and after != before and "earlier.txt" not in after
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no lock or work left


def test_overwrite_never_replaces_what_obdprune_did_not_write(dense, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    for argv in (["train", *DIGITS, "--model", "lenet300", "--epochs", "0"], _prune(dense, notes)[:-2]):
        assert main([*argv, "--out", str(notes), "--overwrite", "--no-progress"]) == 2
        assert "not an obdprune output" in _one_line(capsys)
    assert main(["export", str(dense), "--format", "sparse", "--out", str(notes), "--overwrite"]) == 2
    assert "is a folder" in _one_line(capsys)
    assert (notes / "thesis.tex").read_text() == "years of work" and len(list(notes.iterdir())) == 1


def test_library_messages_name_python_parameters_not_flags(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="overwrite=True") as e:
        with claim_output(tmp_path / "m.onnx", "file"):
            pass
    assert "--" not in str(e.value) and isinstance(e.value, UsageError)
    assert existing_output(tmp_path / "nothing") is None and existing_output(tmp_path / "m.onnx", "file") == "a file"
    with claim_output(tmp_path / "m.onnx", "file", overwrite=True):
        atomic_write_bytes(tmp_path / "m.onnx", b"new")
    assert (tmp_path / "m.onnx").read_bytes() == b"new" and not lock_path(tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------------------- concurrent writers


# Two real processes run the command line; each imports everything, says it is ready, then waits for "go",
# so both reach --out at the same moment however slowly they started.
AT_ONCE = """
import pathlib, sys, time
import obdprune.cli, obdprune.outputs, obdprune.study
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.005)
sys.exit(obdprune.cli.main(sys.argv[3:]))
"""


def test_two_concurrent_prune_commands_one_wins_the_other_exits_with_one_line(dense, tmp_path):
    out, sync = tmp_path / "same", tmp_path / "sync"
    sync.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(obdprune.__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", AT_ONCE, str(sync / f"ready{i}"), str(sync / "go"),
                               *_prune(dense, out, "0.5"), "--threads", "1"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((sync / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    (sync / "go").touch()
    done = [(p.wait(timeout=300), p.stderr.read().strip()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert sorted(code for code, _ in done) == [0, 1], done
    err = next(e for code, e in done if code == 1)
    assert len(err.splitlines()) == 1 and "is being written by another obdprune process" in err, err
    assert (out / "manifest.json").exists() and (out / "masks.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same", "sync"]


def _hold(target: str, ready, release) -> None:
    with OutputLock(target):
        ready.set()
        release.wait(60)


@pytest.fixture
def held_elsewhere(tmp_path):
    """``tmp_path/target`` locked by another process until the test ends."""
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(str(tmp_path / "target"), ready, release))
    proc.start()
    assert ready.wait(60)
    yield tmp_path / "target"
    release.set()
    proc.join(60)


def test_a_locked_path_is_refused_at_claim_and_again_at_the_final_rename(held_elsewhere):
    target = held_elsewhere
    with pytest.raises(OutputBusyError, match=r"another obdprune process \(pid \d+\)"):
        with claim_output(target):
            pass
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(OutputBusyError):  # a writer that never claimed: refused at its final rename
        save_run(target, model, {"model": {"name": "lenet300", "input_shape": [1, 8, 8], "num_classes": 10}})
    with pytest.raises(OutputBusyError):
        atomic_write_bytes(target, b"x")
    assert not target.exists() and [p.name for p in target.parent.iterdir()] == [".target.lock"]


def test_a_lost_lock_or_a_new_file_stops_the_final_rename(tmp_path):
    target = tmp_path / "m.sparse"
    with claim_output(target, "file"):
        lock = lock_path(target)
        lock.unlink()
        lock.write_text("someone else's")  # as if another process deleted ours and took a new one
        with pytest.raises(OutputBusyError):
            atomic_write_bytes(target, b"mine")
    assert not target.exists()
    with claim_output(target, "file"):
        target.write_bytes(b"appeared meanwhile")
        with pytest.raises(OutputExistsError):
            atomic_write_bytes(target, b"mine")
    assert target.read_bytes() == b"appeared meanwhile"


# --------------------------------------------------------------------------------------- I/O failures


def _io_error(code: int) -> Exception:
    if code == errno.ENOSPC:  # what safetensors raises on a full disk
        return SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
    return OSError(code, os.strerror(code))


def _fail_round(monkeypatch, code: int, round_: int) -> None:
    """The snapshot of pruning round ``round_`` cannot be written."""
    import obdprune.checkpoint as checkpoint

    real = checkpoint.save_file

    def save_file(tensors, path, metadata=None):
        if f"-r{round_:04d}" in Path(path).name.split(".safetensors")[0]:
            raise _io_error(code)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file)


@pytest.fixture(scope="module")
def reference(dense, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "ref"
    assert main(_prune(dense, out)) == 0
    return out


def assert_same_runs(a: Path, b: Path) -> None:
    for label in ("magnitude-s0.5", "magnitude-s0.8"):
        for f in ("model.safetensors", "masks.safetensors"):
            ta, tb = load_file(a / label / f), load_file(b / label / f)
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_prune_io_failure_gives_one_line_then_resume_completes(code, dense, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "p"
    _fail_round(monkeypatch, code, 2)
    capsys.readouterr()
    assert main(_prune(dense, out)) == 1
    err = _one_line(capsys)
    assert os.strerror(code) in err and str(tmp_path / ".p.work") in err and "--resume" in err
    assert not out.exists() and (tmp_path / ".p.work" / "state.json").exists()
    monkeypatch.undo()
    assert main(_prune(dense, out)) == 2  # the interrupted run is not silently discarded
    assert "--resume" in _one_line(capsys)
    assert main([*_prune(dense, out), "--resume"]) == 0
    assert "round 1:" not in capsys.readouterr().out  # round 1 was kept, not redone
    assert_same_runs(reference, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_compare_io_failure_keeps_finished_stages_for_resume(tmp_path, monkeypatch, capsys):
    argv = ["compare", *DIGITS, "--model", "lenet300", "--epochs", "1", "--sparsity", "0.5", "--methods",
            "magnitude", "--no-measure", *FAST, "--out", str(tmp_path / "cmp")]
    _fail_round(monkeypatch, errno.ENOSPC, 1)
    assert main(argv) == 1
    err = _one_line(capsys)
    assert "No space left on device" in err and "--resume" in err
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    assert "dense: finished earlier" in capsys.readouterr().out
    assert (tmp_path / "cmp" / "summary.json").exists()


def test_train_and_export_io_failures_leave_the_earlier_output(dense, tmp_path, monkeypatch, capsys):
    import obdprune.export as export
    import obdprune.runfile as runfile

    def full(*args, **kw):
        raise _io_error(errno.ENOSPC)

    def full_os(*args, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runfile, "save_file", full)
    assert main(["train", *DIGITS, "--model", "lenet300", "--epochs", "0", "--out", str(tmp_path / "d"),
                 "--no-progress"]) == 1
    assert "No space left on device" in _one_line(capsys) and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(export.torch.onnx, "export", full_os)
    (tmp_path / "m.onnx").write_bytes(b"earlier")
    assert main(["export", str(dense), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--overwrite"]) == 1
    assert f"cannot write {tmp_path / 'm.onnx'}: No space left on device" in _one_line(capsys)
    assert (tmp_path / "m.onnx").read_bytes() == b"earlier" and list(tmp_path.iterdir()) == [tmp_path / "m.onnx"]


def test_output_error_is_an_oserror_naming_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EROFS, "ro")))
    with pytest.raises(OutputError) as e:
        atomic_write_bytes(tmp_path / "f", b"x")
    assert isinstance(e.value, OSError) and e.value.errno == errno.EROFS and e.value.filename == str(tmp_path / "f")
    assert str(e.value) == f"cannot write {tmp_path / 'f'}: Read-only file system"


# --------------------------------------------------------------------------------------- a real small disk


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (needs root and mount; skipped elsewhere — the injected failures above run everywhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None or not _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)):
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_full_or_read_only_disk_mid_run_then_resume(fault, small_disk, dense, reference, monkeypatch, capsys):
    out = small_disk / "p"
    save = RoundStore.save

    def save_then_break_the_disk(self, st):
        save(self, st)
        if st.round == 1:
            if fault == "full":
                _fill(small_disk)
            else:
                assert _mount("-o", "remount,ro", str(small_disk))

    monkeypatch.setattr(RoundStore, "save", save_then_break_the_disk)
    capsys.readouterr()
    assert main(_prune(dense, out)) == 1
    err = _one_line(capsys)
    assert ("No space left on device" if fault == "full" else "Read-only file system") in err
    assert str(small_disk) in err and "--resume" in err
    monkeypatch.undo()
    if fault == "full":
        (small_disk / "filler").unlink()
    else:
        assert main(_prune(dense, small_disk / "q")) == 2  # unwritable from the start
        assert "not a writable folder" in _one_line(capsys)
        assert _mount("-o", "remount,rw", str(small_disk))
    assert main([*_prune(dense, out), "--resume"]) == 0
    assert "round 1:" not in capsys.readouterr().out
    assert_same_runs(reference, out)
    assert sorted(p.name for p in small_disk.iterdir()) == ["p"]
