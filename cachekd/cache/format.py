"""The on-disk layout of a logit cache. No other module knows paths, dtypes or encodings inside a cache.

::

    CACHE/
      zarr.json                         Zarr v3 group
      plan.json                         what this cache is to hold; written when it is created (resume checks it)
      <split>/<teacher>/ids             (N, L, k) uint16|uint32: top-k ids sorted within the row, delta-encoded
      <split>/<teacher>/logprobs        (N, L, k) uint16: teacher log-probabilities at τ=1, fixed point,
                                        value = −stored / scale (default scale 512: step 2⁻⁹ nats,
                                        clipped at −128; `--logprob-step` trades precision for size)
      <split>/<teacher>/tail_lse        (N, L, n_τ) int16: logsumexp over the tokens NOT in the top-k of
                                        (log p_v / τ) for each cached τ, with log p the τ=1 log-probabilities;
                                        fixed point value = stored / TAIL_SCALE, TAIL_NEG_INF = −inf (k = V)
      <split>/<teacher>/logits          (N, L, V) float16: all raw logits (full mode only)
      done/<split>/<chunk>.json         marker written after every teacher's data of that chunk is on disk;
                                        holds the chunk's statistics
      manifest.json                     written last, when every chunk is done; the cache is complete when it
                                        exists AND every chunk has its done-marker (`cachekd verify --repair`
                                        removes the markers of damaged chunks and the manifest, so the same
                                        precompute command recomputes just those chunks)

Every array is Blosc-zstd (byte shuffle, explicit typesize) followed by zarr v3's standard `crc32c` codec: each
chunk file ends with a CRC-32C of its compressed bytes, checked on every read, so a truncated or overwritten chunk
is an error instead of silently different values. Caches written before the checksum was added have no `crc32c`
codec in their arrays' zarr.json and read as before (without that protection); the format version is unchanged
because the codec pipeline is recorded per array.

Why these encodings (measured on trained teachers, k=64, V=8000; benchmarks/bench_precompute.py reproduces
the totals): sorted ids stored as deltas take ~20 B/position under Blosc-zstd with byte shuffle (random-order
ids ~86); fixed-point log-probabilities keep every stored top-k log-probability within 2⁻¹⁰ ≈ 9.8e-4 nats of
the fp32 value, which fp16 cannot (fp16 rounds a log-probability of −12 by up to 4e-3), at ~70–90 B/position;
a finer 2⁻¹¹ step costs ~8 B/position more. The values are shift-invariant logits as far as the losses are
concerned: softmax, mixing and averaging of several teachers all ignore a per-position constant, and `tail_lse`
uses the same shift. The zstd level inside Blosc is chosen per array (4096 positions a chunk, trained teacher):
the delta ids shrink from 27.5 B/position at level 1 to 21.9 at level 5 (level 9: 20.2 for 30x the CPU), while
the log-probabilities take 88.8 B at level 1 and 88.6 at level 5 for 7x the CPU, so they use level 1. On a small
machine the writer's CPU time is taken from the teacher's forward.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FORMAT = "cachekd-logit-cache"
FORMAT_VERSION = 1
LOGPROB_SCALE = 512.0           # fixed-point steps per nat: max rounding error 2⁻¹⁰ ≈ 9.8e-4
LOGPROB_MIN = -65535 / LOGPROB_SCALE  # ≈ −128 nats: smaller top-k log-probabilities are clipped here
TAIL_SCALE = 512.0              # tail_lse fixed point: range ±64, max rounding error 9.8e-4
TAIL_NEG_INF = -32768           # stored for an empty tail (k = V)
CLEVEL = {"ids": 5, "logprobs": 1, "tail_lse": 5}  # zstd level inside Blosc per array (see above)
BLOCKSIZE = 1 << 20             # one Blosc block per top-k chunk: zstd sees the whole chunk (-2.4 B/position, faster)
MAX_FULL_CHUNK_BYTES = 32 << 20
# A CRC-32C after the compressor, checked on every read. Measured cost on one top-k chunk of 4096 positions
# (32 windows x 128, k=64: ids and logprobs uint16 (32, 128, 64), encoded from a synthetic Zipf-like teacher over
# V=8000: 629 KB compressed together, ~154 B/position), zarr 3.1.6, one thread of a 2-core Xeon: writing and
# reading both arrays took 14.6-15.2 ms with the checksum against 14.5-14.9 ms without (4 runs, each the best of
# 30-60 repetitions): +0.2 ms (+1.4%) on average, within run-to-run noise (reading alone: +0.1-0.3 ms on 2.2 ms).
# The checksum itself runs at 25-31 GB/s (google-crc32c, hardware CRC), ~25 µs per pass over the chunk, and adds
# 4 bytes to each chunk file.
CHECKSUM = True


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


def blosc(typesize: int, name: str):
    from cachekd.tokens import blosc as _blosc

    return _blosc(typesize, clevel=CLEVEL.get(name, 5), blocksize=BLOCKSIZE)


def compressors(typesize: int, name: str) -> list:
    """The bytes-to-bytes codecs of a cache array: Blosc-zstd, then the crc32c checksum (see CHECKSUM)."""
    from zarr.codecs import Crc32cCodec

    return [blosc(typesize, name)] + ([Crc32cCodec()] if CHECKSUM else [])


def has_checksum(array) -> bool:
    """Whether an opened cache array stores a crc32c checksum with every chunk (caches written before
    checksums were added have none)."""
    from zarr.codecs import Crc32cCodec

    return any(isinstance(c, Crc32cCodec) for c in array.metadata.codecs)


def array_names(mode: str) -> tuple[str, ...]:
    return ("ids", "logprobs", "tail_lse") if mode == "topk" else ("logits",)


def data_bytes(root: Path) -> int:
    """Bytes of the cache's files, without the done-markers and the manifest."""
    root = Path(root)
    return sum(f.stat().st_size for f in root.rglob("*")
               if f.is_file() and "done" not in f.relative_to(root).parts and f.name != "manifest.json")


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
             np.dtype(np.int16)),
        ]
    else:
        fw = full_chunk_windows(chunk_windows, seq_len, vocab_size)
        specs = [("logits", (num_windows, seq_len, vocab_size), (fw, seq_len, vocab_size), np.dtype(np.float16))]
    for name, shape, chunks, dtype in specs:
        group.create_array(
            array_path(split, teacher, name), shape=shape, chunks=chunks, dtype=dtype,
            compressors=compressors(dtype.itemsize, name), fill_value=0, overwrite=False,
        )


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, vocab_size: int, scale: float = LOGPROB_SCALE
                ) -> tuple[np.ndarray, np.ndarray]:
    """(n, L, k) ids and τ=1 log-probabilities → (delta-encoded sorted ids, fixed-point log-probabilities).

    `scale` is fixed-point steps per nat: the largest rounding error is 1/(2·scale). The rows are sorted by id
    with the fixed-point value packed into the low 16 bits of one integer key (a plain sort of keys is ~4x
    faster than an argsort and two gathers; ids are unique within a row, so the order is the ids' order)."""
    q = np.clip(np.rint(logprobs.astype(np.float64) * -scale), 0, 65535).astype(np.uint64)
    key = (ids.astype(np.uint64) << np.uint64(16)) | q
    if vocab_size <= 1 << 16:
        key = key.astype(np.uint32)
    key.sort(axis=-1)
    ids_sorted = (key >> 16).astype(np.int64)
    deltas = np.diff(ids_sorted, axis=-1, prepend=0).astype(id_dtype(vocab_size))
    return deltas, (key & 0xFFFF).astype(np.uint16)


