"""Training on several processes (DDP through Lightning): the checks before any work, the
validation metrics over the whole validation set, and real 2-process runs, launched by
Lightning itself (``--devices 2``) and by ``torchrun`` as two "nodes" on loopback, whose
bundles pass the same checks as a single-process run's."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml

from lensforge.cli import main
from lensforge.config import TrainConfig
from lensforge.data.formats import read_dataset
from lensforge.data.split import load_split
from lensforge.errors import ConfigError
from lensforge.runtime import Predictor, load_bundle
from lensforge.training import distributed
from lensforge.training.distributed import check_distributed, whole_set
from lensforge.training.finetune import EpochReport, quick_metrics
from lensforge.ui import Reporter

LENSFORGE = Path(sys.executable).parent / "lensforge"
TORCHRUN = Path(sys.executable).parent / "torchrun"
TINY = ["--image-size", "64", "--epochs", "1", "--max-steps", "3", "--batch-size", "8"]
TINY_DETECT = ["--image-size", "96", "--epochs", "1", "--max-steps", "2", "--batch-size", "4", "--lr", "1e-6"]
RUN_TIMEOUT_S = 400  # two processes of torch on a shared 2-core machine


# -- before any work ----------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    (["--devices", "4", "--accelerator", "cpu"], "--devices 4 asks for 4 CPU processes but this machine lets lensforge use 2"),
    (["--devices", "2", "--strategy", "ddp_turbo"], "unknown strategy 'ddp_turbo': Lightning knows no such strategy"),
    (["--devices", "2", "--strategy", "ddp_spawn"], "strategy 'ddp_spawn' is not supported by lensforge train"),
    (["--devices", "0"], "devices = 0 is out of range"),
])
def test_bad_distributed_options_are_one_line_exit_2_before_any_work(
        options: list[str], message: str, shapes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(distributed, "cpu_count", lambda: 2)  # "a 2-core machine", whatever this one has
    out = tmp_path / "run"
    assert main(["train", str(shapes_dir), "--out", str(out), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # nothing written, nothing started


def test_accelerator_choices_are_the_parsers_and_the_configs(shapes_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--accelerator {auto,cpu,gpu}" in capsys.readouterr().out  # listed like --precision's
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as usage:  # an argparse usage error, as for any other choice
        main(["train", str(shapes_dir), "--out", str(out), "--accelerator", "tpu"])
    assert usage.value.code == 2
    assert "argument --accelerator: invalid choice: 'tpu'" in capsys.readouterr().err
    # a config file skips argparse: TrainConfig.validate still says it in one line
    config = tmp_path / "train.yaml"
    config.write_text("accelerator: tpu\n")
    assert main(["train", str(shapes_dir), "--out", str(out), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: accelerator must be auto, cpu or gpu, got 'tpu'", err
    assert not out.exists()


def test_a_launcher_that_started_another_number_of_processes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="started 3 processes but --devices 1 × --num-nodes 2 = 2"):
        check_distributed(TrainConfig(data="x", num_nodes=2, accelerator="cpu"))


@pytest.mark.parametrize(("env", "devices", "rank"), [
    ({}, 2, 0),
    ({"LOCAL_RANK": "1"}, 2, 1),  # Lightning's own child on the first machine
    ({"NODE_RANK": "1", "LOCAL_RANK": "1"}, 2, 3),  # ... on the second
    ({"RANK": "5", "LOCAL_RANK": "1", "NODE_RANK": "2"}, 2, 5),  # torchrun says it outright
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, 2, 3),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, 1, 0),  # a plain sbatch shell
])
def test_process_rank_from_each_launcher(env: dict[str, str], devices: int, rank: int,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.process_rank(TrainConfig(data="x", devices=devices)) == rank


# -- validation over the whole set --------------------------------------------------------

N_VAL = 7  # odd: DistributedSampler pads rank 1's shard with a repeat of image 0


def _validation_set() -> tuple[np.ndarray, np.ndarray]:
    scores = np.full((N_VAL, 3), 0.1, dtype=np.float32)
    y = np.array([0, 1, 2, 0, 1, 2, 0])
    scores[np.arange(N_VAL), [0, 2, 1, 1, 2, 0, 1]] = 0.8  # right on image 0 only: accuracy 1/7
    return scores, y


def _validate_on_shard(rank: int, store: str, out: str) -> None:
    """One process of a 2-process gloo group: scores its DistributedSampler shard, as
    Lightning's validation loop would, then gathers the whole set."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        scores, y = _validation_set()
        order = list(torch.utils.data.DistributedSampler(range(N_VAL), num_replicas=2, rank=rank, shuffle=False))
        rows = whole_set(order, [(scores[i], y[i]) for i in order], N_VAL)
        gathered = quick_metrics(np.stack([r[1] for r in rows]), np.stack([r[0] for r in rows]), False)
        shard = quick_metrics(y[order], scores[order], False)
        Path(out, f"{rank}.json").write_text(json.dumps({"order": order, "gathered": gathered, "shard": shard}))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_validation_metrics_equal_one_process_on_the_whole_set(tmp_path: Path) -> None:
    mp.spawn(_validate_on_shard, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    scores, y = _validation_set()
    alone = quick_metrics(y, scores, False)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert ranks[1]["order"][-1] == 0  # the padded repeat the gather must not count twice
    for r in ranks:
        assert r["gathered"] == pytest.approx(alone)
    # what a naive reduction would have reported: each shard's, or both shards concatenated
    assert ranks[0]["shard"]["val_acc"] != alone["val_acc"] or ranks[1]["shard"]["val_acc"] != alone["val_acc"]
    both = ranks[0]["order"] + ranks[1]["order"]
    assert float((scores[both].argmax(1) == y[both]).mean()) != pytest.approx(alone["val_acc"])


def test_whole_set_alone_sorts_and_refuses_a_partial_set() -> None:
    assert whole_set([2, 0, 1], ["c", "a", "b"], 3) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="covered 2 of 3"):
        whole_set([2, 0], ["c", "a"], 3)


