"""Torch-Pruning peers for benchmarks/deploy.py: its own structured pruning, with obdprune's budgets.

Driven as Torch-Pruning's README prescribes: ``tp.pruner.BasePruner`` (``MetaPruner`` is an alias) with
``tp.importance.MagnitudeImportance(p=2)`` or ``tp.importance.GroupHessianImportance()`` (per-sample
loss, ``loss.backward(); imp.accumulate_grad(model)`` for each sample), ``iterative_steps`` with a
channel-ratio schedule, ``ignored_layers=[final Linear]``, fine-tuning after every ``pruner.step()``.

The budget is obdprune's: ``reg_epochs`` of plain training before the first step, ``finetune.epochs``
after every step (same optimizer, learning rate, schedule and shuffling seeds as ``obdprune prune``),
and the same accuracy rule as ``--max-drop``: stop at the first step whose validation accuracy falls
more than ``max_drop`` points below dense and keep the last step that held. Test accuracy is only
reported. Schedules (cumulative channel ratios, one per step): :func:`linear_schedule` is Torch-Pruning's
own linear scheduler (0.1, 0.2, ..., 0.9), the default of benchmarks/deploy.py; :func:`channel_schedule`
has as many steps as obdprune's max-drop path and removes about the same share of weights per step (a
channel ratio r removes about 1-(1-r)² of a layer pruned on both sides), but its first step (54% of the
weights) already costs Torch-Pruning more than 0.5 pt on lenet5 with one fine-tuning epoch.

Torch-Pruning 1.6.1's ``GroupHessianImportance.accumulate_grad`` looks the parameter *name* up in a dict
keyed by *parameters*, so every sample overwrites the previous one: only the last sample's squared
gradient is used. :class:`SummedHessianImportance` keys by parameter (the documented intent: the mean
of per-sample squared gradients); ``importance="hessian-shipped"`` keeps the shipped behaviour.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

from obdprune.layers import prunable_layers
from obdprune.measure import count_weights
from obdprune.methods import sparsity_path
from obdprune.train import TrainConfig, evaluate, train

__all__ = ["IMPORTANCES", "PeerConfig", "SummedHessianImportance", "linear_schedule", "channel_schedule", "run_peer",
           "layer_widths", "tp_version"]

IMPORTANCES = ("magnitude", "hessian", "hessian-shipped")


class SummedHessianImportance(tp.importance.GroupHessianImportance):
    """GroupHessianImportance whose ``accumulate_grad`` really sums squared per-sample gradients."""

    def accumulate_grad(self, model: nn.Module) -> None:
        for p in model.parameters():
            if p.grad is None:
                continue
            g2 = p.grad.detach().pow(2)
            if p in self._accu_grad:
                self._accu_grad[p] += g2
                self._counter[p] += 1
            else:
                self._accu_grad[p] = g2.clone()
                self._counter[p] = 1


@dataclass(frozen=True)
class PeerConfig:
    """One Torch-Pruning peer run: importance, channel-ratio schedule and obdprune's budgets."""

    importance: str = "magnitude"
    ratios: tuple[float, ...] = ()
    reg_epochs: int = 2
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, lr=0.03, schedule="cosine"))
    max_drop: float = 0.5
    hessian_samples: int = 1024
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"importance": self.importance, "ratios": list(self.ratios), "reg_epochs": self.reg_epochs,
                "finetune": self.finetune.to_dict(), "max_drop": self.max_drop,
                "hessian_samples": self.hessian_samples, "seed": self.seed}


def linear_schedule(step: float = 0.1) -> list[float]:
    """Torch-Pruning's own ``linear_scheduler`` for pruning_ratio = step·(steps), steps = floor(0.999/step).

    >>> [round(r, 2) for r in linear_schedule(0.2)]
    [0.2, 0.4, 0.6, 0.8]
    """
    steps = int(0.999 / step)
    return tp.pruner.algorithms.scheduler.linear_scheduler(step * steps, steps)[1:]


def channel_schedule(prune_step: float = 0.6, max_sparsity: float = 0.99) -> list[float]:
    """Cumulative channel ratios matching obdprune's max-drop path step for step: r = 1 - sqrt(density).

    >>> [round(r, 3) for r in channel_schedule()]
    [0.319, 0.536, 0.684, 0.785, 0.853, 0.9]
    """
    return [1.0 - math.sqrt(1.0 - s) for s in sparsity_path([], prune_step, max_sparsity=max_sparsity)]


def layer_widths(model: nn.Module) -> list[int]:
    """Output units of every Conv2d / Linear layer, in module order."""
    return [m.weight.shape[0] for _, m in prunable_layers(model)]


