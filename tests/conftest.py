import pytest
import torch
from torch import nn

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    from obdprune.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def fashion_small():
    from obdprune.data import load_dataset
    from obdprune.errors import DataError

    try:
        return load_dataset("fashion-mnist", train_limit=2000, test_limit=500)
    except DataError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


@torch.no_grad()
def randomize_batchnorm(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode BatchNorm is not the identity."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.normal_()
            m.bias.normal_()
