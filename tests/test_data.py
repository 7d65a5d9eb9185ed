"""Tests for obdprune.data: IDX/CIFAR/digits loaders, lookup, splits, normalization, downloads.

Everything runs on tiny files written into tmp_path; downloads go to a local http.server.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import io
import pickle
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import obdprune.data as data
from obdprune.data import cifar, download, locate, splits
from obdprune.data.idx import read_idx
from obdprune.errors import DataError, UsageError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No lookups outside tmp_path: no $OBDPRUNE_DATA, no Debian folder, cache under tmp_path."""
    monkeypatch.delenv("OBDPRUNE_DATA", raising=False)
    monkeypatch.delenv("OBDPRUNE_MIRROR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(locate, "DEBIAN_DIR", tmp_path / "no-debian")
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


# ---------------------------------------------------------------- helpers: IDX


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def write_file(path: Path, payload: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


def make_images(labels: np.ndarray, hw: tuple[int, int] = (6, 5), offset: int = 0) -> np.ndarray:
    """Images whose first two pixels encode their index (offset + i), rest depends on the label."""
    n = labels.size
    rng = np.random.default_rng(123 + offset)
    imgs = rng.integers(0, 256, size=(n, *hw), dtype=np.uint8)
    imgs[:, 1:, :] //= 2
    imgs[:, 1:, :] += (labels * 10).astype(np.uint8)[:, None, None]
    ids = np.arange(offset, offset + n)
    imgs[:, 0, 0] = ids % 256
    imgs[:, 0, 1] = ids // 256
    return imgs


def make_idx_folder(folder: Path, n_train: int = 300, n_test: int = 100, *, gz: bool = True,
                    classes: int = 10, hw: tuple[int, int] = (6, 5)) -> dict[str, Path]:  # fmt: skip
    """Write the four IDX files; labels cycle 0..classes-1 with some imbalance."""
    folder.mkdir(parents=True, exist_ok=True)
    y_train = np.minimum(np.arange(n_train) % (classes + 2), classes - 1)  # last class 3x as common
    y_test = np.arange(n_test) % classes
    arrays = {
        STEMS[0]: make_images(y_train, hw),
        STEMS[1]: y_train.astype(np.uint8),
        STEMS[2]: make_images(y_test, hw, offset=n_train),
        STEMS[3]: y_test.astype(np.uint8),
    }
    return {stem: write_file(folder / stem, idx_bytes(a), gz) for stem, a in arrays.items()}


def raw_ids(split: data.Split, ds: data.Dataset) -> np.ndarray:
    """Undo the normalization of the two id pixels → the image ids (ints)."""
    raw = split.x[:, 0, 0, :2].double() * ds.std[0] * ds.pixel_scale + ds.mean[0] * ds.pixel_scale
    raw = raw.round().long().numpy()
    return raw[:, 0] + 256 * raw[:, 1]


# ---------------------------------------------------------------- helpers: CIFAR


def cifar_batch_bytes(n: int, seed: int, protocol: int = 2, label_base: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    labels = [int(v) for v in (np.arange(n) + label_base) % 10]
    batch = {
        b"batch_label": f"batch {seed}".encode(),
        b"labels": labels,
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }
    return pickle.dumps(batch, protocol=protocol)


def make_cifar_folder(folder: Path, n: int = 20, *, protocol: int = 2, meta: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate((*cifar.TRAIN_BATCHES, cifar.TEST_BATCH)):
        (folder / name).write_bytes(cifar_batch_bytes(n, seed=i, protocol=protocol))
    if meta:
        names = [f"class{i}".encode() for i in range(10)]
        meta_obj = {b"label_names": names, b"num_cases_per_batch": n, b"num_vis": 3072}
        (folder / cifar.META).write_bytes(pickle.dumps(meta_obj, protocol=2))
    return folder


class Evil:
    """Unpickling this opens (creates) ``target`` for writing."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


# ---------------------------------------------------------------- helpers: HTTP


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        super().do_GET()


@contextlib.contextmanager
def serve(folder: Path):
    """Serve ``folder`` on 127.0.0.1 (random port) → base URL; records request paths."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ================================================================ IDX loaders


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_loads(tmp_path, gz):
    make_idx_folder(tmp_path / "d", gz=gz)
    ds = data.load_dataset("idx", tmp_path / "d")
    assert ds.name == "idx"
    assert ds.input_shape == (1, 6, 5)
    assert ds.num_classes == 10 and ds.classes == tuple(str(i) for i in range(10))
    assert len(ds.train) + len(ds.val) == 300 and len(ds.val) == 30 and len(ds.test) == 100
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape[1:] == (1, 6, 5)
    assert abs(ds.train.x.mean().item()) < 1e-5 and abs(ds.train.x.std(unbiased=False).item() - 1) < 1e-4
    assert ds.source == str(tmp_path / "d")
    assert len(ds.mean) == len(ds.std) == 1


def test_gz_and_raw_give_identical_data(tmp_path):
    make_idx_folder(tmp_path / "gz", gz=True)
    make_idx_folder(tmp_path / "raw", gz=False)
    a, b = data.load_dataset("idx", tmp_path / "gz"), data.load_dataset("idx", tmp_path / "raw")
    for sa, sb in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_named_idx_datasets(tmp_path, name):
    make_idx_folder(tmp_path / name, hw=(28, 28))
    # data_dir may be the folder itself or its parent (data_dir/<name>).
    for where in (tmp_path / name, tmp_path):
        ds = data.load_dataset(name, where)
        assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    expected = data.FASHION_MNIST_CLASSES if name == "fashion-mnist" else tuple("0123456789")
    assert ds.classes == expected


def test_num_classes_from_data(tmp_path):
    make_idx_folder(tmp_path, classes=4)
    ds = data.load_dataset("idx", tmp_path)
    assert ds.num_classes == 4 and ds.classes == ("0", "1", "2", "3")
    assert set(ds.train.y.tolist()) == {0, 1, 2, 3}


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_debian_fashion_mnist(monkeypatch):
    monkeypatch.setattr(locate, "DEBIAN_DIR", DEBIAN_FASHION.parent)
    assert data.find_data_dir("fashion-mnist") == DEBIAN_FASHION
    start = time.perf_counter()
    ds = data.load_dataset("fashion-mnist")
    elapsed = time.perf_counter() - start
    assert len(ds.train) + len(ds.val) == 60000 and len(ds.val) == 6000 and len(ds.test) == 10000
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert torch.equal(torch.bincount(ds.val.y), torch.full((10,), 600))
    assert torch.equal(torch.bincount(ds.test.y), torch.full((10,), 1000))
    assert ds.mean[0] == pytest.approx(0.286, abs=2e-3) and ds.std[0] == pytest.approx(0.353, abs=2e-3)
    assert elapsed < 20, f"loading full Fashion-MNIST took {elapsed:.1f}s"


# ================================================================ malformed IDX files


def _one_bad(tmp_path: Path, stem: str, payload: bytes, gz: bool = False) -> Path:
    files = make_idx_folder(tmp_path, gz=False)
    files[stem].unlink()
    return write_file(tmp_path / stem, payload, gz)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_images(tmp_path, gz):
    full = idx_bytes(make_images(np.zeros(300, dtype=np.int64)))
    bad = _one_bad(tmp_path, STEMS[0], full[:-7], gz)
    with pytest.raises(DataError, match="truncated") as err:
        data.load_dataset("idx", tmp_path)
    assert str(bad) in str(err.value)


def test_truncated_gzip_stream(tmp_path):
    files = make_idx_folder(tmp_path, gz=True)
    blob = files[STEMS[2]].read_bytes()
    files[STEMS[2]].write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=STEMS[2]):
        data.load_dataset("idx", tmp_path)


def test_trailing_bytes(tmp_path):
    full = idx_bytes(np.zeros(300, dtype=np.uint8))
    _one_bad(tmp_path, STEMS[1], full + b"\0\0")
    with pytest.raises(DataError, match="trailing garbage"):
        data.load_dataset("idx", tmp_path)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x12\x34\x08\x03" + bytes(12), "bad magic"),
        (b"\0\0\x0d\x03" + np.array([300, 6, 5], ">u4").tobytes(), "dtype code 0x0d"),
        (b"\0\0\x08\x02" + np.array([300, 30], ">u4").tobytes() + bytes(9000), "2 dimensions, expected 3"),
        (b"\0\0\x08\x03" + np.array([300, 0, 5], ">u4").tobytes(), "empty shape"),
        (b"\0\0\x08\x03" + np.array([0xFFFFFFFF] * 3, ">u4").tobytes(), "implausibly large"),
        (b"\0\0\x08\x03\0\0\x01", "truncated inside the IDX header"),
        (b"\0\0", "too short"),
        (b"", "too short"),
    ],
)
def test_malformed_header(tmp_path, payload, message):
    bad = _one_bad(tmp_path, STEMS[0], payload)
    with pytest.raises(DataError, match=message) as err:
        data.load_dataset("idx", tmp_path)
    assert str(bad) in str(err.value)


def test_label_image_count_mismatch(tmp_path):
    _one_bad(tmp_path, STEMS[1], idx_bytes(np.zeros(299, dtype=np.uint8)))
    with pytest.raises(DataError, match="299 labels but .* has 300 images"):
        data.load_dataset("idx", tmp_path)


def test_test_image_size_mismatch(tmp_path):
    _one_bad(tmp_path, STEMS[2], idx_bytes(np.zeros((100, 6, 6), dtype=np.uint8)))
    with pytest.raises(DataError, match="6x6 but training images are 6x5"):
        data.load_dataset("idx", tmp_path)


@pytest.mark.parametrize(
    "blob",
    [b"\x1f\x8b\x08\x00" + b"garbage" * 10, b"\x1f\x8b"],
    ids=["garbage", "magic-only"],
)
def test_corrupt_gzip(tmp_path, blob):
    bad = _one_bad(tmp_path, STEMS[3], b"")
    bad.write_bytes(blob)
    with pytest.raises(DataError, match="corrupt gzip") as err:
        data.load_dataset("idx", tmp_path)
    assert STEMS[3] in str(err.value)


def test_gzip_crc_error(tmp_path):
    files = make_idx_folder(tmp_path, gz=True)
    blob = bytearray(files[STEMS[1]].read_bytes())
    blob[-6] ^= 0xFF  # inside the CRC32 trailer
    files[STEMS[1]].write_bytes(bytes(blob))
    with pytest.raises(DataError, match="corrupt gzip"):
        data.load_dataset("idx", tmp_path)


def test_label_out_of_range_for_named_dataset(tmp_path):
    make_idx_folder(tmp_path / "mnist", gz=False)
    labels = np.arange(300) % 11  # label 10 does not exist in MNIST
    (tmp_path / "mnist" / STEMS[1]).write_bytes(idx_bytes(labels.astype(np.uint8)))
    with pytest.raises(DataError, match=r"label 10 out of range.*0\.\.9") as err:
        data.load_dataset("mnist", tmp_path / "mnist")
    assert STEMS[1] in str(err.value)


def test_test_label_unseen_in_training(tmp_path):
    make_idx_folder(tmp_path, classes=4, gz=False)
    (tmp_path / STEMS[3]).write_bytes(idx_bytes((np.arange(100) % 6).astype(np.uint8)))
    with pytest.raises(DataError, match=f"{STEMS[3]}.*test label 5 out of range"):
        data.load_dataset("idx", tmp_path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from([b"", b"\0\0\x08\x03", b"\0\0\x08\x01", b"\x1f\x8b\x08\x00"]),
    body=st.binary(max_size=300),
    gz=st.booleans(),
    ndim=st.sampled_from([1, 3]),
)
def test_random_bytes_only_raise_data_error(prefix, body, gz, ndim):
    blob = prefix + body
    if gz:
        blob = gzip.compress(blob, mtime=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f"
        path.write_bytes(blob)
        try:
            arr = read_idx(path, ndim)
        except DataError as e:
            assert str(path) in str(e)
        else:
            assert arr.dtype == np.uint8 and arr.ndim == ndim


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 7), min_size=3, max_size=3), gz=st.booleans())
def test_read_idx_roundtrip(shape, gz):
    arr = np.random.default_rng(sum(shape)).integers(0, 256, size=shape, dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_file(Path(tmp) / "x", idx_bytes(arr), gz)
        assert np.array_equal(read_idx(path, 3), arr)


# ================================================================ lookup


def test_missing_file_names_file_and_places(tmp_path):
    files = make_idx_folder(tmp_path / "d")
    files[STEMS[3]].unlink()
    with pytest.raises(DataError) as err:
        data.load_dataset("mnist", tmp_path / "d")
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte[.gz]" in msg
    assert str(tmp_path / "d") in msg and str(tmp_path / "d" / "mnist") in msg
    assert "obdprune data download mnist" in msg and "download_dataset('mnist')" in msg and "\n" not in msg


def test_default_lookup_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("OBDPRUNE_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError) as err:
        data.find_data_dir("fashion-mnist")
    msg = str(err.value)
    for place in (tmp_path / "env", tmp_path / "env" / "fashion-mnist", tmp_path / "no-debian" / "fashion-mnist",
                  tmp_path / "xdg-cache" / "obdprune" / "fashion-mnist"):  # fmt: skip
        assert str(place) in msg
    assert msg.index(str(tmp_path / "env")) < msg.index("no-debian") < msg.index("xdg-cache")
    assert "apt install dataset-fashion-mnist" in msg


def test_explicit_data_dir_does_not_fall_back(tmp_path, monkeypatch):
    make_idx_folder(tmp_path / "env" / "mnist")
    monkeypatch.setenv("OBDPRUNE_DATA", str(tmp_path / "env"))
    assert data.find_data_dir("mnist") == tmp_path / "env" / "mnist"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="missing train-images"):
        data.find_data_dir("mnist", tmp_path / "empty")


def test_lookup_order(tmp_path, monkeypatch):
    debian, cache = tmp_path / "no-debian" / "mnist", tmp_path / "xdg-cache" / "obdprune" / "mnist"
    make_idx_folder(cache)
    assert data.find_data_dir("mnist") == cache
    make_idx_folder(debian)
    assert data.find_data_dir("mnist") == debian
    make_idx_folder(tmp_path / "env")
    monkeypatch.setenv("OBDPRUNE_DATA", str(tmp_path / "env"))
    assert data.find_data_dir("mnist") == tmp_path / "env"
    make_idx_folder(tmp_path / "mine")
    assert data.find_data_dir("mnist", tmp_path / "mine") == tmp_path / "mine"


def test_home_cache_when_no_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.user_cache_dir() == tmp_path / "home" / ".cache" / "obdprune"


def test_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="fashion-mnist, mnist, idx, digits, cifar10"):
        data.load_dataset("imagenet")
    with pytest.raises(UsageError, match="needs a data folder"):
        data.load_dataset("idx")
    make_idx_folder(tmp_path)
    for kwargs in ({"val_fraction": 1.0}, {"val_fraction": -0.1}, {"val_fraction": float("nan")},
                   {"train_limit": 0}, {"test_limit": -3}, {"train_limit": 2.5}):  # fmt: skip
        with pytest.raises(UsageError):
            data.load_dataset("idx", tmp_path, **kwargs)
    assert data.load_dataset("Fashion_MNIST", tmp_path).name == "fashion-mnist"


