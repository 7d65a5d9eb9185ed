"""Coupled units: channels tied across layers (residual sums, depthwise convs, squeeze-excitation,
concatenations) are pruned together, compaction removes them exactly, and the layers that cannot lose
units say why."""
import json
import math

import pytest
import torch
from torch import nn

import obdprune
from obdprune.compact import compact, count_units
from obdprune.curvature import estimate_curvature
from obdprune.errors import UsageError
from obdprune.export import export_onnx
from obdprune.groups import Exclusion, Granularity, unit_analysis
from obdprune.masking import Scope
from obdprune.measure import count_macs
from obdprune.methods import PruneConfig, prune_model
from obdprune.models.cnn import densenet_small, mobilenetv2_small, resnet20
from obdprune.regularize import GroupLassoPenalty, GroupLassoProximal
from obdprune.saliency import group_saliency, obd_saliency
from obdprune.selection import Budget, make_selector

from conftest import randomize_batchnorm
from coupled_nets import BLOCK_NETS, FAMILY_NETS

NETS = dict(BLOCK_NETS)
NETS.update(FAMILY_NETS)
NETS["resnet20"] = lambda: resnet20((3, 8, 8), 5, width=4)
NETS["mobilenetv2-small"] = lambda: mobilenetv2_small((3, 8, 8), 5, width_mult=0.25)
NETS["densenet-small"] = lambda: densenet_small((3, 8, 8), 5, growth=4, block_layers=(2, 2))

# Layers that truly cannot lose units alone, and why (besides the classifier, an output layer everywhere).
_SHUFFLE = "a channel shuffle or another reshape of the channels: view"
_LAYERNORM = "normalizes across channels: removing a channel changes the mean and variance that normalize the others"
NOT_REMOVABLE = {
    "channel-shuffle": {n: _SHUFFLE for n in ("0.0", "1.branch.3.0", "2.branch.3.0")},
    "layernorm-depthwise7": {n: _LAYERNORM for n in ("0", "2.dw", "2.pw2", "3.dw", "3.pw2")},
    # the shuffled stream: what each unit's two halves write; the stem's channels go to a stride-2 unit only
    "shufflenet-v2": {n: _SHUFFLE for n in ("stage2.0.branch1.2.0", "stage2.0.branch2.3.0", "stage2.1.branch2.3.0",
                                            "stage2.2.branch2.3.0")},
    # the stream every LayerNorm normalizes: stem, depthwise convs, the MLPs' second Linear, the downsampling conv
    "convnext": {n: _LAYERNORM for n in ("features.0.0", "features.1.block.0", "features.1.block.5", "features.2.block.0",
                                         "features.2.block.5", "features.3.1", "features.4.block.0", "features.4.block.5")},
}
# What the blocks that cannot be pruned through leave removable: less than half of the MACs.
MAC_LIMIT_BELOW_HALF = {"channel-shuffle"}