# -- real runs ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _foreground_signals() -> None:
    """In the child, before exec: SIGINT at its default, as a terminal's foreground job has it.
    A test run started as a background shell job (``cmd &``) inherits SIGINT ignored (shells do
    that for ``&`` jobs), Python then installs no KeyboardInterrupt handler, and the Ctrl-C
    this test sends did nothing: the run trained to the end (CI from ``nohup ... &``: exit 0)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(cmd: list[str], logs: Path, name: str, *, own_group: bool = False) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with its output in files (never an unread pipe); ``own_group``: in a process
    group of its own, which the DDP processes it launches join, as in a terminal's foreground job."""
    out, err = (logs / f"{name}.out").open("wb"), (logs / f"{name}.err").open("wb")
    with out, err:
        return subprocess.Popen(cmd, stdout=out, stderr=err, env=_env(), cwd=logs, start_new_session=own_group,
                                preexec_fn=_foreground_signals if own_group else None)


def _finished(proc: subprocess.Popen[bytes], logs: Path, name: str) -> str:
    try:
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    out = (logs / f"{name}.out").read_text(errors="replace")
    assert rc == 0, f"{name}: exit {rc}\n{out[-3000:]}\n{(logs / f'{name}.err').read_text(errors='replace')[-5000:]}"
    return out


