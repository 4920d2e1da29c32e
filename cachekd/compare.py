"""Compare runs: one table (Markdown and CSV) and plots from run directories.

A run directory is what `cachekd train` / `cachekd distill` write: ``summary.json`` (written at the end),
``metrics.jsonl`` (one JSON object a line: ``"kind": "train"`` and ``"kind": "dev"`` lines) and, after
`cachekd eval`, ``eval.json``. A run without ``summary.json`` is compared from its metrics; it is ``(running)``
when a live process trains it (its ``running.json`` names a process that still exists) and ``(unfinished)``
otherwise (stopped, crashed or killed: `--resume` continues it).

Dev loss in the table comes from ``eval.json`` when `cachekd eval` measured the whole dev split (column
``dev_from`` = ``eval``), else from the run's summary or last dev line (``trainer:sampleN``: the trainer's fixed
sample of N dev windows drawn from every source, the same for every run on the store; ``trainer``: the whole dev
split, or, for runs from before the sample, the first ``data.eval_windows`` windows), else from an
`cachekd eval --max-windows N` on the dev split (``eval:firstN``). Losses on the train split are never used. Compare
runs whose ``dev_from`` agree. In ``curves.png`` the dev panels draw the trainer's values as lines (labelled with
the sample size) and `cachekd eval`'s whole-split value, where there is one, as a star at the run's last step.

Minimal-pair accuracies get one set of columns per measurement convention (`cachekd.rundir.minimal_pairs_key`:
file set, prefix, pair limit), labelled like ``mp[blimp prefix=eos]`` (macro accuracy) and
``acc[blimp prefix=eos]:<group>``: results measured with another prefix or on other files never share a column.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from cachekd.errors import CachekdError
from cachekd.rundir import RunDir, full_dev_loss, loss_key

BASE_COLUMNS = ["run", "mode", "objective", "steps", "tokens", "wall_s", "num_params", "dev_loss", "dev_ppl",
                "dev_from"]
"""Columns of the comparison table; minimal-pair accuracies follow, per convention `<label>` (`pair_labels`):
``mp[<label>]`` (macro accuracy) and then ``acc[<label>]:<group>``."""


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Summary, metrics and evaluation of one run directory."""
    run = RunDir(run_dir)
    d = run.path
    if not d.is_dir():
        raise CachekdError(f"run directory {str(d)!r} does not exist.")
    if not run.is_run:
        raise CachekdError(f"{str(d)!r} is not a run directory (it has no summary.json or metrics.jsonl).")
    metrics = run.read_metrics()
    state = run.state
    return {
        "dir": d,
        "summary": run.read_summary(),
        "complete": state == "finished",
        "running": state == "running",
        "train": [m for m in metrics if m.get("kind") == "train"],
        "dev": [m for m in metrics if m.get("kind") == "dev"],
        "eval": run.load_eval(),
    }


def _state(run: dict[str, Any]) -> str:
    return "complete" if run["complete"] else "running" if run.get("running") else "unfinished"


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def trainer_dev_loss(line: dict[str, Any]) -> tuple[float | None, int | None]:
    """A metrics.jsonl dev line's loss and, when it is the trainer's sample, the sample's size (None: the whole dev
    split, or a run from before the sample)."""
    if _num(line.get("dev_loss_sample")) is not None:
        return _num(line["dev_loss_sample"]), line.get("dev_sample_windows")
    return _num(line.get("dev_loss")), None


