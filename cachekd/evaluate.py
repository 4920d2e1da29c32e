"""Evaluation: dev-set perplexity from a token store and BLiMP-style minimal-pair accuracy.

* `dev_loss` — mean next-token cross-entropy (nats) over every prediction of every window of a split: a window
  of L tokens gives L−1 predictions (labels = window[1:]), so windows never see across their edges and the number
  matches what the trainer logs.
* `sentence_logprobs` — log P(sentence | prefix) summed over the sentence's tokens, the way the BabyLM
  evaluation scores BLiMP: the context is a begin-of-text token (or a text, or nothing) and is not scored.
* `minimal_pair_accuracy` — a pair counts as correct when the good sentence scores strictly higher than the bad.
* `evaluate` — loads a checkpoint (or a run directory's `model/`), runs what was asked, returns one dict; the
  CLI prints it and saves it as ``RUN/eval.json``.

Library code: no printing beyond tqdm progress bars; bad input raises `CachekdError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from cachekd import __version__
from cachekd.errors import CachekdError
from cachekd.models import check_positions, max_positions
from cachekd.rundir import RunDir, loss_key, minimal_pairs_key
from cachekd.teachers import has_tokenizer, tokenizer_fingerprint_of
from cachekd.tokens import TokenStore

# ------------------------------------------------------------------------------------------------ helpers


def _open_store(store: TokenStore | str | Path) -> TokenStore:
    return store if isinstance(store, TokenStore) else TokenStore.open(store)


def _output_size(model) -> int | None:
    """Number of logits the model emits a position (its `config.vocab_size`)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(getattr(getattr(model, "config", None), "vocab_size", 0)) or None


def _config_vocab_size(model_dir: Path) -> int | None:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    v = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return int(v) if isinstance(v, int) else None


# ------------------------------------------------------------------------------------------------ dev loss


@torch.no_grad()
def dev_loss(
    model,
    store: TokenStore | str | Path,
    split: str = "dev",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    max_windows: int | None = None,
    progress: bool = True,
    windows: np.ndarray | None = None,
) -> dict[str, Any]:
    """Mean per-token next-token loss of `model` over the windows of a token-store split.

    Returns ``{"loss": nats a prediction, "ppl": exp(loss), "num_tokens": predictions scored,
    "num_windows": windows read}``. Each (L,) window gives L−1 predictions; log-probabilities are taken in
    float32 whatever the model's dtype, and summed in float64. `max_windows` evaluates the first windows only;
    `windows` (sorted indices, e.g. `cachekd.tokens.reader.dev_sample`) evaluates those windows only.
    """
    from tqdm.auto import tqdm

    store = _open_store(store)
    if split not in store.splits():
        raise CachekdError(
            f"token store {str(store.path)!r} has no {split!r} split (it has {', '.join(store.splits())})."
        )
    if batch_size < 1:
        raise CachekdError(f"batch size must be at least 1 (got {batch_size}).")
    n = store.num_windows(split)
    if windows is not None:
        windows = np.asarray(windows, dtype=np.int64)
        if len(windows) and (windows.min() < 0 or windows.max() >= n):
            raise CachekdError(f"window indices must lie in [0, {n}) for the {split!r} split.")
        n = len(windows)
    if max_windows is not None:
        if max_windows < 1:
            raise CachekdError(f"--max-windows must be at least 1 (got {max_windows}).")
        n = min(n, max_windows)
    if n == 0:
        raise CachekdError(f"the {split!r} split of {str(store.path)!r} holds no windows.")
    check_positions(model, store.seq_len, "the model")
    vocab = _output_size(model)
    model.eval()
    model.to(device)
    total = 0.0  # python float: float64 accumulation
    num_tokens = 0
    with tqdm(total=n, desc=f"dev loss ({split})", unit="win", disable=not progress) as bar:
        for block in _window_batches(store, split, n, batch_size, windows):
            ids = torch.from_numpy(block.astype(np.int64)).to(device)  # (B, L)
            if vocab is not None and int(ids.max()) >= vocab:
                raise CachekdError(
                    f"the token store holds token id {int(ids.max())} but the model has only {vocab} outputs; "
                    f"it was built with another tokenizer."
                )
            logits = model(input_ids=ids, use_cache=False).logits  # (B, L, V)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            num_tokens += ids[:, 1:].numel()
            bar.update(len(block))
    mean = total / num_tokens
    return {"loss": mean, "ppl": math.exp(mean) if mean < 700 else float("inf"), "num_tokens": num_tokens,
            "num_windows": n}


