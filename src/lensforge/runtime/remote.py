"""Bundles named by an MLflow URI: ``models:/NAME/VERSION``, ``models:/NAME/latest`` and
``runs:/RUN_ID/bundle`` (``lensforge predict`` / ``serve`` / Python's :func:`fetch_bundle`).

The bundle is downloaded once into the user cache (``cache_root()/mlflow/<store>/...``): into a
staging directory first, checked by :func:`~lensforge.runtime.bundle.load_bundle`, then renamed
into place, so a download that fails or is cut off never becomes a cache hit. A pinned version
or a run's artifact is immutable, so a hit is served without asking the server (offline
serving from the cache works); ``latest`` asks the registry which version that is each time.

MLflow is imported here only when a URI is given (it is the ``track`` extra, not the serving
install's), and this module imports no torch: the serving runtime may use it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lensforge.errors import BundleError, ConfigError
from lensforge.runtime.bundle import META_FILE, load_bundle, staging_directory
from lensforge.runtime.cache import cache_root

log = logging.getLogger(__name__)

SCHEMES = ("models:/", "runs:/")
REACH_TIMEOUT_S = 5.0  # the /health probe of a tracking server: a dead one is one line, not a 2-minute retry loop
# MLflow's own defaults retry a dead server 7 times with backoff factor 2 and wait 120 s per
# request: a training step or a `predict` would hang for minutes. Ours (used unless the user sets
# them): 2 retries, factor 1 (~3 s in all for a refused connection), 30 s per request (a read
# timeout between bytes, not a cap on an upload's length).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def is_uri(ref: str | os.PathLike[str]) -> bool:
    """Whether ``ref`` names a bundle in MLflow rather than a directory."""
    return isinstance(ref, str) and ref.startswith(SCHEMES)


@dataclass(frozen=True)
class ModelRef:
    """A parsed URI: ``kind`` "models" (``name``, ``version`` digits or "latest") or "runs"
    (``run_id``, ``path`` inside the run's artifacts)."""

    uri: str
    kind: str
    name: str = ""
    version: str = ""
    run_id: str = ""
    path: str = ""

    @property
    def display_name(self) -> str:
        """What a server calls the model: the registered name, or the run id's first 8 characters."""
        return self.name if self.kind == "models" else self.run_id[:8]


def parse_uri(uri: str) -> ModelRef:
    """``models:/NAME/VERSION|latest`` or ``runs:/RUN_ID/PATH`` → a :class:`ModelRef`; anything
    else is a one-line ConfigError saying which forms are read."""
    forms = "models:/NAME/VERSION, models:/NAME/latest or runs:/RUN_ID/bundle"
    if uri.startswith("models:/"):
        name, _, version = uri[len("models:/"):].strip("/").rpartition("/")
        if not name or not (version.isdigit() or version == "latest"):
            raise ConfigError(f"cannot read {uri!r}: expected {forms}")
        return ModelRef(uri, "models", name=name, version=version)
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].strip("/").partition("/")
        if not re.fullmatch(r"[0-9A-Za-z_-]+", run_id or "") or not path or ".." in path.split("/"):
            raise ConfigError(f"cannot read {uri!r}: expected {forms}")
        return ModelRef(uri, "runs", run_id=run_id, path=path)
    raise ConfigError(f"cannot read {uri!r}: expected {forms}")


