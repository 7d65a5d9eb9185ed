"""The CLI on the user's own architecture (--model file.py:factory) and data (--dataset folder / npz), end to end."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from obdprune.cli import main

NET = """
import torch
from torch import nn


class SmallResNet(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        c = input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.pool(x), 1))


def make(input_shape, num_classes):
    return SmallResNet(input_shape, num_classes)
"""
CLASSES = 3
FAST = ["--epochs", "1", "--batch-size", "16", "--no-progress"]
FAST_PRUNE = ["--finetune-epochs", "1", "--reg-epochs", "1", "--curvature-samples", "16", "--batch-size", "16",
              "--no-progress"]


def _images(rng, n, size, rgb):
    """Class c is brighter in the image's top half the larger c is, so 1 epoch learns something."""
    labels = np.arange(n) % CLASSES
    x = rng.integers(0, 60, (n, *size, 3) if rgb else (n, *size)).astype(np.uint8)
    x[:, : size[0] // 2] += (labels * 90).astype(np.uint8).reshape(-1, 1, 1, *([1] if rgb else []))
    return x, labels


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    (root / "net.py").write_text(NET)
    rng = np.random.default_rng(0)
    x, y = _images(rng, 48, (8, 8), rgb=False)
    np.savez(root / "d.npz", x_train=x[:36], y_train=y[:36], x_test=x[36:], y_test=y[36:])
    for split, n in (("train", 36), ("test", 12)):
        xs, ys = _images(rng, n, (10, 10), rgb=True)
        for i, (img, label) in enumerate(zip(xs, ys)):
            folder = root / "images" / split / f"class_{'abc'[label]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i}.png")
    Image.fromarray(xs[0][:7]).save(root / "images" / "test" / "class_a" / "odd.png")  # one image of another size
    return root


