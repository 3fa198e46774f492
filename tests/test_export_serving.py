"""Serving exports: a Triton model repository whose config Triton's own schema parses and
that matches the ONNX graph; a TorchServe .mar built by the real model-archiver whose
handler answers exactly what the Predictor answers; bad inputs fail in one line."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from lensforge.errors import BundleError, ExportError
from lensforge.export import torchserve
from lensforge.export.parity import FakeContext, load_handler
from lensforge.export.torchserve import export_torchserve
from lensforge.export.triton import export_triton
from lensforge.runtime import Predictor, load_bundle


@pytest.fixture(scope="module")
def jpegs(shapes_dir: Path) -> list[Path]:
    return [min((shapes_dir / c).glob("*.jpg")) for c in ("circle", "triangle")]


@pytest.fixture(scope="module")
def predictor(shapes_bundle: Path) -> Predictor:
    return Predictor(shapes_bundle, threads=1)


def _onnx_io(path: Path) -> tuple[list[tuple[str, list[int]]], list[tuple[str, list[int]]]]:
    """(name, dims) of the graph's inputs and outputs, symbolic axes as -1, read with onnx itself."""
    graph = onnx.load(str(path)).graph

    def dims(v: onnx.ValueInfoProto) -> list[int]:
        return [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]

    for v in [*graph.input, *graph.output]:
        assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    return [(v.name, dims(v)) for v in graph.input], [(v.name, dims(v)) for v in graph.output]


# -- Triton ---------------------------------------------------------------------------------


@pytest.mark.parametrize("max_batch_size", [32, 0])
def test_triton_repository_matches_the_onnx_graph(shapes_bundle: Path, tmp_path: Path, max_batch_size: int) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    model_dir = export_triton(shapes_bundle, tmp_path / "repo", name="shapes", max_batch_size=max_batch_size)
    assert model_dir == tmp_path / "repo" / "shapes"
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")) == [
        "1", "1/model.onnx", "config.pbtxt", "labels.txt"]
    bundle = load_bundle(shapes_bundle)
    assert (model_dir / "1" / "model.onnx").read_bytes() == bundle.model_path.read_bytes()
    assert (model_dir / "labels.txt").read_text().splitlines() == bundle.classes

    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "shapes" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == max_batch_size
    assert config.HasField("dynamic_batching") == (max_batch_size > 0)
    if max_batch_size:
        assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 100_000
    inputs, outputs = _onnx_io(bundle.model_path)
    skip = 1 if max_batch_size else 0  # the batch axis is implicit when Triton batches
    fp32 = model_config_pb2.DataType.Value("TYPE_FP32")
    assert [(t.name, list(t.dims)) for t in config.input] == [(n, d[skip:]) for n, d in inputs]
    assert [(t.name, list(t.dims)) for t in config.output] == [(n, d[skip:]) for n, d in outputs]
    assert all(t.data_type == fp32 for t in [*config.input, *config.output])
    assert [t.label_filename for t in config.output] == ["labels.txt"]
    assert outputs[0][1][-1] == len(bundle.classes)


