"""Sparse safetensors format, plain safetensors helpers and checked ONNX export."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import obdprune.export as E
from obdprune.errors import ModelFileError, ObdpruneError, UsageError
from obdprune.export import (
    export_onnx,
    load_safetensors,
    load_sparse,
    read_safetensors_metadata,
    read_sparse_metadata,
    save_safetensors,
    save_sparse,
    sparse_encoding_sizes,
)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern view for bitwise comparison (-0.0 != 0.0, NaN == same NaN)."""
    t = t.contiguous().reshape(-1)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(bits(a[k]), bits(b[k])), k


def sparse_state(sparsity: float, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {
        "conv.weight": torch.randn(20, 1, 5, 5, generator=gen),
        "conv.bias": torch.randn(20, generator=gen),
        "fc.weight": torch.randn(500, 800, generator=gen),
        "bn.num_batches_tracked": torch.tensor(7),
    }
    for k in ("conv.weight", "fc.weight"):
        sd[k][torch.rand(sd[k].shape, generator=gen) < sparsity] = 0
    return sd


def encodings(path) -> dict[str, str]:
    table = json.loads(read_safetensors_metadata(path)[E.SPARSE_KEY])["tensors"]
    return {k: v["encoding"] for k, v in table.items()}


# ------------------------------------------------------------------------------ sparse format


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(0, 40), min_size=0, max_size=3),
    sparsity=st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.float64, torch.int64]),
    seed=st.integers(0, 2**16),
)
def test_sparse_round_trip_bitwise(tmp_path, shape, sparsity, dtype, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=gen) * 100).to(dtype)
    t[torch.rand(shape, generator=gen) < sparsity] = 0
    if dtype.is_floating_point and t.numel() >= 3:
        flat = t.view(-1)
        flat[0], flat[1], flat[2] = -0.0, float("nan"), float("-inf")
    sd = {"x.weight": t, "y": torch.zeros(3)}
    path = tmp_path / "s.safetensors"
    n = save_sparse(sd, path, metadata={"k": "v"})
    assert n == os.path.getsize(path)
    assert_bitwise_equal(load_sparse(path), sd)
    assert read_sparse_metadata(path) == {"k": "v"}


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_sparse_round_trip_model_state(tmp_path, sparsity) -> None:
    sd = sparse_state(sparsity)
    save_sparse(sd, tmp_path / "s.safetensors")
    assert_bitwise_equal(load_sparse(tmp_path / "s.safetensors"), sd)


def test_every_encoding_round_trips(tmp_path) -> None:
    sd = sparse_state(0.7, seed=1)
    for enc in E._ENCODINGS:
        path = tmp_path / f"{enc}.safetensors"
        save_sparse(sd, path, encoding=enc)
        assert encodings(path)["fc.weight"] == enc
        assert_bitwise_equal(load_sparse(path), sd)
    with pytest.raises(UsageError):
        save_sparse(sd, tmp_path / "x", encoding="zip")


def test_sparse_is_smaller_at_90_percent(tmp_path) -> None:
    sd = sparse_state(0.9)
    dense = save_safetensors(sd, tmp_path / "d.safetensors")
    sparse = save_sparse(sd, tmp_path / "s.safetensors")
    assert sparse < 0.2 * dense
    enc = encodings(tmp_path / "s.safetensors")
    assert enc["fc.weight"] == "delta" and enc["conv.bias"] == "dense" and enc["bn.num_batches_tracked"] == "dense"
    # the chosen encoding is the smallest candidate
    sizes = sparse_encoding_sizes(sd["fc.weight"])
    assert min(sizes, key=sizes.get) == "delta"
    assert sizes["delta"] < sizes["bitmask"] < sizes["index"] < sizes["dense"]


def test_dense_kept_when_sparse_would_not_be_smaller(tmp_path) -> None:
    sd = sparse_state(0.0)
    assert set(encodings_of(sd, tmp_path).values()) == {"dense"}


def encodings_of(sd, tmp_path) -> dict[str, str]:
    save_sparse(sd, tmp_path / "e.safetensors")
    return encodings(tmp_path / "e.safetensors")


def test_varint_codec_extremes() -> None:
    v = np.array([0, 1, 127, 128, 16383, 16384, 2**32, 2**63, 2**64 - 1], dtype=np.uint64)
    enc = E._varint_encode(v)
    assert enc[:4].tolist() == [0, 1, 127, 0x80]
    assert (E._varint_decode(enc) == v).all()
    for junk in ([0x80], [0xFF] * 11, [0x80, 0x00]):
        with pytest.raises(ValueError):
            E._varint_decode(np.array(junk, dtype=np.uint8))


