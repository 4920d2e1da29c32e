"""`cachekd verify`: every chunk present, readable (checksums match) and finite, ids valid, fingerprints matching;
optional recompute; `--repair` marks the damaged chunks for recomputation by the same precompute command."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import numpy as np

from cachekd.cache import encoding as enc
from cachekd.cache import format as fmt
from cachekd.cache.reader import (FINISH_HINT, PRECOMPUTE_AGAIN, REPAIR_COMMAND, REPAIR_HINT, DamagedChunkError,
                                  LogitCache)
from cachekd.errors import CachekdError, ConfigKeysError, Label, keyed_sentence
from cachekd.storage import location


def verify_path(path: str | Path, *, store_path: str | Path | None = None, recompute: int = 0, seed: int = 0,
                repair: bool = False, progress: bool = True, label: Label | None = None) -> dict[str, Any]:
    """`cachekd verify PATH`: a token store is checked on its own (`TokenStore.verify`), a cache with its store.
    `label`: the names a front end gives the parameters (a command-line option's) in the report's sentences."""
    from cachekd.tokens import TokenStore, is_token_store

    if is_token_store(path):
        if recompute or repair or store_path:
            raise ConfigKeysError("{path!r} is a token store: {recompute}, {repair} and {store_path} apply to a "
                                  "logit cache; verify the store without them.", path=str(path))
        return {"kind": "token store", **TokenStore.open(path).verify(progress=progress)}
    return verify_cache(path, store_path=store_path, recompute=recompute, seed=seed, repair=repair, progress=progress,
                        label=label)


def verify_cache(path: str | Path, *, store_path: str | Path | None = None, recompute: int = 0, seed: int = 0,
                 repair: bool = False, progress: bool = True, label: Label | None = None) -> dict[str, Any]:
    """Check every chunk of a cache and the token store behind it. Returns a report: `problems` (sentences),
    `damaged_chunks` ({split: [chunk]}: unreadable, checksum mismatch, misplaced or stale, computed from other
    tokens, non-finite, ids out of range or repeated, bad tail_lse), `store` (the store's own check), `ok`, and
    with `repair` the chunks whose done-markers were removed (with manifest.json) so precompute recomputes them."""
    from tqdm.auto import tqdm

    cache = LogitCache.open(path, allow_incomplete=True)
    problems: list[str] = []
    hint = "" if repair else "; " + REPAIR_HINT.format(path=cache.path)
    if not cache.complete:
        problems.append(f"the cache is incomplete ({cache.describe_missing()}); {FINISH_HINT}")
    sp = location(store_path) if store_path else location(cache.plan.token_store.path)
    store, store_problem, store_report = _check_store(cache, sp, progress, label)
    if store_problem:
        problems.append(store_problem)
    checked, total = 0, sum(cache.num_chunks(s) for s in cache.splits())
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
                found = _check_chunk(cache, split, c, None if store_problem else store, unopenable)
                if found:
                    damaged[(split, c)] = found
                    problems.extend(f + hint for f in found)
                checked += 1
    problems.extend(unopenable.values())
    factors_problem = _factors_problem(cache) if cache.mode == "factored" else None
    if factors_problem:
        problems.append(factors_problem + hint)
    report: dict[str, Any] = {"kind": "logit cache", "cache": str(cache.path), "chunks_checked": checked,
                              "chunks_total": total, "checksums": cache.has_checksums(), "store": store_report}
    if recompute:
        if store is None:
            problems.append(keyed_sentence("cannot {recompute} without the token store", label))
        else:
            report["recompute"] = recompute_windows(cache, store, recompute, seed)
            problems.extend(_beyond_tolerance(report["recompute"]))
            # a requested check that did not run is not a pass
            problems.extend(keyed_sentence("{recompute} could not check teacher {name!r}: {why}", label, name=name,
                                           why=r["skipped"])
                            for name, r in report["recompute"].items() if isinstance(r, dict) and "skipped" in r)
    report["damaged_chunks"] = _by_split(damaged)
    if repair:
        chunks = sorted(damaged)
        if factors_problem and _factors_lost(cache):
            # the scales (or the basis) every chunk was stored with are lost: every chunk is recomputed
            chunks = [(s, c) for s in cache.splits() for c in cache.done_chunks(s)]
        report["repair"] = repair_chunks(cache, chunks, store_problem, store_path=sp,
                                         factors_damaged=bool(factors_problem))
    report["problems"] = problems
    report["ok"] = not problems
    return report


def _check_store(cache: LogitCache, sp: Path, progress: bool, label: Label | None):
    """(store or None, the problem that keeps precompute from recomputing chunks or None, the store's report)."""
    from cachekd.tokens import TokenStore

    if not sp.exists():
        return None, keyed_sentence("the token store {sp!r} recorded in the cache is not there to check against "
                                    "(pass {store_path})", label, sp=str(sp)), None
    try:
        store = TokenStore.open(sp)
        cache.check_store(store)
    except CachekdError as e:
        return None, str(e).rstrip("."), None
    report = store.verify(progress=progress)
    return store, "; ".join(report["problems"]) or None, report


def _check_chunk(cache: LogitCache, split: str, c: int, store, unopenable: dict[str, str]) -> list[str]:
    """What is wrong with one done chunk (every teacher): unreadable, misplaced or stale, computed from other
    token ids than `store` holds (when given), or values no teacher can produce."""
    found: list[str] = []
    V = cache.vocab_size
    if store is not None:
        try:
            cache.check_tokens(split, c, store.read_chunk(split, c))
        except DamagedChunkError:
            found.append(f"{split} chunk {c}: computed from other token ids than the store holds for it (a "
                         f"misplaced or stale chunk)")
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
        if b.hidden is not None:
            found.extend(f"{where}: {p}" for p in _factored_problems(cache, b))
            continue
        if b.sample_ids is not None:
            found.extend(f"{where}: {p}" for p in _sampled_problems(cache, b))
            if b.ids is None:
                continue
        if b.ids.min() < 0 or b.ids.max() >= V:
            found.append(f"{where}: token ids outside [0, {V})")
        if b.ids.shape[-1] > 1 and not (np.diff(b.ids, axis=-1) > 0).all():
            found.append(f"{where}: repeated token ids within a position")
        if np.isnan(b.tail_lse).any() or np.isposinf(b.tail_lse).any():
            found.append(f"{where}: NaN or +inf in tail_lse")
        if cache.k < V and np.isneginf(b.tail_lse).any():
            found.append(f"{where}: tail_lse is -inf although k < V")
    return found


def _factored_problems(cache: LogitCache, b) -> list[str]:
    """What no factored chunk can hold: int8 codes outside [-127, 127], scales that are not positive finite
    numbers, non-finite 16-bit values."""
    out = []
    if cache.plan.factored_dtype == "int8":
        if (b.hidden == -128).any():
            out.append("int8 codes outside [-127, 127]")
        if not (np.isfinite(b.hidden_scale).all() and (b.hidden_scale > 0).all()):
            out.append("hidden_scale values that are not positive finite numbers")
    else:
        from cachekd.cache.encoding import decode_hidden
        import torch

        if not torch.isfinite(decode_hidden(torch.from_numpy(b.hidden), None, cache.plan.factored_dtype)).all():
            out.append("non-finite hidden values")
    return out


def _factors_lost(cache: LogitCache) -> bool:
    """Damaged factors that precompute cannot write again for the chunks as stored: the marker with the scales is
    gone, or the compressed form's basis (fitted once) is among them."""
    return (cache.plan.factored_rank is not None
            or fmt.read_done_marker(fmt.factors_done_path(cache.path)) is None)


def _factors_problem(cache: LogitCache) -> str | None:
    """What is wrong with a factored cache's output layers (None: nothing): unreadable or not what was written (the
    CRC-32Cs of done/factors.json), non-finite, or per-dimension scales that are not positive powers of two."""
    try:
        for t in cache.teachers:
            f = cache.factors(t)
            if not all(np.isfinite(v).all() for v in f.values()):
                return f"the output layer (factors) of teacher {t!r} holds non-finite values"
            if not (np.frexp(f["dim_scale"])[0] == 0.5).all() or not (f["dim_scale"] > 0).all():
                return f"the per-dimension scales (factors) of teacher {t!r} are not positive powers of two"
    except CachekdError as e:
        return str(e).split(";")[0]
    return None


def _sampled_problems(cache: LogitCache, b) -> list[str]:
    """What no sampled cache can hold: ids out of range or not sorted distinct, counts that do not sum to N per
    proposal, drawn ids inside the exact top-k, non-finite normalisers or entropies, and importance weights that
    do not fit the normalisers (the drawn ids' mass at τ beyond the top-k above 1: Σ_drawn exp(ℓ/τ − tail_lse)
    ≤ 1, which every weight relies on)."""
    out = []
    V, spec = cache.vocab_size, cache.plan.sample_spec
    counts = b.sample_counts
    real = counts.sum(-1) > 0
    if b.sample_ids.min() < 0 or b.sample_ids.max() >= V:
        out.append(f"drawn token ids outside [0, {V})")
    if not (counts.sum(-2) == spec.num_draws).all():
        out.append(f"draw counts that do not sum to {spec.num_draws} per position")
    if b.sample_ids.shape[-1] > 1:
        step = np.diff(b.sample_ids, axis=-1)
        if not ((step > 0) | ~real[..., 1:]).all() or (real[..., 1:] & ~real[..., :-1]).any():
            out.append("drawn ids not sorted and distinct, or padding before a drawn id")
    if b.ids is not None and (b.ids[..., :, None] == np.where(real, b.sample_ids, -1)[..., None, :]).any():
        out.append("drawn ids inside the exact top-k")
    for name in ("tail_lse", "entropy"):
        if not np.isfinite(getattr(b, name)).all():
            out.append(f"non-finite {name}")
    if np.isfinite(b.tail_lse).all():
        from cachekd.losses.sampled import share_rounding

        for ti, tau in enumerate(cache.temperatures):
            lp = np.where(real, b.sample_logprobs / tau - b.tail_lse[..., ti:ti + 1], -np.inf)
            log_mass = np.logaddexp.reduce(lp.astype(np.float64), axis=-1)
            # the rounding of ℓ and tail_lse allows a share up to e^ε (the losses bound the rest by the same ε)
            if (log_mass > share_rounding(cache.plan.rounding, tau) + 1e-6).any():
                out.append(f"drawn ids with more mass at τ={tau:g} than the normaliser and the stored rounding "
                           f"allow (weights would be wrong)")
    return out


def _beyond_tolerance(recompute: dict[str, Any]) -> list[str]:
    """A sentence for each teacher whose recomputed outputs differ from the cache beyond its tolerance."""
    out = []
    for name, r in recompute.items():
        if not isinstance(r, dict) or r.get("within_tolerance", True):
            continue
        what, diff = next((k, v) for k, v in r.items() if k.startswith("max_abs_") and v > r["tolerance"][k])
        out.append(
            f"teacher {name!r} recomputed on {recompute['windows']} {recompute['split']} windows differs from the "
            f"cache by up to {diff:.4g} ({what.removeprefix('max_abs_').replace('_', ' ')}, window "
            f"{r['worst_window']}), beyond the tolerance of {r['tolerance'][what]:.4g}: the cache does not hold what "
            f"its teacher computes; precompute it again ({PRECOMPUTE_AGAIN})"
        )
    return out


def _by_split(chunks) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for split, c in sorted(chunks):
        out.setdefault(split, []).append(c)
    return out


def repair_chunks(cache: LogitCache, chunks: list[tuple[str, int]], store_problem: str | None,
                  store_path: Path | None = None, factors_damaged: bool = False) -> dict[str, Any]:
    """Remove the done-markers of damaged `chunks` and manifest.json, so that re-running precompute with the same
    arguments recomputes exactly those chunks. Refused (nothing changed) when precompute could not run: a teacher
    checkpoint or the token store is missing or changed. `factors_damaged`: a factored cache's output layers are
    damaged; precompute writes them again from the teachers (with the scales done/factors.json recorded, or, when
    that is lost too, new ones: then `chunks` are all of them and the marker is removed)."""
    from cachekd.cache import writer as cw
    from cachekd.ensemble import teacher_problem

    if not chunks and cache.manifest_problem is None and not factors_damaged:
        return {"marked_for_recompute": {}, "next": "nothing to repair"}
    blockers = []
    if store_problem:
        blockers.append(store_problem)
    for t in cache.plan.teachers:
        problem = teacher_problem(t)
        if problem:
            blockers.append(problem)
    if blockers:
        return {"marked_for_recompute": {}, "refused": (
            "; ".join(blockers) + ", so precompute could not recompute the damaged chunks; nothing was changed: "
            "restore the teacher checkpoints and the token store the cache was built from, then run "
            f"{REPAIR_COMMAND.format(path=cache.path)} again")}
    removed = cw.mark_for_recompute(cache.path, chunks)
    if factors_damaged and _factors_lost(cache):
        fmt.factors_done_path(cache.path).unlink(missing_ok=True)
    return {"marked_for_recompute": _by_split(removed),
            "removed_damaged_manifest": cache.manifest_problem is not None or factors_damaged,
            "next": (f"re-run `cachekd precompute` with the same arguments as the run that built {str(cache.path)!r}; "
                     f"it recomputes only these {len(removed)} chunk(s), then `cachekd verify {cache.path}`"),
            "command": precompute_command(cache, store_path)}


def precompute_command(cache: LogitCache, store_path: Path | None = None) -> str:
    """The precompute command line that recreates this cache's plan (its identity: store, teachers by name and
    path, k or --full, temperatures, splits, logprob step). `store_path`: where the token store is now (verify
    --store), when it moved; the cache matches a store by fingerprint, not by path."""
    from cachekd.ensemble import teacher_args

    plan = cache.plan
    q = shlex.quote
    args = ["cachekd", "precompute", "--store", q(str(store_path or plan.token_store.path))]
    for t in plan.teachers:
        args += [q(a) for a in teacher_args(t)]
    args += ["-o", q(str(cache.path))]
    if plan.mode == "full":
        args.append("--full")
    elif plan.mode == "factored":
        args.append("--factored")
        if plan.factored_dtype != "int8":
            args += ["--factored-dtype", plan.factored_dtype]
        if plan.factored_rounding == "nearest":
            args += ["--factored-rounding", "nearest"]
        if plan.factored_rank is not None:
            fit = plan.factored["fit"]
            args += ["--factored-rank", str(plan.factored_rank), "--factored-fit-windows", str(fit["windows"]),
                     "--factored-fit-seed", str(fit["seed"])]
    else:
        args += ["--top-k", str(plan.k)]
        temps = [f"{t:g}" if float(f"{t:g}") == t else repr(float(t)) for t in plan.temperatures]
        args += ["--temperatures", ",".join(temps)]
        spec = plan.sample_spec
        if spec is not None:
            args += ["--sample", str(spec.num_draws)]
            if spec.proposal_temperature is not None:
                args += ["--proposal-temperature", f"{spec.proposal_temperature:g}"]
            if spec.seed:
                args += ["--sample-seed", str(spec.seed)]
    args += ["--splits", ",".join(plan.splits)]
    scale = plan.logprob_scale
    if scale != enc.LOGPROB_SCALE:
        args += ["--logprob-step", repr(1.0 / scale)]
    return " ".join(args)


def recompute_windows(cache: LogitCache, store, n: int, seed: int) -> dict[str, Any]:
    """Re-run each teacher (float32, CPU) on n random train windows; largest differences to the cache. A teacher
    that cannot be loaded (deleted, changed) or whose windows cannot be read is reported as skipped, with why."""
    import torch

    from cachekd.ensemble import load_cached_teacher
    from cachekd.factored import capture_hidden
    from cachekd.teacher_rows import teacher_targets

    split = "train" if "train" in cache.splits() else cache.splits()[0]
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(cache.num_windows(split), size=min(n, cache.num_windows(split)), replace=False))
    out: dict[str, Any] = {"split": split, "windows": len(rows)}
    for info in cache.plan.teachers:
        try:
            model = load_cached_teacher(info, cache.vocab_size)
            blocks = [cache.read(split, int(r), int(r) + 1, [info["name"]])[info["name"]] for r in rows]
        except CachekdError as e:
            out[info["name"]] = {"skipped": str(e).rstrip(".")}
            continue
        x = torch.from_numpy(np.stack([store.read(split, r, r + 1)[0] for r in rows]).astype(np.int64))
        with torch.inference_mode(), capture_hidden(model) as got:
            logits = model(input_ids=x).logits
        allowance = _precision_allowance(cache, split, rows)
        if cache.mode == "factored":
            try:
                out[info["name"]] = _recompute_factored(cache, info["name"], logits[..., : cache.vocab_size],
                                                        got.hidden, blocks, rows, allowance)
            except CachekdError as e:  # damaged factors: reported by the checks above
                out[info["name"]] = {"skipped": str(e).split(";")[0]}
            continue
        if cache.mode == "full":
            # against the fp32 logits, so the figure includes the fp16 storage rounding (not fp16 vs fp16)
            fresh = logits[..., : cache.vocab_size].float().numpy()
            got = np.concatenate([b.logits for b in blocks]).astype(np.float32)
            diffs = {"max_abs_logit_diff": np.abs(got - fresh).reshape(len(rows), -1).max(-1)}
            # fp16 keeps 11 significant bits: half a step is |z|·2⁻¹¹
            tol = {"max_abs_logit_diff": float(np.abs(fresh).max()) * 2.0 ** -11 + allowance}
            out[info["name"]] = _within(diffs, tol, rows)
            continue
        if cache.mode == "sampled":
            out[info["name"]] = _recompute_sampled(cache, logits, blocks, rows, allowance)
            continue
        fresh, _ = teacher_targets(logits, cache.vocab_size, cache.k, cache.temperatures)
        ids = np.concatenate([b.ids for b in blocks])
        lp = np.concatenate([b.logprobs for b in blocks])
        tail = np.concatenate([b.tail_lse for b in blocks])
        full_lp = torch.log_softmax(logits[..., : cache.vocab_size].float(), -1).numpy()
        lp_true = np.take_along_axis(full_lp, ids, axis=-1)
        fresh_sorted = np.sort(fresh["ids"].numpy(), axis=-1)
        keep = lp_true > -60  # below this the fixed-point encoding clips by design
        # against the value as stored: a finite tail below the int16 range is clipped to TAIL_MIN by design
        # (precompute refuses a τ at which that clip could matter, `enc.min_temperature`)
        fresh_tail = np.maximum(fresh["tail_lse"].numpy(), enc.TAIL_MIN)
        tail_diff = np.abs(np.where(np.isinf(tail), 0, tail - fresh_tail))
        diffs = {"max_abs_logprob_diff": np.where(keep, np.abs(lp - lp_true), 0).reshape(len(rows), -1).max(-1),
                 "max_abs_tail_lse_diff": np.nan_to_num(tail_diff, nan=np.inf).reshape(len(rows), -1).max(-1)}
        storage = 0.5 / cache.plan.logprob_scale  # the fixed-point rounding of a stored log-probability
        tol = {"max_abs_logprob_diff": storage + allowance,
               "max_abs_tail_lse_diff": storage + 0.5 / enc.TAIL_SCALE + allowance}
        out[info["name"]] = _within(diffs, tol, rows) | {"topk_id_agreement": float((fresh_sorted == ids).mean())}
    return out


def _recompute_factored(cache: LogitCache, teacher: str, logits, hidden, blocks, rows: np.ndarray,
                        allowance: float) -> dict[str, Any]:
    """A factored cache's windows against the teacher run again (float32): the rebuilt logits (up to a constant a
    position) within the rounding of the stored values (`factored.rounding_bound`, per logit) plus the precision
    allowance of what the stored values encode: the teacher's own logits (exact form), or the same logits from the
    recomputed h's coefficients on the stored basis (compressed form, whose projection error is not a storage
    fault); and the mean KL(teacher ‖ rebuilt) at τ = 1 and 2 (the compressed form's includes its projection)."""
    import torch

    from cachekd.factored import block_logits, kl_rows, project, rebuild_logits, rounding_bound

    fresh = logits.double()
    got = torch.cat([block_logits(cache, teacher, b, torch.float64) for b in blocks])
    bound = torch.from_numpy(np.concatenate([rounding_bound(cache, teacher, b) for b in blocks]))
    expected = fresh
    if cache.plan.factored_rank is not None:
        f = {k: torch.from_numpy(v).double() for k, v in cache.factors(teacher).items()}
        c = project(hidden.double(), f["mean"], f["basis"]) / f["dim_scale"]
        expected = rebuild_logits(c, f["weight"], f["bias"])
    # up to a constant a position (an ensemble's logits are log-probabilities): |δ − mean δ| ≤ bound + mean bound
    diff = got - expected
    diff = diff - diff.mean(-1, keepdim=True)
    excess = (diff.abs() - bound - bound.mean(-1, keepdim=True)).reshape(len(rows), -1).amax(-1).numpy()
    diffs = {"max_abs_logit_diff_beyond_rounding": np.maximum(excess, 0.0)}
    out = _within(diffs, {"max_abs_logit_diff_beyond_rounding": allowance}, rows)
    out["largest_abs_logit_diff"] = float(diff.abs().max())
    for tau in (1.0, 2.0):
        out[f"mean_kl_teacher_to_rebuilt@tau={tau:g}"] = float(kl_rows(fresh, got, tau).mean())
    return out


def _recompute_sampled(cache: LogitCache, logits, blocks, rows: np.ndarray, allowance: float) -> dict[str, Any]:
    """A sampled cache's windows against the teacher run again: the stored log-probabilities of the drawn ids, the
    normalisers and entropies within the storage tolerance, and the share of draws that land on the same ids (the
    draws are a function of the window, so only logits that moved across a CDF boundary change one)."""
    import torch

    from cachekd.teacher_samples import sampled_teacher_targets

    spec = cache.plan.sample_spec
    fresh, _ = sampled_teacher_targets(logits, cache.vocab_size, int(cache.k or 0), cache.temperatures,
                                       spec.num_draws, spec.proposal_temperature, spec.seed, rows)
    get = {n: np.concatenate([getattr(b, n) for b in blocks]) for n in ("sample_ids", "sample_logprobs",
                                                                         "sample_counts", "tail_lse", "entropy")}
    full_lp = torch.log_softmax(logits[..., : cache.vocab_size].float(), -1).numpy()
    real = get["sample_counts"].sum(-1) > 0
    lp_true = np.take_along_axis(full_lp, get["sample_ids"], axis=-1)
    n = len(rows)
    diffs = {"max_abs_logprob_diff": np.where(real, np.abs(get["sample_logprobs"] - lp_true), 0).reshape(n, -1).max(-1),
             "max_abs_tail_lse_diff": np.abs(get["tail_lse"] - np.maximum(fresh["tail_lse"].numpy(), enc.TAIL_MIN)
                                             ).reshape(n, -1).max(-1),
             "max_abs_entropy_diff": np.abs(get["entropy"] - fresh["entropy"].numpy()).reshape(n, -1).max(-1)}
    storage = 0.5 / cache.plan.logprob_scale
    tol = {"max_abs_logprob_diff": storage + allowance,
           "max_abs_tail_lse_diff": storage + 0.5 / enc.TAIL_SCALE + allowance,
           "max_abs_entropy_diff": 0.5 / enc.TAIL_SCALE + allowance}
    same = (fresh["sample_ids"].numpy() == get["sample_ids"]) & (fresh["sample_counts"].numpy() == get["sample_counts"]).all(-1)
    return _within(diffs, tol, rows) | {"draw_agreement": float(same.mean())}


# How far a recomputation (float32, CPU) may differ from the teacher's run beyond the storage rounding: a float32
# run differs in summation order only (GPU kernels, TF32 matmuls); a bf16/fp16 autocast run, or one whose precision
# was not recorded (chunks written before it was), by the reduced precision of its logits.
PRECISION_ALLOWANCE = {"float32": 0.02, "reduced": 0.25}


def _precision_allowance(cache: LogitCache, split: str, rows: np.ndarray) -> float:
    markers = cache.done_markers(split)
    dtypes = {markers.get(int(r) // cache.chunk_windows, {}).get(fmt.COMPUTE_DTYPE) for r in rows}
    return PRECISION_ALLOWANCE["float32" if dtypes == {"float32"} else "reduced"]


def _within(diffs: dict[str, np.ndarray], tol: dict[str, float], rows: np.ndarray) -> dict[str, Any]:
    """The largest difference of each kind over the windows, its tolerance, the window with the largest excess."""
    excess = np.max([d / tol[k] for k, d in diffs.items()], axis=0)  # (windows,)
    return {**{k: float(d.max()) for k, d in diffs.items()}, "tolerance": tol,
            "within_tolerance": bool(all(d.max() <= tol[k] for k, d in diffs.items())),
            "worst_window": int(rows[int(np.argmax(excess))])}
