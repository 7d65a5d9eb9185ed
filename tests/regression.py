"""The lenet5 ``compare`` study on a small Fashion-MNIST subset, reduced to what must not change when
the code is restructured: every result's metrics and the exact bits of its masks and weights.

``python tests/regression.py OUT.json`` writes the reference; tests/test_regression.py recomputes it.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

STUDIES = {
    "element": ["--sparsity", "0.5", "0.8", "--max-drop", "1.0", "--max-sparsity", "0.9", "--methods", "magnitude", "l1", "obd", "hybrid"],
    "channel-macs": ["--sparsity", "0.3", "--granularity", "channel", "--budget", "macs", "--channel-multiple", "2",
                     "--prune-step", "0.3", "--methods", "obd", "hybrid"],
}
COMMON = ["--dataset", "fashion-mnist", "--model", "lenet5", "--train-limit", "800", "--test-limit", "300",
          "--epochs", "1", "--reg-epochs", "1", "--finetune-epochs", "1", "--curvature-samples", "256",
          "--batch-size", "64", "--no-measure", "--no-progress", "--seed", "3"]
KEYS = ("method", "round", "sparsity", "nonzero_weights", "val_accuracy", "test_accuracy", "macs_removed",
        "target_sparsity", "max_drop")


def _digest(path: Path) -> str:
    tensors = load_file(str(path))
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def study_fingerprint(out: Path, study: str, main) -> dict:
    """Run one study with the CLI's ``main`` into ``out`` and reduce it."""
    torch.set_num_threads(1)
    assert main(["compare", *COMMON, *STUDIES[study], "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    results = []
    for r in summary["results"]:
        run = Path(r["path"])
        entry = {k: r[k] for k in KEYS if k in r}
        entry["masks"] = _digest(run / "masks.safetensors")
        entry["weights"] = _digest(run / "model.safetensors")
        results.append(entry)
    return {"dense": {k: summary["dense"][k] for k in ("val_accuracy", "test_accuracy")}, "results": results}


if __name__ == "__main__":
    import tempfile

    from obdprune.cli import main

    ref = {}
    with tempfile.TemporaryDirectory() as tmp:
        for study in STUDIES:
            ref[study] = study_fingerprint(Path(tmp) / study, study, main)
    Path(sys.argv[1]).write_text(json.dumps(ref, indent=1) + "\n")