def test_triton_without_tritonclient_still_writes_and_says_so(
    shapes_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # import now raises ImportError
    with caplog.at_level(logging.WARNING, logger="lensforge.export.triton"):
        model_dir = export_triton(shapes_bundle, tmp_path / "repo")
    assert (model_dir / "config.pbtxt").is_file() and (model_dir / "1" / "model.onnx").is_file()
    assert model_dir.name == Path(shapes_bundle).resolve().parent.name  # run dir, not "bundle"
    assert "validation skipped" in caplog.text and "pip install tritonclient" in caplog.text


# -- TorchServe -----------------------------------------------------------------------------


def test_torchserve_archive_and_handler_match_the_predictor(
    shapes_bundle: Path, tmp_path: Path, jpegs: list[Path], predictor: Predictor
) -> None:
    mar = export_torchserve(shapes_bundle, tmp_path / "store", name="shapes")
    assert mar == tmp_path / "store" / "shapes.mar" and sorted(p.name for p in mar.parent.iterdir()) == ["shapes.mar"]
    bundle = load_bundle(shapes_bundle)
    model_dir = tmp_path / "unpacked"
    with zipfile.ZipFile(mar) as z:
        assert set(z.namelist()) >= {"model.onnx", "index_to_name.json", "lensforge.json", "MAR-INF/MANIFEST.json"}
        z.extractall(model_dir)
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    assert manifest["model"]["modelName"] == "shapes" and manifest["model"]["serializedFile"] == "model.onnx"
    assert (model_dir / "model.onnx").read_bytes() == bundle.model_path.read_bytes()
    assert json.loads((model_dir / "index_to_name.json").read_text()) == {str(i): c for i, c in enumerate(bundle.classes)}
    assert "import torch" not in (model_dir / manifest["model"]["handler"]).read_text()

    context = FakeContext(model_dir, manifest)
    handler = load_handler(model_dir, manifest)
    handler.initialize(context)
    # one worker per core, each with a session: spinning idle threads would steal the others' cores
    assert handler.predictor.session.get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") == "0"
    requests = [{"data": jpegs[0].read_bytes()}, {"body": bytearray(jpegs[1].read_bytes())}, {"body": b"not an image"}]
    answers = handler.handle(requests, context)
    assert len(answers) == 3
    for path, answer in zip(jpegs, answers):
        expected = predictor.predict(path).top(5)
        assert list(answer) == [label for label, _ in expected]  # best first
        np.testing.assert_allclose(list(answer.values()), [s for _, s in expected], atol=1e-5)
    assert answers[2]["error"] == "unsupported_format" and context.statuses == {2: 415}  # only the bad request fails


# -- bad input ------------------------------------------------------------------------------

EXPORTERS = {"triton": export_triton, "torchserve": export_torchserve}


@pytest.mark.parametrize("kind", EXPORTERS)
def test_not_a_bundle(kind: str, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a lensforge bundle"):
        EXPORTERS[kind](tmp_path, tmp_path / "out")


@pytest.mark.parametrize("kind", EXPORTERS)
def test_existing_output_needs_overwrite(kind: str, shapes_bundle: Path, tmp_path: Path) -> None:
    target = tmp_path / "out" / "m.mar" if kind == "torchserve" else tmp_path / "out"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("old")
    with pytest.raises(ExportError, match="already exists; pass overwrite") as e:
        EXPORTERS[kind](shapes_bundle, tmp_path / "out", name="m")
    assert "\n" not in str(e.value) and target.read_text() == "old"
    EXPORTERS[kind](shapes_bundle, tmp_path / "out", name="m", overwrite=True)
    assert (target.is_file() and zipfile.is_zipfile(target)) if kind == "torchserve" else (target / "m" / "config.pbtxt").is_file()


@pytest.mark.parametrize(
    ("kind", "kwargs", "message"),
    [
        ("triton", {"name": "no spaces"}, "invalid model name"),
        ("torchserve", {"name": "../escape"}, "invalid model name"),
        ("triton", {"max_batch_size": -1}, "max_batch_size must be"),
    ],
)
def test_bad_options(kind: str, kwargs: dict[str, Any], message: str, shapes_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=message):
        EXPORTERS[kind](shapes_bundle, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_missing_model_archiver(shapes_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchserve, "ARCHIVER_MODULE", "no_such_model_archiver.model_packaging")
    with pytest.raises(ExportError, match="pip install torch-model-archiver") as e:
        export_torchserve(shapes_bundle, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


# -- the real TorchServe (Java), when it can start --------------------------------------------


JPEG = {"Content-Type": "image/jpeg"}  # urllib's default form content type makes TorchServe parse a form


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_real_torchserve_answers_like_the_predictor(
    shapes_bundle: Path, tmp_path: Path, jpegs: list[Path], predictor: Predictor
) -> None:
    # the venv's own script first: `make test` runs .venv/bin/python without activating the venv
    beside = Path(sys.executable).with_name("torchserve")
    exe = str(beside) if beside.is_file() else shutil.which("torchserve")
    if exe is None or shutil.which("java") is None:
        pytest.skip("torchserve or java is not installed")
    store = tmp_path / "store"
    export_torchserve(shapes_bundle, store, name="shapes")
    ports = {k: _free_port() for k in ("inference", "management", "metrics")}
    (tmp_path / "config.properties").write_text(
        "".join(f"{k}_address=http://127.0.0.1:{p}\n" for k, p in ports.items())
        + "default_workers_per_model=1\nbatch_size=1\ndisable_token_authorization=true\nenable_envvars_config=false\n"
    )
    cmd = [exe, "--start", "--ncs", "--disable-token-auth", "--foreground", "--model-store", str(store),
           "--models", "shapes=shapes.mar", "--ts-config", str(tmp_path / "config.properties")]
    log = (tmp_path / "ts.log").open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{ports['inference']}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the model is ready once a prediction answers
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"TorchServe did not start: {(tmp_path / 'ts.log').read_text()[-500:]}")
            try:
                req = urllib.request.Request(f"{base}/predictions/shapes", data=jpegs[0].read_bytes(), headers=JPEG)
                with urllib.request.urlopen(req, timeout=10):
                    break
            except urllib.error.HTTPError as e:
                if e.code >= 500 and e.code != 503:
                    raise  # answering, but wrongly: a failure, not a slow start
            except OSError:  # not listening yet, or 503/404 while the worker loads
                pass
            time.sleep(1)
        for path in jpegs:
            req = urllib.request.Request(f"{base}/predictions/shapes", data=path.read_bytes(), headers=JPEG)
            with urllib.request.urlopen(req, timeout=30) as r:
                answer = json.loads(r.read())
            expected = predictor.predict(path).top(5)
            assert list(answer) == [label for label, _ in expected]
            np.testing.assert_allclose(list(answer.values()), [s for _, s in expected], atol=1e-5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the group we started: the launcher, java and its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
