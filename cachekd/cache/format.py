"""The on-disk layout of a logit cache. No other module knows paths, dtypes or codecs inside a cache (but the
writer's lock files, `cachekd.cache.writer`); how the values are encoded is `cachekd.cache.encoding`'s (re-exported
here).

::

    CACHE/
      zarr.json                         Zarr v3 group
      plan.json                         what this cache is to hold; written first when it is created, before the
                                        group and the arrays (resume checks it, and creates what a kill left out)
      <split>/<teacher>/ids             (N, L, k) uint16|uint32: top-k ids sorted within the row, delta-encoded
      <split>/<teacher>/logprobs        (N, L, k) uint16: teacher log-probabilities at τ=1, fixed point,
                                        value = −stored / scale (default scale 512: step 2⁻⁹ nats,
                                        clipped at −128; `--logprob-step` trades precision for size)
      <split>/<teacher>/tail_lse        (N, L, n_τ) int16: logsumexp over the tokens NOT in the top-k of
                                        (log p_v / τ) for each cached τ, with log p the τ=1 log-probabilities;
                                        fixed point value = stored / TAIL_SCALE, TAIL_NEG_INF = −inf (k = V)
      <split>/<teacher>/logits          (N, L, V) float16: all raw logits (full mode only)
    sampled mode (``precompute --sample N``, hybrid with ``--top-k K --sample N``; see "Sampled caches" below):
      <split>/<teacher>/ids, logprobs   the exact top-K as in top-k mode (hybrid only, K > 0)
      <split>/<teacher>/tail_lse        (N, L, n_τ) as in top-k mode, over the tokens NOT in the exact top-K: with
                                        K = 0 it is the whole vocabulary's normaliser N_τ = log Σ_v exp(ℓ_v/τ)
      <split>/<teacher>/sample_ids      (N, L, W) sorted distinct drawn ids, delta-encoded, padded at the end
                                        (delta 0: a pad repeats the last id) with count 0
      <split>/<teacher>/sample_logprobs (N, L, W) uint16: ℓ_v = log p₁(v) of each drawn id, fixed point as logprobs
      <split>/<teacher>/sample_counts   (N, L, W, n_r) uint8 (uint16 for N > 255): draws of each id from each
                                        proposal (n_r = n_τ with one proposal per cached τ, else 1); pads 0
      <split>/<teacher>/entropy         (N, L, n_τ) int16: the teacher's exact entropy H_τ at each cached τ, fixed
                                        point 1/TAIL_SCALE nat (forward KL is reported as a divergence with it)
    factored mode (``precompute --factored``; see "Factored caches" below):
      <split>/<teacher>/hidden          (N, L, d) int8 (default), int16 (the bits of bfloat16) or float16: the input
                                        h of the teacher's output layer divided by `dim_scale`; int8 as codes of
                                        one symmetric scale a position
      <split>/<teacher>/hidden_scale    (N, L) float32: int8 only, h/dim_scale ≈ hidden · hidden_scale
      factors/<teacher>/weight          (V, d) float32: the output layer's weight (rows beyond the store's
                                        vocabulary dropped) times `dim_scale` per column, written once
      factors/<teacher>/bias            (V,) float32: its bias (heads with a bias only)
      factors/<teacher>/dim_scale       (d,) float32: a power of two per dimension of h (chosen on the first
                                        windows, so outlier dimensions do not take an int8 row's range)
      factors/<teacher>/rounding        (d, d) float32, int8 only: the matrix int8 rounding passes each
                                        dimension's error on with (`encoding.encode_hidden`), kept so that a
                                        resumed run rounds as the first did
    compressed (``--factored-rank r``): per position the r coefficients c = Uᵀ(h − μ) / dim_scale instead of h,
    with μ (d,) and U (d, r) the mean and principal directions of h on a seeded sample of train windows:
      factors/<teacher>/weight, bias    (V, r), (V,): W·U·diag(dim_scale) and b + W·μ, so z ≈ weight·c + bias
      factors/<teacher>/mean, basis     (d,), (d, r) float32: μ and U, for re-encoding (verify --recompute)
      done/factors.json                 marker written after every teacher's factors are on disk: their
                                        CRC-32Cs and the SHA-256 of each weight
      done/<split>/<chunk>.json         marker written after every teacher's data of that chunk is on disk;
                                        holds the chunk's statistics and binds it to its token ids and to the
                                        chunk files written (see TOKENS_DIGEST); an empty or unparsable marker
                                        counts as missing
      manifest.json                     written last, when every chunk is done; the cache is complete when it
                                        exists AND every chunk has its done-marker (`cachekd verify --repair`
                                        removes the markers of damaged chunks and the manifest, so the same
                                        precompute command recomputes just those chunks)

Every array is Blosc-zstd (byte shuffle, explicit typesize) followed by zarr v3's standard `crc32c` codec: each
chunk file ends with a CRC-32C of its compressed bytes, checked on every read, so a truncated or overwritten chunk
is an error instead of silently different values. Caches written before the checksum was added have no `crc32c`
codec in their arrays' zarr.json and read as before (without that protection); the format version is unchanged
because the codec pipeline is recorded per array.

Sampled caches. Per position N ids are drawn with replacement from a proposal (the teacher at τ_r, restricted to
the tokens beyond the exact top-K in a hybrid cache), keyed by (seed, proposal, global window) so a chunk
recomputed (resume, `--part`, torchrun, another batch size) gives the same bytes (`cachekd.teacher_samples` owns
the draws). The variable number of distinct ids per position is stored padded to W = N·n_r with count 0 rather than
as offsets into a flat array.

Factored caches. A causal LM's logits are linear in the input of its output layer, z = W·h + b, so h per position
and W, b once encode all V logits in d numbers a position. Folding a power-of-two `dim_scale` into W (exact in
float32) keeps z = (W·diag(s))·(h/s) + b unchanged while every dimension of h/s has about the same range, which is
what one int8 scale a position needs. Training rebuilds the logits of a chunk of rows on its device
(`cachekd.losses`' `FactoredTarget`); the teacher model is never loaded.

Why the values are stored as they are (the padding of the sampled arrays, fixed-point log-probabilities,
delta-encoded ids) and the zstd level of each array (CLEVEL) are measured in `cachekd.cache.encoding`, which
encodes and decodes the values.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cachekd.cache.encoding import (  # noqa: F401 - the value encodings, re-exported with the layout
    LOGPROB_MIN, LOGPROB_SCALE, TAIL_NEG_INF, TAIL_SCALE, decode_ids, decode_logprobs, decode_tail, encode_samples,
    encode_tail, encode_topk, encoding_descriptors, id_dtype,
)
from cachekd.errors import CachekdError
from cachekd.storage import location

FORMAT = "cachekd-logit-cache"
FORMAT_VERSION = 1
CLEVEL = {"hidden": 1, "hidden_scale": 1, "ids": 5, "logprobs": 1, "tail_lse": 5, "sample_ids": 5, "sample_logprobs": 1, "sample_counts": 5,
          "entropy": 5}  # zstd level inside Blosc per array (measured: see cachekd.cache.encoding)
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


ZARR_META = "zarr.json"          # a Zarr group's or array's metadata (the group's attribute cachekd = FORMAT)
PLAN_FILE = "plan.json"          # the plan, written when the cache is created
MANIFEST_FILE = "manifest.json"  # the plan plus statistics, written last
DONE_DIR = "done"                # done/<split>/<chunk>.json: one marker per finished chunk
ARRAY_NAMES = {"topk": ("ids", "logprobs", "tail_lse"), "full": ("logits",), "factored": ("hidden", "hidden_scale"),
               "sampled": ("ids", "logprobs", "tail_lse", "sample_ids", "sample_logprobs", "sample_counts", "entropy")}
SAMPLE_ARRAYS = ("sample_ids", "sample_logprobs", "sample_counts", "entropy")  # beyond the top-k arrays


def array_path(split: str, teacher: str, name: str) -> str:
    return f"{split}/{teacher}/{name}"


FACTORS_DIR = "factors"          # factors/<teacher>/{weight,bias,dim_scale}: a factored cache's output layers
FACTOR_NAMES = ("weight", "bias", "dim_scale", "rounding", "mean", "basis")
FACTORS_DONE = "factors.json"    # done/factors.json: the factors' marker


def factor_path(teacher: str, name: str) -> str:
    return f"{FACTORS_DIR}/{teacher}/{name}"


def factors_done_path(root: Path) -> Path:
    return Path(root) / DONE_DIR / FACTORS_DONE


FACTORED_DTYPES = ("int8", "bf16", "fp16")
"""How a factored cache stores h: int8 codes with one float32 scale a position (d + 4 bytes), or 16-bit floats."""


def group_meta_path(root: Path) -> Path:
    return location(root) / ZARR_META


def plan_path(root: Path) -> Path:
    return location(root) / PLAN_FILE


def manifest_path(root: Path) -> Path:
    return location(root) / MANIFEST_FILE


def done_dir(root: Path, split: str) -> Path:
    return location(root) / DONE_DIR / split


def done_path(root: Path, split: str, chunk: int) -> Path:
    return done_dir(root, split) / f"{chunk:07d}.json"


def read_done_marker(path: Path) -> dict[str, Any] | None:
    """A done-marker's contents; None when it is missing, empty or does not parse as a JSON object (a crash
    between creating and writing it on some filesystems): such a chunk is not done."""
    import json

    try:
        data = json.loads(location(path).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def done_markers(root: Path, split: str) -> dict[int, dict[str, Any]]:
    """The readable done-markers of a split, by chunk."""
    d = done_dir(root, split)
    if not d.exists():
        return {}
    out = {}
    for p in d.glob("*.json"):
        if p.stem.isdigit() and (marker := read_done_marker(p)) is not None:
            out[int(p.stem)] = marker
    return dict(sorted(out.items()))


def done_chunks(root: Path, split: str) -> list[int]:
    """The chunks of a split that have a (readable) done-marker, in order."""
    return list(done_markers(root, split))


def pending_chunks(root: Path, split: str, num_chunks: int) -> list[int]:
    """The chunks of a split (of `num_chunks`) without a readable done-marker."""
    done = set(done_chunks(root, split))
    return [c for c in range(num_chunks) if c not in done]


# A done-marker binds its chunk to the data it was computed from and to the data that was written: the digest of
# the chunk's token ids (TOKENS_DIGEST) and, per teacher array, the CRC-32C stored at the end of each chunk file
# (CHUNK_CRC32C; arrays without the checksum codec record none). A chunk file copied from another chunk, or left
# from an earlier write, then disagrees with its marker although it decodes; tokens that are not the ones the chunk
# was computed from disagree with TOKENS_DIGEST. Markers written before the binding existed have neither key.
# Cost, measured on a loaded 2-core machine (one teacher, k=64, chunks of 32 windows x 128): checking the three
# files' CRCs takes 0.06-0.13 ms a chunk (1-2% of the 5-7 ms that decoding the chunk takes), the token digest 0.01 ms.
TOKENS_DIGEST = "tokens_sha256"
CHUNK_CRC32C = "chunk_crc32c"
COMPUTE_DTYPE = "compute_dtype"  # the precision the teachers ran in for the chunk: float32, bfloat16 or float16


def tokens_digest(tokens: np.ndarray) -> str:
    """SHA-256 of a chunk's token ids (n, L) as little-endian uint32, whatever dtype the store keeps them in."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<u4").tobytes()).hexdigest()


