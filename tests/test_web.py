"""The web page end to end: export a pruned run, serve it, open it in headless Chromium, and check what the
browser computed against onnxruntime in Python on the same images."""
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from obdprune.cli import main
from obdprune.errors import UsageError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _browser_missing() -> str | None:
    from obdprune.web import find_chromium, ort_web_dist

    try:
        find_chromium()
        ort_web_dist()
        import playwright.sync_api  # noqa: F401
    except (UsageError, ImportError) as e:
        return f"browser runtime not installed (scripts/setup.sh installs it): {e}"
    return None


needs_browser = pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A lenet5 on scikit-learn's 8×8 digits, pruned by whole filters and neurons, exported as a page."""
    root = tmp_path_factory.mktemp("web")
    dense, pruned = root / "dense", root / "pruned"
    assert main(["train", "--dataset", "digits", "--model", "lenet5", "--epochs", "4", "--lr", "0.1",
                 "--out", str(dense), "--no-progress"]) == 0
    assert main(["prune", str(dense), "--method", "obd", "--granularity", "channel", "--sparsity", "0.5",
                 "--finetune-epochs", "1", "--reg-epochs", "0", "--curvature-samples", "128", "--out", str(pruned),
                 "--no-progress"]) == 0
    return root, dense, pruned


@pytest.fixture(scope="module")
def page(runs):
    if _browser_missing():
        pytest.skip(_browser_missing())
    root, _, pruned = runs
    assert main(["export", str(pruned), "--format", "web", "--out", str(root / "page")]) == 0
    return root / "page"


def _onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def test_pruned_manifest_records_its_dense_parent(runs):
    _, dense, pruned = runs
    m = json.loads((pruned / "manifest.json").read_text())
    assert m["parent"]["path"] == str(dense.resolve())


def test_export_writes_the_models_the_samples_and_only_the_wasm_runtime(runs, page):
    from obdprune.data import load_dataset
    from obdprune.web import ORT_WEB_FILES, read_samples, read_web_manifest

    info = read_web_manifest(page)
    assert sorted(p.name for p in (page / "ort").iterdir()) == sorted(ORT_WEB_FILES)
    assert {"index.html", "app.js", "style.css", "dense.onnx", "pruned.onnx", "floor.onnx", "samples.bin"} <= {
        p.name for p in page.iterdir()}
    x, labels = read_samples(page)
    data = load_dataset("digits")
    idx = info["samples"]["test_indices"]
    assert x.shape == (64, 1, 8, 8) and np.array_equal(x, data.test.x[idx].numpy())
    assert labels.tolist() == data.test.y[idx].tolist()
    assert info["mean"] == pytest.approx(list(data.mean)) and info["std"] == pytest.approx(list(data.std))
    d, p = info["models"]["dense"], info["models"]["pruned"]
    assert p["bytes"] < d["bytes"] and p["weights"] < d["weights"] and p["macs"] < d["macs"]
    assert max(d["max_abs_diff"], p["max_abs_diff"]) <= 1e-4
    assert np.array_equal(_onnx_logits(page / "floor.onnx", x), x)  # the identity model behind the floor


