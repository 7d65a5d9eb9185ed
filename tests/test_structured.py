"""Channel granularity: unit groups, group saliency, unit selection, group lasso, and the pruning loop
with compaction removing exactly the removed units."""
import math

import pytest
import torch
from torch import nn

from obdprune.compact import compact, count_units
from obdprune.errors import UsageError
from obdprune.groups import (Exclusion, Granularity, UnitLayer, max_unit_sparsity, removed_units, select_unit_masks,
                             unit_analysis, unit_groups)
from obdprune.masking import MaskSet
from obdprune.methods import PruneConfig, prune_model
from obdprune.models import build_model
from obdprune.regularize import GroupLassoPenalty, GroupLassoProximal, make_regularizer
from obdprune.saliency import group_magnitude_saliency, group_saliency, obd_saliency
from obdprune.train import TrainConfig, train

X8 = torch.zeros(2, 1, 8, 8)


# ---------------------------------------------------------------------------------------------- groups


def test_lenet5_groups_are_filters_and_neurons_with_biases_but_not_the_classifier():
    groups = unit_groups(build_model("lenet5", (1, 8, 8), 10), X8)
    assert [(g.layer, g.params, g.weight_shape) for g in groups] == [
        ("0", ("0.weight", "0.bias"), (6, 1, 5, 5)),
        ("3", ("3.weight", "3.bias"), (16, 6, 5, 5)),
        ("7", ("7.weight", "7.bias"), (120, 64)),
        ("9", ("9.weight", "9.bias"), (84, 120)),
    ]
    assert [(g.fan_in, g.group_size) for g in groups] == [(25, 26), (150, 151), (64, 65), (120, 121)]


def test_vgg_small_groups_take_the_following_batchnorm():
    groups = unit_groups(build_model("vgg-small", (1, 8, 8), 10), X8)
    convs = ["0", "3", "7", "10", "14", "17"]
    assert [g.layer for g in groups] == convs
    for g in groups:
        bn = str(int(g.layer) + 1)  # Conv-BN-ReLU: the BatchNorm is the next module
        assert g.params == (f"{g.layer}.weight", f"{bn}.weight", f"{bn}.bias")  # the convs have no bias
    assert groups[-1].group_size == 128 * 9 + 2


