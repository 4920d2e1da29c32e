"""The on-disk layout of a logit cache. No other module knows paths, dtypes or encodings inside a cache.

::

    CACHE/
      zarr.json                         Zarr v3 group
      plan.json                         what this cache is to hold; written when it is created (resume checks it)
      <split>/<teacher>/ids             (N, L, k) uint16|uint32: top-k ids sorted within the row, delta-encoded
      <split>/<teacher>/logprobs        (N, L, k) uint16: teacher log-probabilities at τ=1, fixed point,
                                        value = −stored / LOGPROB_SCALE (step 2⁻¹⁰ nats; clipped at −64)
      <split>/<teacher>/tail_lse        (N, L, n_τ) float32: logsumexp over the tokens NOT in the top-k of
                                        (log p_v / τ) for each cached τ, with log p the τ=1 log-probabilities
      <split>/<teacher>/logits          (N, L, V) float16: all raw logits (full mode only)
      done/<split>/<chunk>.json         marker written after every teacher's data of that chunk is on disk;
                                        holds the chunk's statistics
      manifest.json                     written last: its presence means the cache is complete

Why these encodings (measured, see benchmarks/bench_cache.py): sorted ids stored as deltas compress ~2× better
under Blosc-zstd with byte shuffle; fixed-point log-probabilities keep every stored top-k log-probability within
2⁻¹¹ ≈ 4.9e-4 nats of the fp32 value, which fp16 logits cannot (fp16 rounds a logit of 12 by up to 4e-3). The
values are shift-invariant logits as far as the losses are concerned: softmax, mixing and averaging of several
teachers all ignore a per-position constant, and `tail_lse` uses the same shift.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FORMAT = "cachekd-logit-cache"
FORMAT_VERSION = 1
LOGPROB_SCALE = 1024.0          # fixed-point steps per nat
LOGPROB_MIN = -65535 / LOGPROB_SCALE  # ≈ −64 nats: smaller top-k log-probabilities are clipped here
MAX_FULL_CHUNK_BYTES = 32 << 20


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def array_path(split: str, teacher: str, name: str) -> str:
    return f"{split}/{teacher}/{name}"


def done_path(root: Path, split: str, chunk: int) -> Path:
    return Path(root) / "done" / split / f"{chunk:07d}.json"


def full_chunk_windows(chunk_windows: int, seq_len: int, vocab_size: int) -> int:
    """Windows per chunk of a full-logit array: the largest divisor of the token chunk that stays under 32 MiB,
    so every token-store chunk still maps to a whole number of cache chunks."""
    for w in range(chunk_windows, 0, -1):
        if chunk_windows % w == 0 and w * seq_len * vocab_size * 2 <= MAX_FULL_CHUNK_BYTES:
            return w
    return 1


def blosc(typesize: int):
    from cachekd.tokens import blosc as _blosc

    return _blosc(typesize)


def create_arrays(group, split: str, teacher: str, *, num_windows: int, seq_len: int, chunk_windows: int,
                  vocab_size: int, mode: str, k: int, num_temperatures: int) -> None:
    """Create (or open, when they exist with the same shape) a teacher's arrays for a split."""
    specs = []
    if mode == "topk":
        idt = id_dtype(vocab_size)
        specs = [
            ("ids", (num_windows, seq_len, k), (chunk_windows, seq_len, k), idt),
            ("logprobs", (num_windows, seq_len, k), (chunk_windows, seq_len, k), np.dtype(np.uint16)),
            ("tail_lse", (num_windows, seq_len, num_temperatures), (chunk_windows, seq_len, num_temperatures),
             np.dtype(np.float32)),
        ]
    else:
        fw = full_chunk_windows(chunk_windows, seq_len, vocab_size)
        specs = [("logits", (num_windows, seq_len, vocab_size), (fw, seq_len, vocab_size), np.dtype(np.float16))]
    for name, shape, chunks, dtype in specs:
        group.create_array(
            array_path(split, teacher, name), shape=shape, chunks=chunks, dtype=dtype,
            compressors=[blosc(dtype.itemsize)], fill_value=0, overwrite=False,
        )


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, L, k) ids and τ=1 log-probabilities → (delta-encoded sorted ids, fixed-point log-probabilities)."""
    order = np.argsort(ids, axis=-1, kind="stable")
    ids_sorted = np.take_along_axis(ids, order, axis=-1).astype(np.int64)
    lp_sorted = np.take_along_axis(logprobs, order, axis=-1)
    deltas = np.diff(ids_sorted, axis=-1, prepend=0).astype(id_dtype(vocab_size))
    q = np.clip(np.rint(-lp_sorted.astype(np.float64) * LOGPROB_SCALE), 0, 65535).astype(np.uint16)
    return deltas, q


def decode_ids(deltas: np.ndarray) -> np.ndarray:
    """Delta-encoded ids → sorted ids (int64)."""
    return np.cumsum(deltas.astype(np.int64), axis=-1)


def decode_logprobs(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * np.float32(-1.0 / LOGPROB_SCALE)
