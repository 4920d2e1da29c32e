"""What a logit cache holds, for `cachekd info` and `precompute`'s closing report: its plan, chunks done, teachers,
checksums, bytes on disk (per position and per array) and the teachers' statistics from the manifest (a factored
cache: d, the output layers' bytes, and the rebuilt logits' KL to the teacher's own over every position)."""

from __future__ import annotations

from typing import Any

from cachekd.cache import format as fmt
from cachekd.cache.reader import FINISH_HINT, LogitCache, describe_missing_chunks


def cache_summary(cache: LogitCache) -> dict[str, Any]:
    """What the cache holds, as plain JSON values (`cachekd info --json`); `summary_text` formats it."""
    plan = cache.plan
    pending = cache.pending_chunks()
    out: dict[str, Any] = {"kind": "logit cache", "path": str(cache.path), "complete": cache.complete}
    if not cache.complete:
        out["missing"] = {"manifest": not cache.has_manifest,
                          "chunks_not_done": {s: p for s, p in pending.items() if p}}
    nbytes = fmt.data_bytes(cache.path)
    positions = {s: n * cache.seq_len for s, n in plan.splits.items()}
    out.update({
        "mode": plan.mode,
        "storage_kind": plan.storage_kind,
        "k": plan.k,
        "temperatures": [float(t) for t in plan.temperatures],
        "vocab_size": cache.vocab_size,
        "seq_len": cache.seq_len,
        "windows": dict(plan.splits),
        "positions": positions,
        "chunks": {s: {"done": cache.num_chunks(s) - len(pending[s]), "total": cache.num_chunks(s)}
                   for s in plan.splits},
        "teachers": [
            {"name": t["name"], "model_type": t["model_type"], "num_params": t["num_params"], "path": t["path"],
             "fingerprint": t.get("fingerprint"), "model_vocab_size": t.get("model_vocab_size"),
             "padded_logits_dropped": t.get("padded_logits_dropped", 0)}
            for t in plan.teachers
        ],
        "checksums": cache.has_checksums(),
        "bytes_on_disk": nbytes,
        "bytes_per_array": bytes_per_array(cache),
    })
    if plan.sample is not None:
        out["sample"] = dict(plan.sample)
    if plan.factored is not None:
        out["factored"] = {**plan.factored, "hidden_size": {t: plan.hidden_size(t) for t in plan.teacher_names},
                           "bias": {t: plan.has_bias(t) for t in plan.teacher_names},
                           "factor_bytes": factor_bytes(cache)}
    if cache.complete:
        out["bytes_per_position"] = round(nbytes / max(sum(positions.values()), 1), 2)
    for split, per_teacher in (plan.stats if isinstance(plan, fmt.CacheManifest) else {}).items():
        for t, s in per_teacher.items():
            row = {"entropy_mean": round(s["entropy_mean"], 4), "entropy_min": round(s["entropy_min"], 4),
                   "entropy_max": round(s["entropy_max"], 4)}
            for tau, v in s.get("mean_topk_mass", {}).items():
                row[f"topk_mass@tau={float(tau):g}"] = round(v, 5)
            if "mean_distinct_ids" in s:
                row["distinct_ids_per_position"] = round(s["mean_distinct_ids"], 2)
            if "mean_rebuild_kl" in s:  # factored: the rebuilt logits against the teacher's own (a sample of batches)
                row["rebuild_kl"] = float(f"{s['mean_rebuild_kl']:.3g}")
                row["rebuild_max_abs_logit_diff"] = float(f"{s['rebuild_max_abs_logit_diff']:.3g}")
            out.setdefault("teacher_stats", {})[f"{split}/{t}"] = row
    return out


def bytes_per_array(cache: LogitCache) -> dict[str, float]:
    """Bytes on disk per position of each array (summed over splits and teachers), by array name."""
    positions = max(sum(cache.plan.splits.values()) * cache.seq_len, 1)
    out: dict[str, float] = {}
    for split in cache.splits():
        for t in cache.teachers:
            for name in cache.plan.array_names():
                d = cache.path / fmt.array_path(split, t, name)
                n = sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.exists() else 0
                out[name] = out.get(name, 0.0) + n
    return {k: round(v / positions, 2) for k, v in out.items()}


def factor_bytes(cache: LogitCache) -> dict[str, int]:
    """Bytes on disk of a factored cache's output layers (stored once), by array name, summed over teachers."""
    out: dict[str, int] = {}
    for t in cache.teachers:
        for name in fmt.FACTOR_NAMES:
            d = cache.path / fmt.factor_path(t, name)
            if d.exists():
                out[name] = out.get(name, 0) + sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    return out


def summary_text(s: dict[str, Any]) -> dict[str, Any]:
    """`cache_summary` as the strings `cachekd info` prints."""
    out: dict[str, Any] = {"kind": s["kind"], "path": s["path"], "complete": s["complete"]}
    if "missing" in s:
        miss = s["missing"]
        totals = {sp: c["total"] for sp, c in s["chunks"].items()}
        out["missing"] = (describe_missing_chunks(miss["chunks_not_done"], totals, miss["manifest"])
                          + f" ({FINISH_HINT})")
    out.update({
        "mode": s["mode"],
        "storage_kind": s.get("storage_kind", s["mode"]),
        "k": "full logits" if s["mode"] == "full" else "every logit (factored)" if s["mode"] == "factored" else s["k"],
        "temperatures": ", ".join(f"{t:g}" for t in s["temperatures"]) or "-",
        "vocab_size": s["vocab_size"],
        "seq_len": s["seq_len"],
        "windows": s["windows"],
        "positions": s["positions"],
        "chunks_done": {sp: f"{c['done']}/{c['total']} chunks" for sp, c in s["chunks"].items()},
        "teachers": {
            t["name"]: f"{t['model_type']}, {t['num_params'] / 1e6:.2f}M params, {t['path']}"
            + (f" ({t['padded_logits_dropped']} padded logits dropped)" if t.get("padded_logits_dropped") else "")
            for t in s["teachers"]
        },
        "checksums": {True: "crc32c per chunk", False: "none (written before checksums were added)",
                      None: "unknown (an array cannot be opened)"}[s["checksums"]],
        "bytes_on_disk": s["bytes_on_disk"],
        "bytes_per_position_by_array": ", ".join(f"{k} {v:g}" for k, v in s.get("bytes_per_array", {}).items()),
    })
    if "factored" in s:
        f = s["factored"]
        rank = (f", rank {f['rank']} (basis fitted on {f['fit']['windows']} train windows, seed {f['fit']['seed']})"
                if f.get("rank") else "")
        out["factored"] = (f"h stored as {f['dtype']}{rank}, d = "
                           + ", ".join(f"{d} ({t})" for t, d in f["hidden_size"].items())
                           + f"; output layers ({f['weight_dtype']}, stored once): "
                           + ", ".join(f"{k} {v} B" for k, v in f["factor_bytes"].items()))
    if "bytes_per_position" in s:
        out["bytes_per_position"] = s["bytes_per_position"]
    if "teacher_stats" in s:
        out["teacher_stats"] = s["teacher_stats"]
    return out
