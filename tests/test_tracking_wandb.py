"""``--track wandb`` with ``WANDB_MODE=offline`` (no account, no network): the run's transaction
log (``WANDB_DIR/wandb/offline-run-*/run-<id>.wandb``) read back record by record with W&B's own
protobuf ``Record`` message: the resolved config, the fit's history equal to the CSV log, the
final numbers in the summary, the run's facts in its config, and the exit record -- all on disk
when ``lensforge.train`` returns. Also the tracker's project / experiment name (``project``).

wandb 0.31 ships no Python reader for this file (its reader lives in the Go core, and
``wandb.Api`` needs a server), so :func:`read_records` undoes the file's framing, which is
LevelDB's log format (wandb-core's ``pkg/leveldb/record.go``): a 7-byte file header (``:W&B``,
magic 0xBEE1, version 0) at the start of the first block, then 32 KiB blocks of chunks, each
``crc32 (IEEE, of the type byte then the data), length (uint16), type`` (1 full, 2 first,
3 middle, 4 last); a chunk never crosses a block, and a block tail shorter than a chunk header
is zeros. Each record is a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import csv
import json
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_tracking import TRACK_TRAIN

wandb = pytest.importorskip("wandb")

HEADER = b":W&B\xe1\xbe\x00"
BLOCK = 32768
CHUNK_HEADER = 7


def read_records(path: Path, chunks: Counter[int] | None = None) -> list[Any]:
    """Every record of a ``.wandb`` transaction log, each chunk checked against its CRC; the
    file must end on a whole record. ``chunks`` (when given) counts the chunk types seen."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == HEADER, data[:7]
    records, pos, pending = [], 7, None
    while pos < len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # the writer zero-fills a tail too short for a header
            assert data[pos:pos + left_in_block].strip(b"\0") == b"", f"non-zero block tail at byte {pos}"
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        assert CHUNK_HEADER + length <= left_in_block, f"chunk at byte {pos} crosses its block"
        assert len(chunk) == length, f"file ends inside the chunk at byte {pos}"
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad CRC at byte {pos}"
        assert (kind in (1, 2)) == (pending is None), f"chunk type {kind} out of order at byte {pos}"
        if chunks is not None:
            chunks[kind] += 1
        pos += CHUNK_HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = None
    assert pending is None, "the file ends inside a record"
    return records


def _items(updates: Any) -> dict[str, Any]:
    return {u.key or ".".join(u.nested_key): json.loads(u.value_json) for u in updates}