def pair_labels(keys: list[str], results: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Column label of each minimal-pair key: the key without its content fingerprint (``blimp prefix=eos``), or
    with it where two keys would otherwise get the same label (same names, other pairs). `results` gives one result
    for each key."""
    from cachekd.rundir import minimal_pairs_key

    short = {}
    for k in keys:
        mp = results[k]
        stripped = {kk: v for kk, v in mp.items() if kk != "files_fingerprint"}
        short[k] = minimal_pairs_key(stripped)
    return {k: (short[k] if list(short.values()).count(short[k]) == 1 else k) for k in keys}


def run_row(run: dict[str, Any], name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """One row of the comparison table. `labels`: the column label of each minimal-pair key (`pair_labels` over
    every compared run, so that columns agree across rows); by default, this run's own."""
    s, train, dev, ev = run["summary"], run["train"], run["dev"], run["eval"] or {}
    last = train[-1] if train else {}
    row: dict[str, Any] = {
        "run": name,
        "state": _state(run),  # complete | running | unfinished (the table shows the last two in `mode`)
        "mode": s.get("mode") or (f"({_state(run)})" if not run["complete"] else None),
        "objective": s.get("objective"),
        "steps": s.get("steps", last.get("step")),
        "tokens": s.get("tokens", last.get("tokens")),
        "wall_s": _num(s.get("wall_s", last.get("wall_s"))),
        "num_params": s.get("num_params", ev.get("num_params")),
    }
    dev_loss, source = None, None
    full = full_dev_loss(ev)
    partial = [e for e in (ev.get("losses") or {}).values()
               if isinstance(e, dict) and e.get("split", "dev") == "dev" and _num(e.get("loss")) is not None]
    if full is not None and _num(full.get("loss")) is not None:
        dev_loss, source = _num(full["loss"]), "eval"
    elif _num(s.get("final_dev_loss_sample")) is not None:
        dev_loss, source = _num(s["final_dev_loss_sample"]), f"trainer:sample{s.get('dev_sample_windows')}"
    elif _num(s.get("final_dev_loss")) is not None:
        dev_loss, source = _num(s["final_dev_loss"]), "trainer"
    elif dev and trainer_dev_loss(dev[-1])[0] is not None:
        dev_loss, n = trainer_dev_loss(dev[-1])
        source = "trainer" if n is None else f"trainer:sample{n}"
    elif partial:  # only a quick `cachekd eval --max-windows N` on the dev split: say so
        best = max(partial, key=lambda e: e.get("num_windows") or 0)
        dev_loss, source = _num(best["loss"]), loss_key(best)
        source = "eval:" + source.split(":", 1)[1] if ":" in source else "eval"
    row["dev_loss"] = dev_loss
    row["dev_ppl"] = math.exp(dev_loss) if dev_loss is not None and dev_loss < 700 else None
    row["dev_from"] = source
    from cachekd.rundir import minimal_pair_results

    results = minimal_pair_results(ev)
    if labels is None:
        labels = pair_labels(list(results), results)
    for key, mp in results.items():
        label = labels[key]
        row[f"mp[{label}]"] = _num(mp.get("macro_accuracy"))
        for group, g in (mp.get("by_group") or {}).items():
            row[f"acc[{label}]:{group}"] = _num(g.get("accuracy"))
    return row


def teacher_runs(runs: list[dict[str, Any]]) -> set[int]:
    """Indices of the runs that are a teacher of another compared run: named (by path or checkpoint fingerprint)
    as an online teacher in a distilled run's summary, or as a teacher in the manifest of the cache it was distilled
    from (a cache that cannot be opened any more is passed over)."""
    from cachekd.cache.reader import LogitCache
    from cachekd.ensemble import member_infos

    paths: set[Path] = set()
    fingerprints: set[str] = set()
    for run in runs:
        s = run["summary"]
        teachers = list(s.get("online_teachers") or [])
        if s.get("cache"):
            try:
                teachers += LogitCache.open(s["cache"]).meta["teachers"]
            except (CachekdError, OSError, KeyError, ValueError):
                pass
        for t in teachers:
            if isinstance(t, dict):
                for m in member_infos(t) if t.get("path") else []:
                    paths.add(Path(m["path"]).resolve())
                if t.get("fingerprint"):
                    fingerprints.add(str(t["fingerprint"]))
    found = set()
    for i, run in enumerate(runs):
        d = Path(run["dir"]).resolve()
        fp = (run["eval"] or {}).get("checkpoint_fingerprint")
        if d in paths or d / "model" in paths or (fp is not None and fp in fingerprints):
            found.add(i)
    return found


def _unique_names(runs: list[dict[str, Any]]) -> list[str]:
    """Runs are labelled by their directory (what the user chose with -o, and the same in every comparison);
    config names are not used: a preset's name stays the same whatever options the run overrode. Only runs
    whose directory names collide get their parent directory in front (`parent/dir`)."""
    paths = [Path(r["dir"]).resolve() for r in runs]
    base = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if base.count(p.name) > 1 else p.name for p in paths]


OUTPUT_FILES = ("compare.md", "compare.csv", "curves.png", "accuracy_by_group.png", "accuracy_by_file.png",
                "weights.png")