class _Odd(nn.Module):
    """A residual sum (b, c tied), Conv→ReLU→BN (d: BN found through the ReLU), a sigmoid after e."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.d, self.bn, self.e, self.fc = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.a(x))
        y = torch.relu(self.b(x) + self.c(x))
        z = self.e(self.bn(torch.relu(self.d(y))))
        return self.fc(torch.sigmoid(z).mean((2, 3)))


def test_unit_groups_ignore_input_strides():
    """(N, 1, H, W) with strides that also read as channels_last: global pooling + flatten then
    traces as as_strided; the groups must not depend on that."""
    x = torch.randn(2, 8, 8, 1).permute(0, 3, 1, 2)
    assert x.stride() == (64, 1, 8, 1)
    model = build_model("vgg-small", (1, 8, 8), 10)
    assert unit_groups(model, x) == unit_groups(model, X8)


def test_units_tied_by_a_sum_are_one_group_and_the_others_say_why_they_have_none():
    analysis = unit_analysis(_Odd(), torch.zeros(1, 1, 6, 6))
    assert [(g.params, g.producers, [m.param for m in g.coupled]) for g in analysis.groups] == [
        (("a.weight", "a.bias"), (), []),
        (("b.weight", "b.bias"), ("c",), ["c.weight", "c.bias"]),  # the residual sum: b and c lose units together
        (("d.weight", "d.bias", "bn.weight", "bn.bias"), (), []),
    ]
    assert analysis.excluded == {"e": (Exclusion.UNSUPPORTED, "Sigmoid does not keep a zeroed unit at zero"),
                                 "fc": (Exclusion.OUTPUT, "its outputs are model outputs")}


# ----------------------------------------------------------------------------------- group saliency

HAND = UnitLayer("fc", ("fc.weight", "fc.bias", "bn.weight", "bn.bias"), (2, 3))


def test_group_saliency_sums_each_units_entries():
    scores = {"fc.weight": torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.5, 0.0]]), "fc.bias": torch.tensor([0.25, 1.0]),
              "bn.weight": torch.tensor([1.0, 0.0]), "bn.bias": torch.tensor([0.0, 2.0])}
    (layer, s), = group_saliency(scores, [HAND]).items()
    assert layer == "fc" and s.tolist() == [7.25, 3.5]
    with pytest.raises(ValueError, match="bn.bias"):
        group_saliency({k: v for k, v in scores.items() if k != "bn.bias"}, [HAND])


def _hand_params():
    w = {"fc.weight": torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, 1.0]]), "fc.bias": torch.tensor([1.0, -1.0]),
         "bn.weight": torch.tensor([0.5, 2.0]), "bn.bias": torch.tensor([0.0, 1.0])}
    h = {"fc.weight": torch.tensor([[2.0, 1.0, 5.0], [0.5, 4.0, 2.0]]), "fc.bias": torch.tensor([4.0, 2.0]),
         "bn.weight": torch.tensor([8.0, 0.25]), "bn.bias": torch.tensor([3.0, -2.0])}
    return w, h


def test_group_obd_is_half_h_w_squared_summed_over_weights_bias_and_batchnorm():
    w, h = _hand_params()
    # ½hw²: weights [[1, 2, 0], [2.25, 0, 1]], bias [2, 1], BN scale [1, 0.5], BN shift [0, -1 → clamped 0]
    s = group_saliency(obd_saliency(w, h, "clamp"), [HAND])["fc"]
    assert s.tolist() == [6.0, 4.75]
    assert group_saliency(obd_saliency(w, h, "keep"), [HAND])["fc"].tolist() == [6.0, 3.75]


def test_group_magnitude_is_the_squared_l2_norm_of_the_group():
    w, _ = _hand_params()
    assert group_magnitude_saliency(w, [HAND])["fc"].tolist() == [1 + 4 + 1 + 0.25, 9 + 1 + 1 + 4 + 1]
    w2 = {k: torch.full_like(v, 2.0) for k, v in w.items()}  # = OBD with h ≡ 2
    assert torch.equal(group_magnitude_saliency(w, [HAND])["fc"],
                       group_saliency(obd_saliency(w, w2), [HAND])["fc"])


# -------------------------------------------------------------------------------------- selection

A = UnitLayer("a", ("a.weight", "a.bias"), (4, 10))
B = UnitLayer("b", ("b.weight", "bn.weight", "bn.bias"), (3, 20))
TOTAL = 40 + 60 + 50  # plus an ungrouped classifier of 50 weights
SCORES = {"a": torch.tensor([1.0, 5.0, 2.0, 8.0]), "b": torch.tensor([3.0, 20.0, 1.0])}
# per weight: a [0.1, 0.5, 0.2, 0.8], b [0.15, 1.0, 0.05]; the floor protects a3 and b1
# candidates, cheapest first: b2 (20 weights), a0 (10), b0 (20), a2 (10), a1 (10)


def _kept(masks, g):
    return (~removed_units(g, masks)).tolist()


@pytest.mark.parametrize("sparsity, a_keep, b_keep, removed", [
    (0.2, [False, True, True, True], [True, True, False], 30),   # target 30: b2 + a0 exactly
    (0.25, [False, True, True, True], [True, True, False], 30),  # target 38: 30 is nearer than 50
    (0.3, [False, True, True, True], [False, True, False], 50),  # target 45: 50 is nearer than 30
    (0.46, [False, False, False, True], [False, True, False], 70),  # everything above the floors
])
def test_global_unit_selection_removes_cheapest_per_weight_to_the_nearest_count(sparsity, a_keep, b_keep, removed):
    masks = select_unit_masks(SCORES, [A, B], sparsity, total_weights=TOTAL, min_units=1)
    assert _kept(masks, A) == a_keep and _kept(masks, B) == b_keep
    assert sum(int((~masks[n]).sum()) for n in ("a.weight", "b.weight")) == removed
    for g, keep in ((A, a_keep), (B, b_keep)):  # every member of a removed unit goes, nothing else
        for p in g.params[1:]:
            assert masks[p].tolist() == keep
        assert torch.equal(masks[g.weight], torch.tensor(keep)[:, None].expand(g.weight_shape))


def test_unit_selection_limits_floors_and_layer_scope():
    assert max_unit_sparsity([A, B], TOTAL, 0.01, min_units=1) == math.floor(70 / 150 * 1e6) / 1e6
    with pytest.raises(UsageError, match="at most 70"):
        select_unit_masks(SCORES, [A, B], 0.48, total_weights=TOTAL, min_units=1)
    masks = select_unit_masks(SCORES, [A, B], 0.5, total_weights=TOTAL, scope="layer", min_units=1)
    assert _kept(masks, A) == [False, True, False, True]  # round(2.0) lowest of a
    assert _kept(masks, B) == [False, True, False]  # round(1.5) = 2 lowest of b
    with pytest.raises(UsageError, match="below its floor of 2"):  # b keeps 1 < ceil(0.5 * 3)
        select_unit_masks(SCORES, [A, B], 0.6, total_weights=TOTAL, scope="layer", layer_floor=0.5, min_units=1)
    assert max_unit_sparsity([A, B], TOTAL, 0.5, "layer", min_units=1) == math.floor((1 - 2 / 3) * 1e6) / 1e6


def test_unit_masks_only_shrink_and_carry_other_masks():
    first = MaskSet({**select_unit_masks(SCORES, [A, B], 0.2, total_weights=TOTAL, min_units=1).masks,
                     "cls.weight": torch.tensor([[True, False]])})
    # removed units now score highest; they stay removed and count toward the target
    rescored = {"a": torch.tensor([100.0, 5.0, 2.0, 8.0]), "b": torch.tensor([3.0, 20.0, 100.0])}
    second = select_unit_masks(rescored, [A, B], 0.3, total_weights=TOTAL, current=first, min_units=1)
    assert _kept(second, A) == [False, True, True, True]
    assert _kept(second, B) == [False, True, False]  # 30 forced + b0 (20) is nearest to 45
    for name in first:
        assert not bool((second[name] & ~first[name]).any())
    assert second["cls.weight"].tolist() == [[True, False]]


# ------------------------------------------------------------------------------------ group lasso


def _hand_linear():
    lin = nn.Linear(3, 3).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, 0.0, 1.0], [0.1, 0.2, 0.0], [0.06, 0.08, 0.0]], dtype=torch.float64))
        lin.bias.copy_(torch.tensor([2.0, 0.2, 0.0], dtype=torch.float64))
    return lin, UnitLayer("", ("weight", "bias"), (3, 3))  # group norms 3, 0.3, 0.1; |g| = 4


def test_group_lasso_proximal_is_block_soft_thresholding():
    lin, g = _hand_linear()
    GroupLassoProximal(0.2, [g]).after_step(lin, lr=0.5)  # threshold 0.5 · 0.2 · √4 = 0.2
    expected_w = [[2 * 14 / 15, 0.0, 14 / 15], [0.1 / 3, 0.2 / 3, 0.0]]  # factors 1 - 0.2/3, 1 - 0.2/0.3
    assert torch.allclose(lin.weight[:2], torch.tensor(expected_w, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(lin.bias[:2], torch.tensor([2 * 14 / 15, 0.2 / 3], dtype=torch.float64), rtol=0, atol=1e-12)
    assert bool((lin.weight[2] == 0).all()) and lin.bias[2].item() == 0.0  # norm 0.1 < 0.2: exactly zero


def test_group_lasso_penalty_and_factory():
    lin, g = _hand_linear()
    pen = GroupLassoPenalty(0.2, [g]).penalty(lin)
    assert pen.item() == pytest.approx(0.2 * 2 * (3 + 0.3 + 0.1), rel=1e-12)
    with torch.no_grad():
        lin.weight[2] = 0
        lin.bias[2] = 0
    GroupLassoPenalty(0.2, [g]).penalty(lin).backward()
    assert torch.isfinite(lin.weight.grad).all() and bool((lin.weight.grad[2] == 0).all())  # subgradient 0 at 0
    assert isinstance(make_regularizer("group-lasso", 0.1, "proximal", [g]), GroupLassoProximal)
    assert isinstance(make_regularizer("group-lasso", 0.1, "penalty", [g]), GroupLassoPenalty)
    with pytest.raises(UsageError, match="choose one of: l1, group-lasso"):
        make_regularizer("ridge", 0.1, "proximal", [g])


def test_granularity_is_parsed_with_the_valid_values():
    assert Granularity.parse("channel") is Granularity.CHANNEL
    with pytest.raises(UsageError, match="unknown granularity 'filter'; choose one of: element, channel"):
        PruneConfig(granularity="filter")
    with pytest.raises(UsageError, match="unknown granularity 'filter'"):
        PruneConfig(granularity="filter", l1_lambda=1e-3)


# ---------------------------------------------------------------------- pruning loop + compaction


@pytest.fixture(scope="module")
def dense_models(digits):
    out = {}
    for name in ("lenet5", "vgg-small"):
        torch.manual_seed(0)
        model = build_model(name, digits.input_shape, digits.num_classes)
        train(model, digits.train, TrainConfig(epochs=1, lr=0.05, batch_size=64), progress=False)
        out[name] = model
    return out


@pytest.mark.parametrize("model_name", ["lenet5", "vgg-small"])
@pytest.mark.parametrize("method", ["magnitude", "l1", "obd", "hybrid"])
def test_channel_pruning_removes_whole_units_and_compacts_exactly(method, model_name, digits, dense_models):
    dense = dense_models[model_name]
    cfg = PruneConfig(method=method, granularity="channel", reg_epochs=1, curvature_samples=64, l1_lambda=1e-3,
                      finetune=TrainConfig(epochs=1, lr=0.01, batch_size=128, schedule="cosine"))
    (res,) = prune_model(dense, digits, cfg, targets=[0.5], progress=False)
    model = build_model(model_name, digits.input_shape, digits.num_classes)
    model.load_state_dict(res.state_dict)
    groups = unit_groups(model, digits.train.x[:1])
    params = dict(model.named_parameters())
    gone = {}
    for g in groups:
        masked = removed_units(g, res.masks)
        assert 1 <= int((~masked).sum())  # every layer keeps a unit
        for p in g.params:  # masks cover the whole group and hold
            assert torch.equal(res.masks[p].reshape(g.units, -1).any(dim=1), ~masked)
            assert bool((params[p].detach().reshape(g.units, -1)[masked] == 0).all())
        # units the group lasso zeroed entirely are dead too
        zero = torch.stack([params[p].detach().reshape(g.units, -1).eq(0).all(dim=1) for p in g.params]).all(dim=0)
        gone[g.layer] = int((masked | zero).sum())
    assert res.sparsity == pytest.approx(0.5, abs=0.05)  # nearest whole-unit count; the classifier is dense
    model.eval()
    x = digits.test.x.clone(memory_format=torch.contiguous_format)  # see test_unit_groups_ignore_input_strides
    small = compact(model, x[:64])
    before, after = count_units(model), count_units(small)
    assert {n: before[n] - after[n] for n in before if n in gone} == gone
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_prune_channel_then_evaluate_loads_bias_masks(tmp_path, capsys):
    import json

    from obdprune.cli import main

    dense, out = tmp_path / "dense", tmp_path / "pruned"
    assert main(["train", "--dataset", "digits", "--model", "lenet5", "--epochs", "1", "--out", str(dense),
                 "--no-progress"]) == 0
    assert main(["prune", str(dense), "--method", "hybrid", "--granularity", "channel", "--sparsity", "0.5",
                 "--finetune-epochs", "1", "--reg-epochs", "1", "--curvature-samples", "64", "--out", str(out),
                 "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["prune"]["granularity"] == "channel" and "0.bias" in m["masks"]
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sparsity"] == pytest.approx(m["metrics"]["sparsity"])
    assert main(["prune", str(dense), "--method", "obd", "--granularity", "filter", "--sparsity", "0.5",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "obdprune: error: unknown granularity 'filter'; choose one of: element, channel"


def test_l1_lambda_default_depends_on_granularity_and_is_recorded():
    assert PruneConfig().l1_lambda == "auto" and PruneConfig().to_dict()["l1_lambda"] == "auto"  # searched
    cfg = PruneConfig(granularity="channel")
    assert cfg.l1_lambda == 3e-4 and cfg.to_dict()["l1_lambda"] == 3e-4  # the manifest records the value used
    assert PruneConfig(granularity="channel", l1_lambda=0.0).l1_lambda == 0.0
