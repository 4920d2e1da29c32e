"""Evaluation: dev-set perplexity from a token store, BLiMP-style minimal-pair accuracy (`cachekd.minimal_pairs`)
and agreement with a logit cache's teachers.

* `dev_loss` — mean next-token cross-entropy (nats) over every prediction of every window of a split: a window
  of L tokens gives L−1 predictions (labels = window[1:]), so windows never see across their edges and the number
  matches what the trainer logs.
* `agreement_with_cache` — mean KL(teacher ‖ student) and top-1 agreement with each teacher of a logit cache.
* `evaluate` — loads a checkpoint (or a run directory's `model/`), runs what was asked, returns one dict; the
  CLI prints it and saves it as ``RUN/eval.json``.

Library code: no printing beyond tqdm progress bars; bad input raises `CachekdError`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cachekd import __version__
from cachekd.errors import CachekdError, ConfigFieldError, ConfigKeysError
from cachekd.dev_loss import dev_loss, open_store  # noqa: F401  (dev_loss: also this module's public API)
from cachekd.minimal_pairs import minimal_pair_accuracy, pair_files
from cachekd.models import check_positions
from cachekd.rundir import RunDir, loss_key
from cachekd.teachers import has_tokenizer, tokenizer_fingerprint_of
from cachekd.tokens import TokenStore

# ------------------------------------------------------------------------------------------------ helpers


def _config_vocab_size(model_dir: Path) -> int | None:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    v = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return int(v) if isinstance(v, int) else None


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

    store = open_store(store)
    if isinstance(model_dir_or_tokenizer, (str, Path)):
        model_dir = resolve_model_dir(model_dir_or_tokenizer)
        where = f"the model {str(model_dir)!r}"
        fp = tokenizer_fingerprint_of(model_dir)
        vocab = model_vocab_size if model_vocab_size is not None else _config_vocab_size(model_dir)
    else:
        model_dir, where = None, "the given tokenizer"
        fp, vocab = tokenizer_fingerprint(model_dir_or_tokenizer), model_vocab_size
    from cachekd.tokens.reader import PREPARE_WITH_TOKENIZER

    hint = f" ({PREPARE_WITH_TOKENIZER.format(path=model_dir)})" if model_dir is not None else ""
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
    if dev_store is None and minimal_pairs is None and against_cache is None:
        raise ConfigKeysError("nothing to evaluate: pass a token store ({dev_store}) and/or minimal pairs "
                              "({minimal_pairs}).")
    t0 = time.perf_counter()
    model_dir, store = _check_request(model_path, dev_store, minimal_pairs, max_pairs)
    model, tokenizer = _load_model_and_tokenizer(model_dir, store)
    result = _model_facts(model_path, model_dir, model, device)
    if store is not None:
        entry = _dev_loss_entry(model, store, split=split, batch_size=batch_size, device=device,
                                max_windows=max_windows, progress=progress)
        result["losses"] = {entry["key"]: entry}
        if entry["key"] == "dev":
            result["dev"] = entry
    if against_cache is not None:
        from cachekd.cache.reader import LogitCache

        cache = LogitCache.open(against_cache)
        cstore = store if store is not None else _store_of_cache(cache)
        check_tokenizer_matches(model_dir, cstore)
        result["against_cache"] = agreement_with_cache(model, cache, cstore, split=split, batch_size=batch_size,
                                                       device=device, max_windows=max_windows, progress=progress)
    if minimal_pairs is not None:
        if tokenizer is None:
            raise ConfigKeysError("the checkpoint {model!r} has no tokenizer to score sentences with; pass the token "
                                  "store it was trained on with {dev_store}, or save the tokenizer next to the model.",
                                  model=str(model_dir))
        result["minimal_pairs"] = minimal_pair_accuracy(model, tokenizer, minimal_pairs, prefix=prefix,
                                                        batch_size=batch_size, device=device, progress=progress,
                                                        max_pairs=max_pairs, seed=pair_seed)
    result["wall_s"] = time.perf_counter() - t0
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["cachekd_version"] = __version__
    return result


def _check_request(model_path: str | Path, dev_store: TokenStore | str | Path | None,
                   minimal_pairs: str | Path | None, max_pairs: int | None) -> tuple[Path, TokenStore | None]:
    """The checkpoint directory and the opened dev store (or None), after refusing what would fail later: a bad
    pair path or `max_pairs`, a store built with another tokenizer than the model's (all before loading it)."""
    from cachekd.models import resolve_model_dir

    model_dir = resolve_model_dir(model_path)
    store = open_store(dev_store) if dev_store is not None else None
    if minimal_pairs is not None:
        pair_files(minimal_pairs)  # fail on a bad path before loading the model
        if max_pairs is not None and max_pairs < 1:
            raise ConfigFieldError("max_pairs", "at least 1", max_pairs)
    if store is not None:
        check_tokenizer_matches(model_dir, store)
    return model_dir, store


