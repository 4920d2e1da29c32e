"""Loader throughput: positions/s and MB/s one loader delivers from a compressed top-k cache, against the
positions/s at which the CPU trains the tiny student on the same batches; then, for every cache kind (top-k,
the default hybrid, sampled, full), decode positions/s on one thread before and after decoding moved to the
training device (torch ops on the stored values), the whole loader's positions/s before and after, and the
data-wait share of a distill step with the hybrid cache, side by side in one run.

Goals: one worker delivers ≥ 20× the positions/s of the tiny student's training step; decode ≥ 10^6 positions/s
on one CPU thread for every cache kind.

"Before" is the loader as it was at commit 29017ab, kept here (`LegacySource`): each chunk decoded with numpy
as it is read, the block's decoded arrays concatenated, a batch gathered from them. "After" is the library's
loader: the block's stored arrays concatenated, a batch gathered from them and decoded with torch ops.

    python benchmarks/bench_loader.py [--data DIR] [--mb 1.0] [--k 64] [--decode-mb 0.3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, write_result  # noqa: E402
from bench_precompute import _subset_corpus  # noqa: E402

KINDS = {"top-64": {"top_k": 64}, "hybrid (default: top-16 + 50 draws, τ = 1, 2)": {},
         "sampled (50 draws, τ = 1, 2)": {"sample": 50}, "full (fp16 logits)": {"full": True}}


def old_decode(name: str, a: np.ndarray, scale: float) -> np.ndarray:
    """The numpy decode of commit 29017ab (cachekd.cache.encoding and the reader), formula for formula."""
    from cachekd.cache import format as fmt

    if name in ("ids", "sample_ids"):
        return np.cumsum(a.astype(np.int64), axis=-1)
    if name in ("logprobs", "sample_logprobs"):
        return a.astype(np.float32) * np.float32(-1.0 / scale)
    if name in ("tail_lse", "entropy"):
        out = a.astype(np.float32) * np.float32(1.0 / fmt.TAIL_SCALE)
        out[a == fmt.TAIL_NEG_INF] = -np.inf
        return out
    if name == "sample_counts":
        return a.astype(np.int64)
    return a


def legacy_source():
    """`cachekd.loader.WindowSource` as it was at commit 29017ab: decoded (numpy) per chunk as read, decoded
    arrays concatenated per block, batches gathered from the decoded arrays."""
    import torch

    from cachekd.batch import Batch, CachedLogits, CachedSampled, CachedTopK
    from cachekd.loader import WindowSource

    class LegacySource(WindowSource):
        def load_block(self, key, chunk_ids):
            if key == self._block_key:
                return
            parts_tok, pos, offset = [], {}, 0
            parts_t: dict[str, list] = {t: [] for t in self.teachers}
            scale = self.cache.plan.logprob_scale
            for c in chunk_ids:
                tok = self.store.read_chunk(self.split, int(c))
                pos[int(c)] = (offset, int(c) * self.store.chunk_windows)
                offset += len(tok)
                parts_tok.append(tok)
                for t, arrays in self.cache.read_chunk_stored(self.split, int(c), self.teachers, tokens=tok).items():
                    parts_t[t].append({n: old_decode(n, a, scale) for n, a in arrays.items()})
            self._block = {"tokens": np.concatenate(parts_tok), "pos": pos, "teachers": {}}
            for t, blks in parts_t.items():
                merged = {}
                for name in blks[0]:
                    arr = np.concatenate([b[name] for b in blks])
                    if name == "tail_lse" and self.temperature_index is not None and "sample_ids" not in blks[0]:
                        arr = arr[..., self.temperature_index]
                    merged[name] = arr
                self._block["teachers"][t] = merged
            self._block_key = key

        def rows(self, window_ids):
            cw = self.store.chunk_windows
            pos = self._block["pos"]
            return np.array([pos[int(w) // cw][0] + int(w) - pos[int(w) // cw][1] for w in window_ids], dtype=np.int64)

        def batch(self, window_ids):
            r = self.rows(window_ids)
            tokens = torch.from_numpy(self._block["tokens"][r].astype(np.int64))
            labels = torch.full_like(tokens, self.ignore_index)
            labels[:, :-1] = tokens[:, 1:]
            teachers = {}
            for t, arrays in self._block["teachers"].items():
                rows = {name: torch.from_numpy(np.ascontiguousarray(arr[r])) for name, arr in arrays.items()}
                kind = CachedLogits if "logits" in rows else CachedSampled if "sample_ids" in rows else CachedTopK
                teachers[t] = kind(**rows)
            return Batch(tokens, labels, torch.from_numpy(window_ids.copy()), teachers)

    return LegacySource


NOTES = """\
The loader reads whole chunks (tokens and each cached array), shuffles inside a buffer of 8 chunks and builds
batches in one background thread. Since decoding moved to the training device it ships each teacher's rows as
stored (delta-coded ids, fixed-point values: a few bytes a value) and the step decodes them with torch ops; the
first table's training side therefore includes the decode, and its loader side does not.

