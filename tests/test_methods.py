"""The pruning loop: paths, exact sparsity, masks holding, and --max-drop choosing on validation."""
import pytest
import torch

import obdprune.methods as methods_mod
from obdprune.errors import UsageError
from obdprune.masking import prunable_weights
from obdprune.methods import PruneConfig, measured_sparsity, prune_model, sparsity_path
from obdprune.models import build_model
from obdprune.train import TrainConfig, train


def test_sparsity_path_passes_through_targets_with_bounded_steps():
    path = sparsity_path([0.76, 0.9, 0.95, 0.98], 0.6)
    assert [round(s, 6) for s in path if s in (0.76, 0.9, 0.95, 0.98)] == [0.76, 0.9, 0.95, 0.98]
    density = 1.0
    for s in path:
        assert (1 - s) / density >= 0.4 - 1e-9  # at most 60% of what is left goes per round
        density = 1 - s
    assert path == sorted(path)
    with pytest.raises(UsageError):
        sparsity_path([1.2], 0.5)


@pytest.fixture(scope="module")
def dense_digits(digits):
    torch.manual_seed(0)
    model = build_model("lenet300", digits.input_shape, digits.num_classes)
    train(model, digits.train, TrainConfig(epochs=3, lr=0.05, batch_size=64), progress=False)
    return model


def _cfg(method, **kw):
    ft = TrainConfig(epochs=1, lr=0.01, batch_size=64, schedule="cosine")
    return PruneConfig(method=method, finetune=ft, reg_epochs=1, curvature_samples=128, **kw)


@pytest.mark.parametrize("method", ["magnitude", "l1", "obd", "hybrid"])
def test_every_method_reaches_exact_targets_and_keeps_dense_model(method, digits, dense_digits):
    before = {k: v.clone() for k, v in dense_digits.state_dict().items()}
    results = prune_model(dense_digits, digits, _cfg(method), targets=[0.5, 0.9], progress=False)
    assert [r.target_sparsity for r in results] == [0.5, 0.9]
    for r in results:
        model = build_model("lenet300", digits.input_shape, digits.num_classes)
        model.load_state_dict(r.state_dict)
        sparsity, nonzero, total = measured_sparsity(model)
        assert total - nonzero >= round(r.target_sparsity * total)  # L1-proximal may zero a few more
        assert r.sparsity == pytest.approx(sparsity)
        for name, p in prunable_weights(model).items():
            assert bool((p[~r.masks[name]] == 0).all())
        assert 0.0 <= r.test_accuracy <= 1.0
    for k, v in dense_digits.state_dict().items():
        assert torch.equal(v, before[k])  # the dense model is left unchanged


def test_masks_from_earlier_rounds_are_kept(digits, dense_digits):
    r50, r90 = prune_model(dense_digits, digits, _cfg("obd"), targets=[0.5, 0.9], progress=False)
    for name in r50.masks:
        assert not bool((r90.masks[name] & ~r50.masks[name]).any())


def test_max_drop_chooses_on_validation_not_test(digits, dense_digits, monkeypatch):
    """Validation accuracy holds for three rounds then fails; test accuracy says the opposite."""
    val_seq = iter([0.99, 0.985, 0.982, 0.90, 0.89, 0.88, 0.87, 0.86, 0.85, 0.84])
    calls = {"rounds": 0}

    def fake_evaluate(model, data, **kw):
        if data.x is digits.val.x:
            calls["rounds"] += 1
            return next(val_seq), 0.0
        # test accuracy rises with every round: a test-based choice would pick the last round
        return 0.5 + 0.01 * calls["rounds"], 0.0

    monkeypatch.setattr(methods_mod, "evaluate", fake_evaluate)
    cfg = _cfg("magnitude", max_sparsity=0.99)
    (res,) = prune_model(dense_digits, digits, cfg, max_drop=1.0, dense_val_accuracy=0.99, progress=False)
    assert res.round == 3 and res.max_drop == 1.0
    assert res.val_accuracy == 0.982
    assert calls["rounds"] == 4  # stops after the first round that failed


def test_targets_that_empty_a_layer_are_refused_before_training(digits, dense_digits):
    with pytest.raises(UsageError, match="empty a layer"):
        prune_model(dense_digits, digits, _cfg("magnitude", layer_floor=0.5), targets=[0.9], progress=False)


def test_max_drop_with_no_round_holding_returns_the_dense_model(digits, dense_digits, monkeypatch):
    val_seq = iter([0.5] * 20)

    def fake_evaluate(model, data, **kw):
        return (next(val_seq), 0.0) if data.x is digits.val.x else (0.42, 0.0)

    monkeypatch.setattr(methods_mod, "evaluate", fake_evaluate)
    with pytest.warns(RuntimeWarning, match="dense model itself"):
        (res,) = prune_model(dense_digits, digits, _cfg("magnitude", max_sparsity=0.9), max_drop=0.1,
                             dense_val_accuracy=0.99, progress=False)
    assert res.round == 0 and res.sparsity == 0.0 and res.max_drop == 0.1
    model = build_model("lenet300", digits.input_shape, digits.num_classes)
    model.load_state_dict(res.state_dict)
    for k, v in dense_digits.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["magnitude", "hybrid"])
def test_prune_model_on_cuda(method, digits, dense_digits):
    results = prune_model(dense_digits, digits, _cfg(method), targets=[0.5], device="cuda", progress=False)
    (r,) = results
    assert all(v.device.type == "cpu" for v in r.state_dict.values())
    model = build_model("lenet300", digits.input_shape, digits.num_classes)
    model.load_state_dict(r.state_dict)
    assert measured_sparsity(model)[0] >= 0.5