def _window_batches(store: TokenStore, split: str, n: int, batch_size: int, windows: np.ndarray | None):
    """(B, L) arrays of token windows: the first `n` windows of the split, or the given `windows` (sorted), read a
    whole chunk at a time (one read a chunk, not one a window)."""
    if windows is None:
        for start in range(0, n, batch_size):
            yield store.read(split, start, min(n, start + batch_size))
        return
    cw = store.chunk_windows
    pending: list[np.ndarray] = []
    buffered = 0
    for c in np.unique(windows // cw):
        rows = windows[(windows // cw) == c] - c * cw
        pending.append(store.read_chunk(split, int(c))[rows])
        buffered += len(rows)
        while buffered >= batch_size:
            flat = np.concatenate(pending)
            yield flat[:batch_size]
            pending, buffered = [flat[batch_size:]], len(flat) - batch_size
    if buffered:
        yield np.concatenate(pending)


# ------------------------------------------------------------------------------------------------ sentence scores


def prefix_ids(tokenizer, prefix: str | None = "eos") -> list[int]:
    """Token ids of the unscored context put before every sentence.

    ``"eos"`` (default): the end-of-text token. `cachekd prepare` joins documents with it, so it is the context
    every document was seen after in training (a model trained on such a store never sees ``<s>``; measured on the
    demo grammar, subject–verb agreement scored 0.94 after ``</s>`` and 0.79 after ``<s>``);
    ``"bos"``: the begin-of-text token (``<s>`` in a tokenizer trained by `cachekd prepare`); a tokenizer without
    one falls back to its end-of-text token, as lm-evaluation-harness does for an empty context (GPT-2 style);
    ``None``: no context, so a sentence's first token is context and its score starts at the second token;
    any other text: its tokens (``"</s>"`` gives the end-of-text token, which is what precedes a document in a
    token store).
    """
    if prefix is None:
        return []
    if prefix == "eos":
        tid = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        return [int(tid)] if tid is not None else []
    if prefix == "bos":
        tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [int(tid)] if tid is not None else []
    return list(tokenizer(prefix, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def sentence_logprobs(
    model,
    tokenizer,
    sentences: Sequence[str],
    prefix: str | None = "eos",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> list[float]:
    """log P(sentence | prefix) in nats for each sentence: the sum of its tokens' log-probabilities.

    The prefix (see `prefix_ids`) is context only. With no prefix the first token cannot be predicted and the
    sum starts at the second token; a sentence with no scored token gets 0.0. Sentences are batched by length,
    right-padded, and padded positions are neither attended to (causal mask, pads come last) nor scored.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise CachekdError(f"batch size must be at least 1 (got {batch_size}).")
    sentences = list(sentences)
    if not sentences:
        return []
    ctx = prefix_ids(tokenizer, prefix)
    encoded = tokenizer(sentences, add_special_tokens=False)["input_ids"]
    seqs = [ctx + list(ids) for ids in encoded]
    first_scored = max(len(ctx), 1)  # index of the first token whose probability counts
    max_pos = max_positions(model)
    longest = max(len(s) for s in seqs)
    if max_pos is not None and longest > max_pos:
        i = max(range(len(seqs)), key=lambda k: len(seqs[k]))
        raise CachekdError(
            f"the sentence {sentences[i][:60]!r} is {longest} tokens with its prefix, more than the model's "
            f"{max_pos} positions."
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocab = _output_size(model)
    model.eval()
    model.to(device)
    order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k]))
    scores = [0.0] * len(seqs)
    with tqdm(total=len(seqs), desc="scoring", unit="sent", disable=not progress) as bar:
        for b in range(0, len(order), batch_size):
            idx = [k for k in order[b:b + batch_size]]
            lengths = torch.tensor([len(seqs[k]) for k in idx])
            if int(lengths.max()) <= first_scored:
                bar.update(len(idx))
                continue  # nothing to score in this batch (and in the rest: they are shorter)
            width = int(lengths.max())
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            for r, k in enumerate(idx):
                ids[r, : len(seqs[k])] = torch.tensor(seqs[k], dtype=torch.long)
            if vocab is not None and int(ids.max()) >= vocab:
                raise CachekdError(
                    f"the tokenizer gives token id {int(ids.max())} but the model has only {vocab} outputs; "
                    f"use the tokenizer the model was trained with."
                )
            positions = torch.arange(width)
            attention = (positions[None, :] < lengths[:, None]).long()  # (B, T)
            ids, attention = ids.to(device), attention.to(device)
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits  # (B, T, V)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V): predicts ids[:, 1:]
            target_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1).cpu()  # (B, T-1)
            t = positions[1:]  # the position of the token each column predicts
            scored = (t[None, :] >= first_scored) & (t[None, :] < lengths[:, None])  # (B, T-1)
            sums = (target_logp.double() * scored).sum(-1)
            for r, k in enumerate(idx):
                scores[k] = float(sums[r])
            bar.update(len(idx))
    return scores


# ------------------------------------------------------------------------------------------------ minimal pairs


def pair_files(path: str | Path) -> list[Path]:
    """`path` itself when it is a file, else the ``*.jsonl`` files in the directory and its subdirectories (as in
    BabyLM's evaluation data: blimp_filtered/, supplement_filtered/), sorted."""
    p = Path(path)
    if not p.exists():
        raise CachekdError(f"minimal pairs {str(p)!r} do not exist; give a .jsonl file or a directory of them.")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*.jsonl") if f.is_file())
    if not files:
        raise CachekdError(f"directory {str(p)!r} holds no .jsonl minimal-pair files.")
    return files


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Records of a BLiMP-format .jsonl file; each must have string ``sentence_good`` and ``sentence_bad``."""
    p = Path(path)
    records = []
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CachekdError(f"{str(p)!r} is not UTF-8 text.") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:  # e.msg ends where json would add its character offset
            where = f"column {e.colno}" if e.msg.endswith(" at") else f"at column {e.colno}"
            raise CachekdError(f"{str(p)!r} line {lineno} is not valid JSON ({e.msg} {where}).") from None
        if not isinstance(rec, dict):
            raise CachekdError(f"{str(p)!r} line {lineno} is not a JSON object with sentence_good and sentence_bad.")
        for key in ("sentence_good", "sentence_bad"):
            if not isinstance(rec.get(key), str):
                what = "has no" if key not in rec else "has a non-text"
                raise CachekdError(f"{str(p)!r} line {lineno} {what} {key!r} field.")
            if not rec[key].strip():
                raise CachekdError(f"{str(p)!r} line {lineno} has an empty {key!r}; every pair needs two sentences.")
        records.append(rec)
    if not records:
        raise CachekdError(f"{str(p)!r} holds no minimal pairs.")
    return records


def minimal_pair_accuracy(
    model,
    tokenizer,
    path: str | Path,
    prefix: str | None = "eos",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    max_pairs: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy on BLiMP-format minimal pairs: a pair is correct when log P(good) > log P(bad) (ties are wrong).

    `path` is a .jsonl file or a directory of them (one phenomenon a file, as BLiMP ships them). `max_pairs`:
    score at most that many pairs of each file, chosen at random without replacement by `seed` and the file's name
    (`choose_pairs`), so a file's choice does not depend on the other files given. Returns
    ``{"macro_accuracy": mean of the per-file accuracies, "micro_accuracy": over all pairs, "num_pairs",
    "num_correct", "num_files", "by_file": {stem: {accuracy, num_pairs, num_pairs_in_file, num_correct, group,
    linguistics_term}}, "by_group": {group: {accuracy (mean over its files), num_files, num_pairs, num_correct}},
    "prefix", "pair_set", "files_fingerprint", "max_pairs", "seed", "key"}``; a file's group is its records'
    ``field`` (the most common one) or, without it, the file stem. ``"key"`` (`minimal_pairs_key`) names what was
    measured: the file set, its content, the prefix and the pair limit; results with different keys are not
    comparable.
    """
    if max_pairs is not None and max_pairs < 1:
        raise CachekdError(f"--max-pairs must be at least 1 (got {max_pairs}).")
    files = pair_files(path)
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        raise CachekdError(f"two minimal-pair files share a name under {str(path)!r}; rename one.")
    all_records = [read_pairs(f) for f in files]
    per_file = [(f, choose_pairs(recs, f.stem, max_pairs, seed)) for f, recs in zip(files, all_records)]
    sentences = [s for _, recs in per_file for r in recs for s in (r["sentence_good"], r["sentence_bad"])]
    scores = sentence_logprobs(model, tokenizer, sentences, prefix=prefix, batch_size=batch_size, device=device,
                               progress=progress)
    by_file: dict[str, dict[str, Any]] = {}
    pos = 0
    for i, (f, recs) in enumerate(per_file):
        good = np.array(scores[pos:pos + 2 * len(recs):2])
        bad = np.array(scores[pos + 1:pos + 2 * len(recs):2])
        pos += 2 * len(recs)
        correct = int((good > bad).sum())
        by_file[f.stem] = {
            "accuracy": correct / len(recs),
            "num_pairs": len(recs),
            "num_pairs_in_file": len(all_records[i]),
            "num_correct": correct,
            "group": _most_common(str(r["field"]) for r in recs if r.get("field")) or f.stem,
            "linguistics_term": _most_common(str(r["linguistics_term"]) for r in recs if r.get("linguistics_term")),
            "mean_logprob_good": float(good.mean()),
            "mean_logprob_bad": float(bad.mean()),
        }
    by_group: dict[str, dict[str, Any]] = {}
    for stem, r in by_file.items():
        g = by_group.setdefault(r["group"], {"files": [], "num_pairs": 0, "num_correct": 0})
        g["files"].append(stem)
        g["num_pairs"] += r["num_pairs"]
        g["num_correct"] += r["num_correct"]
    for g in by_group.values():
        g["accuracy"] = float(np.mean([by_file[s]["accuracy"] for s in g["files"]]))
        g["num_files"] = len(g["files"])
    num_pairs = sum(r["num_pairs"] for r in by_file.values())
    num_correct = sum(r["num_correct"] for r in by_file.values())
    result = {
        "path": str(path),
        "prefix": prefix,
        "pair_set": pair_set_name(path),
        "files_fingerprint": pair_files_fingerprint(files),
        "max_pairs": max_pairs,
        "seed": seed if max_pairs is not None else None,
        "num_files": len(by_file),
        "num_pairs": num_pairs,
        "num_correct": num_correct,
        "macro_accuracy": float(np.mean([r["accuracy"] for r in by_file.values()])),
        "micro_accuracy": num_correct / num_pairs,
        "by_group": dict(sorted(by_group.items())),
        "by_file": by_file,
    }
    result["key"] = minimal_pairs_key(result)
    return result


def choose_pairs(records: list[dict[str, Any]], name: str, max_pairs: int | None,
                 seed: int = 0) -> list[dict[str, Any]]:
    """At most `max_pairs` of a file's records, in file order: all of them when there are no more, else a uniform
    random choice without replacement drawn by ``numpy.random.default_rng([seed, crc32(name)])``, so the same file
    name and seed always give the same pairs."""
    if max_pairs is None or len(records) <= max_pairs:
        return records
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    chosen = np.sort(rng.choice(len(records), size=max_pairs, replace=False))
    return [records[int(i)] for i in chosen]


def pair_set_name(path: str | Path) -> str:
    """Short name of a minimal-pair file set: the directory's name, or the file's stem."""
    p = Path(path).resolve()
    return p.stem if p.is_file() else p.name


def pair_files_fingerprint(files: Sequence[Path]) -> str:
    """SHA-256 over the files' stems and bytes, in order: two file sets with the same name and other pairs differ."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.stem.encode("utf-8") + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _most_common(values: Iterable[str]) -> str | None:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else None


# ------------------------------------------------------------------------------------------------ checks


def check_tokenizer_matches(
    model_dir_or_tokenizer, store: TokenStore | str | Path, *, model_vocab_size: int | None = None
) -> None:
    """Refuse to evaluate a model on a token store built with another tokenizer.

    `model_dir_or_tokenizer` is a checkpoint or run directory (its tokenizer, when saved there, and its
    `config.vocab_size` are checked) or a tokenizer object (then pass `model_vocab_size` to check it too).
    Compares `cachekd.corpus.tokenizer_fingerprint` with the store's, and requires the model's vocabulary to
    cover the store's.
    """
    from cachekd.corpus import tokenizer_fingerprint
    from cachekd.models import resolve_model_dir

    store = _open_store(store)
    if isinstance(model_dir_or_tokenizer, (str, Path)):
        model_dir = resolve_model_dir(model_dir_or_tokenizer)
        where = f"the model {str(model_dir)!r}"
        fp = tokenizer_fingerprint_of(model_dir)
        vocab = model_vocab_size if model_vocab_size is not None else _config_vocab_size(model_dir)
    else:
        model_dir, where = None, "the given tokenizer"
        fp, vocab = tokenizer_fingerprint(model_dir_or_tokenizer), model_vocab_size
    hint = f" (cachekd prepare ... --tokenizer {model_dir})" if model_dir is not None else ""
    store.check_tokenizer(
        fingerprint=fp, vocab_size=vocab,
        tokenizer_error=lambda fp: (
            f"the token store {str(store.path)!r} was built with a different tokenizer than {where} "
            f"(tokenizer fingerprints {store.tokenizer_fingerprint[:12]} vs {fp[:12]}); evaluate on a store "
            f"prepared with the model's tokenizer{hint}."),
        vocab_error=lambda v: (
            f"the token store {str(store.path)!r} has a vocabulary of {store.vocab_size} but {where} has "
            f"{v} outputs; it was built with another tokenizer."),
    )


# ------------------------------------------------------------------------------------------------ all together


def evaluate(
    model_path: str | Path,
    dev_store: TokenStore | str | Path | None = None,
    minimal_pairs: str | Path | None = None,
    *,
    split: str = "dev",
    prefix: str | None = "eos",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    max_windows: int | None = None,
    against_cache: str | Path | None = None,
    progress: bool = True,
    max_pairs: int | None = None,
    pair_seed: int = 0,
) -> dict[str, Any]:
    """Evaluate a checkpoint (or a run directory's ``model/``): dev loss on `dev_store`, accuracy on
    `minimal_pairs`, or both.

    The tokenizer comes from the checkpoint directory, or from the token store when the checkpoint has none.
    A store built with another tokenizer than the model's is refused. `against_cache`: mean KL(teacher ‖ student)
    and top-1 agreement with each teacher in a logit cache, on the `split` windows of the cache's token store.
    `max_pairs`, `pair_seed`: see `minimal_pair_accuracy`.

    Returns ``{"model", "run_dir", "num_params", "checkpoint_fingerprint", "device", "wall_s", "created",
    "cachekd_version", "losses": {key: {...}} (with `dev_store`; one entry, under `loss_key`), "dev": {...} (the same
    entry, only when it covers the whole dev split), "minimal_pairs": {...} (with `minimal_pairs`)}``. A loss on
    the train split or on part of the dev split is never under ``"dev"``.
    """
    from cachekd.corpus import load_tokenizer
    from cachekd.models import checkpoint_fingerprint, count_parameters, load_model, resolve_model_dir

    if dev_store is None and minimal_pairs is None and against_cache is None:
        raise CachekdError("nothing to evaluate: pass a token store (--dev) and/or minimal pairs (--minimal-pairs).")
    t0 = time.perf_counter()
    model_dir = resolve_model_dir(model_path)
    store = _open_store(dev_store) if dev_store is not None else None
    if minimal_pairs is not None:
        pair_files(minimal_pairs)  # fail on a bad path before loading the model
        if max_pairs is not None and max_pairs < 1:
            raise CachekdError(f"--max-pairs must be at least 1 (got {max_pairs}).")
    if store is not None:
        check_tokenizer_matches(model_dir, store)
    model = load_model(model_dir)
    if has_tokenizer(model_dir):
        tokenizer = load_tokenizer(model_dir)
    elif store is not None:
        tokenizer = store.load_tokenizer()
    else:
        tokenizer = None
    run_dir = RunDir.of_model_path(model_path)
    result: dict[str, Any] = {
        "model": str(model_dir),
        "run_dir": str(run_dir.path) if run_dir is not None else None,
        "num_params": count_parameters(model),
        "checkpoint_fingerprint": checkpoint_fingerprint(model_dir),
        "device": str(device),
    }
    if store is not None:
        d = dev_loss(model, store, split=split, batch_size=batch_size, device=device, max_windows=max_windows,
                     progress=progress)
        entry = {"store": str(store.path), "split": split, "store_fingerprint": store.fingerprint,
                 "max_windows": max_windows, **d, "split_windows": store.num_windows(split),
                 "complete": d["num_windows"] == store.num_windows(split)}
        entry["key"] = loss_key(entry)
        result["losses"] = {entry["key"]: entry}
        if entry["key"] == "dev":
            result["dev"] = entry
    if against_cache is not None:
        from cachekd.cache.reader import LogitCache

        cache = LogitCache.open(against_cache)
        if store is not None:
            cstore = store
        else:
            recorded = cache.meta["token_store"]["path"]
            if not Path(recorded).exists():
                raise CachekdError(
                    f"the token store this cache was built from ({recorded!r}) is not there any more; pass its new "
                    f"location with --dev STORE."
                )
            cstore = _open_store(recorded)
        check_tokenizer_matches(model_dir, cstore)
        result["against_cache"] = agreement_with_cache(model, cache, cstore, split=split, batch_size=batch_size,
                                                       device=device, max_windows=max_windows, progress=progress)
    if minimal_pairs is not None:
        if tokenizer is None:
            raise CachekdError(
                f"the checkpoint {str(model_dir)!r} has no tokenizer to score sentences with; pass the token store "
                f"it was trained on with --dev, or save the tokenizer next to the model."
            )
        result["minimal_pairs"] = minimal_pair_accuracy(model, tokenizer, minimal_pairs, prefix=prefix,
                                                        batch_size=batch_size, device=device, progress=progress,
                                                        max_pairs=max_pairs, seed=pair_seed)
    result["wall_s"] = time.perf_counter() - t0
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["cachekd_version"] = __version__
    return result


@torch.no_grad()
def agreement_with_cache(model, cache, store: TokenStore, *, split: str = "dev", temperature: float = 1.0,
                         batch_size: int = 32, device: str | torch.device = "cpu", max_windows: int | None = None,
                         progress: bool = True) -> dict[str, Any]:
    """Per teacher of `cache`: mean KL(p_teacher ‖ q_student) per position at `temperature` and the share of positions
    where the student's top-1 token is the teacher's. A top-k cache gives the exact KL of the (top-k, tail)
    coarse-grained distributions (`bucket`), which is a lower bound of the full KL; a full cache gives the full KL;
    a sampled cache an unbiased estimate of the full KL (its top-1 is the most probable stored id).
    Positions are those with a next token inside the window (as in training)."""
    from tqdm.auto import tqdm

    from cachekd.losses import DenseTarget, KDConfig, SparseTarget, distill_loss

    cache.check_store(store)
    if split not in cache.splits():
        raise CachekdError(f"the cache has no {split!r} split (it has {', '.join(cache.splits())}).")
    check_positions(model, store.seq_len, "the model")
    ti = cache.temperature_index(temperature)
    n = cache.num_windows(split) if max_windows is None else min(max_windows, cache.num_windows(split))
    device = torch.device(device)
    model = model.to(device).eval()
    cfg = KDConfig(objective="forward_kl", temperature=temperature, tail_mode="bucket")
    sums = {t: [0.0, 0, 0] for t in cache.teachers}  # kl sum, agreeing positions, positions
    for b in tqdm(range(0, n, batch_size), desc="against cache", unit="batch", disable=not progress):
        e = min(b + batch_size, n)
        x = torch.from_numpy(store.read(split, b, e).astype(np.int64)).to(device)
        labels = torch.full_like(x, cfg.ignore_index)
        labels[:, :-1] = x[:, 1:]
        logits = model(input_ids=x).logits[..., : cache.vocab_size].float()
        s_top1 = logits.argmax(-1)
        mask = labels != cfg.ignore_index
        for t, blk in cache.read(split, b, e).items():
            if blk.logits is not None:
                z = torch.from_numpy(blk.logits).to(device).float()
                target, t_top1 = DenseTarget(z), z.argmax(-1)
            elif blk.sample_ids is not None:  # the unbiased estimate of the KL (a divergence: H_τ is exact)
                from cachekd.teacher_samples import target_at

                arrays = {n: None if getattr(blk, n) is None else torch.from_numpy(getattr(blk, n)).to(device)
                          for n in blk.NAMES}
                target = target_at(arrays, cache.temperatures, temperature, cache.plan.sample_spec.proposal_temperature)
                best = torch.where(torch.isfinite(target.logp), target.logp, -torch.inf).argmax(-1, keepdim=True)
                t_top1 = target.ids.gather(-1, best).squeeze(-1)
            else:
                ids = torch.from_numpy(blk.ids).to(device)
                lp = torch.from_numpy(blk.logprobs).to(device)
                target = SparseTarget(ids=ids, logits=lp, tail_lse=torch.from_numpy(blk.tail_lse[..., ti]).to(device))
                t_top1 = ids.gather(-1, lp.argmax(-1, keepdim=True)).squeeze(-1)
            parts = distill_loss(logits, labels, [target], cfg)
            sums[t][0] += float(parts.kd_sum)
            sums[t][1] += int(((s_top1 == t_top1) & mask).sum())
            sums[t][2] += int(mask.sum())
    return {
        "cache": str(cache.path), "split": split, "windows": n, "temperature": temperature,
        "kl_kind": "full" if cache.mode == "full" else f"top-{cache.k} + tail bucket" if cache.mode == "topk"
        else f"unbiased estimate from a {cache.plan.storage_kind} cache",
        "teachers": {t: {"kl": s[0] / max(s[2], 1), "top1_agreement": s[1] / max(s[2], 1), "positions": s[2]}
                     for t, s in sums.items()},
    }
