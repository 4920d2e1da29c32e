"""Compare runs: one table (Markdown and CSV) and plots from run directories.

A run directory is what `cachekd train` / `cachekd distill` write: ``summary.json`` (written at the end),
``metrics.jsonl`` (one JSON object a line: ``"kind": "train"`` and ``"kind": "dev"`` lines) and, after
`cachekd eval`, ``eval.json``. A run without ``summary.json`` is compared from its metrics; it is ``(running)``
when a live process trains it (its ``running.json`` names a process that still exists) and ``(unfinished)``
otherwise (stopped, crashed or killed: `--resume` continues it).

Dev loss in the table comes from ``eval.json`` when `cachekd eval` measured the whole dev split (column
``dev_from`` = ``eval``), else from the run's summary or last dev line (``trainer``: the trainer scores the first
``data.eval_windows`` dev windows), else from an `cachekd eval --max-windows N` on the dev split
(``eval:firstN``). Losses on the train split are never used. Compare runs whose ``dev_from`` agree.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from cachekd.errors import CachekdError
from cachekd.rundir import RunDir, full_dev_loss, loss_key

BASE_COLUMNS = ["run", "mode", "objective", "steps", "tokens", "wall_s", "num_params", "dev_loss", "dev_ppl",
                "dev_from", "mp_macro_acc"]
"""Columns of the comparison table; per-group minimal-pair accuracies follow as ``acc:<group>``."""


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


def run_row(run: dict[str, Any], name: str) -> dict[str, Any]:
    """One row of the comparison table."""
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
    elif _num(s.get("final_dev_loss")) is not None:
        dev_loss, source = _num(s["final_dev_loss"]), "trainer"
    elif dev and _num(dev[-1].get("dev_loss")) is not None:
        dev_loss, source = _num(dev[-1]["dev_loss"]), "trainer"
    elif partial:  # only a quick `cachekd eval --max-windows N` on the dev split: say so
        best = max(partial, key=lambda e: e.get("num_windows") or 0)
        dev_loss, source = _num(best["loss"]), loss_key(best)
        source = "eval:" + source.split(":", 1)[1] if ":" in source else "eval"
    row["dev_loss"] = dev_loss
    row["dev_ppl"] = math.exp(dev_loss) if dev_loss is not None and dev_loss < 700 else None
    row["dev_from"] = source
    mp = ev.get("minimal_pairs") if isinstance(ev.get("minimal_pairs"), dict) else None
    row["mp_macro_acc"] = _num(mp.get("macro_accuracy")) if mp else None
    for group, g in ((mp or {}).get("by_group") or {}).items():
        row[f"acc:{group}"] = _num(g.get("accuracy"))
    return row


def _unique_names(runs: list[dict[str, Any]]) -> list[str]:
    """Runs are labelled by their directory (what the user chose with -o, and the same in every comparison);
    config names are not used: a preset's name stays the same whatever options the run overrode. Only runs
    whose directory names collide get their parent directory in front (`parent/dir`)."""
    paths = [Path(r["dir"]).resolve() for r in runs]
    base = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if base.count(p.name) > 1 else p.name for p in paths]


OUTPUT_FILES = ("compare.md", "compare.csv", "curves.png", "accuracy_by_group.png")
"""What `compare_runs` writes into its output directory (an earlier comparison's files are replaced)."""


def default_out_dir(run_dirs: list[str | Path]) -> Path:
    """``<common parent>/compare`` when the runs share a parent directory, else ``./compare``."""
    parents = {Path(d).resolve().parent for d in run_dirs}
    return (parents.pop() if len(parents) == 1 else Path.cwd()) / "compare"


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> dict[str, Any]:
    """Read each run, write ``compare.md``, ``compare.csv``, ``curves.png`` and (when any run has minimal-pair
    results in eval.json) ``accuracy_by_group.png`` into `out_dir`. Returns ``{"rows", "columns", "files", "out",
    "replaced"}``; ``replaced`` names the files of an earlier comparison in `out_dir` that this one replaced (or, for
    a stale accuracy plot, removed)."""
    from cachekd.io import atomic_write_bytes
    from cachekd.report import markdown_table

    if not run_dirs:
        raise CachekdError("no run directories given: pass one or more.")
    missing = [str(d) for d in run_dirs if not Path(d).is_dir()]
    if missing:
        raise CachekdError(f"run director{'ies' if len(missing) > 1 else 'y'} {', '.join(map(repr, missing))} "
                           f"do{'' if len(missing) > 1 else 'es'} not exist.")
    unique: dict[Path, str | Path] = {}
    for d in run_dirs:  # the same run given twice (`run`, `./run`) is compared once
        unique.setdefault(Path(d).resolve(), d)
    runs = [load_run(d) for d in unique.values()]
    names = _unique_names(runs)
    rows = [run_row(r, n) for r, n in zip(runs, names)]
    groups = sorted({k for row in rows for k in row if k.startswith("acc:")})
    columns = BASE_COLUMNS + groups
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    replaced = [n for n in OUTPUT_FILES if (out / n).exists()]

    files: dict[str, str | None] = {}
    curves = out / "curves.png"
    _plot_curves(runs, names, curves)
    files["curves"] = str(curves)
    acc = out / "accuracy_by_group.png"
    if any(r["eval"] and isinstance(r["eval"].get("minimal_pairs"), dict) for r in runs):
        _plot_accuracy(runs, names, acc)
        files["accuracy_by_group"] = str(acc)
    else:
        acc.unlink(missing_ok=True)  # a stale plot from an earlier comparison would mislead
        files["accuracy_by_group"] = None

    lines = ["# Run comparison", "", markdown_table(rows, columns)]
    lines += [
        "`dev_from`: `eval` = `cachekd eval` over the whole dev split (eval.json), `trainer` = the trainer's own dev "
        "loss (the first `data.eval_windows` dev windows), `eval:firstN` = `cachekd eval --max-windows N` on the dev "
        "split. `mp_macro_acc`: mean minimal-pair accuracy over phenomena; `acc:<group>`: mean over a group's "
        "phenomena.",
        "",
        "Runs:",
        "",
    ]
    notes = {"complete": "", "running": " (running: no summary.json yet)",
             "unfinished": " (unfinished: no summary.json and no process training it; `--resume` continues it)"}
    lines += [f"- {n}: `{r['dir']}`{notes[_state(r)]}" for r, n in zip(runs, names)]
    lines += ["", f"![training and dev curves]({curves.name})", ""]
    if files["accuracy_by_group"]:
        lines += [f"![minimal-pair accuracy]({acc.name})", ""]
    md = out / "compare.md"
    atomic_write_bytes(md, ("\n".join(lines).rstrip("\n") + "\n").encode())
    files["markdown"] = str(md)

    csv_path = out / "compare.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
    files["csv"] = str(csv_path)
    return {"rows": rows, "columns": columns, "files": files, "out": str(out), "replaced": replaced}


# ------------------------------------------------------------------------------------------------ plots
# matplotlib's object API (Figure + savefig) draws with Agg without touching pyplot's global backend.


def _plot_curves(runs: list[dict[str, Any]], names: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5), layout="constrained")
    ax_train, ax_dev_step, ax_dev_wall = fig.subplots(1, 3)
    for run, name in zip(runs, names):
        # The hard-label cross-entropy is comparable across CE and distillation runs; the total loss is not.
        pts = [(m.get("step"), _num(m.get("ce", m.get("loss")))) for m in run["train"]]
        pts = [(s, v) for s, v in pts if s is not None and v is not None]
        if pts:
            ax_train.plot(*zip(*pts), label=name, linewidth=1)
        dev = [(m.get("step"), _num(m.get("wall_s")), _num(m.get("dev_loss"))) for m in run["dev"]]
        by_step = [(s, v) for s, _, v in dev if s is not None and v is not None]
        by_wall = [(w, v) for _, w, v in dev if w is not None and v is not None]
        if by_step:
            ax_dev_step.plot(*zip(*by_step), marker="o", markersize=3, label=name)
        if by_wall:
            ax_dev_wall.plot(*zip(*by_wall), marker="o", markersize=3, label=name)
    for ax, title, xlabel in ((ax_train, "training cross-entropy (hard labels)", "step"), (ax_dev_step, "dev loss", "step"),
                              (ax_dev_wall, "dev loss at equal wall-clock time", "wall-clock seconds")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.savefig(path, dpi=110)


def _grouped_bars(ax, categories: list[str], series: list[tuple[str, list[float | None]]], title: str) -> None:
    import numpy as np

    x = np.arange(len(categories))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [np.nan if v is None else v for v in values], width,
               label=name)
    many = len(categories) > 4
    ax.set_xticks(x, categories, rotation=30 if many else 0, ha="right" if many else "center", fontsize=8)
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="gray", linewidth=0.8, linestyle="--")  # chance
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _plot_accuracy(runs: list[dict[str, Any]], names: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    mps = [(n, r["eval"]["minimal_pairs"]) for r, n in zip(runs, names)
           if r["eval"] and isinstance(r["eval"].get("minimal_pairs"), dict)]
    groups = sorted({g for _, mp in mps for g in (mp.get("by_group") or {})})
    phenomena = sorted({p for _, mp in mps for p in (mp.get("by_file") or {})})
    two = len(phenomena) > len(groups)
    fig = Figure(figsize=(max(8, 0.6 * len(phenomena) * max(1, len(mps)) / 2 + 4), 9 if two else 4.5),
                 layout="constrained")
    axes = fig.subplots(2, 1) if two else [fig.subplots(1, 1)]
    _grouped_bars(axes[0], groups + ["macro"],
                  [(n, [_num((mp.get("by_group") or {}).get(g, {}).get("accuracy")) for g in groups]
                    + [_num(mp.get("macro_accuracy"))]) for n, mp in mps],
                  "minimal-pair accuracy by group (dashed: chance)")
    if two:
        _grouped_bars(axes[1], phenomena,
                      [(n, [_num((mp.get("by_file") or {}).get(p, {}).get("accuracy")) for p in phenomena])
                       for n, mp in mps],
                      "by phenomenon")
    fig.savefig(path, dpi=110)