"""What `compare_runs` writes into its output directory (an earlier comparison's files are replaced)."""


def default_out_dir(run_dirs: list[str | Path]) -> Path:
    """``<common parent>/compare`` when the runs share a parent directory, else ``./compare``."""
    parents = {Path(d).resolve().parent for d in run_dirs}
    return (parents.pop() if len(parents) == 1 else Path.cwd()) / "compare"


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> dict[str, Any]:
    """Read each run, write ``compare.md``, ``compare.csv``, ``curves.png`` and (when any run has minimal-pair
    results in eval.json) ``accuracy_by_group.png`` and ``accuracy_by_file.png`` into `out_dir`. Returns
    ``{"rows", "columns", "files", "out", "replaced", "teachers"}``; ``replaced`` names the files of an earlier
    comparison in `out_dir` that this one replaced (or, for a stale accuracy plot, removed); ``teachers`` names the
    runs that are a teacher of another compared run (`teacher_runs`)."""
    from cachekd.rundir import minimal_pair_results

    runs, cohorts, run_dirs = _read_runs(run_dirs)
    names = _unique_names(runs)
    results = [minimal_pair_results(r["eval"]) for r in runs]
    one_each = {k: mp for res in results for k, mp in res.items()}
    keys = sorted(one_each)
    labels = pair_labels(keys, one_each)
    rows = [run_row(r, n, labels) for r, n in zip(runs, names)]
    columns = list(BASE_COLUMNS)
    for key in keys:
        columns.append(f"mp[{labels[key]}]")
        columns += sorted({c for row in rows for c in row if c.startswith(f"acc[{labels[key]}]:")})
    teachers = teacher_runs(runs)
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    replaced = [n for n in OUTPUT_FILES if (out / n).exists()]

    styles = run_styles(names, {names[i] for i in teachers})
    files = _plots(out, runs, names, cohorts, {labels[k]: [(n, res[k], i in teachers) for i, (n, res)
                                                           in enumerate(zip(names, results)) if k in res]
                                               for k in keys}, styles)
    files["markdown"] = str(_write_markdown(out / "compare.md", rows, columns, runs, names, teachers, files))
    files["csv"] = str(_write_csv(out / "compare.csv", rows, columns))
    return {"rows": rows, "columns": columns, "files": files, "out": str(out), "replaced": replaced,
            "teachers": [names[i] for i in sorted(teachers)]}


def _read_runs(run_dirs: list[str | Path]) -> tuple[list[dict[str, Any]], list, list[str | Path]]:
    """The runs to compare (a cohort directory stands for its peers; the same run given twice counts once), the
    cohorts among them, and the run directories after expanding cohorts."""
    if not run_dirs:
        raise CachekdError("no run directories given: pass one or more.")
    missing = [str(d) for d in run_dirs if not Path(d).is_dir()]
    if missing:
        raise CachekdError(f"run director{'ies' if len(missing) > 1 else 'y'} {', '.join(map(repr, missing))} "
                           f"do{'' if len(missing) > 1 else 'es'} not exist.")
    run_dirs, cohorts = expand_cohorts(run_dirs)
    unique: dict[Path, str | Path] = {}
    for d in run_dirs:  # the same run given twice (`run`, `./run`) is compared once
        unique.setdefault(Path(d).resolve(), d)
    return [load_run(d) for d in unique.values()], cohorts, run_dirs


def _plots(out: Path, runs: list[dict[str, Any]], names: list[str], cohorts: list,
           series: dict[str, list], styles: dict[str, dict[str, Any]]) -> dict[str, str | None]:
    """curves.png, the accuracy plots when there are minimal-pair `series` (else a stale one is removed) and the
    cohorts' weights plot, every run in its one style (`run_styles`); returns their paths by name (None: not
    drawn)."""
    files: dict[str, str | None] = {}
    curves = out / "curves.png"
    curves_figure(runs, names, styles).savefig(curves, dpi=110)
    files["curves"] = str(curves)
    acc, acc_file = out / "accuracy_by_group.png", out / "accuracy_by_file.png"
    if series:
        _plot_accuracy_by_group(series, acc, styles)
        _plot_accuracy_by_file(series, acc_file, styles)
        files["accuracy_by_group"], files["accuracy_by_file"] = str(acc), str(acc_file)
    else:
        for f in (acc, acc_file):
            f.unlink(missing_ok=True)  # a stale plot from an earlier comparison would mislead
        files["accuracy_by_group"] = files["accuracy_by_file"] = None
    weights = _weights_plot(cohorts, out / "weights.png")
    if weights is not None:
        files["weights"] = str(weights)  # only when cohorts with mutual learning were compared
    return files


