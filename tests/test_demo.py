"""The demo end to end in its reduced size: every stage runs, the outputs exist and parse, a re-run resumes."""

from __future__ import annotations

import csv
import json

from tests.conftest import invoke


def test_demo_small_end_to_end(tmp_path, runner):
    out = tmp_path / "demo"
    r = invoke(runner, ["demo", "--small", "--out", out, "--quiet"])
    assert r.exit_code == 0, r.output
    for name in ("teacher", "student-ce", "student-forward-kl", "student-reverse-kl-mix"):
        run = out / "runs" / name
        assert (run / "model" / "config.json").exists()
        summary = json.loads((run / "summary.json").read_text())
        ev = json.loads((run / "eval.json").read_text())
        assert summary["steps"] > 0 and ev["dev"]["num_tokens"] > 0
        assert 0.0 <= ev["minimal_pairs"]["macro_accuracy"] <= 1.0
    # distilled students read the one cache; the baseline did not
    assert json.loads((out / "runs" / "student-forward-kl" / "summary.json").read_text())["cache"] == str(out / "cache")
    assert json.loads((out / "runs" / "student-ce" / "summary.json").read_text())["mode"] == "train"
    rows = list(csv.DictReader(open(out / "compare" / "compare.csv")))
    assert [r["run"] for r in rows] == ["teacher", "student-ce", "student-forward-kl", "student-reverse-kl-mix"]
    assert all(r["steps"] and r["wall_s"] for r in rows)
    for png in ("curves.png", "accuracy_by_group.png"):
        assert (out / "compare" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "precompute" in r.output and "teacher" in r.output
    # a second run finds every stage done and only rebuilds the comparison
    r2 = invoke(runner, ["demo", "--small", "--out", out, "--quiet"])
    assert r2.exit_code == 0 and r2.output.count("skipping") >= 8, r2.output
    # options differing from the run in the directory are refused
    r3 = invoke(runner, ["demo", "--out", out, "--quiet"])
    assert r3.exit_code != 0 and "other options" in r3.output