def chunk_files(array, array_dir: Path, start: int, stop: int) -> list[Path]:
    """The chunk files of an opened array (chunked along the first axis only) that hold windows [start, stop)."""
    n = array.chunks[0]
    rest = (0,) * (array.ndim - 1)
    return [location(array_dir) / array.metadata.encode_chunk_key((i,) + rest)
            for i in range(start // n, -(-max(stop, start + 1) // n))]


def stored_crc32c(path: Path) -> str | None:
    """The CRC-32C a chunk file ends with (written by the crc32c codec), as hex; None when the file is missing."""
    from cachekd.storage import read_tail

    try:
        return read_tail(location(path), 4).hex()
    except OSError:  # missing, or shorter than 4 bytes
        return None


def is_logit_cache(path: Path) -> bool:
    """Whether `path` holds a logit cache (complete or not, its manifest readable or not): a plan, a manifest
    naming this format, or a Zarr group marked as one."""
    from cachekd.io import read_json_dict_or_none

    p = location(path)
    if plan_path(p).exists():
        return True
    for meta in (read_json_dict_or_none(manifest_path(p)), read_json_dict_or_none(group_meta_path(p))):
        if meta is not None and FORMAT in (meta.get("format"), meta.get("attributes", {}).get("cachekd")):
            return True
    return False


def is_half_created(root: Path) -> bool:
    """A cache's Zarr group without plan.json and without any done-marker: what a kill during creation left with
    versions that wrote the plan last (nothing was computed into it)."""
    from cachekd.io import read_json_dict_or_none

    meta = read_json_dict_or_none(group_meta_path(root))
    return (not plan_path(root).exists() and meta is not None
            and meta.get("attributes", {}).get("cachekd") == FORMAT and not (location(root) / DONE_DIR).exists())


def is_leftover_temp(name: str) -> bool:
    """A temporary file of an atomic write that a killed process left behind (``.<name>.<random>.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


def full_chunk_windows(chunk_windows: int, seq_len: int, vocab_size: int) -> int:
    """Windows per chunk of a full-logit array: the largest divisor of the token chunk that stays under 32 MiB,
    so every token-store chunk still maps to a whole number of cache chunks."""
    for w in range(chunk_windows, 0, -1):
        if chunk_windows % w == 0 and w * seq_len * vocab_size * 2 <= MAX_FULL_CHUNK_BYTES:
            return w
    return 1


def blosc(typesize: int, name: str):
    from cachekd.tokens.format import blosc as _blosc

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


def array_names(mode: str, k: int | None = None, factored_dtype: str | None = None) -> tuple[str, ...]:
    """The arrays each teacher has in a cache of this mode (a sampled cache without an exact top-K, k = 0, has no
    `ids` and `logprobs`; a factored cache stores `hidden_scale` with int8 only)."""
    if mode == "factored" and factored_dtype != "int8":
        return ("hidden",)
    if mode == "sampled" and not k:
        return tuple(n for n in ARRAY_NAMES[mode] if n not in ("ids", "logprobs"))
    return ARRAY_NAMES[mode]


def data_bytes(root: Path) -> int:
    """Bytes of the cache's files, without the done-markers and the manifest."""
    from cachekd.storage import file_sizes

    return sum(n for rel, n in file_sizes(location(root)).items()
               if DONE_DIR not in rel.split("/") and rel.rsplit("/", 1)[-1] != MANIFEST_FILE)


@dataclass(frozen=True)
class SampleSpec:
    """How a sampled cache drew its ids (the plan's `sample` entry): `num_draws` N per position and proposal,
    `proposal_temperature` τ_r (None: each cached τ has its own draws at τ_r = τ) and the `seed`."""

    num_draws: int
    proposal_temperature: float | None = None
    seed: int = 0

    def num_proposals(self, num_temperatures: int) -> int:
        return num_temperatures if self.proposal_temperature is None else 1

    def width(self, num_temperatures: int) -> int:
        """Stored ids per position (padded): every draw of every proposal could be a distinct id."""
        return self.num_draws * self.num_proposals(num_temperatures)

    def count_dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if self.num_draws <= 255 else np.dtype(np.uint16)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SampleSpec":
        if not isinstance(d, dict) or not isinstance(d.get("num_draws"), int):
            raise CachekdError("the cache's plan has a 'sample' entry without an integer num_draws")
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class ArraySpec:
    """One array of one teacher in one split: its name, shape, chunking, dtype and codecs."""

    name: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype

    def compressors(self) -> list:
        return compressors(self.dtype.itemsize, self.name)


@dataclass(frozen=True)
class TokenStoreRef:
    """The token store a cache was computed from, as the plan records it."""

    path: str
    fingerprint: str
    tokenizer_fingerprint: str
    seq_len: int
    vocab_size: int
    chunk_windows: int

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenStoreRef":
        return cls(**{f.name: d[f.name] for f in fields(cls)})


# Plan keys that must agree for a cache to be resumed (the rest, e.g. a teacher's path, may change).
PLAN_IDENTITY = ("format_version", "token_store", "teachers", "mode", "k", "temperatures", "splits", "encoding",
                 "sample", "factored")


@dataclass(kw_only=True)
class CachePlan:
    """What a cache is to hold (plan.json): written when the cache is created, checked when a run resumes.

    `teachers` are the records precompute made of each checkpoint (name, path, fingerprint, model_type,
    num_params, model_vocab_size, padded_logits_dropped, padding_mass). `splits` maps a split to its number of
    windows. `encoding` is None for caches written before it was recorded (then the default scale applies).
    `extra` keeps keys this version does not know, so a plan read and written again is unchanged."""

    token_store: TokenStoreRef
    teachers: list[dict[str, Any]]
    mode: Literal["topk", "full", "sampled", "factored"]
    k: int | None
    temperatures: list[float]
    splits: dict[str, int]
    encoding: dict[str, Any] | None = None
    sample: dict[str, Any] | None = None
    """Sampled caches only: the `SampleSpec` as a JSON object (k is then the exact top-K of a hybrid, 0 for none)."""
    factored: dict[str, Any] | None = None
    """Factored caches only: {"dtype": one of FACTORED_DTYPES, "weight_dtype": "float32"}, for int8 "rounding"
    ("feedback" or "nearest"), plus for the compressed
    form "rank": r and "fit": {"windows": n, "seed": s} (the sample the basis was fitted on); each teacher's record
    holds its `output_layer` ({"hidden_size": d, "bias": bool})."""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    _OPTIONAL = ("encoding", "sample", "factored")

    # --- derived facts
    @property
    def teacher_names(self) -> list[str]:
        return [t["name"] for t in self.teachers]

    @property
    def logprob_scale(self) -> float:
        """The fixed-point scale the log-probabilities are (to be) written with."""
        return float((self.encoding or {}).get("logprob_scale", LOGPROB_SCALE))

    @property
    def rounding(self) -> float:
        """The largest rounding error (nats) of a stored log-probability or tail_lse (half a fixed-point step)."""
        from cachekd.cache.encoding import TAIL_SCALE

        return max(0.5 / self.logprob_scale, 0.5 / TAIL_SCALE)

    @property
    def chunk_windows(self) -> int:
        return int(self.token_store.chunk_windows)

    @property
    def sample_spec(self) -> SampleSpec | None:
        return None if self.sample is None else SampleSpec.from_dict(self.sample)

    @property
    def storage_kind(self) -> str:
        """In words: "full logits", "top-64", "sampled N=50", "hybrid top-16 + sampled N=50"."""
        if self.mode == "full":
            return "full logits"
        if self.mode == "factored":
            d = ", ".join(str(self.hidden_size(t)) for t in self.teacher_names)
            rank = self.factored_rank
            return f"factored {self.factored_dtype} (d={d})" if rank is None else \
                f"factored {self.factored_dtype} rank {rank} (d={d})"
        if self.mode == "topk":
            return f"top-{self.k}"
        spec = self.sample_spec
        draws = f"sampled N={spec.num_draws}" + (f" (proposal τ={spec.proposal_temperature:g})"
                                                  if spec.proposal_temperature is not None else "")
        return f"hybrid top-{self.k} + {draws}" if self.k else draws

    @property
    def factored_dtype(self) -> str | None:
        """How a factored cache stores h (FACTORED_DTYPES); None for the other kinds."""
        return None if self.factored is None else str(self.factored.get("dtype", "int8"))

    @property
    def factored_rank(self) -> int | None:
        """r of a compressed factored cache (r coefficients a position); None for the exact form."""
        rank = (self.factored or {}).get("rank")
        return None if rank is None else int(rank)

    @property
    def factored_rounding(self) -> str | None:
        """How a factored int8 cache rounded h: "feedback" or "nearest"; None for 16-bit h and the other kinds."""
        return None if self.factored_dtype != "int8" else str(self.factored.get("rounding", "nearest"))

    def stored_width(self, teacher: str) -> int:
        """Numbers a position of a factored cache's teacher: r for the compressed form, else d."""
        return self.factored_rank or self.hidden_size(teacher)

    def hidden_size(self, teacher: str) -> int:
        """d of a factored cache's teacher: the width of its output layer's input."""
        for t in self.teachers:
            if t["name"] == teacher:
                return int(t["output_layer"]["hidden_size"])
        raise KeyError(teacher)

    def has_bias(self, teacher: str) -> bool:
        """Whether the stored output layer has a bias (always for the compressed form: b + W·μ)."""
        if self.factored_rank is not None:
            return True
        return any(t["name"] == teacher and bool(t["output_layer"].get("bias")) for t in self.teachers)

    def array_names(self) -> tuple[str, ...]:
        return array_names(self.mode, self.k, self.factored_dtype)

    def factor_specs(self, teacher: str) -> list[ArraySpec]:
        """A factored cache's arrays written once per teacher: weight (V, w), bias (V,) and dim_scale (w,), w = d or
        r; int8 also rounding (w, w); the compressed form also mean (d,) and basis (d, r)."""
        V, d, w = self.token_store.vocab_size, self.hidden_size(teacher), self.stored_width(teacher)
        rows = max(1, min(V, (16 << 20) // (4 * w)))  # chunks of at most 16 MiB
        f32 = np.dtype(np.float32)
        rank = self.factored_rank
        return ([ArraySpec("weight", (V, w), (rows, w), f32)]
                + ([ArraySpec("bias", (V,), (V,), f32)] if self.has_bias(teacher) else [])
                + [ArraySpec("dim_scale", (w,), (w,), f32)]
                + ([ArraySpec("rounding", (w, w), (w, w), f32)] if self.factored_rounding == "feedback" else [])
                + ([ArraySpec("mean", (d,), (d,), f32), ArraySpec("basis", (d, rank), (d, rank), f32)] if rank else []))

    def num_chunks(self, split: str) -> int:
        return math.ceil(int(self.splits[split]) / self.chunk_windows)

    def chunk_range(self, split: str, chunk: int) -> tuple[int, int]:
        """Windows [start, stop) of a chunk."""
        cw = self.chunk_windows
        return chunk * cw, min((chunk + 1) * cw, int(self.splits[split]))

    def array_specs(self, split: str, teacher: str | None = None) -> list[ArraySpec]:
        """The arrays each teacher has in `split` (factored caches: `teacher`'s, whose d they depend on); top-k,
        sampled and factored arrays are chunked like the token store, full-logit arrays by a divisor of it
        (`full_chunk_windows`)."""
        n, L, cw, V = int(self.splits[split]), self.token_store.seq_len, self.chunk_windows, self.token_store.vocab_size
        if self.mode == "factored":
            assert teacher is not None, "a factored cache's arrays depend on the teacher"
            d, dtype = self.stored_width(teacher), self.factored_dtype
            store = {"int8": np.int8, "bf16": np.int16, "fp16": np.float16}[dtype]
            return [ArraySpec("hidden", (n, L, d), (cw, L, d), np.dtype(store))] + (
                [ArraySpec("hidden_scale", (n, L), (cw, L), np.dtype(np.float32))] if dtype == "int8" else [])
        if self.mode == "topk":
            k, nt = int(self.k), len(self.temperatures)
            return [ArraySpec("ids", (n, L, k), (cw, L, k), id_dtype(V)),
                    ArraySpec("logprobs", (n, L, k), (cw, L, k), np.dtype(np.uint16)),
                    ArraySpec("tail_lse", (n, L, nt), (cw, L, nt), np.dtype(np.int16))]
        if self.mode == "sampled":
            k, nt, spec = int(self.k or 0), len(self.temperatures), self.sample_spec
            w, nr = spec.width(nt), spec.num_proposals(nt)
            exact = [ArraySpec("ids", (n, L, k), (cw, L, k), id_dtype(V)),
                     ArraySpec("logprobs", (n, L, k), (cw, L, k), np.dtype(np.uint16))] if k else []
            return exact + [ArraySpec("tail_lse", (n, L, nt), (cw, L, nt), np.dtype(np.int16)),
                            ArraySpec("sample_ids", (n, L, w), (cw, L, w), id_dtype(V)),
                            ArraySpec("sample_logprobs", (n, L, w), (cw, L, w), np.dtype(np.uint16)),
                            ArraySpec("sample_counts", (n, L, w, nr), (cw, L, w, nr), spec.count_dtype()),
                            ArraySpec("entropy", (n, L, nt), (cw, L, nt), np.dtype(np.int16))]
        fw = full_chunk_windows(cw, L, V)
        return [ArraySpec("logits", (n, L, V), (fw, L, V), np.dtype(np.float16))]

    # --- identity (resume)
    def identity(self) -> dict[str, Any]:
        d = self.to_dict()
        ident = {k: d.get(k) for k in PLAN_IDENTITY}
        ident["teachers"] = [{k: t.get(k) for k in ("name", "fingerprint")} for t in self.teachers]
        ident["token_store"] = {"fingerprint": self.token_store.fingerprint}
        return ident

    def difference(self, other: "CachePlan") -> str:
        """What makes `other` a different cache than this one, in words ('' when they are the same)."""
        a, b = self.identity(), other.identity()
        for key in PLAN_IDENTITY:
            if a.get(key) != b.get(key):
                if key == "teachers":
                    return (f"teachers {[t['name'] for t in a['teachers']]} vs {[t['name'] for t in b['teachers']]} "
                            f"(or their checkpoints changed)")
                if key == "token_store":
                    return "it was built from another token store"
                return f"{key} {a.get(key)} vs {b.get(key)}"
        return ""

    # --- JSON
    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to plan.json (manifest.json for a CacheManifest)."""
        out = dict(self.extra)
        for f in fields(self):
            if f.name == "extra" or (f.name in self._OPTIONAL and getattr(self, f.name) is None):
                continue
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, TokenStoreRef) else v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """A plan (or manifest) from its JSON object; a missing or mistyped entry is a CachekdError naming it."""
        what = cls._what
        if not isinstance(d, dict):
            raise CachekdError(f"the cache's {what} is not a JSON object")
        names = {f.name for f in fields(cls)} - {"extra"}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in d]
        if not missing and isinstance(d["token_store"], dict):
            missing = [f"token_store.{f.name}" for f in fields(TokenStoreRef) if f.name not in d["token_store"]]
        if missing:
            raise CachekdError(f"the cache's {what} lacks the entry {missing[0]!r}")
        for key, kind in (("token_store", dict), ("teachers", list), ("splits", dict), ("temperatures", list)):
            if not isinstance(d[key], kind):
                raise CachekdError(f"the cache's {what} has a {key!r} entry that is not a JSON {kind.__name__}")
        kwargs = {k: d[k] for k in names if k in d}
        kwargs["token_store"] = TokenStoreRef.from_dict(d["token_store"])
        return cls(**kwargs, extra={k: v for k, v in d.items() if k not in names})

    _what = "plan"


@dataclass(kw_only=True)
class CacheManifest(CachePlan):
    """A complete cache's manifest.json: its plan plus when and by what it was finished, the teachers' statistics
    per split (positions, mean top-k mass per τ, entropy mean/min/max) and its size."""

    complete: bool = True
    finished: str = ""
    cachekd_version: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    bytes_on_disk: int = 0
    bytes_per_position: float = 0.0

    _what = "manifest"

    @classmethod
    def of_plan(cls, plan: CachePlan, **facts: Any) -> "CacheManifest":
        base = {f.name: getattr(plan, f.name) for f in fields(CachePlan)}
        return cls(**base, **facts)


def read_plan(path: Path, cls: type[CachePlan] = CachePlan) -> CachePlan:
    """plan.json (or manifest.json with ``cls=CacheManifest``) as a typed plan; a file that does not parse or
    does not describe a cache is a CachekdError saying what is wrong with it."""
    import json

    try:
        data = json.loads(location(path).read_bytes())
    except ValueError:
        raise CachekdError("it is not valid JSON") from None
    return cls.from_dict(data)