"Decode" is everything between a block's decompressed chunks and the batch tensors the losses take: before, the
numpy decode of each chunk, the concatenation of the decoded block and the gather of a batch's rows from it; after,
the concatenation of the stored block, the gather of the rows and the torch decode of the batch (here on the CPU,
one thread; on a GPU the same ops run on the device after the pinned stored rows are copied). Both produce
bit-identical values (tests/test_decode.py). A full-logit cache stores the values it uses (fp16), so its "decode"
is the concatenation and the gather of 2·V bytes a position, the same before and after.

The per-kind rates are positions per CPU second of this process (`time.process_time`: the benchmark's thread,
and zarr's threads for the reads), not per wall second: the 2 cores are shared with other jobs, and the wall
clock would measure the queue for a core (see the load average in the config). The first table and the data-wait
shares are wall time, as a training run sees them.

"Read + decompress" is zarr reading and Blosc-zstd decompressing the block's chunk files (with the checksum and
done-marker checks), the same before and after; zarr runs it on its own event-loop thread, one chunk of one array
at a time here. "Whole loader" is one epoch of the loader in the benchmark's thread: read, decompress, decode
(after: the batch decoded on the CPU, as a CPU device would).

The simulated GPU student stands for a student whose step consumes 10^6 positions/s (a Baby-Llama-58M student on
one H100): its step is a sleep of that time, during which the CPU thread waits as it would on the GPU, after the
batch's decode on the CPU (before: already decoded by the loader thread; after: the torch decode, which on a GPU
would run on the device, so the figure is conservative). Its data-wait share says how much of such a student's
time one loader thread leaves it waiting.
"""


def simulated_gpu_waits(store, cache, batch_size: int, version: str, steps: int, rate: float) -> tuple[float, float]:
    """(data-wait share, positions/s) of a loop whose step is the batch's decode on this thread plus a sleep of
    the time a student consuming `rate` positions/s takes (a GPU step, during which the CPU thread waits), fed by
    the trainer's background loader thread (`Prefetcher`), after 3 warm-up steps."""
    from cachekd.loader import CachedBatches, Order, Prefetcher

    order = Order(store.num_windows("train"), store.chunk_windows, batch_size, seed=0)
    with loader_as(version):
        it = Prefetcher(iter(CachedBatches(store, "train", order, cache=cache, temperature_index=0)))
        try:
            wait = total = 0.0
            n = 0
            for i in range(steps + 3):
                t0 = time.perf_counter()
                b = next(it)
                t1 = time.perf_counter()
                b = b.decode()
                time.sleep(b.input_ids.numel() / rate)
                if i >= 3:
                    wait += t1 - t0
                    total += time.perf_counter() - t0
                    n += b.input_ids.numel()
        finally:
            it.close()
    return wait / total, n / total


@contextlib.contextmanager
def loader_as(version: str):
    """Within the block, the library's loader reads as it did `before` (LegacySource) or as it does now."""
    import cachekd.loader as loader

    current = loader.WindowSource
    if version == "before":
        loader.WindowSource = legacy_source()
    try:
        yield
    finally:
        loader.WindowSource = current


