"""Bad input and failures: atomic writes under injected faults, NaN loss and curvature, data that does not fit
the run, and random command lines and run files (hypothesis) answered by one clear error, never a traceback."""
import io
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import obdprune.methods as methods_mod
from obdprune import atomic
from obdprune.checkpoint import StudyState
from obdprune.cli import main
from obdprune.errors import DataError, ModelFileError, ObdpruneError, UsageError
from obdprune.masking import prunable_weights, select_masks
from obdprune.methods import PruneConfig, prune_model
from obdprune.models import build_model, model_spec
from obdprune.report import plot_accuracy_vs_sparsity, render_report, write_summary
from obdprune.runfile import load_run, save_run
from obdprune.train import TrainConfig

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("obdprune: error:"), err
    return err


# ------------------------------------------------------------------------------------- atomic writes

SUMMARY = {"model": "lenet5", "dataset": "digits", "seed": 0, "results": [
    {"method": "obd", "target_sparsity": 0.5, "sparsity": 0.5, "nonzero_weights": 5, "test_accuracy": 0.8,
     "val_accuracy": 0.8, "seconds": 1.0}],
    "dense": {"test_accuracy": 0.9, "val_accuracy": 0.9, "weights": 10, "nonzero_weights": 10}}


def _run_model(seed: int) -> tuple:
    torch.manual_seed(seed)
    model = build_model("lenet5", (1, 8, 8), 10)
    masks = select_masks({n: p.abs() for n, p in prunable_weights(model).items()}, 0.5)
    masks.apply(model)
    return model, {"model": model_spec("lenet5", (1, 8, 8), 10), "seed": seed}, masks


WRITERS = {  # artifact: (write version v into folder d, what it writes)
    "weights+manifest": (lambda d, v: save_run(d / "run", *_run_model(v)), "run"),
    "summary": (lambda d, v: write_summary(d / "summary.json", {**SUMMARY, "seed": v}), "summary.json"),
    "report": (lambda d, v: atomic.atomic_write_text(d / "report.md", render_report({**SUMMARY, "seed": v})),
               "report.md"),
    "plot": (lambda d, v: plot_accuracy_vs_sparsity(d / "plot.png", {**SUMMARY, "model": f"m{v}"}), "plot.png"),
    "state": (lambda d, v: StudyState(d, "compare", {"v": v}).write(), "state.json"),
}


def _snapshot(path: Path) -> dict:
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    return {path.name: path.read_bytes()}


def _half_then_fail(monkeypatch, error: BaseException = OSError(28, "No space left on device")) -> None:
    """Every writer writes half of its bytes, then fails (disk full, or Ctrl-C)."""
    def fail(path, data: bytes):
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise error

    import matplotlib.figure
    import safetensors.torch

    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(self, fname, **kw):
        buf = io.BytesIO()
        real_savefig(self, buf, **kw)
        fail(fname, buf.getvalue())

    monkeypatch.setattr(Path, "write_text", lambda self, text, encoding=None, **kw: fail(self, text.encode()))
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: fail(self, data))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    monkeypatch.setattr("obdprune.runfile.save_file", lambda tensors, path, metadata=None: fail(
        path, safetensors.torch.save(tensors, metadata=metadata)))


def _rename_fails(monkeypatch, folders_only: bool) -> None:
    real = os.replace

    def replace(src, dst):
        if not folders_only or Path(src).is_dir():
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)


@pytest.mark.parametrize("artifact", list(WRITERS))
@pytest.mark.parametrize("fault", ["half-written", "rename-fails", "folder-rename-fails", "interrupted"])
def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch, artifact, fault):
    write, name = WRITERS[artifact]
    write(tmp_path, 1)
    before = _snapshot(tmp_path / name)
    if fault == "half-written":
        _half_then_fail(monkeypatch)
    elif fault == "interrupted":
        _half_then_fail(monkeypatch, KeyboardInterrupt())
    else:
        _rename_fails(monkeypatch, folders_only=fault == "folder-rename-fails")
    if fault == "folder-rename-fails" and artifact != "weights+manifest":
        write(tmp_path, 2)  # no folder involved: the write succeeds
        monkeypatch.undo()
        assert _snapshot(tmp_path / name) != before
        return
    with pytest.raises((OSError, KeyboardInterrupt)):
        write(tmp_path, 2)
    monkeypatch.undo()
    assert _snapshot(tmp_path / name) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_new_run_folder_is_all_or_nothing(tmp_path, monkeypatch):
    _half_then_fail(monkeypatch)
    with pytest.raises(OSError):
        save_run(tmp_path / "run", *_run_model(0))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- NaN and divergence


