"""The closing summary of a conversion, as printed by a real `moeify split` process: the time of the whole
run with its phases, and what a split without --topk keeps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures import make_tiny
from tests.test_split import CALIBRATION, add_char_tokenizer

ROW = re.compile(r"│ (\w+)\s+│ (.*?)\s+│")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return add_char_tokenizer(make_tiny("llama", tmp_path_factory.mktemp("summary") / "src"))


def split(source: Path, out: Path, *options: str) -> tuple[dict[str, str], float]:
    """The summary's rows of a real run, and the run's wall time as its parent saw it."""
    env = os.environ | {"COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "moeify", "split", str(source), "--granularity", "4", *options,
                          "--output", str(out)], env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    assert run.returncode == 0, run.stderr
    return dict(ROW.findall(run.stdout)), wall


def phases(line: str) -> tuple[float, dict[str, float]]:
    """'20.6 s: loading 1.9 s, calibrating 18.0 s' -> (20.6, {'loading': 1.9, 'calibrating': 18.0})."""
    total, spans = line.split(" s: ")
    return float(total), {name: float(s) for name, s in re.findall(r"(\w+) ([\d.]+) s", spans)}


def test_the_time_is_the_whole_run_in_its_phases(source, tmp_path):
    rows, wall = split(source, tmp_path / "top2", "--topk", "2", "--calibration", CALIBRATION,
                       "--calibration-tokens", "512")
    total, spans = phases(rows["time"])
    assert list(spans) == ["loading", "calibrating", "planning", "writing"]
    assert sum(spans.values()) == pytest.approx(total, abs=0.25)  # each rounded to 0.1 s
    # The process's own start counts: only its exit after the summary is missing from the parent's measure.
    assert 0.6 * wall < total <= wall
    assert "active" not in rows  # 2 of 4 pieces per token: compute is saved


def test_split_without_topk_says_every_piece_is_active(source, tmp_path):
    rows, _ = split(source, tmp_path / "all")
    assert rows["experts"] == "4 routed, top-4, 0 shared"
    assert rows["active"] == "every piece: exact, no compute saved (--topk K keeps K per token)"
    assert "calibrating" not in rows["time"]  # nothing needs calibration when every piece is active
