"""The epoch table's validation figure is computed as the bundle's is: fp32, whatever precision
training runs in (issue 12, item 4: 0.890 in the epoch table beside 0.880 in the summary)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from lensforge.config import TrainConfig  # noqa: E402
from lensforge.training.finetune import ClassifierModule  # noqa: E402


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_validation_under_bf16_autocast_scores_in_fp32() -> None:
    module = ClassifierModule(_Net().eval(), multilabel=False, cfg=TrainConfig(), steps_per_epoch=1)
    module.log = lambda *a, **k: None  # type: ignore[method-assign]  # no trainer here
    x, y = torch.randn(8, 3, 16, 16) * 3, torch.arange(8) % 5
    with torch.no_grad():
        fp32 = torch.softmax(module.model(x), -1)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what Lightning's bf16-mixed wraps validation in
            bf16 = torch.softmax(module.model(x).float(), -1)
            module.validation_step((x, y), 0)
    assert (bf16 - fp32).abs().max() > 1e-4  # bf16 really differs here: the test can see it
    torch.testing.assert_close(module._val_scores[0], fp32, atol=1e-6, rtol=1e-5)
