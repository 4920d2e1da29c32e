"""Creating, filling and finalising a logit cache: plan first, chunks with done-markers, manifest last."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cachekd import __version__, storage
from cachekd.cache import encoding as enc
from cachekd.cache import format as fmt
from cachekd.errors import CachekdError, ConfigKeysError
from cachekd.io import atomic_write_bytes, atomic_write_json
from cachekd.storage import location


# The writer's lock files in the cache directory (not part of the data; `flock` drops a lock when its holder ends;
# on an object store they are lease objects, see cachekd.storage.Lease).
LOCK_FILE = ".lock"              # serialises creating, finalising and repairing the cache
SHARE_LOCK = ".precompute-{share}-of-{shares}.lock"  # held by the process filling that share (1-based) of the chunks


def share_lock_name(share: int, shares: int) -> str:
    return SHARE_LOCK.format(share=share, shares=shares)


def share_locks(root: Path) -> list[Path]:
    """The share lock files in a cache directory, in name order."""
    return sorted(location(root).glob(".precompute-*-of-*.lock"), key=str)


def share_of_lock(name: str) -> tuple[str, str]:
    """(share, shares) of a share lock file's name, as written."""
    share, _, shares = name[len(".precompute-"):-len(".lock")].partition("-of-")
    return share, shares


def is_lock_file(name: str) -> bool:
    return name == LOCK_FILE or (name.startswith(".precompute-") and name.endswith(".lock"))


@contextmanager
def _lock(root: Path):
    with storage.exclusive(location(root) / LOCK_FILE):
        yield


def try_flock(path: Path):
    """The lock named `path` (``check()``, ``close()``), or None when another process holds it. On disk the
    kernel drops the lock when the holder ends, however it ends (a kill -9 leaves nothing to clean up); on an
    object store a lease left by a killed process is taken over once stale (cachekd.storage.Lease)."""
    return storage.try_exclusive(location(path))


def _held(path: Path) -> bool:
    return storage.is_held(location(path))


def busy_share(root: Path, slot: int, slots: int, *, own: bool = True) -> str | None:
    """What a running precompute is filling that overlaps share `slot` of `slots` (the same share, or any share
    of another split of the chunks, which always overlaps), e.g. "the whole cache" or "share 2 of 2"; None when
    nothing is. ``own=False`` once this process holds its own share's lock (flock would count it as taken)."""
    root = location(root)
    if not root.is_dir():
        return None
    mine = share_lock_name(slot + 1, slots)
    for lock in share_locks(root):
        share, shares = share_of_lock(lock.name)
        if ((lock.name == mine and own) or shares != str(slots)) and _held(lock):
            return "the whole cache" if shares == "1" else f"share {share} of {shares}"
    return None


def open_or_create(root: Path, plan: fmt.CachePlan, *, force: bool = False,
                   share: tuple[int, int] | None = None) -> tuple[fmt.CachePlan, Any]:
    """Create the cache described by `plan`, or open it for resuming when it already holds the same plan.
    Returns (plan, share lock): with ``share`` = (slot, slots), the lock of that share of the chunks, taken in the
    same critical section (so --force elsewhere cannot clear the cache between the two); None when another
    process holds it. The caller keeps the lock file open for the whole run.

    Safe to call from several processes at once (`--part`, torchrun ranks): a file lock serialises creation.
    """
    root = location(root)
    if root.exists() and root.is_file():
        raise CachekdError(f"output {str(root)!r} is a file; choose a directory for the cache.")
    with _lock(root):
        plan = _open_or_create(root, plan, force)
        if share is None:
            return plan, None
        lock = try_flock(root / share_lock_name(share[0] + 1, share[1]))
        if lock is not None and busy_share(root, *share, own=False) is not None:  # another split is running
            lock.close()
            lock = None
        if lock is not None:
            _remove_leftover_markers(root, plan, *share)
        return plan, lock