# ================================================================ splits, limits, normalization


def test_split_deterministic_disjoint_and_complete(tmp_path):
    make_idx_folder(tmp_path, n_train=500, n_test=120)
    torch.manual_seed(1)
    np.random.seed(1)
    a = data.load_dataset("idx", tmp_path, val_fraction=0.2)
    torch.manual_seed(2)
    np.random.seed(2)
    b = data.load_dataset("idx", tmp_path, val_fraction=0.2)
    for sa, sb in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y)
    train_ids, val_ids, test_ids = raw_ids(a.train, a), raw_ids(a.val, a), raw_ids(a.test, a)
    assert not set(train_ids) & set(val_ids)
    assert sorted([*train_ids, *val_ids]) == list(range(500))
    assert sorted(test_ids) == list(range(500, 620))  # nothing chosen on test
    # Stratified: every class contributes round(0.2 * count) ± 1, total exactly 100.
    counts_all = np.bincount(np.concatenate([a.train.y.numpy(), a.val.y.numpy()]))
    counts_val = np.bincount(a.val.y.numpy(), minlength=counts_all.size)
    assert counts_val.sum() == 100
    assert np.all(np.abs(counts_val - 0.2 * counts_all) <= 1)


def test_stratified_split_unit():
    y = np.repeat(np.arange(5), [1, 2, 10, 50, 137])
    keep, carved = splits.stratified_split(y, 0.3)
    assert np.intersect1d(keep, carved).size == 0 and np.union1d(keep, carved).size == y.size
    assert carved.size == round(0.3 * y.size)
    assert np.all(np.bincount(y[keep], minlength=5) >= 1)  # every class keeps a training example
    keep2, carved2 = splits.stratified_split(y, 0.3)
    assert np.array_equal(carved, carved2) and np.array_equal(keep, keep2)
    keep0, carved0 = splits.stratified_split(y, 0.0)
    assert carved0.size == 0 and keep0.size == y.size


