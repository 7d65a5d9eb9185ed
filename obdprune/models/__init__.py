"""Models by name: the reference models, and the user's own as ``FILE.py:FACTORY`` or ``package.module:FACTORY``.

Every model adapts to the input shape and class count of the data. The Python API accepts any
``nn.Module``; these names are what the CLI builds and what a manifest records to rebuild a run.
A user model's name runs the user's code (see :mod:`obdprune.models.user`).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from obdprune.errors import ModelFileError, UsageError
from obdprune.models.user import FORMS, build_user_model, is_user_spec, rebuild_user_model, resolve_user_model

__all__ = ["MODELS", "build_model", "check_model_name", "model_spec", "rebuild_model"]

InputShape = tuple[int, int, int]


def _conv_out(size: int, kernel: int, padding: int = 0, stride: int = 1) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _pad_for(size: int, kernel: int) -> int:
    """Zero padding a 'valid' convolution needs so that a 2x2 pool still has >= 1 pixel after it."""
    return 0 if _conv_out(size, kernel) >= 2 else kernel // 2


def lenet300(input_shape: InputShape, num_classes: int) -> nn.Sequential:
    """LeNet-300-100: Flatten → 300 → 100 → classes (784-300-100-10 has 266,200 weights)."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(c * h * w, 300), nn.ReLU(),
        nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def _lenet_cnn(input_shape: InputShape, num_classes: int, c1: int, c2: int, fcs: tuple[int, ...],
               first_padding: int | None) -> nn.Sequential:
    c, h, w = input_shape
    p1 = _pad_for(min(h, w), 5) if first_padding is None else first_padding
    h1, w1 = _conv_out(h, 5, p1) // 2, _conv_out(w, 5, p1) // 2
    p2 = _pad_for(min(h1, w1), 5)
    h2, w2 = _conv_out(h1, 5, p2) // 2, _conv_out(w1, 5, p2) // 2
    if min(h1, w1, h2, w2) < 1:
        raise UsageError(f"input of {h}x{w} pixels is too small for this LeNet model")
    layers: list[nn.Module] = [
        nn.Conv2d(c, c1, 5, padding=p1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, padding=p2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    ]
    width = c2 * h2 * w2
    for units in fcs:
        layers += [nn.Linear(width, units), nn.ReLU()]
        width = units
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def lenet5(input_shape: InputShape, num_classes: int) -> nn.Sequential:
    """Classic LeNet-5: conv 6@5x5 (padded to keep 28x28) → pool → conv 16@5x5 → pool → 120 → 84 → classes."""
    return _lenet_cnn(input_shape, num_classes, 6, 16, (120, 84), first_padding=2)


def lenet5_caffe(input_shape: InputShape, num_classes: int) -> nn.Sequential:
    """LeNet-5-Caffe (Han et al. 2015): conv 20@5x5 → pool → conv 50@5x5 → pool → 500 → classes.

    On 28x28 input: 431,080 parameters, about 2.29 M multiply-accumulates.
    """
    return _lenet_cnn(input_shape, num_classes, 20, 50, (500,), first_padding=None)


VGG_SMALL_CFG: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 128, 128, "M")


def vgg_small(input_shape: InputShape, num_classes: int) -> nn.Sequential:
    """VGG-style conv-BN-ReLU blocks (32-32-M-64-64-M-128-128-M) → global average pool → classes."""
    c, h, w = input_shape
    layers: list[nn.Module] = []
    channels = c
    for item in VGG_SMALL_CFG:
        if item == "M":
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            continue
        layers += [nn.Conv2d(channels, int(item), 3, padding=1, bias=False), nn.BatchNorm2d(int(item)), nn.ReLU()]
        channels = int(item)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


from obdprune.models.cnn import densenet_small, mobilenetv2_small, resnet20  # noqa: E402

MODELS: dict[str, Callable[[InputShape, int], nn.Module]] = {
    "lenet300": lenet300,
    "lenet5": lenet5,
    "lenet5-caffe": lenet5_caffe,
    "vgg-small": vgg_small,
    "resnet20": resnet20,
    "mobilenetv2-small": mobilenetv2_small,
    "densenet-small": densenet_small,
}


def _check_shape(input_shape: InputShape, num_classes: int) -> None:
    if num_classes < 2:
        raise UsageError(f"a classifier needs at least 2 classes, got {num_classes}")
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise UsageError(f"input shape must be (channels, height, width), got {tuple(input_shape)}")


def check_model_name(name: str) -> None:
    """UsageError unless ``name`` is a reference model or a user spec whose file exists (nothing is run)."""
    if is_user_spec(name):
        resolve_user_model(name)
    elif name not in MODELS:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, or your own as {FORMS}")


def build_model(name: str, input_shape: InputShape, num_classes: int) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` = (C, H, W) and ``num_classes`` outputs.

    ``name`` is a reference model (one of MODELS) or the user's ``FILE.py:FACTORY`` /
    ``package.module:FACTORY``, which runs that code (trusted, like running a script).

    >>> build_model("lenet5", (1, 28, 28), 10)[0]
    Conv2d(1, 6, kernel_size=(5, 5), stride=(1, 1), padding=(2, 2))
    """
    if is_user_spec(name):
        _check_shape(input_shape, num_classes)
        return build_user_model(resolve_user_model(name), tuple(int(s) for s in input_shape), int(num_classes))
    check_model_name(name)
    _check_shape(input_shape, num_classes)
    return MODELS[name](tuple(int(s) for s in input_shape), int(num_classes))


def model_spec(name: str, input_shape: InputShape, num_classes: int) -> dict:
    """The JSON-able description a manifest stores to rebuild the architecture (:func:`rebuild_model`).

    A user model is recorded by its absolute spec with the file's path and SHA-256.

    >>> model_spec("lenet5", (1, 28, 28), 10)
    {'name': 'lenet5', 'input_shape': [1, 28, 28], 'num_classes': 10}
    """
    spec: dict = {"name": name, "input_shape": [int(s) for s in input_shape], "num_classes": int(num_classes)}
    if is_user_spec(name):
        user = resolve_user_model(name)
        spec.update(name=user.spec, file=str(user.file), sha256=user.sha256)
    return spec


def rebuild_model(spec: dict) -> nn.Module:
    """Build the architecture a manifest's ``model`` entry (see :func:`model_spec`) describes.

    Raises ModelFileError with one line for an unknown name, a malformed entry, or a user model whose
    file is missing or changed since the run was made.
    """
    if not isinstance(spec, dict) or not {"name", "input_shape", "num_classes"} <= set(spec):
        raise ModelFileError("manifest 'model' must hold name, input_shape and num_classes")
    name = spec["name"]
    if not isinstance(name, str) or not (name in MODELS or is_user_spec(name)):
        raise ModelFileError(f"unknown model {name!r} in manifest; known: {', '.join(MODELS)}, or {FORMS}")
    try:
        if not isinstance(spec["input_shape"], list) or isinstance(spec["num_classes"], (bool, float)):
            raise TypeError("input_shape must be a list and num_classes an integer")
        shape = tuple(int(s) for s in spec["input_shape"])
        classes = int(spec["num_classes"])
        _check_shape(shape, classes)
    except (TypeError, ValueError, OverflowError, UsageError) as e:
        raise ModelFileError(f"manifest model description is invalid ({e})") from None
    if is_user_spec(name):
        return rebuild_user_model(spec)
    try:
        return MODELS[name](shape, classes)
    except UsageError as e:
        raise ModelFileError(f"manifest model description is invalid ({e})") from None
