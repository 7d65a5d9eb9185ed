"""The front door: ``import obdprune`` and prune a user's own model with its own data and training loop."""
import copy
import importlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import obdprune
from obdprune import UsageError
from obdprune.train import train


class TinyResNet(nn.Module):
    """Stem, one residual block with BN, a 1x1 downsample, head: a user's own architecture."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.down = nn.Conv2d(8, 16, 1, stride=2)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stem(x)
        h = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(h) + self.down(x))
        return self.head(x.mean((2, 3)))


def _data(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, 4:].mean((1, 2)) > 0.2).long()
    return x, y


@pytest.fixture(scope="module")
def data():
    x, y = _data()
    return {"train": (x[:160], y[:160]), "val": (x[160:], y[160:]),
            "loader": DataLoader(TensorDataset(x[:160], y[:160]), batch_size=32, shuffle=True,
                                 generator=torch.Generator().manual_seed(0))}


def test_everything_in_all_resolves():
    mod = importlib.reload(obdprune)
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing
    for name in ("prune", "Pruner", "PruneResult", "compact", "export_onnx", "save_sparse", "load_sparse", "diag_ggn",
                 "diag_empirical_fisher", "diag_hessian", "obd_saliency", "MaskSet", "measure_models", "load_run",
                 "UsageError"):
        assert name in mod.__all__
    assert issubclass(UsageError, ValueError)


@pytest.mark.parametrize("train_as", ["loader", "pair", "list"])
def test_prune_takes_loaders_pairs_and_lists(data, train_as):
    torch.manual_seed(0)
    model = TinyResNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = {"loader": data["loader"], "pair": data["train"], "list": list(data["loader"])}[train_as]
    result = obdprune.prune(model, train, data["val"], method="hybrid", sparsity=[0.5, 0.7], reg_epochs=1,
                            finetune_epochs=1, curvature_samples=64, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched
    assert [p.target_sparsity for p in result.points] == [0.5, 0.7]
    assert [r["round"] for r in result.rounds] == list(range(1, len(result.rounds) + 1))
    assert {"sparsity", "macs", "val_accuracy", "seconds"} <= set(result.rounds[0])
    assert result.points[-1].sparsity == pytest.approx(0.7, abs=1e-3)
    assert obdprune.measured_sparsity(result.model)[0] == pytest.approx(0.7, abs=1e-3)
    for name, m in result.masks.items():
        assert bool((dict(result.model.named_parameters())[name][~m] == 0).all())
    assert obdprune.measured_sparsity(result.at(0.5))[0] == pytest.approx(0.5, abs=1e-3)


def test_channel_pruning_of_a_residual_model_compacts_to_the_same_function(data):
    torch.manual_seed(0)
    result = obdprune.prune(TinyResNet(), data["loader"], data["val"], method="obd", granularity="channel",
                            budget="macs", sparsity=0.3, reg_epochs=0, finetune_epochs=1, progress=False)
    assert result.points[0].macs_removed >= 0.25
    small = result.compact()
    x = data["val"][0][:16]
    result.model.eval(), small.eval()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in result.model.parameters())
    torch.testing.assert_close(small(x), result.model(x), atol=1e-5, rtol=1e-5)


def _zero_pattern_holds(model, zero_at_start, seen):
    for name, p in model.named_parameters():
        if name in zero_at_start:
            assert bool((p[zero_at_start[name]] == 0).all()), f"{name}: a pruned weight came back"
    seen["steps"] += 1


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
], ids=["sgd-momentum", "adam", "adamw"])
def test_pruned_weights_stay_zero_in_the_users_fine_tune(data, make_opt):
    seen = {"steps": 0, "phases": []}

    def fine_tune(model, epochs):
        opt = make_opt(model.parameters())  # the user's own optimizer, created inside the phase
        zero = {n: p.detach() == 0 for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1}
        seen["phases"].append(epochs)
        for _ in range(epochs):
            for x, y in data["loader"]:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                _zero_pattern_holds(model, zero, seen)

    torch.manual_seed(0)
    result = obdprune.prune(TinyResNet(), data["loader"], data["val"], method="magnitude", sparsity=[0.6, 0.9],
                            fine_tune=fine_tune, reg_epochs=1, finetune_epochs=2, progress=False)
    assert seen["phases"][0] == 1 and set(seen["phases"][1:]) == {2} and seen["steps"] > 0
    assert obdprune.measured_sparsity(result.model)[0] >= 0.9 - 1e-3


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_l1_proximal_step_happens_in_the_users_loop(data, opt_name):
    """In the first (regularization) phase, each step of the user's optimizer is followed by the soft-threshold
    w ← sign(w)·max(|w| − lr·λ, 0) on every Conv/Linear weight: checked against a twin model stepped by the
    same optimizer without obdprune, then soft-thresholded by hand."""
    lam = 0.05
    checked = {"steps": 0}

    def fine_tune(model, epochs):
        if checked["steps"]:
            return  # only the first phase: its masks are all-ones, so the proximal step is the only change
        twin = copy.deepcopy(model)
        opt, twin_opt = OPTIMIZERS[opt_name](model.parameters()), OPTIMIZERS[opt_name](twin.parameters())
        for x, y in list(data["loader"])[:3]:
            for m, o in ((model, opt), (twin, twin_opt)):
                o.zero_grad()
                F.cross_entropy(m(x), y).backward()
                o.step()
            lr = twin_opt.param_groups[0]["lr"]
            with torch.no_grad():
                for name, w in obdprune.prunable_weights(twin).items():
                    w.copy_(torch.sign(w) * torch.clamp(w.abs() - lr * lam, min=0))
            for (name, p), q in zip(model.named_parameters(), twin.parameters()):
                torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
            checked["steps"] += 1
        assert obdprune.measured_sparsity(model)[0] > 0  # the threshold did zero some weights

    torch.manual_seed(0)
    obdprune.prune(TinyResNet(), data["loader"], data["val"], method="l1", sparsity=0.5, l1_lambda=lam,
                   fine_tune=fine_tune, reg_epochs=1, finetune_epochs=1, progress=False)
    assert checked["steps"] == 3


def test_pruner_in_a_hand_written_adamw_loop(data):
    torch.manual_seed(0)
    model = TinyResNet()
    x0 = data["train"][0][:2]
    pruner = obdprune.Pruner(model, method="hybrid", granularity="channel", example_inputs=x0, l1_lambda=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    pruner.attach(opt)
    for x, y in data["loader"]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    masks = pruner.step(sparsity=0.25, data=data["loader"])  # units tied to the residual sum are not removable yet
    assert pruner.sparsity == pytest.approx(0.25, abs=0.05)
    for _ in range(2):
        for x, y in data["loader"]:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            for name, p in model.named_parameters():
                if name in masks:
                    assert bool((p[~masks[name]] == 0).all())
    small = pruner.compact()
    model.eval(), small.eval()
    torch.testing.assert_close(small(data["val"][0]), model(data["val"][0]), atol=1e-5, rtol=1e-5)
    assert pruner.macs() < obdprune.count_macs(TinyResNet(), x0)


@pytest.mark.parametrize("call, match", [
    (lambda d: obdprune.prune(TinyResNet(), "train.csv", d["val"], sparsity=0.5), "pass a DataLoader"),
    (lambda d: obdprune.prune(TinyResNet(), iter(d["loader"]), d["val"], sparsity=0.5), "one-shot iterator"),
    (lambda d: obdprune.prune(TinyResNet(), d["loader"].dataset, d["val"], sparsity=0.5), "wrap it in a DataLoader"),
    (lambda d: obdprune.prune(TinyResNet(), d["loader"], d["val"], sparsity=95), "give 0.95, not 95"),
    (lambda d: obdprune.prune(TinyResNet(), d["loader"], d["val"]), "say how far to prune"),
    (lambda d: obdprune.prune(TinyResNet(), d["loader"], d["val"], sparsity=0.5, layer_flor=0.1), "unknown option"),
    (lambda d: obdprune.prune(TinyResNet(), d["loader"], d["val"], sparsity=0.5, method="obs"), "choose one of"),
    (lambda d: train(TinyResNet(), d["train"][0], d["train"][1], obdprune.TrainConfig()),
     "pass the data as one argument"),
    (lambda d: obdprune.prune_model(TinyResNet(), d["train"], obdprune.PruneConfig(), targets=0.8),
     "obdprune.prune"),
    (lambda d: obdprune.Pruner(TinyResNet(), granularity="channel"), "pass example_inputs"),
    (lambda d: obdprune.Pruner(TinyResNet(), method="obd").step(0.5), "pass data="),
    (lambda d: obdprune.MaskSet.dense(TinyResNet())["conv9.weight"], "no mask for 'conv9.weight'"),
    (lambda d: obdprune.obd_saliency({"a.weight": torch.ones(2)}, {}), "no curvature for 'a.weight'"),
])
def test_user_mistakes_are_usage_errors_with_a_hint(data, call, match):
    with pytest.raises(UsageError, match=match) as info:
        call(data)
    assert "--" not in str(info.value)  # Python messages name no CLI flags
