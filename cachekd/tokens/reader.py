"""Reading a complete token store: windows and chunks of token ids, its tokenizer, a summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from cachekd.errors import CachekdError
from cachekd.io import read_json
from cachekd.tokens import format as tfmt


class TokenStore:
    """Read access to a complete token store."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self._arrays: dict[str, Any] = {}

    @classmethod
    def open(cls, path: str | Path) -> "TokenStore":
        p = Path(path)
        if not p.exists():
            raise CachekdError(f"token store {str(p)!r} does not exist; create it with `cachekd prepare`.")
        mf = tfmt.manifest_path(p)
        if not mf.exists():
            if (p / "zarr.json").exists():
                raise CachekdError(f"token store {str(p)!r} is incomplete (no manifest); run `cachekd prepare` again.")
            raise CachekdError(f"{str(p)!r} is not a token store (no manifest.json); create one with `cachekd prepare`.")
        manifest = read_json(mf)
        if manifest.get("format") != tfmt.FORMAT:
            raise CachekdError(f"{str(p)!r} is not a token store (its manifest says {manifest.get('format')!r}).")
        if manifest.get("format_version") != tfmt.FORMAT_VERSION:
            raise CachekdError(
                f"token store {str(p)!r} has format version {manifest.get('format_version')}, this cachekd reads "
                f"{tfmt.FORMAT_VERSION}; prepare it again."
            )
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

    def splits(self) -> list[str]:
        return [s for s in tfmt.SPLITS if s in self.manifest["splits"]]

    def num_windows(self, split: str = "train") -> int:
        return int(self.manifest["splits"].get(split, {}).get("num_windows", 0))

    def num_chunks(self, split: str = "train") -> int:
        return math.ceil(self.num_windows(split) / self.chunk_windows)

    def array(self, split: str = "train"):
        """The zarr array (num_windows, seq_len) of a split."""
        if split not in self.manifest["splits"]:
            raise CachekdError(f"token store {str(self.path)!r} has no {split!r} split (it has {', '.join(self.splits())}).")
        if split not in self._arrays:
            import zarr

            self._arrays[split] = zarr.open_array(str(self.path / tfmt.tokens_path(split)), mode="r")
        return self._arrays[split]

    def read(self, split: str, start: int, stop: int) -> np.ndarray:
        """Windows [start, stop) as an (n, seq_len) array of the stored dtype."""
        return self.array(split)[start:stop]

    def read_chunk(self, split: str, chunk: int) -> np.ndarray:
        cw = self.chunk_windows
        return self.read(split, chunk * cw, min((chunk + 1) * cw, self.num_windows(split)))

    def load_tokenizer(self):
        from cachekd.corpus import load_tokenizer

        return load_tokenizer(self.tokenizer_dir)

    def summary(self) -> dict[str, Any]:
        m = self.manifest
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
            "source_bytes": sum(s["size"] for s in m["sources"]),
            "tokenizer_fingerprint": m["tokenizer_fingerprint"][:16],
            "fingerprint": m["fingerprint"][:16],
            "created": m.get("created"),
        }