@settings(max_examples=100, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=8), total=st.integers(0, 400))
def test_allocate_properties(counts, total):
    counts = np.array(counts)
    share = splits.allocate(counts, total)
    assert share.sum() == min(total, counts.sum())
    assert np.all(share >= 0) and np.all(share <= counts)
    if counts.sum():
        assert np.all(np.abs(share - counts * share.sum() / counts.sum()) < 1 + 1e-9)


def test_limits(tmp_path):
    make_idx_folder(tmp_path, n_train=500, n_test=120)
    ds = data.load_dataset("idx", tmp_path, train_limit=200, test_limit=50)
    assert len(ds.train) + len(ds.val) == 200 and len(ds.val) == 20 and len(ds.test) == 50
    full = data.load_dataset("idx", tmp_path)
    full_counts = np.bincount(np.concatenate([full.train.y, full.val.y]))
    lim_counts = np.bincount(np.concatenate([ds.train.y, ds.val.y]), minlength=full_counts.size)
    assert np.all(np.abs(lim_counts - full_counts * 200 / 500) <= 1)
    assert np.array_equal(np.bincount(ds.test.y.numpy()), np.full(10, 5))
    again = data.load_dataset("idx", tmp_path, train_limit=200, test_limit=50)
    assert torch.equal(again.train.x, ds.train.x) and torch.equal(again.test.y, ds.test.y)
    assert set(raw_ids(ds.test, ds)) <= set(range(500, 620))
    big = data.load_dataset("idx", tmp_path, train_limit=10_000, test_limit=10_000)
    assert len(big.train) + len(big.val) == 500 and len(big.test) == 120


