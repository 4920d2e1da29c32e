"""The on-disk layout of a token store. No other module knows its paths, dtypes, codecs or manifest keys.

::

    STORE/
      zarr.json               Zarr v3 group (attribute cachekd = FORMAT)
      train/tokens            (num_windows, seq_len) uint16|uint32, chunks of `chunk_windows` whole windows
      dev/tokens              same, for the held-out split
      tokenizer/              HF tokenizer (AutoTokenizer.from_pretrained works on it)
      manifest.json           written last: its presence means the store is complete

Windows sit at fixed offsets (window i is tokens [i·L, (i+1)·L) of the packed stream) because the logit cache is
keyed by window index; `cachekd/cache/format.py` chunks the cache's arrays like the store's, so one token chunk
maps to whole cache chunks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from cachekd.storage import location

FORMAT = "cachekd-token-store"
FORMAT_VERSION = 1
POSITIONS_PER_CHUNK = 4096
SPLITS = ("train", "dev")
MANIFEST = "manifest.json"
ZARR_META = "zarr.json"
TOKENIZER_DIR = "tokenizer"
SOURCE_SPLITS = "source_splits"
"""Manifest key: each source's documents, tokens and window range in each split (absent in older stores)."""


def chunk_windows_for(seq_len: int) -> int:
    """Whole windows per chunk: about 4096 positions (docs/caches.md: chunks aligned with the cache's)."""
    return max(1, POSITIONS_PER_CHUNK // seq_len)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokens_path(split: str) -> str:
    """The token array of a split, relative to the store's root."""
    return f"{split}/tokens"


def manifest_path(root: Path) -> Path:
    return location(root) / MANIFEST


def is_token_store(path: Path) -> bool:
    """Whether `path` holds a token store (complete or not, its manifest readable or not)."""
    from cachekd.io import read_json_dict_or_none

    p = location(path)
    for meta in (read_json_dict_or_none(manifest_path(p)), read_json_dict_or_none(p / ZARR_META)):
        if meta is not None and FORMAT in (meta.get("format"), meta.get("attributes", {}).get("cachekd")):
            return True
    return False


def blosc(typesize: int, clevel: int = 3, blocksize: int = 0):
    """Blosc zstd with byte shuffle and an explicit typesize (without it, zarr v3's shuffle does nothing);
    ``blocksize`` 0 lets Blosc choose."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=clevel, shuffle="shuffle", typesize=typesize, blocksize=blocksize)


def compressors(dtype: np.dtype) -> list:
    """The bytes-to-bytes codecs of a split's token array: Blosc-zstd, then zarr's crc32c checksum, as in the
    logit cache (cachekd/cache/format.py gives the measured cost: about 1% of a read). Stores written before the
    checksum have no crc32c codec in their arrays' zarr.json and read as before."""
    from zarr.codecs import Crc32cCodec

    return [blosc(dtype.itemsize), Crc32cCodec()]


def has_checksum(array) -> bool:
    """Whether an opened token array stores a crc32c checksum with every chunk."""
    from zarr.codecs import Crc32cCodec

    return any(isinstance(c, Crc32cCodec) for c in array.metadata.codecs)


def create_tokens_array(group, split: str, seq_len: int, chunk_windows: int, dtype: np.dtype):
    """An empty (0, seq_len) token array of a split, to be appended to a chunk at a time. Every chunk is written
    as a file, even one of all zeros, so a missing chunk file always means a deleted one."""
    return group.create_array(
        tokens_path(split), shape=(0, seq_len), chunks=(chunk_windows, seq_len), dtype=dtype,
        compressors=compressors(dtype), fill_value=0, config={"write_empty_chunks": True},
    )


def chunk_file(root: Path, split: str, array, chunk: int) -> Path:
    """The file of one chunk of a split's opened token array."""
    return location(root) / tokens_path(split) / array.metadata.encode_chunk_key((chunk, 0))


def build_manifest(*, version: str, seq_len: int, vocab_size: int, vocab_size_requested: int | None,
                   dtype: np.dtype, chunk_windows: int, special_tokens: dict[str, int | None],
                   tokenizer_fingerprint: str, tokenizer_source: str, splits: dict[str, dict[str, Any]],
                   sources: list[dict[str, Any]], options: dict[str, Any], input_fingerprint: str,
                   source_splits: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of a finished store (its JSON keys are the format). `splits` maps a split to its
    num_windows/num_tokens/num_documents/dropped_tokens/sha256 (of the windows' bytes); the store's fingerprint
    covers the tokenizer, the window length and those hashes. `source_splits` (one entry a source, in the order of
    `sources`): ``held_out_by`` (documents | lines | words | none) and per split its ``num_documents``,
    ``num_tokens`` and ``windows`` [start, stop) — stores written before it have no such key."""
    from cachekd.io import sha256_json

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "cachekd_version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seq_len": seq_len,
        "vocab_size": vocab_size,
        "vocab_size_requested": vocab_size_requested,
        "dtype": dtype.name,
        "chunk_windows": chunk_windows,
        "special_tokens": special_tokens,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "tokenizer_source": tokenizer_source,
        "splits": splits,
        "sources": sources,
        SOURCE_SPLITS: source_splits,
        "options": options,
        "input_fingerprint": input_fingerprint,
        "fingerprint": sha256_json(
            {"tokenizer": tokenizer_fingerprint, "seq_len": seq_len, "splits": {k: v["sha256"] for k, v in splits.items()}}
        ),
    }
