"""The recovery recipe wired into the prune loop, each part on a tiny model: the gradual run prunes at its
steps to the ramp's exact targets, rewinding replays the dense schedule, the distillation loss is its
formula, OBS inside the loop keeps masks exact, ``l1_lambda="auto"`` follows validation only, the max-drop
rule in the loop, and pruned weights stay exactly zero after every optimizer step of every new phase.
The building blocks alone: tests/test_recipe_blocks.py (ramp, max-drop rules), tests/test_obs.py."""
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import obdprune
import obdprune.lambda_search as lambda_search
import obdprune.methods as methods_mod
from obdprune.cli import _prune_cfg, build_parser, main
from obdprune.errors import UsageError
from obdprune.gradual import plan_gradual
from obdprune.lambda_search import lambda_from_strength
from obdprune.masking import prunable_weights
from obdprune.methods import PruneConfig, measured_sparsity, prune_model
from obdprune.selection import Selector
from obdprune.recipe import Distillation, distillation_loss, lr_sequence
from obdprune.stopping import choose_max_drop, standard_error
from obdprune.train import TrainConfig, train

BATCH = 32  # 256 training images: 8 steps per epoch


def _net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g)

    def split(n):
        y = torch.randint(0, 3, (n,), generator=g)
        return (centers[y] + 0.8 * torch.randn(n, 16, generator=g)).reshape(n, 1, 4, 4), y

    data = SimpleNamespace(train=split(256), val=split(128), test=split(128))
    torch.manual_seed(0)
    model = _net()
    dense_cfg = TrainConfig(epochs=3, lr=0.1, batch_size=BATCH, schedule="onecycle")
    train(model, data.train, dense_cfg, progress=False)
    return data, model, dense_cfg


def _cfg(method="magnitude", **kw):
    kw = {"finetune": TrainConfig(epochs=1, lr=0.05, batch_size=BATCH, schedule="cosine"), "reg_epochs": 1,
          "curvature_samples": 64, "prune_step": 0.6, "distill": None, **kw}
    return PruneConfig(method=method, **kw)


class MaskWatch:
    """Records every pruning step (optimizer steps done, target, masks) and checks after every optimizer
    step, and right after every pruning step (OBS updates included), that the pruned weights are exactly 0."""

    def __init__(self, monkeypatch):
        self.model, self.masks, self.steps, self.checks, self.pruned = None, None, 0, 0, []
        real = methods_mod.prune_step

        def spy(model, cfg, selector, masks, target, *a, **kw):
            new, seconds = real(model, cfg, selector, masks, target, *a, **kw)
            self.model, self.masks = model, new
            self.check()
            self.pruned.append((self.steps, target, {n: m.clone() for n, m in new.items()}))
            return new, seconds

        monkeypatch.setattr(methods_mod, "prune_step", spy)

    def check(self) -> None:
        if self.masks is None:
            return
        for name, p in prunable_weights(self.model).items():
            assert bool((p[~self.masks[name]] == 0).all()), name
        self.checks += 1

    def after_step(self, opt, args, kwargs) -> None:
        self.steps += 1
        self.check()

    def __enter__(self):
        self.handle = register_optimizer_step_post_hook(self.after_step)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def _exact(r, total):
    model = _net()
    model.load_state_dict(r.state_dict)
    assert total - sum(int(m.sum()) for _, m in r.masks.items()) == round(r.target_sparsity * total)
    assert all(bool((p[~r.masks[n]] == 0).all()) for n, p in prunable_weights(model).items())


# ------------------------------------------------------------------------------------------ gradual


