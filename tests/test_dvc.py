"""``lensforge init --dvc``: the pipeline files, their refusals, and the real ``dvc`` running them."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lensforge.cli import main
from lensforge.config import TrainConfig
from lensforge.tracking.dvc import PARAMS_FILE, PIPELINE_FILE, init_dvc

BIN = Path(sys.executable).parent  # the venv's lensforge and dvc, whatever PATH says


def git_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", str(path)], check=True, capture_output=True)
    return path


def run_tool(argv: list[str], cwd: Path, log: Path) -> subprocess.CompletedProcess[str]:
    """Run a command with the venv first on PATH; stdout and stderr to ``log`` (no pipe to fill),
    whose text is returned as the result's stdout."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    with log.open("w") as f:
        done = subprocess.run(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              timeout=600)
    return subprocess.CompletedProcess(argv, done.returncode, log.read_text(), "")


def test_init_writes_a_pipeline_and_params_that_train_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = git_repo(tmp_path / "repo")
    assert main(["init", "--dvc", str(repo)]) == 0
    capsys.readouterr()
    doc = yaml.safe_load((repo / PIPELINE_FILE).read_text())
    assert list(doc["stages"]) == ["inspect", "train", "evaluate", "export"]
    assert doc["stages"]["train"]["params"] == [{PARAMS_FILE: None}]  # the whole file
    assert "runs/inspect.json" in doc["stages"]["train"]["deps"]  # inspect → train
    cfg = TrainConfig.load(repo / PARAMS_FILE)  # what `lensforge train --config params.yaml` does
    assert (cfg.data, cfg.out) == ("data", "runs/train")
    assert cfg.to_dict() == TrainConfig(data="data", out="runs/train").to_dict()  # every setting, at its default