def test_zero_val_fraction(tmp_path):
    make_idx_folder(tmp_path)
    ds = data.load_dataset("idx", tmp_path, val_fraction=0)
    assert len(ds.val) == 0 and ds.val.x.shape == (0, 1, 6, 5) and len(ds.train) == 300


def test_normalization_uses_train_portion_only(tmp_path):
    make_idx_folder(tmp_path)
    ds = data.load_dataset("idx", tmp_path, val_fraction=0.25)
    raw_train = ds.train.x.double() * ds.std[0] + ds.mean[0]  # back to [0, 1] units
    assert raw_train.mean().item() == pytest.approx(ds.mean[0], abs=1e-6)
    assert raw_train.std(unbiased=False).item() == pytest.approx(ds.std[0], abs=1e-6)
    raw_test = ds.test.x.double() * ds.std[0] + ds.mean[0]
    assert torch.allclose(raw_test * 255, (raw_test * 255).round(), atol=1e-3)  # same transform on test
    assert 0 <= raw_test.min() and raw_test.max() <= 1 + 1e-6


def test_constant_channel_gets_unit_std():
    mean, std = splits.channel_stats(np.full((4, 2, 3, 3), 51, dtype=np.uint8), 255.0)
    assert mean == pytest.approx((0.2, 0.2)) and std == (1.0, 1.0)