def _of(records: list[Any], kind: str) -> list[Any]:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B offline with every file of it under ``tmp_path``; returns WANDB_DIR. The base URL is a
    closed loopback port, so a request that offline mode should not make fails instead of leaving."""
    wandb_dir = tmp_path / "wandb-dir"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    for var in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    return wandb_dir


@pytest.mark.slow  # starts wandb's service process
def test_reader_follows_records_across_blocks(offline: Path) -> None:
    """The reader against wandb's own writer on a log of several blocks: a 70 KB config value is
    one record in first, middle and last chunks; 400 history rows come back in order."""
    run = wandb.init(project="reader", config={"blob": "x" * 70_000})
    for i in range(400):
        run.log({"i": i, "pad": "y" * 100})
    run.finish()
    wandb.teardown()  # the service writes the log's last block when it closes the stream
    (path,) = offline.glob("wandb/offline-run-*/run-*.wandb")
    assert path.stat().st_size > 3 * BLOCK
    chunks: Counter[int] = Counter()
    records = read_records(path, chunks)
    assert chunks[2] == chunks[4] >= 2 and chunks[3] >= 1  # records split over blocks, one over three
    (run_record,) = _of(records, "run")
    assert _items(run_record.config.update)["blob"] == "x" * 70_000
    assert [_items(h.item)["i"] for h in _of(records, "history")] == list(range(400))
    assert len(_of(records, "exit")) == 1


@pytest.mark.slow
def test_wandb_offline_run_holds_config_history_and_summary(shapes_dir: Path, tmp_path: Path, offline: Path) -> None:
    import lensforge

    run = tmp_path / "run"
    result = lensforge.train(data=str(shapes_dir), out=str(run), track="wandb",
                             extra={"project": "seed-project"}, **TRACK_TRAIN)
    recorded = json.loads((run / "tracking.json").read_text())["wandb"]
    assert recorded["project"] == "seed-project"  # the config's project (WANDB_PROJECT unset)
    assert Path(recorded["dir"]).is_relative_to(offline) and not (run / "wandb").exists()  # WANDB_DIR's
    # read as soon as train returns: the whole run is on disk (wandb's service wrote its last block)
    (path,) = offline.glob(f"wandb/offline-run-*/run-{recorded['run_id']}.wandb")
    records = read_records(path)
    (exit_record,) = _of(records, "exit")
    assert exit_record.exit_code == 0
    (run_record,) = _of(records, "run")
    assert run_record.project == "seed-project" and run_record.run_id == recorded["run_id"]

    config = _items(run_record.config.update)
    for update in _of(records, "config"):
        config.update(_items(update.update))
    resolved = yaml.safe_load((run / "config.yaml").read_text())["config"]  # the resolved config of the run
    assert resolved["threads"] and resolved["extra"] == {"project": "seed-project"}
    assert {k: config.get(k) for k in resolved} == resolved
    meta = json.loads((run / "bundle" / "lensforge.json").read_text())
    assert config["data.count.train"] == str(meta["data"]["counts"]["train"])  # the run's facts
    assert config["version.torch"] == meta["versions"]["torch"]

    # history: one row per log call of the fit, as Lightning's CSV log has them (per epoch, the
    # validation row, then the training row); merged per epoch, the run's history.csv
    rows = [_items(h.item) for h in _of(records, "history")]
    (csv_log,) = (run / "logs").glob("version_*/metrics.csv")
    logged = list(csv.DictReader(csv_log.open()))
    assert len(rows) == len(logged) == 2 * TRACK_TRAIN["epochs"]
    for row, line in zip(rows, logged, strict=True):
        assert (row["epoch"], row["trainer/global_step"]) == (int(line["epoch"]), int(line["step"]))
        metrics = {k: float(v) for k, v in line.items() if k not in ("epoch", "step") and v}
        assert {k: row[k] for k in metrics} == pytest.approx(metrics, rel=1e-6)
        assert not set(row) - set(metrics) - {"epoch", "trainer/global_step", "_step", "_runtime", "_timestamp"}
    per_epoch: dict[int, dict[str, float]] = {}
    for row in rows:
        per_epoch.setdefault(row["epoch"] + 1, {}).update({k: v for k, v in row.items() if not k.startswith(("_", "trainer/", "epoch"))})
    history = [{k: float(v) for k, v in line.items() if v} for line in csv.DictReader((run / "history.csv").open())]
    assert [int(h.pop("epoch")) for h in history] == list(per_epoch)
    assert list(per_epoch.values()) == [pytest.approx(h, rel=1e-6) for h in history]

    # the final numbers of each split, in the summary (not as an extra history row)
    summary: dict[str, Any] = {}
    for update in _of(records, "summary"):
        summary.update(_items(update.update))
    final = {f"{split}/{k}": v for split, m in result.metrics.items() for k, v in m.numbers().items()}
    assert "test/accuracy" in final and "val/accuracy" in final
    assert {k: summary[k] for k in final} == pytest.approx(final)
    assert (run / "bundle" / "lensforge.json").is_file()


@pytest.mark.parametrize(("env", "extra", "expected"), [
    (None, {}, "lensforge"),
    (None, {"project": "damage-detector"}, "damage-detector"),
    ("from-env", {"project": "damage-detector"}, "from-env"),  # the session's setting wins
    ("from-env", {}, "from-env"),
])
def test_project_name_precedence(env: str | None, extra: dict[str, str], expected: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from lensforge.tracking import project_name

    for var in ("WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME"):
        if env is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, env)
        assert project_name(var, {"extra": extra}) == expected


def test_mlflow_experiment_is_the_config_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed-style ``project`` names the MLflow experiment of the run (local sqlite store)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from lensforge.tracking.loggers import make_logger

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    logger = make_logger("mlflow", tmp_path, {"extra": {"project": "damage-detector"}})
    logger.finalize("success")
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'mlruns.db').resolve()}")
    assert client.get_experiment(logger.experiment_id).name == "damage-detector"
    assert client.get_run(logger.run_id).info.experiment_id == logger.experiment_id
