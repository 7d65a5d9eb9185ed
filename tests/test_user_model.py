"""The user's own architecture as FILE.py:FACTORY or package.module:FACTORY: calling, recording, refusing."""
import textwrap

import pytest
import torch
from torch import nn

from obdprune.errors import ModelFileError, UsageError
from obdprune.models import build_model, check_model_name, model_spec, rebuild_model
from obdprune.runfile import load_run, save_run

NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        c, h, w = input_shape
        self.conv = nn.Conv2d(c, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * h * w, num_classes)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.fc(torch.relu(y + y.flip(1)).flatten(1))


def with_kwargs(input_shape, num_classes):
    return Net(input_shape, num_classes)


def without_args():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))


def any_kwargs(**kw):
    return Net(kw["input_shape"], kw["num_classes"])


def classes_only(num_classes, width=12):
    return nn.Sequential(nn.Flatten(), nn.Linear(width, num_classes))


def raises(input_shape, num_classes):
    raise RuntimeError("no GPU found\\nsecond line")


def not_a_module():
    return 42


NOT_CALLABLE = 3
from os import getcwd as imported_elsewhere
"""


@pytest.fixture
def net_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(NET)
    return path


@pytest.mark.parametrize("factory, classes", [("with_kwargs", 5), ("without_args", 3), ("any_kwargs", 5),
                                              ("classes_only", 5), ("Net", 5)])
def test_factory_gets_the_arguments_its_signature_takes(net_file, factory, classes):
    model = build_model(f"{net_file}:{factory}", (3, 2, 2), 5)
    assert isinstance(model, nn.Module)
    assert model(torch.randn(7, 3, 2, 2)).shape == (7, classes)


def test_relative_file_is_recorded_absolute_with_its_hash(net_file, monkeypatch):
    import hashlib

    monkeypatch.chdir(net_file.parent)
    spec = model_spec("net.py:with_kwargs", (1, 4, 4), 3)
    assert spec["name"] == f"{net_file}:with_kwargs" and spec["file"] == str(net_file)
    assert spec["sha256"] == hashlib.sha256(net_file.read_bytes()).hexdigest()
    assert spec["input_shape"] == [1, 4, 4] and spec["num_classes"] == 3
    monkeypatch.chdir("/")
    assert rebuild_model(spec)(torch.randn(2, 1, 4, 4)).shape == (2, 3)


def test_package_module_form(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg_obd"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "blocks.py").write_text("from torch import nn\nWIDTH = 6\n")
    (pkg / "nets.py").write_text(textwrap.dedent("""
        from torch import nn
        from .blocks import WIDTH

        def make(input_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[1] * input_shape[2], WIDTH),
                                 nn.ReLU(), nn.Linear(WIDTH, num_classes))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = model_spec("userpkg_obd.nets:make", (1, 3, 3), 4)
    assert spec["name"] == "userpkg_obd.nets:make" and spec["file"] == str(pkg / "nets.py")
    model = rebuild_model(spec)
    assert model(torch.randn(2, 1, 3, 3)).shape == (2, 4) and model[1].out_features == 6
    (pkg / "nets.py").write_text((pkg / "nets.py").read_text() + "\n# edited\n")
    with pytest.raises(ModelFileError, match="changed since the run was made"):
        rebuild_model(spec)


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("suffix, match", [
    (":missing", "defines no 'missing'"),
    (":raises", r"raises\(input_shape=\(1, 2, 2\), num_classes=3\) raised RuntimeError: no GPU found"),
    (":not_a_module", "returned int, not a torch.nn.Module"),
    (":NOT_CALLABLE", "not a callable factory"),
    (":imported_elsewhere", "imported_elsewhere is defined in posix, not in .*net.py; name the file that defines"),
])
def test_factory_mistakes_are_one_line_usage_errors(net_file, suffix, match):
    with pytest.raises(UsageError, match=match) as e:
        build_model(f"{net_file}{suffix}", (1, 2, 2), 3)
    _one_line(e)


@pytest.mark.parametrize("spec, match", [
    ("{d}/absent.py:make", "absent.py does not exist"),
    ("{d}/net.txt:make", "is not a .py file"),
    ("{d}/net.py:", "is not of the form FILE.py:FACTORY"),
    ("{d}/net.py:not-an-identifier", "is not of the form"),
    ("no_such_pkg_obd.nets:make", "cannot import no_such_pkg_obd.nets|no module named"),
    ("resnet9000", "unknown model 'resnet9000'.*FILE.py:FACTORY or package.module:FACTORY"),
])
def test_bad_specs_are_refused_before_running_anything(net_file, spec, match):
    with pytest.raises(UsageError, match=match) as e:
        check_model_name(spec.format(d=net_file.parent))
    _one_line(e)


def test_broken_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def make(:\n")
    with pytest.raises(UsageError, match="running .*bad.py failed \\(SyntaxError") as e:
        build_model(f"{bad}:make", (1, 2, 2), 3)
    _one_line(e)


def test_run_reloads_from_the_file_and_refuses_it_changed_or_missing(net_file, tmp_path):
    torch.manual_seed(0)
    name = f"{net_file}:with_kwargs"
    model = build_model(name, (1, 4, 4), 3).eval()
    run = save_run(tmp_path / "run", model, {"model": model_spec(name, (1, 4, 4), 3)})
    x = torch.randn(5, 1, 4, 4)
    loaded = load_run(run)
    assert loaded.manifest["model"]["file"] == str(net_file)
    torch.testing.assert_close(loaded.model.eval()(x), model(x), rtol=0, atol=0)

    original = net_file.read_text()
    net_file.write_text(original.replace("padding=1", "padding=1 "))  # same code, different bytes
    with pytest.raises(ModelFileError, match="net.py changed since the run was made") as e:
        load_run(run)
    _one_line(e)
    net_file.unlink()
    with pytest.raises(ModelFileError, match="net.py no longer exists") as e:
        load_run(run)
    _one_line(e)
    net_file.write_text(original)
    assert load_run(run).manifest["model"]["name"] == name


def test_manifest_without_the_hash_is_refused(net_file):
    with pytest.raises(ModelFileError, match="does not record its file and sha256"):
        rebuild_model({"name": f"{net_file}:with_kwargs", "input_shape": [1, 4, 4], "num_classes": 3})
    spec = model_spec(f"{net_file}:with_kwargs", (1, 4, 4), 3)
    with pytest.raises(ModelFileError, match="not an absolute path"):
        rebuild_model({**spec, "file": "net.py"})
