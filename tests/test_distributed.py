"""Two gloo ranks on CPU against one process: curvature, masks, the CLI under torchrun, a rank killed mid-run.

Every rank is a plain subprocess with RANK/WORLD_SIZE/MASTER_* set (what torchrun sets), or torchrun itself.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402

from obdprune.distributed import ShardedBatches, World, all_reduce_mean, mask_digest  # noqa: E402
from obdprune.batches import TensorBatches  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), OBDPRUNE_DIST_TIMEOUT="60", **extra)
    return env


def launch(args: list[str], ranks: int = 2, **popen) -> list[subprocess.Popen]:
    """``python ARGS`` as ``ranks`` ranks of one run, without a supervising launcher."""
    port = str(_free_port())
    return [subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(
        RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=port), **popen)
        for r in range(ranks)]


def torchrun(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------- library


def test_sharded_batches_split_every_sample_once():
    full = TensorBatches(torch.arange(23.0).view(23, 1), torch.zeros(23, dtype=torch.long))
    shards = [ShardedBatches(full, World(r, 2)) for r in range(2)]
    g = [torch.Generator().manual_seed(5) for _ in shards]
    steps = [list(s.epoch(8, gr)) for s, gr in zip(shards, g)]
    one = list(full.epoch(8, torch.Generator().manual_seed(5)))
    assert shards[0].global_batch_sizes(8) == [8, 8, 7]
    for step, (x, _) in enumerate(one):  # the ranks' halves of each global batch are that batch
        both = torch.cat([steps[0][step][0], steps[1][step][0]])
        assert sorted(both.view(-1).tolist()) == sorted(x.view(-1).tolist())
    evals = torch.cat([x for s in shards for x, _ in s.eval_batches(5)])
    assert evals.view(-1).tolist() == list(range(23))
    picks = [s.sample(9, torch.Generator().manual_seed(1))[0] for s in shards]
    assert sorted(torch.cat(picks).view(-1).tolist()) == sorted(full.sample(9, torch.Generator().manual_seed(1))[0]
                                                                .view(-1).tolist())


def test_one_process_world_changes_nothing():
    means = {"w": torch.tensor([1.0, 2.0])}
    assert all_reduce_mean(World(), means, 3)["w"] is means["w"]
    assert mask_digest({"a": torch.tensor([True, False])}) != mask_digest({"a": torch.tensor([False, True])})


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The worker's results of both ranks (curvature, element and channel prune paths)."""
    out = tmp_path_factory.mktemp("ddp")
    procs = launch(["tests/ddp_worker.py", str(out)], stderr=subprocess.PIPE, text=True)
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    return [load_file(str(out / f"rank{r}.safetensors")) for r in range(2)]


@pytest.mark.parametrize("kind", ["ggn", "empirical-fisher"])
def test_curvature_over_two_ranks_is_the_one_process_estimate_on_the_union(two_ranks, kind):
    union = ddp_worker.curvature(kind)  # one process, all 30 samples
    for rank in two_ranks:
        for name, h in union.items():
            torch.testing.assert_close(rank[f"curv/{kind}/{name}"], h, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kind", ["ggn-mc", "hessian-hutchinson"])
def test_stochastic_curvature_is_the_same_on_every_rank(two_ranks, kind):
    a, b = two_ranks
    keys = [k for k in a if k.startswith(f"curv/{kind}/")]
    assert keys and all(torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.parametrize("granularity", ddp_worker.GRANULARITIES)
def test_two_rank_prune_equals_one_process(two_ranks, granularity):
    """Every round's masks are bit-identical on both ranks and equal to one process with the same global
    batch and seed; weights agree to 1e-9 (float64: only the order of the gradient sums differs)."""
    a, b = two_ranks
    one = ddp_worker.flat(granularity, ddp_worker.prune(granularity))
    masks = [k for k in one if "/m/" in k]
    assert len({k.split("/")[1] for k in masks}) == 2  # two rounds
    for k in masks:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k], one[k]), k
    for k, v in one.items():
        if "/w/" in k or k.endswith("/val"):
            assert torch.equal(a[k], b[k]), k
            torch.testing.assert_close(a[k], v, rtol=1e-9, atol=1e-9)
    assert a[f"{granularity}/1/m/5.weight"].float().mean() < 1.0  # something was pruned