def _net(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = NETS[name]().eval()
    randomize_batchnorm(model)
    return model, torch.randn(4, 3, 8, 8)


def _convs(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("name", list(NETS))
def test_every_layer_tied_to_a_sum_or_concat_has_removable_units(name):
    model, x = _net(name)
    analysis = unit_analysis(model, x)
    in_groups = [n for g in analysis.groups for n in g.layers]
    assert len(in_groups) == len(set(in_groups))  # a layer belongs to one unit group at most
    classifier = _convs(model)[-1]
    assert analysis.excluded[classifier][0] is Exclusion.OUTPUT
    expected = NOT_REMOVABLE.get(name, {})
    for layer in _convs(model)[:-1]:
        if layer in expected:
            kind, detail = analysis.excluded[layer]
            assert kind is Exclusion.UNSUPPORTED and expected[layer] in detail, (layer, detail)
        else:
            assert layer in in_groups, (layer, analysis.excluded.get(layer))
    assert set(analysis.excluded) == {classifier, *expected}


def test_a_residual_unit_spans_both_sides_of_the_sum_and_their_batchnorms():
    model, x = _net("projection-residual")
    (group,) = [g for g in unit_analysis(model, x).groups if g.layer == "1.conv2.0"]
    assert group.producers == ("1.shortcut.0",)
    assert group.params == ("1.conv2.0.weight", "1.conv2.1.weight", "1.conv2.1.bias")
    assert [m.param for m in group.coupled] == ["1.shortcut.1.weight", "1.shortcut.1.bias", "1.shortcut.0.weight"]
    assert dict(group.readers) == {"2.conv1.0": 1, "2.shortcut.0": 1}
    assert group.fan_in == 12 * 9 + 8  # both convs' rows count toward the weights a unit removes
    assert group.group_size == 12 * 9 + 8 + 4


def test_a_depthwise_conv_and_a_concatenation_norm_are_members():
    model, x = _net("inverted-residual")
    (expand,) = [g for g in unit_analysis(model, x).groups if g.layer == "1.body.0.0"]
    assert expand.producers == ("1.body.1.0",)  # the depthwise conv's in and out channel
    assert [m.param for m in expand.coupled] == ["1.body.1.0.weight", "1.body.1.1.weight", "1.body.1.1.bias"]
    model, x = _net("dense-concat")
    (grown,) = [g for g in unit_analysis(model, x).groups if g.layer == "1.layers.0.2"]
    # its 4 channels are rows 8..11 of the next layer's BatchNorm and of the final one
    assert {m.param: m.rows for m in grown.coupled} == {p: (8, 9, 10, 11) for p in (
        "1.layers.1.0.weight", "1.layers.1.0.bias", "2.weight", "2.bias")}


@pytest.mark.parametrize("name", list(NETS))
def test_half_the_macs_then_compaction_is_exact_and_keeps_the_minimum(name):
    model, x = _net(name)
    selector = make_selector(model, x, granularity=Granularity.CHANNEL, budget=Budget.MACS, scope=Scope.GLOBAL,
                             layer_floor=0.0, min_units=2)
    limit = selector.limit(model)
    assert (limit < 0.5) == (name in MAC_LIMIT_BELOW_HALF), limit
    target = min(0.5, limit)
    masks = selector.select(selector.scores(model), target, None, model)
    masks.apply(model)
    small = compact(model, x)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), rtol=0, atol=1e-5)
    dense, after = selector.mac_model.dense, count_macs(small, x[:1])
    assert after == selector.macs(model, masks, x)  # the MAC model predicts the compacted model exactly
    assert abs((1 - after / dense) - target) < 0.1  # the nearest step; one unit of an 8-wide stream is ~8%
    before = count_units(model)
    for layer, units in count_units(small).items():
        assert units >= min(2, before[layer])
    coupled = [g for g in selector.groups if g.producers]
    if coupled:  # a coupled unit goes from every layer of its group
        lost = [g for g in coupled if count_units(small)[g.layer] < g.units]
        assert all(count_units(small)[n] == count_units(small)[g.layer] for g in lost for n in g.layers)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2-small", "densenet-small", "squeeze-excitation",
                                  "grouped-conv", *FAMILY_NETS])
def test_compacted_coupled_models_export_to_onnx_with_parity(name, tmp_path):
    pytest.importorskip("onnxruntime")
    model, x = _net(name)
    selector = make_selector(model, x, granularity=Granularity.CHANNEL, budget=Budget.MACS, scope=Scope.GLOBAL,
                             layer_floor=0.0, min_units=2)
    selector.select(selector.scores(model), 0.5, None, model).apply(model)
    small = compact(model, x)
    info = export_onnx(small, x[:1], tmp_path / "m.onnx", check_inputs=x, atol=1e-4)
    assert info["max_abs_diff"] <= 1e-4


