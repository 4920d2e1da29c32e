"""`cachekd compare`: table, CSV and plots from run directories (fabricated here as the trainer writes them)."""

from __future__ import annotations

import csv
import shutil
import json
from pathlib import Path

import pytest

from cachekd.compare import compare_runs
from cachekd.rundir import read_metrics
from cachekd.errors import CachekdError
from tests.test_evaluate import assert_one_clean_error, invoke, make_run, store, stores, tiny_model  # noqa: F401

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


MP = "mp[pairs prefix=eos]"
"""The accuracy column of `_eval_json`'s minimal-pair results."""


def _eval_json(run: Path, dev_loss: float | None, acc: dict[str, float] | None, prefix: str | None = "eos",
               pair_set: str = "pairs") -> None:
    ev: dict = {"model": str(run / "model"), "checkpoint_fingerprint": "x"}
    if dev_loss is not None:
        ev["dev"] = {"loss": dev_loss, "ppl": 2.718281828 ** dev_loss, "num_tokens": 100, "num_windows": 10}
    if acc is not None:
        by_file = {k: {"accuracy": v, "num_pairs": 10, "num_correct": int(10 * v),
                       "group": "syntax" if k.startswith("q") else "morphology"} for k, v in acc.items()}
        groups: dict = {}
        for k, r in by_file.items():
            groups.setdefault(r["group"], []).append(r["accuracy"])
        ev["minimal_pairs"] = {
            "path": f"/data/{pair_set}", "pair_set": pair_set, "prefix": prefix, "files_fingerprint": "f" * 64,
            "macro_accuracy": sum(acc.values()) / len(acc),
            "by_file": by_file,
            "by_group": {g: {"accuracy": sum(v) / len(v), "num_files": len(v)} for g, v in groups.items()},
        }
    (run / "eval.json").write_text(json.dumps(ev))


@pytest.fixture()
def runs(store, tmp_path) -> list[Path]:
    tok = store.load_tokenizer()
    model = tiny_model(store.vocab_size)
    ce = make_run(tmp_path / "runs", "ce", model, tok, steps=30)
    kd = make_run(tmp_path / "runs", "kd-forward", model, tok, mode="distill", objective="forward_kl", steps=30,
                  loss0=4.0)
    live = make_run(tmp_path / "runs", "live", model, tok, steps=12, final=False)
    _eval_json(ce, 3.0, {"agreement": 0.6, "question": 0.7})
    _eval_json(kd, None, {"agreement": 0.8, "question": 0.5})
    return [ce, kd, live]


