"""Reading a logit cache: whole chunks (or window ranges) decoded into arrays the losses take."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cachekd.cache import format as fmt
from cachekd.errors import CachekdError
from cachekd.io import read_json


@dataclass
class TeacherBlock:
    """One teacher's cached outputs for a run of windows.

    top-k mode: `ids` (n, L, k) int64 sorted ids, `logprobs` (n, L, k) float32 τ=1 log-probabilities (shift-invariant
    logits for the losses), `tail_lse` (n, L, n_τ) float32 (decoded from fixed point, ±9.8e-4). Full mode: `logits` (n, L, V) float16.
    """

    ids: np.ndarray | None = None
    logprobs: np.ndarray | None = None
    tail_lse: np.ndarray | None = None
    logits: np.ndarray | None = None

    def __len__(self) -> int:
        a = self.logits if self.logits is not None else self.ids
        return len(a)

    def select(self, rows: np.ndarray) -> "TeacherBlock":
        return TeacherBlock(*(None if a is None else a[rows] for a in (self.ids, self.logprobs, self.tail_lse, self.logits)))


class LogitCache:
    def __init__(self, path: Path, meta: dict[str, Any], complete: bool):
        self.path = Path(path)
        self.meta = meta
        self.complete = complete
        self._arrays: dict[str, Any] = {}

    @classmethod
    def open(cls, path: str | Path, *, allow_incomplete: bool = False) -> "LogitCache":
        p = Path(path)
        if not p.exists():
            raise CachekdError(f"cache {str(p)!r} does not exist; create it with `cachekd precompute`.")
        if (p / "manifest.json").exists():
            meta, complete = read_json(p / "manifest.json"), True
        elif (p / "plan.json").exists():
            if not allow_incomplete:
                raise CachekdError(
                    f"cache {str(p)!r} is incomplete; run the same `cachekd precompute` command again to finish it."
                )
            meta, complete = read_json(p / "plan.json"), False
        else:
            raise CachekdError(f"{str(p)!r} is not a logit cache (no manifest.json); create one with `cachekd precompute`.")
        if meta.get("format") != fmt.FORMAT:
            raise CachekdError(f"{str(p)!r} is not a logit cache (its manifest says {meta.get('format')!r}).")
        if meta.get("format_version") != fmt.FORMAT_VERSION:
            raise CachekdError(
                f"cache {str(p)!r} has format version {meta.get('format_version')}; this cachekd reads "
                f"{fmt.FORMAT_VERSION}. Run precompute again."
            )
        return cls(p, meta, complete)

    # --- facts
    @property
    def teachers(self) -> list[str]:
        return [t["name"] for t in self.meta["teachers"]]

    @property
    def mode(self) -> str:
        return self.meta["mode"]

    @property
    def k(self) -> int | None:
        return self.meta["k"]

    @property
    def temperatures(self) -> list[float]:
        return list(self.meta["temperatures"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["token_store"]["vocab_size"])

    @property
    def seq_len(self) -> int:
        return int(self.meta["token_store"]["seq_len"])

    @property
    def chunk_windows(self) -> int:
        return int(self.meta["token_store"]["chunk_windows"])

    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def num_windows(self, split: str) -> int:
        return int(self.meta["splits"][split])

    def temperature_index(self, tau: float) -> int:
        """Index of τ in the cached `tail_lse`, or a clear refusal listing what the cache has."""
        if self.mode == "full":
            return -1
        for i, t in enumerate(self.temperatures):
            if math.isclose(t, tau, rel_tol=1e-9, abs_tol=1e-12):
                return i
        have = ", ".join(f"{t:g}" for t in self.temperatures)
        raise CachekdError(
            f"the cache has tail_lse for temperatures {have} only, not {tau:g}; choose one of those or run precompute "
            f"with --temperatures including {tau:g}."
        )

    def check_store(self, store) -> None:
        """Refuse a token store that is not the one this cache was computed from, saying what differs."""
        ts = self.meta["token_store"]
        if ts["tokenizer_fingerprint"] != store.tokenizer_fingerprint:
            raise CachekdError(
                f"cache {str(self.path)!r} was built with another tokenizer than token store {str(store.path)!r}; "
                f"precompute a cache for this store."
            )
        if ts["seq_len"] != store.seq_len:
            raise CachekdError(
                f"cache {str(self.path)!r} has windows of {ts['seq_len']} tokens but token store {str(store.path)!r} "
                f"has {store.seq_len}; precompute a cache for this store."
            )
        if ts["fingerprint"] != store.fingerprint:
            raise CachekdError(
                f"cache {str(self.path)!r} was built from another token store (fingerprint {ts['fingerprint'][:12]} vs "
                f"{store.fingerprint[:12]} of {str(store.path)!r}); precompute a cache for this store."
            )

    def select_teachers(self, names: Sequence[str] | None) -> list[str]:
        if not names:
            return self.teachers
        for n in names:
            if n not in self.teachers:
                raise CachekdError(f"the cache has no teacher {n!r}; it has {', '.join(self.teachers)}.")
        return list(names)

    # --- data
    def _array(self, split: str, teacher: str, name: str):
        key = fmt.array_path(split, teacher, name)
        if key not in self._arrays:
            import zarr

            self._arrays[key] = zarr.open_array(str(self.path / key), mode="r")
        return self._arrays[key]

    def read(self, split: str, start: int, stop: int, teachers: Sequence[str] | None = None) -> dict[str, TeacherBlock]:
        """Decoded outputs of windows [start, stop) for each teacher."""
        if split not in self.meta["splits"]:
            raise CachekdError(f"the cache has no {split!r} split (it has {', '.join(self.splits())}).")
        out = {}
        for t in self.select_teachers(teachers):
            if self.mode == "full":
                out[t] = TeacherBlock(logits=self._array(split, t, "logits")[start:stop])
            else:
                out[t] = TeacherBlock(
                    ids=fmt.decode_ids(self._array(split, t, "ids")[start:stop]),
                    logprobs=fmt.decode_logprobs(self._array(split, t, "logprobs")[start:stop], fmt.logprob_scale(self.meta)),
                    tail_lse=fmt.decode_tail(self._array(split, t, "tail_lse")[start:stop]),
                )
        return out

    def read_chunk(self, split: str, chunk: int, teachers: Sequence[str] | None = None) -> dict[str, TeacherBlock]:
        cw = self.chunk_windows
        return self.read(split, chunk * cw, min((chunk + 1) * cw, self.num_windows(split)), teachers)

    def num_chunks(self, split: str) -> int:
        return math.ceil(self.num_windows(split) / self.chunk_windows)

    def done_chunks(self, split: str) -> list[int]:
        d = self.path / "done" / split
        return sorted(int(p.stem) for p in d.glob("*.json")) if d.exists() else []

    # --- summary
    def summary(self) -> dict[str, Any]:
        m = self.meta
        positions = {s: n * self.seq_len for s, n in m["splits"].items()}
        done = {s: f"{len(self.done_chunks(s))}/{self.num_chunks(s)} chunks" for s in m["splits"]}
        out: dict[str, Any] = {
            "kind": "logit cache",
            "path": str(self.path),
            "complete": self.complete,
            "mode": m["mode"],
            "k": m["k"],
            "temperatures": ", ".join(f"{t:g}" for t in m["temperatures"]) or "-",
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "windows": {s: n for s, n in m["splits"].items()},
            "positions": positions,
            "chunks_done": done,
            "teachers": {
                t["name"]: f"{t['model_type']}, {t['num_params'] / 1e6:.2f}M params, {t['path']}"
                + (f" ({t['padded_logits_dropped']} padded logits dropped)" if t.get("padded_logits_dropped") else "")
                for t in m["teachers"]
            },
        }
        if self.complete:
            out["bytes_on_disk"] = m["bytes_on_disk"]
            out["bytes_per_position"] = round(m["bytes_per_position"], 2)
            for split, per_teacher in m["stats"].items():
                for t, s in per_teacher.items():
                    row = {"entropy_mean": round(s["entropy_mean"], 4), "entropy_min": round(s["entropy_min"], 4),
                           "entropy_max": round(s["entropy_max"], 4)}
                    for tau, v in s.get("mean_topk_mass", {}).items():
                        row[f"topk_mass@tau={float(tau):g}"] = round(v, 5)
                    out.setdefault("teacher_stats", {})[f"{split}/{t}"] = row
        return out
