"""lensforge: from a folder of labelled images to a fast, safe, served vision model.

    import lensforge
    result = lensforge.train(data="images/", epochs=5)
    predictor = lensforge.Predictor(result.bundle_dir)
    print(predictor.predict("cat.jpg").top(3))

``lensforge.Predictor`` needs only onnxruntime, numpy and Pillow; ``train`` needs the
``[train]`` extra (torch, timm, Lightning).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["ClassificationResult", "Predictor", "TrainConfig", "evaluate", "predict_many", "train", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import lensforge` (and serving) never pulls in torch.
    if name in ("Predictor", "ClassificationResult"):
        from lensforge import runtime

        return getattr(runtime, name)
    if name == "train":
        from lensforge.training.run import train

        return train
    if name == "evaluate":
        from lensforge.evaluation import evaluate

        return evaluate
    if name == "predict_many":  # batch prediction, local or on Ray (lensforge.batch; Ray only when asked for)
        from lensforge.batch import predict_many

        return predict_many
    if name == "TrainConfig":
        from lensforge.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'lensforge' has no attribute {name!r}")