def _load_model_and_tokenizer(model_dir: Path, store: TokenStore | None):
    """The model, and the tokenizer saved with it, else the store's, else None."""
    from cachekd.corpus import load_tokenizer
    from cachekd.models import load_model

    model = load_model(model_dir)
    if has_tokenizer(model_dir):
        tokenizer = load_tokenizer(model_dir)
    elif store is not None:
        tokenizer = store.load_tokenizer()
    else:
        tokenizer = None
    return model, tokenizer


def _model_facts(model_path: str | Path, model_dir: Path, model, device: str | torch.device) -> dict[str, Any]:
    """The head of `evaluate`'s result: which model (and run directory), its size and fingerprint, the device."""
    from cachekd.models import checkpoint_fingerprint, count_parameters

    run_dir = RunDir.of_model_path(model_path)
    return {
        "model": str(model_dir),
        "run_dir": str(run_dir.path) if run_dir is not None else None,
        "num_params": count_parameters(model),
        "checkpoint_fingerprint": checkpoint_fingerprint(model_dir),
        "device": str(device),
    }


def _dev_loss_entry(model, store: TokenStore, *, split: str, batch_size: int, device: str | torch.device,
                    max_windows: int | None, progress: bool) -> dict[str, Any]:
    """`dev_loss` on `store`'s `split` with what names it: the store, its fingerprint, whether it covers the whole
    split, and its `loss_key`."""
    d = dev_loss(model, store, split=split, batch_size=batch_size, device=device, max_windows=max_windows,
                 progress=progress)
    entry = {"store": str(store.path), "split": split, "store_fingerprint": store.fingerprint,
             "max_windows": max_windows, **d, "split_windows": store.num_windows(split),
             "complete": d["num_windows"] == store.num_windows(split)}
    entry["key"] = loss_key(entry)
    return entry


def _store_of_cache(cache) -> TokenStore:
    """The token store a cache was built from, where its plan recorded it; refused when it is not there any more."""
    recorded = cache.meta["token_store"]["path"]
    if not Path(recorded).exists():
        raise ConfigKeysError("the token store this cache was built from ({recorded!r}) is not there any more; pass "
                              "its new location with {dev_store} STORE.", recorded=recorded)
    return open_store(recorded)




@torch.no_grad()
def agreement_with_cache(model, cache, store: TokenStore, *, split: str = "dev", temperature: float = 1.0,
                         batch_size: int = 32, device: str | torch.device = "cpu", max_windows: int | None = None,
                         progress: bool = True) -> dict[str, Any]:
    """Per teacher of `cache`: mean KL(p_teacher ‖ q_student) per position at `temperature` and the share of positions
    where the student's top-1 token is the teacher's. A top-k cache gives the exact KL of the (top-k, tail)
    coarse-grained distributions (`bucket`), which is a lower bound of the full KL; a full or factored cache gives
    the full KL;
    a sampled cache an unbiased estimate of the full KL (its top-1 is the most probable stored id).
    Positions are those with a next token inside the window (as in training)."""
    from tqdm.auto import tqdm

    from cachekd.factored import block_logits
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
            if blk.logits is not None or blk.hidden is not None:  # full, or factored: every logit
                z = (torch.from_numpy(blk.logits).to(device).float() if blk.logits is not None
                     else block_logits(cache, t, blk, device=device))
                target, t_top1 = DenseTarget(z), z.argmax(-1)
            elif blk.sample_ids is not None:  # the unbiased estimate of the KL (a divergence: H_τ is exact)
                from cachekd.teacher_samples import target_at

                arrays = {n: None if getattr(blk, n) is None else torch.from_numpy(getattr(blk, n)).to(device)
                          for n in blk.NAMES}
                target = target_at(arrays, cache.temperatures, temperature, cache.plan.sample_spec.proposal_temperature,
                                   rounding=cache.plan.rounding, vocab_size=cache.vocab_size)
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
        "kl_kind": "full" if cache.mode in ("full", "factored") else f"top-{cache.k} + tail bucket" if cache.mode == "topk"
        else f"unbiased estimate from a {cache.plan.storage_kind} cache",
        "teachers": {t: {"kl": s[0] / max(s[2], 1), "top1_agreement": s[1] / max(s[2], 1), "positions": s[2]}
                     for t, s in sums.items()},
    }