def test_compare_writes_parseable_md_csv_png(runs, tmp_path):
    out = tmp_path / "cmp"
    r = compare_runs(runs, out)
    files = r["files"]
    assert set(files) == {"markdown", "csv", "curves", "accuracy_by_group", "accuracy_by_file"}
    for key in ("curves", "accuracy_by_group", "accuracy_by_file"):
        data = Path(files[key]).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000

    with open(files["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["run"] for row in rows] == ["ce", "kd-forward", "live"]
    ce, kd, live = rows
    assert (ce["mode"], ce["objective"], ce["steps"], ce["tokens"]) == ("train", "ce", "30", str(30 * 512))
    assert float(ce["dev_loss"]) == 3.0 and ce["dev_from"] == "eval"  # eval.json wins over the trainer's number
    assert float(ce["dev_ppl"]) == pytest.approx(2.718281828 ** 3, rel=1e-6)
    assert kd["dev_from"] == "trainer" and float(kd["dev_loss"]) == pytest.approx(4.0 * 0.97 ** 30 + 0.1)
    assert float(kd[MP]) == pytest.approx(0.65) and float(kd["acc[pairs prefix=eos]:morphology"]) == pytest.approx(0.8)
    assert live["mode"] == "(unfinished)" and live["steps"] == "12" and live[MP] == ""
    assert [row["state"] for row in compare_runs(runs, tmp_path / "cmp_state")["rows"]] == ["complete", "complete",
                                                                                          "unfinished"]
    assert float(live["dev_loss"]) == pytest.approx(5.0 * 0.97 ** 10 + 0.1)  # its last dev line
    assert r["columns"][-3:] == [MP, "acc[pairs prefix=eos]:morphology", "acc[pairs prefix=eos]:syntax"]

    md = Path(files["markdown"]).read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == r["columns"]
    assert all(len(line.strip("|").split("|")) == len(header) for line in table)
    assert "curves.png" in md and "accuracy_by_group.png" in md and "unfinished" in md and "running" not in md
    assert "accuracy_by_file.png" in md and "prefix" in md
    assert r["replaced"] == []


def test_compare_tells_running_from_unfinished(runs, tmp_path):
    """A run without a summary is "(running)" only while the process named in its running.json lives."""
    import os
    import socket
    import subprocess
    import sys

    live = runs[2]
    (live / "running.json").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    r = compare_runs([live], tmp_path / "cmp")
    assert r["rows"][0]["mode"] == "(running)"
    assert "(running: no summary.json yet)" in Path(r["files"]["markdown"]).read_text()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    (live / "running.json").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert compare_runs([live], tmp_path / "cmp")["rows"][0]["mode"] == "(unfinished)"  # crashed or killed
    # another machine: running while its metrics keep changing
    (live / "running.json").write_text(json.dumps({"pid": 1, "host": "elsewhere-" + socket.gethostname()}))
    assert compare_runs([live], tmp_path / "cmp")["rows"][0]["mode"] == "(running)"
    old = (live / "metrics.jsonl").stat().st_mtime - 3600
    os.utime(live / "metrics.jsonl", (old, old))
    assert compare_runs([live], tmp_path / "cmp")["rows"][0]["mode"] == "(unfinished)"
    # a finished run is never either
    assert compare_runs([runs[0]], tmp_path / "cmp")["rows"][0]["mode"] == "train"


def test_compare_dev_loss_only_from_the_whole_dev_split(runs, tmp_path):
    ce, _, live = runs
    ev = json.loads((ce / "eval.json").read_text())
    part = {"split": "dev", "loss": 9.0, "num_windows": 50, "max_windows": 50, "complete": False}
    train = {"split": "train", "loss": 8.0, "num_windows": 50, "max_windows": 50, "complete": False}
    ev["losses"] = {"dev:first50": part, "train:first50": train}
    del ev["dev"]
    (ce / "eval.json").write_text(json.dumps(ev))
    row = compare_runs([ce], tmp_path / "cmp")["rows"][0]
    assert row["dev_from"] == "trainer" and row["dev_loss"] == pytest.approx(5.0 * 0.97 ** 30 + 0.1)
    (ce / "summary.json").unlink()
    (ce / "metrics.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in read_metrics(live / "metrics.jsonl") if x["kind"] == "train"))
    row = compare_runs([ce], tmp_path / "cmp")["rows"][0]
    assert row["dev_from"] == "eval:first50" and row["dev_loss"] == 9.0  # labelled, and never the train split's 8.0
    md = Path(compare_runs([ce], tmp_path / "cmp")["files"]["markdown"]).read_text()
    assert "`eval:firstN`" in md


def test_compare_without_eval_has_no_accuracy_plot(runs, tmp_path):
    for run in runs:
        (run / "eval.json").unlink(missing_ok=True)
    r = compare_runs(runs[:2], tmp_path / "cmp")
    assert r["files"]["accuracy_by_group"] is None and r["files"]["accuracy_by_file"] is None
    assert not (tmp_path / "cmp" / "accuracy_by_group.png").exists()
    assert Path(r["files"]["curves"]).read_bytes()[:8] == PNG_MAGIC
    assert all(not c.startswith(("acc", "mp")) for c in r["columns"])


def test_compare_bad_runs(runs, tmp_path):
    with pytest.raises(CachekdError, match="nope"):
        compare_runs([runs[0], tmp_path / "nope"], tmp_path / "cmp")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CachekdError, match="is not a run directory"):
        compare_runs([empty], tmp_path / "cmp")
    # a line cut off at the end (a run writing now) is skipped; a damaged line in the middle is an error
    metrics = runs[2] / "metrics.jsonl"
    n = len(read_metrics(metrics))
    metrics.write_text(metrics.read_text() + '{"kind": "train", "st')
    assert len(read_metrics(metrics)) == n
    lines = metrics.read_text().splitlines()
    lines[3] = "{broken"
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(CachekdError, match="line 4"):
        compare_runs([runs[2]], tmp_path / "cmp")


def test_cli_compare(runs, tmp_path):
    out = tmp_path / "cmp"
    res = invoke("compare", *runs, "--out", out)
    assert res.exit_code == 0, res.output
    assert "kd-forward" in res.output and str(out / "compare.md") in res.output
    assert (out / "compare.csv").exists() and (out / "curves.png").exists()
    assert "Replaced" not in res.output
    res = invoke("compare", *runs[:2], "--out", out, "--json")
    assert res.exit_code == 0
    assert [row["run"] for row in json.loads(res.stdout)["rows"]] == ["ce", "kd-forward"]
    assert set(json.loads(res.stdout)["replaced"]) == {"compare.md", "compare.csv", "curves.png",
                                                      "accuracy_by_group.png", "accuracy_by_file.png"}
    res = invoke("compare", *runs[:2], "--out", out)
    assert res.exit_code == 0 and f"Replaced the earlier comparison in {out} (compare.md" in res.output
    res = invoke("compare", runs[0], tmp_path / "missing-run")
    assert_one_clean_error(res, "missing-run", "does not exist")
    # default output directory: next to the runs
    res = invoke("compare", *runs[:2])
    assert res.exit_code == 0 and (runs[0].parent / "compare" / "compare.md").exists()


def test_eval_then_compare_end_to_end(store, tmp_path):
    """The real `cachekd eval` writes eval.json; `cachekd compare` picks it up."""
    tok = store.load_tokenizer()
    run = make_run(tmp_path / "runs", "student", tiny_model(store.vocab_size, seed=1), tok)
    from cachekd.demo import data as demo_data

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for uid, recs in demo_data.generate_minimal_pairs(3).items():
        (pairs / f"{uid}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    res = invoke("eval", run, "--dev", store.path, "--minimal-pairs", pairs, "--quiet")  # the whole dev split
    assert res.exit_code == 0, res.output
    r = compare_runs([run], tmp_path / "cmp")
    row = r["rows"][0]
    ev = json.loads((run / "eval.json").read_text())
    assert row["dev_from"] == "eval" and row["dev_loss"] == pytest.approx(ev["dev"]["loss"])
    (key,) = ev["minimal_pairs_results"]
    assert key == ev["minimal_pairs"]["key"] and key.startswith("pairs#") and key.endswith(" prefix=eos")
    assert row["mp[pairs prefix=eos]"] == pytest.approx(ev["minimal_pairs"]["macro_accuracy"])
    assert {"acc[pairs prefix=eos]:morphology", "acc[pairs prefix=eos]:syntax"} <= set(r["columns"])
    assert Path(r["files"]["accuracy_by_group"]).read_bytes()[:8] == PNG_MAGIC


def test_runs_are_labelled_by_their_directory(store, tmp_path):
    """Two runs made from one preset keep its name in summary.json; compare tells them apart by directory, the
    same way in every comparison, and by parent/directory when the directory names collide."""
    model, tok = tiny_model(store.vocab_size), store.load_tokenizer()
    a = make_run(tmp_path / "x", "student-fkl", model, tok, steps=3)
    b = make_run(tmp_path / "x", "student-rkl", model, tok, steps=3)
    c = make_run(tmp_path / "y", "student-fkl", model, tok, steps=3)
    for run in (a, b, c):
        s = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps(s | {"name": "tiny-forward-kl"}))
    rows = compare_runs([a, b], tmp_path / "cmp1")["rows"]
    assert [r["run"] for r in rows] == ["student-fkl", "student-rkl"]
    rows = compare_runs([a], tmp_path / "cmp2")["rows"]
    assert [r["run"] for r in rows] == ["student-fkl"]
    rows = compare_runs([a, c], tmp_path / "cmp3")["rows"]
    assert [r["run"] for r in rows] == ["x/student-fkl", "y/student-fkl"]
    # relative paths, a collision among three runs, and one run given twice
    import os

    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "x")
        rows = compare_runs(["student-fkl", "student-rkl", "../y/student-fkl", "./student-fkl"], tmp_path / "cmp4")["rows"]
    finally:
        os.chdir(cwd)
    assert [r["run"] for r in rows] == ["x/student-fkl", "student-rkl", "y/student-fkl"]


def _png_size(path: str | Path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_compare_never_mixes_prefix_conventions(runs, tmp_path):
    """Runs scored with another prefix (or without a recorded one) get their own columns, never a shared one."""
    ce, kd, _ = runs
    _eval_json(kd, None, {"agreement": 0.8, "question": 0.5}, prefix="bos")
    r = compare_runs([ce, kd], tmp_path / "cmp")
    ce_row, kd_row = r["rows"]
    assert ce_row["mp[pairs prefix=eos]"] == pytest.approx(0.65) and "mp[pairs prefix=bos]" not in ce_row
    assert kd_row["mp[pairs prefix=bos]"] == pytest.approx(0.65) and "mp[pairs prefix=eos]" not in kd_row
    assert {"mp[pairs prefix=eos]", "mp[pairs prefix=bos]"} <= set(r["columns"])
    with open(r["files"]["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["mp[pairs prefix=bos]"] == "" and rows[1]["mp[pairs prefix=eos]"] == ""
    # an eval.json from before the prefix was recorded is not taken for either convention
    ev = json.loads((kd / "eval.json").read_text())
    for k in ("prefix", "pair_set", "files_fingerprint"):
        del ev["minimal_pairs"][k]
    (kd / "eval.json").write_text(json.dumps(ev))
    cols = compare_runs([ce, kd], tmp_path / "cmp")["columns"]
    assert "mp[pairs prefix=unrecorded]" in cols and "mp[pairs prefix=eos]" in cols


def test_accuracy_plots_are_readable_with_many_files_and_mark_the_teacher(runs, tmp_path):
    """67 phenomena (BLiMP) x 3 runs: each figure stays ≤ 2000 px wide; the teacher of a distilled run is found."""
    ce, kd, live = runs
    names = [f"phenomenon_number_{i:02d}_with_a_long_name" for i in range(67)]
    for j, run in enumerate(runs):
        _eval_json(run, None, {n: ((i * 7 + j * 13) % 50) / 50 + 0.25 for i, n in enumerate(names)})
    s = json.loads((kd / "summary.json").read_text())
    s["online_teachers"] = [{"name": "ce", "path": str(ce / "model"), "fingerprint": "other"}]
    (kd / "summary.json").write_text(json.dumps(s))
    r = compare_runs(runs, tmp_path / "cmp")
    assert r["teachers"] == ["ce"]
    assert "- ce: " in (md := Path(r["files"]["markdown"]).read_text()) and "(teacher)" in md
    for key in ("accuracy_by_group", "accuracy_by_file"):
        width, height = _png_size(r["files"][key])
        assert 600 <= width <= 2000, (key, width)
    assert _png_size(r["files"]["accuracy_by_file"])[1] >= 67 * 15  # a readable row per phenomenon
    few = compare_runs([kd], tmp_path / "few")
    assert few["teachers"] == [] and all(_png_size(few["files"][k])[0] <= 2000
                                         for k in ("accuracy_by_group", "accuracy_by_file"))


def test_the_teacher_is_found_through_the_cache_manifest(store, tmp_path):
    """A distilled run names its cache; the cache's manifest names the teacher's checkpoint: that run is the teacher."""
    tok = store.load_tokenizer()
    teacher = make_run(tmp_path / "runs", "teacher", tiny_model(store.vocab_size, seed=3), tok, steps=3)
    student = make_run(tmp_path / "runs", "student", tiny_model(store.vocab_size), tok, mode="distill",
                       objective="forward_kl", steps=3)
    other = make_run(tmp_path / "runs", "other", tiny_model(store.vocab_size, seed=4), tok, steps=3)
    cache = tmp_path / "cache"
    res = invoke("precompute", "--store", store.path, "--teacher", teacher, "-o", cache, "--top-k", 4, "--splits",
                 "dev", "--quiet")
    assert res.exit_code == 0, res.output
    s = json.loads((student / "summary.json").read_text())
    (student / "summary.json").write_text(json.dumps(s | {"cache": str(cache), "teachers": ["teacher"]}))
    assert compare_runs([other, teacher, student], tmp_path / "cmp")["teachers"] == ["teacher"]
    shutil.rmtree(cache)  # a cache that is gone: no teacher is marked, and nothing fails
    assert compare_runs([other, teacher, student], tmp_path / "cmp")["teachers"] == []


def test_trainer_dev_sample_is_labelled_and_the_plot_shows_the_whole_split(runs, tmp_path):
    """A run whose trainer scored its dev sample: the table says `trainer:sampleN`, the curves' legend says
    "sample of N", and eval.json's whole-split value is drawn (a star at the run's last step) where it exists,
    so the plot and the table rank runs by the same number."""
    from cachekd.compare import curves_figure, load_run

    ce, kd, live = runs
    for run in (ce, kd):  # what the trainer writes now: the sample under its own key
        metrics = run / "metrics.jsonl"
        lines = [json.loads(x) for x in metrics.read_text().splitlines()]
        for x in lines:
            if x["kind"] == "dev":
                x["dev_loss_sample"], x["dev_sample_windows"] = x.pop("dev_loss"), 64
        metrics.write_text("".join(json.dumps(x) + "\n" for x in lines))
        s = json.loads((run / "summary.json").read_text())
        s["final_dev_loss_sample"], s["dev_sample_windows"] = s.pop("final_dev_loss"), 64
        (run / "summary.json").write_text(json.dumps(s))
    r = compare_runs(runs, tmp_path / "cmp")
    rows = {row["run"]: row for row in r["rows"]}
    assert rows["ce"]["dev_from"] == "eval" and rows["ce"]["dev_loss"] == 3.0  # the whole split wins
    assert rows["kd-forward"]["dev_from"] == "trainer:sample64"
    assert rows["kd-forward"]["dev_loss"] == pytest.approx(4.0 * 0.97 ** 30 + 0.1)
    assert rows["live"]["dev_from"] == "trainer"  # an old-style dev line: no sample key
    assert "`trainer:sampleN`" in (tmp_path / "cmp" / "compare.md").read_text()
    fig = curves_figure([load_run(p) for p in runs], ["ce", "kd-forward", "live"])
    _, ax_step, ax_wall = fig.axes
    labels = [t.get_text() for t in ax_step.get_legend().get_texts()]
    assert labels == ["ce (sample of 64)", "ce: whole dev split (eval)", "kd-forward (sample of 64)", "live"]
    star = [ln for ln in ax_step.lines if ln.get_label() == "ce: whole dev split (eval)"][0]
    assert list(star.get_xdata()) == [30] and list(star.get_ydata()) == [3.0]
    assert star.get_color() == [ln for ln in ax_step.lines if ln.get_label() == "ce (sample of 64)"][0].get_color()
    wall_star = [ln for ln in ax_wall.lines if ln.get_label() == "ce: whole dev split (eval)"][0]
    assert list(wall_star.get_xdata()) == [pytest.approx(3.0)]
    assert "sample" in ax_step.get_title() and "whole split" in ax_step.get_title()


def test_a_run_keeps_one_colour_in_every_figure(runs, tmp_path, monkeypatch):
    """One style per run for the whole comparison: the curves and both accuracy figures draw a run in the same
    colour (students from tab10 in order, a teacher in black, its curves dashed)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_rgba

    from cachekd import compare as cmp

    styles = cmp.run_styles(["ce", "kd-forward", "live"], {"live"})
    assert [styles[n]["color"] for n in ("ce", "kd-forward")] == [colormaps["tab10"](0), colormaps["tab10"](1)]
    assert styles["live"]["color"] == "black" and styles["live"]["teacher"]
    fig = cmp.curves_figure([cmp.load_run(p) for p in runs], ["ce", "kd-forward", "live"], styles)
    for ax in fig.axes:
        for line in ax.lines:
            name = next(n for n in ("kd-forward", "live", "ce") if line.get_label().startswith(n))
            assert to_rgba(line.get_color()) == to_rgba(styles[name]["color"]), (ax.get_title(), line.get_label())
            if name == "live" and line.get_linestyle() != "None":
                assert line.get_linestyle() == "--"
    seen = {}
    for fn in ("_plot_accuracy_by_group", "_plot_accuracy_by_file", "curves_figure"):
        real = getattr(cmp, fn)
        monkeypatch.setattr(cmp, fn, lambda *a, _real=real, _fn=fn, **k: (seen.setdefault(_fn, a[-1]), _real(*a, **k))[1])
    series = {"p": [(n, {"macro_accuracy": 0.6, "by_group": {"g": {"accuracy": 0.6}},
                         "by_file": {"f": {"accuracy": 0.6}}}, n == "live") for n in ("ce", "kd-forward", "live")]}
    cmp._plots(tmp_path, [cmp.load_run(p) for p in runs], ["ce", "kd-forward", "live"], [], series, styles)
    assert all(v is styles for v in seen.values()) and len(seen) == 3