def test_nan_curvature_is_a_clear_error(digits, monkeypatch):
    def nan_curvature(kind, model, *args, **kw):
        return {n: torch.full_like(p, float("nan")) for n, p in model.named_parameters()}

    monkeypatch.setattr(methods_mod, "estimate_curvature", nan_curvature)
    model = build_model("lenet300", digits.input_shape, digits.num_classes)
    cfg = PruneConfig(method="obd", reg_epochs=0, finetune=TrainConfig(epochs=0))
    with pytest.raises(ObdpruneError, match=r"curvature of '1.weight' contains NaN"):
        prune_model(model, digits, cfg, targets=[0.5], progress=False)


def test_diverging_training_exits_1_naming_epoch_and_step_and_writes_nothing(tmp_path, capsys):
    common = ["--dataset", "digits", "--model", "lenet300", "--lr", "1e6", "--epochs", "2", "--no-progress"]
    assert main(["train", *common, "--out", str(tmp_path / "dense")]) == 1
    assert re.search(r"at epoch \d+, step \d+", _one_error_line(capsys))
    assert main(["compare", *common, "--sparsity", "0.5", "--methods", "magnitude", "--out", str(tmp_path / "cmp")]) == 1
    assert re.search(r"at epoch \d+, step \d+", _one_error_line(capsys))
    assert list(tmp_path.iterdir()) == []


def test_diverging_fine_tuning_leaves_no_prune_output(tmp_path, capsys):
    assert main(["train", "--dataset", "digits", "--model", "lenet300", "--epochs", "0", "--out",
                 str(tmp_path / "dense"), "--no-progress"]) == 0
    assert main(["prune", str(tmp_path / "dense"), "--method", "magnitude", "--sparsity", "0.5", "--reg-epochs", "0",
                 "--finetune-lr", "1e6", "--finetune-epochs", "2", "--out", str(tmp_path / "p"), "--no-progress"]) == 1
    assert "epoch" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


# ------------------------------------------------------------------------------------- data that does not fit


def _idx(shape: tuple, data: np.ndarray) -> bytes:
    return bytes([0, 0, 8, len(shape)]) + b"".join(struct.pack(">I", d) for d in shape) + data.astype(np.uint8).tobytes()


def _idx_folder(folder: Path, hw: tuple[int, int], classes: int, n_train: int = 120, n_test: int = 40) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % classes
        (folder / f"{split}-images-idx3-ubyte").write_bytes(_idx((n, *hw), rng.integers(0, 255, (n, *hw))))
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(_idx((n,), labels))
    return folder