def test_tampered_truncated_junk_files(tmp_path) -> None:
    sd = sparse_state(0.9)
    path = tmp_path / "s.safetensors"
    save_sparse(sd, path)
    data = path.read_bytes()

    flipped = bytearray(data)
    flipped[-10] ^= 0x01  # one bit of one stored value
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ModelFileError, match="flip.safetensors.*checksum"):
        load_sparse(tmp_path / "flip.safetensors")

    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="trunc.safetensors"):
        load_sparse(tmp_path / "trunc.safetensors")

    (tmp_path / "junk.safetensors").write_bytes(b"hello, not a model" * 10)
    with pytest.raises(ModelFileError, match="junk.safetensors"):
        load_sparse(tmp_path / "junk.safetensors")

    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty.safetensors"):
        load_sparse(tmp_path / "empty.safetensors")

    save_safetensors(sd, tmp_path / "plain.safetensors")
    with pytest.raises(ModelFileError, match="not an obdprune sparse file"):
        load_sparse(tmp_path / "plain.safetensors")

    with pytest.raises(ModelFileError, match="missing.safetensors"):
        load_sparse(tmp_path / "missing.safetensors")

    # a metadata table that disagrees with the stored arrays (checksum recomputed: a consistent forgery)
    arrays, meta = E._parse(data, "x")
    header = json.loads(meta[E.SPARSE_KEY])
    header["tensors"]["fc.weight"]["shape"] = [400, 800]
    meta[E.SPARSE_KEY] = json.dumps(header)
    (tmp_path / "shape.safetensors").write_bytes(E._encode_safetensors(arrays, meta))
    with pytest.raises(ModelFileError, match="shape.safetensors.*fc.weight"):
        load_sparse(tmp_path / "shape.safetensors")


def test_sparse_usage_errors(tmp_path) -> None:
    with pytest.raises(UsageError):
        save_sparse({"a::b": torch.zeros(2)}, tmp_path / "x")
    with pytest.raises(UsageError):
        save_sparse({"a": torch.zeros(2)}, tmp_path / "x", metadata={E.SPARSE_KEY: "x"})
    with pytest.raises(UsageError):
        save_sparse({"a": torch.zeros(2)}, tmp_path / "x", metadata={"n": 3})  # type: ignore[dict-item]
    with pytest.raises(UsageError):
        save_sparse({"a": [1, 2]}, tmp_path / "x")  # type: ignore[dict-item]
    assert not list(tmp_path.iterdir())


def test_plain_safetensors_helpers(tmp_path) -> None:
    lin = nn.Linear(3, 2)
    tied = {"w": lin.weight, "w2": lin.weight, "b": lin.bias}  # shared storage is fine
    n = save_safetensors(tied, tmp_path / "p.safetensors", {"a": "1"})
    assert n == os.path.getsize(tmp_path / "p.safetensors")
    back = load_safetensors(tmp_path / "p.safetensors")
    assert torch.equal(back["w"], lin.weight.detach()) and torch.equal(back["w2"], back["w"])
    assert read_safetensors_metadata(tmp_path / "p.safetensors") == {"a": "1"}
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(ModelFileError, match="bad.safetensors"):
        load_safetensors(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------ ONNX


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 10),
    ).train()  # fmt: skip


def test_export_onnx_parity_and_checker(tmp_path) -> None:
    import onnx

    m = small_cnn()
    info = export_onnx(m, torch.randn(2, 1, 12, 12), tmp_path / "m.onnx", check_inputs=torch.randn(5, 1, 12, 12))
    assert info["path"] == str(tmp_path / "m.onnx")
    assert info["bytes"] == os.path.getsize(tmp_path / "m.onnx") > 0
    assert 0 <= info["max_abs_diff"] <= 1e-4
    assert m.training  # mode restored
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))
    # dynamic batch axis: another batch size runs and matches
    x = torch.randn(3, 1, 12, 12)
    got = E._onnxruntime_outputs(tmp_path / "m.onnx", x.numpy())[0]
    with torch.no_grad():
        assert np.allclose(got, m.eval()(x).numpy(), atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temp files left


def test_export_onnx_mismatch_leaves_no_file(tmp_path, monkeypatch) -> None:
    real = E._onnxruntime_outputs
    monkeypatch.setattr(E, "_onnxruntime_outputs", lambda p, x, *a: [o + 1e-2 for o in real(p, x)])
    with pytest.raises(ObdpruneError, match=r"max abs diff 0\.01"):
        export_onnx(small_cnn(), torch.randn(1, 1, 12, 12), tmp_path / "m.onnx", check_inputs=torch.randn(2, 1, 12, 12))
    assert list(tmp_path.iterdir()) == []


def test_export_onnx_unexportable_model(tmp_path) -> None:
    class Weird(nn.Module):
        def forward(self, x: torch.Tensor) -> str:
            return "not a tensor"

    with pytest.raises(ObdpruneError):
        export_onnx(Weird(), torch.randn(1, 2), tmp_path / "w.onnx", check_inputs=torch.randn(1, 2))
    assert list(tmp_path.iterdir()) == []
