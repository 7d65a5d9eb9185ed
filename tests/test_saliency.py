import pytest
import torch

from obdprune.saliency import magnitude_saliency, obd_saliency


def test_obd_is_half_h_w_squared_hand_written():
    w = {"a": torch.tensor([[1.0, -2.0], [3.0, 0.0]])}
    h = {"a": torch.tensor([[4.0, 0.5], [-1.0, 7.0]])}
    assert obd_saliency(w, h, "clamp")["a"].tolist() == [[2.0, 1.0], [0.0, 0.0]]
    assert obd_saliency(w, h, "abs")["a"].tolist() == [[2.0, 1.0], [4.5, 0.0]]
    assert obd_saliency(w, h, "keep")["a"].tolist() == [[2.0, 1.0], [-4.5, 0.0]]


def test_magnitude():
    w = {"a": torch.tensor([-3.0, 0.5])}
    assert magnitude_saliency(w)["a"].tolist() == [3.0, 0.5]


def test_obd_rejects_bad_curvature():
    w = {"a": torch.ones(2)}
    with pytest.raises(ValueError):
        obd_saliency(w, {"a": torch.ones(3)})
    with pytest.raises(FloatingPointError):
        obd_saliency(w, {"a": torch.tensor([1.0, float("nan")])})
