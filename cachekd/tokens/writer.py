"""Building a token store (`cachekd prepare`): read the corpus, hold out dev documents, train or load the tokenizer,
pack the ids into fixed windows, and publish the finished store by renaming a temporary directory."""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cachekd import __version__
from cachekd import storage
from cachekd.errors import CachekdError, ConfigFieldError, ConfigKeysError
from cachekd.storage import local_or_none, location
from cachekd.io import atomic_write_json, read_json_dict_or_none, sha256_json
import cachekd.tokens.format as tfmt
from cachekd.tokens.format import FORMAT, FORMAT_VERSION
from cachekd.tokens.reader import TokenStore


MAX_VOCAB_SIZE = 1 << 20
"""The largest BPE vocabulary `prepare` trains (1,048,576): four times the largest vocabularies in use (Gemma's
262,144). The tokenizer trainer allocates memory for the size asked before it looks at the corpus: 10⁹ tried to
allocate ~70 GB and aborted the process."""


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
            raise ConfigFieldError("seq_len", "at least 2", self.seq_len, "a window needs an input and a next token")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ConfigFieldError("dev_fraction", "in [0, 1)", self.dev_fraction)
        if self.vocab_size > MAX_VOCAB_SIZE:
            raise ConfigKeysError("{vocab_size} must be at most {most:,} (got {got:,}), four times the largest "
                                  "vocabularies in use; Baby Llama uses 16,000.", most=MAX_VOCAB_SIZE, got=self.vocab_size)


# ------------------------------------------------------------------------------------------------ prepare


def _assign_dev(num_docs: int, cfg: PrepareConfig, source_index: int) -> np.ndarray:
    """Boolean mask over a source's documents: True = dev. A source of fewer than two documents gets none here
    (`_split_tail` holds out the tail of its one document instead)."""
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


HeldOutBy = Literal["documents", "lines", "words", "none"]
"""How a source's dev share was held out: whole documents; the last lines, or the last words, of a source that is
one document; none (`dev_fraction` 0)."""


def _split_tail(doc: str, fraction: float, source: str) -> tuple[str, str, HeldOutBy]:
    """A source that is one document (e.g. a file without blank lines) cannot give whole documents to both splits:
    its text is cut once, at the line boundary (else the space) nearest to leaving `fraction` of its characters
    for dev, with at least one line (word) on each side. Returns (train text, dev text, how it was cut); a text of
    a single word cannot be cut and is refused."""
    target = len(doc) * (1.0 - fraction)
    first, last = len(doc) - len(doc.lstrip()), len(doc.rstrip()) - 1  # the text's first and last visible characters
    for sep, how in (("\n", "lines"), (" ", "words")):
        cuts = [m.start() for m in re.finditer(sep, doc) if first < m.start() < last]
        if cuts:
            cut = min(cuts, key=lambda i: abs(i - target))
            return doc[:cut], doc[cut + 1:], how  # type: ignore[return-value]
    raise ConfigKeysError("{source!r} is one document of a single word, so no dev share can be held out from it; "
                          "add text to it, leave it out, or pass {dev_fraction} 0.", source=source)


class _WindowWriter:
    """Packs a stream of token ids into fixed windows and appends whole chunks to a zarr array."""

    def __init__(self, group, split: str, seq_len: int, chunk_windows: int, dtype: np.dtype):
        self.arr = tfmt.create_tokens_array(group, split, seq_len, chunk_windows, dtype)
        self.seq_len, self.chunk_windows, self.dtype = seq_len, chunk_windows, dtype
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.num_tokens = 0
        self.num_documents = 0
        self.num_windows = 0
        self.doc_tokens: list[int] = []  # tokens of each document added, in order
        self.hash = hashlib.sha256()

    def add(self, ids: np.ndarray) -> None:
        self.buffer.append(ids)
        self.buffered += len(ids)
        self.num_tokens += len(ids)
        self.num_documents += 1
        self.doc_tokens.append(len(ids))
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
    """'fresh' | 'same' (nothing to do) | 'replace' (a store at the path and --force given: built again even from
    the same inputs, which is how a damaged store is repaired)."""
    if not out.exists():
        return "fresh"
    if out.is_file():
        raise CachekdError(f"output {str(out)!r} is a file; choose a directory path for the token store.")
    if tfmt.manifest_path(out).exists():
        manifest = read_json_dict_or_none(tfmt.manifest_path(out))
        if manifest is None:  # damaged: replaceable only when the directory is a token store's Zarr group
            if not tfmt.is_token_store(out):
                raise CachekdError(f"output {str(out)!r} holds something else (an unreadable manifest.json); "
                                   f"choose another path.")
            if not force:
                raise ConfigKeysError("output {out!r} holds a token store whose manifest.json is damaged; pass {force} "
                                      "to build it again or choose another path.", out=str(out))
            return "replace"
        if manifest.get("format") != FORMAT:
            raise CachekdError(f"output {str(out)!r} holds something else ({manifest.get('format', 'unknown')!r}); choose another path.")
        if manifest.get("input_fingerprint") == input_fingerprint and not force:
            return "same"
        if not force:
            raise ConfigKeysError("output {out!r} holds a token store built from other inputs or options; pass {force} "
                                  "to replace it or choose another path.", out=str(out))
        return "replace"
    if not any(out.iterdir()):
        return "fresh"
    if local_or_none(out) is None and tfmt.is_token_store(out):  # an upload to an object store that was cut off
        if not force:
            raise ConfigKeysError("output {out!r} holds an incomplete token store (its upload was cut off); pass "
                                  "{force} to build it again or choose another path.", out=str(out))
        return "replace"
    raise CachekdError(f"output {str(out)!r} is not empty and is not a token store; choose another path.")


