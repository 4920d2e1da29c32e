"""Fidelity of sparse caches: does a student distilled from a cache learn what the full teacher teaches?

On a subset of babylm_like (`--data`, default ../shared/data/babylm_like; skipped cleanly when absent) with a BPE
tokenizer trained on it, one teacher (LLaMA hidden 128, 4 layers: 1.3M parameters at V=2000) is trained for
`--teacher-steps` steps (`--teacher-budget` seconds at most); then students (LLaMA hidden 64, 2 layers: 0.36M) are
trained for the same number of steps, paired by seed (the seed sets the init and the data order, identical across
rows), from:

    CE          cross-entropy only (the baseline)
    full        the teacher run live at every step (online): the full target
    top-k bucket / top-k renormalize    a top-64 cache, tail as one bucket / dropped
    sampled     a sampled cache, N=50 draws per position (one proposal per cached τ)
    hybrid      the exact top-16 plus N=50 draws from beyond it
    wide hybrid the exact top-64 (the top-k cache's k) plus N=50 draws from beyond it: all the top-k cache holds
    factored    `precompute --factored`: the input of the teacher's output layer in int8 (the exact form) and the
                layer once; every logit rebuilt at training time
    factored-rR the compressed form, `--factored-rank R` (`--factored-rank`, default d/2 = 64)

for forward KL at τ=1 and τ=2 and reverse KL at τ=1, λ = 0.5; and the two settings whose targets are dense, built
from a cache's stored ids with the rest spread evenly (`tail_mode: uniform`) or shaped like the student (`bucket`,
the default):

    rkl1mix     ChooBaCa's preset: reverse KL, τ=1, target logits α·z_T + (1−α)·z_S with α from 0.9 to 0.5
    fkl2ens     Baby Llama's: forward KL, τ=2, two teachers (a second, GPT-2-shaped teacher is trained), raw
                logits averaged; also from caches of the combination made at precompute time
                (`precompute --ensemble logits`): ens-sampled (N=50), ens-hybrid (top-16 + 50), ens-factored
                (`--ensemble logits --factored`: the combination exact in one factored teacher); its factored rows
                hold both teachers factored and combine them at training time

For each row: bytes/position of
the cache, the gradient angle to the full target (``cachekd.audit.audit_targets`` on dev positions, with the CE
student of the first seed as the student), the whole-dev-split loss (mean ± standard deviation over seeds) and the
share of the full-KD gain kept, (CE − X)/(CE − full), per seed then mean ± standard deviation; a gain that is not
larger than its spread is reported as "not resolved". Also measured: the importance-weight variance of τ=2 targets
drawn at τ_r=1 against own draws (the default proposal), the ragged-layout choice (padded with count 0 vs
offsets: bytes and read time of the same chunk), and the bytes of a sampled N cache against the teacher's entropy
(the same teacher's distributions sharpened by caching τ < 1: distinct ids, and so bytes, follow the entropy).

`--rows factored,factored-r64,ens-factored` runs only those cache rows (and the CE and full references each share
needs; the sampled-cache extras below are then skipped, the hybrid cache is still written for its bytes).

Writes benchmarks/results/fidelity_<hardware>_<date>.md.

    python benchmarks/bench_fidelity.py              # 13 min on 2 CPU cores shared with other jobs
    python benchmarks/bench_fidelity.py --quick      # smoke run (a test runs it): 15 s idle, ~3 min loaded
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

STUDENT = {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 172}
TEACHER = {"arch": "llama", "hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 344}
# Sized for ~30 min on 2 cores shared with other jobs (a 2-core machine does ~1 teacher step/s at these sizes when
# idle): the vocabulary and windows are smaller than babylm_like's usual settings so that every row gets 3 seeds.
FULL = dict(text_mb=0.3, vocab_size=2000, seq_len=64, teacher_steps=400, teacher_budget=900.0, steps=80,
            batch_size=8, seeds=3, top_k=64, sample=50, hybrid_top_k=16, audit_positions=1024,
            settings="fkl2,rkl1,fkl1,rkl1mix,fkl2ens", factored_rank=64, rows="")
QUICK = dict(text_mb=0.03, vocab_size=400, seq_len=32, teacher_steps=30, teacher_budget=5.0, steps=3, batch_size=4,
             seeds=1, top_k=16, sample=10, hybrid_top_k=4, audit_positions=64, settings="fkl2,rkl1mix,fkl2ens",
             factored_rank=16, rows="")
TEACHER2 = {"arch": "gpt2", "hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 512}
# setting: (objective, τ, extra distill options); the dense-target settings (mixing, several teachers by logits)
# have a top-k row with the uniform tail instead of bucket/renormalize, which cannot form a dense target.
CHOOBACA_ALPHA = {"kind": "epoch_linear", "start": 0.9, "end": 0.5}
SETTINGS: dict[str, tuple[str, float, dict[str, Any]]] = {
    "fkl1": ("forward_kl", 1.0, {}), "fkl2": ("forward_kl", 2.0, {}), "rkl1": ("reverse_kl", 1.0, {}),
    "rkl1mix": ("reverse_kl", 1.0, {"alpha": CHOOBACA_ALPHA}),
    "fkl2ens": ("forward_kl", 2.0, {"teacher_combine": "logits"}),
}
ENSEMBLE = "fkl2ens"
SHARPEN_TAUS = (0.25, 0.5, 0.75)


def setting_rows(setting: str, rank: int, only: list[str] | None = None) -> list[str]:
    """The rows of a setting: dense-target settings take the top-k cache with the uniform or the bucket tail (the
    rest shaped like the student), and the sampled cache with either (the other sampled rows: bucket); every
    setting takes the factored caches (exact and rank `rank`). `only`: those rows (and full) alone."""
    fac = ["factored", f"factored-r{rank}"]
    if SETTINGS[setting][2]:
        rows = ["full", "top-k uniform", "top-k bucket", "sampled uniform", "sampled", "hybrid", "wide hybrid", *fac]
        rows += ["ens-sampled", "ens-hybrid", "ens-factored"] if setting == ENSEMBLE else []
    else:
        rows = ["full", "top-k bucket", "top-k renormalize", "sampled", "hybrid", "wide hybrid", *fac]
    return rows if not only else [r for r in rows if r == "full" or r in only]
STUDENT_LR, TEACHER_LR, CE_WEIGHT = 3e-3, 2e-3, 0.5


def log(msg: str) -> None:
    print(f"[bench_fidelity {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one, removed after)")
    ap.add_argument("--results-dir", default=None, help="where the Markdown goes (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true")
    for k, v in FULL.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=None)
    args = ap.parse_args()
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def train_cfg(name: str, out: Path, store: str, model: dict, *, lr: float, steps: int, batch: int, seed: int,
              distill: dict | None = None, max_time_s: float | None = None):
    from cachekd.train_config import load_train_config

    return load_train_config({
        "name": name, "output": str(out), "seed": seed, "device": "cpu", "precision": "fp32", "model": dict(model),
        "data": {"store": store, "batch_size": batch, "eval_windows": 0},
        "optim": {"lr": lr, "weight_decay": 0.1, "warmup_steps": max(1, steps // 10), "max_steps": steps,
                  "max_time_s": max_time_s},
        "distill": distill, "log_every": 1000, "save_every": 0,
    })


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def proposal_variance(z, tau: float = 2.0, tau_r: float = 1.0) -> dict[str, float]:
    """Per position, Σ_v Var(w_v) of τ targets drawn at τ_r over that of own draws (N cancels):
    Σ (p²/r − p²) / Σ p(1 − p); mean and median over positions, and the largest."""
    import torch

    logp = torch.log_softmax(z.double() / tau, -1)
    logr = torch.log_softmax(z.double() / tau_r, -1)
    p = logp.exp()
    imp = (torch.exp(2 * logp - logr) - p * p).sum(-1)
    own = (p * (1 - p)).sum(-1)
    ratio = (imp / own).flatten()
    return {"mean": float(ratio.mean()), "median": float(ratio.median()), "max": float(ratio.max())}


def layout_measure(cache_dir: Path, tmp: Path) -> dict[str, float]:
    """The first train chunk of a sampled cache in its padded layout against an offsets layout of the same data
    (the real entries concatenated, one count of distinct ids per position), same codecs: bytes and read time."""
    import numpy as np
    import zarr

    from cachekd.cache import format as fmt
    from cachekd.cache.reader import LogitCache

    cache = LogitCache.open(cache_dir)
    t = cache.teachers[0]
    names = ("sample_ids", "sample_logprobs", "sample_counts")
    start, stop = cache.chunk_range("train", 0)
    raw = {n: zarr.open_array(str(cache_dir / fmt.array_path("train", t, n)), mode="r")[start:stop] for n in names}
    padded_bytes = sum(f.stat().st_size for n in names
                       for f in fmt.chunk_files(cache._array("train", t, n), cache_dir / fmt.array_path("train", t, n),
                                                start, stop))
    real = raw["sample_counts"].sum(-1) > 0  # (n, L, W)
    num = real.sum(-1).astype(np.uint8)  # distinct ids per position (W ≤ 255 here)
    flat = {"sample_ids": raw["sample_ids"][real], "sample_logprobs": raw["sample_logprobs"][real],
            "sample_counts": raw["sample_counts"][real], "num_ids": num.reshape(-1)}
    # ids: the first of each position absolute, then deltas (as stored: the first delta is the id itself)
    root = tmp / "offsets"
    if root.exists():
        shutil.rmtree(root)
    g = zarr.open_group(str(root), mode="w", zarr_format=3)
    for n, a in flat.items():
        arr = g.create_array(n, shape=a.shape, chunks=a.shape, dtype=a.dtype,
                             compressors=fmt.compressors(a.dtype.itemsize, n if n in fmt.CLEVEL else "ids"))
        arr[...] = a
    off_bytes = sum(f.stat().st_size for f in root.rglob("c/*") if f.is_file()) + \
        sum(f.stat().st_size for f in root.rglob("c") if f.is_file())

    def read_padded():
        return [zarr.open_array(str(cache_dir / fmt.array_path("train", t, n)), mode="r")[start:stop] for n in names]

    def read_offsets():
        parts = {n: zarr.open_array(str(root / n), mode="r")[...] for n in flat}
        counts = parts["num_ids"].astype(np.int64)
        width = raw["sample_ids"].shape[-1]
        mask = np.arange(width)[None, :] < counts[:, None]  # back to the padded form the losses take
        out = np.zeros((len(counts), width), dtype=parts["sample_ids"].dtype)
        out[mask] = parts["sample_ids"]
        return out

    def best(fn, n=7):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    positions = real.shape[0] * real.shape[1]
    return {"padded_B_per_pos": padded_bytes / positions, "offsets_B_per_pos": off_bytes / positions,
            "padded_read_ms": 1e3 * best(read_padded), "offsets_read_ms": 1e3 * best(read_offsets),
            "positions": positions, "width": int(raw["sample_ids"].shape[-1]),
            "mean_distinct": float(num.mean())}


def main() -> None:
    args = parse_args()
    from _common import DEFAULT_DATA, write_result

    data = Path(args.data) if args.data else DEFAULT_DATA
    if not data.is_dir() or not any(data.iterdir()):
        print(f"bench_fidelity: no data at {data}; skipped (pass --data DIR with text files).")
        return
    import torch

    from bench_train import write_text_subset
    from cachekd.audit import AuditOptions, audit_targets
    from cachekd.cache.reader import LogitCache
    from cachekd.models import load_model, quiet_transformers
    from cachekd.precompute import PrecomputeConfig, precompute
    from cachekd.tokens import PrepareConfig, TokenStore, prepare
    from cachekd.trainer import run

    quiet_transformers()
    t_start = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_fidelity_"))
    work.mkdir(parents=True, exist_ok=True)
    settings = [s for s in args.settings.split(",") if s]
    only = [r for r in args.rows.split(",") if r] or None
    rank_row = f"factored-r{args.factored_rank}"
    try:
        sub = work / "text"
        write_text_subset(data, sub, args.text_mb * 1e6)
        store_dir = work / "store"
        prepare(PrepareConfig(inputs=[str(sub)], output=str(store_dir), seq_len=args.seq_len,
                              vocab_size=args.vocab_size, dev_fraction=0.1), progress=False, force=True)
        store = TokenStore.open(store_dir)
        log(f"store: {store.num_windows('train')} train / {store.num_windows('dev')} dev windows, "
            f"vocab {store.vocab_size}")
        teacher_dir = work / "teacher"
        t0 = time.perf_counter()
        tinfo = run(train_cfg("teacher", teacher_dir, str(store_dir), TEACHER, lr=TEACHER_LR, steps=args.teacher_steps,
                              batch=args.batch_size, seed=0, max_time_s=args.teacher_budget), force=True,
                    progress=False)
        log(f"teacher: {tinfo['steps']} steps in {time.perf_counter() - t0:.0f} s, dev loss "
            f"{tinfo['final_dev_loss']:.4f}")
        teachers = [str(teacher_dir)]
        tinfo2 = None
        if ENSEMBLE in settings:  # Baby Llama's second teacher: another family, another seed
            teacher2_dir = work / "teacher2"
            t0 = time.perf_counter()
            tinfo2 = run(train_cfg("teacher2", teacher2_dir, str(store_dir), TEACHER2, lr=TEACHER_LR,
                                   steps=args.teacher_steps, batch=args.batch_size, seed=1,
                                   max_time_s=args.teacher_budget), force=True, progress=False)
            teachers.append(str(teacher2_dir))
            log(f"teacher2: {tinfo2['steps']} steps in {time.perf_counter() - t0:.0f} s, dev loss "
                f"{tinfo2['final_dev_loss']:.4f}")
        temps = sorted({SETTINGS[s][1] for s in settings})
        caches = {"top-k": dict(top_k=args.top_k), "sampled": dict(top_k=0, sample=args.sample),
                  "hybrid": dict(top_k=args.hybrid_top_k, sample=args.sample),
                  "wide": dict(top_k=args.top_k, sample=args.sample)}
        if ENSEMBLE in settings:  # the two teachers combined at precompute time, cached as one teacher
            caches |= {"ens-sampled": dict(top_k=0, sample=args.sample, ensemble="logits"),
                       "ens-hybrid": dict(top_k=args.hybrid_top_k, sample=args.sample, ensemble="logits"),
                       "ens-factored": dict(factored=True, ensemble="logits")}
        caches |= {"factored": dict(factored=True), rank_row: dict(factored=True, factored_rank=args.factored_rank)}
        if only:  # the caches of the rows asked for, and the default hybrid for its bytes
            wanted = {r.split()[0] for s_ in settings for r in setting_rows(s_, args.factored_rank, only)} | {"hybrid"}
            caches = {k: v for k, v in caches.items() if k in wanted}
        cache_info: dict[str, dict[str, Any]] = {}
        for name, kw in caches.items():
            out = work / f"cache-{name}"
            t0 = time.perf_counter()
            r = precompute(PrecomputeConfig(store=str(store_dir), teachers=teachers, output=str(out),
                                            temperatures=temps, splits=["train"], device="cpu", **kw),
                           force=True, progress=False)
            man = r["manifest"]
            cached = list(man["stats"]["train"])
            st = man["stats"]["train"][cached[0]]
            # bytes per position and teacher of the cache (both teachers when the ensemble setting runs; one, the
            # combined one, in an ens- cache)
            cache_info[name] = {"dir": out, "bytes": man["bytes_per_position"] / len(cached),
                                "seconds": time.perf_counter() - t0,
                                "distinct": st.get("mean_distinct_ids"), "mass": st.get("mean_topk_mass", {}),
                                "rebuild_kl": {t_: man["stats"]["train"][t_]["mean_rebuild_kl"] for t_ in cached
                                               if "mean_rebuild_kl" in man["stats"]["train"][t_]}}
            log(f"cache {name}: {cache_info[name]['bytes']:.1f} B/position a teacher, {time.perf_counter() - t0:.0f} s")
        # bytes with a single cached τ (the dev split, for size only)
        single: dict[str, float] = {}
        for name in (() if only else ("sampled", "hybrid")):
            for tau in temps:
                out = work / f"cache-{name}-t{tau:g}"
                r = precompute(PrecomputeConfig(store=str(store_dir), teachers=[str(teacher_dir)], output=str(out),
                                                temperatures=[tau], splits=["dev"], device="cpu", **caches[name]),
                               force=True, progress=False)
                m = r["manifest"]
                single[f"{name} τ={tau:g}"] = m["bytes_per_position"]
                single[f"{name} τ={tau:g} distinct ids"] = next(iter(m["stats"]["dev"].values()))["mean_distinct_ids"]
        # sharper distributions of the same teacher (τ < 1): bytes and distinct ids of sampled N against entropy
        sharpen: list[dict[str, float]] = []
        for tau in (() if only else (*SHARPEN_TAUS, 1.0, 2.0)):
            out = work / f"cache-sharpen-t{tau:g}"
            r = precompute(PrecomputeConfig(store=str(store_dir), teachers=[str(teacher_dir)], output=str(out),
                                            temperatures=[tau], splits=["dev"], device="cpu", top_k=0,
                                            sample=args.sample), force=True, progress=False)
            m = r["manifest"]
            st = next(iter(m["stats"]["dev"].values()))
            c = LogitCache.open(out)
            block = c.read("dev", 0, c.num_windows("dev"))[c.teachers[0]]  # the exact H_τ the cache stores
            sharpen.append({"tau": tau, "entropy": float(block.entropy.mean()), "distinct": st["mean_distinct_ids"],
                            "bytes": m["bytes_per_position"]})
            shutil.rmtree(out, ignore_errors=True)
        log(f"sharpen: {sharpen}")
        layout = layout_measure(cache_info["sampled"]["dir"], work) if "sampled" in cache_info else {}
        log(f"layout: {layout}")

        results: dict[str, dict[str, list[float]]] = {}
        ce_loss: list[float] = []
        for seed in range(args.seeds):
            s = run(train_cfg(f"ce-{seed}", work / f"ce-{seed}", str(store_dir), STUDENT, lr=STUDENT_LR,
                              steps=args.steps, batch=args.batch_size, seed=seed), force=True, progress=False)
            ce_loss.append(s["final_dev_loss"])
            log(f"CE seed {seed}: dev {s['final_dev_loss']:.4f}")
        # gradient angles: the CE student of seed 0 on dev positions, against the teacher's full target
        teacher = load_model(teacher_dir).eval()
        student = load_model(work / "ce-0" / "model").eval()
        n_win = max(1, min(store.num_windows("dev"), math.ceil(args.audit_positions / (args.seq_len - 1))))
        x = torch.from_numpy(store.read("dev", 0, n_win).astype("int64"))
        with torch.inference_mode():
            z = teacher(input_ids=x).logits[..., : store.vocab_size].float()
            zs = student(input_ids=x).logits[..., : store.vocab_size].float()
        angles: dict[str, dict[str, dict[str, float]]] = {}
        for setting in settings:
            objective, tau, extra = SETTINGS[setting]
            if extra:  # audit_targets knows one teacher without mixing
                continue
            angles[setting] = audit_targets(z, zs, [tau], AuditOptions(args.top_k, args.sample, args.hybrid_top_k,
                                                                       objective))
            wide = audit_targets(z, zs, [tau], AuditOptions(args.top_k, args.sample, args.top_k, objective))
            angles[setting].update({k: v for k, v in wide.items() if k.startswith("hybrid")})
        pv = proposal_variance(z)

        def write_report(done: list[str]) -> Path:
            audit_name = {"top-k bucket": f"top-{args.top_k} bucket", "top-k renormalize": f"top-{args.top_k} renormalize",
                          "sampled": f"sampled N={args.sample}",
                          "hybrid": f"hybrid top-{args.hybrid_top_k} + sampled N={args.sample}",
                          "wide hybrid": f"hybrid top-{args.top_k} + sampled N={args.sample}"}
            lines = ["| setting | row | B/position | captured mass | angle to full (°) | dev loss (mean ± sd) | "
                     "share of full-KD gain (mean ± sd) | differs from 100%? |", "|---|---|---|---|---|---|---|---|"]
            ce_m, ce_s = mean_sd(ce_loss)
            summary: dict[str, Any] = {"ce": ce_loss}
            for setting in done:
                _, tau, _ = SETTINGS[setting]
                lines.append(f"| {setting} | CE only | - | - | - | {ce_m:.4f} ± {ce_s:.4f} | 0 | - |")
                full = results[f"{setting}|full"]["dev"]
                gains = [c - f for c, f in zip(ce_loss, full)]
                g_m, g_s = mean_sd(gains)
                for row in setting_rows(setting, args.factored_rank, only):
                    dev = results[f"{setting}|{row}"]["dev"]
                    d_m, d_s = mean_sd(dev)
                    share = [(c - x_) / g if g != 0 else float("nan") for c, x_, g in zip(ce_loss, dev, gains)]
                    sh_m, sh_s = mean_sd(share)
                    resolved = g_m > (g_s if not math.isnan(g_s) else 0.0)
                    prec = 1 if sh_s < 0.05 else 0  # rows near 100% with a small spread: one more digit
                    share_txt = (f"{100 * sh_m:.{prec}f}% ± {100 * sh_s:.{prec}f}%" if resolved else
                                 "not resolved (full-KD gain ≤ its sd)")
                    # the share's difference to 100% against its spread over seeds
                    differs = ("-" if row == "full" or not resolved or math.isnan(sh_s) else
                               ("yes, below" if sh_m < 1 else "yes, above") if abs(1 - sh_m) > sh_s else
                               "not resolved")
                    if row == "full":
                        share_txt = f"100% (gain {g_m:+.4f} ± {g_s:.4f} nat)"
                    a = angles.get(setting, {}).get(audit_name.get(row, ""), {}).get(f"{tau:g}", {})
                    if row == "full":
                        a = {"captured_mass": 1.0, "grad_angle_deg": 0.0}
                    name = row.split()[0]
                    b = f"{cache_info[name]['bytes']:.1f}" if row != "full" else "-"
                    mass = f"{a['captured_mass']:.3f}" if a else "-"
                    ang = f"{a['grad_angle_deg']:.1f}" if a else "-"
                    lines.append(f"| {setting} | {row} | {b} | {mass} | {ang} | {d_m:.4f} ± {d_s:.4f} | {share_txt} | {differs} |")
                    summary[f"{setting}|{row}"] = {"dev": dev, "share": share, "angle": a.get("grad_angle_deg") if a
                                                   else None}
            elapsed = time.perf_counter() - t_start
            table = "\n".join(lines)
            print(table)
            teacher_txt = (f"Teacher: {tinfo['steps']} steps, dev loss {tinfo['final_dev_loss']:.4f}"
                           + (f"; second teacher (GPT-2 shape, {ENSEMBLE} only): {tinfo2['steps']} steps, dev loss "
                              f"{tinfo2['final_dev_loss']:.4f}" if tinfo2 else ""))
            sharpen_txt = "Sampled N={} cache of the same teacher at sharper temperatures (dev split, one τ each): ".format(
                args.sample) + "; ".join(f"τ={r['tau']:g}: entropy {r['entropy']:.2f} nats, {r['distinct']:.1f} distinct "
                                         f"ids, {r['bytes']:.1f} B/position" for r in sharpen) + "."
            notes = [
                f"{teacher_txt}; students {args.steps} steps "
                f"of {args.batch_size}×{args.seq_len} tokens, λ={CE_WEIGHT}, seeds {list(range(args.seeds))} (paired: "
                f"the seed sets init and data order). CE dev loss per seed {[round(v, 4) for v in ce_loss]}.",
                "Caches (train split, temperatures " + ", ".join(f"{t:g}" for t in temps) + "): " + "; ".join(
                    f"{n}: {c['bytes']:.1f} B/position, precompute {c['seconds']:.0f} s"
                    + (f", {c['distinct']:.1f} distinct ids/position" if c['distinct'] else "")
                    + (f", top-k mass {c['mass']}" if c['mass'] else "")
                    + (f", mean rebuild KL(teacher ‖ rebuilt) τ=1 over the train positions "
                       + ", ".join(f"{t_} {v:.2e}" for t_, v in c['rebuild_kl'].items()) if c['rebuild_kl'] else "")
                    for n, c in cache_info.items()) + ".",
                *(["With one cached τ (dev split): " + "; ".join(f"{k}: {v:.1f}" for k, v in single.items()) + ".",
                   sharpen_txt] if single else []),
                f"Dense-target settings ({', '.join(s_ for s_ in SETTINGS if SETTINGS[s_][2])}): ChooBaCa's α "
                f"{CHOOBACA_ALPHA}, per step (< 2 epochs); rows named uniform spread the rest of the stored ids' mass "
                f"evenly, the others (bucket) shape it like the student; no gradient angle (the audit takes one "
                f"teacher, no mixing). Caches hold both teachers when {ENSEMBLE} runs; the other settings name the first.",
                f"Importance-weight variance of τ=2 targets drawn at τ_r=1, relative to own draws at τ=2 (Σ Var w over the "
                f"vocabulary, per position): mean {pv['mean']:.2f}×, median {pv['median']:.2f}×, max {pv['max']:.1f}×.",
                *([f"Ragged layout, first train chunk of the sampled cache ({layout['positions']} positions, width "
                   f"{layout['width']}, {layout['mean_distinct']:.1f} distinct ids/position): padded with count 0 "
                   f"{layout['padded_B_per_pos']:.2f} B/position, read {layout['padded_read_ms']:.1f} ms; offsets "
                   f"{layout['offsets_B_per_pos']:.2f} B/position, read + scatter to the padded form "
                   f"{layout['offsets_read_ms']:.1f} ms."] if layout else []),
                f"Factored rows (factored, {rank_row}, ens-factored): every logit rebuilt at training time from the "
                f"stored h and output layer (int8; {rank_row}: --factored-rank {args.factored_rank}); no gradient angle "
                f"(audit_targets simulates sparse targets only). In {ENSEMBLE}, factored and {rank_row} hold both "
                f"teachers and combine them by logits at training time; ens-factored holds their combination.",
                f"Gradient angles: audit_targets on {n_win * (args.seq_len - 1)} dev positions, the CE student of seed 0 "
                f"as the student, simulated targets from the same full logits (no fixed-point rounding).",
                f"Total wall time {elapsed / 60:.1f} min.",
            ]
            config = {k: getattr(args, k) for k in FULL} | {"teacher": TEACHER, "student": STUDENT, "data": str(data)}
            path = write_result("fidelity", "Fidelity of sparse caches (students distilled from each storage option)",
                                config, table, "\n\n".join(notes), results_dir=args.results_dir)
            (path.with_suffix(".json")).write_text(json.dumps({"summary": summary, "angles": angles, "layout": layout,
                                                               "sharpen": sharpen,
                                                               "single_tau_bytes": single, "proposal_variance": pv,
                                                               "caches": {k: {kk: str(vv) if kk == "dir" else vv
                                                                              for kk, vv in v.items()}
                                                                          for k, v in cache_info.items()}}, indent=1))
            return path

        done: list[str] = []
        for setting in settings:
            objective, tau, extra = SETTINGS[setting]
            n_t = 2 if setting == ENSEMBLE else 1
            for row in setting_rows(setting, args.factored_rank, only):
                base = {"objective": objective, "temperature": tau, "ce_weight": CE_WEIGHT, **extra}
                if row == "full":
                    d = {**base, "online": True, "teachers": teachers[:n_t]}
                else:
                    cache = cache_info[row.split()[0]]["dir"]
                    words = row.split()
                    mode = words[1] if len(words) > 1 and words[1] in ("bucket", "uniform", "renormalize") else "bucket"
                    d = {**base, "cache": str(cache), "tail_mode": mode,
                         "teachers": [Path(t).name for t in teachers[:n_t]]}
                    if row.startswith("ens-"):  # one cached teacher, the combination: compared on its own
                        d["teachers"] = ["ensemble"]
                for seed in range(args.seeds):
                    tag = f"{setting}-{row}-{seed}".replace(" ", "_")
                    s = run(train_cfg(tag, work / "students" / tag, str(store_dir), STUDENT, lr=STUDENT_LR, steps=args.steps,
                                      batch=args.batch_size, seed=seed, distill=d), force=True, progress=False)
                    results.setdefault(f"{setting}|{row}", {}).setdefault("dev", []).append(s["final_dev_loss"])
                log(f"{setting} {row}: dev {results[f'{setting}|{row}']['dev']}")
            done.append(setting)
            path = write_report(done)
            log(f"wrote {path} with {', '.join(done)}")

        log(f"done ({(time.perf_counter() - t_start) / 60:.1f} min)")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
