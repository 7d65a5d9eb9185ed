"""The lenet5 ``compare`` study on a small Fashion-MNIST subset, reduced to what must not change when
the code is restructured: every result's metrics, the exact bits of its masks, and per weight tensor the
sum and the sum of squares (float64). Weights are compared to a relative 1e-4, not bit for bit: CPUs with
and without AVX-512 round float32 kernels differently (seen between this project's Intel and AMD hosts).

``python tests/regression.py OUT.json`` writes the reference; tests/test_regression.py recomputes it.
``--unpinned`` leaves out the flags that pin later defaults, for code that predates them (f42b56e).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

STUDIES = {
    "element": ["--sparsity", "0.5", "0.8", "--max-drop", "1.0", "--max-sparsity", "0.9", "--prune-step", "0.6",
                "--l1-lambda", "2e-3", "--methods", "magnitude", "l1", "obd", "hybrid"],  # the reference's λ
    "channel-macs": ["--sparsity", "0.3", "--granularity", "channel", "--budget", "macs", "--channel-multiple", "2",
                     "--prune-step", "0.3", "--methods", "obd", "hybrid"],
}
COMMON = ["--dataset", "fashion-mnist", "--model", "lenet5", "--train-limit", "800", "--test-limit", "300",
          "--epochs", "1", "--reg-epochs", "1", "--finetune-epochs", "1", "--curvature-samples", "256",
          "--batch-size", "64", "--no-measure", "--no-progress", "--seed", "3",
          "--no-distill", "--max-drop-rule", "first-failure"]  # the reference's defaults, pinned (steps of 0.6 too)
PINS = ("--no-distill", "--max-drop-rule", "first-failure")  # left out for code older than these options
KEYS = ("method", "round", "sparsity", "nonzero_weights", "val_accuracy", "test_accuracy", "macs_removed",
        "target_sparsity", "max_drop")


def _digest(path: Path) -> str:
    tensors = load_file(str(path))
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _moments(path: Path) -> dict[str, list[float]]:
    """Per tensor: [sum, sum of squares] in float64."""
    return {k: [float(t.double().sum()), float(t.double().square().sum())] for k, t in sorted(load_file(str(path)).items())}


def weights_close(a: dict, b: dict, rel: float = 1e-4) -> bool:
    """Two ``_moments`` agree: sums to ``rel`` of the tensor's norm, sums of squares to ``rel`` of their value."""
    def close(ma: list[float], mb: list[float]) -> bool:
        (sa, qa), (sb, qb) = ma, mb
        return abs(sa - sb) <= rel * max(qa, qb) ** 0.5 + 1e-9 and abs(qa - qb) <= rel * max(qa, qb) + 1e-12

    return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)


def study_fingerprint(out: Path, study: str, main, pinned: bool = True) -> dict:
    """Run one study with the CLI's ``main`` into ``out`` and reduce it."""
    torch.set_num_threads(1)
    args = [*COMMON, *STUDIES[study]] if pinned else [a for a in [*COMMON, *STUDIES[study]] if a not in PINS]
    assert main(["compare", *args, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    results = []
    for r in summary["results"]:
        run = Path(r["path"])
        entry = {k: r[k] for k in KEYS if k in r}
        entry["masks"] = _digest(run / "masks.safetensors")
        entry["weights"] = _moments(run / "model.safetensors")
        results.append(entry)
    return {"dense": {k: summary["dense"][k] for k in ("val_accuracy", "test_accuracy")}, "results": results}


if __name__ == "__main__":
    import tempfile

    from obdprune.cli import main

    ref = {}
    with tempfile.TemporaryDirectory() as tmp:
        for study in STUDIES:
            ref[study] = study_fingerprint(Path(tmp) / study, study, main, pinned="--unpinned" not in sys.argv)
    Path(sys.argv[1]).write_text(json.dumps(ref, indent=1) + "\n")
