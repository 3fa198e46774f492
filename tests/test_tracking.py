"""``--track``: each tracker's files read back with its own reader (TensorBoard's
EventAccumulator, MLflow's MlflowClient), and the one-line errors before anything is written."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
from mlflow_server import free_port, mlflow_server

from lensforge.cli import main
from lensforge.errors import ConfigError
from lensforge.tracking import parse_track

# two epochs of three steps each: two per-epoch points per metric
TRACK_TRAIN: dict[str, object] = {"image_size": 64, "epochs": 2, "max_steps": 6, "batch_size": 8, "pretrained": False,
                                  "patience": 0}


def _csv_epochs(run: Path, column: str) -> list[float]:
    """The per-epoch values of ``column`` in the always-on CSV log."""
    (metrics,) = (run / "logs").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    return [float(r[column]) for r in rows if r.get(column)]


def test_parse_track_names_the_unknown_tracker() -> None:
    assert parse_track("mlflow, TensorBoard,mlflow") == ["mlflow", "tensorboard"]
    assert parse_track(["wandb"]) == ["wandb"]
    assert parse_track("") == []
    with pytest.raises(ConfigError, match="unknown tracker 'neptune'.*tensorboard, mlflow, wandb"):
        parse_track("mlflow,neptune")


def test_unknown_tracker_exits_2_before_anything_is_written(shapes_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", str(shapes_dir), "--out", str(out), "--no-pretrained", "--track", "mlfow"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown tracker 'mlfow'" in err
    assert not out.exists()


def test_missing_backend_names_the_package(shapes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    assert main(["train", str(shapes_dir), "--out", str(out), "--no-pretrained", "--track", "tensorboard,wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install wandb" in err
    assert not out.exists()


def test_unreachable_mlflow_server_is_one_line_before_training(shapes_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    out = tmp_path / "run"
    assert main(["train", str(shapes_dir), "--out", str(out), "--no-pretrained", "--track", "mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not reachable" in err and "127.0.0.1" in err
    assert not out.exists()


@pytest.mark.slow
def test_tensorboard_events_hold_the_csv_scalars(shapes_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import lensforge

    run = tmp_path / "run"
    result = lensforge.train(data=str(shapes_dir), out=str(run), track="tensorboard", **TRACK_TRAIN)
    events = EventAccumulator(str(run / "logs" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("train_loss", "val_loss", "val_acc"):
        logged = [e.value for e in events.Scalars(tag)]
        assert len(logged) == 2  # one per epoch
        assert logged == pytest.approx(_csv_epochs(run, tag), rel=1e-6)
    # the final held-out numbers, typed headline first in Metrics.numbers()
    assert events.Scalars("test/accuracy")[0].value == pytest.approx(result.metrics["test"]["accuracy"])
    assert (run / "bundle" / "lensforge.json").is_file()
    assert "test/accuracy" in scalars


def _check_mlflow_run(tracking_uri: str, run: Path, result: object) -> None:
    from mlflow.tracking import MlflowClient

    recorded = json.loads((run / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=tracking_uri)
    mrun = client.get_run(recorded["run_id"])
    assert mrun.info.status == "FINISHED"
    params = mrun.data.params
    assert params["image_size"] == "64" and params["epochs"] == "2" and params["track"] == "mlflow"
    assert params["batch_size"] == "8" and params["lr"] not in ("", "None")  # resolved from the task's default
    for key in ("train_loss", "val_acc"):
        history = client.get_metric_history(recorded["run_id"], key)
        assert len(history) == 2  # one point per epoch
        assert [h.value for h in history] == pytest.approx(_csv_epochs(run, key), rel=1e-6)
    assert mrun.data.metrics["test/accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])  # type: ignore[attr-defined]
    local = Path(client.download_artifacts(recorded["run_id"], "bundle/lensforge.json", str(run.parent / "dl")))
    assert json.loads(local.read_text()) == json.loads((run / "bundle" / "lensforge.json").read_text())
    plots = {f.path for f in client.list_artifacts(recorded["run_id"], "plots")}
    assert "plots/training_curves.png" in plots


@pytest.mark.slow
def test_mlflow_local_sqlite_store(shapes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    import lensforge

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    result = lensforge.train(data=str(shapes_dir), out=str(run), track=["mlflow"], **TRACK_TRAIN)
    assert (run / "mlruns.db").is_file() and (run / "mlartifacts").is_dir()
    _check_mlflow_run(f"sqlite:///{(run / 'mlruns.db').resolve()}", run, result)


@pytest.mark.slow
def test_mlflow_real_server(shapes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real ``mlflow server`` on a free loopback port, with MLFLOW_TRACKING_URI pointing at it."""
    pytest.importorskip("mlflow")
    import lensforge

    with mlflow_server(tmp_path) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        run = tmp_path / "run"
        result = lensforge.train(data=str(shapes_dir), out=str(run), track="mlflow", **TRACK_TRAIN)
        assert not (run / "mlruns.db").exists()  # the server's store, not a local one
        _check_mlflow_run(server.uri, run, result)