def prepare(cfg: PrepareConfig, *, force: bool = False, progress: bool = True) -> tuple[TokenStore, bool]:
    """Build a token store from a corpus. Returns (store, built) where built=False means it was already up to date."""
    from cachekd.corpus import load_tokenizer, resolve_sources, tokenizer_fingerprint, train_bpe_tokenizer

    if not cfg.output:
        raise ConfigKeysError("no output path given: pass {output} DIR for the token store.")
    out = location(cfg.output)
    sources = resolve_sources(cfg.inputs, output=local_or_none(out))
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

    train_docs, dev_docs, per_source = _read_documents(sources, cfg, progress)
    if cfg.tokenizer:
        tokenizer = given_tokenizer
    else:
        tokenizer = train_bpe_tokenizer(iter(train_docs), cfg.vocab_size, show_progress=progress, length=len(train_docs))
    vocab_size = len(tokenizer)
    dtype = tfmt.token_dtype(vocab_size)
    cw = tfmt.chunk_windows_for(cfg.seq_len)

    import zarr

    # built in a temporary directory beside the output (on an object store: a local one, uploaded manifest last)
    tmp = (out.parent / f".{out.name}.tmp-{os.getpid()}" if local_or_none(out) is not None
           else Path(tempfile.mkdtemp(prefix="cachekd-prepare-")))
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)  # (tmp is always local)
        group.attrs["cachekd"] = FORMAT
        docs_by_split = {"train": train_docs, **({"dev": dev_docs} if cfg.dev_fraction > 0 else {})}
        split_info = _encode_splits(group, tokenizer, docs_by_split, cfg.seq_len, cw, dtype, progress)
        source_splits = _source_splits(per_source, split_info, cfg.seq_len)
        tokenizer.save_pretrained(str(tmp / tfmt.TOKENIZER_DIR))
        manifest = tfmt.build_manifest(
            version=__version__, seq_len=cfg.seq_len, vocab_size=vocab_size,
            vocab_size_requested=None if cfg.tokenizer else cfg.vocab_size, dtype=dtype, chunk_windows=cw,
            special_tokens={"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id},
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            tokenizer_source=tok_src["path"] if tok_src else "trained",
            splits=split_info, sources=[s.describe() for s in sources], options=options,
            input_fingerprint=input_fingerprint, source_splits=source_splits,
        )
        atomic_write_json(tfmt.manifest_path(tmp), manifest)
        _publish(tmp, out, replace=state == "replace")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenStore.open(out), True


def _read_documents(sources: list, cfg: PrepareConfig,
                    progress: bool) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """Every document of the corpus, read once, as (train, dev, per source); the dev split is held out from every
    source: whole documents (`_assign_dev`) where it has two or more, else the tail of its one document
    (`_split_tail`). Per source (in order): its documents in each split and how its dev share was held out."""
    from tqdm.auto import tqdm

    from cachekd.corpus import iter_documents

    train_docs: list[str] = []
    dev_docs: list[str] = []
    per_source: list[dict[str, Any]] = []
    for i, src in enumerate(tqdm(sources, desc="reading", unit="file", disable=not progress or len(sources) < 2)):
        docs = list(iter_documents(src, doc_sep=cfg.doc_sep, text_column=cfg.text_column, clean=cfg.clean))
        n_train, n_dev = len(train_docs), len(dev_docs)
        how: HeldOutBy = "none"
        if cfg.dev_fraction > 0 and len(docs) == 1:
            head, tail, how = _split_tail(docs[0], cfg.dev_fraction, str(src.path))
            train_docs.append(head)
            dev_docs.append(tail)
        else:
            dev_mask = _assign_dev(len(docs), cfg, i)
            how = "documents" if dev_mask.any() else "none"
            for d, is_dev in zip(docs, dev_mask):
                (dev_docs if is_dev else train_docs).append(d)
        per_source.append({"held_out_by": how, "num_documents": {"train": len(train_docs) - n_train,
                                                                  "dev": len(dev_docs) - n_dev}})
    if not train_docs:
        raise CachekdError("the corpus is empty: no non-blank text was found in the inputs.")
    return train_docs, dev_docs, per_source


def _source_splits(per_source: list[dict[str, Any]], split_info: dict[str, dict[str, Any]],
                   seq_len: int) -> list[dict[str, Any]]:
    """The manifest's record of each source's part of each split: its documents, tokens and windows. A split
    packs its sources' documents in source order, so a source's tokens are one range [t0, t1) of the split's
    stream; its windows are those that start inside that range, [⌈t0/L⌉, ⌈t1/L⌉) within the split (a window that
    straddles two sources counts for the one it starts in)."""
    out = [{"held_out_by": ps["held_out_by"]} for ps in per_source]
    for split, info in split_info.items():
        doc_tokens = info.pop("doc_tokens")
        start_doc = start_tok = 0
        for ps, rec in zip(per_source, out):
            n = ps["num_documents"][split]
            tokens = int(sum(doc_tokens[start_doc:start_doc + n]))
            t0, t1 = start_tok, start_tok + tokens
            w0, w1 = (min(-(-t // seq_len), info["num_windows"]) for t in (t0, t1))
            rec[split] = {"num_documents": n, "num_tokens": tokens, "windows": [w0, w1]}
            start_doc, start_tok = start_doc + n, t1
    return out


def _encode_splits(group, tokenizer, docs_by_split: dict[str, list[str]], seq_len: int, chunk_windows: int,
                   dtype: np.dtype, progress: bool) -> dict[str, dict[str, Any]]:
    """Tokenize each split's documents (each followed by the end-of-text token) into its window array; returns
    the manifest's per-split facts. A split too small for one window is refused."""
    from tqdm.auto import tqdm

    backend = tokenizer.backend_tokenizer
    eos_arr = np.array([tokenizer.eos_token_id], dtype=np.int64)
    batch = 2000
    split_info: dict[str, Any] = {}
    for split, docs in docs_by_split.items():
        w = _WindowWriter(group, split, seq_len, chunk_windows, dtype)
        with tqdm(total=len(docs), desc=f"encoding {split}", unit="doc", disable=not progress) as bar:
            for b in range(0, len(docs), batch):
                encs = backend.encode_batch(docs[b:b + batch], add_special_tokens=False)
                for e in encs:
                    w.add(np.concatenate([np.asarray(e.ids, dtype=np.int64), eos_arr]))
                bar.update(len(encs))
        split_info[split] = w.close() | {"doc_tokens": w.doc_tokens}  # (doc_tokens: popped by _source_splits)
    if split_info["train"]["num_windows"] == 0:
        raise ConfigKeysError("the corpus gives {n} training tokens, fewer than one window of {w}; add text or lower "
                              "{seq_len}.", n=split_info["train"]["num_tokens"], w=seq_len)
    if "dev" in split_info and split_info["dev"]["num_windows"] == 0:
        raise ConfigKeysError("the dev split gets {n} tokens, fewer than one window of {w}; raise {dev_fraction}, lower "
                              "{seq_len}, or pass {dev_fraction} 0.", n=split_info["dev"]["num_tokens"], w=seq_len)
    return split_info


def _publish(tmp: Path, out: Path, *, replace: bool) -> None:
    """Swap the finished store in; an older store is removed only after the new one is in place. On an object
    store (no rename): the old store's manifest is removed first (so it never reads as complete while mixed),
    then the old store, then the new one is uploaded, its manifest last."""
    if local_or_none(out) is None:
        if replace:
            tfmt.manifest_path(out).unlink(missing_ok=True)
            storage.remove(out)
        storage.upload_tree(tmp, out, last=tfmt.MANIFEST)
        shutil.rmtree(tmp)
        return
    if replace:
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
