"""precompute: wall time ÷ the bare teacher forward over the same windows, bytes/position per storage option,
write MB/s and positions/s.

Goal: precompute ≤ 1.15× the bare teacher forward; ≤ 110 bytes/position at k=64 on a trained teacher with the
stored top-k log-probabilities within 1e-3 of the fp32 values.

    python benchmarks/bench_precompute.py [--data DIR] [--mb 1.5] [--teacher DIR] [--device cuda]

`--only-scale` runs only the overhead-vs-size table (random-init teachers of `--scale`, no teacher training, no
storage table), with the storage kinds of `--scale-kinds` (default, top64, factored: `precompute --factored`,
int8), side by side with the bare forward in one run:

    python benchmarks/bench_precompute.py --only-scale --vocab-size 16000 --scale 512x8x8 --scale-kinds factored,default

Without --teacher it trains a small LLaMA teacher on the same text first (so the outputs are a real teacher's:
peaked where the text is predictable, unlike a random initialisation) and reports that time separately.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, write_result  # noqa: E402


def _subset_corpus(src: Path, dst: Path, mb: float) -> Path:
    """The first `mb` MB of text, taken evenly from each file of `src`."""
    files = sorted(p for p in (src.rglob("*") if src.is_dir() else [src]) if p.is_file())
    per = int(mb * 1e6 / max(len(files), 1))
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        text = f.read_bytes()[:per].decode("utf-8", errors="ignore")
        (dst / f.name).write_text(text[: text.rfind("\n\n")] if "\n\n" in text else text)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--mb", type=float, default=1.0, help="MB of text to run the teacher over")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--teacher", default=None, help="a trained HF teacher for this tokenizer (else one is trained)")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dev-fraction", type=float, default=0.15,
                    help="held-out share of the text: the storage and teacher-size tables run on it")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default=None, help="keep intermediate files here (default: a temp dir)")
    ap.add_argument("--scale", default="256x4x4,512x8x8,768x12x12",
                    type=lambda v: [tuple(int(x) for x in t.split("x")) for t in v.split(",") if t],
                    help="larger teachers HIDDENxLAYERSxHEADS for the overhead-vs-size table ('' to skip)")
    ap.add_argument("--scale-kinds", default="default,top64",
                    type=lambda v: [k for k in v.split(",") if k],
                    help="storage kinds of the overhead-vs-size table: default, top64, factored, "
                         "factored-stat-every-batch")
    ap.add_argument("--only-scale", action="store_true",
                    help="only the overhead-vs-size table (no teacher training, no storage table)")
    args = ap.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"no data at {args.data}; pass --data DIR")

    import numpy as np
    import torch

    from cachekd.cache.reader import LogitCache
    from cachekd.models import load_model
    from cachekd.precompute import PrecomputeConfig, autocast_dtype, precompute
    from cachekd.tokens import PrepareConfig, prepare
    from cachekd.train_config import load_train_config
    from cachekd.trainer import run

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_precompute_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        text = _subset_corpus(Path(args.data), work / "text", args.mb)
        store, _ = prepare(PrepareConfig(inputs=[str(text)], output=str(work / "tokens"), seq_len=128,
                                         vocab_size=args.vocab_size, dev_fraction=args.dev_fraction), progress=False)
        teacher_s = None
        if args.only_scale:
            pass
        elif args.teacher:
            teacher = Path(args.teacher)
        else:
            teacher = work / "teacher"
            if not (teacher / "summary.json").exists():
                t0 = time.perf_counter()
                run(load_train_config({
                    "name": "bench-teacher", "output": str(teacher), "device": args.device,
                    "model": {"arch": "llama", "hidden_size": 256, "num_layers": 4, "num_heads": 4,
                              "intermediate_size": 688},
                    "data": {"store": str(store.path), "batch_size": 16, "eval_windows": 64},
                    "optim": {"lr": 2e-3, "warmup_steps": 30, "max_steps": args.teacher_steps}, "save_every": 0}),
                    force=True, progress=False)
                teacher_s = time.perf_counter() - t0
        device = torch.device(args.device)
        amp = autocast_dtype("auto", device)
        if args.only_scale:
            return _scale_only(args, store, work, device, amp)
        model = load_model(teacher).to(device).eval()
        tokens = store.read("train", 0, store.num_windows("train"))
        positions = tokens.size

        def bare_forward() -> float:
            t0 = time.perf_counter()
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                for b in range(0, len(tokens), args.batch_size):
                    x = torch.from_numpy(tokens[b:b + args.batch_size].astype(np.int64)).to(device)
                    logits = model(input_ids=x).logits
                    logits[..., :1].cpu()  # the same device sync point as precompute's small copy
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        def ours(out: Path, split: str = "train", **kw) -> dict:
            if out.exists():
                shutil.rmtree(out)
            t0 = time.perf_counter()
            res = precompute(PrecomputeConfig(store=str(store.path), teachers=[str(teacher)], output=str(out),
                                              splits=[split], batch_size=args.batch_size, device=args.device, **kw),
                             progress=False)
            res["wall"] = time.perf_counter() - t0
            return res

        bare_forward()  # warm-up
        t_bare, t_ours, t_top = [], [], []
        for _ in range(args.repeats):  # interleaved: the default storage (a hybrid), a top-64 cache, the bare forward
            t_bare.append(bare_forward())
            t_ours.append(ours(work / "cache_default")["wall"])
            t_top.append(ours(work / "cache_k64", top_k=64)["wall"])
        mb_, mo, mt = statistics.median(t_bare), statistics.median(t_ours), statistics.median(t_top)

        def arrays_of(root: Path) -> tuple[float, str]:
            c = LogitCache.open(root)
            tdir = root / "train" / c.teachers[0]
            sizes = {a.name: sum(f.stat().st_size for f in a.rglob("*") if f.is_file()) / positions
                     for a in sorted(tdir.iterdir()) if a.is_dir()}
            return c.meta["bytes_on_disk"] / positions, ", ".join(f"{n} {b:.1f}" for n, b in sizes.items())

        cache = LogitCache.open(work / "cache_k64")
        b_default, arrays_default = arrays_of(work / "cache_default")
        b_top, arrays_top = arrays_of(work / "cache_k64")
        speed = ["| what | seconds | positions/s | ÷ bare forward |", "|---|---|---|---|",
                 f"| bare teacher forward ({positions:,} positions) | {mb_:.2f} | {positions / mb_:,.0f} | 1 |",
                 f"| cachekd precompute, default (hybrid top-16 + 50) | {mo:.2f} | {positions / mo:,.0f} | "
                 f"{mo / mb_:.3f} |",
                 f"| cachekd precompute, --top-k 64 | {mt:.2f} | {positions / mt:,.0f} | {mt / mb_:.3f} |", "",
                 f"**precompute ÷ bare forward: {mo / mb_:.3f}× default, {mt / mb_:.3f}× top-64** (goal ≤ 1.15×).", "",
                 f"**Train-split cache: {b_default:.1f} bytes/position default** ({arrays_default}); "
                 f"**{b_top:.1f} top-64** (goal ≤ 110: {arrays_top}); the rest metadata."]

        # Storage options (bytes/position on disk, the whole cache directory), on the dev split (smaller).
        dev_tokens = store.read("dev", 0, store.num_windows("dev"))
        dev_positions = dev_tokens.size
        few = len(dev_tokens)
        opts = [("top-64, step 1/512", dict(top_k=64)),
                ("top-64, step 1/256", dict(top_k=64, logprob_step=1 / 256)),
                ("top-32", dict(top_k=32)), ("top-128", dict(top_k=128)),
                ("top-64, one temperature", dict(top_k=64, temperatures=[1.0])),
                ("full fp16 logits", dict(full=True)),
                ("sampled N=50 (draws per τ)", dict(top_k=0, sample=50)),
                ("sampled N=50, one temperature", dict(top_k=0, sample=50, temperatures=[1.0])),
                ("hybrid top-16 + 50 (the default)", dict(top_k=16, sample=50)),
                ("hybrid top-64 + 50", dict(top_k=64, sample=50))]
        rows = ["| storage option | bytes/position | distinct sampled ids/position | precompute s (dev) | ÷ top-64 | "
                "max abs error of stored log-probs |", "|---|---|---|---|---|---|"]
        t_top64 = None
        z = None
        for name, kw in opts:
            t_opt = min(ours(work / "cache_opt", split="dev", **kw)["wall"] for _ in range(args.repeats))
            t_top64 = t_top64 or t_opt
            c = LogitCache.open(work / "cache_opt")
            bpp = c.meta["bytes_on_disk"] / dev_positions
            # precision on the first `few` windows against the fp32 teacher
            if z is None:
                with torch.inference_mode():
                    z = torch.cat([model(input_ids=torch.from_numpy(dev_tokens[b:b + 32].astype(np.int64)).to(device)).logits.float().cpu()
                                   for b in range(0, few, 32)])
                logp = torch.log_softmax(z.double(), -1).numpy()
            blk = c.read("dev", 0, few)[c.teachers[0]]
            if blk.logits is not None:
                err = float(np.abs(torch.log_softmax(torch.from_numpy(blk.logits.astype(np.float32)).double(), -1).numpy() - logp).max())
            else:
                errs = []
                if blk.ids is not None:
                    errs.append(float(np.abs(blk.logprobs - np.take_along_axis(logp, blk.ids, -1)).max()))
                if blk.sample_ids is not None:
                    real = blk.sample_counts.sum(-1) > 0
                    errs.append(float(np.abs(blk.sample_logprobs - np.take_along_axis(logp, blk.sample_ids, -1))[real].max()))
                err = max(errs)
            st = c.meta["stats"]["dev"][c.teachers[0]]
            distinct = f"{st['mean_distinct_ids']:.1f}" if "mean_distinct_ids" in st else "-"
            rows.append(f"| {name} | {bpp:.1f} | {distinct} | {t_opt:.2f} | {t_opt / t_top64:.2f}× | {err:.2e} |")
        # The overhead is a fixed cost per position (O(V) on the logits), so its share falls as the teacher grows:
        # the same measurement on the dev windows with larger (random-init: speed does not depend on training) teachers.
        from cachekd.models import ModelConfig, build_model

        scale_rows = [f"| teacher (dev split, {len(dev_tokens) * dev_tokens.shape[1]:,} positions) | params | bare forward s | "
                      "precompute s, default / top-64 | forward µs/position | extra µs/position, default / top-64 | "
                      "ratio, default / top-64 |", "|---|---|---|---|---|---|---|"]
        for hidden, layers, heads in args.scale:
            tdir = work / f"scale_{hidden}x{layers}"
            if not tdir.exists():
                torch.manual_seed(0)
                build_model(ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads,
                                        intermediate_size=int(hidden * 8 / 3) // 8 * 8), store.vocab_size, 128
                            ).save_pretrained(tdir)
            m_big = load_model(tdir).to(device).eval()
            nparams = sum(p.numel() for p in m_big.parameters())
            tb, tp, tk = [], [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    for b in range(0, len(dev_tokens), args.batch_size):
                        m_big(input_ids=torch.from_numpy(dev_tokens[b:b + args.batch_size].astype(np.int64)).to(device)
                              ).logits[..., :1].cpu()
                tb.append(time.perf_counter() - t0)
                out = work / "cache_scale"
                for times, kw in ((tp, {}), (tk, {"top_k": 64})):
                    if out.exists():
                        shutil.rmtree(out)
                    t0 = time.perf_counter()
                    precompute(PrecomputeConfig(store=str(store.path), teachers=[str(tdir)], output=str(out),
                                                splits=["dev"], batch_size=args.batch_size, device=args.device, **kw),
                               progress=False)
                    times.append(time.perf_counter() - t0)
            b_, p_, k_ = statistics.median(tb), statistics.median(tp), statistics.median(tk)
            us = 1e6 / dev_positions
            scale_rows.append(f"| llama {hidden}×{layers} | {nparams / 1e6:.1f}M | {b_:.2f} | {p_:.2f} / {k_:.2f} | "
                              f"{b_ * us:.0f} | {(p_ - b_) * us:.0f} / {(k_ - b_) * us:.0f} | {p_ / b_:.3f} / "
                              f"{k_ / b_:.3f} |")
        md_scale = "\n".join(scale_rows) if args.scale else ""

        stats = cache.meta["stats"]["train"][cache.teachers[0]]
        md = "\n".join(speed) + "\n\n" + md_scale + "\n\n" + "\n".join(rows) + (
            f"\n\nTeacher: {cache.meta['teachers'][0]['num_params'] / 1e6:.2f}M params"
            + (f", trained here for {args.teacher_steps} steps in {teacher_s:.0f} s" if teacher_s else "")
            + f"; mean entropy {stats['entropy_mean']:.2f} nats; top-64 mass at τ=1 "
              f"{stats['mean_topk_mass']['1.0']:.3f}, at τ=2 {stats['mean_topk_mass']['2.0']:.3f}.")
        print(md)
        path = write_result("precompute", "precompute speed and storage", {
            "data": f"{args.data} (first {args.mb} MB)", "positions": positions, "vocab_size": store.vocab_size,
            "batch_size": args.batch_size, "device": args.device, "repeats": args.repeats,
            "timings_bare_s": [round(t, 3) for t in t_bare], "timings_precompute_s": [round(t, 3) for t in t_ours],
            "timings_precompute_top64_s": [round(t, 3) for t in t_top]},
            md, notes="precompute s (dev) is the best of --repeats runs of each option on the dev split, one after the "
                      "other in this run; bytes/position counts the files of the cache directory (the arrays and plan.json; done-markers "
                      f"not counted), measured on the dev split ({dev_positions:,} positions) for every option. The error column is "
                      "against the float64 log-softmax of the same teacher's fp32 logits; full fp16 stores raw logits, so its log-prob error grows with |logit|.")
        print(f"\nwrote {path}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


SCALE_KINDS = {"default": {}, "top64": {"top_k": 64}, "factored": {"factored": True},
               "factored-stat-every-batch": {"factored": True}}
"""factored-stat-every-batch: the rebuilt logits' KL statistic on every batch (`precompute.REBUILD_STAT_EVERY` = 1)
instead of a sample of them: what the statistic costs."""


@contextlib.contextmanager
def _timed(module, names: tuple[str, ...], total: list[float]):
    """Add the seconds spent in `module`'s functions `names` (called through the module) to total[0]."""
    saved = {n: getattr(module, n) for n in names}

    def wrap(fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                total[0] += time.perf_counter() - t0
        return timed

    for n, fn in saved.items():
        setattr(module, n, wrap(fn))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)


