"""`cachekd audit`: how faithful a cache's targets are to the teacher they were computed from.

The teacher is run again on a sample of positions (all positions with a next token of randomly chosen windows),
and for each storage option its target is built from the same full logits: the cache's own (read from the cache),
and simulated alternatives computed by the same code precompute uses (``teacher_targets``,
``sampled_teacher_targets``; without the fixed-point rounding, which is ≤ 2⁻¹⁰ nat): top-k with the `bucket`
tail, top-k `renormalize`, sampled N, hybrid top-K + sampled N. For each option and each temperature:

* ``captured_mass``: the teacher's exact mass at τ on the stored ids (mean over positions).
* ``kl_full_to_target``: KL(p_full ‖ r), r the reconstructed target: the stored ids at their exact p_τ, the rest's
  exact mass spread evenly over the other tokens (`uniform`); ``renormalize`` drops the rest, so r has zeros where
  p has mass and the KL is infinite (reported as such). Mean over positions, nats.
* ``grad_angle_deg``: the angle between the gradients, with respect to the student's logits at all audited
  positions (one flattened vector), of the distillation loss against the option's target and against the full
  target (same objective, τ, tail mode as the option's). The student is a checkpoint (``student``) or, without one,
  logits drawn N(0, 1) per token (a fixed seed): an untrained student.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cachekd.errors import CachekdError, ConfigFieldError, ConfigKeysError


@dataclass(frozen=True)
class AuditOptions:
    """The simulated storage options an audit compares with the cache's own."""

    top_k: int = 64
    sample: int = 50
    hybrid_top_k: int = 16
    objective: str = "forward_kl"


def choose_windows(num_windows: int, seq_len: int, positions: int, seed: int) -> np.ndarray:
    """Sorted random windows holding at least `positions` positions with a next token (all of them if fewer)."""
    n = min(num_windows, max(1, math.ceil(positions / max(seq_len - 1, 1))))
    return np.sort(np.random.default_rng(seed).choice(num_windows, size=n, replace=False))


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    cos = float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def _kd_grad(student: torch.Tensor, labels: torch.Tensor, target, objective: str, tau: float, tail_mode: str):
    from cachekd.losses import KDConfig, distill_loss

    z = student.clone().requires_grad_(True)
    parts = distill_loss(z, labels, [target], KDConfig(objective=objective, temperature=tau, tail_mode=tail_mode))
    parts.kd_sum.backward()
    return z.grad


def _reconstruct(logp: torch.Tensor, stored: torch.Tensor, drop_rest: bool) -> torch.Tensor:
    """(P, V) the target r: p at the stored ids (mask (P, V)), the rest's mass spread evenly (or dropped)."""
    p = logp.exp()
    head = torch.where(stored, p, 0.0)
    if drop_rest:
        return head / head.sum(-1, keepdim=True)
    rest = (1.0 - head.sum(-1, keepdim=True)).clamp_min(0.0)
    others = (~stored).sum(-1, keepdim=True).clamp_min(1)
    return torch.where(stored, p, rest / others)


def _kl(logp: torch.Tensor, r: torch.Tensor) -> float:
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - torch.log(r)), 0.0)
    return float(terms.sum(-1).mean())


