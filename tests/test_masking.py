"""Mask selection and enforcement: hand-written tensors and invariants."""
import copy
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from obdprune.errors import UsageError
from obdprune.masking import MaskSet, Scope, masks_from_weights, prunable_weights, select_masks


def test_global_selection_hand_written():
    scores = {"a": torch.tensor([[0.1, 5.0], [3.0, 0.2]]), "b": torch.tensor([0.3, 4.0, 0.05, 2.0])}
    m = select_masks(scores, 0.5, scope="global", layer_floor=0.0)
    # lowest four of {0.1, 5, 3, 0.2, 0.3, 4, 0.05, 2}: 0.05, 0.1, 0.2, 0.3
    assert m["a"].tolist() == [[False, True], [True, False]]
    assert m["b"].tolist() == [False, True, False, True]


def test_layer_selection_hand_written():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 0.0, 30.0, 20.0])}
    m = select_masks(scores, 0.5, scope="layer", layer_floor=0.0)
    assert m["a"].tolist() == [False, False, True, True]
    assert m["b"].tolist() == [False, False, True, True]


def test_ties_broken_by_position_with_exact_count():
    scores = {"a": torch.ones(10)}
    m = select_masks(scores, 0.3, layer_floor=0.0)
    assert m["a"].tolist() == [False] * 3 + [True] * 7


def test_ties_across_tensors_prefer_earlier_tensor():
    scores = {"a": torch.ones(4), "b": torch.ones(4)}
    m = select_masks(scores, 0.5, layer_floor=0.0)  # each tensor still keeps its one-weight floor
    assert m["a"].tolist() == [False, False, False, True] and m["b"].tolist() == [False, True, True, True]


def test_floor_protects_small_layer():
    scores = {"big": torch.arange(100.0) + 10, "small": torch.tensor([0.0, 0.1, 0.2, 0.3])}
    m = select_masks(scores, 0.9, layer_floor=0.05)
    # the small layer has the lowest scores, but ceil(0.05 * 4) = 1 of its weights is protected
    assert m["small"].tolist() == [False, False, False, True]
    assert m.numel() - m.kept() == round(0.9 * 104)


def test_target_that_empties_a_layer_is_refused():
    scores = {"a": torch.rand(10), "b": torch.rand(10)}
    with pytest.raises(UsageError, match="emptied"):
        select_masks(scores, 0.95, layer_floor=0.1)
    with pytest.raises(UsageError, match="floor"):
        select_masks(scores, 0.95, scope="layer", layer_floor=0.1)


def test_bad_arguments():
    with pytest.raises(UsageError):
        select_masks({"a": torch.rand(3)}, 1.0)
    with pytest.raises(UsageError, match="global, layer"):
        Scope.parse("everywhere")
    with pytest.raises(UsageError, match="NaN"):
        select_masks({"a": torch.tensor([float("nan"), 1.0])}, 0.5)


def test_current_masks_only_shrink():
    scores = {"a": torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])}
    current = MaskSet({"a": torch.tensor([False, True, True, True, True])})
    m = select_masks(scores, 0.4, current=current, layer_floor=0.0)
    # the already pruned entry (score 5) goes first, then the lowest remaining score
    assert m["a"].tolist() == [False, True, True, True, False]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    sparsity=st.floats(0.0, 0.9),
    scope=st.sampled_from(["global", "layer"]),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_masks_binary_exact_count_and_monotone(sizes, sparsity, scope, seed, ties):
    g = torch.Generator().manual_seed(seed)
    scores = {f"t{i}": (torch.randint(0, 3, (n,), generator=g).float() if ties else torch.rand(n, generator=g))
              for i, n in enumerate(sizes)}
    total = sum(sizes)
    try:
        m = select_masks(scores, sparsity, scope=scope, layer_floor=0.0)
    except UsageError:
        return
    for name, mask in m.items():
        assert mask.dtype == torch.bool and mask.shape == scores[name].shape
        assert int(mask.sum()) >= 1
    if scope == "global":
        assert total - m.kept() == round(sparsity * total)
    else:
        for name, mask in m.items():
            assert mask.numel() - int(mask.sum()) == round(sparsity * mask.numel())
    # monotone: a higher target removes a superset when it starts from these masks
    try:
        m2 = select_masks(scores, min(0.95, sparsity + 0.05), scope=scope, current=m, layer_floor=0.0)
    except UsageError:
        return
    for name in m:
        assert not bool((m2[name] & ~m[name]).any())


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def test_prunable_weights_names():
    assert list(prunable_weights(_net())) == ["0.weight", "3.weight"]


