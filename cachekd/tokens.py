"""The token store: fixed windows of token ids in a Zarr v3 group, a tokenizer beside it, a manifest written last.

Layout (``format.py`` of the logit cache mirrors it)::

    STORE/
      zarr.json               group
      train/tokens            (num_windows, seq_len) uint16|uint32, chunks of `chunk_windows` whole windows
      dev/tokens              same, for the held-out split
      tokenizer/              HF tokenizer (AutoTokenizer.from_pretrained works on it)
      manifest.json           written last: its presence means the store is complete

Windows sit at fixed offsets (window i is tokens [i·L, (i+1)·L) of the packed stream) because the logit cache is
keyed by window index.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cachekd import __version__
from cachekd.errors import CachekdError
from cachekd.io import atomic_write_json, read_json, sha256_json

FORMAT = "cachekd-token-store"
FORMAT_VERSION = 1
POSITIONS_PER_CHUNK = 4096
SPLITS = ("train", "dev")


def chunk_windows_for(seq_len: int) -> int:
    """Whole windows per chunk: about 4096 positions (DESIGN.md, Storage)."""
    return max(1, POSITIONS_PER_CHUNK // seq_len)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def blosc(typesize: int, clevel: int = 3, blocksize: int = 0):
    """Blosc zstd with byte shuffle and an explicit typesize (without it, zarr v3's shuffle does nothing);
    ``blocksize`` 0 lets Blosc choose."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=clevel, shuffle="shuffle", typesize=typesize, blocksize=blocksize)


@dataclass
class PrepareConfig:
    """Options of ``cachekd prepare``."""

    inputs: list[str] = field(default_factory=list)
    """Text files, directories, globs; .jsonl/.json/.parquet/.csv files; datasets saved with save_to_disk."""
    output: str = ""
    """Directory of the token store to write."""
    seq_len: int = 128
    """Window length in tokens (Baby Llama: 128)."""
    vocab_size: int = 16000
    """Vocabulary of the byte-level BPE to train (ignored with `tokenizer`)."""
    tokenizer: str | None = None
    """Use this tokenizer (HF directory or tokenizer.json) instead of training one."""
    text_column: str = "text"
    """Column holding the text in jsonl/parquet/csv/saved datasets."""
    doc_sep: Literal["blank-line", "line", "file"] = "blank-line"
    """What a document is in plain text: blocks between blank lines, single lines, or whole files."""
    clean: bool = False
    """Light cleaning: Unicode NFC, collapse spaces, strip lines, drop empty lines."""
    dev_fraction: float = 0.05
    """Share of documents held out as the dev split (0 disables it)."""
    dev_mode: Literal["tail", "docs"] = "tail"
    """`tail`: the last documents of each source; `docs`: a seeded random choice of documents."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise CachekdError(f"--seq-len must be at least 2 (got {self.seq_len}): a window needs an input and a next token.")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise CachekdError(f"--dev-fraction must be in [0, 1) (got {self.dev_fraction}).")


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
        mf = p / "manifest.json"
        if not mf.exists():
            if (p / "zarr.json").exists():
                raise CachekdError(f"token store {str(p)!r} is incomplete (no manifest); run `cachekd prepare` again.")
            raise CachekdError(f"{str(p)!r} is not a token store (no manifest.json); create one with `cachekd prepare`.")
        manifest = read_json(mf)
        if manifest.get("format") != FORMAT:
            raise CachekdError(f"{str(p)!r} is not a token store (its manifest says {manifest.get('format')!r}).")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CachekdError(
                f"token store {str(p)!r} has format version {manifest.get('format_version')}, this cachekd reads "
                f"{FORMAT_VERSION}; prepare it again."
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
        return self.path / "tokenizer"

    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.manifest["splits"]]

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

            self._arrays[split] = zarr.open_array(str(self.path / split / "tokens"), mode="r")
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


# ------------------------------------------------------------------------------------------------ prepare


def _assign_dev(num_docs: int, cfg: PrepareConfig, source_index: int) -> np.ndarray:
    """Boolean mask over a source's documents: True = dev."""
    mask = np.zeros(num_docs, dtype=bool)
    if cfg.dev_fraction <= 0 or num_docs < 2:
        return mask
    n_dev = max(1, int(round(num_docs * cfg.dev_fraction)))
    n_dev = min(n_dev, num_docs - 1)
    if cfg.dev_mode == "tail":
        mask[num_docs - n_dev:] = True
    else:
        rng = random.Random(f"{cfg.seed}/{source_index}")
        mask[rng.sample(range(num_docs), n_dev)] = True
    return mask


class _WindowWriter:
    """Packs a stream of token ids into fixed windows and appends whole chunks to a zarr array."""

    def __init__(self, group, split: str, seq_len: int, chunk_windows: int, dtype: np.dtype):
        self.arr = group.create_array(
            f"{split}/tokens", shape=(0, seq_len), chunks=(chunk_windows, seq_len), dtype=dtype,
            compressors=[blosc(dtype.itemsize)], fill_value=0,
        )
        self.seq_len, self.chunk_windows, self.dtype = seq_len, chunk_windows, dtype
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.num_tokens = 0
        self.num_documents = 0
        self.num_windows = 0
        self.hash = hashlib.sha256()

    def add(self, ids: np.ndarray) -> None:
        self.buffer.append(ids)
        self.buffered += len(ids)
        self.num_tokens += len(ids)
        self.num_documents += 1
        if self.buffered >= self.seq_len * self.chunk_windows * 8:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.buffer:
            return
        flat = np.concatenate(self.buffer)
        per = self.seq_len * (self.chunk_windows if not final else 1)
        n_take = (len(flat) // per) * per
        body, rest = flat[:n_take], flat[n_take:]
        if len(body):
            windows = body.reshape(-1, self.seq_len).astype(self.dtype, copy=False)
            self.hash.update(windows.tobytes())
            self.arr.append(windows, axis=0)
            self.num_windows += len(windows)
        self.buffer = [rest] if len(rest) else []
        self.buffered = len(rest)

    def close(self) -> dict[str, Any]:
        self._flush(final=True)
        dropped = self.buffered
        self.buffer, self.buffered = [], 0
        return {
            "num_windows": self.num_windows,
            "num_tokens": self.num_tokens,
            "num_documents": self.num_documents,
            "dropped_tokens": dropped,
            "sha256": self.hash.hexdigest(),
        }


def _check_output(out: Path, input_fingerprint: str, force: bool) -> str:
    """'fresh' | 'same' (nothing to do) | 'replace' (an older store at the path, --force given)."""
    if not out.exists():
        return "fresh"
    if out.is_file():
        raise CachekdError(f"output {str(out)!r} is a file; choose a directory path for the token store.")
    if (out / "manifest.json").exists():
        try:
            manifest = read_json(out / "manifest.json")
        except ValueError:
            manifest = {}
        if manifest.get("format") != FORMAT:
            raise CachekdError(f"output {str(out)!r} holds something else ({manifest.get('format', 'unknown')!r}); choose another path.")
        if manifest.get("input_fingerprint") == input_fingerprint:
            return "same"
        if not force:
            raise CachekdError(
                f"output {str(out)!r} holds a token store built from other inputs or options; "
                f"pass --force to replace it or choose another path."
            )
        return "replace"
    if not any(out.iterdir()):
        return "fresh"
    raise CachekdError(f"output {str(out)!r} is not empty and is not a token store; choose another path.")


def prepare(cfg: PrepareConfig, *, force: bool = False, progress: bool = True) -> tuple[TokenStore, bool]:
    """Build a token store from a corpus. Returns (store, built) where built=False means it was already up to date."""
    from tqdm.auto import tqdm

    from cachekd.corpus import iter_documents, load_tokenizer, resolve_sources, tokenizer_fingerprint, train_bpe_tokenizer

    if not cfg.output:
        raise CachekdError("no output path given: pass --output DIR for the token store.")
    out = Path(cfg.output)
    sources = resolve_sources(cfg.inputs)
    tok_src = None
    if cfg.tokenizer:
        tp = Path(cfg.tokenizer)
        given_tokenizer = load_tokenizer(tp)
        tok_src = {"path": str(tp), "fingerprint": tokenizer_fingerprint(given_tokenizer)}
    options = {k: v for k, v in vars(cfg).items() if k not in ("inputs", "output", "tokenizer")}
    input_fingerprint = sha256_json(
        {"sources": [s.describe() | {"path": None} for s in sources], "options": options, "tokenizer": tok_src,
         "format_version": FORMAT_VERSION}
    )
    state = _check_output(out, input_fingerprint, force)
    if state == "same":
        return TokenStore.open(out), False

    # Read documents once; assign the dev split per source.
    train_docs: list[str] = []
    dev_docs: list[str] = []
    for i, src in enumerate(tqdm(sources, desc="reading", unit="file", disable=not progress or len(sources) < 2)):
        docs = list(iter_documents(src, doc_sep=cfg.doc_sep, text_column=cfg.text_column, clean=cfg.clean))
        dev_mask = _assign_dev(len(docs), cfg, i)
        for d, is_dev in zip(docs, dev_mask):
            (dev_docs if is_dev else train_docs).append(d)
    if not train_docs:
        raise CachekdError("the corpus is empty: no non-blank text was found in the inputs.")

    if cfg.tokenizer:
        tokenizer = given_tokenizer
    else:
        tokenizer = train_bpe_tokenizer(iter(train_docs), cfg.vocab_size, show_progress=progress, length=len(train_docs))
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    eos = tokenizer.eos_token_id
    cw = chunk_windows_for(cfg.seq_len)

    import zarr

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        group.attrs["cachekd"] = FORMAT
        backend = tokenizer.backend_tokenizer
        split_info: dict[str, Any] = {}
        batch = 2000
        eos_arr = np.array([eos], dtype=np.int64)
        for split, docs in (("train", train_docs), ("dev", dev_docs)):
            if split == "dev" and cfg.dev_fraction <= 0:
                continue
            w = _WindowWriter(group, split, cfg.seq_len, cw, dtype)
            with tqdm(total=len(docs), desc=f"encoding {split}", unit="doc", disable=not progress) as bar:
                for b in range(0, len(docs), batch):
                    encs = backend.encode_batch(docs[b:b + batch], add_special_tokens=False)
                    for e in encs:
                        w.add(np.concatenate([np.asarray(e.ids, dtype=np.int64), eos_arr]))
                    bar.update(len(encs))
            split_info[split] = w.close()
        total_tokens = split_info["train"]["num_tokens"]
        if split_info["train"]["num_windows"] == 0:
            raise CachekdError(
                f"the corpus gives {total_tokens} training tokens, fewer than one window of {cfg.seq_len}; "
                f"add text or lower --seq-len."
            )
        if "dev" in split_info and split_info["dev"]["num_windows"] == 0:
            raise CachekdError(
                f"the dev split gets {split_info['dev']['num_tokens']} tokens, fewer than one window of {cfg.seq_len}; "
                f"raise --dev-fraction, lower --seq-len, or pass --dev-fraction 0."
            )
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        tok_fp = tokenizer_fingerprint(tokenizer)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "cachekd_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seq_len": cfg.seq_len,
            "vocab_size": vocab_size,
            "vocab_size_requested": None if cfg.tokenizer else cfg.vocab_size,
            "dtype": dtype.name,
            "chunk_windows": cw,
            "special_tokens": {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": eos},
            "tokenizer_fingerprint": tok_fp,
            "tokenizer_source": tok_src["path"] if tok_src else "trained",
            "splits": split_info,
            "sources": [s.describe() for s in sources],
            "options": options,
            "input_fingerprint": input_fingerprint,
            "fingerprint": sha256_json(
                {"tokenizer": tok_fp, "seq_len": cfg.seq_len, "splits": {k: v["sha256"] for k, v in split_info.items()}}
            ),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        # Swap in the finished store; an older store is removed only after the new one is complete.
        if state == "replace":
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenStore.open(out), True
