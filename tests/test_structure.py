"""One definition of each shared concept: prunable layers, autograd op tables; no private name crosses modules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from obdprune.choices import Choice
from obdprune.compact import count_units
from obdprune.errors import UsageError
from obdprune.groups import total_prunable_weights, unit_groups
from obdprune.layers import COMPACTABLE_TYPES, PRUNABLE_TYPES, prunable_layers
from obdprune.masking import MaskSet, prunable_weights
from obdprune.measure import count_macs, count_weights, macs_per_layer, measured_sparsity
from obdprune.train import OptimizerName

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "obdprune").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))


class _Mixed(nn.Module):
    """Every kind of layer the two type sets tell apart: Conv1d and ConvTranspose2d are not prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(1, 2, 3)
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 4, 2)
        self.head = nn.Linear(4 * 5 * 5 + 2 * 14, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1d(x.flatten(2)[:, :, :16]).flatten(1)
        b = self.up(self.bn(self.conv(x))).flatten(1)
        return self.head(torch.cat([b, a], dim=1))


def test_every_module_counts_the_same_prunable_layers() -> None:
    model = _Mixed().eval()
    x = torch.randn(2, 1, 6, 6)
    assert PRUNABLE_TYPES == (nn.Conv2d, nn.Linear)
    assert set(PRUNABLE_TYPES) < set(COMPACTABLE_TYPES) and nn.ConvTranspose2d not in COMPACTABLE_TYPES
    names = [n for n, _ in prunable_layers(model)]
    assert names == ["conv", "head"]
    assert list(prunable_weights(model)) == ["conv.weight", "head.weight"] == list(MaskSet.dense(model))
    total = 4 * 9 + 3 * (4 * 5 * 5 + 28)
    assert count_weights(model) == total_prunable_weights(model) == measured_sparsity(model)[2] == total
    assert list(macs_per_layer(model, x)) == names
    assert count_macs(model, x) == 4 * 4 * 4 * 9 + 3 * (4 * 5 * 5 + 28)  # conv: 4x4 positions
    assert list(count_units(model)) == ["conv1d", "conv", "head"]  # compaction also shrinks Conv1d
    assert {g.layer for g in unit_groups(model, x)} <= set(names)


def _sources() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), filename=str(p))) for p in SOURCES]


def _type_names(node: ast.AST) -> set[str]:
    return {e.attr for e in ast.walk(node) if isinstance(e, ast.Attribute)}


def test_prunable_layer_types_are_written_down_once() -> None:
    """No module but obdprune/layers.py lists Conv2d and Linear together (an inline prunable-layer set)."""
    found = []
    for path, tree in _sources():
        if path == ROOT / "obdprune" / "layers.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and {"Conv2d", "Linear"} <= _type_names(node):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"inline prunable-layer sets (import obdprune.layers.PRUNABLE_TYPES instead): {found}"


def test_no_private_name_is_imported_across_modules() -> None:
    found = []
    for path, tree in _sources():
        modules = {}  # local name -> obdprune module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("obdprune"):
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
            if isinstance(node, ast.Import):
                modules.update({(a.asname or a.name).split(".")[0]: a.name for a in node.names
                                if a.name.startswith("obdprune")})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in modules:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not found, f"private names used outside their module: {found}"


def test_docstring_examples_run() -> None:
    import doctest

    import obdprune.autograd_ops
    import obdprune.channel_graph
    import obdprune.layers
    import obdprune.measure

    for module in (obdprune.autograd_ops, obdprune.channel_graph, obdprune.layers, obdprune.measure):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_choice_label_comes_from_the_class_statement() -> None:
    class PaintColour(Choice, label="paint colour"):
        RED = "red"

    class Shade(Choice):
        DARK = "dark"

    assert (PaintColour.label(), Shade.label(), OptimizerName.label()) == ("paint colour", "shade", "optimizer")
    assert [c.value for c in PaintColour] == ["red"]  # the label is not a member
    with pytest.raises(UsageError, match="unknown paint colour 'blue'; choose one of: red"):
        PaintColour.parse("blue")