def _scale_only(args, store, work: Path, device, amp) -> None:
    """The overhead-vs-size table alone: for each `--scale` teacher (random init: speed does not depend on training),
    the bare forward over the dev windows and precompute of each `--scale-kinds` kind, interleaved per repeat."""
    import numpy as np
    import torch

    from cachekd.models import ModelConfig, build_model, load_model
    from cachekd import precompute as pc
    from cachekd.precompute import PrecomputeConfig, precompute

    kinds = args.scale_kinds
    every = pc.REBUILD_STAT_EVERY
    if set(kinds) - set(SCALE_KINDS):
        sys.exit(f"--scale-kinds takes {', '.join(SCALE_KINDS)} (got {','.join(kinds)})")
    dev_tokens = store.read("dev", 0, store.num_windows("dev"))
    positions = dev_tokens.size
    rows = [f"| teacher (dev split, {positions:,} positions, V={store.vocab_size}) | params | bare forward s | "
            + " | ".join(f"precompute s, {k}" for k in kinds) + " | "
            + " | ".join(f"÷ bare, {k}" for k in kinds) + " |", "|---" * (3 + 2 * len(kinds)) + "|"]
    raw, one_off_rows = {}, []
    for hidden, layers, heads in args.scale:
        tdir = work / f"scale_{hidden}x{layers}_v{store.vocab_size}"
        if not tdir.exists():
            torch.manual_seed(0)
            build_model(ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads,
                                    intermediate_size=int(hidden * 8 / 3) // 8 * 8), store.vocab_size, 128
                        ).save_pretrained(tdir)
        m_big = load_model(tdir).to(device).eval()
        nparams = sum(p.numel() for p in m_big.parameters())

        def bare() -> float:
            t0 = time.perf_counter()
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32,
                                                        enabled=amp is not None):
                for b in range(0, len(dev_tokens), args.batch_size):
                    m_big(input_ids=torch.from_numpy(dev_tokens[b:b + args.batch_size].astype(np.int64)).to(device)
                          ).logits[..., :1].cpu()
            return time.perf_counter() - t0

        bare()  # warm-up
        times: dict[str, list[float]] = {"bare": [], **{k: [] for k in kinds}}
        setup: dict[str, list[float]] = {k: [] for k in kinds if SCALE_KINDS[k].get("factored")}
        for _ in range(args.repeats):
            times["bare"].append(bare())
            for k in kinds:
                out = work / "cache_scale"
                if out.exists():
                    shutil.rmtree(out)
                pc.REBUILD_STAT_EVERY = 1 if k == "factored-stat-every-batch" else every
                one_off = [0.0]
                t0 = time.perf_counter()
                with _timed(pc, ("_probe_factored", "_fit_factored"), one_off):
                    precompute(PrecomputeConfig(store=str(store.path), teachers=[str(tdir)], output=str(out),
                                                splits=["dev"], batch_size=args.batch_size, device=args.device,
                                                **SCALE_KINDS[k]), progress=False)
                times[k].append(time.perf_counter() - t0)
                if k in setup:
                    setup[k].append(one_off[0])
                pc.REBUILD_STAT_EVERY = every
        # the ratio of each repeat's times (interleaved), its median; seconds: medians
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = {k: statistics.median([t / b for t, b in zip(times[k], times["bare"])]) for k in kinds}
        raw[f"{hidden}x{layers}"] = {k: [round(t, 3) for t in v] for k, v in times.items()}
        rows.append(f"| llama {hidden}×{layers} | {nparams / 1e6:.1f}M | {med['bare']:.2f} | "
                    + " | ".join(f"{med[k]:.2f}" for k in kinds) + " | "
                    + " | ".join(f"{ratio[k]:.3f}" for k in kinds) + " |")
        for k, v in setup.items():
            raw[f"{hidden}x{layers}"][f"{k} one-off"] = [round(t, 3) for t in v]
            steady = statistics.median([(t - o) / b for t, o, b in zip(times[k], v, times["bare"])])
            one_off_rows.append(f"| llama {hidden}×{layers} | {k} | {statistics.median(v):.2f} | {ratio[k]:.3f} | "
                                f"{steady:.3f} |")
    md = "\n".join(rows)
    if one_off_rows:
        md += ("\n\nThe factored kinds' one-off set-up (the probe of the first windows: linearity check, per-dimension "
               "scale and int8 rounding matrix; the compressed form's fit), and the ratio without it, which a corpus "
               "of many more positions approaches:\n\n| teacher | kind | one-off s | ÷ bare | ÷ bare without the "
               "one-off |\n|---|---|---|---|---|\n" + "\n".join(one_off_rows))
    print(md)
    path = write_result("precompute-scale", "precompute ÷ the bare teacher forward, by teacher size", {
        "data": f"{args.data} (first {args.mb} MB)", "positions (dev)": positions, "vocab_size": store.vocab_size,
        "batch_size": args.batch_size, "device": args.device, "repeats": args.repeats,
        "torch threads": torch.get_num_threads(), "timings_s": raw}, md,
        notes="Random-init teachers (speed does not depend on training), the dev split; per repeat the bare forward "
              "(the model's logits, one small copy to the host as precompute's sync point) then each kind's "
              "precompute from scratch (plan, forward, encoding, writing, done-markers), interleaved; ÷ bare: the "
              "median over repeats of the ratio within a repeat. factored: the rebuilt logits' KL statistic on "
              f"every {every}th batch of the split (precompute.REBUILD_STAT_EVERY); factored-stat-every-batch: on "
              "every batch, as it ran before at these sizes (the batches were counted within each chunk, and a chunk "
              "of 4,096 positions is one batch of 32 windows of 128).")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