# ================================================================ digits


def test_digits():
    ds = data.load_dataset("digits")
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10 and ds.pixel_scale == 16.0
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    assert len(ds.test) == round(0.2 * 1797)
    assert np.all(np.bincount(ds.test.y.numpy()) >= 30)
    again = data.load_dataset("digits")
    assert torch.equal(again.test.x, ds.test.x) and torch.equal(again.train.y, ds.train.y)
    assert data.find_data_dir("digits").is_dir()


# ================================================================ CIFAR-10


def test_cifar_tiny_folder(tmp_path):
    make_cifar_folder(tmp_path / cifar.SUBFOLDER)
    ds = data.load_dataset("cifar10", tmp_path, val_fraction=0.2)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert len(ds.train) + len(ds.val) == 100 and len(ds.val) == 20 and len(ds.test) == 20
    assert ds.classes == tuple(f"class{i}" for i in range(10))
    assert len(ds.mean) == 3 and len(ds.std) == 3
    # Pixel layout: row-major (3, 32, 32) per image, as the batch's 3072 bytes.
    raw = pickle.loads((tmp_path / cifar.SUBFOLDER / cifar.TEST_BATCH).read_bytes(), encoding="bytes")
    x0 = torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32).astype(np.float32) / 255)
    mean, std = torch.tensor(ds.mean).view(3, 1, 1), torch.tensor(ds.std).view(3, 1, 1)
    assert torch.allclose(ds.test.x[0], (x0 - mean) / std, atol=1e-5)


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_cifar_other_protocols_without_meta(tmp_path, protocol):
    make_cifar_folder(tmp_path, protocol=protocol, meta=False)
    ds = data.load_dataset("cifar10", tmp_path)  # the folder itself holds the batches
    assert ds.classes == cifar.CLASSES and len(ds.test) == 20


