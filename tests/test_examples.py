"""The examples run as a user would run them, on a small subset."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(EXAMPLES.parent))
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=EXAMPLES, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_own_model_example_prunes_compacts_and_exports(tmp_path):
    out = _run("own_model.py", "--limit", "400", "--epochs", "3", "--out", str(tmp_path))
    assert (tmp_path / "small.onnx").stat().st_size > 0
    before, after = map(lambda s: int(s.replace(",", "")), re.search(r"compacted ([\d,]+) -> ([\d,]+)", out).groups())
    assert after < before


def test_own_loop_example_prunes_inside_a_hand_written_loop():
    out = _run("own_loop.py", "--limit", "400", "--epochs", "2", "--sparsity", "0.1", "0.2")
    removed = float(re.search(r"([\d.]+)% of weights removed", out).group(1))
    assert removed >= 19.0
    before, after = map(lambda s: int(s.replace(",", "")), re.search(r"parameters ([\d,]+) -> ([\d,]+)", out).groups())
    assert after < before