def test_run_against_data_of_another_shape_or_class_count(tmp_path, capsys):
    good = _idx_folder(tmp_path / "good", (6, 6), 10)
    assert main(["train", "--dataset", "idx", "--data-dir", str(good), "--model", "lenet300", "--epochs", "0",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    capsys.readouterr()
    for folder, match in ((_idx_folder(tmp_path / "bigger", (7, 7), 10), "images are 1x7x7 with 10 classes"),
                          (_idx_folder(tmp_path / "fewer", (6, 6), 3), "1x6x6 with 3 classes")):
        assert main(["evaluate", str(tmp_path / "run"), "--data-dir", str(folder)]) == 1
        err = _one_error_line(capsys)
        assert match in err and "expects 1x6x6 with 10 classes" in err
        assert main(["prune", str(tmp_path / "run"), "--method", "magnitude", "--sparsity", "0.5", "--data-dir",
                     str(folder), "--out", str(tmp_path / "p"), "--no-progress"]) == 1
        assert match in _one_error_line(capsys)
        assert not (tmp_path / "p").exists() and not (tmp_path / ".p.work").exists()


# ------------------------------------------------------------------------------------- random command lines

VOCAB = ["train", "prune", "evaluate", "compare", "demo", "import-torch", "data", "download", "--dataset", "idx",
         "digits", "--data-dir", "nowhere", "--model", "lenet5", "lenet300", "resnet", "--out", "o", "/proc/x", "",
         "--sparsity", "0.5", "1.5", "-1", "nan", "inf", "1e400", "--max-drop", "200", "--method", "--methods",
         "obd", "magnitude", "bogus", "--epochs", "0", "--resume", "--seed", "99999999999999999999", "--lr",
         "--threads", "100000", "--layer-floor", "--prune-step", "--batch-size", "--json", "--device", "cuda",
         "tpu", "--curvature", "--scope", "--val-fraction", "--train-limit", "--", "-h", "--help", "--version",
         "--ou", "run.pt", "x\ny", "\udcff", "a\x00b", "--optimizer", "--schedule", "--l1-mode", "fashion-mnist"]
BASES = [
    ["train", "--dataset", "idx", "--data-dir", "nowhere", "--model", "lenet5", "--out", "o"],
    ["compare", "--dataset", "idx", "--data-dir", "nowhere", "--model", "lenet300", "--sparsity", "0.5", "--out", "o"],
    ["prune", "o", "--method", "obd", "--sparsity", "0.5", "0.9", "--max-drop", "1", "--out", "p"],
    ["evaluate", "o", "--json"],
    ["import-torch", "run.pt", "--model", "lenet5", "--dataset", "idx", "--data-dir", "nowhere", "--out", "o"],
    ["demo", "--out", "o", "--train-limit", "10"],
]
token = st.one_of(st.sampled_from(VOCAB), st.text(max_size=8))


@st.composite
def command_lines(draw) -> list[str]:
    if draw(st.booleans()):
        return draw(st.lists(token, max_size=10))
    argv = list(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(argv)))
        op = draw(st.sampled_from(["insert", "replace", "delete"]))
        if op == "insert" or not argv:
            argv.insert(i, draw(token))
        elif op == "replace":
            argv[min(i, len(argv) - 1)] = draw(token)
        else:
            del argv[min(i, len(argv) - 1)]
    return argv


@pytest.fixture
def no_real_work(tmp_path, monkeypatch):
    """Random command lines run in an empty folder and can never load data, train or download."""
    def refuse(*args, **kw):
        raise DataError("fuzz: data loading is disabled")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.pt").write_bytes(b"\x80\x04junk")
    monkeypatch.setattr("obdprune.study.load_data", refuse)
    monkeypatch.setattr("obdprune.data.download_dataset", refuse)
    return tmp_path


@FUZZ
@given(argv=command_lines())
def test_random_command_lines_exit_cleanly(no_real_work, capsys, argv):
    try:
        code = main(argv)
    except SystemExit as e:  # --help / --version
        assert e.code == 0, argv
        capsys.readouterr()
        return
    finally:
        torch.set_num_threads(1)
    assert code in (1, 2), argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("obdprune: error:"), (argv, err)
    assert sorted(p.name for p in no_real_work.iterdir()) == ["run.pt"], argv


# ------------------------------------------------------------------------------------- random run files

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10)
MANIFEST_PATHS = [("format",), ("model",), ("model", "name"), ("model", "input_shape"), ("model", "num_classes"),
                  ("masks",), ("masks", "0.weight"), ("masks", "0.weight", "shape"), ("masks", "0.weight", "kept"),
                  ("files",), ("files", "model.safetensors"), ("files", "../../etc/passwd"), ("dataset",)]


@pytest.fixture(scope="module")
def valid_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzzrun")
    save_run(folder / "run", *_run_model(0))
    return folder / "run"


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(MANIFEST_PATHS), json_values | st.just("DELETE")), min_size=1,
                      max_size=3),
       shape=st.lists(st.integers(-3, 10**6), max_size=4))
def test_mutated_manifests_give_model_file_errors(valid_run, tmp_path, edits, shape):
    run = _copy_run(valid_run, tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    for path, value in edits + [((("model", "input_shape"), shape))] * (len(shape) == 3):
        node = manifest
        for key in path[:-1]:
            if not isinstance(node, dict):
                break
            node = node.setdefault(key, {})
        if isinstance(node, dict):
            node.pop(path[-1], None) if value == "DELETE" else node.__setitem__(path[-1], value)
    (run / "manifest.json").write_text(json.dumps(manifest))
    try:
        load_run(run)
    except (ModelFileError, UsageError):
        pass


@settings(FUZZ, max_examples=50)
@given(data=st.binary(max_size=300), cut=st.integers(0, 4000), flips=st.lists(st.integers(0, 4000), max_size=4))
def test_random_and_damaged_safetensors_give_model_file_errors(valid_run, tmp_path, data, cut, flips):
    run = _copy_run(valid_run, tmp_path / "run")
    original = (run / "model.safetensors").read_bytes()
    damaged = bytearray(original[:cut] if cut < len(original) else original)
    for i in flips:
        if i < len(damaged):
            damaged[i] ^= 0xFF
    for blob in (data, bytes(damaged)):
        for target in ("model.safetensors", "masks.safetensors"):
            _copy_run(valid_run, run)
            (run / target).write_bytes(blob)
            for path, verify in ((run, False), (run / "model.safetensors", True)):
                try:
                    load_run(path, verify_hashes=verify)
                except (ModelFileError, UsageError):
                    pass
