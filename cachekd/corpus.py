"""Text ingestion and tokenizers: files, directories, globs and local `datasets` files in; documents out.

A *document* is the unit that gets an end-of-text token after it and that the dev split is drawn by. For plain
text it is a block of lines separated by blank lines (BabyLM-style files with one utterance a line become one
document per blank-line block); ``doc_sep="line"`` makes every line a document and ``doc_sep="file"`` the whole file.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cachekd.errors import CachekdError, ConfigKeysError
from cachekd.io import sha256_file

TEXT_SUFFIXES = {".txt", ".train", ".dev", ".test", ".text", ".md", ""}
DATASET_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 in a trained tokenizer (as Baby Llama does)


@dataclass(frozen=True)
class Source:
    """One input file (or saved dataset directory) with what identifies its content."""

    path: Path
    kind: str  # "text" | "json" | "parquet" | "csv" | "saved"
    size: int
    sha256: str

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "size": self.size, "sha256": self.sha256}


def _looks_like_saved_dataset(p: Path) -> bool:
    return (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists()


def _dir_fingerprint(p: Path) -> tuple[int, str]:
    import hashlib

    h = hashlib.sha256()
    size = 0
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        size += f.stat().st_size
        h.update(str(f.relative_to(p)).encode())
        h.update(sha256_file(f).encode())
    return size, h.hexdigest()


def _inside(path: Path, directory: Path) -> bool:
    """Whether `path` is `directory` or lies under it (both resolved)."""
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def resolve_sources(inputs: list[str], output: str | Path | None = None) -> list[Source]:
    """Expand files, directories and globs into a sorted, de-duplicated list of sources.

    With `output` (the directory about to be written), an output inside an input directory, or an input inside
    the output, is refused: a later run would read the output's own files as corpus."""
    if not inputs:
        raise CachekdError("no input given: pass one or more text files, directories or globs.")
    found: list[Path] = []
    for raw in inputs:
        matches = sorted(glob.glob(os.path.expanduser(raw), recursive=True)) if glob.has_magic(raw) else [raw]
        if not matches:
            raise CachekdError(f"the pattern {raw!r} matches no file.")
        for m in matches:
            p = Path(m)
            if not p.exists():
                raise CachekdError(f"input {str(p)!r} does not exist.")
            if output is not None and p.is_dir() and _inside(Path(output), p):
                raise CachekdError(f"the output {str(output)!r} is inside the input directory {str(p)!r}, so a later "
                                   f"run would read its own files as corpus; choose an output outside the inputs.")
            if output is not None and _inside(p, Path(output)):
                raise CachekdError(f"the input {str(p)!r} is inside the output {str(output)!r}; choose an output "
                                   f"outside the inputs.")
            if p.is_dir() and not _looks_like_saved_dataset(p):
                files = sorted(
                    x for x in p.rglob("*")
                    if x.is_file() and not x.name.startswith(".")
                    and (x.suffix in TEXT_SUFFIXES or x.suffix in DATASET_SUFFIXES)
                )
                if not files:
                    raise CachekdError(f"directory {str(p)!r} holds no text or dataset files.")
                found.extend(files)
            else:
                found.append(p)
    sources, seen = [], set()
    for p in found:
        key = p.resolve()
        if key in seen:
            continue
        seen.add(key)
        if p.is_dir():
            size, digest = _dir_fingerprint(p)
            sources.append(Source(p, "saved", size, digest))
        else:
            kind = DATASET_SUFFIXES.get(p.suffix.lower(), "text")
            sources.append(Source(p, kind, p.stat().st_size, sha256_file(p)))
    return sources


_WS = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+")