def test_no_layer_goes_below_min_units_and_the_limit_error_lists_why():
    model, x = _net("resnet20")  # widths 4, 8, 16
    selector = make_selector(model, x, granularity=Granularity.CHANNEL, budget=Budget.MACS, scope=Scope.GLOBAL,
                             layer_floor=0.0)  # default min units: 4
    limit = selector.limit(model)
    masks = selector.select(selector.scores(model), limit, None, model)
    masks.apply(model)
    small = compact(model, x)
    before = count_units(model)
    for layer, units in count_units(small).items():
        assert units >= min(4, before[layer]), layer
    assert any(count_units(small)[n] == 4 < before[n] for n in before)  # the floor binds
    lines = selector.explain()
    assert "14: output layer (its outputs are model outputs)" in lines
    assert "0: at its minimum (4 units, keeps at least 4)" in lines  # the width-4 stage, tied to the stem
    with pytest.raises(UsageError, match=r"(?s)can go; layers that cannot lose units:.*0: at its minimum"):
        prune_model(model, _Data(x), PruneConfig(method="obd", granularity="channel", budget="macs", reg_epochs=0),
                    targets=[min(0.99, limit + 0.05)], progress=False, example_inputs=x)


class _Data:
    def __init__(self, x: torch.Tensor) -> None:
        y = torch.arange(len(x)) % 5
        self.train = self.val = (x, y)


def test_keep_protects_a_layer_and_every_layer_tied_to_it():
    model, x = _net("projection-residual")
    analysis = unit_analysis(model, x, keep=["1.shortcut"])
    assert [g.layer for g in analysis.groups] == ["0.0", "1.conv1.0", "2.conv1.0", "2.conv2.0"]
    assert analysis.excluded["1.conv2.0"] == (Exclusion.PROTECTED, "keep '1.shortcut.0', tied to 1.conv2.0")
    assert analysis.excluded["1.shortcut.0"][0] is Exclusion.PROTECTED
    with pytest.raises(UsageError, match="keep names no module of the model: 'fc9'"):
        unit_analysis(model, x, keep=["fc9"])
    with pytest.raises(UsageError, match="min units"):
        PruneConfig(granularity="channel", min_units=0)


def _rows_of(rows: torch.Tensor | None, i: int) -> list[int]:
    """The rows of unit i in one member (one per channel group for a grouped conv's units)."""
    return [i] if rows is None else rows[i].reshape(-1).tolist()


def test_a_grouped_conv_unit_is_the_same_position_in_every_group():
    model, x = _net("grouped-conv")  # width 8 in 2 groups of 4
    groups = {g.layer: g for g in unit_analysis(model, x).groups}
    expand, grouped = groups["1.body.0.0"], groups["1.body.1.0"]
    for g, reader, row in ((expand, "1.body.1.0", 8), (grouped, "1.body.2", 4 * 9)):
        assert (g.units, g.blocks, g.readers) == (4, 2, ((reader, 2),))  # a unit feeds 2 inputs of its reader
        assert g.fan_in == 2 * row and g.group_size == 2 * (row + 2)  # two filters and their BatchNorm entries
        for p, _, rows in g.members():
            assert rows.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]], p
    assert groups["0.0"].blocks == 1


@pytest.mark.parametrize("name, layer", [("projection-residual", "1.conv2.0"), ("grouped-conv", "1.body.1.0")])
def test_group_lasso_proximal_step_on_a_coupled_group_matches_its_closed_form(name, layer):
    model, x = _net(name)
    model.double()
    (g,) = [g for g in unit_analysis(model, x.double()).groups if g.layer == layer]
    params = dict(model.named_parameters())
    members = g.members()

    def unit_vector(i: int) -> torch.Tensor:  # every entry of unit i, all members
        return torch.cat([params[p].detach().reshape(params[p].shape[0], -1)[_rows_of(rows, i)].reshape(-1)
                          for p, _, rows in members])

    before = [unit_vector(i) for i in range(g.units)]
    norms = torch.stack([v.norm() for v in before])
    lam, lr = float(norms.median()) / (0.3 * math.sqrt(g.group_size)), 0.3  # about half the units go to zero
    t = lr * lam * math.sqrt(g.group_size)
    penalty = GroupLassoPenalty(lam, [g]).penalty(model)
    assert float(penalty.detach()) == pytest.approx(lam * math.sqrt(g.group_size) * float(norms.sum()), rel=1e-12)
    GroupLassoProximal(lam, [g]).after_step(model, lr)
    zeroed = 0
    for i, v in enumerate(before):
        expected = v * max(0.0, 1.0 - t / float(v.norm()))  # block soft-thresholding
        assert torch.allclose(unit_vector(i), expected, rtol=1e-12, atol=1e-15)
        zeroed += bool((unit_vector(i) == 0).all())
    assert 0 < zeroed < g.units
    others = [p for p in params if p not in {m[0] for m in members}]
    assert others  # nothing outside the group moved (checked on a fresh copy)
    fresh, _ = _net(name)
    for p in others:
        assert torch.equal(params[p].detach(), dict(fresh.double().named_parameters())[p].detach())


