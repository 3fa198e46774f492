"""Training precision chosen by CPU detection and actually applied, and ``compile: true`` really
training through ``torch.compile`` while the checkpoint, the model and the bundle stay as eager
training leaves them (issue 16: bf16 training that pays, never slower without native bf16)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn

from lensforge.config import TrainConfig
from lensforge.training import finetune
from lensforge.training.finetune import ClassifierModule, fit


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class _Recording(ClassifierModule):
    """Notes whether each training step ran under bf16 autocast."""

    autocast: list[bool]

    def training_step(self, batch: Any, i: int) -> torch.Tensor:
        self.autocast.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return super().training_step(batch, i)


def _loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 16, 16, generator=g), torch.arange(8) % 3)
    return torch.utils.data.DataLoader(data, batch_size=4)


def _fit(tmp_path: Path, **cfg: Any) -> tuple[_Recording, finetune.FitResult]:
    config = TrainConfig(data="x", epochs=1, max_steps=2, lr=1e-2, weight_decay=0.0, patience=0, **cfg)
    module = _Recording(_Net(), False, config, steps_per_epoch=2)
    module.autocast = []
    module, result = fit(module, _loader(), None, config, tmp_path, monitor="val_acc", channels_last=True)
    return module, result  # type: ignore[return-value]


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_fp32_on_a_cpu_and_is_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         native: bool) -> None:
    # native bf16 trained faster but scored lower on held-out images (see choose_precision)
    monkeypatch.setattr(finetune.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(finetune, "has_native_bf16", lambda: native)
    module, result = _fit(tmp_path)
    assert result.precision == module.trainer.precision == "32-true"
    assert module.autocast == [False, False]  # the steps really ran in fp32


def test_bf16_when_asked_runs_under_bf16_autocast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(finetune, "has_native_bf16", lambda: True)
    module, result = _fit(tmp_path, precision="bf16")
    assert result.precision == "bf16-mixed" and module.autocast == [True, True]


def test_bf16_on_a_cpu_keeps_depthwise_convolutions_in_float32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # bf16 depthwise kernels were the slow and the inaccurate part (see depthwise_in_float32)
    monkeypatch.setattr(finetune.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(finetune, "has_native_bf16", lambda: True)
    net = _Net()
    net.body.insert(3, nn.Conv2d(8, 8, 3, padding=1, groups=8))  # depthwise, after the dense conv's ReLU
    keys = list(net.state_dict())
    dtypes: dict[str, list[torch.dtype]] = {"dense": [], "depthwise": []}
    net.body[0].register_forward_hook(lambda m, i, o: dtypes["dense"].append(o.dtype))
    net.body[3].register_forward_hook(lambda m, i, o: dtypes["depthwise"].append(o.dtype))
    config = TrainConfig(data="x", epochs=1, max_steps=2, lr=1e-2, weight_decay=0.0, patience=0, precision="bf16")
    module = _Recording(net, False, config, steps_per_epoch=2)
    module.autocast = []
    module, result = fit(module, _loader(), None, config, tmp_path, monitor="val_acc", channels_last=True)
    assert result.precision == "bf16-mixed" and module.autocast == [True, True]
    assert dtypes == {"dense": [torch.bfloat16] * 2, "depthwise": [torch.float32] * 2}
    # afterwards the model is plain again: same classes, same state-dict keys, for export
    assert type(net.body[3]) is nn.Conv2d and list(net.state_dict()) == keys
    assert finetune.depthwise_in_float32(net) == 1 and finetune.depthwise_in_float32(net, undo=True) == 1


def test_a_fit_that_fails_leaves_the_model_as_it_came(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp32 depthwise classes and channels_last are for the fit only: after an error the
    model (still the caller's in a Python session) is plain again, ready to export or retrain."""
    monkeypatch.setattr(finetune.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(finetune, "has_native_bf16", lambda: True)
    net = _Net()
    net.body.insert(3, nn.Conv2d(8, 8, 3, padding=1, groups=8))
    seen: list[type] = []

    def failing_fit(self: Any, module: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(type(net.body[3]))
        raise RuntimeError("out of memory")

    monkeypatch.setattr(finetune.L.Trainer, "fit", failing_fit)
    config = TrainConfig(data="x", epochs=1, max_steps=2, lr=1e-2, weight_decay=0.0, patience=0, precision="bf16")
    with pytest.raises(RuntimeError, match="out of memory"):
        fit(_Recording(net, False, config, steps_per_epoch=2), _loader(), None, config, tmp_path, monitor="val_acc",
            channels_last=True)
    assert seen == [finetune._Float32Conv2d]  # swapped during the fit ...
    assert type(net.body[3]) is nn.Conv2d  # ... and back after it failed
    assert all(p.is_contiguous() for p in net.parameters())  # channels_last undone


def test_explicit_precision_beats_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(finetune, "has_native_bf16", lambda: True)
    module, result = _fit(tmp_path, precision="32")
    assert result.precision == "32-true" and module.autocast == [False, False]


def _counting_compile(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """torch.compile with a backend that records each graph and runs it eagerly: dynamo really
    captures the training forward (so a graph break or a guard failure would show), without
    minutes of inductor's C++ compiling on a test machine."""
    graphs: list[Any] = []
    real = torch.compile

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    def compile(model: nn.Module, **kwargs: Any) -> Any:
        kwargs["backend"] = backend
        return real(model, **kwargs)

    monkeypatch.setattr(finetune.torch, "compile", compile)
    torch._dynamo.reset()
    return graphs


def test_compile_trains_through_the_compiled_forward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    graphs = _counting_compile(monkeypatch)
    monkeypatch.setattr(finetune, "has_native_bf16", lambda: True)
    before = {k: v.clone() for k, v in _Net().state_dict().items()}
    module, _ = _fit(tmp_path, compile=True, precision="bf16")
    assert len(graphs) == 1  # one graph for the fixed batch shape: no recompiles, no graph breaks
    assert module.autocast == [True, True]  # compiled and bf16 together
    after = module.model.state_dict()
    assert after.keys() == before.keys()  # no "_orig_mod." copies in the model or the checkpoint
    assert not torch.equal(after["head.weight"], before["head.weight"])  # it trained
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all("_orig_mod" not in k for k in saved)
    assert module.train_forward is None  # dropped after fit: export traces the eager model


def test_without_compile_nothing_is_compiled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    graphs = _counting_compile(monkeypatch)
    _fit(tmp_path)
    assert graphs == []


def test_compiled_run_writes_a_bundle_that_passes_its_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              shapes_dir: Path, tiny_train: dict[str, object]) -> None:
    import yaml

    import lensforge

    graphs = _counting_compile(monkeypatch)
    result = lensforge.train(data=str(shapes_dir), out=str(tmp_path / "run"), compile=True, **tiny_train)
    assert graphs  # EfficientNet-Lite0's training forward went through dynamo
    assert result.parity <= 1e-3  # ONNX vs torch on real validation images, as every bundle is checked
    assert (result.bundle_dir / "model.onnx").is_file()
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["config"]["compile"] is True  # recorded
