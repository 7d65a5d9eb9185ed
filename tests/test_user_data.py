"""The user's own data: an ImageFolder-style folder of images, and arrays in an .npz file."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from obdprune import data
from obdprune.data import load_dataset, load_image_folder, load_npz
from obdprune.errors import DataError, UsageError


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _folder(root: Path, counts: dict[str, dict[str, int]], size=(6, 5), rgb_class: str | None = None, seed=0) -> dict:
    """Write ``counts[split][class]`` images of ``size`` (H, W): gray, or RGB for ``rgb_class``. Returns the pixels."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, classes in counts.items():
        for name, n in classes.items():
            for i in range(n):
                shape = (*size, 3) if name == rgb_class else size
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                path = root / split / name / f"{i:02d}.png"
                _save(path, pixels)
                written[path] = pixels
    return written


def _one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def test_folder_of_grayscale_images(tmp_path):
    written = _folder(tmp_path, {"train": {"b": 3, "a": 2}, "test": {"b": 2}})
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "a" / "._00.png").write_bytes(b"resource fork junk")
    x_tr, y_tr, x_te, y_te, names = load_image_folder(tmp_path)
    assert names == ("a", "b")  # sorted folder names
    assert x_tr.shape == (5, 1, 6, 5) and x_tr.dtype == np.uint8 and x_te.shape == (2, 1, 6, 5)
    assert y_tr.tolist() == [0, 0, 1, 1, 1] and y_te.tolist() == [1, 1]
    np.testing.assert_array_equal(x_tr[0, 0], written[tmp_path / "train" / "a" / "00.png"])
    np.testing.assert_array_equal(x_te[1, 0], written[tmp_path / "test" / "b" / "01.png"])


def test_one_color_image_makes_every_image_rgb(tmp_path):
    written = _folder(tmp_path, {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}}, rgb_class="b")
    x_tr, y_tr, _, _, _ = load_image_folder(tmp_path)
    assert x_tr.shape == (4, 3, 6, 5)
    gray = written[tmp_path / "train" / "a" / "00.png"]
    for c in range(3):
        np.testing.assert_array_equal(x_tr[0, c], gray)
    np.testing.assert_array_equal(x_tr[2].transpose(1, 2, 0), written[tmp_path / "train" / "b" / "00.png"])


def test_sizes_must_agree_unless_resized(tmp_path):
    _folder(tmp_path, {"train": {"a": 2, "b": 2}, "test": {"a": 1}})
    _save(tmp_path / "test" / "b" / "big.png", np.full((9, 7), 200, np.uint8))
    with pytest.raises(DataError, match=r"big.png is 9x7 \(HxW\) but .* is 6x5.*image_size") as e:
        load_image_folder(tmp_path)
    _one_line(e)
    x_tr, _, x_te, _, _ = load_image_folder(tmp_path, image_size=(4, 3))
    assert x_tr.shape == (4, 1, 4, 3) and x_te.shape == (2, 1, 4, 3)
    assert (x_te[1] == 200).all()  # a constant image stays constant when resized
    ds = load_dataset("folder", tmp_path, image_size=(4, 3), val_fraction=0)
    assert ds.input_shape == (1, 4, 3) and ds.classes == ("a", "b")


@pytest.mark.parametrize("size", [(0, 3), (4,), (4.0, 3), "44", (True, 3)])
def test_bad_image_size(tmp_path, size):
    _folder(tmp_path, {"train": {"a": 1, "b": 1}, "test": {"a": 1}})
    with pytest.raises(UsageError, match="image_size"):
        load_dataset("folder", tmp_path, image_size=size)