def _remove_leftover_markers(root: Path, plan: fmt.CachePlan, slot: int, slots: int) -> None:
    """Delete the temporary files of done-markers that a killed process left (``.0000003.json.<random>.tmp``),
    for the chunks of this share only: another share's process may be writing its own markers right now."""
    for split in plan.splits:
        d = fmt.done_dir(root, split)
        if not d.is_dir():
            continue
        for f in d.iterdir():
            chunk = f.name[1:].split(".", 1)[0]
            if fmt.is_leftover_temp(f.name) and chunk.isdigit() and int(chunk) % slots == slot and f.is_file():
                f.unlink(missing_ok=True)


def _open_or_create(root: Path, plan: fmt.CachePlan, force: bool) -> fmt.CachePlan:
    """Resume the cache at `root` when it holds the same plan, else create it. Creation writes plan.json first,
    then the Zarr group and the arrays, so a process killed at any moment leaves either a directory without a
    plan (nothing but lock files and temporary files: created afresh) or a plan whose missing group or arrays the
    next run creates."""
    for p in root.iterdir():
        if fmt.is_leftover_temp(p.name) and p.is_file():
            p.unlink()  # a killed atomic write (plan.json)
    if fmt.plan_path(root).exists():
        try:
            old = fmt.read_plan(fmt.plan_path(root))
        except CachekdError as e:
            if not force:
                raise ConfigKeysError("the cache at {root!r} has a damaged plan.json ({e}); start the cache again "
                                      "with the same precompute command plus {force}.", root=str(root),
                                      e=str(e).rstrip(".")) from None
            old = None
        if old is not None and old.identity() == plan.identity():
            _create_layout(root, old)
            return old
        if old is not None and not force:
            raise ConfigKeysError("the cache at {root!r} was started with different settings ({diff}); choose another "
                                  "output or pass {force} to start it again.", root=str(root),
                                  diff=old.difference(plan))
        _clear(root)
    elif fmt.is_half_created(root):  # killed during creation by a cachekd that wrote the plan last: nothing done yet
        _clear(root)
    elif any(not is_lock_file(p.name) for p in root.iterdir()):
        raise CachekdError(f"output {str(root)!r} is not empty and is not a logit cache; choose another path.")
    atomic_write_json(fmt.plan_path(root), plan.to_dict())
    _create_layout(root, plan)
    return plan


def create_arrays(group, plan: fmt.CachePlan, root: Path) -> None:
    """Create every teacher's arrays in every split that are not there yet; an array whose zarr.json cannot be
    read is created again when none of its chunks was written (a kill during creation), else left for the reader
    to report."""
    for split in plan.splits:
        for teacher in plan.teacher_names:
            for spec in plan.array_specs(split, teacher):
                path = fmt.array_path(split, teacher, spec.name)
                if (location(root) / path / fmt.ZARR_META).exists():
                    try:
                        storage.open_array(location(root) / path, mode="r")
                        continue
                    except Exception:  # noqa: BLE001 - unreadable metadata
                        if (location(root) / path / "c").exists():
                            continue
                group.create_array(path, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype,
                                   compressors=spec.compressors(), fill_value=0, overwrite=True)


def _create_layout(root: Path, plan: fmt.CachePlan) -> None:
    """Create the Zarr group and every array of the plan that is not there (yet, or intact): a group or array
    whose zarr.json a kill left unreadable is created again as long as no chunk of it was written."""
    try:
        # mode "a", not "w": "w" empties the directory, lock files included (.lock is held right now)
        group = storage.open_group(location(root), mode="a", zarr_format=3)
    except Exception:  # noqa: BLE001 - an unreadable group zarr.json left by a kill during creation
        fmt.group_meta_path(root).unlink(missing_ok=True)
        group = storage.open_group(location(root), mode="a", zarr_format=3)
    if group.attrs.get("cachekd") != fmt.FORMAT:
        group.attrs["cachekd"] = fmt.FORMAT
    create_arrays(group, plan, root)


