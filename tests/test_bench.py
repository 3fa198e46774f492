"""Benchmarks cannot rot: every ``bench/[!_]*.py`` runs with ``--smoke`` (its smallest
size) in a fresh interpreter and must exit 0 and print its table.

Each script trains, exports or serves a real model even at its smallest, so they take from
a few seconds to about a minute each on a 2-core machine: marked slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("[!_]*.py"))
# the first column of each known script's table header; a script not listed here (a new one)
# must still print a "# title" line followed by a header row of at least two columns
HEADERS = {
    "coco_eval": "method", "decode": "method", "detect": "detector", "int8": "model", "predictor": "case",
    "probe": "stage", "train_step": "loop", "finetune_defaults": "run", "fuzz_openapi": "operation", "serve_load": "server",
    "ray_predict": "engine",
}


def _table_header(lines: list[str], first_column: str | None) -> str | None:
    """The header row: after the ``#`` header lines, the first row with >= 2 columns that
    starts with ``first_column`` (when known; else the first row after a ``#`` line). Log
    lines of the work a bench does (training's warnings, Lightning's notes) may come between."""
    start = next((i for i, line in enumerate(lines) if line.startswith("#")), None)
    if start is None:
        return None
    for row in lines[start + 1:]:
        if row.startswith("#") or not row.strip():
            continue
        cols = row.split()
        if first_column is None:
            return row if len(cols) >= 2 else None
        if len(cols) >= 2 and cols[0] == first_column:
            return row
    return None


def test_every_bench_script_is_covered() -> None:
    assert len(SCRIPTS) >= 9 and all(p.name != "_timing.py" for p in SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_bench_smoke_runs_and_prints_its_table(script: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "LENSFORGE_CACHE": str(tmp_path / "cache")}
    with out.open("w") as f:  # a file, not a pipe: nothing can block on an undrained buffer
        proc = subprocess.run([sys.executable, str(script), "--smoke"], cwd=BENCH.parent, stdout=f,
                              stderr=subprocess.STDOUT, env=env, timeout=900)
    text = out.read_text(errors="replace")
    assert proc.returncode == 0, f"{script.name} --smoke exited {proc.returncode}:\n{text[-3000:]}"
    header = _table_header(text.splitlines(), HEADERS.get(script.stem))
    assert header is not None, f"{script.name} --smoke printed no table:\n{text[-3000:]}"


def test_table_header_finds_a_header_and_refuses_prose() -> None:
    table = ["noise", "# title", "# machine", "run   test acc  seconds", "lensforge 0.9 1.0"]
    assert _table_header(table, "run") == "run   test acc  seconds"
    assert _table_header(table, None) == "run   test acc  seconds"
    assert _table_header(table, "method") is None
    assert _table_header(["no title", "a b c"], None) is None
    logged = ["# title", "load average 7.5 on 2 core(s): training will be slower", "INFO: GPU available: False",
              "operation   model  mode", "GET /ping  shapes  positive"]
    assert _table_header(logged, "operation") == "operation   model  mode"  # log lines before the table
