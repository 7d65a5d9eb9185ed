"""What a user already has before obdprune: a model class and DataLoaders (here: scikit-learn's 8x8 digits,
which ship with scikit-learn and need no download)."""
from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem, two residual blocks (the second with a 1x1 downsample), global pool, classifier."""

    def __init__(self, classes: int = 10, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def digits_loaders(limit: int | None = None, batch_size: int = 64, seed: int = 0):
    """train, val and test DataLoaders of the 1,797 digits (60/20/20), inputs (N, 1, 8, 8) in [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm][:limit], y[perm][:limit]
    a, b = int(0.6 * len(y)), int(0.8 * len(y))
    make = lambda s, shuffle: DataLoader(TensorDataset(x[s], y[s]), batch_size=batch_size, shuffle=shuffle,
                                         generator=torch.Generator().manual_seed(seed))
    return make(slice(0, a), True), make(slice(a, b), False), make(slice(b, None), False)


def fit(model: nn.Module, loader: DataLoader, epochs: int, lr: float = 3e-3) -> None:
    """The user's own training loop."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return hits / sum(len(y) for _, y in loader)
