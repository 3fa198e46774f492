"""``lensforge evaluate`` and ``lensforge export`` log into the MLflow run that made the bundle.

A bundle trained with ``--track mlflow`` records that run in its ``lensforge.json``
(``"tracking": {"mlflow": {"tracking_uri", "experiment_id", "run_id"}}``). Its later
evaluations (``evaluate/<metric>``, the plots and report under ``evaluate/``) and exports (a
``lensforge.export.<target>`` tag, their ``lensforge.json`` / ``parity.json`` under
``export/<target>/``) go into that run, so one run tells the model's whole story. When the run
is gone from its store (deleted), a new run in the same store is started and linked to it
(tag ``lensforge.source_run``).

Tracking never costs the command: a store that is missing or not answering is one warning and
nothing is logged. MLflow is imported only for a bundle that names a run; no torch here.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lensforge.errors import LensforgeError
from lensforge.runtime.bundle import Bundle
from lensforge.runtime.remote import check_reachable, quick_http_defaults
from lensforge.tracking import EXPERIMENT
from lensforge.ui import Reporter

log = logging.getLogger(__name__)

SOURCE_TAG = "lensforge.source_run"  # on a linked run: the id of the run that made the bundle


def recorded_run(bundle: Bundle) -> dict[str, str]:
    """The MLflow run recorded in the bundle (``{"tracking_uri", "experiment_id", "run_id"}``), or {}."""
    record = (bundle.meta.get("tracking") or {}).get("mlflow") or {}
    return {k: str(v) for k, v in record.items()} if isinstance(record, dict) and record.get("run_id") else {}


def log_to_bundle_run(bundle: Bundle, kind: str, *, metrics: Mapping[str, float] | None = None,
                      tags: Mapping[str, str] | None = None, artifacts: Sequence[Path] = (),
                      reporter: Reporter | None = None) -> str | None:
    """Log ``metrics`` (as ``<kind>/<name>``), ``tags`` and ``artifacts`` (under ``<kind>/``) into
    the run that made ``bundle`` (or a run linked to it); returns that run's id, or None when the
    bundle names no run, MLflow is not installed, or logging failed (one warning)."""
    record = recorded_run(bundle)
    if not record or importlib.util.find_spec("mlflow") is None:
        return None
    ui = reporter or Reporter()
    uri = record.get("tracking_uri", "")
    try:
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
            raise LensforgeError(f"its store {uri} is not there any more")  # MLflow would make an empty one
        check_reachable(uri, "the bundle's training run")
        quick_http_defaults()
        run_id = _log(uri, record, bundle, kind, metrics or {}, tags or {}, artifacts)
    except Exception as e:  # a tracking problem never fails an evaluation or an export
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        ui.warn(f"not logged to the bundle's MLflow run {record['run_id']}: {first}")
        log.debug("logging %s to MLflow failed", kind, exc_info=True)
        return None
    ui.step(f"Logged the {kind} to MLflow run {run_id} ({uri})")
    return run_id


def _log(uri: str, record: Mapping[str, str], bundle: Bundle, kind: str, metrics: Mapping[str, float],
         tags: Mapping[str, str], artifacts: Sequence[Path]) -> str:
    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id, linked = record["run_id"], False
    try:
        usable = client.get_run(run_id).info.lifecycle_stage != "deleted"
    except MlflowException as e:
        if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        usable = False
    if not usable:  # the run is gone: a new run, linked to it by a tag
        run_id, linked = _linked_run(client, record, bundle, kind), True
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"{kind}/{k}", float(v), now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])
    for path in artifacts:
        if path.is_file():
            client.log_artifact(run_id, str(path), kind)
    if linked:
        client.set_terminated(run_id)
    return run_id


def _linked_run(client: Any, record: Mapping[str, str], bundle: Bundle, kind: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment_id = record.get("experiment_id")
    try:
        client.get_experiment(experiment_id)
    except MlflowException:  # that experiment is gone too: lensforge's own
        found = client.get_experiment_by_name(EXPERIMENT)
        experiment_id = found.experiment_id if found else client.create_experiment(EXPERIMENT)
    run = client.create_run(experiment_id, run_name=f"{kind} of {bundle.path.name}",
                            tags={SOURCE_TAG: record["run_id"], "lensforge.bundle": str(bundle.path)})
    return str(run.info.run_id)