def _check_bundle(run: Path, data: Path, metric: str, bundle_key: str) -> dict[str, Any]:
    """What a single-process run's bundle passes (tests/test_train.py, tests/test_detect.py):
    complete, accepted by the runtime, its parity recorded, its split the run's and complete,
    its Predictor predicting; plus: the epoch's validation figure (computed by two processes
    on their shards, gathered) is the bundle's, computed by one Predictor over the whole split."""
    bundle = run / "bundle"
    for name in ("model.onnx", "weights.safetensors", "lensforge.json", "split.json"):
        assert (bundle / name).stat().st_size > 0, name
    b = load_bundle(bundle)
    assert 0 <= b.meta["parity"]["max_abs_diff" if b.task != "detect" else "max_score_diff"] <= 1e-3
    ds = read_dataset(data)
    split = load_split(bundle / "split.json", ds)
    assert (run / "split.json").read_text() == (bundle / "split.json").read_text()
    assert sum(len(v) for v in split.values()) == len(ds.records) and split["val"] and split["test"]
    result = Predictor(bundle).predict(split["test"][0].path)
    assert result is not None
    assert {"val", "test"} <= set(b.meta["metrics"])
    assert (run / "eval" / "metrics.json").is_file() and (run / "training_curves.png").is_file()
    best = [r for r in b.meta["training"]["history"] if metric in r and r.get("best")]
    assert best, "no validation figure recorded"
    # the bundle holds the best epoch's weights (the last epoch's when there was one)
    assert best[-1][metric] == pytest.approx(b.meta["metrics"]["val"][bundle_key], abs=1e-6)
    return b.meta


def _saved_distributed(run: Path) -> dict[str, Any]:
    return yaml.safe_load((run / "config.yaml").read_text())["distributed"]


