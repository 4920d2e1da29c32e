"""Independent float64 reference for cachekd.losses: plain dense formulas, one position at a time.

Written separately from cachekd/losses.py and never importing it. Targets are plain tuples:
``("dense", logits (B, T, V))`` or ``("sparse", ids (B, T, k), logits (B, T, k), tail_lse (B, T))``.
Sparse targets are expanded here into explicit distributions over V (uniform), over k+1 categories (bucket) or
over k (renormalize), then compared with the student's explicit distribution; where mixing or combining needs a
distribution over V, the bucket tail's mass is spread over the tail tokens in proportion to the (detached)
student. Everything is differentiable
(torch.float64), so gradients can be compared too.
"""

from __future__ import annotations

import math

import torch

f64 = torch.float64


def ref_divergence(objective: str, logp: torch.Tensor, logq: torch.Tensor, beta: float = 0.5, lam: float = 0.1):
    """Divergence between two explicit distributions given as 1-D log-probability vectors (float64 scalar).

    KLs use log differences (exact even where a probability underflows); the mixture divergences use
    probabilities. Terms with zero weight are 0 (0·log 0 = 0).
    """
    p, q = logp.exp(), logq.exp()
    zero = torch.zeros((), dtype=f64)

    def kl(pa, logpa, logb):  # Σ a (log a − log b), a given as probs and log-probs
        terms = pa * (logpa - logb)
        return torch.where(pa > 0, terms, zero).sum()

    if objective == "forward_kl":
        return kl(p, logp, logq)
    if objective == "reverse_kl":
        return kl(q, logq, logp)
    if objective == "tv":
        return 0.5 * (p - q).abs().sum()
    if objective == "jsd":
        if beta in (0.0, 1.0):
            return zero
        m = beta * p + (1 - beta) * q
        return beta * kl(p, logp, torch.log(m)) + (1 - beta) * kl(q, logq, torch.log(m))
    if objective == "skew_forward_kl":
        if lam == 1.0:
            return zero
        return kl(p, logp, torch.log(lam * p + (1 - lam) * q) if lam > 0 else logq)
    if objective == "skew_reverse_kl":
        if lam == 1.0:
            return zero
        return kl(q, logq, torch.log(lam * q + (1 - lam) * p) if lam > 0 else logp)
    raise ValueError(objective)


def _log_softmax(x):
    return x - torch.logsumexp(x, 0)


def _dense_teacher_logits(target, b, t, vocab_size, tau, tail_mode="uniform", logq=None):
    """Raw teacher logits over V at one position (sparse: the uniform-tail reconstruction; with tail_mode bucket
    the tail's mass in proportion to the student's probabilities ``logq`` at τ)."""
    if target[0] == "dense":
        return target[1][b, t].to(f64)
    _, ids, logits, tail_lse = target
    ids_bt = ids[b, t].long()
    k = ids_bt.numel()
    if tail_mode == "bucket":
        tl = logits[b, t].to(f64) / tau
        tail = tail_lse[b, t].to(f64)
        lse = torch.logaddexp(torch.logsumexp(tl, 0), tail)
        lq = logq.detach()
        in_tail = torch.ones(vocab_size, dtype=torch.bool)
        in_tail[ids_bt] = False
        logp = torch.full((vocab_size,), -math.inf, dtype=f64)
        if in_tail.any():
            q_tail = torch.logsumexp(lq[in_tail], 0)
            logp[in_tail] = (tail - lse) + lq[in_tail] - q_tail  # mass exp(tail − lse), shaped like q
        logp[ids_bt] = tl - lse
        return tau * logp
    if k == vocab_size:
        out = torch.empty(vocab_size, dtype=f64)
    else:
        # tail tokens share exp(tail_lse) equally at temperature tau: c/tau = tail_lse − log(V − k)
        c = tau * (tail_lse[b, t].to(f64) - math.log(vocab_size - k))
        out = torch.full((vocab_size,), float(c), dtype=f64)
    out[ids_bt] = logits[b, t].to(f64)
    return out


