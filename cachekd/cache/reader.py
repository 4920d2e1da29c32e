"""Reading a logit cache: whole chunks (or window ranges) decoded into arrays the losses take."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cachekd.cache import encoding as enc
from cachekd.cache import format as fmt
from cachekd.errors import CachekdError
from cachekd.io import check_format, open_array_read_only
from cachekd.storage import location


@dataclass
class TeacherBlock:
    """One teacher's cached outputs for a run of windows.

    top-k mode: `ids` (n, L, k) int64 sorted ids, `logprobs` (n, L, k) float32 τ=1 log-probabilities (shift-invariant
    logits for the losses), `tail_lse` (n, L, n_τ) float32 (decoded from fixed point, ±9.8e-4). Full mode: `logits` (n, L, V) float16.
    Sampled mode: the exact top-k as in top-k mode (hybrid only), `tail_lse` over the tokens beyond them (the whole
    vocabulary's normaliser N_τ without a top-k), `sample_ids` (n, L, W) int64 sorted (pads repeat the last id),
    `sample_logprobs` (n, L, W) float32 τ=1 log-probabilities (0 at pads), `sample_counts` (n, L, W, n_r) int64
    (0 at pads) and `entropy` (n, L, n_τ) float32 (see cachekd.teacher_samples). Factored mode: `hidden` (n, L, d)
    and, for int8, `hidden_scale` (n, L) as stored (`cachekd.cache.encoding.decode_hidden` turns them into h /
    dim_scale on the training device; `LogitCache.factors` gives the output layer that multiplies them).
    """

    ids: np.ndarray | None = None
    logprobs: np.ndarray | None = None
    tail_lse: np.ndarray | None = None
    logits: np.ndarray | None = None
    sample_ids: np.ndarray | None = None
    sample_logprobs: np.ndarray | None = None
    sample_counts: np.ndarray | None = None
    entropy: np.ndarray | None = None
    hidden: np.ndarray | None = None
    hidden_scale: np.ndarray | None = None

    NAMES = ("ids", "logprobs", "tail_lse", "logits", "sample_ids", "sample_logprobs", "sample_counts", "entropy",
             "hidden", "hidden_scale")

    def __len__(self) -> int:
        return len(next(getattr(self, n) for n in self.NAMES if getattr(self, n) is not None))

    def select(self, rows: np.ndarray) -> "TeacherBlock":
        return TeacherBlock(**{n: None if getattr(self, n) is None else getattr(self, n)[rows] for n in self.NAMES})


REPAIR_HINT = ("run `cachekd verify {path} --repair`, then re-run `cachekd precompute` with the same arguments "
               "to recompute the damaged chunks")


FINISH_HINT = ("run the same `cachekd precompute` command again to finish it"
               " (after `--part i/n` jobs: run the parts not yet run, or once without --part)")


class DamagedChunkError(CachekdError):
    """A chunk of a cache array that cannot be read or decoded (truncated, overwritten, checksum mismatch)."""

    # (the keywords have defaults: torch's DataLoader re-raises a worker's exception as `type(e)(message)`)
    def __init__(self, message: str, *, split: str = "", teacher: str = "", array: str = "", chunk: int | None = None,
                 reason: str = ""):
        super().__init__(message)
        self.split, self.teacher, self.array, self.chunk, self.reason = split, teacher, array, chunk, reason


def _reason(e: BaseException) -> str:
    """A short description of a codec error (zarr and numcodecs raise ValueError/RuntimeError with their own text)."""
    msg = str(e).lower()
    if "checksum" in msg:
        return "checksum mismatch"
    if "decompress" in msg or "blosc" in msg or "zstd" in msg:
        return "decompression failed"
    return type(e).__name__


MASS_SAMPLE_CHUNKS = 4
"""Chunks read to estimate the captured top-k mass of a cache whose manifest does not record it."""


def topk_mass(logprobs: np.ndarray, tail_lse: np.ndarray, tau: float) -> np.ndarray:
    """Per position, the share of the teacher's probability at temperature τ in its top-k: with
    h = logsumexp_k(logprobs / τ) and the stored tail t = log Σ_{v∉top-k} exp(log p_v / τ) (same shift),
    exp(h − logaddexp(h, t)). `logprobs` (..., k) τ=1 log-probabilities, `tail_lse` (...) at τ; float64 result."""
    z = np.asarray(logprobs, dtype=np.float64) / tau
    m = z.max(-1, keepdims=True)
    head = np.log(np.exp(z - m).sum(-1)) + m[..., 0]
    return np.exp(head - np.logaddexp(head, np.asarray(tail_lse, dtype=np.float64)))


class LogitCache:
    """Read access to a logit cache. `plan` is its typed plan (a `CacheManifest` once complete); `meta` the same
    as the JSON object it was read from."""

    def __init__(self, path: Path, meta: dict[str, Any], complete: bool, *, has_manifest: bool | None = None):
        self.path = location(path)
        self.meta = meta
        self.has_manifest = complete if has_manifest is None else has_manifest
        self.plan: fmt.CachePlan = (fmt.CacheManifest if self.has_manifest else fmt.CachePlan).from_dict(meta)
        self.manifest_problem: str | None = None  # why manifest.json could not be read (then has_manifest is False)
        self._markers: dict[str, dict[int, dict[str, Any]]] = {}
        self.complete = complete
        self._arrays: dict[str, Any] = {}
        self._factors: dict[str, dict[str, np.ndarray]] | None = None

    @classmethod
    def open(cls, path: str | Path, *, allow_incomplete: bool = False) -> "LogitCache":
        """Open a cache. It is complete when manifest.json exists AND every chunk of every split is done; an
        incomplete one is refused unless `allow_incomplete` (info, verify). A damaged manifest.json (it is
        derived from plan.json and the done-markers) makes the cache incomplete; a damaged plan.json cannot be
        resumed: both are one sentence saying what to do."""
        p = location(path)
        if not p.exists():
            raise CachekdError(f"cache {str(p)!r} does not exist; create it with `cachekd precompute`.")
        manifest_problem = None
        if fmt.manifest_path(p).exists():
            try:
                meta = _read_meta(fmt.manifest_path(p), fmt.CacheManifest)
                has_manifest = True
            except _DamagedMeta as e:
                if not allow_incomplete or not fmt.plan_path(p).exists():
                    raise CachekdError(
                        f"the manifest.json of cache {str(p)!r} is damaged ({e}); run `cachekd verify {p} --repair`, "
                        f"then the same `cachekd precompute` command, to write it again."
                    ) from None
                manifest_problem = f"manifest.json is damaged ({e})"
        if manifest_problem is not None or not fmt.manifest_path(p).exists():
            if not fmt.plan_path(p).exists():
                raise CachekdError(f"{str(p)!r} is not a logit cache (no manifest.json); create one with `cachekd precompute`.")
            if not allow_incomplete:
                raise CachekdError(f"cache {str(p)!r} is incomplete; " + FINISH_HINT + ".")
            try:
                meta, has_manifest = _read_meta(fmt.plan_path(p), fmt.CachePlan), False
            except _DamagedMeta as e:
                raise CachekdError(
                    f"the plan.json of cache {str(p)!r} is damaged ({e}); start the cache again with the same "
                    f"`cachekd precompute` command plus --force."
                ) from None
        cache = cls(p, meta, False, has_manifest=has_manifest)
        cache.manifest_problem = manifest_problem
        cache.complete = has_manifest and not any(cache.pending_chunks().values())
        if not cache.complete and not allow_incomplete:
            raise CachekdError(
                f"cache {str(p)!r} is incomplete ({cache.describe_missing()}); run the same `cachekd precompute` "
                f"command again to finish it."
            )
        if not allow_incomplete:  # verify opens them one by one and reports each
            cache.open_arrays()
        return cache

    def open_arrays(self) -> None:
        """Open every array of every teacher (their zarr.json only): a missing or edited one is one sentence now,
        before a run writes anything, not a traceback at the first read of it."""
        for split in self.splits():
            for teacher in self.teachers:
                for spec in self.plan.array_specs(split, teacher):
                    self._array(split, teacher, spec.name)
        self._arrays.clear()  # opened again where they are read (a loader's worker process)

    # --- facts
    @property
    def teachers(self) -> list[str]:
        return self.plan.teacher_names

    @property
    def mode(self) -> str:
        return self.plan.mode

    @property
    def k(self) -> int | None:
        return self.plan.k

    @property
    def temperatures(self) -> list[float]:
        return list(self.plan.temperatures)

    @property
    def vocab_size(self) -> int:
        return int(self.plan.token_store.vocab_size)

    @property
    def seq_len(self) -> int:
        return int(self.plan.token_store.seq_len)

    @property
    def chunk_windows(self) -> int:
        return self.plan.chunk_windows

    def splits(self) -> list[str]:
        return list(self.plan.splits)

    def num_windows(self, split: str) -> int:
        return int(self.plan.splits[split])

    def temperature_index(self, tau: float) -> int:
        """Index of τ in the cached `tail_lse`, or a clear refusal listing what the cache has."""
        if self.mode in ("full", "factored"):
            return -1
        for i, t in enumerate(self.temperatures):
            if math.isclose(t, tau, rel_tol=1e-9, abs_tol=1e-12):
                return i
        have = ", ".join(f"{t:g}" for t in self.temperatures)
        if self.mode == "sampled":
            raise CachekdError(
                f"the sampled cache holds normalisers and entropies for temperatures {have} only, not {tau:g}; choose "
                f"one of those or run precompute with --temperatures including {tau:g}."
            )
        raise CachekdError(
            f"the cache has tail_lse for temperatures {have} only, not {tau:g}; choose one of those or run precompute "
            f"with --temperatures including {tau:g}."
        )

    def check_store(self, store) -> None:
        """Refuse a token store that is not the one this cache was computed from, saying what differs."""
        ts = self.plan.token_store
        store.check_tokenizer(
            fingerprint=ts.tokenizer_fingerprint,
            tokenizer_error=lambda fp: (f"cache {str(self.path)!r} was built with another tokenizer than token store "
                                        f"{str(store.path)!r}; precompute a cache for this store."),
        )
        if ts.seq_len != store.seq_len:
            raise CachekdError(
                f"cache {str(self.path)!r} has windows of {ts.seq_len} tokens but token store {str(store.path)!r} "
                f"has {store.seq_len}; precompute a cache for this store."
            )
        if ts.fingerprint != store.fingerprint:
            raise CachekdError(
                f"cache {str(self.path)!r} was built from another token store (fingerprint {ts.fingerprint[:12]} vs "
                f"{store.fingerprint[:12]} of {str(store.path)!r}); precompute a cache for this store."
            )

    def select_teachers(self, names: Sequence[str] | None) -> list[str]:
        if not names:
            return self.teachers
        for n in names:
            if n not in self.teachers:
                raise CachekdError(f"the cache has no teacher {n!r}; it has {', '.join(self.teachers)}.")
        twice = sorted({n for n in names if list(names).count(n) > 1})
        if twice:
            raise CachekdError(f"teacher {twice[0]!r} is named twice in the teacher list; name each teacher once "
                               f"(use distill.teacher_weights to weight one more).")
        return list(names)

    # --- data
    def _array(self, split: str, teacher: str, name: str):
        key = fmt.array_path(split, teacher, name)
        if key not in self._arrays:
            what = f"the {name} array of teacher {teacher!r} ({split} split) in cache {str(self.path)!r}"
            remedy = "rebuild the cache with the same `cachekd precompute` command plus --force"
            arr = open_array_read_only(self.path / key, what, remedy)
            spec = next((a for a in self.plan.array_specs(split, teacher) if a.name == name), None)
            # an edited or damaged zarr.json that still parses: every read would index or decode it wrongly
            if spec is not None and (tuple(arr.shape) != spec.shape or np.dtype(arr.dtype) != spec.dtype):
                raise CachekdError(f"{what} has shape {list(arr.shape)} and dtype {np.dtype(arr.dtype)} in its "
                                   f"zarr.json, where the cache's plan needs {list(spec.shape)} and {spec.dtype} (the "
                                   f"file was edited or damaged); {remedy}.")
            self._arrays[key] = arr
        return self._arrays[key]

    def _chunks(self, start: int, stop: int) -> range:
        """The (token-store) chunks that windows [start, stop) touch."""
        cw = self.chunk_windows
        return range(start // cw, (max(stop, start + 1) - 1) // cw + 1)

    def _damaged(self, split: str, teacher: str, name: str, chunk: int | None, windows: tuple[int, int],
                 problem: str, reason: str) -> DamagedChunkError:
        where = f"chunk {chunk} (windows {windows[0]} to {windows[1] - 1})" if chunk is not None else \
            f"windows {windows[0]} to {windows[1] - 1}"
        return DamagedChunkError(
            f"the {split} split's {where} of teacher {teacher!r} in cache {str(self.path)!r} cannot be read: its "
            f"{name} {problem}; " + REPAIR_HINT.format(path=self.path),
            split=split, teacher=teacher, array=name, chunk=chunk, reason=reason,
        )

    def _chunk_windows(self, chunk: int, arr) -> tuple[int, int]:
        cw = self.chunk_windows
        return chunk * cw, min((chunk + 1) * cw, arr.shape[0])

    def _read_array(self, split: str, teacher: str, name: str, start: int, stop: int) -> np.ndarray:
        """Windows [start, stop) of one array; a chunk that cannot be read or decoded is a DamagedChunkError
        naming the split, teacher, array, chunk and windows, and saying how to repair it."""
        arr = self._array(split, teacher, name)
        if self.mode == "topk" or name in ("ids", "logprobs", "sample_counts", "hidden_scale"):
            self._check_chunk_files(arr, split, teacher, name, start, stop)
        try:
            data = arr[start:stop]
        except (PermissionError, MemoryError):
            raise  # not damage: the CLI reports these as they are
        except Exception as e:  # codecs raise ValueError/RuntimeError/... with their own text
            chunk, windows = None, (start, stop)
            for c in self._chunks(start, stop):  # which chunk: probe them one by one
                lo, hi = max(start, c * self.chunk_windows), min(stop, (c + 1) * self.chunk_windows)
                try:
                    arr[lo:hi]
                except Exception:  # noqa: BLE001 - any failure marks the damaged chunk
                    chunk, windows = c, self._chunk_windows(c, arr)  # the whole chunk, not the read
                    break
            reason = _reason(e)
            raise self._damaged(split, teacher, name, chunk, windows, f"data is corrupt or truncated ({reason})",
                                reason) from e
        self._check_binding(arr, split, teacher, name, start, stop)  # it decodes: is it this chunk's data?
        return data

    def _check_chunk_files(self, arr, split: str, teacher: str, name: str, start: int, stop: int) -> None:
        """zarr reads a missing chunk file as the fill value (zeros) without a word. A top-k chunk can never be all
        zeros (ids are distinct, log-probabilities and tails below 0), so zarr never skips writing one: a missing
        file is a deleted one. (In a sampled cache the same holds for the exact top-k and the counts; its tail_lse
        is 0 at τ=1 without a top-k and its entropy 0 for a one-hot teacher, so those are not checked.) (Full-logit chunks are not checked: a degenerate teacher could write all-zero
        logits, which zarr stores as no file; top-k arrays are chunked like the token store.)"""
        base = self.path / fmt.array_path(split, teacher, name)
        for c in self._chunks(start, stop):
            if not (base / arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))).exists():
                raise self._damaged(split, teacher, name, c, self._chunk_windows(c, arr), "file is missing",
                                    "file missing")

    def _check_binding(self, arr, split: str, teacher: str, name: str, start: int, stop: int) -> None:
        """Each chunk file must end with the CRC-32C its done-marker recorded when it was written: a valid chunk
        file copied from another chunk, or left from an earlier write, decodes but is refused here."""
        base = self.path / fmt.array_path(split, teacher, name)
        for c in self._chunks(start, stop):
            want = self.done_markers(split).get(c, {}).get(fmt.CHUNK_CRC32C, {}).get(f"{teacher}/{name}")
            if want is None:
                continue  # written before the binding existed, or without the checksum codec
            lo, hi = self._chunk_windows(c, arr)
            got = [fmt.stored_crc32c(f) for f in fmt.chunk_files(arr, base, lo, hi)]
            if any(g is None and w is not None for g, w in zip(got, want)):  # written, now gone: read as zeros
                raise self._damaged(split, teacher, name, c, (lo, hi), "file is missing", "file missing")
            if got != want:
                raise self._damaged(split, teacher, name, c, (lo, hi),
                                    "file holds other data than was written for this chunk (a misplaced or stale "
                                    "chunk file)", "misplaced or stale")

    def read_stored(self, split: str, start: int, stop: int, teachers: Sequence[str] | None = None
                    ) -> dict[str, dict[str, np.ndarray]]:
        """Windows [start, stop) of each teacher's arrays as stored (by array name, not decoded: see
        `cachekd.cache.encoding.decode_stored`). Raises DamagedChunkError (a CachekdError) for a chunk that cannot
        be read or decoded."""
        if split not in self.plan.splits:
            raise CachekdError(f"the cache has no {split!r} split (it has {', '.join(self.splits())}).")
        return {t: {name: self._read_array(split, t, name, start, stop) for name in self.plan.array_names()}
                for t in self.select_teachers(teachers)}

    def read(self, split: str, start: int, stop: int, teachers: Sequence[str] | None = None) -> dict[str, TeacherBlock]:
        """Decoded outputs of windows [start, stop) for each teacher. Raises DamagedChunkError (a CachekdError)
        for a chunk that cannot be read or decoded."""
        scale = self.plan.logprob_scale
        return {t: TeacherBlock(**{name: enc.decode_stored(name, enc.stored_tensor(a), scale).numpy()
                                   for name, a in arrays.items()})
                for t, arrays in self.read_stored(split, start, stop, teachers).items()}

    def factors(self, teacher: str) -> dict[str, np.ndarray]:
        """A factored cache's output layer of `teacher`: "weight" (V, d) float32 with the per-dimension scale
        folded in, "bias" (V,) (heads with a bias only) and "dim_scale" (d,), read once and checked against
        done/factors.json; damaged or missing factors are a DamagedChunkError saying how to repair them."""
        assert self.mode == "factored", "factors: a factored cache only"
        if self._factors is None:
            self._factors = read_factor_arrays(self.path, self.plan)
        return self._factors[teacher]

    def read_chunk(self, split: str, chunk: int, teachers: Sequence[str] | None = None,
                   tokens: np.ndarray | None = None) -> dict[str, TeacherBlock]:
        """One chunk's decoded outputs; with `tokens` (the store's chunk) also checks they are the token ids the
        chunk was computed from (`check_tokens`)."""
        if tokens is not None:
            self.check_tokens(split, chunk, tokens)
        start, stop = self.chunk_range(split, chunk)
        return self.read(split, start, stop, teachers)

    def read_chunk_stored(self, split: str, chunk: int, teachers: Sequence[str] | None = None,
                          tokens: np.ndarray | None = None) -> dict[str, dict[str, np.ndarray]]:
        """One chunk's arrays as stored (`read_stored`), checked against `tokens` as `read_chunk` does."""
        if tokens is not None:
            self.check_tokens(split, chunk, tokens)
        start, stop = self.chunk_range(split, chunk)
        return self.read_stored(split, start, stop, teachers)

    def chunk_range(self, split: str, chunk: int) -> tuple[int, int]:
        """Windows [start, stop) of a chunk."""
        return self.plan.chunk_range(split, chunk)

    def num_chunks(self, split: str) -> int:
        return self.plan.num_chunks(split)

    def done_markers(self, split: str) -> dict[int, dict[str, Any]]:
        """The readable done-markers of a split by chunk, read once (an empty or unparsable marker is missing)."""
        if split not in self._markers:
            self._markers[split] = fmt.done_markers(self.path, split)
        return self._markers[split]

    def done_chunks(self, split: str) -> list[int]:
        return [c for c in self.done_markers(split) if c < self.num_chunks(split)]

    def pending_chunks(self) -> dict[str, list[int]]:
        """Chunks without a done-marker, per split."""
        return {s: [c for c in range(self.num_chunks(s)) if c not in self.done_markers(s)] for s in self.splits()}

    def describe_missing(self) -> str:
        """What keeps the cache from being complete, in words ('' when it is complete)."""
        text = describe_missing_chunks({s: p for s, p in self.pending_chunks().items() if p},
                                       {s: self.num_chunks(s) for s in self.splits()},
                                       not self.has_manifest and self.manifest_problem is None)
        return "; ".join(x for x in (text, self.manifest_problem) if x)

    def check_tokens(self, split: str, chunk: int, tokens: np.ndarray) -> None:
        """Refuse the cache chunk when it was computed from other token ids than `tokens` (the store's chunk):
        the cache chunk is stale or misplaced, or the store's chunk changed. Chunks written before the binding
        existed pass."""
        want = self.done_markers(split).get(chunk, {}).get(fmt.TOKENS_DIGEST)
        if want is not None and fmt.tokens_digest(tokens) != want:
            start, stop = self.chunk_range(split, chunk)
            raise DamagedChunkError(
                f"the {split} split's chunk {chunk} (windows {start} to {stop - 1}) in cache {str(self.path)!r} was "
                f"computed from other token ids than the token store holds for it (a misplaced or stale chunk, or "
                f"a changed store); run `cachekd verify {self.path}` to find which, then follow what it says",
                split=split, chunk=chunk, array="tokens", reason="computed from other tokens",
            )

    def has_checksums(self) -> bool | None:
        """Whether every array stores a crc32c checksum per chunk (False for caches written before checksums;
        None when an array cannot be opened)."""
        try:
            return all(fmt.has_checksum(self._array(s, t, name))
                       for s in self.splits() for t in self.teachers for name in self.plan.array_names())
        except CachekdError:
            return None

    # --- fidelity
    def captured_topk_mass(self, teacher: str, tau: float, split: str = "train") -> tuple[float, str]:
        """The mean share of teacher `teacher`'s probability at temperature `tau` that its cached top-k holds, over
        the positions of `split`, and where it comes from: ``"manifest"`` (the chunk statistics precompute
        records), or, for a cache whose manifest lacks them, ``"sample of N chunks"`` (computed here from the
        stored log-probabilities and tail_lse of up to `MASS_SAMPLE_CHUNKS` evenly spaced chunks). τ must be one
        of the cached temperatures; top-k caches only."""
        assert self.mode == "topk", "captured_topk_mass: a full-logit cache holds all of the mass"
        i = self.temperature_index(tau)
        stats = self.plan.stats if isinstance(self.plan, fmt.CacheManifest) else {}
        recorded = ((stats.get(split) or {}).get(teacher) or {}).get("mean_topk_mass") or {}
        for t, v in recorded.items():
            if math.isclose(float(t), tau, rel_tol=1e-9, abs_tol=1e-12):
                return float(v), "manifest"
        n = self.num_chunks(split)
        picks = min(n, MASS_SAMPLE_CHUNKS)
        chunks = sorted({round(j * (n - 1) / max(picks - 1, 1)) for j in range(picks)})  # evenly spaced
        total, count = 0.0, 0
        for c in chunks:
            b = self.read_chunk(split, c, [teacher])[teacher]
            total += float(topk_mass(b.logprobs, b.tail_lse[..., i], tau).sum())
            count += b.logprobs.shape[0] * b.logprobs.shape[1]
        return total / max(count, 1), f"sample of {len(chunks)} chunk{'s' if len(chunks) != 1 else ''}"


