"""The MAC model of unit counts (against measured MACs of compacted models) and unit selection by
saliency per MAC saved (hand-written cases, invariants, the pruning loop and the CLI)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from obdprune.compact import compact
from obdprune.errors import UsageError
from obdprune.groups import UnitLayer, removed_units, unit_groups
from obdprune.masking import MaskSet
from obdprune.measure import count_macs
from obdprune.methods import PruneConfig, prune_model
from obdprune.models import build_model
from obdprune.train import TrainConfig
from obdprune.unit_macs import (LayerMacs, MacModel, _Kept, mac_model, min_kept, select_units_by_macs,
                                select_units_uniformly)

from conftest import randomize_batchnorm


class _ResBlockNet(nn.Module):
    """stem → residual block (the block's inner conv is a unit layer; stem and block output are tied)
    → global pooling → Linear → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv1, self.bn1 = nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
        self.conv2, self.bn2 = nn.Conv2d(5, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc1, self.fc2 = nn.Linear(6, 7), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc2(F.relu(self.fc1(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))))


def _net(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "resblock":
        m, x = _ResBlockNet(), torch.randn(4, 1, 10, 10)
    else:
        shape = (3, 16, 16) if name == "vgg-small" else (1, 28, 28)
        m, x = build_model(name, shape, 10), torch.randn(4, *shape)
    randomize_batchnorm(m)
    return m.eval(), x


def _remove(model: nn.Module, groups: list[UnitLayer], gone: list[list[int]]) -> None:
    """Zero the whole group (weights, bias, BatchNorm, coupled layers) of the listed units of each group."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for g, units in zip(groups, gone):
            for p, _, rows in g.members():
                params[p][units if rows is None else rows[units]] = 0


@pytest.mark.parametrize("name", ["lenet5", "lenet5-caffe", "vgg-small", "resblock"])
def test_dense_mac_model_equals_counted_macs(name):
    m, x = _net(name)
    mm = mac_model(m, x, unit_groups(m, x))
    assert mm.dense == count_macs(m, x)
    assert mm.macs([g.units for g in mm.groups]) == pytest.approx(mm.dense, rel=1e-12)


def test_mac_model_knows_what_reads_each_unit():
    m, x = _net("lenet5")
    groups = unit_groups(m, x)
    # conv1 → conv2 (a channel each); conv2 → Flatten → Linear(400, 120): 5×5 features per channel
    assert [(g.layer, g.readers) for g in groups] == [
        ("0", (("3", 1),)), ("3", (("7", 25),)), ("7", (("9", 1),)), ("9", (("11", 1),))]
    m, x = _net("resblock")
    # the stem and conv2 feed the residual sum: one group, read by conv1 and (after pooling) fc1
    assert [(g.layer, g.producers, g.readers) for g in unit_groups(m, x)] == [
        ("stem", ("conv2",), (("conv1", 1), ("fc1", 1))), ("conv1", (), (("conv2", 1),)), ("fc1", (), (("fc2", 1),))]


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(["lenet5", "lenet5-caffe", "vgg-small", "resblock"]), seed=st.integers(0, 2**16))
def test_mac_model_equals_macs_of_the_compacted_model(name, seed):
    m, x = _net(name)
    groups = unit_groups(m, x)
    mm = mac_model(m, x, groups)
    gen = torch.Generator().manual_seed(seed)
    gone = []
    for g in groups:  # remove a random number of units (at least one stays) at random positions
        k = int(torch.randint(0, g.units, (1,), generator=gen))
        gone.append(torch.randperm(g.units, generator=gen)[:k].tolist())
    _remove(m, groups, gone)
    kept = [g.units - len(u) for g, u in zip(groups, gone)]
    assert mm.kept_units(MaskSet({g.weight: dict(m.named_parameters())[g.weight] != 0 for g in groups})) == kept
    assert mm.macs(kept) == pytest.approx(count_macs(compact(m, x), x), rel=1e-9)



def test_the_macs_a_removal_saves_are_the_difference_of_full_counts():
    # densenet-small: units read by several layers through concatenations; resblock: a coupled residual group
    for name, m, x in [("resblock", *_net("resblock")),
                       ("densenet-small", build_model("densenet-small", (3, 8, 8), 5), torch.randn(2, 3, 8, 8))]:
        mm = mac_model(m.eval(), x, unit_groups(m, x))
        gen = torch.Generator().manual_seed(0)
        kept = [g.units for g in mm.groups]
        state = _Kept(mm, kept)
        for _ in range(40):  # random removals, checked against the recount before each
            i = int(torch.randint(0, len(kept), (1,), generator=gen))
            block = min(kept[i] - 1, int(torch.randint(1, 3, (1,), generator=gen)))
            if block < 1:
                continue
            before = mm.macs(kept)
            kept[i] -= block
            assert state.saved(i, block) == pytest.approx(before - mm.macs(kept), rel=1e-12, abs=1e-6), name
            state.remove(i, block)

# Two Linear unit layers by hand: A (4 units, 10 inputs) → B (3 units) → C (2 classes, not a group).
A = UnitLayer("a", ("a.weight",), (4, 10), readers=(("b", 1),))
B = UnitLayer("b", ("b.weight",), (3, 4), readers=(("c", 1),))
HAND = MacModel((LayerMacs("a", 40, 4, 10), LayerMacs("b", 12, 3, 4), LayerMacs("c", 6, 2, 3)), (A, B))


def test_mac_model_by_hand():
    assert HAND.dense == 58
    # A keeps 2 of 4: a 2·10 = 20, b 3·2 = 6, c 6 → 32; B keeps 1 of 3 as well: b 1·2 = 2, c 2·1 = 2 → 24
    assert HAND.macs([2, 3]) == pytest.approx(32)
    assert HAND.macs([2, 1]) == pytest.approx(24)
    assert HAND.max_fraction_removed(0.0, 1, min_units=1) == pytest.approx(1 - (10 + 1 + 2) / 58, abs=1e-6)


def _kept(masks: MaskSet, g: UnitLayer) -> list[int]:
    return torch.nonzero(~removed_units(g, masks)).flatten().tolist()


def test_selection_goes_by_score_per_mac_saved():
    # First step: a unit of A saves 10 + 3 = 13 MACs, one of B saves 4 + 2 = 6.
    # A's cheapest (score 1.3) costs 0.1 per MAC, B's cheapest (score 0.3) 0.05: B's goes first.
    scores = {"a": torch.tensor([5.0, 1.3, 9.0, 9.0]), "b": torch.tensor([9.0, 0.3, 9.0])}
    masks = select_units_by_macs(scores, HAND, 6 / 58, layer_floor=0.0, min_units=1)
    assert (_kept(masks, A), _kept(masks, B)) == ([0, 1, 2, 3], [0, 2])
    # Then A's unit 1 (1.3 / (10 + 2) ≈ 0.108) beats B's next (9 / (4 + 2) = 1.5): MACs 52 → 40.
    masks = select_units_by_macs(scores, HAND, 18 / 58, layer_floor=0.0, min_units=1)
    assert (_kept(masks, A), _kept(masks, B)) == ([0, 2, 3], [0, 2])
    # The stop is the step nearest the target; a tie keeps fewer removed: 52 and 40 around 46.
    masks = select_units_by_macs(scores, HAND, 12 / 58, layer_floor=0.0, min_units=1)
    assert (_kept(masks, A), _kept(masks, B)) == ([0, 1, 2, 3], [0, 2])
    masks = select_units_by_macs(scores, HAND, 0.0, layer_floor=0.0, min_units=1)
    assert (_kept(masks, A), _kept(masks, B)) == ([0, 1, 2, 3], [0, 1, 2])


def test_selection_respects_floors_and_refuses_unreachable_targets():
    scores = {"a": torch.zeros(4), "b": torch.zeros(3)}
    masks = select_units_by_macs(scores, HAND, HAND.max_fraction_removed(0.5, 1, min_units=1), layer_floor=0.5, min_units=1)
    assert (len(_kept(masks, A)), len(_kept(masks, B))) == (2, 2)
    with pytest.raises(UsageError, match="floor"):
        select_units_by_macs(scores, HAND, HAND.max_fraction_removed(0.5, 1, min_units=1) + 0.01, layer_floor=0.5, min_units=1)
    with pytest.raises(UsageError, match=r"\[0, 1\)"):
        select_units_by_macs(scores, HAND, 1.0, min_units=1)
    with pytest.raises(ValueError, match="no unit scores for layer 'b'"):
        select_units_by_macs({"a": torch.zeros(4)}, HAND, 0.1, min_units=1)


def test_selection_only_shrinks_masks_and_keeps_other_masks():
    other = torch.tensor([True, False])
    current = MaskSet({"a.weight": torch.ones(4, 10, dtype=torch.bool), "b.weight": torch.ones(3, 4, dtype=torch.bool),
                       "c.weight": other})
    current.masks["a.weight"][2] = False  # unit 2 of A already gone
    current.masks["b.weight"][0, 1] = False  # one single weight of B already pruned
    scores = {"a": torch.tensor([0.0, 9.0, 0.0, 9.0]), "b": torch.full((3,), 9.0)}
    masks = select_units_by_macs(scores, HAND, 1 - HAND.macs([2, 3]) / 58, current=current, layer_floor=0.0, min_units=1)
    assert _kept(masks, A) == [1, 3]  # unit 2 stays removed, unit 0 (score 0) joins it
    assert not masks["b.weight"][0, 1] and torch.equal(masks["c.weight"], other)


def test_min_kept_rounds_the_floor_up_to_the_multiple():
    assert [min_kept(50, 0.01, m, min_units=1) for m in (1, 8, 16)] == [1, 8, 16]
    assert min_kept(50, 0.3, 8, min_units=1) == 16  # floor 15 → 16
    assert min_kept(6, 0.01, 8, min_units=1) == 6 and min_kept(8, 0.01, 8, min_units=1) == 8  # too few units to prune in blocks
    assert min_kept(12, 0.9, 8, min_units=1) == 12  # floor 11 → 16 > 12: keeps all
    assert (min_kept(50, 0.01), min_kept(3, 0.01), min_kept(50, 0.01, 8)) == (4, 3, 8)  # min units 4 by default


def test_selection_in_blocks_of_a_multiple():
    # multiple 2: A (4 units) goes 4 → 2 in one block, B (3 units) 3 → 2 only (its minimum is 2)
    scores = {"a": torch.tensor([5.0, 1.3, 9.0, 9.0]), "b": torch.tensor([9.0, 0.3, 9.0])}
    assert HAND.max_fraction_removed(0.0, 2, min_units=1) == pytest.approx(1 - 28 / 58, abs=1e-6)
    # B's block: 0.3 / 6 MACs = 0.05 beats A's (1.3 + 5) / 26 ≈ 0.24; then only A's block is left
    masks = select_units_by_macs(scores, HAND, 6 / 58, layer_floor=0.0, multiple=2, min_units=1)
    assert (_kept(masks, A), _kept(masks, B)) == ([0, 1, 2, 3], [0, 2])
    masks = select_units_by_macs(scores, HAND, 30 / 58, layer_floor=0.0, multiple=2, min_units=1)
    assert (_kept(masks, A), _kept(masks, B)) == ([2, 3], [0, 2])
    with pytest.raises(UsageError, match="floor"):
        select_units_by_macs(scores, HAND, 31 / 58, layer_floor=0.0, multiple=2, min_units=1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), fraction=st.floats(0.0, 0.8), multiple=st.sampled_from([1, 2, 4, 8]),
       first=st.floats(0.0, 0.5))
def test_selection_invariants(seed, fraction, multiple, first):
    """Kept counts are multiples (or all units), at least the minimum; masks only shrink; the MACs reached
    are the nearest to the target among the greedy steps, so within one block's saving of it."""
    m, x = _net("lenet5-caffe")
    mm = mac_model(m, x, unit_groups(m, x))
    gen = torch.Generator().manual_seed(seed)
    scores = {g.layer: torch.rand(g.units, generator=gen) for g in mm.groups}
    fraction = min(fraction, mm.max_fraction_removed(0.01, multiple, min_units=1))
    first = min(first, fraction)
    current = select_units_by_macs(scores, mm, first, multiple=multiple, min_units=1)
    masks = select_units_by_macs(scores, mm, fraction, current=current, multiple=multiple, min_units=1)
    for g, before, after in zip(mm.groups, mm.kept_units(current), mm.kept_units(masks)):
        assert after <= before and after >= min_kept(g.units, 0.01, multiple, min_units=1)
        assert after == g.units or after % multiple == 0
        assert bool((masks[g.weight] <= current[g.weight]).all())
    reached = mm.fraction_removed(masks)
    biggest_block = max(mm.macs([g.units for g in mm.groups]) - mm.macs(
        [g.units - (multiple if i == j else 0) for j, g in enumerate(mm.groups)]) for i in range(len(mm.groups)))
    if reached < fraction:
        assert fraction - reached <= biggest_block / mm.dense + 1e-9


# ------------------------------------------------------------------------------- pruning loop + CLI


def test_macs_budget_prunes_to_mac_targets_and_compacts_to_them(digits):
    torch.manual_seed(0)
    dense = build_model("lenet5", digits.input_shape, digits.num_classes)
    cfg = PruneConfig(method="obd", granularity="channel", budget="macs", reg_epochs=0, curvature_samples=64,
                      prune_step=0.3,  # a last step of 2 % after 0.2775 overshoots by a whole conv1 unit (3 %)
                      finetune=TrainConfig(epochs=1, lr=0.01, batch_size=128, schedule="cosine"))
    results = prune_model(dense, digits, cfg, targets=[0.3, 0.6], progress=False)
    x = digits.test.x[:8].clone(memory_format=torch.contiguous_format)
    base = count_macs(dense, x)
    for res, target in zip(results, (0.3, 0.6)):
        model = build_model("lenet5", digits.input_shape, digits.num_classes)
        model.load_state_dict(res.state_dict)
        saved = 1 - count_macs(compact(model.eval(), x), x) / base
        assert res.macs_removed == pytest.approx(saved, abs=1e-9)
        assert saved == pytest.approx(target, abs=0.03)  # nearest whole-unit step
        assert res.to_dict()["macs_removed"] == res.macs_removed


def test_macs_budget_needs_channel_granularity(tmp_path, capsys):
    with pytest.raises(UsageError, match="a MAC budget needs channel granularity"):
        PruneConfig(budget="macs")
    assert PruneConfig(budget="macs", granularity="channel", scope="layer").scope.value == "layer"
    with pytest.raises(UsageError, match="unknown budget 'flops'; choose one of: weights, macs"):
        PruneConfig(budget="flops")
    with pytest.raises(UsageError, match="a channel multiple needs the MAC budget"):
        PruneConfig(granularity="channel", channel_multiple=8)
    from obdprune.cli import main

    dense = tmp_path / "dense"
    assert main(["train", "--dataset", "digits", "--model", "lenet5", "--epochs", "1", "--out", str(dense),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["prune", str(dense), "--method", "obd", "--budget", "macs", "--sparsity", "0.5",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "obdprune: error: a MAC budget needs channel granularity (removing single weights saves no time)"


def test_report_shows_mac_targets_and_macs_removed():
    from obdprune.report import render_report

    dense = {"test_accuracy": 0.9, "val_accuracy": 0.91, "nonzero_weights": 100, "weights": 100}
    res = {"method": "obd", "sparsity": 0.2, "nonzero_weights": 80, "weights": 100, "val_accuracy": 0.9,
           "test_accuracy": 0.89, "seconds": 3.0, "curvature_seconds": 0.5, "round": 1, "target_sparsity": 0.5,
           "macs_removed": 0.4987}
    text = render_report({"model": "m", "dataset": "d", "seed": 0, "dense": dense, "prune": {"budget": "macs"},
                          "results": [res]})
    assert "| MACs removed |" in text and "| obd | 0.50 of MACs | 20.00% |" in text and "| 49.87% |" in text
    plain = {k: v for k, v in res.items() if k != "macs_removed"}
    text = render_report({"model": "m", "dataset": "d", "seed": 0, "dense": dense, "results": [plain]})
    assert "MACs" not in text


def _residual_net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    from obdprune.models.cnn import resnet20
    model = resnet20((3, 8, 8), 5, width=8).eval()
    randomize_batchnorm(model)
    return model, torch.randn(2, 3, 8, 8)


@settings(max_examples=20, deadline=None)
@given(fraction=st.floats(0.05, 0.7), multiple=st.sampled_from([1, 4, 8]), seed=st.integers(0, 10_000))
def test_uniform_selection_keeps_one_share_everywhere_and_removes_the_lowest_scores(fraction, multiple, seed):
    model, x = _UNIFORM_NET
    mm = mac_model(model, x, unit_groups(model, x))
    gen = torch.Generator().manual_seed(seed)
    scores = {g.layer: torch.rand(g.units, generator=gen) for g in mm.groups}
    lowest = [min_kept(g.units, 0.0, multiple, 2) for g in mm.groups]
    if mm.macs(lowest) > (1 - fraction) * mm.dense:
        with pytest.raises(UsageError, match="lower the target"):
            select_units_uniformly(scores, mm, fraction, layer_floor=0.0, multiple=multiple, min_units=2)
        return
    masks = select_units_uniformly(scores, mm, fraction, layer_floor=0.0, multiple=multiple, min_units=2)
    kept = mm.kept_units(masks)
    low, high = 0.0, 1.0  # the shares every group's count is the rounding of
    for g, k, lo in zip(mm.groups, kept, lowest):
        assert lo <= k <= g.units and (k % multiple == 0 or k in (lo, g.units))
        if k > lo:
            low = max(low, (k - multiple / 2) / g.units)
        if k < g.units:
            high = min(high, (k + multiple / 2) / g.units)
        removed = removed_units(g, masks)
        assert int(removed.sum()) == g.units - k
        if 0 < k < g.units:  # the lowest scores went
            assert scores[g.layer][removed].max() <= scores[g.layer][~removed].min()
    assert low <= high + 1e-9, (low, high, kept)
    more = select_units_uniformly(scores, mm, min(0.99, fraction + 0.1), layer_floor=0.0, multiple=multiple,
                                  min_units=2) if mm.macs(lowest) <= (0.9 - fraction) * mm.dense else None
    if more is not None:  # a larger target never keeps more units anywhere
        assert all(a <= b for a, b in zip(mm.kept_units(more), kept))


_UNIFORM_NET = _residual_net()


def test_uniform_selection_keeps_earlier_removals_and_the_front_door_prunes_every_coupled_conv():
    import obdprune
    from obdprune.compact import count_units
    model, _ = _residual_net()
    x, y = torch.randn(32, 3, 8, 8), torch.arange(32) % 5
    pruner = obdprune.Pruner(model, method="obd", granularity="channel", budget="macs", scope="layer",
                             example_inputs=x[:1], min_units=2, curvature_samples=16)
    first = pruner.step(0.3, data=(x, y))
    second = pruner.step(0.5, data=(x, y))
    for name, mask in first.items():
        assert not (second[name] & ~mask).any()  # nothing removed comes back
    before, small = count_units(model), pruner.compact()
    after = count_units(small)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert all(after[n] < before[n] for n in convs), {n: (before[n], after[n]) for n in convs}
    assert count_macs(small, x[:1]) == pytest.approx(0.5 * count_macs(model, x[:1]), rel=0.12)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5, rtol=0)