@pytest.mark.parametrize("name", ["inverted-residual", "grouped-conv"])
def test_unit_saliency_sums_half_h_w2_over_every_member_from_one_ggn_pass(name):
    model, x = _net(name)
    y = torch.arange(len(x)) % 5
    groups = unit_analysis(model, x).groups
    curv = estimate_curvature("ggn", model, x, y)
    params = dict(model.named_parameters())
    names = [p for g in groups for p, _, _ in g.members()]
    scores = group_saliency(obd_saliency({n: params[n] for n in names}, {n: curv[n] for n in names}), groups)
    for g in groups:
        for i in range(g.units):
            brute = 0.0
            for p, _, rows in g.members():
                r = _rows_of(rows, i)
                w, h = params[p].detach()[r], curv[p][r]
                brute += float((0.5 * h * w ** 2).sum())
            assert float(scores[g.layer][i]) == pytest.approx(brute, rel=1e-5, abs=1e-12)


def test_prune_front_door_prunes_every_coupled_layer_of_resnet20_by_macs():
    torch.manual_seed(0)
    model = resnet20((3, 8, 8), 5, width=8)
    x, y = torch.randn(64, 3, 8, 8), torch.arange(64) % 5
    result = obdprune.prune(model, (x, y), (x[:32], y[:32]), method="hybrid", granularity="channel", budget="macs",
                            sparsity=0.5, example_inputs=x[:2], progress=False, reg_epochs=1, finetune_epochs=1,
                            curvature_samples=32, batch_size=32)
    small = result.compact()
    with torch.no_grad():
        assert torch.allclose(small.eval()(x), result.model.eval()(x), rtol=0, atol=1e-5)
    assert count_macs(small, x[:1]) <= 0.55 * count_macs(model, x[:1])
    before, after = count_units(model), count_units(small)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert all(after[n] >= min(4, before[n]) for n in before)
    assert sum(after[n] < before[n] for n in convs) >= len(convs) // 2  # the pruning reaches coupled convs


def test_pruner_step_beyond_the_limit_lists_every_layer_that_keeps_its_units():
    model, x = _net("channel-shuffle")
    pruner = obdprune.Pruner(model, method="magnitude", granularity="channel", budget="macs", example_inputs=x[:2],
                             min_units=2, layer_floor=0.0)
    limit = pruner.selector.limit(model)
    with pytest.raises(UsageError) as err:
        pruner.step(round(limit + 0.1, 2))
    text = str(err.value)
    assert "would empty a layer" in text and "layers that cannot lose units:" in text
    assert "\n  5: output layer (its outputs are model outputs)" in text
    assert f"\n  1.branch.3.0: unsupported op ({_SHUFFLE} (1, 8, 8, 8) → (1, 2, 4, 8, 8) in '1')" in text


def test_compare_summary_and_report_list_the_layers_that_keep_their_units(tmp_path):
    from obdprune.cli import main

    out = tmp_path / "study"  # lenet5 on 8x8 digits: conv 0 (6 filters), conv 3 (16), fc 7, fc 9, fc 11 (classes)
    assert main(["compare", "--dataset", "digits", "--model", "lenet5", "--epochs", "0", "--granularity", "channel",
                 "--methods", "magnitude", "--sparsity", "0.3", "--finetune-epochs", "0", "--reg-epochs", "0",
                 "--min-units", "8", "--keep", "3", "--no-measure", "--no-progress", "--out", str(out)]) == 0
    expected = {"3": "protected by the user (keep '3')", "11": "output layer (its outputs are model outputs)",
                "0": "at its minimum (6 units, keeps at least 6)"}
    assert json.loads((out / "summary.json").read_text())["excluded_layers"] == expected
    report = (out / "report.md").read_text()
    listed = report.split("## Layers that keep all their units\n\n")[1].split("\n\n")[0].splitlines()
    assert listed == [f"- `{n}`: {why}" for n, why in expected.items()]


