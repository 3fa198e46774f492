"""Training: fine-tuning with Lightning, and the linear probe."""

from lensforge.training.run import TrainResult, train

__all__ = ["TrainResult", "train"]