def test_folder_statistics_come_from_the_training_split(tmp_path):
    _folder(tmp_path, {"train": {"a": 10, "b": 10}, "test": {"a": 4, "b": 4}}, rgb_class="a")
    ds = load_dataset("folder", tmp_path, val_fraction=0.2, train_limit=16)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (13, 3, 8)
    assert ds.name == "folder" and ds.num_classes == 2 and ds.input_shape == (3, 6, 5)
    per_channel = ds.train.x.transpose(0, 1).reshape(3, -1).double()
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1, unbiased=False), torch.ones(3, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert abs(float(ds.test.x.mean())) > 1e-4  # test images are normalized with the training statistics


@pytest.mark.parametrize("make, match", [
    (lambda r: _folder(r, {"train": {"a": 1, "b": 1}}), "no test/ folder"),
    (lambda r: _folder(r, {"train": {"a": 1}, "test": {"a": 1, "zebra": 1}}), r"classes \['zebra'\] have no folder"),
    (lambda r: (_folder(r, {"train": {"a": 1}, "test": {"a": 1}}), (r / "train" / "b").mkdir()), "train/b holds no"),
    (lambda r: (_folder(r, {"train": {"a": 1}, "test": {"a": 1}}),
                (r / "train" / "a" / "junk.jpg").write_bytes(b"\xff\xd8 not really")), "junk.jpg is not a readable image"),
    (lambda r: (_folder(r, {"train": {"a": 1}, "test": {"a": 1}}),
                Image.fromarray(np.zeros((6, 5), np.uint16)).save(r / "train" / "a" / "deep.png")), "deep.png has I"),
])
def test_folder_mistakes_name_the_culprit(tmp_path, make, match):
    make(tmp_path)
    with pytest.raises(DataError, match=match) as e:
        load_dataset("folder", tmp_path)
    _one_line(e)


def test_user_datasets_need_a_path(tmp_path):
    with pytest.raises(UsageError, match="'folder' needs data_dir"):
        load_dataset("folder")
    with pytest.raises(UsageError, match="'npz' needs data_dir"):
        load_dataset("npz")
    with pytest.raises(UsageError, match="image_size resizes the images of the folder dataset"):
        load_dataset("digits", image_size=(4, 4))
    with pytest.raises(UsageError, match="nothing to download"):
        data.download_dataset("npz", tmp_path)


def _npz(path: Path, n_train=40, n_test=12, shape=(6, 5), layout="nhw", dtype=np.uint8, classes=3, **extra) -> Path:
    rng = np.random.default_rng(1)

    def images(n):
        x = rng.integers(0, 256, (n, *shape)).astype(dtype)
        if layout == "nhwc":
            return np.repeat(x[..., None], 3, axis=-1)
        if layout == "nchw":
            return np.repeat(x[:, None], 3, axis=1)
        return x

    arrays = {"x_train": images(n_train), "y_train": np.arange(n_train) % classes,
              "x_test": images(n_test), "y_test": np.arange(n_test) % classes}
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("layout, channels", [("nhw", 1), ("nhwc", 3), ("nchw", 3)])
def test_npz_layouts(tmp_path, layout, channels):
    path = _npz(tmp_path / "d.npz", layout=layout)
    x_tr, y_tr, x_te, y_te, scale, names = load_npz(path)
    assert x_tr.shape == (40, channels, 6, 5) and x_te.shape == (12, channels, 6, 5) and scale == 255.0
    assert names is None and y_tr.dtype == np.int64
    raw = np.load(path)["x_train"]
    expected = raw[:, None] if layout == "nhw" else raw.transpose(0, 3, 1, 2) if layout == "nhwc" else raw
    np.testing.assert_array_equal(x_tr, expected)
    ds = load_dataset("npz", path, val_fraction=0.25, train_limit=36, test_limit=6)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (27, 9, 6) and ds.num_classes == 3


def test_npz_floats_are_normalized_with_float_training_statistics(tmp_path):
    from obdprune.data.splits import stratified_split

    path = _npz(tmp_path / "d.npz", dtype=np.float64, classes=2)
    np.savez(path, **{k: (v / 255.0 * 3 - 1 if k.startswith("x") else v) for k, v in np.load(path).items()},
             classes=np.array(["no", "yes"]), notes=np.zeros(1))  # arrays other than these are ignored
    ds = load_dataset("npz", path, val_fraction=0.1)
    assert ds.pixel_scale == 1.0 and ds.classes == ("no", "yes") and ds.train.x.dtype == torch.float32
    x, y = np.load(path)["x_train"], np.load(path)["y_train"]
    kept, carved = stratified_split(y, 0.1)
    assert len(carved) == 4
    assert ds.mean[0] == pytest.approx(x[kept].mean(), rel=1e-6)
    assert ds.std[0] == pytest.approx(x[kept].std(), rel=1e-6)
    torch.testing.assert_close(ds.test.x[:, 0].double(),
                               torch.from_numpy((np.load(path)["x_test"] - x[kept].mean()) / x[kept].std()),
                               atol=1e-5, rtol=0)


def test_npz_object_arrays_are_refused_not_unpickled(tmp_path):
    path = tmp_path / "evil.npz"
    good = np.load(_npz(tmp_path / "good.npz"))
    np.savez(path, x_train=np.array([object(), 1], dtype=object), y_train=good["y_train"],
             x_test=good["x_test"], y_test=good["y_test"])
    with pytest.raises(DataError, match="x_train holds Python objects .* never unpickles") as e:
        load_dataset("npz", path)
    _one_line(e)


@pytest.mark.parametrize("change, match", [
    (dict(y_train=-(np.arange(40) % 3)), "negative label -2"),
    (dict(y_train=np.arange(40) % 3 + 0.5), "non-integer values"),
    (dict(y_train=np.eye(3)[np.arange(40) % 3]), "not one-hot"),
    (dict(y_train=np.arange(39) % 3), "39 labels for 40 images"),
    (dict(y_test=np.arange(12) % 3 + 1), "test label 3 out of range; training labels .* go up to 2"),
    (dict(y_train=np.array(["a"] * 40)), "labels must be integers"),
    (dict(x_test=np.zeros((12, 7, 5), np.uint8)), r"x_test images are \(1, 7, 5\)"),
    (dict(x_test=np.zeros((12, 6, 5), np.float32)), "x_train is uint8 but x_test is float32"),
    (dict(x_train=np.full((40, 6, 5), 300, np.int32)), "values in \\[300, 300\\]"),
    (dict(x_train=np.zeros((40, 6, 5, 2), np.uint8)), "expected \\(N, H, W\\), \\(N, H, W, C\\) or \\(N, C, H, W\\)"),
    (dict(x_train=np.full((40, 6, 5), np.nan)), "NaN or inf"),
    (dict(classes=np.array([[1, 2]])), "classes must be a 1-D array of strings"),
])
def test_npz_mistakes(tmp_path, change, match):
    base = dict(np.load(_npz(tmp_path / "base.npz")))
    np.savez(tmp_path / "d.npz", **{**base, **change})
    with pytest.raises(DataError, match=match) as e:
        load_dataset("npz", tmp_path / "d.npz")
    _one_line(e)


def test_npz_file_problems(tmp_path):
    base = dict(np.load(_npz(tmp_path / "base.npz")))
    del base["y_test"]
    np.savez(tmp_path / "missing.npz", **base)
    with pytest.raises(DataError, match=r"missing arrays \['y_test'\]"):
        load_dataset("npz", tmp_path / "missing.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(DataError, match="single array"):
        load_dataset("npz", tmp_path / "one.npy")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="junk.npz is not a readable .npz"):
        load_dataset("npz", tmp_path / "junk.npz")
    with pytest.raises(DataError, match="absent.npz does not exist"):
        load_dataset("npz", tmp_path / "absent.npz")
    with pytest.raises(UsageError, match="is a folder"):
        load_dataset("npz", tmp_path)
