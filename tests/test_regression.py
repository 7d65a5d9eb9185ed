"""Restructuring must not change results: the lenet5 compare study on a small subset gives the same
metrics, bit-identical masks and the same weights (to float32 rounding between CPUs) as the reference
written with the code before the restructure (tests/data/regression_lenet5.json, from commit f42b56e with
``python tests/regression.py OUT.json --unpinned``)."""
import json
from pathlib import Path

import pytest

from obdprune.cli import main
from regression import STUDIES, study_fingerprint, weights_close

REFERENCE = json.loads((Path(__file__).parent / "data" / "regression_lenet5.json").read_text())


@pytest.mark.parametrize("study", list(STUDIES))
def test_compare_matches_reference(tmp_path, study, fashion_small):
    got, ref = study_fingerprint(tmp_path / study, study, main), REFERENCE[study]
    assert got["dense"] == ref["dense"] and len(got["results"]) == len(ref["results"])
    for g, r in zip(got["results"], ref["results"]):
        assert {k: v for k, v in g.items() if k != "weights"} == {k: v for k, v in r.items() if k != "weights"}
        assert weights_close(g["weights"], r["weights"]), (g["method"], g.get("target_sparsity"))
