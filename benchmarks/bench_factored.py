"""The factored cache's rebuild: how close the logits rebuilt from a factored cache are to the teacher's own.

On a subset of babylm_like (`--data`, default ../shared/data/babylm_like; skipped cleanly when absent) with a BPE
tokenizer trained on it, a teacher (LLaMA, `--hidden` wide: d; default 192 with V=2000, the demo teacher's shape) is
trained for `--teacher-steps` steps; then `precompute` writes, over the same dev windows, a --full cache (fp16
logits), factored caches in int8, bf16 and fp16, and compressed ones (`--factored-rank r`, the basis fitted on
train windows, measured on dev). For each: bytes a position (the per-position arrays; the output layer stored once
separately), and the mean over the dev positions of KL(full ‖ rebuilt) and KL(rebuilt ‖ full) at τ=1 and τ=2 in
float64 against the teacher's fp32 logits, with the worst position's KL.

Writes benchmarks/results/factored_<hardware>_<date>.md.

    python benchmarks/bench_factored.py              # ~8 min on 2 shared CPU cores (the teacher's training)
    python benchmarks/bench_factored.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

FULL = dict(text_mb=0.3, vocab_size=2000, seq_len=64, hidden=192, teacher_steps=400, teacher_budget=600.0,
            batch_size=8, ranks="64,96,128")
QUICK = dict(text_mb=0.03, vocab_size=400, seq_len=32, hidden=32, teacher_steps=20, teacher_budget=5.0, batch_size=4,
             ranks="8")


def log(msg: str) -> None:
    print(f"[bench_factored {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one, removed after)")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--teacher", default=None,
                    help="a teacher already trained on this store's settings (skips the training; its run directory)")
    for k, v in FULL.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=None)
    args = ap.parse_args()
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def kl_stats(z_ref, z) -> dict[str, float]:
    """Mean and max over positions of KL(ref ‖ z) and KL(z ‖ ref) at τ 1 and 2 (float64 inputs (P, V))."""
    from cachekd.factored import kl_rows

    out = {}
    for tau in (1.0, 2.0):
        fwd, rev = kl_rows(z_ref, z, tau), kl_rows(z, z_ref, tau)
        out[f"fwd{tau:g}"], out[f"rev{tau:g}"] = float(fwd.mean()), float(rev.mean())
        out[f"max{tau:g}"] = float(max(fwd.max(), rev.max()))
    return out


def main() -> None:
    args = parse_args()
    from _common import DEFAULT_DATA, write_result

    data = Path(args.data) if args.data else DEFAULT_DATA
    if not data.is_dir() or not any(data.iterdir()):
        print(f"bench_factored: no data at {data}; skipped (pass --data DIR with text files).")
        return
    import numpy as np
    import torch

    from bench_fidelity import train_cfg
    from bench_train import write_text_subset
    from cachekd.cache.reader import LogitCache
    from cachekd.cache.summary import bytes_per_array, factor_bytes
    from cachekd.factored import block_logits
    from cachekd.models import load_model, quiet_transformers
    from cachekd.precompute import PrecomputeConfig, precompute
    from cachekd.tokens import PrepareConfig, TokenStore, prepare
    from cachekd.trainer import run

    quiet_transformers()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_factored_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        sub = work / "text"
        write_text_subset(data, sub, args.text_mb * 1e6)
        store_dir = work / "store"
        prepare(PrepareConfig(inputs=[str(sub)], output=str(store_dir), seq_len=args.seq_len,
                              vocab_size=args.vocab_size, dev_fraction=0.1), progress=False, force=True)
        store = TokenStore.open(store_dir)
        teacher = {"arch": "llama", "hidden_size": args.hidden, "num_layers": 4, "num_heads": 4,
                   "intermediate_size": args.hidden * 8 // 3}
        t0 = time.perf_counter()
        if args.teacher:
            import json

            shutil.copytree(args.teacher, work / "teacher", dirs_exist_ok=True)
            info = json.loads((work / "teacher" / "summary.json").read_text())
        else:
            info = run(train_cfg("teacher", work / "teacher", str(store_dir), teacher, lr=2e-3,
                                 steps=args.teacher_steps, batch=args.batch_size, seed=0,
                                 max_time_s=args.teacher_budget), force=True, progress=False)
        log(f"teacher d={args.hidden}: {info['steps']} steps in {time.perf_counter() - t0:.0f} s, dev loss "
            f"{info['final_dev_loss']:.4f}")
        n = store.num_windows("dev")
        x = torch.from_numpy(store.read("dev", 0, n).astype(np.int64))
        model = load_model(work / "teacher").eval()
        with torch.inference_mode():
            z = torch.cat([model(input_ids=x[i:i + 32]).logits for i in range(0, n, 32)])
        z = z[..., : store.vocab_size].double().reshape(-1, store.vocab_size)  # (P, V) the fp32 logits, in float64
        lp = torch.log_softmax(z, -1)
        entropy = float(-(lp.exp() * lp).sum(-1).mean())
        kinds: list[tuple[str, dict[str, Any]]] = [("full fp16", dict(full=True))]
        kinds += [(f"factored {dt}", dict(factored=True, factored_dtype=dt)) for dt in ("int8", "bf16", "fp16")]
        kinds += [(f"factored int8 rank {r}", dict(factored=True, factored_rank=int(r)))
                  for r in args.ranks.split(",") if int(r) < args.hidden]
        rows = []
        for name, kw in kinds:
            out = work / name.replace(" ", "-")
            t0 = time.perf_counter()
            precompute(PrecomputeConfig(store=str(store_dir), teachers=[str(work / "teacher")], output=str(out),
                                        splits=["train", "dev"], device="cpu", **kw), force=True, progress=False)
            seconds = time.perf_counter() - t0
            cache = LogitCache.open(out)
            t = cache.teachers[0]
            block = cache.read("dev", 0, n)[t]
            got = (torch.from_numpy(block.logits).double() if block.logits is not None
                   else block_logits(cache, t, block, torch.float64)).reshape(-1, store.vocab_size)
            per_pos = bytes_per_array(cache)
            once = factor_bytes(cache) if cache.mode == "factored" else {}
            rows.append({"name": name, "bytes": sum(per_pos.values()), "arrays": per_pos,
                         "once_kb": sum(once.values()) / 1024, "seconds": seconds, **kl_stats(z, got)})
            log(f"{name}: {rows[-1]['bytes']:.1f} B/position, KL τ=1 {rows[-1]['fwd1']:.2e} / {rows[-1]['rev1']:.2e}")
        table = ["| cache | B/position | stored once (KB) | KL(full‖r) τ=1 | KL(r‖full) τ=1 | KL(full‖r) τ=2 | "
                 "KL(r‖full) τ=2 | worst position τ=1 / 2 | precompute s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            table.append(f"| {r['name']} | {r['bytes']:.1f} | {r['once_kb']:.0f} | {r['fwd1']:.2e} | {r['rev1']:.2e} | "
                         f"{r['fwd2']:.2e} | {r['rev2']:.2e} | {r['max1']:.1e} / {r['max2']:.1e} | "
                         f"{r['seconds']:.1f} |")
        notes = (f"Teacher: LLaMA d={args.hidden}, 4 layers, V={store.vocab_size}, {info['steps']} steps, dev loss "
                 f"{info['final_dev_loss']:.4f}, mean entropy {entropy:.3f} nats on the {z.shape[0]} dev positions "
                 f"measured. KL in nats a position, float64, against the teacher's fp32 logits on the CPU. "
                 f"B/position: the per-position arrays of both splits over their positions (factored: h and its "
                 f"scale; per array: " + "; ".join(f"{r['name']}: " + ", ".join(f"{k} {v:g}" for k, v in
                                                                                r['arrays'].items()) for r in rows)
                 + "). Stored once: the output layer (float32 weight V×d or V×r, bias, scales, basis). The compressed "
                 f"forms' basis is fitted on 256 train windows and measured on dev.")
        path = write_result("factored", "Factored cache: the rebuilt logits against the teacher's", {
            "text_mb": args.text_mb, "vocab_size": store.vocab_size, "seq_len": args.seq_len, "hidden": args.hidden,
            "teacher_steps": info["steps"], "dev_positions": int(z.shape[0])}, "\n".join(table), notes,
            args.results_dir)
        print("\n".join(table))
        log(f"wrote {path}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