def tracking_uri() -> str:
    """Where the registry and runs are: ``MLFLOW_TRACKING_URI`` when set, else MLflow's default."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    import mlflow  # only when a URI was given and no store named

    return str(mlflow.get_tracking_uri())


def quick_http_defaults() -> None:
    """Apply :data:`HTTP_DEFAULTS` where the user has not set them (MLflow reads them per request)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def check_reachable(uri: str, what: str = "MLFLOW_TRACKING_URI") -> None:
    """An http(s) tracking server answers its ``/health`` route within :data:`REACH_TIMEOUT_S`;
    else one ConfigError naming the URI. Other stores (sqlite, files) are not probed."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=REACH_TIMEOUT_S) as response:
            response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"MLflow tracking server {uri} ({what}) is not reachable: {reason}") from None


def fetch_bundle(uri: str) -> Path:
    """The local, checked bundle directory for an MLflow URI (downloaded into the cache on first use).

    A name, version or run that does not exist, or a download that is not a bundle, is a
    BundleError; a server that does not answer is a ConfigError. Both are one line."""
    ref = parse_uri(uri)
    store = tracking_uri()
    pinned = not (ref.kind == "models" and ref.version == "latest")
    if pinned:
        hit = _cached(cache_entry(store, ref))
        if hit is not None:
            log.info("%s: using the cached copy in %s", uri, hit)
            return hit
    check_reachable(store)
    quick_http_defaults()
    client = _client(store)
    if not pinned:  # which version "latest" is now; that version's entry may be cached
        ref = ModelRef(uri, "models", name=ref.name, version=_latest_version(client, ref.name, store))
        hit = _cached(cache_entry(store, ref))
        if hit is not None:
            return hit
    return _download(_download_uri(client, ref, store), store, cache_entry(store, ref), uri)


def cache_entry(store: str, ref: ModelRef) -> Path:
    """``cache_root()/mlflow/<hash of the store URI>/models/<name>/<version>`` or ``.../runs/<run_id>/<path>``:
    the same name on two servers never shares an entry."""
    base = cache_root() / "mlflow" / hashlib.sha256(store.encode()).hexdigest()[:16]
    if ref.kind == "models":
        return base / "models" / urllib.parse.quote(ref.name, safe="") / ref.version
    return base / "runs" / ref.run_id / urllib.parse.quote(ref.path, safe="")


def _cached(entry: Path) -> Path | None:
    """The cached bundle when it is there and loads; a broken one is removed (downloaded again)."""
    if not (entry / META_FILE).is_file():
        return None
    try:
        load_bundle(entry)
    except BundleError as e:
        log.warning("the cached bundle %s is broken (%s); downloading it again", entry, e)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return entry


def _client(store: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or store)


def _missing(e: Exception) -> bool:
    return getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _latest_version(client: Any, name: str, store: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as e:
        raise ConfigError(f"cannot list the versions of {name!r} in {store}: {_first_line(e)}") from None
    if not versions:
        raise BundleError(f"no registered model {name!r} in the MLflow registry at {store} "
                          "(register one with: lensforge train DATA --track mlflow --register NAME)")
    return str(max(int(v.version) for v in versions))


def _download_uri(client: Any, ref: ModelRef, store: str) -> str:
    """Where the bundle's files are: the model version's source, or the run's artifact path."""
    from mlflow.exceptions import MlflowException

    if ref.kind == "runs":
        return f"runs:/{ref.run_id}/{ref.path}"
    try:
        return str(client.get_model_version_download_uri(ref.name, ref.version))
    except MlflowException as e:
        if _missing(e):
            raise BundleError(f"{ref.uri}: no registered model {ref.name!r} version {ref.version} in the MLflow "
                              f"registry at {store}") from None
        raise ConfigError(f"{ref.uri}: the MLflow registry at {store} answered: {_first_line(e)}") from None


def _download(source: str, store: str, entry: Path, uri: str) -> Path:
    """Download ``source`` into a staging directory beside ``entry``, check it is a bundle, rename it in."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    entry.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our console, not tqdm's
    with staging_directory(entry.parent, entry.name) as tmp:
        try:
            got = Path(download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=store))
        except MlflowException as e:
            if _missing(e):
                raise BundleError(f"{uri}: not found in MLflow at {store} ({_first_line(e)})") from None
            raise ConfigError(f"{uri}: downloading from MLflow at {store} failed: {_first_line(e)}") from None
        except OSError as e:  # a connection cut mid-download, a full disk
            raise ConfigError(f"{uri}: downloading from MLflow at {store} failed: {e}") from None
        if not (got / META_FILE).is_file():
            raise BundleError(f"{uri} is not a lensforge bundle: its artifacts have no {META_FILE}")
        load_bundle(got)  # the loader's own checks, before it can become a cache hit
        try:
            os.replace(got, entry)
        except OSError:  # another process put the same entry in place first: theirs is as good
            if not (entry / META_FILE).is_file():
                raise
    log.info("%s downloaded to %s", uri, entry)
    return entry


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