def ref_distill(
    student_logits,
    labels,
    targets,
    *,
    objective="forward_kl",
    temperature=1.0,
    beta=0.5,
    skew_lambda=0.1,
    tail_mode="bucket",
    teacher_combine="logits",
    teacher_weights=None,
    mix_alpha=1.0,
    detach_mix=True,
    reduction="token_mean",
    ignore_index=-100,
):
    """Returns dict(ce_sum, ce_count, kd_sum, kd_count) as float64 tensors / ints."""
    z_all = student_logits.to(f64)
    B, T, V = z_all.shape
    tau = temperature
    n_t = len(targets)
    w = [1.0] * n_t if teacher_weights is None else list(teacher_weights)
    w = [x / sum(w) for x in w] if n_t else []
    ce_sum = torch.zeros((), dtype=f64)
    kd_sum = torch.zeros((), dtype=f64)
    count = 0
    for b in range(B):
        for t in range(T):
            label = int(labels[b, t])
            if label == ignore_index:
                continue
            count += 1
            z = z_all[b, t]
            ce_sum = ce_sum - _log_softmax(z)[label]
            if n_t == 0:
                continue
            logq = _log_softmax(z / tau)

            def mixed(teacher_logits):
                if mix_alpha == 1.0:
                    return teacher_logits
                zs = z.detach() if detach_mix else z
                if mix_alpha == 0.0:
                    return zs
                return mix_alpha * teacher_logits + (1 - mix_alpha) * zs

            if n_t == 1 or teacher_combine == "losses":
                for wi, target in zip(w, targets):
                    if wi == 0:
                        continue
                    if target[0] == "dense" or tail_mode == "uniform" or mix_alpha != 1.0:
                        if target[0] == "sparse" and tail_mode == "renormalize":
                            raise ValueError("mixing cannot use tail_mode renormalize")
                        zt = mixed(_dense_teacher_logits(target, b, t, V, tau, tail_mode, logq))
                        d = ref_divergence(objective, _log_softmax(zt / tau), logq, beta, skew_lambda)
                    else:
                        _, ids, logits, tail_lse = target
                        ids_bt = ids[b, t].long()
                        tl = logits[b, t].to(f64) / tau
                        lq_ids = logq[ids_bt]
                        if tail_mode == "renormalize":
                            d = ref_divergence(objective, _log_softmax(tl), _log_softmax(lq_ids), beta, skew_lambda)
                        else:  # bucket
                            tail = tail_lse[b, t].to(f64)
                            lse = torch.logaddexp(torch.logsumexp(tl, 0), tail)
                            mask = torch.ones(V, dtype=torch.bool)
                            mask[ids_bt] = False
                            if mask.any():
                                lp = torch.cat([tl - lse, (tail - lse).reshape(1)])
                                lq = torch.cat([lq_ids, torch.logsumexp(logq[mask], 0).reshape(1)])
                            else:
                                lp, lq = tl - lse, lq_ids
                            d = ref_divergence(objective, lp, lq, beta, skew_lambda)
                    kd_sum = kd_sum + wi * d
            else:
                if any(tg[0] == "sparse" for tg in targets) and tail_mode == "renormalize":
                    raise ValueError("combining sparse teachers cannot use tail_mode renormalize")
                raw = [_dense_teacher_logits(tg, b, t, V, tau, tail_mode, logq) for tg in targets]
                if teacher_combine == "logits":  # Baby Llama: mean of raw logits, then tempered softmax
                    zt = sum(wi * r for wi, r in zip(w, raw) if wi > 0)
                else:  # probs: mean of tempered probabilities; as logits, tau·log p
                    p = sum(wi * torch.softmax(r / tau, 0) for wi, r in zip(w, raw))
                    zt = tau * torch.log(p)
                zt = mixed(zt)
                kd_sum = kd_sum + ref_divergence(objective, _log_softmax(zt / tau), logq, beta, skew_lambda)
    kd_count = 0 if n_t == 0 else (B if reduction == "batchmean" else count)
    return {"ce_sum": ce_sum, "ce_count": count, "kd_sum": kd_sum, "kd_count": kd_count}


def make_sparse(teacher_logits: torch.Tensor, k: int, temperature: float, *, shift=None, generator=None,
                top=True):
    """A cache-like sparse target from full teacher logits: k ids (top-k or random, shuffled order), their
    logits plus a per-position shift, and the tail log-sum-exp at ``temperature`` in the same shift.

    Returns the tuple ``("sparse", ids, logits, tail_lse)``; tail_lse is float32 as the cache stores it.
    """
    x = teacher_logits.to(f64)
    B, T, V = x.shape
    if top:
        ids = x.topk(k, dim=-1).indices
    else:
        ids = torch.rand(B, T, V, generator=generator, dtype=f64).argsort(-1)[..., :k]
    perm = torch.rand(B, T, k, generator=generator, dtype=f64).argsort(-1)
    ids = ids.gather(-1, perm)  # any order
    if shift is None:
        shift = torch.zeros(B, T, 1, dtype=f64)
    vals = x.gather(-1, ids) - shift
    mask = torch.ones(B, T, V, dtype=torch.bool).scatter(-1, ids, False)
    tail = torch.where(mask, (x - shift) / temperature, torch.tensor(-math.inf, dtype=f64)).logsumexp(-1)
    return ("sparse", ids, vals.to(teacher_logits.dtype), tail.to(torch.float32))
