"""``--register`` and MLflow URIs against a real ``mlflow server`` on a free loopback port:
train once with ``--track mlflow --register shapes``, then ``predict`` / ``serve`` by
``models:/`` and ``runs:/`` URIs (downloaded into the user cache, checked, loaded), bad URIs as
one line and exit 2, ``evaluate`` / ``export`` logged into the run that made the bundle, and
the run's dataset, version, machine and git facts — all read back with ``MlflowClient``."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from mlflow_server import MlflowServer, free_port, mlflow_server
from serving import LiveServer

from lensforge.cli import main
from lensforge.errors import ConfigError

pytestmark = pytest.mark.slow
pytest.importorskip("mlflow")

TINY = ["--image-size", "64", "--epochs", "2", "--max-steps", "6", "--batch-size", "8", "--no-pretrained",
        "--patience", "0"]


@dataclass
class Registered:
    server: MlflowServer
    data: Path  # a git repository holding a copy of shapes_dir
    run: Path
    run_id: str
    commit: str
    cache: Path


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, shapes_dir: Path) -> Iterator[Registered]:
    root = tmp_path_factory.mktemp("registry")
    data = root / "project"
    shutil.copytree(shapes_dir, data / "images")
    _git(data, "init", "-q")
    _git(data, "add", ".")
    _git(data, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "data")
    with mlflow_server(root) as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", server.uri)
        mp.setenv("LENSFORGE_CACHE", str(root / "cache"))
        run = root / "run"
        assert main(["train", str(data / "images"), "--out", str(run), "--track", "mlflow", "--register", "shapes",
                     *TINY]) == 0
        recorded = json.loads((run / "tracking.json").read_text())["mlflow"]
        yield Registered(server, data, run, recorded["run_id"], _git(data, "rev-parse", "HEAD"), root / "cache")


def _client(r: Registered) -> object:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=r.server.uri, registry_uri=r.server.uri)


def _predict_json(ref: str, images: list[Path], capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    capsys.readouterr()
    assert main(["predict", ref, *map(str, images), "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_register_records_the_version_and_the_bundle_names_its_run(registered: Registered) -> None:
    recorded = json.loads((registered.run / "tracking.json").read_text())["mlflow"]
    assert recorded["registered"] == {"name": "shapes", "version": "1"}
    meta = json.loads((registered.run / "bundle" / "lensforge.json").read_text())
    assert meta["tracking"]["mlflow"]["run_id"] == registered.run_id
    assert meta["tracking"]["mlflow"]["tracking_uri"] == registered.server.uri
    version = _client(registered).get_model_version("shapes", "1")  # type: ignore[attr-defined]
    assert version.run_id == registered.run_id and version.source == f"runs:/{registered.run_id}/bundle"


def test_predict_by_models_and_runs_uri_equals_the_local_bundle(registered: Registered, shapes_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.server.uri)
    monkeypatch.setenv("LENSFORGE_CACHE", str(registered.cache))
    images = sorted((registered.data / "images").glob("*/*.jpg"))[::7]
    local = _predict_json(str(registered.run / "bundle"), images, capsys)
    assert len(local) == len(images)
    for ref in ("models:/shapes/1", "models:/shapes/latest", f"runs:/{registered.run_id}/bundle"):
        assert _predict_json(ref, images, capsys) == local, ref
    # downloaded once per entry into the cache, each a complete bundle (no staging left behind)
    entries = sorted(p.parent.relative_to(registered.cache) for p in registered.cache.rglob("lensforge.json"))
    assert len(entries) == 2 and not list(registered.cache.rglob(".staging"))
    models_entry = next(registered.cache.glob("mlflow/*/models/shapes/1"))
    assert (models_entry / "model.onnx").read_bytes() == (registered.run / "bundle" / "model.onnx").read_bytes()


def test_a_pinned_version_in_the_cache_is_loaded_without_the_server(registered: Registered,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from lensforge.runtime import remote

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.server.uri)
    monkeypatch.setenv("LENSFORGE_CACHE", str(registered.cache))
    t0 = time.perf_counter()
    first = remote.fetch_bundle("models:/shapes/1")  # cold or cached, depending on the order tests ran in
    cold_or_warm = time.perf_counter() - t0

    def no_server(store: str) -> object:
        raise AssertionError("a cache hit must not ask the server")

    monkeypatch.setattr(remote, "_client", no_server)
    monkeypatch.setattr(remote, "check_reachable", no_server)
    t0 = time.perf_counter()
    assert remote.fetch_bundle("models:/shapes/1") == first
    print(f"models:/ fetch: first {cold_or_warm:.3f} s, cached {time.perf_counter() - t0:.3f} s")


def test_a_failed_download_never_becomes_a_cache_hit(registered: Registered, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.artifacts

    from lensforge.runtime import remote

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.server.uri)
    monkeypatch.setenv("LENSFORGE_CACHE", str(tmp_path / "cache"))
    real = mlflow.artifacts.download_artifacts

    def cut_off(artifact_uri: str, dst_path: str, tracking_uri: str) -> str:
        got = Path(real(artifact_uri=artifact_uri, dst_path=dst_path, tracking_uri=tracking_uri))
        (got / "model.onnx").write_bytes(b"")  # the connection dropped mid-file ...
        raise ConnectionResetError("connection reset by peer")  # ... and the client says so

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", cut_off)
    with pytest.raises(ConfigError, match="downloading from MLflow .* failed: connection reset"):
        remote.fetch_bundle("models:/shapes/1")
    assert not list((tmp_path / "cache").rglob("lensforge.json"))  # nothing half-downloaded is left to hit
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", real)
    remote.fetch_bundle("models:/shapes/1")  # the next try downloads it whole
    assert len(list((tmp_path / "cache").rglob("lensforge.json"))) == 1


def test_serve_by_models_uri_answers_predict(registered: Registered, monkeypatch: pytest.MonkeyPatch) -> None:
    """``lensforge serve models:/shapes/1`` resolves the URI (cmd_serve), names the model after
    it, and the app built from what it hands to serve() answers /predict like the local bundle."""
    import lensforge.serve
    from lensforge.runtime import Predictor
    from lensforge.serve.app import create_app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.server.uri)
    monkeypatch.setenv("LENSFORGE_CACHE", str(registered.cache))
    given: dict[str, object] = {}
    monkeypatch.setattr(lensforge.serve, "serve", lambda bundles, **kw: given.update(bundles=bundles))
    assert main(["serve", "models:/shapes/1"]) == 0
    bundles = given["bundles"]
    assert isinstance(bundles, dict) and list(bundles) == ["shapes"]
    image = sorted((registered.data / "images").glob("*/*.jpg"))[3]
    expected = Predictor(registered.run / "bundle").predict(image).label
    with LiveServer(create_app(bundles)) as live:
        b64 = base64.b64encode(image.read_bytes()).decode()
        r = requests.post(live.url + "/predict", json={"raw_file": b64}, timeout=30)
        assert r.status_code == 200, r.text
        named = requests.post(live.url + "/predictions/shapes", data=image.read_bytes(), timeout=30)
        assert named.status_code == 200, named.text
    assert expected in r.text and expected in named.text
    assert Path(bundles["shapes"]).is_relative_to(registered.cache)  # the downloaded copy, not the run's


@pytest.mark.parametrize("ref, message", [
    ("models:/no-such-model/1", "no registered model 'no-such-model' version 1"),
    ("models:/no-such-model/latest", "no registered model 'no-such-model'"),
    ("models:/shapes/99", "no registered model 'shapes' version 99"),
    ("runs:/0123456789abcdef0123456789abcdef/bundle", "not found in MLflow"),
    ("models:/shapes", "expected models:/NAME/VERSION"),
])
def test_a_uri_that_names_nothing_is_one_line_exit_2(registered: Registered, ref: str, message: str,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.server.uri)
    monkeypatch.setenv("LENSFORGE_CACHE", str(tmp_path / "cache"))
    image = next((registered.data / "images").glob("*/*.jpg"))
    capsys.readouterr()
    assert main(["predict", ref, str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not list((tmp_path / "cache").rglob("lensforge.json"))


@pytest.mark.parametrize("command", ["predict", "serve"])
def test_an_unreachable_tracking_server_is_one_line_exit_2(command: str, tmp_path: Path, shapes_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    monkeypatch.setenv("LENSFORGE_CACHE", str(tmp_path / "cache"))
    args = ["models:/shapes/1", *([str(next(shapes_dir.glob("*/*.jpg")))] if command == "predict" else [])]
    assert main([command, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not reachable" in err and dead in err, err


def test_evaluate_and_export_log_into_the_run_that_made_the_bundle(registered: Registered, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the bundle's own record says where its run is
    bundle = tmp_path / "bundle"
    shutil.copytree(registered.run / "bundle", bundle)
    assert main(["evaluate", str(bundle), str(registered.data / "images"), "--out", str(tmp_path / "eval"),
                 "--json"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text()) if (tmp_path / "eval" / "metrics.json").is_file() else None
    assert main(["export", str(bundle), "--to", "onnx-fp16", "--out", str(tmp_path / "fp16")]) == 0
    client = _client(registered)
    run = client.get_run(registered.run_id)  # type: ignore[attr-defined]
    assert "evaluate/accuracy" in run.data.metrics
    if evaluated is not None and "accuracy" in evaluated:
        assert run.data.metrics["evaluate/accuracy"] == pytest.approx(evaluated["accuracy"])
    assert run.data.tags["lensforge.evaluate.data"] == str(registered.data / "images")
    assert run.data.tags["lensforge.export.onnx-fp16"] == str((tmp_path / "fp16").resolve())
    logged = {f.path for f in client.list_artifacts(registered.run_id, "evaluate")}  # type: ignore[attr-defined]
    assert logged and all(p.startswith("evaluate/") for p in logged)
    exported = {f.path for f in client.list_artifacts(registered.run_id, "export/onnx-fp16")}  # type: ignore[attr-defined]
    assert "export/onnx-fp16/lensforge.json" in exported


def test_a_bundle_whose_run_is_gone_logs_into_a_linked_run(registered: Registered, tmp_path: Path) -> None:
    from lensforge.runtime import load_bundle
    from lensforge.tracking.lineage import SOURCE_TAG, log_to_bundle_run

    bundle = tmp_path / "bundle"
    shutil.copytree(registered.run / "bundle", bundle)
    meta = json.loads((bundle / "lensforge.json").read_text())
    gone = "f" * 32
    meta["tracking"]["mlflow"]["run_id"] = gone
    (bundle / "lensforge.json").write_text(json.dumps(meta))
    run_id = log_to_bundle_run(load_bundle(bundle), "evaluate", metrics={"accuracy": 0.5})
    assert run_id is not None and run_id != gone
    linked = _client(registered).get_run(run_id)  # type: ignore[attr-defined]
    assert linked.data.tags[SOURCE_TAG] == gone and linked.data.metrics["evaluate/accuracy"] == 0.5
    assert linked.info.status == "FINISHED"


def test_the_run_records_its_data_versions_machine_and_git_commit(registered: Registered) -> None:
    tags = _client(registered).get_run(registered.run_id).data.tags  # type: ignore[attr-defined]
    meta = json.loads((registered.run / "bundle" / "lensforge.json").read_text())
    for split, n in meta["data"]["counts"].items():
        assert tags[f"lensforge.data.count.{split}"] == str(n)
    assert sum(int(tags[f"lensforge.data.count.{s}"]) for s in ("train", "val", "test")) == 40
    split_bytes = (registered.run / "bundle" / "split.json").read_bytes()
    assert tags["lensforge.data.split_sha256"] == hashlib.sha256(split_bytes).hexdigest()
    assert tags["lensforge.version.torch"] == meta["versions"]["torch"]
    assert tags["lensforge.version.lensforge"] == meta["versions"]["lensforge"]
    assert "threads" in tags["lensforge.machine.cpu"] and tags["lensforge.machine.gpu"]
    assert tags["lensforge.git.commit"] == registered.commit == tags["mlflow.source.git.commit"]
    assert Path(tags["lensforge.git.dir"]).resolve() == registered.data.resolve()


def test_register_without_mlflow_tracking_is_refused(shapes_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", str(shapes_dir), "--out", str(out), "--no-pretrained", "--register", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--track mlflow" in err
    assert not out.exists()
