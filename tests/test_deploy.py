"""Compaction + export + side-by-side measurement of pruned runs (no timing assertions)."""
import math

import pytest
import torch

from obdprune.deploy import export_run
from obdprune.export import load_sparse
from obdprune.masking import prunable_weights, select_masks
from obdprune.measure import measure_models, measure_study, speed_table
from obdprune.models import build_model, model_spec
from obdprune.runfile import load_run, save_run


def _pruned_run(tmp_path, sparsity=0.9):
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 8, 8), 10)
    masks = select_masks({n: p.abs() for n, p in prunable_weights(model).items()}, sparsity)
    masks.apply(model)
    with torch.no_grad():  # kill a few whole units so compaction has something to remove
        model[3].weight[:5] = 0
        model[3].bias[:5] = 0
    masks = select_masks({n: (p != 0).float() + p.abs() for n, p in prunable_weights(model).items()}, 0.0)
    manifest = {"model": model_spec("lenet5", (1, 8, 8), 10), "dataset": {"name": "digits"}, "seed": 0}
    from obdprune.masking import masks_from_weights
    save_run(tmp_path / "run", model, manifest, masks_from_weights(model))
    del masks
    return load_run(tmp_path / "run")


def test_measure_models_reports_sizes_macs_and_finite_latency(tmp_path):
    run = _pruned_run(tmp_path)
    dense = build_model("lenet5", (1, 8, 8), 10)
    x = torch.randn(16, 1, 8, 8)
    m = measure_models({"dense": dense, "pruned": run.model}, (1, 8, 8), check_inputs=x, batch_sizes=(1, 4),
                       repeats=3, warmup=1)
    p = m["pruned"]
    assert p["weights_after_compaction"] < p["weights"] == m["dense"]["weights"]
    assert p["macs_after_compaction"] < m["dense"]["macs_after_compaction"]
    assert p["macs_effective"] <= p["macs_dense"]
    assert p["bytes_sparse"] < m["dense"]["bytes_sparse"]
    assert p["onnx_max_abs_diff"] <= 1e-4
    for backend in ("torch", "onnxruntime"):
        for bs in ("1", "4"):
            assert math.isfinite(p["latency_ms"][backend][bs]) and p["latency_ms"][backend][bs] > 0
    assert "| pruned |" in speed_table(m)


@pytest.mark.parametrize("compact", [False, True])
def test_export_formats_round_trip(tmp_path, compact):
    run = _pruned_run(tmp_path)
    x = torch.randn(8, 1, 8, 8)
    ref = run.model.eval()(x)
    info = export_run(run, "onnx", tmp_path / "m.onnx", check_inputs=x, compact_model=compact)
    assert info["max_abs_diff"] <= 1e-4 and (tmp_path / "m.onnx").exists()
    info = export_run(run, "safetensors", tmp_path / "st", check_inputs=x, compact_model=compact)
    back = load_run(tmp_path / "st")
    assert torch.allclose(back.model.eval()(x), ref, atol=1e-5)
    if compact:
        assert sum(p.numel() for p in back.model.parameters()) < sum(p.numel() for p in run.model.parameters())
    export_run(run, "sparse", tmp_path / "m.sparse.safetensors", check_inputs=x, compact_model=compact)
    tensors = load_sparse(tmp_path / "m.sparse.safetensors")
    if not compact:
        for k, v in run.model.state_dict().items():
            assert torch.equal(tensors[k], v)


def test_unknown_export_format(tmp_path):
    from obdprune.errors import UsageError

    run = _pruned_run(tmp_path)
    with pytest.raises(UsageError, match="onnx, safetensors, sparse"):
        export_run(run, "tflite", tmp_path / "x", check_inputs=torch.randn(4, 1, 8, 8))


def test_measure_study_adds_measurements_to_a_summary(tmp_path):
    run = _pruned_run(tmp_path)
    dense = build_model("lenet5", (1, 8, 8), 10)
    summary = {"dense": {"test_accuracy": 0.9}, "results": [{"path": str(tmp_path / "run"), "test_accuracy": 0.8}]}
    out = measure_study(summary, dense, torch.randn(8, 1, 8, 8), tmp_path / "study", repeats=2, batch_sizes=(1,))
    assert out is summary
    r = summary["results"][0]
    assert r["weights_after_compaction"] < summary["dense"]["weights_after_compaction"]
    assert set(r["latency_ms"]["torch"]) == {"1"}
    assert "| run | 80.00% |" in summary["speed_table"] and "| dense | 90.00% |" in summary["speed_table"]
    assert {p.name for p in (tmp_path / "study" / "onnx").iterdir()} == {"dense.onnx", "run.onnx"}