def decode_ids(deltas: np.ndarray) -> np.ndarray:
    """Delta-encoded ids → sorted ids (int64)."""
    return np.cumsum(deltas.astype(np.int64), axis=-1)


def decode_logprobs(q: np.ndarray, scale: float = LOGPROB_SCALE) -> np.ndarray:
    return q.astype(np.float32) * np.float32(-1.0 / scale)


def logprob_scale(meta: dict) -> float:
    """The fixed-point scale a cache was written with."""
    return float(meta.get("encoding", {}).get("logprob_scale", LOGPROB_SCALE))


def encode_tail(tail_lse: np.ndarray) -> np.ndarray:
    """float tail_lse → int16 fixed point; −inf (no tail) → TAIL_NEG_INF. Finite values must lie within ±64."""
    t = np.asarray(tail_lse, dtype=np.float64)
    q = np.clip(np.rint(t * TAIL_SCALE), TAIL_NEG_INF + 1, 32767)
    q = np.where(np.isneginf(t), TAIL_NEG_INF, q)
    return q.astype(np.int16)


def decode_tail(q: np.ndarray) -> np.ndarray:
    out = q.astype(np.float32) * np.float32(1.0 / TAIL_SCALE)
    out[q == TAIL_NEG_INF] = -np.inf
    return out