def test_export_errors_are_one_line_usage_errors(runs, tmp_path, monkeypatch, capsys):
    root, dense, pruned = runs
    assert main(["export", str(dense), "--format", "web", "--out", str(tmp_path / "a")]) == 2
    assert "is a dense run" in capsys.readouterr().err
    assert main(["export", str(pruned), "--format", "onnx", "--dense", str(dense), "--out", str(tmp_path / "b")]) == 2
    assert "--dense goes with --format web" in capsys.readouterr().err
    monkeypatch.setenv("OBDPRUNE_NPM_CACHE", str(tmp_path / "empty"))
    assert main(["export", str(pruned), "--format", "web", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnxruntime-web 1.30.0" in err and "npm install" in err
    assert not (tmp_path / "c").exists()


def test_export_without_recorded_parent_needs_dense(runs, tmp_path, capsys):
    _, dense, pruned = runs
    from obdprune.runfile import load_run, save_run

    run = load_run(pruned)
    manifest = {k: v for k, v in run.manifest.items() if k not in ("files", "masks", "format", "format_version")}
    manifest["parent"] = {k: v for k, v in manifest["parent"].items() if k != "path"}
    orphan = save_run(tmp_path / "orphan", run.model, manifest, masks=run.masks)
    assert main(["export", str(orphan), "--format", "web", "--out", str(tmp_path / "w")]) == 2
    assert "give it with --dense RUN0" in capsys.readouterr().err
    if _browser_missing():
        pytest.skip(_browser_missing())
    assert main(["export", str(orphan), "--format", "web", "--dense", str(dense), "--out", str(tmp_path / "w")]) == 0
    capsys.readouterr()
    again = ["export", str(orphan), "--format", "web", "--dense", str(dense), "--out", str(tmp_path / "w")]
    assert main(again) == 2  # an existing page folder is never replaced without being asked
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "w" / "index.html").write_text("old")
    assert main([*again, "--overwrite"]) == 0
    assert (tmp_path / "w" / "index.html").read_text() != "old"


@needs_browser
def test_served_page_matches_onnxruntime_and_the_canvas_predicts(page, tmp_path):
    from obdprune.web import CHROMIUM_ARGS, find_chromium, read_samples
    from playwright.sync_api import sync_playwright

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "obdprune", "serve", str(page), "--port", "0"], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "ort/ort-wasm-simd-threaded.wasm") as r:
            assert r.headers["Content-Type"] == "application/wasm"
            assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
            assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        with urllib.request.urlopen(url + "ort/ort.wasm.min.mjs") as r:
            assert r.headers["Content-Type"] == "text/javascript"

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS, headless=True)
            tab = browser.new_page(viewport={"width": 1200, "height": 900})
            tab.goto(url + "?repeats=3")
            tab.wait_for_function("window.obdpruneResults || window.obdpruneError", timeout=120_000)
            assert tab.evaluate("window.obdpruneError || null") is None
            res = tab.evaluate("window.obdpruneResults")
            assert json.loads(tab.text_content("#obdprune-results")) == res
            assert res["crossOriginIsolated"] is True and res["threads"] >= 1

            x, labels = read_samples(page)
            assert res["labels"] == labels.tolist()
            for name in ("dense", "pruned"):
                want = _onnx_logits(page / f"{name}.onnx", x)
                got = np.asarray(res[name]["logits"], dtype=np.float64)
                assert np.abs(got - want).max() <= 1e-3
                assert res[name]["predictions"] == want.argmax(1).tolist()
                assert res[name]["accuracy"] == pytest.approx(float((want.argmax(1) == labels).mean()))
                assert res[name]["bytes"] == (page / f"{name}.onnx").stat().st_size
                assert res[name]["ms_b1"] > 0 and res[name]["ms_b64"] > 0

            box = tab.locator("#draw").bounding_box()
            tab.mouse.move(box["x"] + 0.5 * box["width"], box["y"] + 0.2 * box["height"])
            tab.mouse.down()
            tab.mouse.move(box["x"] + 0.5 * box["width"], box["y"] + 0.8 * box["height"], steps=8)
            tab.mouse.up()
            tab.wait_for_function("window.obdpruneLastInput", timeout=30_000)
            drawn = tab.evaluate("window.obdpruneLastInput")
            info = json.loads((page / "web.json").read_text())
            xin = np.asarray(drawn["input"], dtype=np.float32).reshape(1, *info["input_shape"])
            lo, hi = (0 - info["mean"][0]) / info["std"][0], (1 - info["mean"][0]) / info["std"][0]
            assert xin.min() >= lo - 1e-5 and xin.max() <= hi + 1e-5
            assert xin.max() > xin.min()  # the stroke reached the model's input
            for name in ("dense", "pruned"):
                want = _onnx_logits(page / f"{name}.onnx", xin)[0]
                assert np.abs(np.asarray(drawn[name]["logits"]) - want).max() <= 1e-3
                assert drawn[name]["prediction"] == int(want.argmax())
            assert tab.locator("#guess-pruned li").count() == 3
            shot = tmp_path / "page.png"
            tab.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)


@needs_browser
def test_without_isolation_headers_the_page_runs_on_one_thread(page):
    from obdprune.web import measure_in_browser

    res = measure_in_browser(page, repeats=1, threads=4, isolate=False)
    assert res["crossOriginIsolated"] is False and res["threads"] == 1
    assert res["browser"].startswith("Chromium ")
    assert 0 < res["floor"]["ms_b1"] and res["floor"]["bytes"] < 1000


@needs_browser
def test_browser_numbers_reach_summary_and_report(runs, tmp_path):
    from obdprune.report import render_report
    from obdprune.web.study import browser_study

    _, dense, pruned = runs
    dm = json.loads((dense / "manifest.json").read_text())["metrics"]
    pm = json.loads((pruned / "manifest.json").read_text())
    summary = {"model": "lenet5", "dataset": "digits", "seed": 0,
               "dense": {k: dm[k] for k in ("test_accuracy", "val_accuracy", "weights", "nonzero_weights")}
                        | {"path": str(dense)},
               "results": [pm["result"] | {"path": str(pruned)}]}
    browser_study(summary, tmp_path, repeats=2, log=lambda s: None)
    b = summary["results"][0]["browser"]
    assert set(summary["dense"]["browser"]) == {"ms_b1", "ms_b64", "bytes"}
    assert {"ms_b1", "ms_b64", "bytes"} <= set(b) and b["bytes"] < summary["dense"]["browser"]["bytes"]
    assert (tmp_path / "web" / "pruned" / "index.html").exists()
    report = render_report(summary)
    assert "## In the browser" in report and f"{b['bytes']:,} B" in report


@needs_browser
def test_page_opened_as_a_file_says_how_to_serve_it(page):
    from obdprune.web import CHROMIUM_ARGS, find_chromium
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS, headless=True)
        tab = browser.new_page()
        tab.goto((page / "index.html").as_uri())
        tab.wait_for_function("window.obdpruneError", timeout=30_000)
        assert "obdprune serve" in tab.text_content("#status")
        browser.close()