COLUMN_NOTES = (
    "`dev_from`: `eval` = `cachekd eval` over the whole dev split (eval.json), `trainer:sampleN` = the trainer's "
    "dev loss on its fixed sample of N dev windows from every source (the same windows for every run on the "
    "store), `trainer` = the trainer's dev loss over the whole dev split (runs from before the sample: its first "
    "`data.eval_windows` windows), `eval:firstN` = `cachekd eval --max-windows N` on the dev split. "
    "`mp[<pairs> prefix=<p>]`: mean minimal-pair accuracy over the phenomena (files) of the pair set "
    "`<pairs>`, each sentence scored after the context `<p>` (`eos`: end-of-text token, `bos`: begin-of-text "
    "token, `none`: no context, or the quoted text), on at most N pairs a file when `max_pairs=N`; "
    "`acc[...]:<group>`: mean over a group's phenomena. Accuracies measured another way are in other columns "
    "and are not comparable."
)
"""What compare.md says under its table about the columns."""


def _write_markdown(path: Path, rows: list[dict[str, Any]], columns: list[str], runs: list[dict[str, Any]],
                    names: list[str], teachers: set[int], files: dict[str, str | None]) -> Path:
    from cachekd.io import atomic_write_bytes
    from cachekd.report import markdown_table

    lines = ["# Run comparison", "", markdown_table(rows, columns), COLUMN_NOTES, "", "Runs:", ""]
    notes = {"complete": "", "running": " (running: no summary.json yet)",
             "unfinished": " (unfinished: no summary.json and no process training it; resuming it continues it)"}
    lines += [f"- {n}: `{r['dir']}`{notes[_state(r)]}{' (teacher)' if i in teachers else ''}"
              for i, (r, n) in enumerate(zip(runs, names))]
    lines += ["", f"![training and dev curves]({Path(files['curves']).name})", ""]
    if files.get("weights"):
        lines += ["![cohort peer weights ω](weights.png)", ""]
    if files["accuracy_by_group"]:
        lines += [f"![minimal-pair accuracy by group]({Path(files['accuracy_by_group']).name})", "",
                  f"![minimal-pair accuracy by phenomenon]({Path(files['accuracy_by_file']).name})", ""]
    atomic_write_bytes(path, ("\n".join(lines).rstrip("\n") + "\n").encode())
    return path


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
    return path


def expand_cohorts(run_dirs: list[str | Path]) -> tuple[list[str | Path], list[tuple[str, list[dict[str, Any]]]]]:
    """A cohort directory stands for its peers' runs: returns the run directories with each cohort replaced by its
    peers, and each cohort's (name, ω records) for the weights plot (cohorts with mutual learning only)."""
    from cachekd.rundir import cohort_peer_dirs

    out: list[str | Path] = []
    cohorts = []
    for d in run_dirs:
        peers = cohort_peer_dirs(d)
        if peers is None:
            out.append(d)
            continue
        out += peers
        records = [m for m in RunDir(d).read_metrics() if m.get("kind") == "weights"]
        if records:
            cohorts.append((Path(d).resolve().name, records))
    return out, cohorts


# ------------------------------------------------------------------------------------------------ plots
# matplotlib's object API (Figure + savefig) draws with Agg without touching pyplot's global backend.


def _weights_plot(cohorts: list[tuple[str, list[dict[str, Any]]]], path: Path) -> Path | None:
    """Plot the cohorts' ω into `path`; without cohorts remove a stale plot there and return None."""
    if not cohorts:
        path.unlink(missing_ok=True)
        return None
    _plot_weights(cohorts, path)
    return path