def test_gradual_run_prunes_at_its_steps_to_exact_targets_and_masks_hold(tiny, monkeypatch):
    data, dense, _ = tiny
    rounds = []
    with MaskWatch(monkeypatch) as watch:
        results = prune_model(dense, data, _cfg("l1", prune_schedule="gradual", total_epochs=4, prune_every=2,
                                                l1_lambda=1e-3), targets=[0.5, 0.8], progress=False,
                              on_round=rounds.append)
    plan = plan_gradual([0.5, 0.8], steps_per_epoch=8, total_epochs=4, pre_epochs=1, tail_epochs=1, prune_every=2)
    assert [s for s, *_ in watch.pruned] == list(plan.steps) == [10, 12, 14, 16, 18, 20, 22, 24]
    assert [t for _, t, _ in watch.pruned] == list(plan.sparsities)
    assert watch.steps == 4 * 8 and watch.checks == 4 * 8 - 10 + len(plan.steps)
    total = sum(m.numel() for m in watch.pruned[0][2].values())
    for (_, target, masks), previous in zip(watch.pruned, [None] + watch.pruned[:-1]):
        assert total - sum(int(m.sum()) for m in masks.values()) == round(target * total)
        if previous is not None:
            assert all(not bool((masks[n] & ~previous[2][n]).any()) for n in masks)  # only shrink
    assert [r["target"] for r in rounds] == list(plan.sparsities) and [r["round"] for r in rounds] == list(range(1, 9))
    assert [r.target_sparsity for r in results] == [0.5, 0.8]
    for r in results:
        _exact(r, total)


def test_gradual_needs_its_budget_and_room_for_its_targets(tiny):
    data, dense, _ = tiny
    with pytest.raises(UsageError, match="total_epochs"):
        PruneConfig(prune_schedule="gradual")
    with pytest.raises(UsageError, match="budget of prune_schedule='gradual'"):
        PruneConfig(total_epochs=10)
    with pytest.raises(UsageError, match="must exceed"):
        prune_model(dense, data, _cfg(prune_schedule="gradual", total_epochs=2), targets=[0.5], progress=False)


@pytest.mark.parametrize("window", [1, 4])
def test_gradual_obd_blends_curvature_over_its_window(tiny, monkeypatch, window):
    """The first ramp step estimates on curvature_samples, each later one on ⌈S/W⌉ fresh samples, and the
    saliency uses (1 − 1/W)·old + (1/W)·fresh; W = 1 is a fresh full estimate every step."""
    data, dense, _ = tiny
    real, seen, used = methods_mod.round_curvature, [], []

    def spy(model, cfg, x, y, *a, **kw):
        curv, seconds = real(model, cfg, x, y, *a, **kw)
        seen.append((x.shape[0], {n: h.clone() for n, h in curv.items()}))
        return curv, seconds

    monkeypatch.setattr(methods_mod, "round_curvature", spy)
    real_scores = Selector.scores
    monkeypatch.setattr(Selector, "scores", lambda self, model, curv=None, neg=None: used.append(
        {n: h.clone() for n, h in curv.items()}) or real_scores(self, model, curv, neg))
    cfg = _cfg("obd", prune_schedule="gradual", total_epochs=4, prune_every=4, curvature_window=window)
    with MaskWatch(monkeypatch) as watch:
        prune_model(dense, data, cfg, targets=[0.7], progress=False)
    assert len(seen) == len(used) == len(watch.pruned) == 4
    assert [n for n, _ in seen] == [64] + [64 if window == 1 else 16] * 3
    expected = seen[0][1]
    for k, ((_, fresh), blended) in enumerate(zip(seen, used)):
        if k:
            expected = {n: (1 - 1 / window) * expected[n] + fresh[n] / window for n in fresh}
        for n in fresh:
            torch.testing.assert_close(blended[n], expected[n])


def test_gradual_auto_lambda_search_comes_out_of_total_epochs(tiny, monkeypatch):
    """The λ trials (4 strengths sharing 1 epoch) are part of total_epochs: the method trains 8 epochs in all."""
    data, dense, _ = tiny
    cfg = _cfg("l1", prune_schedule="gradual", total_epochs=8, prune_every=4, l1_lambda="auto")
    with MaskWatch(monkeypatch) as watch:
        results = prune_model(dense, data, cfg, targets=[0.5], progress=False)
    searched = results[0].l1_search["epochs"]
    assert searched == 1 and watch.steps == 8 * 8
    plan = plan_gradual([0.5], steps_per_epoch=8, total_epochs=8 - searched, pre_epochs=1, tail_epochs=1, prune_every=4)
    assert [s - searched * 8 for s, *_ in watch.pruned] == list(plan.steps)
    with pytest.raises(UsageError, match="search spent 1 of total_epochs=3"):
        prune_model(dense, data, replace(cfg, total_epochs=3), targets=[0.5], progress=False)