@pytest.mark.parametrize("recipe", list(ddp_worker.RECIPES))
def test_two_rank_recipe_equals_one_process(two_ranks, recipe):
    """The recovery recipe under torchrun (distillation, rewinding, OBS criterion and update with Hessians
    all-reduced, the λ search, the monotone max-drop rule, the gradual run): the same masks as one process on both
    ranks, weights to 1e-9."""
    a, b = two_ranks
    one = ddp_worker.flat(recipe, ddp_worker.prune_recipe(recipe))
    masks = [k for k in one if "/m/" in k]
    assert len({k.split("/")[1] for k in masks}) == 3  # two targets and the max-drop point
    for k in masks:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k], one[k]), k
    for k, v in one.items():
        if "/w/" in k or k.endswith("/val"):
            assert torch.equal(a[k], b[k]), k
            torch.testing.assert_close(a[k], v, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------- command line

PRUNE = ["--method", "hybrid", "--sparsity", "0.5", "0.8", "0.9", "--reg-epochs", "1", "--finetune-epochs",
         "1", "--prune-step", "0.6", "--batch-size", "64", "--curvature-samples", "128", "--no-progress"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "dense"
    subprocess.run([sys.executable, "-m", "obdprune", "train", "--dataset", "digits", "--model", "lenet300",
                    "--epochs", "2", "--train-limit", "400", "--test-limit", "200", "--no-progress", "--out",
                    str(out)], cwd=ROOT, env=_env(), check=True, capture_output=True)
    return out


def _runs(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.parent.name: load_file(str(p)) for p in sorted(folder.glob("*/model.safetensors"))}


def test_cli_kill_one_rank_then_resume_under_torchrun(dense, tmp_path):
    import json

    full = tmp_path / "full"  # the uninterrupted run, launched as torchrun would
    ranks = launch(["-m", "obdprune", "prune", str(dense), *PRUNE, "--out", str(full)],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outs = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outs
    assert outs[0][0].count("hybrid round") == 3 and outs[1][0] == ""  # rank 0 prints; the other is silent
    manifest = json.loads((full / "hybrid-s0.9" / "manifest.json").read_text())
    assert manifest["distributed"] == {"world_size": 2, "backend": "gloo", "global_batch_size": 64}

    killed = tmp_path / "killed"
    procs = launch(["-m", "obdprune", "prune", str(dense), *PRUNE, "--out", str(killed)],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank0, rank1 = procs
    line = rank0.stdout.readline()
    assert "round 1" in line, rank0.communicate(timeout=60)
    rank1.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    _, err = rank0.communicate(timeout=60)
    assert rank0.returncode not in (0, None), err
    assert time.monotonic() - t0 < 60
    assert err.startswith("obdprune: error:") and "Traceback" not in err, err
    rank1.wait(timeout=10)
    assert not killed.exists()  # nothing published; finished rounds wait in the work folder

    resumed = torchrun(["-m", "obdprune", "prune", str(dense), *PRUNE, "--out", str(killed), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # round 1 is redone when the kill came before its snapshot (its test evaluation needs both ranks)
    assert resumed.stdout.count("hybrid round") in (2, 3), resumed.stdout
    assert "round 3" in resumed.stdout
    a, b = _runs(full), _runs(killed)
    assert sorted(a) == sorted(b) == ["hybrid-s0.5", "hybrid-s0.8", "hybrid-s0.9"]
    for label in a:
        assert a[label].keys() == b[label].keys()
        for k in a[label]:
            assert torch.equal(a[label][k], b[label][k]), (label, k)


def test_cli_sigterm_to_torchrun_stops_every_rank_with_finished_rounds_kept(dense, tmp_path):
    """torchrun passes SIGTERM to every rank: each stops at a step boundary (or at the next collective its
    stopped peer no longer joins), exits non-zero, and the finished rounds wait for --resume."""
    out = tmp_path / "stopped"
    proc = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "obdprune", "prune",
                             str(dense), *PRUNE, "--out", str(out)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    assert "round 1" in line, proc.communicate(timeout=60)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode not in (0, None), err
    assert time.monotonic() - t0 < 60
    assert "obdprune: interrupted by SIGTERM" in err or "obdprune: error:" in err, err[-3000:]  # a rank's one line
    assert not out.exists()  # nothing published
    assert any(p.name.startswith(f".{out.name}") for p in tmp_path.iterdir())  # the work folder with its rounds
    time.sleep(1)
    leftover = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert not leftover, f"ranks still running: {leftover}"
