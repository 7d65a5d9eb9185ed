"""obdprune: make trained PyTorch CNNs smaller and faster with sparse regularization and Optimal Brain Damage."""
__version__ = "0.1.0"