@pytest.mark.slow
def test_two_processes_train_a_classifier_whose_bundle_passes_the_checks(shapes_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start([str(LENSFORGE), "train", str(shapes_dir), "--out", str(run), *TINY,
                   "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu"], tmp_path, "train")
    out = _finished(proc, tmp_path, "train")
    assert "effective batch 8 × 2 = 16 images per step" in out and "not scaled" in out
    assert out.count("Fine-tuning") == 1  # rank 1 trained too, but says nothing
    assert _saved_distributed(run) == {"processes": 2, "effective_batch_size": 16, "lr_scaling": "none"}
    _check_bundle(run, shapes_dir, "val_acc", "accuracy")


@pytest.mark.slow
def test_two_processes_train_a_detector_whose_bundle_passes_the_checks(detect_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start([str(LENSFORGE), "train", str(detect_dir), "--out", str(run), *TINY_DETECT,
                   "--devices", "2", "--accelerator", "cpu"], tmp_path, "train")  # strategy auto: ddp
    _finished(proc, tmp_path, "train")
    assert _saved_distributed(run)["processes"] == 2
    meta = _check_bundle(run, detect_dir, "val_map", "map")
    assert meta["parity"]["min_box_iou"] >= 0.99


@pytest.mark.slow
def test_two_nodes_through_torchrun_on_loopback(shapes_dir: Path, tmp_path: Path) -> None:
    run, port = tmp_path / "run", _free_port()
    procs = [
        _start([str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                "--master-addr", "127.0.0.1", "--master-port", str(port), "--no-python",
                str(LENSFORGE), "train", str(shapes_dir), "--out", str(run), *TINY,
                "--num-nodes", "2", "--strategy", "ddp", "--accelerator", "cpu", "--threads", "1"],
               tmp_path, f"node{node}")
        for node in (0, 1)
    ]
    outs = [_finished(p, tmp_path, f"node{n}") for n, p in enumerate(procs)]
    assert "Fine-tuning" in outs[0] and "Fine-tuning" not in outs[1]  # only rank 0 reports and writes
    assert "effective batch 8 × 2 = 16" in outs[0]
    _check_bundle(run, shapes_dir, "val_acc", "accuracy")


class _Rows(Reporter):
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def epoch(self, row: dict[str, Any]) -> None:
        self.rows.append(row)


def test_an_epoch_resumed_from_its_middle_reports_no_timing_it_did_not_measure() -> None:
    """Resuming from a Ctrl-C checkpoint, Lightning ends the interrupted epoch without starting
    it in this process (its remaining batches skipped): no rate, duration or ETA from a clock
    never read (it showed "0.0 img/s  3h46m  ETA 11h19m", the time since boot)."""
    rows = _Rows()
    report = EpochReport(rows, "val_acc", batch_size=4)
    trainer = SimpleNamespace(callback_metrics={"val_acc": torch.tensor(0.5)}, current_epoch=0, max_epochs=3,
                              num_training_batches=3, max_steps=-1, global_step=2, world_size=1)
    report.on_train_epoch_end(trainer, None)  # type: ignore[arg-type]
    assert "seconds" not in rows.rows[0] and "img_per_s" not in rows.rows[0] and rows.rows[0]["eta_s"] is None
    assert rows.rows[0]["best"] and report.history == [{k: v for k, v in rows.rows[0].items() if k != "eta_s"}]
    trainer.current_epoch = 1  # the next epoch runs here: timed as usual
    t0 = time.perf_counter()
    report.on_train_epoch_start(trainer, None)  # type: ignore[arg-type]
    report.on_train_batch_end(trainer, None, None, (torch.zeros(4, 3, 8, 8), torch.zeros(4)), 0)  # type: ignore[arg-type]
    report.on_train_epoch_end(trainer, None)  # type: ignore[arg-type]
    assert 0 <= rows.rows[1]["seconds"] <= round(time.perf_counter() - t0, 3) + 1e-3  # this epoch's, measured here
    assert rows.rows[1]["img_per_s"] is not None and rows.rows[1]["eta_s"] is not None


@pytest.mark.slow
def test_ctrl_c_stops_both_processes_and_resume_finishes_as_two(shapes_dir: Path, tmp_path: Path) -> None:
    """What Ctrl-C in a terminal does to a 2-process run (SIGINT to its whole process group),
    then ``--resume`` (tests/test_train.py and test_cli.py check one process)."""
    run, epochs = tmp_path / "run", 3  # epochs to spare after the first progress line, on a fast machine too
    proc = _start([str(LENSFORGE), "train", str(shapes_dir), "--out", str(run), "--image-size", "64",
                   "--epochs", str(epochs), "--batch-size", "4", "--patience", "0",
                   "--devices", "2", "--accelerator", "cpu"], tmp_path, "train", own_group=True)
    try:
        # "epoch 1/3  8/24 img (33%)": a third of the first epoch trained (a line by count, not time)
        log, deadline = tmp_path / "train.out", time.monotonic() + RUN_TIMEOUT_S
        while f"epoch 1/{epochs}  " not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"exited {proc.returncode} before training\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no training after {RUN_TIMEOUT_S} s\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:  # stuck: nothing of the group may outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = (tmp_path / "train.err").read_text(errors="replace")
    assert rc == 130, f"exit {rc}\n{err[-5000:]}"
    stopped = [line for line in err.splitlines() if "training interrupted" in line]
    assert len(stopped) == 1, err  # rank 0 says it; rank 1, interrupted too, says nothing
    assert stopped[0].startswith("error: training interrupted in epoch ") and "Traceback" not in err, err
    assert f"Resume with: lensforge train {shapes_dir} --out {run} --resume" in stopped[0]
    epoch = int(re.search(r"interrupted in epoch (\d+)", stopped[0]).group(1))  # type: ignore[union-attr]
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() and not (run / "bundle").exists()  # resumable, and no half-written bundle
    # written at the interruption, not left by the end of an earlier epoch
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == epoch - 1

    resumed = _start([str(LENSFORGE), "train", str(shapes_dir), "--out", str(run), "--resume"], tmp_path, "resume")
    out = _finished(resumed, tmp_path, "resume")
    assert "DDP: 2 processes" in out and out.count("Fine-tuning") == 1  # the run's own settings: two processes
    assert _saved_distributed(run)["processes"] == 2
    meta = _check_bundle(run, shapes_dir, "val_acc", "accuracy")
    assert [row["epoch"] for row in meta["training"]["history"]] == list(range(1, epochs + 1))
