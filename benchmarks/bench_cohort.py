"""Cohorts on CPU: (a) a 4-student variant grid from one pass against 4 separate runs, wall time at equal steps;
(b) dev loss at equal steps of CE-only, a WML cohort of 3 peers, a teacher-guided student from the cache and the
WML cohort with the cached teacher as a fixed peer, over several seeds.

(a) Each side runs the real CLI in a fresh process (`cachekd cohort` once; `cachekd distill` four times), one after
the other, repeated; the ratio is grid wall time ÷ the sum of the four runs' wall times. An in-process figure
(trainer construction to summary, no interpreter start-up) and the loader's own time for the same batches say
where the rest goes.

(b) Every student is trained for the same steps on the same window order; its dev loss is measured on the whole
dev split afterwards (`cachekd.dev_loss.dev_loss`). A WML row reports the peer with the CE student's shape (the
like-for-like figure) and the other peers separately. A difference within the seeds' spread is "unresolved".

    python benchmarks/bench_cohort.py [--data DIR] [--mb 1.5] [--steps 120] [--seeds 3] [--grid-steps 40]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, hardware_tag, write_result  # noqa: E402
from bench_precompute import _subset_corpus  # noqa: E402

BASE = {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}
WIDE = {"arch": "llama", "hidden_size": 96, "num_layers": 1, "num_heads": 2, "intermediate_size": 192}
DEEP = {"arch": "llama", "hidden_size": 48, "num_layers": 4, "num_heads": 2, "intermediate_size": 96}
TEACHER = {"arch": "llama", "hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 256}
GRID = {  # the four variants of (a): name -> distill section
    "fkl-t1": {"objective": "forward_kl", "temperature": 1.0, "ce_weight": 0.5},
    "rkl-t1": {"objective": "reverse_kl", "temperature": 1.0, "ce_weight": 0.5},
    "fkl-t2": {"objective": "forward_kl", "temperature": 2.0, "ce_weight": 0.5},
    "fkl-mix": {"objective": "forward_kl", "temperature": 1.0, "ce_weight": 0.5, "alpha": 0.8, "tail_mode": "uniform"},
}


def _cli(args: list, env_path: Path) -> float:
    """Run `cachekd ARGS` in a fresh process; its wall time in seconds."""
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(env_path), str(env_path / ".shim")]), OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cachekd_cli", *map(str, args)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"cachekd {' '.join(map(str, args))} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def _data(store: Path, batch: int) -> dict:
    return {"store": str(store), "batch_size": batch, "eval_windows": 64, "block_chunks": 4}


def prepare_inputs(work: Path, args) -> tuple[Path, Path, Path]:
    """Token store, a trained teacher and its top-k cache (τ = 1 and 2)."""
    from cachekd.precompute import PrecomputeConfig, precompute
    from cachekd.tokens import PrepareConfig, prepare
    from cachekd.train_config import load_train_config
    from cachekd.trainer import run

    store = work / "tokens"
    if not (store / "manifest.json").exists():
        text = _subset_corpus(Path(args.data), work / "text", args.mb)
        prepare(PrepareConfig(inputs=[str(text)], output=str(store), seq_len=128, vocab_size=args.vocab_size,
                              dev_fraction=0.05), progress=False)
    teacher = work / "teacher"
    if not (teacher / "summary.json").exists():
        run(load_train_config({"name": "teacher", "output": str(teacher), "seed": 0, "device": "cpu",
                               "model": TEACHER, "data": _data(store, 16),
                               "optim": {"lr": 3e-3, "warmup_steps": 30, "max_steps": args.teacher_steps},
                               "save_every": 0}), force=True, progress=False)
    cache = work / "cache"
    if not (cache / "manifest.json").exists():
        precompute(PrecomputeConfig(store=str(store), teachers=[f"teacher={teacher}"], output=str(cache), top_k=args.k,
                                    temperatures=[1.0, 2.0], device="cpu"), force=True, progress=False)
    return store, teacher, cache


# ------------------------------------------------------------------------------------------------- (a)


def bench_grid(work: Path, store: Path, cache: Path, args, repo: Path) -> dict:
    import yaml

    common = {"seed": 0, "device": "cpu", "data": _data(store, args.batch_size),
              "optim": {"lr": 3e-3, "warmup_steps": 10, "max_steps": args.grid_steps}, "save_every": 0,
              "log_every": 10}
    peers = [{"name": n, "seed": i, "model": BASE, "distill": d} for i, (n, d) in enumerate(GRID.items())]
    cohort_yaml = work / "grid.yaml"
    cohort_yaml.write_text(yaml.safe_dump({"name": "grid", "cache": str(cache), "peers": peers, **common}))
    single = []
    for i, (n, d) in enumerate(GRID.items()):
        p = work / f"single-{n}.yaml"
        p.write_text(yaml.safe_dump({"name": n, "model": BASE, **common, "seed": i,
                                     "data": {**common["data"], "order_seed": 0}, "distill": {**d, "cache": str(cache)}}))
        single.append(p)
    t_grid, t_sep = [], []
    for rep in range(args.repeats):
        t_sep.append(sum(_cli(["distill", "-c", p, "-o", work / "sep" / p.stem, "--force", "--quiet"], repo)
                         for p in single))
        t_grid.append(_cli(["cohort", "-c", cohort_yaml, "-o", work / "grid", "--force", "--quiet"], repo))
    # in process: trainer construction to summary (no interpreter start-up), and the loader alone
    in_grid = _summary_wall(work / "grid" / "peers")
    in_sep = sum(json.loads((work / "sep" / p.stem / "summary.json").read_text())["wall_s"] for p in single)
    loader_s = _loader_seconds(store, cache, args)
    return {"t_grid": statistics.median(t_grid), "t_sep": statistics.median(t_sep), "grid_runs": t_grid,
            "sep_runs": t_sep, "train_wall_grid": in_grid, "train_wall_sep": in_sep, "loader_s": loader_s}


def _summary_wall(peers_dir: Path) -> float:
    walls = {json.loads((d / "summary.json").read_text())["wall_s"] for d in peers_dir.iterdir()}
    return max(walls)  # every peer records the cohort loop's wall time


def _loader_seconds(store: Path, cache: Path, args) -> float:
    """Reading and decoding the grid's batches alone (tokens + the teacher's top-k at every temperature)."""
    from cachekd.cache.reader import LogitCache
    from cachekd.loader import CachedBatches, Order
    from cachekd.tokens import TokenStore

    st, c = TokenStore.open(store), LogitCache.open(cache)
    order = Order(st.num_windows("train"), st.chunk_windows, args.batch_size, seed=0, block_chunks=4)
    t0 = time.perf_counter()
    it = iter(CachedBatches(st, "train", order, cache=c))
    for _ in range(args.grid_steps):
        next(it)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------- (b)


def bench_quality(work: Path, store: Path, cache: Path, args) -> list[dict]:
    from cachekd.cohort.config import load_cohort_config
    from cachekd.cohort.run import run_cohort
    from cachekd.dev_loss import dev_loss
    from cachekd.models import load_model
    from cachekd.tokens import TokenStore

    st = TokenStore.open(store)

    def full_dev(run_dir: Path) -> float:
        return float(dev_loss(load_model(run_dir), st, split="dev", batch_size=32, device="cpu", progress=False)["loss"])

    common = {"device": "cpu", "data": _data(store, args.batch_size), "save_every": 0, "log_every": 25,
              "optim": {"lr": 3e-3, "warmup_steps": 15, "max_steps": args.steps}}
    peers3 = [{"name": "base", "model": BASE}, {"name": "wide", "model": WIDE}, {"name": "deep", "model": DEEP}]
    wml = {"alpha": 0.5, "temperature": 1.0, "update_every": max(args.steps // 5, 1), "eval_windows": 64}
    setups = {
        "CE only": ([{"name": "base", "model": BASE}], None),
        "teacher-guided (cache, forward KL τ=1, λ=0.5)": (
            [{"name": "base", "model": BASE, "distill": {"objective": "forward_kl", "temperature": 1.0,
                                                           "ce_weight": 0.5}}], None),
        "WML, 3 peers (teacher-less)": (peers3, wml),
        "WML, 3 peers + cached teacher as fixed peer (ω_T=0.25)": (
            peers3, {**wml, "fixed_peers": ["teacher"], "fixed_weights": [0.25]}),
    }
    rows, trajectories = [], {}
    for label, (peers, mutual) in setups.items():
        per_seed: dict[str, list[float]] = {}
        walls = []
        for seed in range(args.seeds):
            out = work / "quality" / f"{label.split(' ')[0]}-{len(peers)}-{bool(mutual and mutual.get('fixed_peers'))}-s{seed}"
            ps = [{**p, "seed": 100 * seed + i} for i, p in enumerate(peers)]
            c = load_cohort_config({"name": label, "output": str(out), "seed": seed, "cache": str(cache),
                                    "peers": ps, "mutual": mutual, **common})
            done = out / "summary.json"
            if args.reuse and done.exists():  # a finished run of the same config (the work dir is the bench's own)
                s = json.loads(done.read_text())
            else:
                s = run_cohort(c, force=True, progress=False)
            walls.append(s["wall_s"])
            if mutual:
                trajectories.setdefault(label, []).append(_weight_trajectory(out))
            for p in peers:
                per_seed.setdefault(p["name"], []).append(full_dev(out / "peers" / p["name"]))
        rows.append({"setup": label, "dev": per_seed, "wall_s": statistics.mean(walls),
                     "weights": trajectories.get(label)})
        print(f"  {label}: base {statistics.mean(per_seed['base']):.4f}", flush=True)
    return rows


def _weight_trajectory(cohort_dir: Path) -> dict:
    """The cohort's ω records: members, and (step, ω) at the start and after each update."""
    recs = [json.loads(x) for x in (cohort_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r.get("kind") == "weights"]
    return {"members": recs[0]["members"], "steps": [r["step"] for r in recs], "weights": [r["weights"] for r in recs]}


def plot_weights(rows: list[dict], path: Path) -> None:
    """One panel per WML setup: every member's ω against the step, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wml = [r for r in rows if r.get("weights")]
    fig, axes = plt.subplots(1, len(wml), figsize=(5.5 * len(wml), 3.8), squeeze=False)
    for ax, r in zip(axes[0], wml):
        colours = {}
        for traj in r["weights"]:
            for j, name in enumerate(traj["members"]):
                line, = ax.plot(traj["steps"], [w[j] for w in traj["weights"]], marker="o", ms=3, alpha=0.8,
                                color=colours.get(name), label=None if name in colours else name)
                colours.setdefault(name, line.get_color())
        ax.set_title(r["setup"], fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("peer weight ω")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ms(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.4f} ± {sd:.4f} (min {min(xs):.4f}, max {max(xs):.4f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--mb", type=float, default=1.5)
    ap.add_argument("--vocab-size", type=int, default=2000)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--grid-steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--skip", choices=["a", "b"], default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--reuse", action="store_true",
                    help="(b) take the finished runs already in --work instead of training them again")
    args = ap.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"no data at {args.data}; pass --data DIR")
    import torch

    torch.set_num_threads(1)
    repo = Path(__file__).resolve().parents[1]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_cohort_"))
    t_start = time.perf_counter()
    store, _, cache = prepare_inputs(work, args)
    print(f"inputs ready in {time.perf_counter() - t_start:.0f} s ({work})", flush=True)
    lines, notes = [], []
    if args.skip != "a":
        g = bench_grid(work, store, cache, args, repo)
        ratio, in_ratio = g["t_grid"] / g["t_sep"], g["train_wall_grid"] / g["train_wall_sep"]
        lines += ["### (a) 4-student grid from one pass vs 4 separate runs (same steps)", "",
                  "| measure | grid (one process) | 4 separate runs | ratio |", "|---|---|---|---|",
                  f"| wall time, CLI processes (median of {args.repeats}) | {g['t_grid']:.1f} s | {g['t_sep']:.1f} s | "
                  f"{ratio:.2f} |",
                  f"| training loop only (summary wall_s) | {g['train_wall_grid']:.1f} s | {g['train_wall_sep']:.1f} s | "
                  f"{in_ratio:.2f} |",
                  f"| loader alone, one pass ({args.grid_steps} batches) | {g['loader_s']:.2f} s | "
                  f"{4 * g['loader_s']:.2f} s | |", ""]
        notes.append(f"(a) runs: grid {', '.join(f'{x:.1f}' for x in g['grid_runs'])} s; separate "
                     f"{', '.join(f'{x:.1f}' for x in g['sep_runs'])} s. The saving is what is done once instead of "
                     f"four times: interpreter and torch start-up, store/cache opening, and the read+decode of the "
                     f"batches (measured alone above). The rest of the grid's time is the four students' own "
                     f"forward/backward/loss/optimizer work, which a grid cannot share.")
        print("\n".join(lines), flush=True)
    if args.skip != "b":
        rows = bench_quality(work, store, cache, args)
        base = {r["setup"]: r["dev"]["base"] for r in rows}
        lines += [f"### (b) dev loss at {args.steps} steps, whole dev split, {args.seeds} seeds (mean ± sd)", "",
                  "| setup | dev loss, base-shape student | other peers | mean loop wall_s |", "|---|---|---|---|"]
        for r in rows:
            others = "; ".join(f"{n}: {statistics.mean(v):.4f}" for n, v in r["dev"].items() if n != "base")
            lines.append(f"| {r['setup']} | {_ms(r['dev']['base'])} | {others or '-'} | {r['wall_s']:.1f} |")
        lines.append("")
        for r in rows:
            if not r.get("weights"):
                continue
            members = r["weights"][0]["members"]
            start = r["weights"][0]["weights"][0]
            final = [[t["weights"][-1][j] for t in r["weights"]] for j in range(len(members))]
            lines.append(f"ω of {r['setup']}, start → after the last update (step "
                         f"{r['weights'][0]['steps'][-1]}), mean ± sd over seeds: "
                         + "; ".join(f"{n} {start[j]:.3f} → {statistics.mean(final[j]):.3f} ± "
                                     f"{statistics.stdev(final[j]) if len(final[j]) > 1 else 0.0:.3f}"
                                     for j, n in enumerate(members)))
            lines.append("")
        plot = Path(__file__).resolve().parent / "results" / f"cohort_weights_{hardware_tag()}_{_dt.date.today()}.png"
        plot_weights(rows, plot)
        notes.append(f"ω trajectories: `{plot.name}` (one line a member and seed).")
        keys = list(base)

        def verdict(a: str, b: str) -> str:
            # Rows are paired by seed (same window order, same initialisation of the base-shape student), so the
            # per-seed differences are compared with their own spread.
            diffs = [x - y for x, y in zip(base[a], base[b])]
            d = statistics.mean(diffs)
            sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            word = "unresolved (|mean| ≤ sd)" if abs(d) <= sd else ("lower" if d < 0 else "higher")
            per = ", ".join(f"{x:+.4f}" for x in diffs)
            return f"{a} − {b}, paired by seed: {d:+.4f} ± {sd:.4f} nats ({per}): {word}"

        notes += [verdict(keys[2], keys[1]), verdict(keys[2], keys[0]), verdict(keys[1], keys[0]),
                  verdict(keys[3], keys[1])]
        notes.append("The seed paper's claim (teacher-less WML matches or beats teacher-guided distillation) is judged "
                     "from the first line above for these tiny models and steps. A WML row trains three peers, so it "
                     "costs about three peers' compute (see the wall_s column): at equal compute CE would get more "
                     "steps.")
        print("\n".join(lines[-(len(rows) + 8):]), flush=True)
    config = {"data": f"{args.data} (first {args.mb} MB, evenly over its files)", "vocab": args.vocab_size,
              "window": 128, "batch": f"{args.batch_size} windows", "top_k": args.k,
              "teacher": f"{TEACHER} trained {args.teacher_steps} steps", "base student": BASE,
              "WML peers": f"base {BASE}, wide {WIDE}, deep {DEEP}", "grid steps": args.grid_steps,
              "quality steps": args.steps, "seeds": args.seeds, "threads": 1,
              "total wall": f"{time.perf_counter() - t_start:.0f} s"}
    path = write_result("cohort", "Cohorts: variant grid from one pass, and mutual learning vs distillation", config,
                        "\n".join(lines), "\n\n".join(notes))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