def test_curvature_window_belongs_to_the_gradual_schedule():
    with pytest.raises(UsageError, match="carries curvature across the steps"):
        PruneConfig(curvature_window=4)
    with pytest.raises(UsageError, match="curvature_window is a number of ramp steps"):
        PruneConfig(prune_schedule="gradual", total_epochs=3, curvature_window=0)
    with pytest.raises(UsageError, match="curvature_window"):
        obdprune.Pruner(_net(), curvature_window=2)


# ---------------------------------------------------------------------------------------- rewinding


def test_lr_rewind_replays_the_dense_schedule(tiny):
    data, dense, dense_cfg = tiny
    lrs = []
    hook = register_optimizer_step_pre_hook(lambda opt, a, k: lrs.append(opt.param_groups[0]["lr"]))
    try:
        train(_net(), data.train, dense_cfg, progress=False)
        dense_lrs = list(lrs)
        lrs.clear()
        prune_model(dense, data, _cfg(lr_rewind=True), targets=[0.5], progress=False, dense_train=dense_cfg)
    finally:
        hook.remove()
    assert dense_lrs == lr_sequence(dense_cfg, 8)
    tail = dense_lrs[-8:]  # phases of one epoch replay the dense run's last epoch
    assert len(set(tail)) > 1 and lrs == tail + tail  # the regularization phase, then one round
    with pytest.raises(UsageError, match="dense run's training schedule"):
        prune_model(dense, data, _cfg(lr_rewind=True), targets=[0.5], progress=False)
    lrs.clear()  # a gradual run longer than the dense one replays the whole dense schedule, stretched
    hook = register_optimizer_step_pre_hook(lambda opt, a, k: lrs.append(opt.param_groups[0]["lr"]))
    try:
        prune_model(dense, data, _cfg(lr_rewind=True, prune_schedule="gradual", total_epochs=6, prune_every=2),
                    targets=[0.5], progress=False, dense_train=dense_cfg)
    finally:
        hook.remove()
    assert lrs == lr_sequence(replace(dense_cfg, epochs=6), 8) and max(lrs) == max(dense_lrs)


# ------------------------------------------------------------------------------------- distillation


def test_distillation_loss_is_its_formula_in_float64():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2])
    for T, alpha in [(1.0, 0.0), (2.0, 0.5), (4.0, 1.0), (0.5, 0.3)]:
        ce = -sum(zs[i, y[i]] - torch.log(torch.exp(zs[i]).sum()) for i in range(5)) / 5
        kl = 0.0
        for i in range(5):
            pt = torch.exp(zt[i] / T) / torch.exp(zt[i] / T).sum()
            ps = torch.exp(zs[i] / T) / torch.exp(zs[i] / T).sum()
            kl = kl + (pt * (torch.log(pt) - torch.log(ps))).sum()
        expected = (1 - alpha) * ce + alpha * T * T * kl / 5
        got = distillation_loss(zs, zt, y, T, alpha)
        assert got.dtype == torch.float64 and float(got) == pytest.approx(float(expected), rel=1e-12)


def test_distillation_in_the_loop_learns_from_a_frozen_dense_copy_with_masks_held(tiny, monkeypatch):
    data, dense, _ = tiny
    kd = Distillation(dense, 2.0, 0.7)
    x, y = data.train[0][:16], data.train[1][:16]
    logits = _net()(x)
    with torch.no_grad():
        dense.eval()
        expected = distillation_loss(logits, dense(x), y, 2.0, 0.7)
    torch.testing.assert_close(kd(logits, x, y).mean(), expected)
    assert kd.teacher is not dense and not any(p.requires_grad for p in kd.teacher.parameters())
    with pytest.raises(UsageError, match="temperature"):
        PruneConfig(distill=(0, 0.5))
    with pytest.raises(UsageError, match="alpha"):
        PruneConfig(distill=(2, 1.5))
    losses = []
    real = methods_mod.Recovery.make

    def spy(*a):
        recovery = real(*a)
        kd_loop = recovery.distillation
        recovery.distillation = lambda z, xb, yb: losses.append(1) or kd_loop(z, xb, yb)
        return recovery

    monkeypatch.setattr(methods_mod.Recovery, "make", spy)
    with MaskWatch(monkeypatch) as watch:
        r50, r80 = prune_model(dense, data, _cfg("l1", distill=(2.0, 0.5), l1_lambda=1e-3), targets=[0.5, 0.8],
                               progress=False)
    assert len(losses) == 8 * 3 == watch.steps  # regularization and both rounds learn from the teacher
    total = measured_sparsity(dense)[2]
    _exact(r50, total)
    _exact(r80, total)


