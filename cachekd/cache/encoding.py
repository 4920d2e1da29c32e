"""How a logit cache's values are stored: fixed-point log-probabilities and tails, delta-encoded sorted ids, and
the padded sampled arrays. `cachekd.cache.format` owns where each array lives and its shape, chunks and codecs; this
module owns the bytes' meaning (encode on write, decode on read).

Sampled arrays. The variable number of distinct ids per position is stored padded to W = N·n_r with count 0 rather
than as offsets into a flat array. Measured by benchmarks/bench_fidelity.py on the first 4096-position chunk of a sampled cache (N=50 per τ at τ=1
and τ=2, W=100, 72 distinct ids a position from a flat trained teacher, V=2000), against an offsets layout of the
same data (the real entries concatenated plus one count of distinct ids per position, same codecs): padded 207
B/position, offsets 170 (-18%); reading the chunk took 4.1 ms padded against 4.9 ms for the offsets layout read
and scattered back to the rectangular form the losses take (on a toy teacher with N=10 and nearly all draws
distinct the two were within 1 B/position). Padding is the layout: it keeps every array chunk-aligned with the
token store (whole-chunk reads, the same done-markers, checksums and damage checks as every other array) and
needs no offsets array. The price, ~1.3 B per pad slot in the measurement above, grows with the number of pads
(W minus the distinct ids: a sharper teacher has more), so it is the first thing to revisit if sampled caches must
get smaller.

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

Decoding is torch ops (`decode_stored`), so it runs where the tensors are: the loader ships the stored integers
(pinned) and the training device decodes them (`cachekd.batch.EncodedTeacher`); the numpy functions below
(`decode_ids`, `decode_logprobs`, `decode_tail`) are the same code on the CPU, for the reader's decoded blocks.
Measured on one thread of this 2-core CPU (a hybrid batch of 2048 positions, top-16 + 100 drawn ids, decoded
over and over): the numpy decode it replaced took 1.8–3.0 µs a position (`np.cumsum` over a short last axis is
slow), the torch decode 0.12–0.26 µs; benchmarks/bench_loader.py measures the whole way from decompressed chunks
to a batch's tensors for each cache kind. torch's unsigned 16- and 32-bit types lack `cat`, indexing and `cumsum` on some
devices, so uint16 and uint32 arrays travel as the signed type of the same width (`stored_tensor`, the same
bytes) and are viewed back as unsigned to convert; every decoded value is bit-identical to the numpy formulas it
replaced (tested over every uint16 and int16 value).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

LOGPROB_SCALE = 512.0           # fixed-point steps per nat: max rounding error 2⁻¹⁰ ≈ 9.8e-4
LOGPROB_MIN = -65535 / LOGPROB_SCALE  # ≈ −128 nats: smaller top-k log-probabilities are clipped here
TAIL_SCALE = 512.0              # tail_lse fixed point: range ±64, max rounding error 9.8e-4
TAIL_NEG_INF = -32768           # stored for an empty tail (k = V)
TAIL_MIN = (TAIL_NEG_INF + 1) / TAIL_SCALE  # −32767/512 ≈ −63.998 nats: the smallest finite tail_lse stored
CLIPPED_SHARE_BITS = 24         # a tail clipped to TAIL_MIN may count for at most 2⁻²⁴ (float32's rounding) of the mass


def min_temperature(vocab_size: int) -> float:
    """The smallest τ a top-k, sampled or hybrid cache can store: ln V / (63.998 − 24·ln 2) ≈ ln V / 47.36
    (0.12 for V = 300, 0.22 for V = 32000, 0.25 for V = 128256).

    tail_lse at τ is log Σ_{v ∉ stored} p_v^{1/τ} in int16 fixed point, so a finite value below `TAIL_MIN` is
    clipped up to it. What clipping distorts is the tail's share of the tempered mass, exp(tail_lse − log Σ_v
    p_v^{1/τ}); the whole sum is at least the top token's p^{1/τ} ≥ V^{−1/τ}, so a clipped tail's share is at most
    exp(TAIL_MIN + ln V / τ). At τ ≥ this bound that is ≤ 2⁻²⁴ for every teacher: the clip changes no float32
    normaliser a loss computes (a tail that small was below float32's resolution anyway). Below it a teacher whose
    top log-probability is low enough (a flat position at τ = 0.05) has its tail stored as far more mass than it
    holds (V = 300, τ = 0.02: the top token's term is e^−285, the clipped tail e^−64)."""
    return math.log(vocab_size) / (-TAIL_MIN - CLIPPED_SHARE_BITS * math.log(2))


def id_dtype(vocab_size: int) -> np.dtype:
    """The dtype stored ids (and their deltas) take: uint16 up to 65536 tokens, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encoding_descriptors(logprob_scale: float) -> dict[str, Any]:
    """The plan's `encoding` entry: how each array's values are stored (the scale is read back by the reader)."""
    return {"ids": "sorted, delta", "logprobs": "uint16 fixed point", "logprob_scale": logprob_scale,
            "tail_lse": f"int16 fixed point, 1/{TAIL_SCALE:g} nat", "logits": "float16"}


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
    return ids_from_deltas(stored_tensor(deltas)).numpy()


def decode_logprobs(q: np.ndarray, scale: float = LOGPROB_SCALE) -> np.ndarray:
    """Fixed-point log-probabilities → float32 (value = −q / scale)."""
    return logprobs_from_fixed(stored_tensor(q), scale).numpy()


def encode_tail(tail_lse: np.ndarray) -> np.ndarray:
    """float tail_lse → int16 fixed point; −inf (no tail) → TAIL_NEG_INF. Finite values must lie within ±64."""
    t = np.asarray(tail_lse, dtype=np.float64)
    q = np.clip(np.rint(t * TAIL_SCALE), TAIL_NEG_INF + 1, 32767)
    q = np.where(np.isneginf(t), TAIL_NEG_INF, q)
    return q.astype(np.int16)


def encode_samples(ids: np.ndarray, logprobs: np.ndarray, counts: np.ndarray, vocab_size: int,
                   scale: float = LOGPROB_SCALE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drawn ids (n, L, W) sorted ascending with the pads (count 0 in every proposal) at the end, repeating the
    last id, their τ=1 log-probabilities and counts (n, L, W, n_r) → (delta ids, fixed-point log-probabilities
    with 0 at the pads, counts as stored)."""
    real = counts.sum(-1) > 0
    deltas = np.diff(ids.astype(np.int64), axis=-1, prepend=0).astype(id_dtype(vocab_size))
    q = np.clip(np.rint(logprobs.astype(np.float64) * -scale), 0, 65535)
    return deltas, np.where(real, q, 0).astype(np.uint16), counts


def decode_tail(q: np.ndarray) -> np.ndarray:
    """int16 fixed-point tails (and entropies) → float32; TAIL_NEG_INF → −inf."""
    return tail_from_fixed(stored_tensor(q)).numpy()


# --- decoding with torch ops, on whatever device the stored tensors are


def stored_tensor(stored: np.ndarray) -> torch.Tensor:
    """A stored array as a CPU tensor over the same bytes: uint16 and uint32 become int16 and int32 views (torch
    lacks `cat`, indexing and `cumsum` for its unsigned 16- and 32-bit types on some devices); the decoders widen
    them back. Other dtypes (uint8 counts, int16 tails, float16 logits) are kept."""
    a = np.ascontiguousarray(stored)
    if not a.flags.writeable:  # torch.from_numpy wants a writable array
        a = a.copy()
    signed = {np.dtype(np.uint16): np.int16, np.dtype(np.uint32): np.int32}.get(a.dtype)
    return torch.from_numpy(a.view(signed) if signed is not None else a)


def _unsigned(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The stored unsigned values of `x` (uint8, or an int16/int32 view of uint16/uint32) as `dtype`, exactly: the
    bits viewed as unsigned and converted in one pass (torch converts its unsigned types on every device; measured
    ~2x faster on the CPU than widening the signed view and masking)."""
    unsigned = {torch.int16: torch.uint16, torch.int32: torch.uint32}.get(x.dtype)
    return (x.view(unsigned) if unsigned is not None else x).to(dtype)


def ids_from_deltas(deltas: torch.Tensor) -> torch.Tensor:
    """(..., k) delta-encoded ids → sorted ids, int64 (`cachekd.batch.IDS_DTYPE`)."""
    return _unsigned(deltas, torch.int64).cumsum_(dim=-1)


def logprobs_from_fixed(q: torch.Tensor, scale: float = LOGPROB_SCALE) -> torch.Tensor:
    """(...) fixed-point log-probabilities → float32 −q/scale: one float32 product, as the numpy decode was."""
    return _unsigned(q, torch.float32).mul_(float(np.float32(-1.0 / scale)))


def tail_from_fixed(q: torch.Tensor) -> torch.Tensor:
    """(...) int16 fixed-point tails or entropies → float32 q/TAIL_SCALE, −inf where q is TAIL_NEG_INF."""
    return (q.to(torch.float32) * float(np.float32(1.0 / TAIL_SCALE))).masked_fill_(q == TAIL_NEG_INF, -np.inf)


def counts_from_stored(q: torch.Tensor) -> torch.Tensor:
    """(..., W, n_r) stored draw counts (uint8, or uint16 for N > 255) → int64."""
    return _unsigned(q, torch.int64)


DECODERS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "ids": lambda x, scale: ids_from_deltas(x),
    "sample_ids": lambda x, scale: ids_from_deltas(x),
    "logprobs": logprobs_from_fixed,
    "sample_logprobs": logprobs_from_fixed,
    "tail_lse": lambda x, scale: tail_from_fixed(x),
    "entropy": lambda x, scale: tail_from_fixed(x),
    "sample_counts": lambda x, scale: counts_from_stored(x),
    "logits": lambda x, scale: x,  # stored as used (float16)
    "hidden": lambda x, scale: x,  # factored: decoded with the output layer, in the loss (`decode_hidden`)
    "hidden_scale": lambda x, scale: x,
}
"""Per cache array (by name, `cachekd.cache.format.ARRAY_NAMES`): stored tensor, logprob scale → decoded tensor."""


def decode_stored(name: str, stored: torch.Tensor, logprob_scale: float = LOGPROB_SCALE) -> torch.Tensor:
    """One cache array as stored (a `stored_tensor`, on any device) → the values the losses take, with torch ops
    on that device: ids int64, log-probabilities, tails and entropies float32, counts int64, logits as stored."""
    return DECODERS[name](stored, logprob_scale)


# Factored caches: h (the input of a teacher's output layer, divided by the cache's per-dimension scale) per position.
# int8: symmetric codes in [-127, 127] with one float32 scale a position (max |x| / 127), so each value is within
# half a step (max |x| / 254) of the original; bf16: the top 16 bits of float32 (8 significant bits), stored as
# int16; fp16: 11 significant bits (h / dim_scale is of order 1, far from fp16's limits). These run in torch on the
# device the teacher or the student is on: only int8 codes travel. Measured on the demo's teacher (d=192, V=2000):
# mean KL(full ‖ rebuilt) 4.6e-6 nats a position from int8, 2.5e-7 from bf16 (docs/caches.md, "Factored caches").

HIDDEN_INT8_MAX = 127


def encode_hidden(x, dtype: str, feedback=None) -> dict:
    """(..., d) float tensor → the stored arrays as tensors on its device: {"hidden": int8 codes, "hidden_scale":
    (...) float32} for int8, {"hidden": int16 bits of bfloat16} for bf16, {"hidden": float16} for fp16.

    int8 with `feedback` (d, d), the upper Cholesky factor of H⁻¹ for the output layer's H
    (`cachekd.factored.rounding_matrix`): the dimensions are rounded in order and each one's rounding error is
    passed on to the dimensions not yet rounded (GPTQ's rule, here for activations), so that the error lands where
    the output layer barely sees it. Same bytes; the logits' error falls ~3x (docs/caches.md, factored caches),
    while a value may be off by more than half a step (at most `INT8_FEEDBACK_STEPS` steps measured)."""
    import torch

    x = x.float()
    if dtype == "int8":
        scale = (x.abs().amax(-1) / HIDDEN_INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        if feedback is None:
            codes = torch.round(x / scale.unsqueeze(-1)).clamp_(-HIDDEN_INT8_MAX, HIDDEN_INT8_MAX)
        else:
            codes = _feedback_codes(x / scale.unsqueeze(-1), feedback.to(x))
        return {"hidden": codes.to(torch.int8), "hidden_scale": scale}
    if dtype == "bf16":
        return {"hidden": x.to(torch.bfloat16).view(torch.int16)}
    assert dtype == "fp16", dtype
    return {"hidden": x.to(torch.float16)}


INT8_FEEDBACK_STEPS = 4.0
"""How far (in steps of its position's scale) an int8 value rounded with feedback may be from the value it stores:
the most measured was 1.9 (a trained LLaMA teacher, d=192); `verify --recompute` allows this many."""


FEEDBACK_BLOCK = 64
"""Dimensions `_feedback_codes` rounds between two matmul updates of the rest (GPTQ's lazy batch updates): the
per-dimension updates touch only the block, so the work is matmul-bound (measured on one CPU thread, 4096 positions
at d=1024: 8.5 s updating every remaining dimension after each one, 0.97 s in blocks of 64; at d=192 0.1 s)."""


def _feedback_codes(y, u):
    """Codes in [-127, 127] for y (..., d) in units of a step, rounded dimension by dimension with the error passed
    on through u (d, d) upper triangular: y_{j+1:} -= (y_j − c_j) / u_jj · u_{j, j+1:} (within a block of
    `FEEDBACK_BLOCK` dimensions at once, to the dimensions after it by one matmul a block)."""
    import torch

    shape = y.shape
    d = shape[-1]
    y = y.reshape(-1, d).clone()
    codes = torch.empty_like(y)
    for start in range(0, d, FEEDBACK_BLOCK):
        stop = min(start + FEEDBACK_BLOCK, d)
        errors = torch.empty(y.shape[0], stop - start, dtype=y.dtype, device=y.device)
        for j in range(start, stop):
            c = torch.round(y[:, j]).clamp_(-HIDDEN_INT8_MAX, HIDDEN_INT8_MAX)
            codes[:, j] = c
            err = (y[:, j] - c) / u[j, j]
            errors[:, j - start] = err
            if j + 1 < stop:
                y[:, j + 1:stop] -= err.unsqueeze(1) * u[j, j + 1:stop]
        if stop < d:
            y[:, stop:] -= errors @ u[start:stop, stop:]
    return codes.reshape(shape)


def decode_hidden(hidden, hidden_scale, dtype: str, out_dtype=None):
    """The stored arrays (tensors, any device) → (..., d) float32 (or `out_dtype`) h / dim_scale."""
    import torch

    out_dtype = out_dtype or torch.float32
    if dtype == "int8":
        return hidden.to(out_dtype) * hidden_scale.to(out_dtype).unsqueeze(-1)
    if dtype == "bf16":
        return hidden.view(torch.bfloat16).to(out_dtype)
    return hidden.to(out_dtype)
