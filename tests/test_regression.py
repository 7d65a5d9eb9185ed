"""Restructuring must not change results: the lenet5 compare study on a small subset gives the same
metrics and bit-identical masks and weights as the reference written before the restructure
(tests/data/regression_lenet5.json, from commit f42b56e with ``python tests/regression.py``)."""
import json
from pathlib import Path

import pytest

from obdprune.cli import main
from regression import STUDIES, study_fingerprint

REFERENCE = json.loads((Path(__file__).parent / "data" / "regression_lenet5.json").read_text())


@pytest.mark.parametrize("study", list(STUDIES))
def test_compare_matches_reference(tmp_path, study, fashion_small):
    assert study_fingerprint(tmp_path / study, study, main) == REFERENCE[study]