# ---------------------------------------------------------------------------------------------- OBS


@pytest.mark.parametrize("method, criterion", [("magnitude", None), ("hybrid", "obs")])
def test_obs_update_in_the_loop_reaches_exact_targets(tiny, monkeypatch, method, criterion):
    data, dense, _ = tiny
    with MaskWatch(monkeypatch) as watch:
        r50, r80 = prune_model(dense, data, _cfg(method, update="obs", criterion=criterion, l1_lambda=1e-4),
                               targets=[0.5, 0.8], progress=False)
    assert watch.checks == watch.steps - 8 + 2  # every step after the first pruning, and after each OBS update
    total = measured_sparsity(dense)[2]
    _exact(r50, total)
    _exact(r80, total)
    assert all(not bool((r80.masks[n] & ~r50.masks[n]).any()) for n in r50.masks)


def test_obs_update_moves_the_weights_left_and_refuses_units(tiny):
    data, dense, _ = tiny
    cfg = _cfg(reg_epochs=0, finetune=TrainConfig(epochs=0, batch_size=BATCH))
    (plain,) = prune_model(dense, data, cfg, targets=[0.5], progress=False)
    (obs,) = prune_model(dense, data, replace(cfg, update="obs"), targets=[0.5], progress=False)
    kept = plain.masks["1.weight"] & obs.masks["1.weight"]
    assert not torch.equal(plain.state_dict["1.weight"][kept], obs.state_dict["1.weight"][kept])
    with pytest.raises(UsageError, match="update='obs'.*granularity='element'"):
        PruneConfig(update="obs", granularity="channel")
    with pytest.raises(UsageError, match="criterion='obs'"):
        obdprune.Pruner(_net(), criterion="obs", granularity="channel", example_inputs=data.train[0][:2])


def test_pruner_takes_the_obs_criterion_and_update_but_refuses_loop_options(tiny):
    data, dense, _ = tiny
    model = _net()
    model.load_state_dict(dense.state_dict())
    pruner = obdprune.Pruner(model, method="magnitude", criterion="obs", update="obs")
    with pytest.raises(UsageError, match="pass data="):
        pruner.step(0.5)
    masks = pruner.step(0.5, data=data.train)
    assert pruner.sparsity == pytest.approx(0.5, abs=1e-2)
    assert all(bool((p[~masks[n]] == 0).all()) for n, p in prunable_weights(model).items())
    for bad in ({"lr_rewind": True}, {"distill": (2, 0.5)}, {"l1_lambda": "auto"}, {"max_drop_rule": "first-failure"},
                {"prune_schedule": "gradual", "total_epochs": 3}):
        with pytest.raises(UsageError, match="a Pruner steps inside yours"):
            obdprune.Pruner(_net(), **bad)


# ----------------------------------------------------------------------------------------- auto λ


