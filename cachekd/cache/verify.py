"""`cachekd verify`: every chunk present, readable (checksums match) and finite, ids valid, fingerprints matching;
optional recompute; `--repair` marks the damaged chunks for recomputation by the same precompute command."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import numpy as np

from cachekd.cache import format as fmt
from cachekd.cache.reader import FINISH_HINT, REPAIR_HINT, DamagedChunkError, LogitCache
from cachekd.errors import CachekdError


def verify_cache(path: str | Path, *, store_path: str | Path | None = None, recompute: int = 0, seed: int = 0,
                 repair: bool = False, progress: bool = True) -> dict[str, Any]:
    """Check every chunk of a cache. Returns a report: `problems` (sentences), `damaged_chunks` ({split: [chunk]}:
    unreadable, checksum mismatch, non-finite, ids out of range or repeated, bad tail_lse), `ok`, and with
    `repair` the chunks whose done-markers were removed (with manifest.json) so precompute recomputes them."""
    from tqdm.auto import tqdm

    from cachekd.tokens import TokenStore

    cache = LogitCache.open(path, allow_incomplete=True)
    problems: list[str] = []
    hint = "" if repair else "; " + REPAIR_HINT.format(path=cache.path)
    if not cache.complete:
        problems.append(f"the cache is incomplete ({cache.describe_missing()}); {FINISH_HINT}")
    sp = Path(store_path) if store_path else Path(cache.plan.token_store.path)
    store, store_problem = None, None
    if sp.exists():
        store = TokenStore.open(sp)
        try:
            cache.check_store(store)
        except CachekdError as e:
            store_problem = str(e)
    else:
        store_problem = (f"the token store {str(sp)!r} recorded in the cache is not there to check against "
                         f"(pass --store)")
    if store_problem:
        problems.append(store_problem)
    V, checked = cache.vocab_size, 0
    total = sum(cache.num_chunks(s) for s in cache.splits())
    damaged: dict[tuple[str, int], list[str]] = {}
    unopenable: dict[str, str] = {}  # split/teacher -> why its arrays cannot be opened (reported once)
    with tqdm(total=total, desc="verify", unit="chunk", disable=not progress) as bar:
        for split in cache.splits():
            done = set(cache.done_chunks(split))
            for c in range(cache.num_chunks(split)):
                bar.update(1)
                if c not in done:
                    problems.append(f"{split} chunk {c} is not done")
                    continue
                found: list[str] = []
                for t in cache.teachers:
                    where = f"{split} chunk {c}, teacher {t!r}"
                    if f"{split}/{t}" in unopenable:
                        continue
                    try:
                        b = cache.read_chunk(split, c, [t])[t]
                    except DamagedChunkError as e:
                        found.append(f"{where}: the {e.array} data cannot be read ({e.reason})")
                        continue
                    except CachekdError as e:  # an array's zarr.json: not a chunk that precompute can redo
                        unopenable[f"{split}/{t}"] = str(e)
                        continue
                    if b.logits is not None:
                        if not np.isfinite(b.logits).all():
                            found.append(f"{where}: non-finite logits")
                        continue
                    if b.ids.min() < 0 or b.ids.max() >= V:
                        found.append(f"{where}: token ids outside [0, {V})")
                    if b.ids.shape[-1] > 1 and not (np.diff(b.ids, axis=-1) > 0).all():
                        found.append(f"{where}: repeated token ids within a position")
                    if np.isnan(b.tail_lse).any() or np.isposinf(b.tail_lse).any():
                        found.append(f"{where}: NaN or +inf in tail_lse")
                    if cache.k < V and np.isneginf(b.tail_lse).any():
                        found.append(f"{where}: tail_lse is -inf although k < V")
                if found:
                    damaged[(split, c)] = found
                    problems.extend(f + hint for f in found)
                checked += 1
    problems.extend(unopenable.values())
    report: dict[str, Any] = {"cache": str(cache.path), "chunks_checked": checked, "chunks_total": total,
                              "checksums": cache.has_checksums()}
    if recompute:
        if store is None:
            problems.append("cannot --recompute without the token store")
        else:
            report["recompute"] = recompute_windows(cache, store, recompute, seed)
    report["damaged_chunks"] = _by_split(damaged)
    if repair:
        report["repair"] = repair_chunks(cache, sorted(damaged), store_problem, store_path=sp)
    report["problems"] = problems
    report["ok"] = not problems
    return report


def _by_split(chunks) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for split, c in sorted(chunks):
        out.setdefault(split, []).append(c)
    return out


def repair_chunks(cache: LogitCache, chunks: list[tuple[str, int]], store_problem: str | None,
                  store_path: Path | None = None) -> dict[str, Any]:
    """Remove the done-markers of damaged `chunks` and manifest.json, so that re-running precompute with the same
    arguments recomputes exactly those chunks. Refused (nothing changed) when precompute could not run: a teacher
    checkpoint or the token store is missing or changed."""
    from cachekd.cache import writer as cw
    from cachekd.models import checkpoint_fingerprint

    if not chunks:
        return {"marked_for_recompute": {}, "next": "nothing to repair"}
    blockers = []
    if store_problem:
        blockers.append(store_problem)
    for t in cache.plan.teachers:
        p = Path(t["path"])
        if not p.exists():
            blockers.append(f"teacher {t['name']!r} is no longer at {str(p)!r}")
        elif checkpoint_fingerprint(p) != t["fingerprint"]:
            blockers.append(f"teacher {t['name']!r} at {str(p)!r} changed since the cache was built")
    if blockers:
        return {"marked_for_recompute": {}, "refused": (
            "; ".join(blockers) + ", so precompute could not recompute the damaged chunks; nothing was changed: "
            "restore the teacher checkpoints and the token store the cache was built from, then run "
            f"`cachekd verify {cache.path} --repair` again")}
    removed = cw.mark_for_recompute(cache.path, chunks)
    return {"marked_for_recompute": _by_split(removed),
            "next": (f"re-run `cachekd precompute` with the same arguments as the run that built {str(cache.path)!r}; "
                     f"it recomputes only these {len(removed)} chunk(s), then `cachekd verify {cache.path}`"),
            "command": precompute_command(cache, store_path)}


def precompute_command(cache: LogitCache, store_path: Path | None = None) -> str:
    """The precompute command line that recreates this cache's plan (its identity: store, teachers by name and
    path, k or --full, temperatures, splits, logprob step). `store_path`: where the token store is now (verify
    --store), when it moved; the cache matches a store by fingerprint, not by path."""
    plan = cache.plan
    q = shlex.quote
    args = ["cachekd", "precompute", "--store", q(str(store_path or plan.token_store.path))]
    for t in plan.teachers:
        args += ["--teacher", q(f"{t['name']}={t['path']}")]
    args += ["-o", q(str(cache.path))]
    if plan.mode == "full":
        args.append("--full")
    else:
        args += ["--top-k", str(plan.k)]
        temps = [f"{t:g}" if float(f"{t:g}") == t else repr(float(t)) for t in plan.temperatures]
        args += ["--temperatures", ",".join(temps)]
    args += ["--splits", ",".join(plan.splits)]
    scale = plan.logprob_scale
    if scale != fmt.LOGPROB_SCALE:
        args += ["--logprob-step", repr(1.0 / scale)]
    return " ".join(args)


def recompute_windows(cache: LogitCache, store, n: int, seed: int) -> dict[str, Any]:
    """Re-run each teacher (float32, CPU) on n random train windows; largest differences to the cache. A teacher
    that cannot be loaded (deleted, changed) or whose windows cannot be read is reported as skipped, with why."""
    import torch

    from cachekd.models import checkpoint_fingerprint, load_model
    from cachekd.teacher_rows import teacher_targets

    split = "train" if "train" in cache.splits() else cache.splits()[0]
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(cache.num_windows(split), size=min(n, cache.num_windows(split)), replace=False))
    out: dict[str, Any] = {"split": split, "windows": len(rows)}
    for info in cache.plan.teachers:
        path = Path(info["path"])
        try:
            if not path.exists():
                raise CachekdError(f"teacher {info['name']!r} is no longer at {str(path)!r}")
            if checkpoint_fingerprint(path) != info["fingerprint"]:
                raise CachekdError(f"teacher {info['name']!r} at {str(path)!r} changed since the cache was built")
            model = load_model(path).eval()
            blocks = [cache.read(split, int(r), int(r) + 1, [info["name"]])[info["name"]] for r in rows]
        except CachekdError as e:
            out[info["name"]] = {"skipped": str(e).rstrip(".")}
            continue
        x = torch.from_numpy(np.stack([store.read(split, r, r + 1)[0] for r in rows]).astype(np.int64))
        with torch.inference_mode():
            logits = model(input_ids=x).logits
        if cache.mode == "full":
            # against the fp32 logits, so the figure includes the fp16 storage rounding (not fp16 vs fp16)
            fresh = logits[..., : cache.vocab_size].float().numpy()
            got = np.concatenate([b.logits for b in blocks]).astype(np.float32)
            out[info["name"]] = {"max_abs_logit_diff": float(np.abs(got - fresh).max())}
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