@pytest.mark.parametrize(("setup", "argv", "message"), [
    ("plain", ["init", "--dvc", "{dir}"], "is not in a git repository"),
    ("git+dvc.yaml", ["init", "--dvc", "{dir}"], "dvc.yaml already exists"),
    ("git+params.yaml", ["init", "--dvc", "{dir}"], "params.yaml already exists"),
    ("git", ["init", "--dvc", "{dir}", "--data", "/elsewhere/data"], "inside the repository"),
    ("missing", ["init", "--dvc", "{dir}"], "is not a directory"),
])
def test_init_refusals_are_one_line_exit_2_and_write_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, argv: list[str], message: str) -> None:
    d = tmp_path / "repo"
    if setup != "missing":
        d.mkdir()
    if setup.startswith("git"):
        git_repo(d)
    if "+" in setup:
        (d / setup.split("+")[1]).write_text("mine: 1\n")
    before = sorted(p.name for p in d.iterdir()) if d.exists() else None
    code = main([a.format(dir=d) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert (sorted(p.name for p in d.iterdir()) if d.exists() else None) == before  # no temp file left either
    if "+" in setup:
        assert (d / setup.split("+")[1]).read_text() == "mine: 1\n"


def test_overwrite_replaces_both_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = git_repo(tmp_path / "repo")
    (repo / PIPELINE_FILE).write_text("stages: {}\n")
    assert main(["init", "--dvc", str(repo), "--overwrite", "--data", "images"]) == 0
    capsys.readouterr()
    assert yaml.safe_load((repo / PIPELINE_FILE).read_text())["stages"]["inspect"]["deps"] == ["images"]
    assert TrainConfig.load(repo / PARAMS_FILE).data == "images"


def test_a_subdirectory_of_a_repository_is_inside_it(tmp_path: Path) -> None:
    sub = git_repo(tmp_path / "repo") / "project"
    sub.mkdir()
    assert init_dvc(sub).pipeline.is_file()


@pytest.mark.slow
def test_dvc_repro_runs_the_pipeline_then_reruns_from_train_when_a_param_changes(
        tmp_path: Path, shapes_dir: Path, tiny_train: dict) -> None:
    pytest.importorskip("dvc")
    repo = git_repo(tmp_path / "repo")
    shutil.copytree(shapes_dir, repo / "data")
    init_dvc(repo)
    params = repo / PARAMS_FILE
    text = params.read_text()
    for key, value in {**tiny_train, "pretrained": "false"}.items():
        text = re.sub(rf"(?m)^{key}: \S+", f"{key}: {value}", text)
    params.write_text(text)
    assert TrainConfig.load(params).max_steps == tiny_train["max_steps"]  # the edit kept the file readable

    assert run_tool(["dvc", "init", "-q"], repo, tmp_path / "init.log").returncode == 0
    first = run_tool(["dvc", "repro"], repo, tmp_path / "repro1.log")
    assert first.returncode == 0, first.stdout[-3000:]
    for stage in ("inspect", "train", "evaluate", "export"):
        assert f"Running stage '{stage}'" in first.stdout
    assert (repo / "runs/train/bundle/lensforge.json").is_file() and (repo / "runs/export/model.onnx").is_file()

    # dvc reads our files: the evaluation's metrics, the per-epoch history, the predictions
    shown = run_tool(["dvc", "metrics", "show", "--json"], repo, tmp_path / "metrics.log")
    ours = json.loads((repo / "runs/evaluate/metrics.json").read_text())
    revision = next(iter(json.loads(shown.stdout).values()))  # the workspace (named "" outside a commit)
    metrics = revision["data"]["runs/evaluate/metrics.json"]["data"]
    assert metrics["accuracy"] == ours["accuracy"] and metrics["n"] == ours["n"] == 8
    plots = run_tool(["dvc", "plots", "show", "--json"], repo, tmp_path / "plots.log")
    assert plots.returncode == 0, plots.stdout[-2000:]
    data = {name: spec[0]["content"]["data"]["values"] for name, spec in json.loads(plots.stdout)["data"].items()}
    with (repo / "runs/train/history.csv").open() as f:
        history = list(csv.DictReader(f))
    assert history and {r["train_loss"] for r in history} == {p["train_loss"] for p in data["Loss per epoch"]}
    with (repo / "runs/evaluate/predictions.csv").open() as f:
        predicted = sorted((r["true"], r["predicted"]) for r in csv.DictReader(f))
    assert sorted((p["true"], p["predicted"]) for p in data["Confusion (test split)"]) == predicted
    assert len(predicted) == 8

    # nothing changed: nothing runs
    second = run_tool(["dvc", "repro"], repo, tmp_path / "repro2.log")
    assert second.returncode == 0 and "Running stage" not in second.stdout, second.stdout

    # a setting changed: train and what follows it run again, inspect does not
    params.write_text(re.sub(r"(?m)^lr: \S+", "lr: 0.002", params.read_text()))
    third = run_tool(["dvc", "repro"], repo, tmp_path / "repro3.log")
    assert third.returncode == 0, third.stdout[-3000:]
    ran = re.findall(r"Running stage '(\w+)'", third.stdout)
    assert ran == ["train", "evaluate", "export"], third.stdout
    assert yaml.safe_load((repo / "runs/train/config.yaml").read_text())["config"]["lr"] == 0.002


def test_detection_data_gets_a_detectors_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a detector's predictions.csv has one row per box, not the true,predicted pair a confusion plot reads
    from lensforge.data.demo import make_demo_detection

    repo = git_repo(tmp_path / "repo")
    make_demo_detection(repo / "boxes", n_train=2, n_val=1, n_test=1, size=64, max_objects=1)
    classify = git_repo(tmp_path / "other")
    assert main(["init", "--dvc", str(repo), "--data", "boxes"]) == 0
    assert main(["init", "--dvc", str(classify)]) == 0  # no data yet: class folders assumed
    capsys.readouterr()
    plots = {name: spec["y"] for p in yaml.safe_load((repo / PIPELINE_FILE).read_text())["plots"] for name, spec in p.items()}
    # the columns a detector's training logs (no val_loss; val_map per epoch)
    assert plots == {"Loss per epoch": {"runs/train/history.csv": ["train_loss"]},
                     "Validation mAP per epoch": {"runs/train/history.csv": ["val_map", "val_map50"]}}
    assert len(yaml.safe_load((classify / PIPELINE_FILE).read_text())["plots"]) == 2