def _plot_weights(cohorts: list[tuple[str, list[dict[str, Any]]]], path: Path) -> None:
    """ω of each member (peers and fixed peers) over the steps, a panel per cohort."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(cohorts), 4), layout="constrained")
    axes = fig.subplots(1, len(cohorts), squeeze=False)[0]
    for ax, (name, records) in zip(axes, cohorts):
        members = records[-1].get("members") or [f"member {i}" for i in range(len(records[-1]["weights"]))]
        steps = [r["step"] for r in records]
        for i, member in enumerate(members):
            ax.plot(steps, [r["weights"][i] for r in records], marker="o", markersize=3, label=member)
        ax.set_title(f"peer weights ω: {name}")
        ax.set_xlabel("step")
        ax.set_ylabel("ω")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def curves_figure(runs: list[dict[str, Any]], names: list[str], styles: dict[str, dict[str, Any]] | None = None):
    """The figure of ``curves.png``: training cross-entropy by step; the dev loss by step and by wall-clock time,
    the trainer's values as lines (labelled with the sample size when they are its sample) and `cachekd eval`'s
    whole-split value as a star at the run's end. Each run in its `styles` colour (default: `run_styles(names)`),
    a teacher's lines dashed."""
    from matplotlib.figure import Figure

    styles = styles or run_styles(names)
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    ax_train, ax_dev_step, ax_dev_wall = fig.subplots(1, 3)
    for run, name in zip(runs, names):
        color, dash = styles[name]["color"], "--" if styles[name]["teacher"] else "-"
        # The hard-label cross-entropy is comparable across CE and distillation runs; the total loss is not.
        pts = [(m.get("step"), _num(m.get("ce", m.get("loss")))) for m in run["train"]]
        pts = [(s, v) for s, v in pts if s is not None and v is not None]
        if pts:
            ax_train.plot(*zip(*pts), label=styles[name]["label"], linewidth=1, color=color, linestyle=dash)
        dev = [(m.get("step"), _num(m.get("wall_s")), *trainer_dev_loss(m)) for m in run["dev"]]
        by_step = [(s, v) for s, _, v, _ in dev if s is not None and v is not None]
        by_wall = [(w, v) for _, w, v, _ in dev if w is not None and v is not None]
        sizes = {n for *_, v, n in dev if v is not None}
        label = styles[name]["label"]
        label = label if sizes <= {None} else f"{label} (sample of {', '.join(str(n) for n in sorted(sizes - {None}))})"
        for ax, pts in ((ax_dev_step, by_step), (ax_dev_wall, by_wall)):
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=label, color=color, linestyle=dash)
        full = full_dev_loss(run["eval"])
        if full is not None and _num(full.get("loss")) is not None:
            # the whole dev split (cachekd eval, at the end of the run): what the table reports
            last = run["train"][-1] if run["train"] else {}
            end_step = run["summary"].get("steps", last.get("step"))
            end_wall = _num(run["summary"].get("wall_s", last.get("wall_s")))
            for ax, x in ((ax_dev_step, end_step), (ax_dev_wall, end_wall)):
                if x is not None:
                    ax.plot([x], [_num(full["loss"])], marker="*", markersize=12, linestyle="none",
                            color=color, label=f"{name}: whole dev split (eval)")
    dev_title = "dev loss: trainer's sample (lines), whole split from eval (★)"
    for ax, title, xlabel in ((ax_train, "training cross-entropy (hard labels)", "step"),
                              (ax_dev_step, dev_title, "step"),
                              (ax_dev_wall, "dev loss at equal wall-clock time", "wall-clock seconds")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    return fig



CHANCE = 0.5
"""Accuracy of guessing on a two-way minimal pair."""
PLOT_DPI = 110
PLOT_WIDTH_IN = 11.0
"""Accuracy figures are 11 in × 110 dpi = 1210 px wide whatever the number of phenomena; they grow in height."""

AccuracySeries = dict[str, list[tuple[str, dict[str, Any], bool]]]
"""Per convention label: (run name, minimal-pair result, whether the run is a teacher) of each run measured so."""


def run_styles(names: list[str], teachers: set[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """One colour per run of a comparison, the same in every figure (curves, accuracy by group and by file):
    the students in order from matplotlib's tab10, the teachers in black."""
    from matplotlib import colormaps

    names = list(dict.fromkeys(names))
    cmap = colormaps["tab10"]
    styles, c = {}, 0
    for n in names:
        if n in teachers:
            styles[n] = {"color": "black", "label": f"{n} (teacher)", "teacher": True}
        else:
            styles[n] = {"color": cmap(c % 10), "label": n, "teacher": False}
            c += 1
    return styles


def _finish_accuracy_axis(ax, title: str) -> None:
    ax.axvline(CHANCE, color="gray", linewidth=1, linestyle="--", label="chance (0.5)")
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _plot_accuracy_by_group(series: AccuracySeries, path: Path, styles: dict[str, dict[str, Any]]) -> None:
    """Horizontal grouped bars: a row per group (and the macro average on top), a bar per run, one panel per
    convention; the teacher's bars are black and hatched, the dashed line is chance."""
    import numpy as np
    from matplotlib.figure import Figure

    panels = []
    for label, runs in series.items():
        groups = sorted({g for _, mp, _ in runs for g in (mp.get("by_group") or {})},
                        key=lambda g: -np.nanmean([_num((mp.get("by_group") or {}).get(g, {}).get("accuracy"))
                                                   or np.nan for _, mp, _ in runs] or [np.nan]))
        panels.append((label, runs, ["macro (all phenomena)"] + groups))
    heights = [0.8 + len(cats) * (0.2 * len(runs) + 0.15) for _, runs, cats in panels]
    fig = Figure(figsize=(PLOT_WIDTH_IN, sum(heights) + 0.3), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, (label, runs, cats) in zip(axes, panels):
        y = np.arange(len(cats))[::-1]  # the first category on top
        bar = 0.8 / len(runs)
        for i, (name, mp, _) in enumerate(runs):
            st = styles[name]
            vals = [_num(mp.get("macro_accuracy"))] + [_num((mp.get("by_group") or {}).get(g, {}).get("accuracy"))
                                                         for g in cats[1:]]
            ax.barh(y + (len(runs) - 1) / 2 * bar - i * bar, [np.nan if v is None else v for v in vals], bar,
                    color=st["color"], label=st["label"], hatch="//" if st["teacher"] else None,
                    edgecolor="white" if st["teacher"] else None)
        ax.set_yticks(y, cats, fontsize=9)
        _finish_accuracy_axis(ax, f"minimal-pair accuracy by group — {label}")
    fig.savefig(path, dpi=PLOT_DPI)


def _plot_accuracy_by_file(series: AccuracySeries, path: Path, styles: dict[str, dict[str, Any]]) -> None:
    """A dot plot: a row per phenomenon (file), sorted by the runs' mean accuracy (best on top), a marker per run
    (the teacher a black diamond) on a line from the lowest to the highest run; one panel per convention; the dashed
    line is chance."""
    import numpy as np
    from matplotlib.figure import Figure

    panels = []
    for label, runs in series.items():
        files = {f for _, mp, _ in runs for f in (mp.get("by_file") or {})}
        acc = {f: [_num((mp.get("by_file") or {}).get(f, {}).get("accuracy")) for _, mp, _ in runs] for f in files}
        mean = {f: np.mean([v for v in vs if v is not None]) if any(v is not None for v in vs) else -1.0
                for f, vs in acc.items()}
        order = sorted(files, key=lambda f: (mean[f], f))  # bottom to top: the best on top
        panels.append((label, runs, order, acc))
    heights = [1.0 + 0.2 * len(order) for _, _, order, _ in panels]
    fig = Figure(figsize=(PLOT_WIDTH_IN, sum(heights) + 0.3), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, (label, runs, order, acc) in zip(axes, panels):
        y = np.arange(len(order))
        lows = [min((v for v in acc[f] if v is not None), default=np.nan) for f in order]
        highs = [max((v for v in acc[f] if v is not None), default=np.nan) for f in order]
        ax.hlines(y, lows, highs, color="lightgray", linewidth=2, zorder=1)
        for i, (name, _, _) in enumerate(runs):
            st = styles[name]
            vals = [np.nan if acc[f][i] is None else acc[f][i] for f in order]
            ax.scatter(vals, y, color=st["color"], label=st["label"], zorder=3 if st["teacher"] else 2,
                       marker="D" if st["teacher"] else "o", s=30 if st["teacher"] else 22)
        ax.set_yticks(y, order, fontsize=8)
        ax.set_ylim(-0.7, len(order) - 0.3)
        ax.grid(axis="y", alpha=0.15)
        _finish_accuracy_axis(ax, f"minimal-pair accuracy by phenomenon (sorted) — {label}")
    fig.savefig(path, dpi=PLOT_DPI)
