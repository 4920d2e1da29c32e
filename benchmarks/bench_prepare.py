"""prepare throughput: text MB/s and tokens/s, against the bare `tokenizers` batch-encode rate on the same text.

Goal: our overhead (reading, splitting, packing windows, hashing, writing Zarr) ≤ 1.5× the bare encode.

    python benchmarks/bench_prepare.py [--data DIR] [--vocab-size 8000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, median_time, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"no data at {args.data}; pass --data DIR with text files")

    from cachekd.corpus import iter_documents, resolve_sources
    from cachekd.tokens import PrepareConfig, prepare

    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        sources = resolve_sources([args.data])
        text_bytes = sum(s.size for s in sources)
        # One full prepare (with tokenizer training) gives the tokenizer and the training time.
        t0 = time.perf_counter()
        store, _ = prepare(PrepareConfig(inputs=[args.data], output=str(tmp / "trained"), seq_len=args.seq_len,
                                         vocab_size=args.vocab_size), progress=False)
        t_with_training = time.perf_counter() - t0
        tok_dir = str(store.tokenizer_dir)
        tok = store.load_tokenizer()
        num_tokens = sum(store.manifest["splits"][s]["num_tokens"] for s in store.splits())

        def ours():
            out = tmp / "ours"
            if out.exists():
                shutil.rmtree(out)
            prepare(PrepareConfig(inputs=[args.data], output=str(out), seq_len=args.seq_len, tokenizer=tok_dir),
                    progress=False)

        def bare():
            docs = [d for s in resolve_sources([args.data]) for d in iter_documents(s)]
            n = 0
            for b in range(0, len(docs), 2000):
                n += sum(len(e.ids) for e in tok.backend_tokenizer.encode_batch(docs[b:b + 2000], add_special_tokens=False))
            return n

        # Interleave the two so machine drift hits both.
        t_ours, t_bare = [], []
        for _ in range(args.repeats):
            t_ours.append(median_time(ours, repeats=1, warmup=0)[0])
            t_bare.append(median_time(bare, repeats=1, warmup=0)[0])
        import statistics

        mo, mb = statistics.median(t_ours), statistics.median(t_bare)
        rows = [
            ("bare tokenizers encode_batch (read+split+encode)", mb, text_bytes / mb / 1e6, num_tokens / mb),
            ("cachekd prepare, existing tokenizer", mo, text_bytes / mo / 1e6, num_tokens / mo),
            ("cachekd prepare, training the tokenizer too", t_with_training, text_bytes / t_with_training / 1e6,
             num_tokens / t_with_training),
        ]
        table = ["| what | seconds | text MB/s | tokens/s |", "|---|---|---|---|"]
        table += [f"| {n} | {t:.2f} | {mbps:.2f} | {tps:,.0f} |" for n, t, mbps, tps in rows]
        ratio = mo / mb
        table.append("")
        table.append(f"**overhead ratio (prepare ÷ bare encode): {ratio:.2f}×** (goal ≤ 1.5×)")
        md = "\n".join(table)
        print(md)
        path = write_result("prepare", "prepare throughput", {
            "data": args.data, "text_bytes": text_bytes, "tokens": num_tokens, "vocab_size": args.vocab_size,
            "seq_len": args.seq_len, "repeats": args.repeats, "timings_ours_s": [round(t, 3) for t in t_ours],
            "timings_bare_s": [round(t, 3) for t in t_bare]}, md,
            notes="Both sides read the same files and split the same documents; ours also packs windows, hashes "
                  "sources and tokens, and writes the compressed Zarr store and tokenizer.")
        print(f"\nwrote {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