def clean_text(text: str) -> str:
    """Light cleaning (opt-in): Unicode NFC, runs of spaces/tabs to one space, lines stripped, empty lines dropped."""
    text = unicodedata.normalize("NFC", text)
    lines = (_WS.sub(" ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def _split_text(text: str, doc_sep: str) -> Iterator[str]:
    if doc_sep == "file":
        if text.strip():
            yield text.strip("\n")
    elif doc_sep == "line":
        for line in text.splitlines():
            if line.strip():
                yield line
    else:  # blank-line
        for block in re.split(r"\n[ \t]*\n", text):
            block = block.strip("\n")
            if block.strip():
                yield block


def read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise CachekdError(f"{str(path)!r} is not a text file (it contains NUL bytes); pass UTF-8 text.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CachekdError(
            f"{str(path)!r} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8 first."
        ) from None


def _dataset_rows(src: Source, text_column: str) -> Iterator[str]:
    import datasets

    datasets.disable_progress_bars()
    try:
        if src.kind == "saved":
            ds = datasets.load_from_disk(str(src.path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else datasets.concatenate_datasets(list(ds.values()))
        else:
            ds = datasets.load_dataset(src.kind, data_files=str(src.path), split="train")
    except Exception as e:  # noqa: BLE001 - datasets raises many types for unreadable files
        raise CachekdError(f"cannot read {str(src.path)!r} as a {src.kind} dataset: {str(e).splitlines()[0]}") from None
    if text_column not in ds.column_names:
        raise ConfigKeysError("{path!r} has no column {column!r}; its columns are {columns} (choose one with "
                              "{text_column}).", path=str(src.path), column=text_column,
                              columns=", ".join(ds.column_names))
    for row in ds.select_columns([text_column]):
        value = row[text_column]
        if isinstance(value, str) and value.strip():
            yield value


def iter_documents(
    src: Source, *, doc_sep: str = "blank-line", text_column: str = "text", clean: bool = False
) -> Iterator[str]:
    """Documents of one source, in file order."""
    if src.kind == "text":
        docs: Iterator[str] = _split_text(read_text_file(src.path), doc_sep)
    else:
        docs = _dataset_rows(src, text_column)
    for d in docs:
        if clean:
            d = clean_text(d)
            if not d:
                continue
        yield d


# ----------------------------------------------------------------------------------------------- tokenizers


def train_bpe_tokenizer(texts: Iterator[str], vocab_size: int, *, show_progress: bool = True, length: int | None = None):
    """Train a byte-level BPE (HF ``tokenizers``) with ``<pad>``, ``<s>``, ``</s>`` as ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise CachekdError(
            f"vocab size {vocab_size} is too small: a byte-level BPE needs at least {min_vocab} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)."
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        # the Rust progress bar writes to stdout: only onto a terminal, never into piped output (blank lines)
        show_progress=show_progress and sys.stdout.isatty(),
        min_frequency=2,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token=None,
        model_max_length=1_000_000,
    )


def load_tokenizer(path: str | Path):
    """An existing tokenizer: an HF tokenizer directory or a ``tokenizer.json`` file."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if not p.exists():
        raise CachekdError(f"tokenizer {str(p)!r} does not exist; give an HF tokenizer directory or a tokenizer.json.")
    try:
        if p.is_file():
            tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
        else:
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, use_fast=True)
    except Exception as e:  # noqa: BLE001
        raise CachekdError(f"cannot load a tokenizer from {str(p)!r}: {str(e).splitlines()[0]}") from None
    if not getattr(tok, "is_fast", False):
        raise CachekdError(f"the tokenizer at {str(p)!r} is not a fast (tokenizers-backed) tokenizer.")
    if tok.eos_token_id is None:
        # Fall back to a conventional end-of-text token when the file does not declare one.
        for cand in ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>"):
            if cand in tok.get_vocab():
                tok.eos_token = cand
                break
        else:
            raise CachekdError(f"the tokenizer at {str(p)!r} has no end-of-text token to join documents with.")
    return tok


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer's behaviour: its model, normaliser, pre-tokeniser and special tokens."""
    from cachekd.io import sha256_json

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    keep = {k: state.get(k) for k in ("model", "normalizer", "pre_tokenizer", "added_tokens")}
    return sha256_json(keep)