def test_cifar_official_numpy_core_names(tmp_path):
    """The official files were written by numpy 1.x: numpy.core.multiarray._reconstruct."""
    make_cifar_folder(tmp_path)
    for name in (*cifar.TRAIN_BATCHES, cifar.TEST_BATCH):
        path = tmp_path / name
        blob = path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        assert b"cnumpy.core.multiarray\n_reconstruct" in blob
        path.write_bytes(blob)
    assert len(data.load_dataset("cifar10", tmp_path).test) == 20


def test_malicious_pickle_refused_and_not_run(tmp_path):
    make_cifar_folder(tmp_path)
    target = tmp_path / "pwned"
    payload = pickle.dumps({b"data": Evil(target), b"labels": [0]}, protocol=2)
    (tmp_path / "data_batch_3").write_bytes(payload)
    with pytest.raises(DataError, match=r"data_batch_3.*refusing to load global io\.open"):
        data.load_dataset("cifar10", tmp_path)
    assert not target.exists()
    # Control: the very same bytes do create the file under a plain unpickler.
    pickle.loads(payload)[b"data"].close()
    assert target.exists()


@pytest.mark.parametrize(
    "module, name",
    [("os", "system"), ("builtins", "eval"), ("numpy", "load"), ("subprocess", "Popen"), ("builtins", "getattr")],
)
def test_restricted_unpickler_refuses_globals(tmp_path, module, name):
    blob = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x04\x00\x00\x00argsq\x00\x85q\x01Rq\x02."
    path = tmp_path / "batch"
    path.write_bytes(blob)
    with pytest.raises(DataError, match=f"refusing to load global {module}.{name}"):
        cifar.safe_load_pickle(path)


def test_restricted_codecs_encode_only_latin1(tmp_path):
    path = tmp_path / "batch"
    ok = pickle.dumps(b"\xff\x00abc", protocol=2)
    assert b"_codecs" in ok
    path.write_bytes(ok)
    assert cifar.safe_load_pickle(path) == b"\xff\x00abc"
    path.write_bytes(ok.replace(b"latin1", b"rot-13"[:6]))
    with pytest.raises(DataError, match="unsafe"):
        cifar.safe_load_pickle(path)