def test_a_failing_tracker_warns_once_and_the_run_finishes(shapes_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracker whose every call fails mid-run (as a tracking server that went away) costs one
    warning; the fit, the CSV log and the bundle are all there."""
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    import lensforge
    from lensforge.ui import Reporter

    def broken(self: object, *args: object, **kwargs: object) -> None:
        raise ConnectionError("tracking server gone")

    monkeypatch.setattr(TensorBoardLogger, "log_metrics", broken)
    warnings: list[str] = []

    class Recording(Reporter):
        def warn(self, message: str) -> None:
            warnings.append(message)

    run = tmp_path / "run"
    lensforge.train(reporter=Recording(), data=str(shapes_dir), out=str(run), track="tensorboard", **TRACK_TRAIN)
    failed = [w for w in warnings if "tensorboard tracking failed" in w]
    assert len(failed) == 1 and "tracking server gone" in failed[0]
    assert (run / "bundle" / "lensforge.json").is_file()
    assert len(_csv_epochs(run, "val_acc")) == 2



@pytest.mark.slow
def test_mlflow_server_stopped_mid_run_warns_once_and_the_bundle_is_written(
        shapes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real server is stopped during the fit (at the first metrics it is sent): one warning,
    and the run finishes with its CSV log and bundle. Our HTTP defaults (runtime/remote.py:
    2 retries, backoff factor 1) apply, so the dead server costs seconds, not MLflow's minutes."""
    pytest.importorskip("mlflow")
    import lensforge
    from lensforge.tracking.loggers import Guarded
    from lensforge.ui import Reporter

    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    warnings: list[str] = []

    class Recording(Reporter):
        def warn(self, message: str) -> None:
            warnings.append(message)

    with mlflow_server(tmp_path) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        forward = Guarded.log_metrics
        stopped: list[int] = []

        def stop_then_log(self: Guarded, metrics: dict[str, float], step: int | None = None) -> None:
            if self.name == "mlflow" and not stopped:
                server.stop()  # gone between two calls of the fit, as a crashed server would be
                stopped.append(1)
            forward(self, metrics, step)

        monkeypatch.setattr(Guarded, "log_metrics", stop_then_log)
        run = tmp_path / "run"
        lensforge.train(reporter=Recording(), data=str(shapes_dir), out=str(run), track="mlflow", **TRACK_TRAIN)
    assert stopped
    failed = [w for w in warnings if "mlflow tracking failed" in w]
    assert len(failed) == 1, warnings
    assert (run / "bundle" / "model.onnx").is_file() and len(_csv_epochs(run, "val_acc")) == 2
    run_id = json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"]
    # the run was made before the server went: the bundle still names it for a later evaluate
    assert json.loads((run / "bundle" / "lensforge.json").read_text())["tracking"]["mlflow"]["run_id"] == run_id
