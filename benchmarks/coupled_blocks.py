"""Diagnostic for the resnet20 gap at 0.5x MACs: allocation (global vs layer scope) and block size (1 vs 8)
for obdprune magnitude / obd, next to Torch-Pruning magnitude, one seed, the settings of coupled.py.

    OMP_NUM_THREADS=1 python benchmarks/coupled_blocks.py
"""
import sys, time, torch, obdprune
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from coupled import tp_prune
from obdprune.data import load_dataset
from obdprune.models import build_model
from obdprune.train import TrainConfig, train, evaluate
from obdprune.measure import count_macs
torch.set_num_threads(1)
class A: lr = 0.03; batch_size = 128; finetune_epochs = 2
data = load_dataset("fashion-mnist", train_limit=5000)
torch.manual_seed(0)
dense = build_model("resnet20", tuple(data.train.x.shape[1:]), 10)
train(dense, data.train, TrainConfig(epochs=5, lr=0.03, batch_size=128, schedule="cosine", seed=0), progress=False)
x1 = data.test.x[:1]; d = count_macs(dense, x1)
print("dense", 100 * evaluate(dense, data.test)[0], flush=True)
for method, scope, mult in [("magnitude", "layer", 1), ("obd", "layer", 1), ("magnitude", "global", 8), ("magnitude", "layer", 8)]:
    t = time.time()
    res = obdprune.prune(dense, data.train, data.val, method=method, granularity="channel", budget="macs", scope=scope,
                         sparsity=0.5, example_inputs=data.train.x[:2], channel_multiple=mult, reg_epochs=1, finetune_epochs=2,
                         finetune_lr=0.03, batch_size=128, curvature_samples=512, seed=0, progress=False)
    m = res.compact()
    print(f"obdprune {method} {scope} x{mult}: acc {100*evaluate(m, data.test)[0]:.2f} macs {count_macs(m, x1)/d:.3f} ({time.time()-t:.0f} s)", flush=True)
m = tp_prune(dense, data, "magnitude", 0.5, 1, A, 0)
print(f"TP magnitude: acc {100*evaluate(m, data.test)[0]:.2f} macs {count_macs(m, x1)/d:.3f}", flush=True)