def test_auto_lambda_is_chosen_on_validation_never_on_test(monkeypatch):
    """A 1→2 linear layer shrunk by one proximal step of λ predicts class 0 for λ = 0.1 and class 1 for
    λ = 4 (the weights vanish, the bias decides). Validation says class 0, test says class 1: the choice
    follows validation (training labels agree with test), and swapping the splits swaps the choice."""
    monkeypatch.setattr(lambda_search, "AUTO_L1_STRENGTHS", (0.2, 8.0))  # λ = ρ/2: 0.1 and 4
    x = torch.ones(8, 1)
    zeros, ones = torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long)

    def model():
        m = nn.Linear(1, 2)
        with torch.no_grad():
            m.weight.copy_(torch.tensor([[2.0], [-1.0]]))
            m.bias.copy_(torch.tensor([0.0, 0.5]))
        return m

    def one_proximal_step(m, epochs):
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        (0.0 * m(x).sum()).backward()
        opt.step()

    choices = []
    for val, test in [(zeros, ones), (ones, zeros)]:
        result = obdprune.prune(model(), (x, test), (x, val), test=(x, test), method="l1", sparsity=0.5,
                                l1_lambda="auto", reg_epochs=1, finetune_epochs=0, fine_tune=one_proximal_step,
                                progress=False)
        (point,) = result.points
        choices.append(point.l1_lambda)
        cands = {c["l1_lambda"]: c["val_accuracy"] for c in point.l1_search["candidates"]}
        assert cands == ({0.1: 1.0, 4.0: 0.0} if val is zeros else {0.1: 0.0, 4.0: 1.0})
        assert point.l1_search["epochs"] == 2 and point.to_dict()["l1_lambda"] == point.l1_lambda
    assert choices == [0.1, 4.0]
    assert lambda_from_strength(64.0, nn.Linear(4, 8)) == 2.0  # λ = ρ / number of Conv/Linear weights


def test_auto_lambda_trials_share_the_regularization_phase_so_every_method_trains_as_long(tiny, monkeypatch):
    """Rounds: 4 candidates × every 4th batch of 2 epochs = the 2 regularization epochs magnitude trains;
    the winner's weights are that phase, so l1 with a searched λ takes exactly magnitude's optimizer steps.
    Each candidate is scored by the mean of its one-shot probes at every target."""
    data, dense, _ = tiny
    steps = {}
    for method, lam in [("magnitude", None), ("l1", "auto")]:
        with MaskWatch(monkeypatch) as watch:
            points = prune_model(dense, data, _cfg(method, reg_epochs=2, l1_lambda=lam), targets=[0.5, 0.8],
                                 progress=False)
        steps[method] = watch.steps
    assert steps["l1"] == steps["magnitude"] == 8 * (2 + 2)  # 2 regularization epochs, 2 rounds of 1
    search = points[0].l1_search
    assert search["epochs"] == 2 and len(search["candidates"]) == len(lambda_search.AUTO_L1_STRENGTHS)
    for c in search["candidates"]:
        assert len(c["probe_accuracies"]) == 2
        assert c["val_accuracy"] == pytest.approx(sum(c["probe_accuracies"]) / 2)
    assert search["l1_lambda"] == max(search["candidates"], key=lambda c: c["val_accuracy"])["l1_lambda"]


def test_l1_ramp_grows_lambda_along_the_path_and_masks_hold(tiny, monkeypatch):
    data, dense, _ = tiny
    seen = {}
    real = methods_mod._phase_runner

    def recording(*a, **kw):
        run = real(*a, **kw)

        def rec(model, epochs, seed, desc, masks, reg, data=None):
            seen.setdefault(ramp, []).append(reg.lam)
            return run(model, epochs, seed, desc, masks, reg, data=data)
        return rec

    monkeypatch.setattr(methods_mod, "_phase_runner", recording)
    for ramp in (False, True):
        with MaskWatch(monkeypatch) as watch:
            points = prune_model(dense, data, _cfg("l1", l1_lambda=1e-3, l1_ramp=ramp), targets=[0.5, 0.8],
                                 progress=False)
        assert watch.checks > 0 and [p.target_sparsity for p in points] == [0.5, 0.8]
    assert seen[False] == [1e-3] * 3  # the regularization phase and two rounds
    assert seen[True] == pytest.approx([1e-3 * 0.5 / 0.8, 1e-3 * 0.5 / 0.8, 1e-3])
    with pytest.raises(UsageError, match="l1_ramp"):
        PruneConfig(l1_ramp=True, prune_schedule="gradual", total_epochs=4)
    with pytest.raises(UsageError, match="l1_ramp"):
        obdprune.Pruner(_net(), l1_ramp=True)


