"""Bundle → TorchServe model archive (``<name>.mar``), built by the real ``torch-model-archiver``.

The archive holds the bundle's ``model.onnx`` and ``lensforge.json``, ``index_to_name.json``
(``{"0": "cat", ...}``, TorchServe's convention) and :mod:`lensforge.export.torchserve_handler`,
which serves it with the one :class:`lensforge.Predictor`. TorchServe's Python environment
needs ``pip install lensforge`` (the serving install; no torch is used by the handler).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from lensforge.errors import ExportError
from lensforge.export import torchserve_handler
from lensforge.export._serving import model_name
from lensforge.runtime.bundle import META_FILE, Bundle, as_bundle, staging_directory
from lensforge.runtime.predictor import Predictor

log = logging.getLogger(__name__)

ARCHIVER_MODULE = "model_archiver.model_packaging"  # torch-model-archiver's CLI entry point
HANDLER_FILE = "lensforge_handler.py"
INDEX_FILE = "index_to_name.json"
ARCHIVE_TIMEOUT_S = 600  # zipping a large model takes a while; a hang must not last forever


def export_torchserve(
    bundle: str | os.PathLike[str] | Bundle,
    out_dir: Path,
    *,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Build ``out_dir/<name>.mar`` for TorchServe; return its path.

    name: the TorchServe model name, also the URL path ``/predictions/<name>`` (default: the
        bundle's run directory name).
    overwrite: replace an existing archive (it is replaced only once the new one is complete).
    """
    b = as_bundle(bundle)
    name = model_name(b, name)
    out_dir = Path(out_dir)
    mar = out_dir / f"{name}.mar"
    if mar.exists() and not overwrite:
        raise ExportError(f"{mar} already exists; pass overwrite=True (--overwrite) to replace it")
    if importlib.util.find_spec(ARCHIVER_MODULE.split(".")[0]) is None:
        raise ExportError("torch-model-archiver is not installed: pip install torch-model-archiver")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file; give a directory for the .mar")
    # the check serve and predict make (the handler serves with this Predictor): a truncated or
    # hostile model.onnx is one BundleError here instead of an archive that cannot load
    Predictor(b, threads=1)
    out_dir.mkdir(parents=True, exist_ok=True)
    # beside the .mar (os.replace stays atomic); a kill -9 leaves it where the next export sweeps it
    with staging_directory(out_dir, f"{name}.mar") as work:
        (work / "files").mkdir()
        handler = shutil.copyfile(torchserve_handler.__file__, work / "files" / HANDLER_FILE)
        index = work / "files" / INDEX_FILE
        index.write_text(json.dumps({str(i): c for i, c in enumerate(b.classes)}, indent=2) + "\n")
        _archive(name, b.model_path, handler, [index, b.path / META_FILE], work)
        os.replace(work / f"{name}.mar", mar)
    log.info("wrote TorchServe archive %s", mar)
    return mar


def _archive(name: str, model: Path, handler: Path, extra: list[Path], work: Path) -> None:
    """Run ``torch-model-archiver`` (its CLI, in this Python) writing ``work/<name>.mar``.

    A subprocess, not its Python API: the archiver stages files in ``$TMPDIR/<name>`` (deleting
    whatever is there) and configures root logging; a private TMPDIR keeps two exports of the
    same name from clobbering each other, and our process's logging stays ours.
    """
    cmd = [
        sys.executable, "-m", ARCHIVER_MODULE,
        "--model-name", name, "--version", "1.0",
        "--serialized-file", str(model), "--handler", str(handler),
        "--extra-files", ",".join(map(str, extra)),
        "--export-path", str(work), "--force",
    ]
    env = {**os.environ, "TMPDIR": str(work)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=ARCHIVE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise ExportError(f"torch-model-archiver did not finish within {ARCHIVE_TIMEOUT_S} s") from None
    if proc.returncode != 0 or not (work / f"{name}.mar").is_file():
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        detail = lines[-1][:300] if lines else f"exit code {proc.returncode}"
        raise ExportError(f"torch-model-archiver failed: {detail}")