def audit_targets(full_logits: torch.Tensor, student_logits: torch.Tensor, temperatures: list[float],
                  options: AuditOptions, cached: dict[str, Any] | None = None, seed: int = 0,
                  window_ids: np.ndarray | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """{option: {τ: {captured_mass, kl_full_to_target, grad_angle_deg}}} for full teacher logits (B, T, V) and
    student logits (B, T, V) (the last position of each window has no next token and is left out). `cached`:
    the cache's own targets {τ: (name, target, stored mask (B, T, V), tail_mode)} to include."""
    from cachekd.losses import DenseTarget, SparseTarget
    from cachekd.teacher_rows import teacher_targets
    from cachekd.teacher_samples import sampled_teacher_targets, target_at

    B, T, V = full_logits.shape
    z = full_logits.float()
    labels = torch.zeros(B, T, dtype=torch.long)
    labels[:, -1] = -100
    keep = labels != -100
    windows = np.arange(B) if window_ids is None else window_ids
    out: dict[str, dict[str, dict[str, float]]] = {}
    k, kh = min(options.top_k, V), min(options.hybrid_top_k, V - 1)
    top, _ = teacher_targets(z, V, k, temperatures)
    samp, _ = sampled_teacher_targets(z, V, 0, temperatures, options.sample, None, seed, windows)
    hyb, _ = sampled_teacher_targets(z, V, kh, temperatures, options.sample, None, seed, windows)
    for ti, tau in enumerate(temperatures):
        logp = torch.log_softmax(z / tau, dim=-1)
        g_full = _kd_grad(student_logits, labels, DenseTarget(z), options.objective, tau, "bucket")
        rows: list[tuple[str, Any, torch.Tensor, str]] = []
        top_mask = torch.zeros(B, T, V, dtype=torch.bool).scatter_(-1, top["ids"], True)
        sparse = SparseTarget(ids=top["ids"], logits=top["logprobs"], tail_lse=top["tail_lse"][..., ti])
        rows.append((f"top-{k} bucket", sparse, top_mask, "bucket"))
        rows.append((f"top-{k} renormalize", sparse, top_mask, "renormalize"))
        for name, arr in ((f"sampled N={options.sample}", samp), (f"hybrid top-{kh} + sampled N={options.sample}", hyb)):
            tgt = target_at(arr, temperatures, tau, None, vocab_size=V)
            mask = torch.zeros(B, T, V, dtype=torch.bool).scatter_(-1, tgt.ids, torch.isfinite(tgt.logp))
            rows.append((name, tgt, mask, "bucket"))
        if cached is not None and tau in cached:
            rows.insert(0, cached[tau])
        for name, target, mask, mode in rows:
            g = _kd_grad(student_logits, labels, target, options.objective, tau, mode)
            if isinstance(target, DenseTarget):  # a full or factored cache: its own logits, storage rounding included
                kl = _kl(torch.log_softmax(z.double() / tau, -1)[keep],
                         torch.softmax(target.logits.double() / tau, -1)[keep])
            else:
                kl = _kl(logp[keep], _reconstruct(logp, mask, drop_rest=mode == "renormalize")[keep])
            out.setdefault(name, {})[f"{tau:g}"] = {
                "captured_mass": float(torch.where(mask, logp.exp(), 0.0).sum(-1)[keep].mean()),
                "kl_full_to_target": kl,
                "grad_angle_deg": _angle(g[keep], g_full[keep]),
            }
    return out


def cached_targets(cache, block, temperatures: list[float], shape: tuple[int, int, int]) -> dict[float, tuple]:
    """The cache's own targets {τ: (name, target, stored mask, tail_mode)} for a decoded block of its windows."""
    from cachekd.factored import block_logits
    from cachekd.losses import DenseTarget, SparseTarget
    from cachekd.teacher_samples import target_at

    B, T, V = shape
    out = {}
    name = f"cache ({cache.plan.storage_kind})"
    for ti, tau in enumerate(temperatures):
        if cache.mode == "full":
            out[tau] = (name, DenseTarget(torch.from_numpy(block.logits).float()), torch.ones(B, T, V, dtype=torch.bool),
                        "bucket")
        elif cache.mode == "factored":  # every logit, rebuilt from the stored h and the cached output layer
            z = block_logits(cache, cache.teachers[0], block)
            out[tau] = (name, DenseTarget(z), torch.ones(B, T, V, dtype=torch.bool), "bucket")
        elif cache.mode == "topk":
            ids = torch.from_numpy(block.ids)
            tgt = SparseTarget(ids=ids, logits=torch.from_numpy(block.logprobs),
                               tail_lse=torch.from_numpy(block.tail_lse[..., ti]))
            out[tau] = (name, tgt, torch.zeros(B, T, V, dtype=torch.bool).scatter_(-1, ids, True), "bucket")
        else:
            arrays = {n: None if getattr(block, n) is None else torch.from_numpy(getattr(block, n))
                      for n in block.NAMES}
            tgt = target_at(arrays, cache.temperatures, tau, cache.plan.sample_spec.proposal_temperature,
                            rounding=cache.plan.rounding, vocab_size=V)
            mask = torch.zeros(B, T, V, dtype=torch.bool).scatter_(-1, tgt.ids, torch.isfinite(tgt.logp))
            out[tau] = (name, tgt, mask, "bucket")
    return out


def audit(cache_path: str | Path, *, teacher: str | None = None, student: str | None = None, positions: int = 512,
          options: AuditOptions = AuditOptions(), split: str | None = None, seed: int = 0,
          temperatures: list[float] | None = None, store_path: str | None = None) -> dict[str, Any]:
    """`cachekd audit CACHE`: run the cache's teacher (or `teacher`, a checkpoint) again on about `positions`
    positions of `split` (default: train, else the first) and report `audit_targets` for the cache's own targets
    and the simulated options, at the cache's temperatures (or `temperatures`, a subset of them for the cache's
    own targets). Returns a JSON-able report."""
    from cachekd.cache.reader import LogitCache
    from cachekd.cache.summary import cache_summary
    from cachekd.models import load_model
    from cachekd.ensemble import load_cached_teacher
    from cachekd.teachers import load_teachers
    from cachekd.tokens import TokenStore

    if positions < 1:
        raise ConfigFieldError("positions", "at least 1", positions)
    cache = LogitCache.open(cache_path)
    store = TokenStore.open(store_path or cache.plan.token_store.path)
    cache.check_store(store)
    V = cache.vocab_size
    if options.hybrid_top_k >= V:
        raise ConfigKeysError("{hybrid_top_k} {k} leaves no tokens to draw from (the vocabulary has {V}); give a K "
                              "below {V}.", k=options.hybrid_top_k, V=V)
    student_model = None
    if student:
        from cachekd.models import resolve_model_dir
        from cachekd.teachers import check_vocabulary

        d = resolve_model_dir(student)
        student_model = load_model(d)
        check_vocabulary(
            f"student {student!r}", d, student_model, store,
            tokenizer_error=lambda fp: f"student {student!r} comes with a different tokenizer than the cache's token "
                                       f"store {str(store.path)!r}; audit a student of this tokenizer.",
            vocab_error=lambda v: f"student {student!r} has a vocabulary of {v} tokens but the cache's token store has "
                                  f"{V}; audit a student of this tokenizer.",
            advice="audit a student trained with this store's tokenizer (and save that tokenizer next to it)")
    split = split or ("train" if "train" in cache.splits() else cache.splits()[0])
    name = cache.teachers[0]
    cached_info = cache.plan.teachers[0]
    if teacher is None and cached_info.get("members"):  # an ensemble cache: rebuilt from its members
        model, info = load_cached_teacher(cached_info, cache.vocab_size), cached_info
    else:
        model, _, info = load_teachers([teacher or f"{name}={cached_info['path']}"], store)[0]
    same = info["fingerprint"] == cached_info.get("fingerprint")
    temps = list(temperatures or cache.temperatures or [1.0])
    for t in temps:
        if cache.mode != "full":
            cache.temperature_index(t)
    rows = choose_windows(cache.num_windows(split), cache.seq_len, positions, seed)
    x = torch.from_numpy(np.stack([store.read(split, int(r), int(r) + 1)[0] for r in rows]).astype(np.int64))
    with torch.inference_mode():
        z = model.eval()(input_ids=x).logits[..., : cache.vocab_size].float()
        if student_model is not None:
            s = student_model.eval()(input_ids=x).logits[..., : cache.vocab_size].float()
        else:
            s = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
    parts = [cache.read(split, int(r), int(r) + 1, [name])[name] for r in rows]
    block = type(parts[0])(**{n: None if getattr(parts[0], n) is None else np.concatenate([getattr(p, n) for p in parts])
                               for n in parts[0].NAMES})
    cached = cached_targets(cache, block, temps, tuple(z.shape))
    results = audit_targets(z.clone(), s.clone(), temps, options, cached=cached, seed=seed, window_ids=rows)
    return {
        "cache": str(cache.path), "storage_kind": cache.plan.storage_kind, "split": split,
        "windows": len(rows), "positions": int(len(rows) * (cache.seq_len - 1)), "teacher": info["name"],
        "teacher_matches_cache": same, "student": student or "random logits N(0, 1)", "objective": options.objective,
        "bytes_per_position": cache_summary(cache).get("bytes_per_position"), "options": results,
    }