@pytest.mark.parametrize("opt_name", ["sgd", "sgd-nesterov", "adam", "adamw", "rmsprop"])
def test_pruned_weights_stay_exactly_zero_through_steps(opt_name):
    model = _net()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    params = list(model.parameters())
    opt = {
        "sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2),
        "sgd-nesterov": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
        "adam": lambda: torch.optim.Adam(params, lr=0.01, weight_decay=1e-2),
        "adamw": lambda: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
        "rmsprop": lambda: torch.optim.RMSprop(params, lr=0.01, momentum=0.5, weight_decay=1e-2),
    }[opt_name]()
    # build optimizer state (momentum, moments) before pruning, so stale state would revive weights
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    masks = select_masks({n: torch.rand(p.shape) for n, p in prunable_weights(model).items()}, 0.7, layer_floor=0.0)
    handle = masks.attach(opt, model)
    for _ in range(50):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for name, p in prunable_weights(model).items():
            assert bool((p[~masks[name]] == 0).all()), name
    kept_changed = any(bool((p[masks[n]] != 0).any()) for n, p in prunable_weights(model).items())
    assert kept_changed
    handle.remove()


def test_deepcopy_and_state_dict_keep_masks_and_outputs():
    model = _net()
    masks = select_masks(magnitude := {n: p.abs() for n, p in prunable_weights(model).items()}, 0.6, layer_floor=0.0)
    del magnitude
    masks.apply(model)
    clone = copy.deepcopy(model)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(clone(x), model(x))
    fresh = _net()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))
    back = masks_from_weights(fresh)
    for n in masks:
        assert torch.equal(back[n], masks[n])
    assert set(model.state_dict()) == set(_net().state_dict())  # no *_orig / *_mask entries
    assert math.isclose(masks.sparsity(), 0.6, abs_tol=1 / masks.numel())


def test_pruned_and_thresholded_weights_are_positive_zero():
    """-0.0 is bitwise nonzero: sparse files would store it. Masks and L1 must leave +0.0."""
    from obdprune.regularize import L1Proximal

    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-1.0, 0.5, -0.01, 2.0]] * 3))
    MaskSet({"0.weight": torch.tensor([[False, True, True, True]] * 3)}).apply(model)
    L1Proximal(lam=1.0).after_step(model, lr=0.1)  # threshold 0.1 zeroes -0.01
    w = model[0].weight
    zeros = w == 0
    assert zeros[:, 0].all() and zeros[:, 2].all()
    assert not torch.signbit(w[zeros]).any()
    assert torch.allclose(w[:, 1], torch.full((3,), 0.4)) and torch.allclose(w[:, 3], torch.full((3,), 1.9))


OPTIMIZERS = {
    "sgd": lambda ps, lr, wd: torch.optim.SGD(ps, lr=lr, weight_decay=wd),
    "momentum": lambda ps, lr, wd: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=wd),
    "adam": lambda ps, lr, wd: torch.optim.Adam(ps, lr=lr, weight_decay=wd),
    "adamw": lambda ps, lr, wd: torch.optim.AdamW(ps, lr=lr, weight_decay=wd),
}


@settings(max_examples=25, deadline=None)
@given(
    opt_name=st.sampled_from(sorted(OPTIMIZERS)),
    steps=st.integers(1, 25),
    lr=st.floats(1e-4, 0.5),
    wd=st.floats(0.0, 0.1),
    sparsity=st.floats(0.05, 0.95),
    warm_steps=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_property_pruned_weights_stay_zero_and_round_trips_keep_them(opt_name, steps, lr, wd, sparsity, warm_steps,
                                                                      seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 5, (8,))
    opt = OPTIMIZERS[opt_name](list(model.parameters()), lr, wd)
    for _ in range(warm_steps):  # optimizer state from before pruning must not revive weights
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    masks = select_masks({n: torch.rand(p.shape) for n, p in prunable_weights(model).items()}, sparsity,
                         layer_floor=0.0)
    masks.attach(opt, model)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for name, p in prunable_weights(model).items():
            assert bool((p[~masks[name]] == 0).all())
    clone = copy.deepcopy(model)
    fresh = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    fresh.load_state_dict(model.state_dict())
    for other in (clone, fresh):
        assert torch.equal(other(x), model(x))
        back = masks_from_weights(other)
        for name in masks:
            assert not bool((back[name] & ~masks[name]).any())  # nothing pruned came back