@pytest.mark.parametrize(
    "obj, message",
    [
        ([1, 2, 3], "top level is list"),
        ({b"labels": [0]}, "needs keys"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8 array of shape"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "uint8 array of shape"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "1 labels but 2 images"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, -1]}, "negative label"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, "list of integers"),
    ],
)
def test_cifar_malformed_batches(tmp_path, obj, message):
    make_cifar_folder(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError, match=message) as err:
        data.load_dataset("cifar10", tmp_path)
    assert "test_batch" in str(err.value)


def test_cifar_truncated_and_missing(tmp_path):
    make_cifar_folder(tmp_path)
    blob = (tmp_path / "data_batch_2").read_bytes()
    (tmp_path / "data_batch_2").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="data_batch_2.*malformed or truncated"):
        data.load_dataset("cifar10", tmp_path)
    (tmp_path / "data_batch_5").unlink()
    with pytest.raises(DataError, match="missing data_batch_5"):
        data.load_dataset("cifar10", tmp_path)


def test_cifar_labels_beyond_meta(tmp_path):
    make_cifar_folder(tmp_path)
    meta = {b"label_names": [b"a", b"b", b"c"]}
    (tmp_path / cifar.META).write_bytes(pickle.dumps(meta, protocol=2))
    with pytest.raises(DataError, match="label 9 out of range"):
        data.load_dataset("cifar10", tmp_path)


@settings(max_examples=150, deadline=None)
@given(body=st.binary(max_size=200), prefix=st.sampled_from([b"", b"\x80\x02", b"\x80\x02}q\x00("]))
def test_random_bytes_as_cifar_batch(body, prefix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data_batch_1"
        path.write_bytes(prefix + body)
        try:
            cifar.read_batch(path)
        except DataError as e:
            assert "data_batch_1" in str(e)


# ================================================================ downloads


def _served_mnist(folder: Path) -> dict[str, str]:
    files = make_idx_folder(folder, hw=(28, 28), gz=True)
    return {p.name: md5(p) for p in files.values()}


def test_download_good_checksum_then_load(tmp_path, monkeypatch):
    sums = _served_mnist(tmp_path / "srv")
    monkeypatch.setitem(download.SOURCES["fashion-mnist"], "files", sums)
    with serve(tmp_path / "srv") as (url, server):
        dest = data.download_dataset("fashion-mnist", tmp_path / "dl", base_url=url, progress=False)
        assert dest == tmp_path / "dl"
        assert sorted(p.name for p in dest.iterdir()) == sorted(sums)
        ds = data.load_dataset("fashion-mnist", dest)
        assert ds.input_shape == (1, 28, 28) and len(ds.test) == 100
        n = len(server.requests)
        data.download_dataset("fashion-mnist", tmp_path / "dl", base_url=url, progress=False)
        assert len(server.requests) == n  # verified files are not fetched again


def test_download_default_dest_and_env_mirror(tmp_path, monkeypatch):
    sums = _served_mnist(tmp_path / "srv")
    monkeypatch.setitem(download.SOURCES["mnist"], "files", sums)
    with serve(tmp_path / "srv") as (url, _):
        monkeypatch.setenv("OBDPRUNE_MIRROR", url)
        dest = data.download_dataset("mnist", progress=True)
    assert dest == tmp_path / "xdg-cache" / "obdprune" / "mnist"
    assert data.find_data_dir("mnist") == dest
    assert data.load_dataset("mnist").num_classes == 10


def test_download_bad_checksum_leaves_nothing(tmp_path):
    _served_mnist(tmp_path / "srv")  # real MD5s in SOURCES will not match these files
    with serve(tmp_path / "srv") as (url, _):
        with pytest.raises(DataError) as err:
            data.download_dataset("mnist", tmp_path / "dl", base_url=url, progress=False)
    msg = str(err.value)
    assert f"{url}train-images-idx3-ubyte.gz" in msg and "checksum mismatch" in msg
    assert download.SOURCES["mnist"]["files"]["train-images-idx3-ubyte.gz"] in msg
    assert md5(tmp_path / "srv" / "train-images-idx3-ubyte.gz") in msg
    assert list((tmp_path / "dl").iterdir()) == []


def test_download_404(tmp_path):
    (tmp_path / "srv").mkdir()
    with serve(tmp_path / "srv") as (url, _):
        with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: HTTP 404"):
            data.download_dataset("fashion-mnist", tmp_path / "dl", base_url=url, progress=False)
    assert list((tmp_path / "dl").iterdir()) == []


def test_download_falls_back_to_next_mirror(tmp_path, monkeypatch):
    sums = _served_mnist(tmp_path / "srv" / "good")
    monkeypatch.setitem(download.SOURCES["mnist"], "files", sums)
    with serve(tmp_path / "srv") as (url, server):
        monkeypatch.setitem(download.SOURCES["mnist"], "mirrors", (url + "missing/", url + "good/"))
        dest = data.download_dataset("mnist", tmp_path / "dl", progress=False)
    assert data.find_data_dir("mnist", dest) == dest
    assert any(p.startswith("/missing/") for p in server.requests)


def test_download_connection_refused(tmp_path):
    with serve(tmp_path) as (url, _):
        pass  # server closed: the port now refuses connections
    with pytest.raises(DataError, match="download failed"):
        data.download_dataset("mnist", tmp_path / "dl", base_url=url, progress=False)


def test_download_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="http"):
        data.download_dataset("mnist", tmp_path, base_url="file:///etc/", progress=False)
    with pytest.raises(UsageError, match="scikit-learn"):
        data.download_dataset("digits", tmp_path)
    with pytest.raises(UsageError, match="valid names"):
        data.download_dataset("nope", tmp_path)


