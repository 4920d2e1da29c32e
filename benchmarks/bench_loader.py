"""Loader throughput: positions/s and MB/s one loader delivers from a compressed top-k cache, against the
positions/s at which the CPU trains the tiny student on the same batches.

Goal: one worker delivers ≥ 20× the positions/s of the tiny student's training step.

    python benchmarks/bench_loader.py [--data DIR] [--mb 1.0] [--k 64] [--seconds 20]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, write_result  # noqa: E402
from bench_precompute import _subset_corpus  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--mb", type=float, default=1.0)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=12)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"no data at {args.data}; pass --data DIR")

    import torch

    from cachekd.cache.reader import LogitCache
    from cachekd.loader import CachedBatches, Order, Prefetcher
    from cachekd.models import ModelConfig, build_model
    from cachekd.precompute import PrecomputeConfig, precompute
    from cachekd.tokens import PrepareConfig, prepare
    from cachekd.train_config import load_train_config
    from cachekd.trainer import Trainer

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        text = _subset_corpus(Path(args.data), work / "text", args.mb)
        store, _ = prepare(PrepareConfig(inputs=[str(text)], output=str(work / "tokens"), seq_len=128,
                                         vocab_size=args.vocab_size, dev_fraction=0.02), progress=False)
        # The loader's cost does not depend on how good the teacher is: a small random teacher fills the cache.
        teacher = work / "teacher"
        if not teacher.exists():
            torch.manual_seed(0)
            build_model(ModelConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128),
                        store.vocab_size, 128).save_pretrained(teacher)
        cache_dir = work / "cache"
        if not (cache_dir / "manifest.json").exists():
            precompute(PrecomputeConfig(store=str(store.path), teachers=[str(teacher)], output=str(cache_dir),
                                        top_k=args.k, splits=["train"]), force=True, progress=False)
        cache = LogitCache.open(cache_dir)
        order = Order(store.num_windows("train"), store.chunk_windows, args.batch_size, seed=0)

        # (1) the loader alone, one background thread (what the trainer uses), over a whole epoch
        t0 = time.perf_counter()
        n_pos = n_bytes = 0
        for b in Prefetcher(iter(CachedBatches(store, "train", order, cache=cache, temperature_index=0, max_epochs=1))):
            n_pos += b["input_ids"].numel()
            n_bytes += b["input_ids"].numel() * 8 + sum(v.numel() * v.element_size()
                                                        for t in b["teachers"].values() for v in t.values())
        t_load = time.perf_counter() - t0
        disk_per_pos = cache.meta["bytes_on_disk"] / (cache.num_windows("train") * cache.seq_len)

        # (2) the tiny student's distillation step on the same batches (loader time excluded)
        cfg = load_train_config({
            "name": "bench", "output": str(work / "run"),
            "model": {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 172},
            "data": {"store": str(store.path), "batch_size": args.batch_size},
            "optim": {"max_steps": args.train_steps + 2, "warmup_steps": 1},
            "distill": {"cache": str(cache_dir), "objective": "forward_kl", "temperature": 1.0}})
        tr = Trainer(cfg, force=True, progress=False)
        it = tr.batches()
        batches = [next(it) for _ in range(args.train_steps + 2)]
        it.close()
        for b in batches[:2]:
            tr.train_step(b)
        t0 = time.perf_counter()
        for b in batches[2:]:
            tr.train_step(b)
        t_train = time.perf_counter() - t0
        train_pos = args.train_steps * args.batch_size * 128
        load_rate, train_rate = n_pos / t_load, train_pos / t_train
        md = "\n".join([
            "| what | positions/s | MB/s |", "|---|---|---|",
            f"| loader, one background thread, top-{args.k} cache (decoded batches) | {load_rate:,.0f} | "
            f"{n_bytes / t_load / 1e6:.1f} decoded, {load_rate * disk_per_pos / 1e6:.1f} from disk |",
            f"| tiny student distillation step (2×64 LLaMA, forward KL, bucket) | {train_rate:,.0f} | |",
            "", f"**loader ÷ training: {load_rate / train_rate:.1f}×** (goal ≥ 20×); cache {disk_per_pos:.1f} "
                f"bytes/position on disk."])
        print(md)
        path = write_result("loader", "loader throughput", {
            "data": f"{args.data} (first {args.mb} MB)", "train windows": store.num_windows("train"), "k": args.k,
            "batch": f"{args.batch_size} × 128", "threads": torch.get_num_threads()}, md,
            notes="The loader reads whole chunks (tokens and each cached array), decodes ids and fixed-point values, "
                  "shuffles inside a buffer of 8 chunks and builds batches in one background thread; the training "
                  "side excludes loader time (batches were materialised first).")
        print(f"\nwrote {path}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
