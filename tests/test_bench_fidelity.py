"""benchmarks/bench_fidelity.py --quick: the whole benchmark on a tiny slice (skipped without the shared data), and a
clean skip when the data is absent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fidelity.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ))


def test_skips_cleanly_without_data(tmp_path):
    r = _run("--quick", "--data", str(tmp_path / "nothing"), "--results-dir", str(tmp_path / "results"))
    assert r.returncode == 0 and "skipped" in r.stdout and not (tmp_path / "results").exists(), r.stdout + r.stderr


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="shared babylm_like data not present")
def test_quick_run_writes_the_table(tmp_path):
    r = _run("--quick", "--data", str(SHARED_DATA), "--results-dir", str(tmp_path / "results"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (md,) = (tmp_path / "results").glob("fidelity_*.md")
    text = md.read_text()
    for row in ("CE only", "full", "top-k bucket", "top-k renormalize", "sampled", "hybrid"):
        assert f"| {row} |" in text, row
    for note in ("Ragged layout", "Importance-weight variance", "share of full-KD gain"):
        assert note in text, note