def _tarball(path: Path, members: dict[str, bytes], extra: tarfile.TarInfo | None = None) -> str:
    with tarfile.open(path, "w:gz") as tf:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
        if extra is not None:
            tf.addfile(extra, io.BytesIO(b"x" * extra.size) if extra.isfile() else None)
    return md5(path)


def _cifar_members() -> dict[str, bytes]:
    names = (*cifar.TRAIN_BATCHES, cifar.TEST_BATCH)
    return {f"{cifar.SUBFOLDER}/{n}": cifar_batch_bytes(10, seed=i) for i, n in enumerate(names)}


def test_download_cifar10(tmp_path, monkeypatch):
    (tmp_path / "srv").mkdir()
    digest = _tarball(tmp_path / "srv" / "cifar-10-python.tar.gz", _cifar_members())
    monkeypatch.setitem(download.SOURCES["cifar10"], "files", {"cifar-10-python.tar.gz": digest})
    with serve(tmp_path / "srv") as (url, _):
        dest = data.download_dataset("cifar10", tmp_path / "dl", base_url=url, progress=False)
    assert sorted(p.name for p in dest.iterdir()) == [cifar.SUBFOLDER]  # archive removed, no temp left
    ds = data.load_dataset("cifar10", dest)
    assert ds.input_shape == (3, 32, 32) and len(ds.test) == 10 and ds.classes == cifar.CLASSES


@pytest.mark.parametrize("evil", ["../evil", "/tmp/obdprune-evil-abs", f"{cifar.SUBFOLDER}/../../evil", "link"])
def test_download_cifar10_unsafe_archive(tmp_path, monkeypatch, evil):
    (tmp_path / "srv").mkdir()
    extra = tarfile.TarInfo(evil)
    if evil == "link":
        extra.name, extra.type, extra.linkname = f"{cifar.SUBFOLDER}/link", tarfile.SYMTYPE, "/etc/passwd"
    else:
        extra.size = 1
    digest = _tarball(tmp_path / "srv" / "cifar-10-python.tar.gz", _cifar_members(), extra)
    monkeypatch.setitem(download.SOURCES["cifar10"], "files", {"cifar-10-python.tar.gz": digest})
    (tmp_path / "dl" / "sub").mkdir(parents=True)
    with serve(tmp_path / "srv") as (url, _):
        with pytest.raises(DataError, match="refusing"):
            data.download_dataset("cifar10", tmp_path / "dl" / "sub", base_url=url, progress=False)
    assert not (tmp_path / "dl" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not Path("/tmp/obdprune-evil-abs").exists()
    assert not (tmp_path / "dl" / "sub" / cifar.SUBFOLDER).exists()