def _clear(root: Path) -> None:
    """Empty the cache directory for --force, unless a precompute is filling it right now (it holds the lock of
    its share of the chunks); lock files stay, so a lock is never split across two files."""
    for lock in share_locks(root):
        if _held(lock):
            raise ConfigKeysError("another precompute is filling the cache at {root!r} right now; stop it before "
                                  "starting the cache again with {force}.", root=str(root))
    for p in root.iterdir():
        if is_lock_file(p.name):
            continue
        storage.remove(p)


def is_done(root: Path, split: str, chunk: int) -> bool:
    return fmt.done_path(root, split, chunk).exists()


def mark_done(root: Path, split: str, chunk: int, stats: dict[str, Any]) -> None:
    """Write the chunk's done-marker; call only after all its data is written."""
    atomic_write_bytes(fmt.done_path(root, split, chunk), json.dumps(stats).encode())


class ChunkWriter:
    """Writes one chunk's encoded arrays for every teacher (called from the background writer thread)."""

    def __init__(self, root: Path, plan: fmt.CachePlan):
        self.root = location(root)
        self.plan = plan
        self.group = storage.open_group(self.root, mode="r+", zarr_format=None)
        self._arrays: dict[str, Any] = {}

    def _arr(self, split: str, teacher: str, name: str):
        key = fmt.array_path(split, teacher, name)
        if key not in self._arrays:
            self._arrays[key] = self.group[key]
        return self._arrays[key]

    def write(self, split: str, chunk: int, results: dict[str, dict[str, np.ndarray]], stats: dict[str, Any]) -> None:
        """Write one chunk of every teacher's arrays, then its done-marker: `stats` (which carries the digest
        of the chunk's token ids, fmt.TOKENS_DIGEST) plus the CRC-32C each written chunk file ends with."""
        # Crash-safety tests set this to widen the window in which a kill lands between two arrays of one chunk.
        pause = float(os.environ.get("CACHEKD_TEST_WRITE_PAUSE_S", "0"))
        start, _ = self.plan.chunk_range(split, chunk)
        vocab = self.plan.token_store.vocab_size
        crcs: dict[str, list[str | None]] = {}
        for teacher, r in results.items():
            stop = start + len(next(iter(r.values())))
            if self.plan.mode == "full":
                self._arr(split, teacher, "logits")[start:stop] = r["logits"]
            if self.plan.mode == "factored":
                for name in self.plan.array_names():
                    self._arr(split, teacher, name)[start:stop] = r[name]
            if "ids" in r:
                ids, q = enc.encode_topk(r["ids"], r["logprobs"], vocab, self.plan.logprob_scale)
                self._arr(split, teacher, "ids")[start:stop] = ids
                if pause:
                    time.sleep(pause)
                self._arr(split, teacher, "logprobs")[start:stop] = q
            if "tail_lse" in r:
                self._arr(split, teacher, "tail_lse")[start:stop] = enc.encode_tail(r["tail_lse"])
            if self.plan.mode == "sampled":
                sid, sq, counts = enc.encode_samples(r["sample_ids"], r["sample_logprobs"], r["sample_counts"],
                                                     vocab, self.plan.logprob_scale)
                self._arr(split, teacher, "sample_ids")[start:stop] = sid
                if pause:
                    time.sleep(pause)
                self._arr(split, teacher, "sample_logprobs")[start:stop] = sq
                self._arr(split, teacher, "sample_counts")[start:stop] = counts.astype(
                    self.plan.sample_spec.count_dtype())
                self._arr(split, teacher, "entropy")[start:stop] = enc.encode_tail(r["entropy"])
            for name in self.plan.array_names():
                arr = self._arr(split, teacher, name)
                if fmt.has_checksum(arr):
                    files = fmt.chunk_files(arr, self.root / fmt.array_path(split, teacher, name), start, stop)
                    crcs[f"{teacher}/{name}"] = [fmt.stored_crc32c(f) for f in files]
        mark_done(self.root, split, chunk, {**stats, **({fmt.CHUNK_CRC32C: crcs} if crcs else {})})