def test_part_batches_split_each_epoch_into_disjoint_shares():
    x, y = torch.arange(20.0).reshape(20, 1), torch.arange(20)
    from obdprune.batches import TensorBatches

    full = TensorBatches(x, y)
    whole = [b[1].tolist() for b in full.epoch(3, torch.Generator().manual_seed(5))]  # 7 batches
    parts = [[b[1].tolist() for b in full.part(k, 3).epoch(3, torch.Generator().manual_seed(5))] for k in range(3)]
    assert [len(p) for p in parts] == [full.part(k, 3).steps_per_epoch(3) for k in range(3)] == [3, 2, 2]
    assert [whole[i] for i in range(7)] == [parts[i % 3][i // 3] for i in range(7)]
    with pytest.raises(ValueError):
        full.part(3, 3)


def test_lambda_is_searched_in_obdprunes_loop_and_given_in_the_users(tiny):
    from obdprune.groups import Granularity

    assert PruneConfig().l1_lambda == "auto"
    assert PruneConfig(granularity="channel").l1_lambda == methods_mod.FIXED_L1_LAMBDA[Granularity.CHANNEL]
    assert obdprune.Pruner(_net(), method="l1").config.l1_lambda == methods_mod.FIXED_L1_LAMBDA[Granularity.ELEMENT]
    assert obdprune.Pruner(_net(), method="l1", l1_lambda=1e-4).config.l1_lambda == 1e-4
    data, dense, _ = tiny
    result = obdprune.prune(dense, data.train, data.val, method="l1", sparsity=0.5, reg_epochs=0, progress=False,
                            fine_tune=lambda m, e: None)
    assert result.config.l1_lambda == methods_mod.FIXED_L1_LAMBDA[Granularity.ELEMENT]
    assert result.points[0].l1_search is None


# --------------------------------------------------------------------------------------- max drop


def test_max_drop_rules_in_the_loop_return_what_the_rule_returns_on_the_sequence(tiny, monkeypatch):
    data, dense, _ = tiny
    n_val = len(data.val[1])
    line = 0.95 - 0.01
    se = standard_error(line, n_val)
    readings = [line + 0.5 * se, line - 0.4 * se, line + 0.1 * se, line - 0.2, line - 0.2]  # 3 rounds: 60/84/90 %
    for rule, expected in [("first-failure", 1), ("forgive-one", 3), ("monotone", 1)]:
        assert choose_max_drop(rule, readings[:3], n_val, 0.95, 1.0) == expected  # the loop agrees with the rule
        vals = iter(readings)
        fake = lambda model, d, **kw: (next(vals), 0.0) if d.y is data.val[1] else (0.5, 0.0)  # noqa: E731
        monkeypatch.setattr(methods_mod, "evaluate", fake)
        with pytest.warns(RuntimeWarning) if expected == 0 else _nothing():
            (res,) = prune_model(dense, data, _cfg(max_drop_rule=rule, max_sparsity=0.9), max_drop=1.0,
                                 dense_val_accuracy=0.95, progress=False)
        assert res.round == expected
        assert res.val_accuracy_se == pytest.approx(standard_error(res.val_accuracy, n_val))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------ front doors


def test_cli_flags_reach_the_config_and_defaults_are_the_librarys():
    parser = build_parser()
    args = parser.parse_args(["prune", "run", "--method", "hybrid", "--sparsity", "0.9", "--out", "o"])
    cfg = _prune_cfg(args, "hybrid")  # on by default: distillation and the λ search
    assert cfg.recipe_set(methods_mod.PRUNE_LOOP) == ["distill", "l1_lambda='auto'"] and cfg.to_dict() == \
        PruneConfig(finetune=cfg.finetune, method="hybrid").to_dict()
    assert (cfg.distill, cfg.prune_step, cfg.finetune.epochs, cfg.max_drop_rule.value, cfg.l1_lambda) == \
        (methods_mod.DEFAULT_DISTILL, 0.15, 1, "monotone", "auto")
    off = _prune_cfg(parser.parse_args(["prune", "run", "--method", "hybrid", "--sparsity", "0.9", "--out", "o",
                                        "--no-distill", "--l1-lambda", "2e-3"]), "hybrid")
    assert off.distill is None and off.recipe_set(methods_mod.PRUNE_LOOP) == []
    channel = _prune_cfg(parser.parse_args(["prune", "run", "--method", "hybrid", "--sparsity", "0.9", "--out", "o",
                                            "--granularity", "channel"]), "hybrid")
    assert channel.l1_lambda == methods_mod.FIXED_L1_LAMBDA[channel.granularity]  # group lasso: a given strength
    args = parser.parse_args(["prune", "run", "--method", "hybrid", "--sparsity", "0.9", "--out", "o",
                              "--prune-schedule", "gradual", "--total-epochs", "12", "--prune-every", "50",
                              "--lr-rewind", "--distill", "2", "0.5", "--update", "obs", "--criterion", "obs",
                              "--l1-lambda", "auto", "--max-drop-rule", "forgive-one", "--curvature-window", "3"])
    cfg = _prune_cfg(args, "hybrid")
    assert (cfg.prune_schedule.value, cfg.total_epochs, cfg.prune_every, cfg.lr_rewind, cfg.distill,
            cfg.update.value, cfg.criterion.value, cfg.l1_lambda, cfg.max_drop_rule.value, cfg.curvature_window) == \
        ("gradual", 12, 50, True, (2.0, 0.5), "obs", "obs", "auto", "forgive-one", 3)
    assert PruneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UsageError, match="'auto'"):
        PruneConfig(l1_lambda="often")
    with pytest.raises(UsageError, match="unknown prune schedule 'ramp'"):
        PruneConfig(prune_schedule="ramp")


def test_own_training_options_refuse_a_users_fine_tune(tiny):
    data, dense, dense_cfg = tiny
    seen = []  # the default distillation stays out of the user's loop, and so does its error
    obdprune.prune(dense, data.train, data.val, sparsity=0.5, reg_epochs=0, progress=False,
                   fine_tune=lambda m, e: seen.append(e))
    assert seen and obdprune.Pruner(_net()).config.distill is None
    with pytest.raises(UsageError, match="distill=None turns it off"):  # the loop itself, with its default config
        prune_model(dense, data, PruneConfig(reg_epochs=0), targets=[0.5], progress=False, fine_tune=lambda m, e: None)
    with pytest.raises(UsageError, match="lr_rewind, distill: need obdprune's own training loop"):
        obdprune.prune(dense, data.train, data.val, sparsity=0.5, lr_rewind=True, distill=(2, 0.5),
                       dense_train=dense_cfg, fine_tune=lambda m, e: None, progress=False)


@pytest.mark.filterwarnings("ignore:.*no pruning round kept:RuntimeWarning")  # tiny data: the dense model holds
def test_cli_compare_gradual_with_the_recipe_records_budget_and_lambda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lambda_search, "AUTO_L1_STRENGTHS", (4.0, 64.0))
    out = tmp_path / "cmp"
    argv = ["compare", "--dataset", "digits", "--train-limit", "300", "--test-limit", "100", "--model", "lenet300",
            "--epochs", "2", "--batch-size", "64", "--methods", "magnitude", "l1", "--sparsity", "0.5", "0.8",
            "--max-drop", "3", "--max-drop-rule", "forgive-one", "--prune-schedule", "gradual", "--total-epochs", "4",
            "--reg-epochs", "0", "--finetune-epochs", "1", "--prune-every", "1", "--lr-rewind", "--distill", "2",
            "0.5", "--l1-lambda", "auto", "--no-measure", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prune"]["total_epochs"] == 4 and summary["prune"]["prune_schedule"] == "gradual"
    report = (out / "report.md").read_text()
    assert "inside one run of 4 epochs per method" in report and "λ searched on validation" in report
    assert "The max drop of a method with a searched λ comes from a path of its own" in report
    l1 = [r for r in summary["results"] if r["method"] == "l1"]
    assert l1 and all(r["l1_lambda"] in {c["l1_lambda"] for c in r["l1_search"]["candidates"]} for r in l1)
    manifest = json.loads((out / "runs" / "l1-s0.8" / "manifest.json").read_text())
    assert manifest["result"]["l1_lambda"] == l1[0]["l1_lambda"] and "val_accuracy_se" in manifest["result"]
    capsys.readouterr()
    bad = argv[:-1] + [str(tmp_path / "bad"), "--granularity", "channel", "--update", "obs"]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("obdprune: error: update='obs'") and err.count("\n") == 1


@pytest.mark.filterwarnings("ignore:.*no pruning round kept:RuntimeWarning")
def test_a_max_drop_with_targets_gets_its_own_path_and_gentler_grid_and_resumes(tiny, tmp_path, monkeypatch):
    """With a searched λ, targets and a max drop are two paths: the targets' search runs AUTO_L1_STRENGTHS, the
    max drop's AUTO_L1_STRENGTHS_MAX_DROP; the second path's rounds say so, both resume from their own
    snapshots without searching again, and finishing the stage drops both. A given λ keeps one path."""
    from obdprune.checkpoint import StudyState

    data, dense, _ = tiny
    monkeypatch.setattr(lambda_search, "AUTO_L1_STRENGTHS", (4.0, 64.0))
    monkeypatch.setattr(lambda_search, "AUTO_L1_STRENGTHS_MAX_DROP", (1.0, 16.0))
    state = StudyState(tmp_path, "prune", {})
    rounds = []
    points = prune_model(dense, data, _cfg("l1", l1_lambda="auto"), targets=[0.5], max_drop=100.0, progress=False,
                         checkpoint=state.rounds("prune:l1"), on_round=rounds.append)
    target, held = points
    assert target.target_sparsity == 0.5 and held.max_drop == 100.0
    assert [c["strength"] for c in target.l1_search["candidates"]] == [4.0, 64.0]
    assert [c["strength"] for c in held.l1_search["candidates"]] == [1.0, 16.0]
    assert held.l1_lambda in {lambda_from_strength(r, dense) for r in (1.0, 16.0)}
    paths = [r.get("path") for r in rounds]
    assert paths == [None] * paths.count(None) + ["max-drop"] * paths.count("max-drop") and paths[-1] == "max-drop"
    assert set(state.round_files) == {"prune:l1", "prune:l1:max-drop"}

    def no_search(*a, **kw):
        raise AssertionError("searched again")

    monkeypatch.setattr(methods_mod, "search_l1_lambda", no_search)
    again = prune_model(dense, data, _cfg("l1", l1_lambda="auto"), targets=[0.5], max_drop=100.0, progress=False,
                        checkpoint=state.rounds("prune:l1"))
    assert [p.to_dict() for p in again] == [p.to_dict() for p in points]
    files = [tmp_path / f for f in state.round_files.values()]
    state.finish("prune:l1", [])
    assert state.round_files == {} and not any(f.exists() for f in files)

    given = prune_model(dense, data, _cfg("l1", l1_lambda=1e-3), targets=[0.5], max_drop=100.0, progress=False)
    assert [p.l1_search for p in given] == [None, None] and given[1].max_drop == 100.0


def test_auto_lambda_is_searched_once_and_read_back_on_resume(tiny, tmp_path, monkeypatch):
    from obdprune.checkpoint import StudyState

    data, dense, _ = tiny
    monkeypatch.setattr(lambda_search, "AUTO_L1_STRENGTHS", (4.0, 64.0))
    store = StudyState(tmp_path, "prune", {}).rounds("prune:l1")
    cfg = _cfg("l1", l1_lambda="auto")
    (first,) = prune_model(dense, data, cfg, targets=[0.5], progress=False, checkpoint=store)
    assert first.l1_lambda in {lambda_from_strength(r, dense) for r in (4.0, 64.0)}

    def no_search(*a, **kw):
        raise AssertionError("searched again")

    monkeypatch.setattr(methods_mod, "search_l1_lambda", no_search)
    (again,) = prune_model(dense, data, cfg, targets=[0.5], progress=False, checkpoint=store)
    assert again.l1_lambda == first.l1_lambda and again.l1_search == first.l1_search
    assert torch.equal(again.state_dict["1.weight"], first.state_dict["1.weight"])