DATASETS = {"npz": lambda r: ["--dataset", "npz", "--data-dir", str(r / "d.npz")],
            "folder": lambda r: ["--dataset", "folder", "--data-dir", str(r / "images"), "--image-size", "8", "8"]}


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_every_command_on_the_users_model_and_data(user, dataset, tmp_path, capsys):
    model = f"{user / 'net.py'}:make"
    data = DATASETS[dataset](user)
    dense = tmp_path / "dense"
    assert main(["train", *data, "--model", model, *FAST, "--out", str(dense)]) == 0
    m = json.loads((dense / "manifest.json").read_text())
    assert m["model"]["name"] == model and m["model"]["file"] == str(user / "net.py") and len(m["model"]["sha256"]) == 64
    channels = 1 if dataset == "npz" else 3
    assert m["model"]["input_shape"] == [channels, 8, 8] and m["model"]["num_classes"] == CLASSES
    assert m["dataset"]["name"] == dataset and len(m["dataset"]["mean"]) == channels and m["dataset"]["pixel_scale"] == 255

    pruned = tmp_path / "pruned"
    assert main(["prune", str(dense), "--method", "hybrid", "--granularity", "channel", "--sparsity", "0.3",
                 "--out", str(pruned), *FAST_PRUNE]) == 0
    pm = json.loads((pruned / "manifest.json").read_text())
    assert pm["model"] == m["model"] and pm["metrics"]["sparsity"] >= 0.25

    capsys.readouterr()
    assert main(["evaluate", str(pruned), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"] == model and res["test_accuracy"] == pytest.approx(pm["metrics"]["test_accuracy"])

    onnx = tmp_path / "small.onnx"
    assert main(["export", str(pruned), "--format", "onnx", "--compact", "--out", str(onnx)]) == 0
    assert onnx.stat().st_size > 0
    compacted = tmp_path / "compacted"
    assert main(["export", str(pruned), "--format", "safetensors", "--compact", "--out", str(compacted)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(compacted), "--json"]) == 0  # a compacted run rebuilds from the file too
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == pytest.approx(res["test_accuracy"], abs=1e-6)

    assert main(["bench", str(pruned), "--repeats", "1", "--batch-sizes", "1", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert bench["run"]["weights_after_compaction"] < bench["dense"]["weights_after_compaction"]

    study = tmp_path / "study"
    assert main(["compare", *data, "--model", model, *FAST, "--methods", "magnitude", "obd", "--sparsity", "0.5",
                 "--finetune-epochs", "0", "--reg-epochs", "0", "--curvature-samples", "16", "--no-measure",
                 "--out", str(study)]) == 0
    summary = json.loads((study / "summary.json").read_text())
    assert summary["model"] == model and [r["method"] for r in summary["results"]] == ["magnitude", "obd"]


def test_a_changed_or_missing_model_file_is_refused_on_reload(user, tmp_path, capsys):
    net = tmp_path / "net.py"
    net.write_text(NET)
    model = f"{net}:make"
    dense = tmp_path / "dense"
    assert main(["train", *DATASETS["npz"](user), "--model", model, *FAST, "--out", str(dense)]) == 0
    net.write_text(NET + "\n# tuned the width\n")
    commands = [["evaluate", str(dense)], ["bench", str(dense), "--repeats", "1", "--batch-sizes", "1"],
                ["export", str(dense), "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
                ["prune", str(dense), "--method", "magnitude", "--sparsity", "0.5", "--out", str(tmp_path / "p"),
                 *FAST_PRUNE]]
    for argv in commands:
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("obdprune: error: ")
        assert "net.py changed since the run was made" in err, err
    assert not (tmp_path / "p").exists() and not (tmp_path / "m.onnx").exists()
    net.unlink()
    assert main(["evaluate", str(dense)]) == 1
    assert "net.py no longer exists" in capsys.readouterr().err


def test_user_mistakes_are_one_line(user, tmp_path, capsys):
    cases = [
        (["train", *DATASETS["npz"](user), "--model", f"{tmp_path}/absent.py:make", "--out", str(tmp_path / "a")],
         2, "absent.py does not exist"),
        (["train", *DATASETS["npz"](user), "--model", f"{user / 'net.py'}:nope", "--out", str(tmp_path / "a")],
         2, "defines no 'nope'"),
        (["train", "--dataset", "folder", "--data-dir", str(user / "images"), "--model", "lenet5", "--out",
          str(tmp_path / "a")], 1, "all images must share one size.*--image-size H W"),
        (["train", "--dataset", "npz", "--model", "lenet5", "--out", str(tmp_path / "a")], 2, "'npz' needs data_dir"),
        (["import-torch", str(tmp_path / "x.pt"), "--model", "mine:make", *DATASETS["npz"](user), "--out",
          str(tmp_path / "a")], 2, "no module named 'mine'"),
    ]
    for argv, code, match in cases:
        capsys.readouterr()
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert __import__("re").search(match, err), err
    assert not (tmp_path / "a").exists()


def test_import_torch_uses_the_datas_training_statistics(user, tmp_path, capsys):
    from obdprune.data import load_dataset
    from obdprune.models import build_model
    from obdprune.train import evaluate

    model = f"{user / 'net.py'}:make"
    torch.manual_seed(3)
    net = build_model(model, (1, 8, 8), CLASSES)
    torch.save(net.state_dict(), tmp_path / "mine.pt")
    out = tmp_path / "imported"
    assert main(["import-torch", str(tmp_path / "mine.pt"), "--model", model, *DATASETS["npz"](user),
                 "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    data = load_dataset("npz", user / "d.npz")
    assert m["dataset"]["mean"] == list(data.mean) and m["dataset"]["std"] == list(data.std)
    x = np.load(user / "d.npz")["x_test"][:, None] / 255.0
    by_hand = torch.from_numpy(((x - data.mean[0]) / data.std[0]).astype(np.float32))
    acc, _ = evaluate(net.eval(), (by_hand, data.test.y))
    assert m["metrics"]["test_accuracy"] == pytest.approx(acc)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == pytest.approx(acc)