def stored_factors(root: Path, plan: fmt.CachePlan) -> dict[str, dict[str, np.ndarray]] | None:
    """A factored cache's output layers as stored, or None while they are not written (or are damaged)."""
    from cachekd.cache.reader import read_factor_arrays

    try:
        return read_factor_arrays(root, plan)
    except CachekdError:
        return None


def write_factors(root: Path, plan: fmt.CachePlan, layers: dict[str, tuple[np.ndarray, np.ndarray | None]],
                  dim_scales: dict[str, np.ndarray], extra: dict[str, dict[str, np.ndarray]] | None = None
                  ) -> dict[str, dict[str, np.ndarray]]:
    """A factored cache's output layers, written once; returns them as stored ({teacher: {"weight" (V, d) with
    dim_scale folded in, "bias" (heads with one), "dim_scale" (d,)}}, float32).

    `layers`: each teacher's (weight (V, d), bias or None) as the model has them; `dim_scales`: the scales this
    process fitted. The first writer's scales win: done/factors.json records them (powers of two, exact in JSON)
    with the CRC-32C of every factor chunk and the SHA-256 of each weight, and later runs (a resume, another
    `--part`, another rank) take them from there; stored factors that are missing or damaged are written again
    from `layers` with the recorded scales (`verify --repair` then precompute). The compressed form (`layers` are
    then W·U and b + W·μ, `extra` the fit's "mean" and "basis") cannot be written again without its fit: `verify
    --repair` removes the marker and marks every chunk. Serialised by the cache's lock."""
    import hashlib

    import zarr

    from cachekd.cache.reader import REPAIR_COMMAND, read_factor_arrays

    root = Path(root)
    with _lock(root):
        marker = fmt.read_done_marker(fmt.factors_done_path(root))
        if marker is not None and all(t in marker for t in plan.teacher_names):
            try:
                return read_factor_arrays(root, plan)
            except CachekdError as e:
                if plan.factored_rank is not None:
                    raise CachekdError(f"{str(e).split(';')[0]}; run {REPAIR_COMMAND.format(path=root)} (the "
                                       f"compressed form's basis is refitted and every chunk recomputed), then this "
                                       f"command again.") from None
                dim_scales = {t: np.asarray(marker[t]["dim_scale"], dtype=np.float32) for t in plan.teacher_names}
        group = zarr.open_group(str(root), mode="r+")
        out, marker = {}, {}
        for teacher in plan.teacher_names:
            weight, bias = layers[teacher]
            scale = np.asarray(dim_scales[teacher], dtype=np.float32)
            values = {"weight": np.asarray(weight, dtype=np.float32) * scale, "dim_scale": scale,
                      **(extra or {}).get(teacher, {})}
            # the layout they read back in: a strided array would take another matmul path (other rounding)
            values = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in values.items()}
            if bias is not None:
                values["bias"] = np.asarray(bias, dtype=np.float32)
            crcs: dict[str, list[str | None]] = {}
            for spec in plan.factor_specs(teacher):
                path = fmt.factor_path(teacher, spec.name)
                arr = group.create_array(path, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype,
                                         compressors=spec.compressors(), fill_value=0, overwrite=True)
                arr[...] = values[spec.name].reshape(spec.shape)
                crcs[spec.name] = [fmt.stored_crc32c(root / path / arr.metadata.encode_chunk_key(c))
                                   for c in _chunk_coords(arr)]
            weight_bytes = np.ascontiguousarray(values["weight"], dtype="<f4").tobytes()
            marker[teacher] = {fmt.CHUNK_CRC32C: crcs, "weight_sha256": hashlib.sha256(weight_bytes).hexdigest(),
                               "dim_scale": [float(x) for x in scale]}
            out[teacher] = values
        atomic_write_bytes(fmt.factors_done_path(root), json.dumps(marker).encode())
        return out


