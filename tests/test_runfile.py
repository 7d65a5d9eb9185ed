"""Run folders: round trips, tampering and junk are refused with one clear error, pickles never load."""
import json
import pickle

import pytest
import torch

from obdprune.errors import ModelFileError
from obdprune.masking import prunable_weights, select_masks
from obdprune.models import build_model, model_spec
from obdprune.runfile import load_run, save_run


def _saved(tmp_path, with_masks=True):
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 8, 8), 10)
    masks = None
    if with_masks:
        masks = select_masks({n: p.abs() for n, p in prunable_weights(model).items()}, 0.7)
        masks.apply(model)
    manifest = {"model": model_spec("lenet5", (1, 8, 8), 10), "dataset": {"name": "digits"}, "seed": 0,
                "metrics": {}}
    save_run(tmp_path / "run", model, manifest, masks)
    return model, masks, tmp_path / "run"


def test_round_trip_folder_and_single_file(tmp_path):
    model, masks, run = _saved(tmp_path)
    x = torch.randn(5, 1, 8, 8)
    for path in (run, run / "model.safetensors"):
        loaded = load_run(path)
        assert torch.equal(loaded.model.eval()(x), model.eval()(x))
        assert loaded.manifest["versions"]["torch"] == torch.__version__
    loaded = load_run(run)
    for n in masks:
        assert torch.equal(loaded.masks[n], masks[n])
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "masks.safetensors", "model.safetensors"]


def test_pickle_files_are_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "model.pt"
    bad.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelFileError, match="import-torch"):
        load_run(bad)
    disguised = tmp_path / "model.safetensors"
    disguised.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelFileError, match="pickle"):
        load_run(disguised)
    assert not marker.exists()


@pytest.mark.parametrize("first, pads", [(b"\x80", range(0, 300)), (b"PK", range(19100, 19300))])
def test_safetensors_whose_header_length_starts_like_a_pickle_is_not_refused(tmp_path, first, pads):
    """A safetensors file opens with its header's length (u64, little-endian): 128 + 256·k starts with 0x80,
    the pickle protocol byte, and 19,280 + 65,536·k with "PK", torch's zip container. Neither is a pickle."""
    from safetensors.torch import save_file

    from obdprune.runfile import refuse_pickle

    path = tmp_path / "model.safetensors"
    for pad in pads:
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:len(first)] == first:
            break
    assert path.read_bytes()[:len(first)] == first
    refuse_pickle(path)  # no error
    zipped = tmp_path / "zipped.safetensors"
    torch.save({"w": torch.zeros(2)}, str(zipped))  # torch's zip container: "PK\x03\x04"
    pickled = tmp_path / "pickled.safetensors"
    pickled.write_bytes(pickle.dumps({"w": 1}, protocol=2))
    for bad in (zipped, pickled):
        with pytest.raises(ModelFileError, match="pickle"):
            refuse_pickle(bad)


def test_junk_and_truncated_safetensors(tmp_path):
    _, _, run = _saved(tmp_path)
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated|not a readable"):
        load_run(run, verify_hashes=False)
    (run / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{junk")
    with pytest.raises(ModelFileError):
        load_run(run, verify_hashes=False)


def test_modified_file_fails_hash_check(tmp_path):
    _, _, run = _saved(tmp_path)
    other, _, _ = _saved(tmp_path / "b", with_masks=False)
    (run / "model.safetensors").write_bytes((tmp_path / "b" / "run" / "model.safetensors").read_bytes())
    with pytest.raises(ModelFileError, match="sha256"):
        load_run(run)


def _edit_manifest(run, fn):
    m = json.loads((run / "manifest.json").read_text())
    fn(m)
    (run / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["model"].update(name="alexnet"), "unknown model"),
    (lambda m: m["model"].update(num_classes=7), "shape"),
    (lambda m: m["model"].update(input_shape=[1, 28, 28]), "shape"),
    (lambda m: m.update(format="something"), "format"),
    (lambda m: m["masks"]["0.weight"].update(kept=3), "keeps"),
    (lambda m: m["masks"]["0.weight"].update(shape=[1]), "shape"),
])
def test_tampered_manifest(tmp_path, edit, match):
    _, _, run = _saved(tmp_path)
    _edit_manifest(run, edit)
    with pytest.raises(ModelFileError, match=match):
        load_run(run)


def test_tampered_mask_values_and_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    model, masks, run = _saved(tmp_path)
    t = load_file(run / "masks.safetensors")
    t["0.weight"] = t["0.weight"] * 2
    save_file(t, run / "masks.safetensors")
    with pytest.raises(ModelFileError, match="other than 0 and 1"):
        load_run(run, verify_hashes=False)
    _, _, run2 = _saved(tmp_path / "c")
    w = load_file(run2 / "model.safetensors")
    w["0.weight"] = w["0.weight"] + 1.0
    save_file(w, run2 / "model.safetensors", metadata={"format": "obdprune-run"})
    with pytest.raises(ModelFileError, match="nonzero where the mask prunes"):
        load_run(run2, verify_hashes=False)


def test_invalid_manifest_json(tmp_path):
    _, _, run = _saved(tmp_path)
    (run / "manifest.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="JSON"):
        load_run(run)
