"""Every command end to end on a small real subset, and one-line errors with the right exit codes."""
import json
import pickle
import subprocess
import sys

import pytest

from obdprune.cli import main

pytestmark = pytest.mark.slow

FASHION = ["--dataset", "fashion-mnist", "--train-limit", "1200", "--test-limit", "300"]
FAST_PRUNE = ["--finetune-epochs", "1", "--reg-epochs", "1", "--curvature-samples", "128", "--no-progress"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, fashion_small):
    out = tmp_path_factory.mktemp("cli") / "dense"
    assert main(["train", *FASHION, "--model", "lenet5", "--epochs", "2", "--out", str(out), "--no-progress"]) == 0
    return out


def test_train_writes_run(dense_run):
    assert (dense_run / "model.safetensors").exists() and (dense_run / "manifest.json").exists()
    m = json.loads((dense_run / "manifest.json").read_text())
    assert m["model"]["name"] == "lenet5" and m["seed"] == 0
    assert m["dataset"]["name"] == "fashion-mnist" and m["dataset"]["train_limit"] == 1200
    assert 0.1 < m["metrics"]["test_accuracy"] <= 1.0


def test_prune_single_target_then_evaluate(dense_run, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(dense_run), "--method", "hybrid", "--sparsity", "0.8", "--out", str(out), *FAST_PRUNE]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["prune"]["method"] == "hybrid" and m["negative_curvature"] == "clamp"
    assert m["metrics"]["sparsity"] >= 0.8
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["sparsity"] == pytest.approx(m["metrics"]["sparsity"])
    assert res["test_accuracy"] == pytest.approx(m["metrics"]["test_accuracy"])
    assert main(["evaluate", str(out / "model.safetensors")]) == 0
    assert "weights nonzero" in capsys.readouterr().out


def test_prune_several_targets_and_max_drop(dense_run, tmp_path):
    out = tmp_path / "many"
    assert main(["prune", str(dense_run), "--method", "obd", "--sparsity", "0.5", "0.8", "--max-drop", "5",
                 "--out", str(out), *FAST_PRUNE]) == 0
    summary = json.loads((out / "summary.json").read_text())
    kinds = sorted("max_drop" in r for r in summary["results"])
    assert kinds == [False, False, True]
    for r in summary["results"]:
        assert (out / r["path"].split("/")[-1] / "model.safetensors").exists()


def test_compare_writes_summary_report_and_plot(tmp_path, fashion_small):
    out = tmp_path / "cmp"
    assert main(["compare", *FASHION, "--model", "lenet300", "--epochs", "1", "--sparsity", "0.76", "0.9",
                 "--max-drop", "2", "--out", str(out), *FAST_PRUNE]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert {"dataset", "model", "seed", "dense", "results"} <= set(s)
    assert {"test_accuracy", "val_accuracy", "weights", "nonzero_weights"} <= set(s["dense"])
    assert s["dense"]["weights"] == 784 * 300 + 300 * 100 + 100 * 10
    assert sorted({r["method"] for r in s["results"]}) == ["hybrid", "l1", "magnitude", "obd"]
    for r in s["results"]:
        assert {"method", "sparsity", "nonzero_weights", "test_accuracy", "val_accuracy", "seconds"} <= set(r)
        assert ("target_sparsity" in r) != ("max_drop" in r)
    assert "| hybrid |" in (out / "report.md").read_text()
    assert (out / "accuracy_vs_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_on_a_subset(tmp_path, fashion_small):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--train-limit", "600", "--test-limit", "200", "--no-progress"]) == 0
    assert (out / "report.md").exists()


def test_console_entry_point_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "obdprune", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("obdprune ")


@pytest.mark.parametrize("argv, code, match", [
    (["prune", "RUN", "--method", "magnitude", "--sparsity", "1.5", "--out", "x"], 2, "fraction in"),
    (["prune", "RUN", "--method", "magnitude", "--max-drop", "-1", "--out", "x"], 2, "percentage points"),
    (["train", "--dataset", "fashion-mnist", "--model", "resnet", "--out", "{tmp}/o"], 2, "unknown model"),
    (["train", "--dataset", "imagenet", "--model", "lenet5", "--out", "{tmp}/o"], 2, "imagenet"),
    (["compare", "--dataset", "digits", "--model", "lenet5", "--methods", "random", "--sparsity", "0.5",
      "--out", "{tmp}/o"], 2, "unknown method"),
    (["compare", "--dataset", "digits", "--model", "lenet5", "--out", "{tmp}/o"], 2, "--sparsity"),
    (["train", "--dataset", "idx", "--data-dir", "{tmp}/nowhere", "--model", "lenet5", "--out", "{tmp}/o"], 1, "nowhere"),
    (["evaluate", "{tmp}/model.pt"], 1, "pickle"),
    (["train", "--dataset", "digits", "--model", "lenet5", "--out", "/proc/obdprune-out"], 2, "writable"),
    (["frobnicate"], 2, "invalid choice"),
])
def test_user_errors_are_one_line_with_exit_code(tmp_path, capsys, argv, code, match):
    (tmp_path / "model.pt").write_bytes(pickle.dumps({"w": 1}))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("obdprune: error:")
    assert match in err
    assert not (tmp_path / "o").exists()


def test_data_download_error_is_one_line(tmp_path, capsys):
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/missing/"
        code = main(["data", "download", "fashion-mnist", "--dest", str(tmp_path / "fm"), "--mirror", url,
                     "--no-progress"])
    finally:
        server.shutdown()
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "404" in err


def test_export_and_bench_commands(dense_run, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert main(["prune", str(dense_run), "--method", "magnitude", "--sparsity", "0.9", "--out", str(pruned),
                 *FAST_PRUNE]) == 0
    assert main(["export", str(pruned), "--format", "onnx", "--compact", "--out", str(tmp_path / "m.onnx"),
                 "--check-samples", "64"]) == 0
    assert "max |onnxruntime - torch|" in capsys.readouterr().out
    assert main(["export", str(pruned), "--format", "sparse", "--out", str(tmp_path / "m.sparse")]) == 0
    assert (tmp_path / "m.sparse").stat().st_size < (pruned / "model.safetensors").stat().st_size
    assert main(["export", str(pruned), "--format", "safetensors", "--compact", "--out", str(tmp_path / "small")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "small"), "--json"]) == 0
    small = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(pruned), "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert small["test_accuracy"] == pytest.approx(full["test_accuracy"])
    assert small["weights"] < full["weights"]
    assert main(["bench", str(pruned), "--repeats", "2", "--batch-sizes", "1", "2", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["run"]["weights_after_compaction"] <= m["dense"]["weights_after_compaction"]
    assert m["run"]["latency_ms"]["onnxruntime"]["2"] > 0