def _chunk_coords(arr) -> list[tuple[int, ...]]:
    import itertools

    return list(itertools.product(*(range(-(-s // c)) for s, c in zip(arr.shape, arr.chunks))))


def mark_for_recompute(root: Path, chunks: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Remove manifest.json and the done-markers of `chunks` (split, chunk), so that the cache reads as
    incomplete and the same precompute command recomputes exactly these chunks, then writes a new manifest.
    The chunks' data stays until precompute overwrites it. Returns the chunks whose marker was removed."""
    root = location(root)
    removed = []
    with _lock(root):
        fmt.manifest_path(root).unlink(missing_ok=True)  # first: a cache without it never reads as complete
        for split, chunk in chunks:
            p = fmt.done_path(root, split, chunk)
            if p.exists():
                p.unlink()
                removed.append((split, chunk))
    return removed


def finalize(root: Path, plan: fmt.CachePlan) -> fmt.CacheManifest | None:
    """Write manifest.json when every chunk of every split is done; returns it (None while work remains)."""
    root = location(root)
    with _lock(root):
        if any(fmt.pending_chunks(root, split, plan.num_chunks(split)) for split in plan.splits):
            return None  # (a manifest left beside a chunk that is not done does not make the cache complete)
        if fmt.manifest_path(root).exists():
            try:
                return fmt.read_plan(fmt.manifest_path(root), fmt.CacheManifest)
            except CachekdError:
                pass  # damaged: written again below from the plan and the done-markers
        stats = {split: _merge_stats(list(fmt.done_markers(root, split).values())) for split in plan.splits}
        nbytes = fmt.data_bytes(root)
        positions = sum(plan.splits.values()) * plan.token_store.seq_len
        manifest = fmt.CacheManifest.of_plan(
            plan, complete=True, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            cachekd_version=__version__, stats=stats, bytes_on_disk=nbytes,
            bytes_per_position=nbytes / max(positions, 1),
        )
        atomic_write_json(fmt.manifest_path(root), manifest.to_dict())
        return manifest


def _merge_stats(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Per teacher: positions, mean top-k mass per τ, entropy mean/min/max."""
    out: dict[str, Any] = {}
    for c in chunks:
        for teacher, s in c["teachers"].items():
            o = out.setdefault(teacher, {"positions": 0, "entropy_positions": 0, "topk_mass_sum": {}, "entropy_sum": 0.0,
                                         "entropy_min": float("inf"), "entropy_max": float("-inf")})
            o["positions"] += s["positions"]
            o["entropy_positions"] += s.get("entropy_positions", s["positions"])
            for tau, v in s.get("topk_mass_sum", {}).items():
                o["topk_mass_sum"][tau] = o["topk_mass_sum"].get(tau, 0.0) + v
            o["entropy_sum"] += s["entropy_sum"]
            o["entropy_min"] = min(o["entropy_min"], s["entropy_min"])
            o["entropy_max"] = max(o["entropy_max"], s["entropy_max"])
            if "distinct_ids_sum" in s:
                o["distinct_ids_sum"] = o.get("distinct_ids_sum", 0.0) + s["distinct_ids_sum"]
            if "rebuild_kl_sum" in s:  # factored caches: the rebuilt logits against the teacher's own
                o["rebuild_kl_sum"] = o.get("rebuild_kl_sum", 0.0) + s["rebuild_kl_sum"]
                # a sample of the positions (precompute.REBUILD_STAT_EVERY); markers from before: every position
                o["rebuild_positions"] = o.get("rebuild_positions", 0) + s.get("rebuild_positions", s["positions"])
                o["rebuild_max_abs_logit_diff"] = max(o.get("rebuild_max_abs_logit_diff", 0.0),
                                                      s["rebuild_max_abs_logit_diff"])
    for o in out.values():
        n = max(o["positions"], 1)
        o["mean_topk_mass"] = {tau: v / n for tau, v in o.pop("topk_mass_sum").items()}
        o["entropy_mean"] = o.pop("entropy_sum") / max(o["entropy_positions"], 1)
        if "distinct_ids_sum" in o:
            o["mean_distinct_ids"] = o.pop("distinct_ids_sum") / n
        if "rebuild_kl_sum" in o:
            o["mean_rebuild_kl"] = o.pop("rebuild_kl_sum") / max(o["rebuild_positions"], 1)
    return out
