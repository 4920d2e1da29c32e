"""Reading a complete token store: windows and chunks of token ids, its tokenizer, a summary."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from cachekd.errors import CachekdError
from cachekd.io import check_format, open_array_read_only, read_json_dict
import cachekd.tokens.format as tfmt
from cachekd.storage import location


PREPARE_AGAIN = "the same `cachekd prepare` command plus --force"
"""How to build a token store again, a command printed for the user (the one place the library spells it)."""
PREPARE_WITH_TOKENIZER = "`cachekd prepare ... --tokenizer {path}`"
"""How to build a token store with a model's own tokenizer (``.format(path=...)``)."""
REBUILD_HINT = (f"rebuild it with {PREPARE_AGAIN} (a rebuilt store with the same content has the same fingerprint, so "
                f"its logit caches stay valid)")


class DamagedTokenChunkError(CachekdError):
    """A chunk of a token store that cannot be read: its file is missing, or it does not decode (checksum)."""

    # (the keywords have defaults: torch's DataLoader re-raises a worker's exception as `type(e)(message)`)
    def __init__(self, message: str, *, split: str = "", chunk: int | None = None, reason: str = ""):
        super().__init__(message)
        self.split, self.chunk, self.reason = split, chunk, reason


class TokenStore:
    """Read access to a complete token store."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = location(path)
        self.manifest = manifest
        self._arrays: dict[str, Any] = {}

    @classmethod
    def open(cls, path: str | Path) -> "TokenStore":
        p = location(path)
        if not p.exists():
            raise CachekdError(f"token store {str(p)!r} does not exist; create it with `cachekd prepare`.")
        mf = tfmt.manifest_path(p)
        if not mf.exists():
            if tfmt.is_token_store(p):
                raise CachekdError(f"token store {str(p)!r} is incomplete (no manifest); run `cachekd prepare` again.")
            raise CachekdError(f"{str(p)!r} is not a token store (no manifest.json); create one with `cachekd prepare`.")
        manifest = read_json_dict(mf, "the token store is damaged: " + REBUILD_HINT + ".")
        check_format(manifest, expected=tfmt.FORMAT, version=tfmt.FORMAT_VERSION, what="token store", path=p,
                     remedy="run `cachekd prepare` again")
        return cls(p, manifest)

    # --- facts
    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def chunk_windows(self) -> int:
        return int(self.manifest["chunk_windows"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer_fingerprint"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / tfmt.TOKENIZER_DIR

    def check_tokenizer(self, *, fingerprint: str | None, vocab_size: int | None = None,
                        tokenizer_error: Callable[[str], str], vocab_error: Callable[[int], str] | None = None) -> None:
        """Refuse a tokenizer (its `cachekd.corpus.tokenizer_fingerprint`) or an output size that does not fit this
        store: the single rule used by precompute, distill, eval and the cache reader.

        The fingerprint must equal the store's (None: no tokenizer to compare), and `vocab_size` (the number of
        outputs a position; None: unknown) must cover the store's vocabulary: padded output layers are accepted,
        their extra logits are dropped. The errors are worded by the caller: `tokenizer_error(fingerprint)` and
        `vocab_error(vocab_size)` (needed with `vocab_size`) return the sentence to raise."""
        if fingerprint is not None and fingerprint != self.tokenizer_fingerprint:
            raise CachekdError(tokenizer_error(fingerprint))
        if vocab_size is not None and vocab_size < self.vocab_size:
            assert vocab_error is not None, "check_tokenizer: a vocab_size needs a vocab_error"
            raise CachekdError(vocab_error(vocab_size))

    def splits(self) -> list[str]:
        return [s for s in tfmt.SPLITS if s in self.manifest["splits"]]

    def source_names(self) -> list[str]:
        """The sources' file (or directory) names, in manifest order (their paths where two share a name)."""
        paths = [src["path"] for src in self.manifest["sources"]]
        names = [Path(p).name for p in paths]
        return names if len(set(names)) == len(names) else paths

    def source_windows(self, split: str) -> list[tuple[int, int]] | None:
        """Per source (manifest order), the windows [start, stop) of `split` that start in its text; None for a
        store prepared before the manifest recorded them."""
        records = self.manifest.get(tfmt.SOURCE_SPLITS)
        if records is None:
            return None
        return [tuple(r[split]["windows"]) if split in r else (0, 0) for r in records]  # type: ignore[misc]

    def dev_shares(self) -> dict[str, dict[str, Any]] | None:
        """Per source name: the share of its tokens in the dev split and how it was held out (documents, lines,
        words, none); None for a store prepared before the manifest recorded them."""
        records = self.manifest.get(tfmt.SOURCE_SPLITS)
        if records is None:
            return None
        out = {}
        for name, r in zip(self.source_names(), records):
            dev, train = r.get("dev", {}).get("num_tokens", 0), r.get("train", {}).get("num_tokens", 0)
            out[name] = {"dev_share": round(dev / max(dev + train, 1), 4), "held_out_by": r["held_out_by"]}
        return out

    def num_windows(self, split: str = "train") -> int:
        return int(self.manifest["splits"].get(split, {}).get("num_windows", 0))

    def num_chunks(self, split: str = "train") -> int:
        return math.ceil(self.num_windows(split) / self.chunk_windows)

    def array(self, split: str = "train"):
        """The zarr array (num_windows, seq_len) of a split."""
        if split not in self.manifest["splits"]:
            raise CachekdError(f"token store {str(self.path)!r} has no {split!r} split (it has {', '.join(self.splits())}).")
        if split not in self._arrays:
            self._arrays[split] = open_array_read_only(
                self.path / tfmt.tokens_path(split), f"the {split} split of token store {str(self.path)!r}",
                REBUILD_HINT)
        return self._arrays[split]

    def has_checksums(self) -> bool:
        """Whether every split's chunks carry a crc32c checksum (False for stores written before checksums)."""
        return all(tfmt.has_checksum(self.array(s)) for s in self.splits())

    def read(self, split: str, start: int, stop: int) -> np.ndarray:
        """Windows [start, stop) as an (n, seq_len) array of the stored dtype. A chunk whose file is missing or
        does not decode (checksum mismatch, truncated) is a DamagedTokenChunkError, never zeros."""
        arr = self.array(split)
        cw = self.chunk_windows
        chunks = range(start // cw, (max(stop, start + 1) - 1) // cw + 1)
        for c in chunks:
            if c * cw < arr.shape[0] and not tfmt.chunk_file(self.path, split, arr, c).exists():
                raise self._damaged(split, c, "its file is missing", "file missing")
        try:
            return arr[start:stop]
        except (PermissionError, MemoryError):
            raise
        except Exception as e:  # codecs raise ValueError/RuntimeError/... with their own text
            bad = None
            for c in chunks:  # which chunk: probe them one by one
                try:
                    arr[c * cw:(c + 1) * cw]
                except Exception:  # noqa: BLE001 - any failure marks the damaged chunk
                    bad = c
                    break
            reason = "checksum mismatch" if "checksum" in str(e).lower() else "decompression failed"
            raise self._damaged(split, bad, f"its data is corrupt or truncated ({reason})", reason) from e

    def _damaged(self, split: str, chunk: int | None, problem: str, reason: str) -> DamagedTokenChunkError:
        cw = self.chunk_windows
        where = (f"chunk {chunk} (windows {chunk * cw} to {min((chunk + 1) * cw, self.num_windows(split)) - 1})"
                 if chunk is not None else "data")
        return DamagedTokenChunkError(
            f"the {split} split's {where} of token store {str(self.path)!r} cannot be read: {problem}; "
            + REBUILD_HINT + ".", split=split, chunk=chunk, reason=reason)

    def missing_chunks(self, split: str) -> list[int]:
        """The chunks of `split` whose file is not there, from one listing of the split's chunk files (cheap on
        an object store too): zarr would read a missing one as zeros, `read` refuses it when it gets there."""
        from cachekd.storage import file_sizes

        arr = self.array(split)
        base = location(self.path) / tfmt.tokens_path(split)
        present = set(file_sizes(base)) if base.exists() else set()
        return [c for c in range(self.num_chunks(split))
                if arr.metadata.encode_chunk_key((c, 0)) not in present]

    def check_chunks(self, splits: list[str]) -> None:
        """Refuse, before a run starts, a store of which a chunk it will read (every chunk of `splits`) is gone."""
        for split in splits:
            missing = self.missing_chunks(split)
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise self._damaged(split, missing[0], f"its file is missing{more}", "file missing")

    def read_chunk(self, split: str, chunk: int) -> np.ndarray:
        cw = self.chunk_windows
        return self.read(split, chunk * cw, min((chunk + 1) * cw, self.num_windows(split)))

    def verify(self, progress: bool = False) -> dict[str, Any]:
        """Read every chunk (checksums, missing files) and compare each split's SHA-256 with the one the manifest
        recorded when the store was written (which also finds damage in stores written without checksums).
        Returns `problems` (sentences), `damaged_chunks` ({split: [chunk]}), `chunks_checked`, `chunks_total`."""
        import hashlib

        from tqdm.auto import tqdm

        problems: list[str] = []
        damaged: dict[str, list[int]] = {}
        total = sum(self.num_chunks(s) for s in self.splits())
        checked = 0
        with tqdm(total=total, desc="verify store", unit="chunk", disable=not progress) as bar:
            for split in self.splits():
                h, whole = hashlib.sha256(), True
                for c in range(self.num_chunks(split)):
                    bar.update(1)
                    try:
                        h.update(np.ascontiguousarray(self.read_chunk(split, c)).tobytes())
                    except DamagedTokenChunkError as e:
                        damaged.setdefault(split, []).append(c)
                        problems.append(str(e).rstrip("."))
                        whole = False
                    except CachekdError as e:  # the split's array cannot be opened
                        problems.append(str(e).rstrip("."))
                        whole = False
                        break
                    checked += 1
                want = self.manifest["splits"][split].get("sha256")
                if whole and want is not None and h.hexdigest() != want:
                    problems.append(
                        f"the {split} split of token store {str(self.path)!r} is not the data it was written with "
                        f"(its SHA-256 differs from the manifest's); " + REBUILD_HINT)
        return {"store": str(self.path), "chunks_checked": checked, "chunks_total": total,
                "checksums": self._checksums_or_none(), "damaged_chunks": damaged, "problems": problems,
                "ok": not problems}

    def _checksums_or_none(self) -> bool | None:
        try:
            return self.has_checksums()
        except CachekdError:
            return None

    def load_tokenizer(self):
        from cachekd.corpus import load_tokenizer

        from cachekd.storage import local_copy

        return load_tokenizer(local_copy(self.tokenizer_dir))

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        shares = self.dev_shares() if "dev" in self.splits() else None
        return {
            "kind": "token store",
            "path": str(self.path),
            "seq_len": m["seq_len"],
            "vocab_size": m["vocab_size"],
            **({"vocab_size_requested": m["vocab_size_requested"]}
               if m.get("vocab_size_requested") not in (None, m["vocab_size"]) else {}),
            "dtype": m["dtype"],
            "chunk_windows": m["chunk_windows"],
            "splits": m["splits"],
            "num_sources": len(m["sources"]),
            **({"dev_share_by_source": {k: v["dev_share"] for k, v in shares.items()}} if shares else {}),
            "source_bytes": sum(s["size"] for s in m["sources"]),
            "tokenizer_fingerprint": m["tokenizer_fingerprint"][:16],
            "fingerprint": m["fingerprint"][:16],
            "created": m.get("created"),
        }


# ------------------------------------------------------------------------------------------ dev sample

DEV_SAMPLE_SEED = 0
"""Seed of the periodic dev sample: the same for every run on a store, so their dev curves compare."""


@dataclass(frozen=True)
class WindowSample:
    """Which windows of a split the trainer's periodic dev loss scores (`dev_sample`)."""

    windows: np.ndarray
    """Window indices, sorted, int64."""
    whole_split: bool
    """True when the sample is every window of the split (then its loss is the split's loss)."""
    per_source: dict[str, int] | None
    """Windows drawn from each source (None: an evenly spaced sample of a store without per-source records)."""
    note: str | None = None
    """A sentence for the user when the sample is not drawn per source."""

    @property
    def num_windows(self) -> int:
        return int(len(self.windows))


def allocate_by_size(num: int, sizes: list[int]) -> list[int]:
    """Split `num` draws over groups of `sizes` items in proportion to their sizes (largest remainder), each
    non-empty group getting at least one when `num` allows it, and none more than its size. Needs
    0 <= num <= sum(sizes)."""
    assert 0 <= num <= sum(sizes), "allocate_by_size: more draws than items"
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    quota = [num * n / total for n in sizes]
    floor = 1 if num >= sum(1 for n in sizes if n) else 0
    alloc = [min(n, max(floor if n else 0, int(q))) for n, q in zip(sizes, quota)]
    while sum(alloc) > num:  # the minimum of one each overshot: take from the groups furthest above their quota
        j = max((i for i in range(len(sizes)) if alloc[i] > floor), key=lambda i: alloc[i] - quota[i])
        alloc[j] -= 1
    while sum(alloc) < num:  # hand out the rest to the groups furthest below their quota
        j = max((i for i in range(len(sizes)) if alloc[i] < sizes[i]), key=lambda i: quota[i] - alloc[i])
        alloc[j] += 1
    return alloc


def dev_sample(store: TokenStore, num_windows: int | None, *, split: str = "dev",
               seed: int = DEV_SAMPLE_SEED) -> WindowSample:
    """The fixed sample of `split` the trainer's periodic dev loss scores: `num_windows` windows (None or 0, or at
    least the split's size: all of them) drawn without replacement from every source in proportion to its windows
    (at least one each), seeded, so every run on the store scores the same windows. A store prepared before the
    manifest recorded each source's windows gets `num_windows` evenly spaced windows over the whole split instead,
    with a note saying so."""
    total = store.num_windows(split)
    if not num_windows or num_windows >= total:
        ranges = store.source_windows(split)
        per = None if ranges is None else {n: b - a for n, (a, b) in zip(store.source_names(), ranges)}
        return WindowSample(np.arange(total, dtype=np.int64), True, per)
    ranges = store.source_windows(split)
    if ranges is None:
        windows = np.unique(np.linspace(0, total - 1, num_windows).round().astype(np.int64))
        note = (f"note: token store {str(store.path)!r} was prepared before cachekd recorded which {split} windows "
                f"come from which source, so the periodic dev loss scores {len(windows)} evenly spaced {split} windows "
                f"instead of a sample from every source; prepare it again with {PREPARE_AGAIN} to record them (a "
                f"source of one document then gets its dev share too).")
        return WindowSample(windows, False, None, note)
    sizes = [b - a for a, b in ranges]
    alloc = allocate_by_size(num_windows, sizes)
    rng = np.random.default_rng(seed)
    drawn = [a + rng.choice(b - a, size=k, replace=False) for (a, b), k in zip(ranges, alloc) if k]
    windows = np.sort(np.concatenate(drawn).astype(np.int64))
    return WindowSample(windows, False, dict(zip(store.source_names(), alloc)))