def cpu_times(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median CPU seconds of this process (every thread: zarr reads on its own) for one call of each of `fns`,
    called in turn `repeats` times after a warm-up call each (interleaved, so each sees the same machine). CPU time,
    not wall time: on a machine shared with other jobs the wall clock measures the queue for a core; the CPU time
    is what one thread spends on the work."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def decode_rates(cache, batch_size: int, repeats: int) -> dict[str, float]:
    """Positions/s of what lies between a block's decompressed chunks and the batch tensors the losses take, on
    this thread, before (numpy decode per chunk, concatenate, gather) and after (concatenate the stored arrays,
    gather, decode with torch); and of reading and decompressing the block (zarr, the same both ways)."""
    import torch

    from cachekd.cache.encoding import decode_stored, stored_tensor
    from cachekd.loader import gather_rows

    chunks = list(range(min(cache.num_chunks("train"), 8)))
    t = cache.teachers[0]
    scale = cache.plan.logprob_scale

    def read():
        return [cache.read_chunk_stored("train", c, [t])[t] for c in chunks]

    stored = read()
    n = sum(len(a[next(iter(a))]) for a in stored)
    perm = np.random.default_rng(0).permutation(n)
    batches = [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    positions = len(batches) * batch_size * cache.seq_len

    def before():
        dec = [{name: old_decode(name, a, scale) for name, a in arrays.items()} for arrays in stored]
        block = {name: np.concatenate([d[name] for d in dec]) for name in dec[0]}
        for r in batches:
            {name: torch.from_numpy(np.ascontiguousarray(a[r])) for name, a in block.items()}

    cw = cache.chunk_windows
    sizes = [len(a[next(iter(a))]) for a in stored]
    assert all(z == cw for z in sizes[:-1])

    def after():  # what the loader does (WindowSource.batch) and the step's decode
        for r in batches:
            part, row = r // cw, r % cw
            {name: decode_stored(name, stored_tensor(gather_rows([a[name] for a in stored], part, row)), scale)
             for name in stored[0]}

    secs = cpu_times({"read": read, "before": before, "after": after}, repeats)
    return {"read": n * cache.seq_len / secs["read"], "before": positions / secs["before"],
            "after": positions / secs["after"]}


def loader_rate(store, cache, batch_size: int, version: str) -> float:
    """Positions per CPU second of one epoch of the loader in this thread: read, decompress, decode (here, on the
    CPU)."""
    from cachekd.loader import CachedBatches, Order

    order = Order(store.num_windows("train"), store.chunk_windows, batch_size, seed=0)
    with loader_as(version):
        t0 = time.process_time()
        n = 0
        for b in CachedBatches(store, "train", order, cache=cache, temperature_index=0, max_epochs=1):
            b = b.decode()
            n += b.input_ids.numel()
        return n / (time.process_time() - t0)


def wait_shares(make_trainer, version: str, steps: int) -> tuple[float, float]:
    """(share of the loop's time spent waiting for the next batch, loop positions/s) over `steps` distill steps
    after 3 warm-up steps, with the trainer's own background loader thread."""
    with loader_as(version):
        tr = make_trainer()
        it = tr.batch_generator()
        try:
            for _ in range(3):
                tr.train_step(next(it))
            wait = total = 0.0
            n = 0
            for _ in range(steps):
                t0 = time.perf_counter()
                b = next(it)
                t1 = time.perf_counter()
                tr.train_step(b)
                wait += t1 - t0
                total += time.perf_counter() - t0
                n += b.input_ids.numel()
        finally:
            it.close()
    return wait / total, n / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--mb", type=float, default=1.0)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=12)
    ap.add_argument("--decode-mb", type=float, default=0.3,
                    help="MB of text for the per-kind tables (a full-logit cache takes 2·V bytes a position)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--wait-steps", type=int, default=24)
    ap.add_argument("--gpu-rate", type=float, default=1e6,
                    help="positions/s of the simulated GPU student (a Baby-Llama-58M student on one H100: ~10^6)")
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
        torch.set_num_threads(1)  # one thread from here on: decode (and the student's step beside the loader)
        from numcodecs import blosc

        blosc.set_nthreads(1)
        # (3) per cache kind, on a smaller store (a full-logit cache takes 2·V bytes a position)
        dtext = _subset_corpus(Path(args.data), work / "dtext", args.decode_mb)
        dstore, _ = prepare(PrepareConfig(inputs=[str(dtext)], output=str(work / "dtokens"), seq_len=128,
                                          vocab_size=args.vocab_size, dev_fraction=0.02), progress=False)
        dteacher = work / "dteacher"
        if not dteacher.exists():
            torch.manual_seed(0)
            build_model(ModelConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128),
                        dstore.vocab_size, 128).save_pretrained(dteacher)
        rows = []
        kind_caches = {}
        for label, opts in KINDS.items():
            d = work / f"cache-{label.split()[0]}"
            if not (d / "manifest.json").exists():
                precompute(PrecomputeConfig(store=str(dstore.path), teachers=[str(dteacher)], output=str(d),
                                            splits=["train"], **opts), force=True, progress=False)
            c = kind_caches[label] = LogitCache.open(d)
            r = decode_rates(c, args.batch_size, args.repeats)
            # the whole loader in this thread, before and after interleaved three times (the best of each kept)
            lb, la = [], []
            for _ in range(3):
                lb.append(loader_rate(dstore, c, args.batch_size, "before"))
                la.append(loader_rate(dstore, c, args.batch_size, "after"))
            lb_, la_ = max(lb), max(la)
            disk = c.meta["bytes_on_disk"] / (c.num_windows("train") * c.seq_len)
            rows.append(f"| {label} | {disk:.0f} | {r['before']:,.0f} | **{r['after']:,.0f}** | "
                        f"{r['after'] / r['before']:.1f}× | {r['read']:,.0f} | {lb_:,.0f} | {la_:,.0f} | "
                        f"{la_ / lb_:.2f}× |")
            print(rows[-1], flush=True)
        kinds_md = "\n".join([
            "| cache kind | bytes/position on disk | decode before, positions/s | decode after | after ÷ before | "
            "read + decompress (zarr) | whole loader before | whole loader after | after ÷ before |",
            "|---|---|---|---|---|---|---|---|---|", *rows])

        # (4) data-wait share of a distill step, hybrid cache, tiny student, the trainer's background loader
        hybrid_dir = kind_caches[next(k for k in KINDS if k.startswith("hybrid"))].path

        def make_trainer():
            cfg = load_train_config({
                "name": "bench-wait", "output": str(work / "run-wait"),
                "model": {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 2,
                          "intermediate_size": 172},
                "data": {"store": str(dstore.path), "batch_size": args.batch_size},
                "optim": {"max_steps": args.wait_steps + 10, "warmup_steps": 1},
                "distill": {"cache": str(hybrid_dir), "objective": "forward_kl", "temperature": 1.0}})
            return Trainer(cfg, force=True, progress=False)

        waits: dict[str, list] = {"before": [], "after": [], "before, simulated GPU student": [],
                                  "after, simulated GPU student": []}
        for _ in range(2):  # interleaved: before, after, before, after
            for version in ("before", "after"):
                waits[version].append(wait_shares(make_trainer, version, args.wait_steps))
                print(version, waits[version][-1], flush=True)
        hybrid = kind_caches[next(k for k in KINDS if k.startswith("hybrid"))]
        for _ in range(2):
            for version in ("before", "after"):
                waits[f"{version}, simulated GPU student"].append(simulated_gpu_waits(
                    dstore, hybrid, args.batch_size, version, args.wait_steps * 4, args.gpu_rate))
                print(version, "simulated", waits[f"{version}, simulated GPU student"][-1], flush=True)
        wait_rows = [f"| {v} | {', '.join(f'{w:.1%}' for w, _ in waits[v])} | "
                     f"{', '.join(f'{r:,.0f}' for _, r in waits[v])} |" for v in waits]
        wait_md = "\n".join(["| loader, step | data-wait share of the step (two runs) | loop positions/s |",
                             "|---|---|---|", *wait_rows])

        md = "\n".join([
            "### Loader ÷ training (top-k cache, default threads)", "",
            "| what | positions/s | MB/s |", "|---|---|---|",
            f"| loader, one background thread, top-{args.k} cache (stored batches, decoded on the device) | "
            f"{load_rate:,.0f} | {n_bytes / t_load / 1e6:.1f} stored, {load_rate * disk_per_pos / 1e6:.1f} from disk |",
            f"| tiny student distillation step (2×64 LLaMA, forward KL, bucket; decode included) | "
            f"{train_rate:,.0f} | |",
            "", f"**loader ÷ training: {load_rate / train_rate:.1f}×** (goal ≥ 20×); cache {disk_per_pos:.1f} "
                f"bytes/position on disk.", "",
            f"### Decode per cache kind, one thread, positions per CPU second (V = {dstore.vocab_size}, "
            f"{dstore.num_windows('train')} windows of 128, batches of {args.batch_size} × 128; goal ≥ 10^6)", "",
            kinds_md, "",
            f"### Data-wait share of a distill step, hybrid cache, tiny student (2×64 LLaMA, forward KL τ=1, "
            f"{args.wait_steps} steps of {args.batch_size} × 128 after 3 warm-up steps, 1 torch thread, the trainer's "
            f"background loader thread; the simulated GPU student: {args.wait_steps * 4} steps, each the batch's "
            f"decode on the CPU plus a sleep of batch positions ÷ {args.gpu_rate:.0e} positions/s)", "",
            wait_md])
        print(md)
        path = write_result("loader", "loader throughput and decode per cache kind", {
            "data": f"{args.data} (first {args.mb} MB; the per-kind tables {args.decode_mb} MB)",
            "train windows": f"{store.num_windows('train')} (per-kind tables: {dstore.num_windows('train')})",
            "k": args.k, "batch": f"{args.batch_size} × 128",
            "threads": "default for the first table; 1 torch thread and 1 Blosc thread after",
            "repeats": f"median of {args.repeats} for decode; the best of 3 interleaved epochs for the whole loader",
            "load average at the end (1, 5, 15 min)": ", ".join(f"{x:.1f}" for x in os.getloadavg())},
            md, notes=NOTES)
        print(f"\nwrote {path}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