class _GroupsReadDifferentLayers(nn.Module):
    """A grouped conv whose first group reads one conv and second group another (through a concatenation):
    neither conv's channels can go without emptying one group more than the other."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(torch.relu(self.g(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))))


def test_a_grouped_conv_whose_groups_read_different_layers_keeps_them_and_says_why():
    torch.manual_seed(0)
    analysis = unit_analysis(_GroupsReadDifferentLayers(), torch.randn(2, 3, 8, 8))
    why = "grouped convolution 'g' (groups=2): a unit does not take the same input channels from each group"
    assert analysis.excluded["a"] == analysis.excluded["b"] == (Exclusion.UNSUPPORTED, why)
    assert [(g.layer, g.blocks) for g in analysis.groups] == [("g", 2)]


class _PermuteShuffle(nn.Module):
    """A channel shuffle written with reshape and permute (einops style)."""

    def forward(self, x):
        n, c, h, w = x.shape
        return x.reshape(n, 2, c // 2, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


@pytest.mark.parametrize("shuffle, op", [(nn.ChannelShuffle(2), "channel_shuffle (1, 8, 8, 8) → (1, 8, 8, 8) in '3'"),
                                         (_PermuteShuffle(), "reshape (1, 8, 8, 8) → (1, 2, 4, 8, 8) in '3'"),
                                         (nn.PixelShuffle(2), "pixel_shuffle (1, 8, 8, 8) → (1, 2, 16, 16) in '3'")])
def test_an_op_that_moves_channels_keeps_the_units_before_it_and_names_itself(shuffle, op):
    torch.manual_seed(0)
    c_after = 2 if isinstance(shuffle, nn.PixelShuffle) else 8
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), shuffle, nn.Conv2d(c_after, 8, 1),
                          nn.ReLU(), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    x = torch.randn(2, 3, 8, 8)
    analysis = unit_analysis(model, x)
    assert analysis.excluded["0"] == (Exclusion.UNSUPPORTED, f"a channel shuffle or another reshape of the channels: {op}")
    assert [g.layer for g in analysis.groups] == ["4", "6"]  # the layers after it keep their units
    selector = make_selector(model, x, granularity=Granularity.CHANNEL, budget=Budget.MACS, scope=Scope.GLOBAL,
                             layer_floor=0.0, min_units=2)
    selector.select(selector.scores(model), selector.limit(model), None, model).apply(model)
    small = compact(model, x)
    assert count_units(small) == {"0": 8, "4": 2, "6": 2, "9": 5}
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), rtol=0, atol=1e-5)


def test_a_depthwise_conv_on_the_shuffled_stream_keeps_its_channels_and_says_why():
    from coupled_nets import ShuffleV2Unit

    torch.manual_seed(0)  # a stride-2 unit after a shuffle: its branch1 depthwise conv reads the stream
    model = nn.Sequential(_cbr_stem(), ShuffleV2Unit(8, 8, 1), ShuffleV2Unit(8, 16, 2), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 5)).eval()
    randomize_batchnorm(model)
    x = torch.randn(2, 3, 8, 8)
    analysis = unit_analysis(model, x)
    assert analysis.excluded["2.branch1.0"] == (Exclusion.UNSUPPORTED, "depthwise conv '2.branch1.0' reads channels no "
                                                "layer produces (the network input, or channels after a reshape)")
    assert {"1.branch2.0.0", "2.branch2.0.0"} <= {g.layer for g in analysis.groups}
    selector = make_selector(model, x, granularity=Granularity.CHANNEL, budget=Budget.MACS, scope=Scope.GLOBAL,
                             layer_floor=0.0, min_units=2)
    masks = selector.select(selector.scores(model), selector.limit(model), None, model)
    masks.apply(model)
    small = compact(model, x)
    assert count_macs(small, x[:1]) == selector.macs(model, masks, x)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), rtol=0, atol=1e-5)


def _cbr_stem() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())


def test_a_graph_library_failure_at_an_op_cuts_the_graph_there_and_names_the_op(monkeypatch):
    import torch_pruning as tp
    import torch_pruning.dependency.index_mapping as index_mapping

    real = index_mapping.update_concat_index_mapping

    def failing(graph, node):
        if node.type == tp.ops.OPTYPE.CONCAT:
            raise IndexError("index 8 is out of bounds for dimension 0 with size 8")
        return real(graph, node)

    monkeypatch.setattr(index_mapping, "update_concat_index_mapping", failing)
    model, x = _net("squeezenet")
    analysis = unit_analysis(model, x)
    why = "the channel graph library fails there (IndexError: index 8 is out of bounds for dimension 0 with size 8)"
    for fire, (c_in, c_out) in {"0.3": (4, 16), "0.4": (4, 16), "0.6": (2, 32)}.items():
        for conv in ("expand1x1", "expand3x3"):  # the convs the failing concatenation reads
            assert analysis.excluded[f"{fire}.{conv}"] == (
                Exclusion.UNSUPPORTED, f"{why}: cat [{(1, c_out // 2, c_in, c_in)}, {(1, c_out // 2, c_in, c_in)}] → "
                                       f"{(1, c_out, c_in, c_in)} in {fire!r}"), fire
    assert [g.layer for g in analysis.groups] == ["0.0", "0.3.squeeze", "0.4.squeeze", "0.6.squeeze"]
    selector = make_selector(model, x, granularity=Granularity.CHANNEL, budget=Budget.MACS, scope=Scope.GLOBAL,
                             layer_floor=0.0, min_units=2)
    masks = selector.select(selector.scores(model), selector.limit(model), None, model)
    masks.apply(model)
    small = compact(model, x)  # compaction cuts the graph at the same op
    assert count_macs(small, x[:1]) == selector.macs(model, masks, x)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), rtol=0, atol=1e-5)


def test_a_graph_library_failure_on_one_layer_or_the_whole_model_is_a_reason_not_an_exception(monkeypatch):
    import torch_pruning as tp

    model, x = _net("squeezenet")
    model[0][4].squeeze.fails = True  # kept by the copies the analysis and compaction trace
    real = tp.DependencyGraph.get_pruning_group

    def failing_group(self, module, fn, idxs):
        if getattr(module, "fails", False):
            raise ZeroDivisionError("integer division or modulo by zero")
        return real(self, module, fn, idxs)

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", failing_group)
    analysis = unit_analysis(model, x)
    assert analysis.excluded["0.4.squeeze"] == (
        Exclusion.UNSUPPORTED, "the channel graph library fails (ZeroDivisionError: integer division or modulo by zero)")
    assert len(analysis.groups) == 9  # every other layer but the classifier
    selector = make_selector(model, x, granularity=Granularity.CHANNEL, budget=Budget.MACS, scope=Scope.GLOBAL,
                             layer_floor=0.0, min_units=2)
    selector.select(selector.scores(model), 0.5, None, model).apply(model)
    small = compact(model, x)
    assert count_units(small)["0.4.squeeze"] == 4
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), rtol=0, atol=1e-5)

    def failing_build(self, *args, **kwargs):
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", failing_build)
    analysis = unit_analysis(model, x)
    why = (Exclusion.UNSUPPORTED, "the channel graph library fails at an unknown op (ZeroDivisionError: integer "
                                  "division or modulo by zero)")
    assert analysis.groups == () and set(analysis.excluded.values()) == {why} and len(analysis.excluded) == 11
    with pytest.warns(RuntimeWarning, match="compact: nothing removed: the channel graph library fails"):
        same = compact(model, x)
    assert count_units(same) == count_units(model)
