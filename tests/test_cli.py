"""The ``lensforge`` command: user mistakes are one ``error:`` line and exit code 2 (never a
traceback); the JSON outputs are machine-readable and agree with the library."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from lensforge.cli import main
from lensforge.runtime import Predictor

TRAIN_OPTS = ["--no-pretrained", "--image-size", "64", "--epochs", "1", "--max-steps", "1", "--batch-size", "8"]


def run_cli(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``lensforge ARGV`` in this process; returns (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse: --help, usage errors
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@dataclass
class Env:
    tmp: Path
    shapes: Path  # class folders, 4 x 10 JPEGs (read-only)
    bundle: Path  # a trained bundle (read-only)

    def image(self) -> Path:
        return self.shapes / "circle" / "img_0001.jpg"

    def broken_bundle(self, edit: Callable[[Path], None]) -> Path:
        b = self.tmp / "broken-bundle"
        shutil.copytree(self.bundle, b)
        edit(b)
        return b


@pytest.fixture
def env(tmp_path: Path, shapes_dir: Path, shapes_bundle: Path) -> Env:
    return Env(tmp_path, shapes_dir, shapes_bundle)


def _folders(root: Path, layout: dict[str, int], make: Callable[..., Path]) -> Path:
    for cls, n in layout.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            make(root / cls / f"{i}.png", size=(40, 40))
    return root


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _safetensors(path: Path, tensors: dict[str, tuple[int, ...]]) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path))
    return path


def _missing_csv(e: Env) -> list[object]:
    (e.tmp / "d").mkdir()
    shutil.copy(e.image(), e.tmp / "d" / "present.jpg")
    rows = "".join(f"missing_{i}.jpg,cat\n" for i in range(3))
    return ["train", _write(e.tmp / "d" / "labels.csv", "path,label\npresent.jpg,dog\n" + rows), *TRAIN_OPTS]


def _all_unreadable(e: Env) -> list[object]:
    for cls in ("cat", "dog"):
        for i in range(5):
            _write(e.tmp / "d" / cls / f"{i}.jpg", "this is not a JPEG")
    return ["train", e.tmp / "d", "--out", e.tmp / "run", *TRAIN_OPTS]


def _no_model(b: Path) -> None:
    (b / "model.onnx").unlink()


def _newer(b: Path) -> None:
    meta = json.loads((b / "lensforge.json").read_text())
    (b / "lensforge.json").write_text(json.dumps({**meta, "format_version": 99}))


BAD_INPUT: list[tuple[str, Callable[[Env, Callable[..., Path]], list[object]], tuple[str, ...]]] = [
    ("missing data dir", lambda e, mk: ["train", e.tmp / "nope", *TRAIN_OPTS], ("does not exist",)),
    ("empty data dir", lambda e, mk: ["train", (e.tmp / "d").mkdir() or e.tmp / "d", *TRAIN_OPTS], ("is empty",)),
    ("one class", lambda e, mk: ["train", _folders(e.tmp / "d", {"cat": 3}, mk), *TRAIN_OPTS],
     ("found 1 class 'cat'", "needs at least 2")),
    ("empty class folder", lambda e, mk: ["train", _folders(e.tmp / "d", {"cat": 3, "dog": 0}, mk), *TRAIN_OPTS],
     ("needs at least 2", "empty class folders: dog")),
    ("csv without path column", lambda e, mk: ["train", _write(e.tmp / "l.csv", "name,category\na.jpg,cat\n"), *TRAIN_OPTS],
     ("no image path column", "found columns: name, category")),
    ("csv without label column", lambda e, mk: ["train", _write(e.tmp / "l.csv", "path\na.jpg\n"), *TRAIN_OPTS],
     ("no label columns",)),
    ("csv paths missing", lambda e, mk: _missing_csv(e),
     ("3 of 4 images listed", "do not exist", "first: missing_0.jpg, missing_1.jpg, missing_2.jpg")),
    ("no image files", lambda e, mk: ["train", _write(e.tmp / "d" / "cat" / "a.txt", "x").parent.parent, *TRAIN_OPTS],
     ("no images found",)),
    ("every image unreadable", lambda e, mk: _all_unreadable(e), ("no readable training images",)),  # after a warning
    ("unknown backbone", lambda e, mk: ["train", e.shapes, "--out", e.tmp / "run", "--backbone", "efficentnet_lite0", *TRAIN_OPTS],
     ("unknown backbone 'efficentnet_lite0'", "Did you mean: efficientnet_lite0, efficientnet_lite")),
    ("weights of another architecture",
     lambda e, mk: ["train", e.shapes, "--out", e.tmp / "run", *TRAIN_OPTS[1:], "--weights",
                    _safetensors(e.tmp / "r18.safetensors", {"conv1.weight": (64, 3, 7, 7), "fc.weight": (1000, 512)})],
     ("no tensor in", "another architecture")),
    ("weights of the wrong shape",
     lambda e, mk: ["train", e.shapes, "--out", e.tmp / "run", *TRAIN_OPTS[1:], "--weights",
                    _safetensors(e.tmp / "w.safetensors", {"conv_stem.weight": (16, 3, 3, 3)})],
     ("does not fit this backbone", "conv_stem.weight is (16, 3, 3, 3)")),
    ("weights file missing", lambda e, mk: ["train", e.shapes, "--out", e.tmp / "run", "--weights", e.tmp / "no.safetensors", *TRAIN_OPTS[1:]],
     ("weights file not found",)),
    ("predict with incomplete bundle", lambda e, mk: ["predict", e.broken_bundle(_no_model), e.image()],
     ("incomplete", "model.onnx is missing")),
    ("evaluate with incomplete bundle", lambda e, mk: ["evaluate", e.broken_bundle(_no_model), e.shapes],
     ("model.onnx is missing",)),
    ("bundle from a newer version", lambda e, mk: ["predict", e.broken_bundle(_newer), e.image()],
     ("newer lensforge", "upgrade")),
    ("run dir exists", lambda e, mk: ["train", e.shapes, "--out", _write(e.tmp / "run" / "keep.txt", "x").parent, *TRAIN_OPTS],
     ("already exists", "--overwrite")),
    ("split not numbers", lambda e, mk: ["train", e.shapes, "--out", e.tmp / "run", "--split", "abc", *TRAIN_OPTS],
     ("--split takes TEST[,VAL]", "'abc'")),
    ("split out of range", lambda e, mk: ["train", e.shapes, "--out", e.tmp / "run", "--split", "0.2,1.5", *TRAIN_OPTS],
     ("val_fraction must be in [0, 1)",)),
    ("config file missing", lambda e, mk: ["train", e.shapes, "--config", e.tmp / "none.yaml", *TRAIN_OPTS],
     ("config file not found",)),
    ("predict a missing image", lambda e, mk: ["predict", e.bundle, e.tmp / "gone.jpg"], ("1 input(s) not found",)),
]


@pytest.mark.parametrize(("builder", "expected"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_user_errors_are_one_line_and_exit_2(
    env: Env, make_image: Callable[..., Path], capsys: pytest.CaptureFixture[str],
    builder: Callable[[Env, Callable[..., Path]], list[object]], expected: tuple[str, ...],
) -> None:
    argv = builder(env, make_image)
    code, _out, err = run_cli(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    *before, last = err.strip().splitlines()
    assert last.startswith("error: "), err
    assert all(line.startswith("warning: ") for line in before), err  # warnings, one line each, may come first
    for text in expected:
        assert text in last
    if "Did you mean: " in last:
        suggested = last.split("Did you mean: ", 1)[1].split("?", 1)[0].split(", ")
        assert len(suggested) == len(set(suggested)), "a suggestion is repeated"


def test_a_real_process_exits_2_with_one_error_line(env: Env) -> None:
    b = env.broken_bundle(_no_model)
    proc = subprocess.run([sys.executable, "-m", "lensforge.cli", "predict", str(b), str(env.image())],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {b} is incomplete: model.onnx is missing or empty"]
    assert proc.stdout == ""


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["predict", "--help"], ["data", "inspect", "--help"]])
def test_help_exits_0(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(argv, capsys)
    assert code == 0
    assert out.startswith("usage: lensforge")
    if argv[0] == "train":
        assert "--max-steps" in out and "--weights" in out


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli([], capsys)
    assert code == 2 and "usage: lensforge" in out


# -- data inspect -----------------------------------------------------------------------------


def test_data_inspect_json_reports_truncated_and_cross_split_duplicates(
    tmp_path: Path, make_image: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            for i in range(3):
                make_image(root / split / cls / f"{i}.png", size=(48, 40))
    shutil.copy(root / "train" / "cat" / "0.png", root / "test" / "cat" / "copy.png")  # leaks into test
    good = (root / "train" / "dog" / "0.png").read_bytes()
    (root / "train" / "dog" / "broken.png").write_bytes(good[: len(good) // 2])  # truncated

    code, out, err = run_cli(["data", "inspect", root, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["format"] == "split-folders" and report["classes"] == ["cat", "dog"]
    assert report["total_images"] == 14
    assert report["unreadable"]["count"] == 1
    assert report["unreadable"]["examples"][0]["path"] == "train/dog/broken.png"
    dup = report["duplicates"]
    assert dup["cross_split_groups"] == 1
    assert {(d["path"], d["split"]) for d in dup["cross_split_examples"][0]} == {
        ("train/cat/0.png", "train"), ("test/cat/copy.png", "test")}
    assert any("leakage" in issue for issue in report["issues"])


# -- predict ----------------------------------------------------------------------------------


def test_predict_json_prints_one_line_per_image(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    folder = env.tmp / "new"
    sources = sorted(env.shapes.glob("*/img_000[1-2].jpg"))
    folder.mkdir()
    for i, src in enumerate(sources):
        shutil.copy(src, folder / f"{i:02d}.jpg")
    (folder / "99-bad.jpg").write_bytes(b"\xff\xd8\xff not really")

    code, out, err = run_cli(["predict", env.bundle, folder, "--json", "--top", "2", "--batch-size", "3"], capsys)
    assert code == 0, err
    docs = [json.loads(line) for line in out.strip().splitlines()]
    assert [Path(d["path"]).name for d in docs] == sorted(p.name for p in folder.iterdir())
    predictor = Predictor(env.bundle)
    for doc in docs[:-1]:
        assert len(doc["top"]) == 2
        scores = predictor.predict(doc["path"]).scores
        np.testing.assert_allclose([doc["scores"][c] for c in predictor.classes], scores, atol=1e-6)
        assert doc["labels"] == [predictor.classes[int(np.argmax(scores))]]
    assert set(docs[-1]) == {"path", "error"}

    code, out, _ = run_cli(["predict", env.bundle, folder / "99-bad.jpg", "--json"], capsys)
    assert code == 1  # nothing could be predicted
    assert "error" in json.loads(out)


def test_predict_json_in_a_real_process(env: Env) -> None:
    proc = subprocess.run([sys.executable, "-m", "lensforge.cli", "predict", str(env.bundle), str(env.shapes / "cross"), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(docs) == 10 and all(d["labels"] and d["path"].endswith(".jpg") for d in docs)


# -- evaluate ---------------------------------------------------------------------------------


def test_evaluate_json_accuracy_matches_predictions_csv(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = env.tmp / "eval"
    code, out, err = run_cli(["evaluate", env.bundle, env.shapes, "--json", "--out", out_dir], capsys)
    assert code == 0, err
    metrics = json.loads(out)
    with (out_dir / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["n"] > 0
    assert all(int(r["correct"]) == (r["true"] == r["predicted"]) for r in rows)
    assert metrics["accuracy"] == pytest.approx(np.mean([int(r["correct"]) for r in rows]))
    assert json.loads((out_dir / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    saved_test = json.loads((env.bundle / "split.json").read_text())["splits"]["test"]
    assert sorted(Path(r["path"]).relative_to(env.shapes).as_posix() for r in rows) == sorted(saved_test)


# -- train --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_skips_unreadable_images_with_a_warning(
    tmp_path: Path, shapes_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    for cls_dir in sorted(p for p in shapes_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(cls_dir.glob("*.jpg"))
        for split, part in (("train", images[:6]), ("val", images[6:8]), ("test", images[8:])):
            (root / split / cls_dir.name).mkdir(parents=True)
            for src in part:
                shutil.copy(src, root / split / cls_dir.name / src.name)
    (root / "train" / "circle" / "truncated.jpg").write_bytes(images[0].read_bytes()[:250])
    (root / "val" / "square" / "garbage.jpg").write_bytes(b"GIF89a but not really" * 4)

    code, out, err = run_cli(["train", root, "--out", tmp_path / "run", *TRAIN_OPTS], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    assert "warning: skipped 2 unreadable image(s)" in err
    assert any(line.split()[:3] == ["skipped", "images", "2"] for line in out.splitlines()), out
    assert (tmp_path / "run" / "bundle" / "model.onnx").is_file()


def test_a_backbone_typo_leaves_no_run_directory(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.tmp / "run"
    code, _, _ = run_cli(["train", env.shapes, "--out", out, "--backbone", "efficentnet_lite0", *TRAIN_OPTS], capsys)
    assert code == 2
    assert not out.exists()


def test_markup_like_text_in_errors_is_printed_as_is(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    """Paths are user text: rich must not read "[/x]" or "[train]" as markup (that used to
    raise MarkupError, or drop the text)."""
    weird = env.tmp / "data[/x]" / "[train]"
    code, _, err = run_cli(["data", "inspect", weird], capsys)
    assert code == 2
    assert "data[/x]" in err and "[train]" in err and "Traceback" not in err


def test_overwrite_refuses_a_directory_that_is_not_a_run(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    precious = env.tmp / "documents"
    (precious / "thesis.txt").parent.mkdir(parents=True)
    (precious / "thesis.txt").write_text("years of work")
    code, _, err = run_cli(["train", env.shapes, "--out", precious, "--overwrite", *TRAIN_OPTS], capsys)
    assert code == 2 and "not a lensforge run directory" in err
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_a_failed_overwrite_puts_the_previous_run_back(
    env: Env, capsys: pytest.CaptureFixture[str], make_image: Callable[..., Path]
) -> None:
    out = env.tmp / "run"
    assert run_cli(["train", env.shapes, "--out", out, *TRAIN_OPTS], capsys)[0] == 0
    before = (out / "bundle" / "lensforge.json").read_text()
    # same run, now with data that has a single class: fails after the old run was moved aside
    one_class = _folders(env.tmp / "one", {"only": 3}, make_image)
    code, _, err = run_cli(["train", one_class, "--out", out, "--overwrite", *TRAIN_OPTS], capsys)
    assert code == 2
    assert (out / "bundle" / "lensforge.json").read_text() == before
    assert not list(env.tmp.glob(".run.previous-*"))


def test_a_command_missing_its_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from lensforge.cli import commands

    def needs_torch(_args: object) -> int:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(commands, "cmd_evaluate", needs_torch)
    code, _, err = run_cli(["evaluate", "b", "d"], capsys)
    assert code == 2 and "pip install 'lensforge[train]'" in err and "torch" in err


@pytest.mark.parametrize("argv", [["predict", "b", "x", "--top", "0"], ["train", "d", "--epochs", "-1"]])
def test_counts_must_be_positive(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "must be at least 1" in err


def test_evaluate_split_on_unrelated_data_is_refused(
    env: Env, capsys: pytest.CaptureFixture[str], make_image: Callable[..., Path]
) -> None:
    other = _folders(env.tmp / "other", {"circle": 2, "square": 2}, make_image)
    code, _, err = run_cli(["evaluate", env.bundle, other, "--split", "test"], capsys)
    assert code == 2 and "no 'test' split" in err
    code, out, _ = run_cli(["evaluate", env.bundle, other, "--json", "--out", env.tmp / "ev"], capsys)
    assert code == 0 and json.loads(out)["n"] == 4  # without --split: every image


@pytest.mark.parametrize(
    ("target", "made"),
    [("onnx-fp16", "model.onnx"), ("triton", "config.pbtxt"), ("torchserve", ".mar")],
)
def test_export_targets_from_the_cli(env: Env, capsys: pytest.CaptureFixture[str], target: str, made: str) -> None:
    out = env.tmp / f"export-{target}"
    code, stdout, err = run_cli(["export", env.bundle, "--to", target, "--out", out], capsys)
    assert code == 0, err
    assert any(p.name.endswith(made) for p in out.rglob("*")), sorted(out.rglob("*"))
    assert "Written:" in stdout
    again = run_cli(["export", env.bundle, "--to", target, "--out", out], capsys)
    assert again[0] == 2 and "already exists" in again[2]  # never silently replaced
    assert run_cli(["export", env.bundle, "--to", target, "--out", out, "--overwrite"], capsys)[0] == 0


def test_export_int8_guard_from_the_cli(env: Env, capsys: pytest.CaptureFixture[str], make_image: Callable[..., Path]) -> None:
    """The shapes bundle is barely trained: any accuracy change fails a negative --max-drop,
    so the guard must refuse and write nothing."""
    calib = env.tmp / "calib"
    make_image(calib / "black.png", size=(64, 64))
    out = env.tmp / "int8"
    code, _, err = run_cli(["export", env.bundle, "--to", "onnx-int8", "--out", out, "--calib-dir", calib,
                            "--max-drop", "-100"], capsys)
    assert code == 2 and "--max-drop" in err and "--force" in err
    assert not out.exists()


def test_export_needs_a_bundle(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["export", env.tmp / "nothing", "--to", "triton"], capsys)
    assert code == 2 and "bundle not found" in err


def test_predict_with_an_unavailable_provider_says_what_is_available(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["predict", env.bundle, env.image(), "--provider", "cuda"], capsys)
    assert code == 2 and "CPUExecutionProvider" in err and "onnxruntime-gpu" in err
    code, out, _ = run_cli(["predict", env.bundle, env.image(), "--provider", "cuda", "--fallback", "--json"], capsys)
    assert code == 0 and json.loads(out.splitlines()[0])["labels"]


def test_export_all_writes_every_target_and_a_parity_table(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.tmp / "all"
    code, stdout, err = run_cli(["export", env.bundle, "--to", "all", "--out", out, "--force", "--max-drop", "100"], capsys)
    assert code == 0, err
    parity = json.loads((out / "parity.json").read_text())
    targets = {row["target"] for row in parity["rows"]}
    assert {"onnx fp32", "fp16", "int8", "triton", "torchserve"} <= targets
    assert "triton" in stdout


def test_bench_json(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["bench", env.bundle, "--batch-sizes", "1,2", "--threads", "1", "--seconds", "0.05",
                              "--no-torch", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert {(r["batch"], r["mode"]) for r in report["rows"]} == {(1, "model"), (1, "e2e"), (2, "model"), (2, "e2e")}
    assert all(r["img_s"] > 0 for r in report["rows"]) and report["recommendation"]


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "b", "--max-body-mb", "inf"],
        ["serve", "b", "--timeout", "nan"],
        ["serve", "b", "--max-wait-ms", "0"],
        ["bench", "b", "--seconds", "-1"],
        ["export", "b", "--to", "onnx-int8", "--max-drop", "nan"],
    ],
)
def test_float_options_must_be_finite(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "must be" in err and "Traceback" not in err


def test_bench_accepts_the_current_directory_as_bundle(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(env.bundle)
    code, out, err = run_cli(["bench", ".", "--batch-sizes", "1", "--threads", "1", "--seconds", "0.02",
                              "--no-torch", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["rows"]


# -- the parser: train's options come from TrainConfig -----------------------------------------

# every option `lensforge train --help` listed before the options were generated (issue 11)
TRAIN_OPTIONS_BEFORE = [
    "--config", "--task {classify,multilabel,detect}", "--format {folders,split-folders,csv,coco,roboflow-coco,yolo}",
    "--out", "--backbone", "--weights", "--no-pretrained", "--head {linear,mlp}", "--probe", "--image-size",
    "--epochs", "--batch-size", "--lr", "--label-smoothing", "--beta", "--split", "--seed", "--patience",
    "--workers", "--precision {auto,32,bf16}", "--max-steps", "--overwrite", "--resume", "--allow-outside-root",
]


def _train_help(capsys: pytest.CaptureFixture[str]) -> str:
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0
    return " ".join(out.split())  # argparse wraps at the terminal width


@pytest.mark.parametrize("option", TRAIN_OPTIONS_BEFORE)
def test_train_help_lists_every_option_it_always_had(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert f" {option}" in _train_help(capsys)


def test_train_help_shows_the_task_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    text = _train_help(capsys)
    assert "(default: 224 for classifiers, 512 for detectors)" in text
    assert "(default: 32 for classifiers, 4 for detectors)" in text
    assert "(default: 1.0 for classifiers, 2.0 for detectors)" in text  # beta
    assert "maximum epochs (default: 10)" in text


def test_every_train_option_sets_its_config_field(tmp_path: Path) -> None:
    from lensforge.cli import build_parser
    from lensforge.cli.commands import train_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data: elsewhere\nepochs: 3\nhead: mlp\npretrained: false\nseed: 9\n")
    args = build_parser().parse_args([
        "train", "photos", "--config", str(cfg_file), "--task", "detect", "--image-size", "64", "--probe",
        "--lr", "0.01", "--weight-decay", "0.1", "--split", "0.3", "--max-steps", "-1", "--probe-c", "2",
        "--allow-outside-root", "--overwrite",
    ])
    cfg = train_config(args)
    assert (cfg.data, cfg.task, cfg.image_size, cfg.probe, cfg.lr, cfg.weight_decay) == ("photos", "detect", 64, True, 0.01, 0.1)
    assert (cfg.test_fraction, cfg.val_fraction, cfg.max_steps, cfg.probe_c) == (0.3, 0.2, -1, 2.0)
    assert cfg.allow_outside_root and cfg.overwrite and not cfg.resume
    # options not given leave the file's values alone
    assert (cfg.epochs, cfg.head, cfg.pretrained, cfg.seed) == (3, "mlp", False, 9)
    assert train_config(build_parser().parse_args(["train", "d", "--no-pretrained"])).pretrained is False
    assert train_config(build_parser().parse_args(["train", "d"])).pretrained is True


# -- rendering ---------------------------------------------------------------------------------


def _done_table(metrics: dict[str, object]) -> str:
    from types import SimpleNamespace

    from rich.console import Console

    from lensforge.cli.render import print_summary

    result = SimpleNamespace(bundle_dir=Path("b"), run_dir=Path("r"), parity=1e-6, metrics=metrics, skipped_images=0,
                             seconds=3.0, history=[])
    console = Console(record=True, width=200, color_system=None)
    print_summary(result, console)  # type: ignore[arg-type]
    return console.export_text()


def test_the_summary_shows_each_splits_typed_headline_first() -> None:
    from dataclasses import fields

    from lensforge.metrics.classification import multilabel_metrics, single_label_metrics
    from lensforge.metrics.detection import DetectionMetrics

    y = np.array([[1, 0], [0, 1], [1, 1]])
    multi = multilabel_metrics(y, np.array([[0.9, 0.2], [0.1, 0.8], [0.7, 0.6]]), np.array([0.5, 0.5]), ["a", "b"])
    single = single_label_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"])
    det = DetectionMetrics(**{**{f.name: None for f in fields(DetectionMetrics)}, "n": 2, "map": 0.25, "map50": 0.5})
    text = _done_table({"val": multi, "test": det, "train": single})
    lines = {line.split(" metrics")[0].strip(): line for line in text.splitlines() if " metrics " in line}
    assert lines["val"].split()[2:4] == ["mAP", "1.000"] and " map " not in lines["val"]
    assert lines["test"].split()[2:6] == ["map", "0.250", "map50", "0.500"] and "mAP" not in lines["test"]
    assert "(2 images, the bundle's ONNX model, ONNX Runtime)" in lines["test"]  # which images and runtime
    assert lines["train"].split()[2:4] == ["accuracy", "1.000"]


def test_library_modules_leave_the_console_to_the_cli() -> None:
    # results are typed, rendering is the CLI's: no rich outside lensforge.cli (and the demo, which prints through it)
    import re

    import lensforge

    root = Path(lensforge.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.parts[len(root.parts)] not in ("cli", "demo.py")
                 and re.search(r"^\s*(from|import) rich\b", p.read_text(), re.MULTILINE)]
    assert offenders == []


# -- issue 12: evaluate's advice, bench's export places, the README's examples.png ------------


def test_evaluate_a_classifier_on_detection_data_suggests_what_evaluate_can_do(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    from lensforge.data.demo import make_demo_detection

    data = make_demo_detection(env.tmp / "boxes", n_train=2, n_val=1, n_test=1, size=64, max_objects=1)
    code, _, err = run_cli(["evaluate", env.bundle, data, "--out", env.tmp / "ev"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "is a detection dataset (roboflow-coco: boxes)" in err and "is a classify model" in err
    assert "evaluate a detector bundle on it" in err
    assert "task" not in err.replace("classify model", "")  # evaluate has no --task to suggest


def test_evaluate_a_detector_on_class_folders_is_refused_with_what_to_do(env: Env) -> None:
    from lensforge.cli.commands import check_data_fits
    from lensforge.errors import DataError
    from lensforge.runtime.bundle import Bundle

    with pytest.raises(DataError, match="is a detector but .* is folders data without boxes: evaluate it on COCO"):
        check_data_fits(Bundle(env.tmp / "det", {"task": "detect"}), str(env.shapes))
    check_data_fits(Bundle(env.tmp / "cls", {"task": "classify"}), str(env.shapes))  # fits: nothing said


def test_bench_looks_everywhere_export_writes(tmp_path: Path) -> None:
    from lensforge.cli.commands import default_export_dir
    from lensforge.export.bench import export_places

    bundle = tmp_path / "run" / "bundle"
    written = [default_export_dir(bundle, "onnx-fp16"), default_export_dir(bundle, "onnx-int8"),
               *(default_export_dir(bundle, "all") / p for p in ("fp16", "int8"))]  # export_all's sub-folders
    assert sorted(written) == sorted(export_places(bundle))


def test_examples_png_shows_the_evaluated_split_as_the_readme_says(
    detect_bundle: Path, detect_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lensforge.metrics import detection_plots

    drawn: list[Path] = []
    real = detection_plots.plot_detection_grid

    def spy(records: list, *args: object, **kwargs: object) -> Path:
        drawn.extend(Path(r.path) for r in records)
        return real(records, *args, **kwargs)

    monkeypatch.setattr(detection_plots, "plot_detection_grid", spy)
    code, _, err = run_cli(["evaluate", detect_bundle, detect_dir, "--out", tmp_path / "ev", "--json"], capsys)
    assert code == 0, err
    assert drawn and {p.parent.name for p in drawn} == {"test"}  # the test split, not validation
    assert (tmp_path / "ev" / "examples.png").is_file()
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert "`examples.png`: up to 8 of the evaluated images (the test split" in readme
    assert "grid of validation images" not in readme


# -- train where nobody watches a terminal; Ctrl-C then --finish --------------------------------


@pytest.mark.slow
def test_train_logs_progress_lines_unless_quiet(tmp_path: Path, shapes_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # capsys: stdout is not a terminal, as in `lensforge train DATA > train.log`; 2 steps of 8 images
    opts = ["--no-pretrained", "--image-size", "64", "--epochs", "1", "--max-steps", "2", "--batch-size", "8"]
    code, out, err = run_cli(["train", shapes_dir, "--out", tmp_path / "run", *opts], capsys)
    assert code == 0, err
    lines = [line.strip() for line in out.splitlines()]
    progress = [line for line in lines if line.startswith("epoch 1/1  8/16 img (50%)  ")]
    assert len(progress) == 1 and " img/s  ETA " in progress[0], out
    assert sum(line.startswith("epoch 1/1  train_loss ") and " img/s" in line for line in lines) == 1, out

    code, out, err = run_cli(["train", shapes_dir, "--out", tmp_path / "run", "--overwrite", "--quiet", *opts], capsys)
    assert code == 0, err
    assert "epoch" not in out and "›" not in out, out  # no progress, no stages, no epoch rows
    assert out.lstrip().startswith("Done") and "bundle" in out  # the final summary
    assert all(line.startswith("warning: ") for line in err.splitlines()), err


def test_train_threads_quiet_and_verbose_options() -> None:
    from lensforge.cli import build_parser
    from lensforge.cli.commands import train_config

    args = build_parser().parse_args(["train", "d", "--threads", "3", "-q"])
    assert train_config(args).threads == 3 and args.quiet and not args.verbose
    assert train_config(build_parser().parse_args(["train", "d"])).threads is None  # every core
    assert build_parser().parse_args(["-v", "train", "d"]).verbose  # the global flag is not reset by train's
    assert build_parser().parse_args(["train", "d", "--verbose"]).verbose
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "d", "--threads", "0"])


@pytest.mark.slow
def test_ctrl_c_offers_finish_and_finish_writes_a_bundle(
    tmp_path: Path, shapes_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib

    from lensforge.cli.console import ConsoleReporter

    track = ConsoleReporter.track

    @contextlib.contextmanager
    def ctrl_c_in_epoch_2(self: ConsoleReporter, description: str, total: int, **kwargs: object) -> object:
        with track(self, description, total, **kwargs) as advance:
            if not description.startswith("epoch 2/"):
                yield advance
                return

            def press(n: int = 1) -> None:
                raise KeyboardInterrupt

            yield press

    monkeypatch.setattr(ConsoleReporter, "track", ctrl_c_in_epoch_2)
    run = tmp_path / "run"
    opts = ["--no-pretrained", "--image-size", "64", "--epochs", "3", "--batch-size", "8"]
    code, _, err = run_cli(["train", shapes_dir, "--out", run, *opts], capsys)
    assert code == 130, err
    assert err.strip().splitlines()[-1].endswith(f"lensforge train {shapes_dir} --out {run} --finish"), err
    monkeypatch.undo()

    code, out, err = run_cli(["train", shapes_dir, "--out", run, "--finish"], capsys)
    assert code == 0, err
    assert "Writing the bundle from the best checkpoint (epoch 1) of 1 finished epoch(s)" in out
    meta = json.loads((run / "bundle" / "lensforge.json").read_text())
    assert meta["input"]["size"] == 64 and set(meta["metrics"]) == {"val", "test"}  # the run's settings, scored
    assert Predictor(run / "bundle").predict(str(shapes_dir / "circle" / "img_0001.jpg")).scores.shape == (4,)
