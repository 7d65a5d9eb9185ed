"""Prune your own model: a small ResNet with your DataLoaders, the hybrid method (L1-regularized training,
OBD ranking, rounds of prune and fine-tune, as sparse as validation allows), then compact and export.

    python examples/own_model.py            # about a minute on 2 CPU cores
"""
import argparse
import tempfile
from pathlib import Path

import torch

import obdprune
from common import SmallResNet, accuracy, digits_loaders, fit

parser = argparse.ArgumentParser()
parser.add_argument("--limit", type=int, default=None, help="use only this many digits (a quick try)")
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--out", default=None, help="where to write small.onnx (default: a temp folder)")
args = parser.parse_args()

torch.manual_seed(0)
train, val, test = digits_loaders(args.limit)
model = SmallResNet()
fit(model, train, args.epochs)  # your dense model, trained as you always do
print(f"dense: test accuracy {accuracy(model, test):.3f}")

# --- obdprune: the whole hybrid pipeline ------------------------------------------------------------------
result = obdprune.prune(model, train, val, method="hybrid", max_drop=1.0, finetune_epochs=1, reg_epochs=1,
                        finetune_lr=0.01, test=test)
print(result.table())
small = result.compact()  # physically smaller: dead filters and neurons removed
x = next(iter(test))[0]
out = Path(args.out or tempfile.mkdtemp()) / "small.onnx"
info = obdprune.export_onnx(small, x[:1], out, check_inputs=x)  # checked against PyTorch with onnxruntime
# ------------------------------------------------------------------------------------------------------------

params = lambda m: sum(p.numel() for p in m.parameters())
print(f"pruned: {100 * result.points[-1].sparsity:.1f}% of weights removed, test accuracy "
      f"{accuracy(result.model, test):.3f}; compacted {params(model):,} -> {params(small):,} parameters; "
      f"{out} ({info['bytes']:,} bytes, max |onnxruntime - torch| = {info['max_abs_diff']:.1e})")
