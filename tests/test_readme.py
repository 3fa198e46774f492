"""The README's promises, run: its first commands are ``make demo`` and ``make test``, CI runs
exactly ``make test``, and the demo behind ``make demo`` trains a model that passes its goal."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def _commands(script: str) -> list[str]:
    """Shell lines without comments, blank lines, the shebang and `set`/`cd` preambles."""
    out = []
    for line in script.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith(("set ", "cd ")):
            out.append(line)
    return out


def test_readme_opens_with_the_two_commands() -> None:
    blocks = _fenced_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README has no fenced code block"
    assert _commands(blocks[0]) == ["make demo", "make test"]


def test_ci_runs_exactly_make_test() -> None:
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    assert _commands(ci.read_text()) == ["make test"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize(("target", "runs"), [("demo", r"lensforge demo$"), ("test", r"python\S* -m pytest$")])
def test_make_targets_run_what_the_readme_says(target: str, runs: str) -> None:
    # run as a user would, even when this suite itself runs under `make test` (CI): a nested
    # make would otherwise add "make[1]: Leaving directory" lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    proc = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.search(runs, proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_demo_passes(tmp_path: Path) -> None:
    # What `make demo` runs once the environment exists (about a minute on 2 idle cores).
    proc = subprocess.run(
        [sys.executable, "-m", "lensforge.cli", "demo", "--dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert re.search(r"^PASS test \S+ [0-9.]+ \(goal", proc.stdout, flags=re.MULTILINE), proc.stdout[-2000:]
    assert (tmp_path / "demo" / "run" / "bundle" / "model.onnx").is_file()