def tp_version() -> str:
    """Installed torch-pruning version (the package metadata; its __version__ lags)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return str(getattr(tp, "__version__", "?"))


def _importance(name: str) -> tp.importance.Importance:
    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "hessian":
        return SummedHessianImportance()
    if name == "hessian-shipped":
        return tp.importance.GroupHessianImportance()
    raise ValueError(f"unknown Torch-Pruning importance {name!r}; choose one of: {', '.join(IMPORTANCES)}")


def accumulate_hessian(imp: tp.importance.GroupHessianImportance, model: nn.Module, x: torch.Tensor,
                       y: torch.Tensor, chunk: int = 32) -> None:
    """The documented per-sample loop (``l.backward(retain_graph=True); imp.accumulate_grad(model)``),
    run over chunks of ``chunk`` samples so each backward pass walks a small graph (same gradients)."""
    was_training = model.training
    model.eval()
    imp.zero_grad()
    for i in range(0, x.shape[0], chunk):
        losses = F.cross_entropy(model(x[i:i + chunk]), y[i:i + chunk], reduction="none")
        for loss in losses:
            model.zero_grad()
            loss.backward(retain_graph=True)
            imp.accumulate_grad(model)
    model.train(was_training)


def _safe_ratios(model: nn.Module, ratios: Sequence[float], ignored: nn.Module) -> list[float]:
    """Cap the ratios so that Torch-Pruning's per-layer rounding (int(n·(1-r))) keeps >= 1 unit everywhere."""
    widths = [m.weight.shape[0] for _, m in prunable_layers(model) if m is not ignored]
    cap = 1.0 - (1.0 + 1e-6) / min(widths)
    return [min(r, cap) for r in ratios]


def run_peer(dense: nn.Module, data: Any, cfg: PeerConfig, *, dense_val_accuracy: float,
             log: Callable[[str], None] = print) -> tuple[nn.Module | None, dict[str, Any]]:
    """Prune a copy of ``dense`` with Torch-Pruning along ``cfg.ratios``; return the kept model (physically
    smaller) and a record (rounds, chosen round, val/test accuracy, weights, seconds). If no step held
    the accuracy budget the model is None and the record says ``"failed": True``."""
    model = copy.deepcopy(dense).cpu().train()
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    ratios = _safe_ratios(model, cfg.ratios, ignored)
    imp = _importance(cfg.importance)
    example = data.train.x[:1].clone()
    pruner = tp.pruner.BasePruner(model, example, importance=imp, pruning_ratio=ratios[-1],
                                  iterative_steps=len(ratios),
                                  iterative_pruning_ratio_scheduler=lambda _r, _s: [0.0, *ratios],
                                  ignored_layers=[ignored])
    weights0 = count_weights(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    if cfg.reg_epochs:
        train(model, data.train, replace(cfg.finetune, epochs=cfg.reg_epochs, seed=cfg.seed * 1000),
              progress=False)
    rounds: list[dict[str, Any]] = []
    held: tuple[nn.Module, dict[str, Any]] | None = None
    n = min(cfg.hessian_samples, data.train.x.shape[0])
    for k, ratio in enumerate(ratios, start=1):
        if cfg.importance.startswith("hessian"):
            idx = torch.randperm(data.train.x.shape[0], generator=gen)[:n]
            accumulate_hessian(imp, model, data.train.x[idx], data.train.y[idx])
        pruner.step()
        model.zero_grad(set_to_none=True)
        train(model, data.train, replace(cfg.finetune, seed=cfg.seed * 1000 + k), progress=False)
        val, _ = evaluate(model, data.val)
        rec = {"round": k, "channel_ratio": ratio, "val_accuracy": val, "widths": layer_widths(model),
               "weights": count_weights(model), "sparsity": 1.0 - count_weights(model) / weights0,
               "seconds": time.perf_counter() - t0}
        rounds.append(rec)
        log(f"  tp-{cfg.importance} round {k}: channel ratio {ratio:.3f}, widths {rec['widths']}, "
            f"{100 * rec['sparsity']:.1f}% of weights removed, val {100 * val:.2f}%")
        if val >= dense_val_accuracy - cfg.max_drop / 100.0 - 1e-12:
            test, _ = evaluate(model, data.test)
            held = (copy.deepcopy(model).eval(), rec | {"test_accuracy": test})
        else:
            break
    if held is None:
        return None, {"method": f"tp-{cfg.importance}", "config": cfg.to_dict(), "rounds": rounds, "failed": True,
                      "seconds": time.perf_counter() - t0, "torch_pruning": tp_version()}
    kept, best = held
    record = {"method": f"tp-{cfg.importance}", "config": cfg.to_dict(), "rounds": rounds, "chosen_round": best["round"],
              "channel_ratio": best["channel_ratio"], "val_accuracy": best["val_accuracy"],
              "test_accuracy": best["test_accuracy"], "weights": best["weights"], "dense_weights": weights0,
              "sparsity": best["sparsity"], "widths": best["widths"], "seconds": time.perf_counter() - t0,
              "torch_pruning": tp_version()}
    return kept, record
