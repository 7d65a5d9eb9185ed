import pytest
import torch

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
