"""Execution providers, graph optimisation levels and the optimised-model cache of the Predictor:
an unavailable provider fails with what is available and what to install, never silently
(unless fallback), every level scores the same, and the cache is written once and reused."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from lensforge.errors import ProviderError
from lensforge.runtime import Predictor
from lensforge.runtime import predictor as predictor_module


@pytest.fixture(scope="module")
def batch(shapes_bundle: Path, shapes_dir: Path) -> np.ndarray:
    """Four preprocessed shapes, one per class: float32 (4, 3, S, S)."""
    ref = Predictor(shapes_bundle, threads=1)
    return np.stack([ref.prepare(min(d.glob("*.jpg"))) for d in sorted(shapes_dir.iterdir()) if d.is_dir()])


@pytest.fixture(scope="module")
def reference(shapes_bundle: Path, batch: np.ndarray) -> np.ndarray:
    return Predictor(shapes_bundle, threads=1).run(batch)


@pytest.fixture
def bundle_copy(shapes_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(shapes_bundle, tmp_path / "bundle"))


@pytest.mark.parametrize(
    ("providers", "message"),
    [
        (["gpu-please"], r"unknown execution provider 'gpu-please'; use one of cpu, cuda, .*here offers: .*CPUExecutionProvider"),
        (["NoSuchExecutionProvider"], r"unknown execution provider 'NoSuchExecutionProvider'"),
    ],
)
def test_unknown_provider_lists_the_available_ones(shapes_bundle: Path, providers: list[str], message: str) -> None:
    with pytest.raises(ProviderError, match=message) as e:
        Predictor(shapes_bundle, providers=providers, fallback=True)  # a typo is never a fallback case
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("name", "full", "hint"), [
    ("cuda", "CUDAExecutionProvider", "install onnxruntime-gpu"),
    ("tensorrt", "TensorrtExecutionProvider", "onnxruntime-gpu and TensorRT"),
    ("OpenVINOExecutionProvider", "OpenVINOExecutionProvider", "install onnxruntime-openvino"),
])
def test_provider_not_installed_names_it_and_the_install(shapes_bundle: Path, name: str, full: str, hint: str) -> None:
    if full in ort.get_available_providers():
        pytest.skip(f"{full} is installed here")
    with pytest.raises(ProviderError, match=f"{full} is not available; onnxruntime .* here offers: ") as e:
        Predictor(shapes_bundle, providers=[name])
    assert hint in str(e.value) and "CPUExecutionProvider" in str(e.value) and "--fallback" in str(e.value)


def test_fallback_runs_on_cpu_and_logs_what_was_dropped(
    shapes_bundle: Path, batch: np.ndarray, reference: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is installed here: nothing to fall back from")
    with caplog.at_level(logging.WARNING, logger="lensforge.runtime.predictor"):
        p = Predictor(shapes_bundle, providers=["cuda", "tensorrt"], fallback=True, threads=1)
    assert p.providers == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider, TensorrtExecutionProvider not available here; dropped" in caplog.text
    np.testing.assert_array_equal(p.run(batch), reference)


@pytest.mark.parametrize("providers", [["cpu"], ["CPU"], ["CPUExecutionProvider"], None])
def test_cpu_by_any_name_equals_the_default(shapes_bundle: Path, batch: np.ndarray, reference: np.ndarray, providers: Any) -> None:
    p = Predictor(shapes_bundle, providers=providers, threads=1)
    assert p.providers == ["CPUExecutionProvider"] and "CPUExecutionProvider" in repr(p)
    np.testing.assert_array_equal(p.run(batch), reference)


@pytest.mark.parametrize("level", list(predictor_module.OPTIMIZATION_LEVELS))
def test_every_optimization_level_gives_the_same_scores(
    shapes_bundle: Path, batch: np.ndarray, reference: np.ndarray, level: str
) -> None:
    p = Predictor(shapes_bundle, optimization=level, threads=1)
    np.testing.assert_allclose(p.run(batch), reference, atol=1e-5)


def test_unknown_optimization_level(shapes_bundle: Path) -> None:
    with pytest.raises(ProviderError, match="unknown graph optimization 'max'; use one of disable, basic, extended, all"):
        Predictor(shapes_bundle, optimization="max")


def _cached(bundle: Path, level: str = "all") -> list[Path]:
    return sorted(bundle.glob(f"model.{level}.*.ort.onnx"))


def test_optimised_model_is_cached_once_and_reused(bundle_copy: Path, batch: np.ndarray, reference: np.ndarray) -> None:
    first = Predictor(bundle_copy, cache_optimized=True, threads=1)
    [saved] = _cached(bundle_copy)
    assert first.optimized_path == saved
    np.testing.assert_allclose(first.run(batch), reference, atol=1e-5)
    stamp = saved.stat().st_mtime_ns

    second = Predictor(bundle_copy, cache_optimized=True, threads=1)
    assert second.optimized_path == saved and saved.stat().st_mtime_ns == stamp  # loaded, not rewritten
    np.testing.assert_allclose(second.run(batch), reference, atol=1e-5)

    other = Predictor(bundle_copy, cache_optimized=True, optimization="basic", threads=1)  # one file per level
    assert len(_cached(bundle_copy, "basic")) == 1 and other.optimized_path != saved


def test_a_rewritten_model_is_optimised_again(bundle_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    Predictor(bundle_copy, cache_optimized=True, threads=1)
    [saved] = _cached(bundle_copy)
    model = bundle_copy / "model.onnx"
    model.write_bytes(model.read_bytes())  # same bytes, new file: as after a re-export
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    with caplog.at_level(logging.INFO, logger="lensforge.runtime.predictor"):
        p = Predictor(bundle_copy, cache_optimized=True, threads=1)
    assert "saved the optimised model" in caplog.text and p.optimized_path == saved
    assert _cached(bundle_copy) == [saved]


def test_a_corrupt_cache_file_is_replaced(bundle_copy: Path, batch: np.ndarray, reference: np.ndarray) -> None:
    Predictor(bundle_copy, cache_optimized=True, threads=1)
    [saved] = _cached(bundle_copy)
    saved.write_bytes(b"not a model")
    os.utime(saved, ns=(0, 0))
    p = Predictor(bundle_copy, cache_optimized=True, threads=1)
    np.testing.assert_allclose(p.run(batch), reference, atol=1e-5)
    assert saved.stat().st_size > 100


def test_read_only_bundle_caches_in_the_user_cache(bundle_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENSFORGE_CACHE", str(tmp_path / "cache"))
    real_access = os.access  # chmod would not stop root (CI containers), so the check itself says "read-only"
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == bundle_copy else real_access(path, mode))
    p = Predictor(bundle_copy, cache_optimized=True, threads=1)
    assert p.optimized_path is not None and p.optimized_path.is_relative_to(tmp_path / "cache" / "optimized")
    assert Predictor(bundle_copy, cache_optimized=True, threads=1).optimized_path == p.optimized_path
    assert not _cached(bundle_copy)


def test_a_refused_save_runs_uncached(
    bundle_copy: Path, batch: np.ndarray, reference: np.ndarray, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = ort.InferenceSession

    def refusing(path: str, opts: ort.SessionOptions, **kwargs: Any) -> ort.InferenceSession:
        if opts.optimized_model_filepath:  # what ORT says for graphs with compiled (TensorRT) nodes
            raise RuntimeError("Unable to serialize model as it contains compiled nodes")
        return real(path, opts, **kwargs)

    monkeypatch.setattr(predictor_module.ort, "InferenceSession", refusing)
    with caplog.at_level(logging.INFO, logger="lensforge.runtime.predictor"):
        p = Predictor(bundle_copy, cache_optimized=True, threads=1)
    assert p.optimized_path is None and not _cached(bundle_copy) and not list(bundle_copy.glob(".*tmp"))
    assert "could not be saved" in caplog.text and "compiled nodes" in caplog.text
    np.testing.assert_array_equal(p.run(batch), reference)


def _spinning(p: Predictor) -> str:
    return p.session.get_session_options().get_session_config_entry(predictor_module.SPIN_OPTION)


def test_spin_off_reaches_the_session_also_through_the_optimised_model_cache(
    bundle_copy: Path, batch: np.ndarray, reference: np.ndarray
) -> None:
    """The server and the TorchServe handler turn onnxruntime's busy-waiting off (their other
    threads need the cores); the option must reach the session on every path that opens one."""
    assert _spinning(Predictor(bundle_copy, threads=1)) == "1"  # onnxruntime's default kept
    assert _spinning(Predictor(bundle_copy, threads=1, spin=False)) == "0"
    saved = Predictor(bundle_copy, cache_optimized=True, threads=1, spin=False)  # saves the optimised graph
    loaded = Predictor(bundle_copy, cache_optimized=True, threads=1, spin=False)  # loads it
    assert loaded.optimized_path is not None and _spinning(saved) == _spinning(loaded) == "0"
    np.testing.assert_allclose(loaded.run(batch), reference, atol=1e-5)
