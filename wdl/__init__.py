"""wdl: Wide & Deep recommendation models trained at scale with PyTorch and TorchRec."""

__version__ = "0.1.0"
