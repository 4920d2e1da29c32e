"""`cachekd verify`: every chunk present, readable and finite, ids valid, fingerprints matching; optional recompute."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cachekd.cache.reader import LogitCache
from cachekd.errors import CachekdError


def verify_cache(path: str | Path, *, store_path: str | Path | None = None, recompute: int = 0, seed: int = 0,
                 progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from cachekd.tokens import TokenStore

    cache = LogitCache.open(path, allow_incomplete=True)
    problems: list[str] = []
    if not cache.complete:
        problems.append("the cache is incomplete (no manifest); run the same precompute command again")
    sp = Path(store_path) if store_path else Path(cache.meta["token_store"]["path"])
    store = None
    if sp.exists():
        store = TokenStore.open(sp)
        try:
            cache.check_store(store)
        except CachekdError as e:
            problems.append(str(e))
    else:
        problems.append(f"the token store {str(sp)!r} recorded in the cache is not there to check against (pass --store)")
    V, checked = cache.vocab_size, 0
    total = sum(cache.num_chunks(s) for s in cache.splits())
    with tqdm(total=total, desc="verify", unit="chunk", disable=not progress) as bar:
        for split in cache.splits():
            done = set(cache.done_chunks(split))
            for c in range(cache.num_chunks(split)):
                bar.update(1)
                if c not in done:
                    problems.append(f"{split} chunk {c} is not done")
                    continue
                try:
                    blocks = cache.read_chunk(split, c)
                except Exception as e:  # noqa: BLE001 - a corrupt chunk raises codec-specific errors
                    problems.append(f"{split} chunk {c} cannot be read ({type(e).__name__}); it may be corrupt")
                    continue
                for t, b in blocks.items():
                    where = f"{split} chunk {c}, teacher {t!r}"
                    if b.logits is not None:
                        if not np.isfinite(b.logits).all():
                            problems.append(f"{where}: non-finite logits")
                        continue
                    if b.ids.min() < 0 or b.ids.max() >= V:
                        problems.append(f"{where}: token ids outside [0, {V})")
                    if b.ids.shape[-1] > 1 and not (np.diff(b.ids, axis=-1) > 0).all():
                        problems.append(f"{where}: repeated token ids within a position")
                    if np.isnan(b.tail_lse).any() or np.isposinf(b.tail_lse).any():
                        problems.append(f"{where}: NaN or +inf in tail_lse")
                    if cache.k < V and np.isneginf(b.tail_lse).any():
                        problems.append(f"{where}: tail_lse is -inf although k < V")
                checked += 1
    report: dict[str, Any] = {"cache": str(cache.path), "chunks_checked": checked, "chunks_total": total}
    if recompute:
        if store is None:
            problems.append("cannot --recompute without the token store")
        else:
            report["recompute"] = recompute_windows(cache, store, recompute, seed)
    report["problems"] = problems
    report["ok"] = not problems
    return report


def recompute_windows(cache: LogitCache, store, n: int, seed: int) -> dict[str, Any]:
    """Re-run each teacher (float32, CPU) on n random train windows; largest differences to the cache."""
    import torch

    from cachekd.models import checkpoint_fingerprint, load_model
    from cachekd.precompute import teacher_targets

    split = "train" if "train" in cache.splits() else cache.splits()[0]
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(cache.num_windows(split), size=min(n, cache.num_windows(split)), replace=False))
    out: dict[str, Any] = {"split": split, "windows": len(rows)}
    for info in cache.meta["teachers"]:
        path = Path(info["path"])
        if not path.exists():
            raise CachekdError(f"teacher {info['name']!r} is no longer at {str(path)!r}; cannot recompute.")
        if checkpoint_fingerprint(path) != info["fingerprint"]:
            raise CachekdError(f"teacher {info['name']!r} at {str(path)!r} changed since the cache was built.")
        model = load_model(path).eval()
        x = torch.from_numpy(np.stack([store.read(split, r, r + 1)[0] for r in rows]).astype(np.int64))
        with torch.inference_mode():
            logits = model(input_ids=x).logits
        blocks = [cache.read(split, int(r), int(r) + 1, [info["name"]])[info["name"]] for r in rows]
        if cache.mode == "full":
            fresh, _ = teacher_targets(logits, cache.vocab_size, None, [])
            got = np.concatenate([b.logits for b in blocks]).astype(np.float32)
            out[info["name"]] = {"max_abs_logit_diff": float(np.abs(got - fresh["logits"].float().numpy()).max())}
            continue
        fresh, _ = teacher_targets(logits, cache.vocab_size, cache.k, cache.temperatures)
        ids = np.concatenate([b.ids for b in blocks])
        lp = np.concatenate([b.logprobs for b in blocks])
        tail = np.concatenate([b.tail_lse for b in blocks])
        full_lp = torch.log_softmax(logits[..., : cache.vocab_size].float(), -1).numpy()
        lp_true = np.take_along_axis(full_lp, ids, axis=-1)
        fresh_sorted = np.sort(fresh["ids"].numpy(), axis=-1)
        keep = lp_true > -60  # below this the fixed-point encoding clips by design
        out[info["name"]] = {
            "max_abs_logprob_diff": float(np.abs(lp - lp_true)[keep].max()) if keep.any() else 0.0,
            "topk_id_agreement": float((fresh_sorted == ids).mean()),
            "max_abs_tail_lse_diff": float(np.nanmax(np.abs(np.where(np.isinf(tail), 0, tail - fresh["tail_lse"].numpy())))),
        }
    return out
