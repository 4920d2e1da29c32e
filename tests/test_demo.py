"""The demo end to end in its reduced size: every stage runs, the outputs exist and parse, a re-run resumes."""

from __future__ import annotations

import csv
import json

from tests.conftest import invoke


def test_demo_small_end_to_end(tmp_path, runner):
    out = tmp_path / "demo"
    r = invoke(runner, ["demo", "--small", "--out", out, "--quiet"])
    assert r.exit_code == 0, r.output
    peers = [out / "cohort" / "peers" / n for n in ("peer-a", "peer-b")]
    for run in [*(out / "runs" / n for n in ("teacher", "student-ce", "student-forward-kl", "student-reverse-kl-mix")),
                *peers]:
        assert (run / "model" / "config.json").exists()
        summary = json.loads((run / "summary.json").read_text())
        ev = json.loads((run / "eval.json").read_text())
        assert summary["steps"] > 0 and ev["dev"]["num_tokens"] > 0
        assert 0.0 <= ev["minimal_pairs"]["macro_accuracy"] <= 1.0
    # the forward-KL student reads the default cache, the reverse-KL student the factored one; the baseline neither
    assert json.loads((out / "runs" / "student-forward-kl" / "summary.json").read_text())["cache"] == str(out / "cache")
    rkl = json.loads((out / "runs" / "student-reverse-kl-mix" / "summary.json").read_text())
    assert rkl["cache"] == str(out / "cache-factored") and rkl["objective"] == "reverse_kl"
    assert json.loads((out / "cache" / "plan.json").read_text())["mode"] != "factored"
    assert json.loads((out / "cache-factored" / "plan.json").read_text())["mode"] == "factored"
    # the cohort: mutual learning with the cached teacher as a fixed peer, ω updated and moved (the teacher's fixed)
    cohort = json.loads((out / "cohort" / "summary.json").read_text())
    assert cohort["mode"] == "mutual" and cohort["members"] == ["peer-a", "peer-b", "teacher"]
    ws = [json.loads(x) for x in (out / "cohort" / "metrics.jsonl").read_text().splitlines()]
    ws = [w["weights"] for w in ws if w["kind"] == "weights"]
    assert len(ws) >= 3 and ws[-1][:2] != ws[0][:2] and ws[-1][2] == ws[0][2]
    assert json.loads((peers[0] / "summary.json").read_text())["mode"] == "mutual"
    assert json.loads((out / "runs" / "student-ce" / "summary.json").read_text())["mode"] == "train"
    rows = list(csv.DictReader(open(out / "compare" / "compare.csv")))
    assert [r["run"] for r in rows] == ["teacher", "student-ce", "student-forward-kl", "student-reverse-kl-mix",
                                        "peer-a", "peer-b"]
    assert all(r["steps"] and r["wall_s"] for r in rows)
    for png in ("curves.png", "accuracy_by_group.png"):
        assert (out / "compare" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "precompute factored" in r.output and "Cohort ω" in r.output and "teacher" in r.output
    # a second run finds every stage done and only rebuilds the comparison
    r2 = invoke(runner, ["demo", "--small", "--out", out, "--quiet"])
    assert r2.exit_code == 0 and r2.output.count("skipping") == 15, r2.output
    # options differing from the run in the directory are refused
    r3 = invoke(runner, ["demo", "--out", out, "--quiet"])
    assert r3.exit_code != 0 and "other options" in r3.output
