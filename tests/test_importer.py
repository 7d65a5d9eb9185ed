"""import-torch: trusted state_dicts become run folders; malicious or unfitting files are refused in one line."""
import pickle
from pathlib import Path

import pytest
import torch

from obdprune.cli import main
from obdprune.errors import ModelFileError
from obdprune.importer import read_state_dict
from obdprune.models import build_model
from obdprune.runfile import load_run

DIGITS = ["--dataset", "digits", "--test-limit", "200"]


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _lenet300(classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model("lenet300", (1, 8, 8), classes)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("obdprune: error:"), err
    return err


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "ddp-model"])
def test_benign_state_dict_becomes_a_run(tmp_path, capsys, wrap):
    model = _lenet300()
    sd = model.state_dict()
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3},
           "ddp-model": {"model": {f"module.{k}": v for k, v in sd.items()}}}[wrap]
    torch.save(obj, tmp_path / "trusted.pth")
    out = tmp_path / "run"
    assert main(["import-torch", str(tmp_path / "trusted.pth"), "--model", "lenet300", *DIGITS, "--out", str(out)]) == 0
    assert "imported" in capsys.readouterr().out
    run = load_run(out)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(run.model.eval()(x), model.eval()(x))
    assert run.manifest["kind"] == "imported" and len(run.manifest["source"]["sha256"]) == 64
    assert 0.0 <= run.manifest["metrics"]["test_accuracy"] <= 1.0
    assert main(["evaluate", str(out)]) == 0


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_pickle_never_runs(tmp_path, capsys, how):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save({"0.weight": Payload(marker)}, bad)  # torch's zip container around the payload
    else:
        bad.write_bytes(pickle.dumps(Payload(marker)))
    assert main(["import-torch", str(bad), "--model", "lenet300", *DIGITS, "--out", str(tmp_path / "run")]) == 1
    assert "weights_only" in _one_error_line(capsys)
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("make, match", [
    (lambda p: torch.save(build_model("lenet5", (1, 8, 8), 10).state_dict(), p), "does not fit"),
    (lambda p: torch.save(_lenet300(classes=3).state_dict(), p), "shape"),
    (lambda p: torch.save({k: v * float("nan") for k, v in _lenet300().state_dict().items()}, p), "NaN"),
    (lambda p: torch.save([1, 2, 3], p), "not a state_dict"),
    (lambda p: torch.save({"a": 1}, p), "not named tensors"),
    (lambda p: p.write_bytes(b"PK\x03\x04 definitely not a zip"), "not a readable"),
    (lambda p: p.write_bytes(b""), "not a"),
])
def test_unfitting_or_junk_files_are_one_line_errors(tmp_path, capsys, make, match):
    make(tmp_path / "model.pt")
    argv = ["import-torch", str(tmp_path / "model.pt"), "--model", "lenet300", *DIGITS, "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    assert match in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_truncated_checkpoint(tmp_path):
    torch.save(_lenet300().state_dict(), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="not a"):
        read_state_dict(tmp_path / "m.pt")


def test_usage_errors(tmp_path, capsys):
    torch.save(_lenet300().state_dict(), tmp_path / "m.pt")
    assert main(["import-torch", str(tmp_path / "m.pt"), "--model", "resnet", *DIGITS, "--out", str(tmp_path / "o")]) == 2
    assert "unknown model" in _one_error_line(capsys)
    assert main(["import-torch", str(tmp_path / "nope.pt"), "--model", "lenet300", *DIGITS,
                 "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in _one_error_line(capsys)
