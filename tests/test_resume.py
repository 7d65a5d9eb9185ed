"""Resume and determinism: killed or interrupted runs continue to the same masks and metrics as
uninterrupted ones; the same seed gives the same results; resuming with other arguments is refused."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from obdprune.checkpoint import RoundStore, StudyState
from obdprune.cli import main
from obdprune.data import load_dataset
from obdprune.methods import PruneConfig, prune_model
from obdprune.models import build_model
from obdprune.train import TrainConfig, train

COMPARE = ["compare", "--dataset", "digits", "--model", "lenet300", "--epochs", "1", "--sparsity", "0.5", "0.8",
           "0.9", "--methods", "magnitude", "obd", "--finetune-epochs", "1", "--reg-epochs", "1",
           "--curvature-samples", "64", "--batch-size", "64", "--no-progress"]
TIMING = {"seconds", "curvature_seconds", "path"}


def _knows(command: str, flag: str) -> bool:
    import argparse

    from obdprune.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return any(flag in a.option_strings for a in sub.choices[command]._actions)


if _knows("compare", "--no-measure"):  # latency measurements are neither fast nor reproducible
    COMPARE.append("--no-measure")


def _comparable(summary: dict) -> dict:
    s = json.loads(json.dumps(summary))
    s["dense"] = {k: v for k, v in s["dense"].items() if k not in TIMING}
    s["results"] = [{k: v for k, v in r.items() if k not in TIMING} for r in s["results"]]
    return s


def assert_same_study(a: Path, b: Path) -> None:
    """Same summary (up to wall-clock times and paths), bit-identical weights and masks in every run."""
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    assert _comparable(sa) == _comparable(sb)
    runs = sorted(p.name for p in (a / "runs").iterdir())
    assert runs == sorted(p.name for p in (b / "runs").iterdir()) and runs
    for rel in ["dense/model.safetensors"] + [f"runs/{r}/{f}" for r in runs
                                               for f in ("model.safetensors", "masks.safetensors")]:
        ta, tb = load_file(a / rel), load_file(b / rel)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (rel, k)


def _leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".*")] + ([str(folder / "checkpoints")] if (folder / "checkpoints").exists() else [])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "baseline"
    assert main([*COMPARE, "--out", str(out)]) == 0
    return out


def test_same_seed_same_masks_and_metrics(baseline, tmp_path):
    assert main([*COMPARE, "--out", str(tmp_path / "again")]) == 0
    assert_same_study(baseline, tmp_path / "again")
    m = json.loads((baseline / "dense" / "manifest.json").read_text())
    assert m["seed"] == 0 and m["versions"]["torch"] == torch.__version__ and "obdprune" in m["versions"]
    state = json.loads((baseline / "state.json").read_text())
    assert state["status"] == "complete" and not _leftovers(baseline)


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "obdprune", *COMPARE, "--threads", "1", "--out", str(out), *(
        ["--resume"] if (out / "state.json").exists() else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"finished before the signal: {proc.communicate()}"
        assert time.monotonic() - t0 < timeout
        time.sleep(0.005)


def test_sigint_then_kill_9_then_resume_matches_uninterrupted(baseline, tmp_path):
    out = tmp_path / "cmp"
    # 1. SIGINT right after the dense stage is recorded: stops at a step boundary, exit 130, one line
    proc = _start(out)
    _wait_for(proc, lambda: (out / "state.json").exists())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted by SIGINT" in lines[0] and "--resume" in lines[0]
    assert "dense" in json.loads((out / "state.json").read_text())["stages"]
    # 2. resume, then kill -9 as soon as a pruning round of the second method is saved
    proc = _start(out)
    _wait_for(proc, lambda: "prune:obd" in json.loads((out / "state.json").read_text())["rounds"])
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    state = json.loads((out / "state.json").read_text())
    assert state["status"] == "running" and "prune:magnitude" in state["stages"] and "prune:obd" in state["rounds"]
    # 3. resume to the end: the same study as an uninterrupted run
    proc = _start(out)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "dense: finished earlier" in stdout and "magnitude: finished earlier" in stdout
    assert_same_study(baseline, out)
    assert not _leftovers(out)


def test_resume_refuses_other_arguments_and_fresh_runs_refuse_old_state(baseline, capsys):
    argv = [*COMPARE, "--out", str(baseline)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and "new --out" in err
    changed = [a if a != "0.9" else "0.95" for a in argv]
    changed[changed.index("--epochs") + 1] = "2"
    assert main([*changed, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--epochs 2 (was 1)" in err and "--sparsity 0.5 0.8 0.95 (was 0.5 0.8 0.9)" in err
    # same arguments (threads and progress may change): a finished study just reports again
    assert main([*argv, "--resume", "--threads", "1"]) == 0


def test_prune_interrupted_by_sigterm_resumes_to_the_same_result(baseline, tmp_path, monkeypatch, capsys):
    argv = ["prune", str(baseline / "dense"), "--method", "obd", "--sparsity", "0.5", "0.8", "--finetune-epochs",
            "1", "--reg-epochs", "1", "--curvature-samples", "64", "--batch-size", "64", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "ref")]) == 0
    save = RoundStore.save

    def save_then_sigterm(self, st):
        save(self, st)
        if st.round == 1:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(RoundStore, "save", save_then_sigterm)
    out = tmp_path / "pruned"
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 143
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SIGTERM" in err and "--resume" in err
    assert not out.exists() and (tmp_path / ".pruned.work" / "state.json").exists()
    monkeypatch.setattr(RoundStore, "save", save)
    assert main([*argv, "--out", str(out)]) == 2  # the earlier state is not silently overwritten
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned", "ref"]
    for label in ("obd-s0.5", "obd-s0.8"):
        for f in ("model.safetensors", "masks.safetensors"):
            a, b = load_file(tmp_path / "ref" / label / f), load_file(out / label / f)
            assert all(torch.equal(a[k], b[k]) for k in a)
    ref, got = (json.loads((p / "summary.json").read_text()) for p in (tmp_path / "ref", out))
    assert [_comparable({"dense": {}, "results": [r]})["results"] for r in ref["results"]] == \
           [_comparable({"dense": {}, "results": [r]})["results"] for r in got["results"]]


class _Killed(Exception):
    pass


def test_prune_model_resumes_after_any_round(tmp_path, monkeypatch):
    """Stop right after each snapshot in turn; the resumed path gives bit-identical results. With a searched
    λ, targets and a max drop are two paths with two stores (``prune:hybrid`` and its ``max-drop`` branch):
    a stop in either resumes the second without rerunning the first."""
    data = load_dataset("digits", train_limit=500)
    torch.manual_seed(0)
    dense = build_model("lenet300", data.input_shape, data.num_classes)
    train(dense, data.train, TrainConfig(epochs=1, batch_size=64), progress=False)
    cfg = PruneConfig(method="hybrid", reg_epochs=1, curvature_samples=64,
                      finetune=TrainConfig(epochs=1, lr=0.01, batch_size=64, schedule="cosine"))
    kw = dict(targets=[0.5, 0.9], max_drop=3.0, progress=False)
    saves: list[str] = []
    real_save = RoundStore.save

    def counted(store, st):
        real_save(store, st)
        saves.append(store.key)
        if len(saves) == die_at:
            raise _Killed

    def assert_same(got):
        assert len(got) == len(ref)
        for a, b in zip(ref, got):
            da, db = a.to_dict(), b.to_dict()
            for d in (da, db):  # the λ search's own timing
                d["l1_search"] = {k2: v for k2, v in d["l1_search"].items() if k2 not in TIMING}
            assert {k2: v for k2, v in da.items() if k2 not in TIMING} == \
                   {k2: v for k2, v in db.items() if k2 not in TIMING}
            assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
            assert all(torch.equal(a.state_dict[n], b.state_dict[n]) for n in a.state_dict)

    ref = prune_model(dense, data, cfg, **kw)  # no checkpoint at all
    monkeypatch.setattr(RoundStore, "save", counted)
    die_at = 0
    assert_same(prune_model(dense, data, cfg, **kw,
                            checkpoint=StudyState(tmp_path / "all", "test", {}).rounds("prune:hybrid")))
    assert set(saves) == {"prune:hybrid", "prune:hybrid:max-drop"} and any(r.max_drop for r in ref)
    total = len(saves)
    for k in range(1, total + 1):  # every snapshot of both paths
        saves.clear()
        die_at = k
        with pytest.raises(_Killed):
            prune_model(dense, data, cfg, checkpoint=StudyState(tmp_path / f"k{k}", "test", {}).rounds("prune:hybrid"),
                        **kw)
        die_at = 0
        resumed = StudyState.open(tmp_path / f"k{k}", "test", {}, resume=True)
        assert_same(prune_model(dense, data, cfg, checkpoint=resumed.rounds("prune:hybrid"), **kw))
        assert len(saves) == total  # the resumed run saved only what the killed one had not