def read_factor_arrays(root: Path, plan: fmt.CachePlan) -> dict[str, dict[str, np.ndarray]]:
    """Every teacher's factors of a factored cache ({teacher: {"weight", "bias"?, "dim_scale"}}, float32), each
    array's chunk files checked against the CRC-32Cs done/factors.json recorded. A missing marker, a missing or
    damaged array is a DamagedChunkError (array "factors") saying how to repair it."""
    root = Path(root)
    marker = fmt.read_done_marker(fmt.factors_done_path(root))

    def damaged(teacher: str, problem: str) -> DamagedChunkError:
        return DamagedChunkError(
            f"the output layer (factors) of teacher {teacher!r} in cache {str(root)!r} cannot be read: {problem}; "
            + REPAIR_HINT.format(path=root), teacher=teacher, array="factors", reason=problem)

    out: dict[str, dict[str, np.ndarray]] = {}
    for teacher in plan.teacher_names:
        if marker is None or teacher not in marker:
            raise damaged(teacher, "done/factors.json is missing or damaged")
        want = marker[teacher].get(fmt.CHUNK_CRC32C, {})
        values = {}
        for spec in plan.factor_specs(teacher):
            path = root / fmt.factor_path(teacher, spec.name)
            arr = open_array_read_only(path, f"the {spec.name} of teacher {teacher!r} in cache {str(root)!r}",
                                       "run `cachekd verify` with --repair, then the same `cachekd precompute`")
            coords = itertools.product(*(range(-(-s // c)) for s, c in zip(arr.shape, arr.chunks)))
            files = [path / arr.metadata.encode_chunk_key(c) for c in coords]
            if spec.name in want and [fmt.stored_crc32c(f) for f in files] != want[spec.name]:
                raise damaged(teacher, f"its {spec.name} holds other data than was written (or is missing)")
            try:
                values[spec.name] = np.asarray(arr[...], dtype=np.float32)
            except Exception as e:  # noqa: BLE001 - codecs raise their own types
                raise damaged(teacher, f"its {spec.name} is corrupt or truncated ({_reason(e)})") from e
            if tuple(values[spec.name].shape) != spec.shape:
                raise damaged(teacher, f"its {spec.name} has shape {values[spec.name].shape}, not {spec.shape}")
        out[teacher] = values
    return out


class _DamagedMeta(CachekdError):
    """plan.json or manifest.json does not parse or does not describe a cache (the message says how)."""


def _read_meta(path: Path, cls: type[fmt.CachePlan]) -> dict[str, Any]:
    """plan.json or manifest.json as its JSON object, checked against the typed spec. Raises _DamagedMeta saying
    what is wrong with the file, or a CachekdError refusing another format or format version."""
    import json

    try:
        meta = json.loads(path.read_bytes())
    except ValueError:
        raise _DamagedMeta("it is not valid JSON") from None
    if not isinstance(meta, dict):
        raise _DamagedMeta("it is not a JSON object")
    p = path.parent
    check_format(meta, expected=fmt.FORMAT, version=fmt.FORMAT_VERSION, what="logit cache", path=p,
                 remedy="run `cachekd precompute` again")
    try:
        cls.from_dict(meta)
    except CachekdError as e:
        raise _DamagedMeta(str(e)) from None
    return meta


def describe_missing_chunks(not_done: dict[str, list[int]], totals: dict[str, int], no_manifest: bool) -> str:
    """The chunks not done per split (the first ten of each) and a missing manifest, in words ('' for none)."""
    parts = [f"{len(p)} of {totals[sp]} {sp} chunks not done ({', '.join(str(c) for c in p[:10])}"
             f"{', ...' if len(p) > 10 else ''})" for sp, p in not_done.items() if p]
    if no_manifest:
        parts.append("no manifest.json")
    return "; ".join(parts)
