"""Minimal pairs: sentence scores and BLiMP-style minimal-pair accuracy.

* `sentence_logprobs` — log P(sentence | prefix) summed over the sentence's tokens, the way the BabyLM
  evaluation scores BLiMP: the context is a begin-of-text token (or a text, or nothing) and is not scored.
* `pair_files`, `read_pairs` — the BLiMP-format .jsonl files of a path and their records; `choose_pairs` — the
  seeded choice of at most `max_pairs` a file; `pair_set_name`, `pair_files_fingerprint` — what names a result.
* `minimal_pair_accuracy` — a pair counts as correct when the good sentence scores strictly higher than the bad.

Library code: no printing beyond tqdm progress bars; bad input raises `CachekdError`.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from cachekd.errors import CachekdError, ConfigFieldError
from cachekd.models import max_positions, output_size
from cachekd.rundir import minimal_pairs_key

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
    vocab = output_size(model)
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
        raise ConfigFieldError("max_pairs", "at least 1", max_pairs)
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
        by_file[f.stem] = _file_result(f.stem, recs, len(all_records[i]), scores[pos:pos + 2 * len(recs)])
        pos += 2 * len(recs)
    by_group = _group_results(by_file)
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


def _file_result(stem: str, records: list[dict[str, Any]], num_pairs_in_file: int,
                 scores: Sequence[float]) -> dict[str, Any]:
    """One file's entry of `minimal_pair_accuracy`'s ``by_file`` from its scored records' sentence scores
    (good, bad, good, bad, ... in record order)."""
    good = np.array(scores[0::2])
    bad = np.array(scores[1::2])
    correct = int((good > bad).sum())
    return {
        "accuracy": correct / len(records),
        "num_pairs": len(records),
        "num_pairs_in_file": num_pairs_in_file,
        "num_correct": correct,
        "group": _most_common(str(r["field"]) for r in records if r.get("field")) or stem,
        "linguistics_term": _most_common(str(r["linguistics_term"]) for r in records if r.get("linguistics_term")),
        "mean_logprob_good": float(good.mean()),
        "mean_logprob_bad": float(bad.mean()),
    }


def _group_results(by_file: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The files' results gathered by group: accuracy (mean over its files), files, num_files, num_pairs,
    num_correct."""
    by_group: dict[str, dict[str, Any]] = {}
    for stem, r in by_file.items():
        g = by_group.setdefault(r["group"], {"files": [], "num_pairs": 0, "num_correct": 0})
        g["files"].append(stem)
        g["num_pairs"] += r["num_pairs"]
        g["num_correct"] += r["num_correct"]
    for g in by_group.values():
        g["accuracy"] = float(np.mean([by_file[s]["accuracy"] for s in g["files"]]))
        g["num_files"] = len(g["files"])
    return by_group


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
