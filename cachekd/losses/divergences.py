"""The divergences, one small function each, over distributions given as log-probabilities.

Every objective is a sum over the categories of a pointwise term φ(p_v, q_v) with φ(x, x) = 0, so one function
per objective computes φ elementwise (broadcasting) and ``divergence`` sums it. ``logp`` is the teacher side and
may hold ``-inf`` (zero probability); ``logq`` is the student's, finite for finite student logits (it comes from a
log-softmax, a logsumexp or a gather of those), so it is not floored: one (n, V) pass fewer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from cachekd.losses.types import KDConfig

# Log-probabilities of exactly-zero probabilities (-inf) are raised to this finite floor before they enter a
# divergence, so that 0·log 0 terms give 0 (and a zero gradient) instead of NaN, while a genuinely infinite
# divergence (mass where the other side has none) shows up as a huge finite number. No real log-probability
# is anywhere near it.
LOG_FLOOR = -1e30

Pointwise = Callable[[Tensor, Tensor, "KDConfig"], Tensor]
"""φ(log p, log q, cfg): the elementwise term of a divergence; ``log p`` already floored at LOG_FLOOR."""


def _zero(logp: Tensor, logq: Tensor) -> Tensor:
    """Zeros of the broadcast shape that still depend on both inputs (a zero gradient, not None)."""
    return (logq - logq) + (logp - logp)


def forward_kl(logp: Tensor, logq: Tensor, cfg: KDConfig) -> Tensor:
    """KL(p‖q): p (log p − log q)."""
    return logp.exp() * (logp - logq)


def reverse_kl(logp: Tensor, logq: Tensor, cfg: KDConfig) -> Tensor:
    """KL(q‖p): q (log q − log p)."""
    return logq.exp() * (logq - logp)


def total_variation(logp: Tensor, logq: Tensor, cfg: KDConfig) -> Tensor:
    """½ |p − q|."""
    return 0.5 * (logp.exp() - logq.exp()).abs()


def jsd(logp: Tensor, logq: Tensor, cfg: KDConfig) -> Tensor:
    """Generalised Jensen-Shannon: β p (log p − log m) + (1−β) q (log q − log m), m = βp + (1−β)q."""
    beta = cfg.beta
    if beta in (0.0, 1.0):  # m equals q (resp. p) and the other term has weight 0
        return _zero(logp, logq)
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    return beta * logp.exp() * (logp - logm) + (1.0 - beta) * logq.exp() * (logq - logm)


def _skew_kl(loga: Tensor, logb: Tensor, lam: float) -> Tensor:
    """KL(a‖λa + (1−λ)b) pointwise: a (log a − log r); λ = 1 gives 0, λ = 0 the plain KL(a‖b)."""
    if lam == 1.0:
        return _zero(loga, logb)
    logr = logb if lam == 0.0 else torch.logaddexp(loga + math.log(lam), logb + math.log1p(-lam))
    return loga.exp() * (loga - logr)


def skew_forward_kl(logp: Tensor, logq: Tensor, cfg: KDConfig) -> Tensor:
    """KL(p‖λp + (1−λ)q): p (log p − log r)."""
    return _skew_kl(logp, logq, cfg.skew_lambda)


def skew_reverse_kl(logp: Tensor, logq: Tensor, cfg: KDConfig) -> Tensor:
    """KL(q‖λq + (1−λ)p): q (log q − log r)."""
    return _skew_kl(logq, logp, cfg.skew_lambda)


POINTWISE: dict[str, Pointwise] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tv": total_variation,
}
"""Every objective's pointwise term, by ``KDConfig.objective`` name (the registry's keys are ``OBJECTIVES``)."""


def pointwise_divergence(logp: Tensor, logq: Tensor, cfg: KDConfig) -> Tensor:
    """φ(p_v, q_v) of ``cfg.objective`` elementwise (broadcasting), so that the divergence is ``φ.sum(-1)``."""
    return POINTWISE[cfg.objective](logp.clamp_min(LOG_FLOOR), logq, cfg)


def divergence(logp: Tensor, logq: Tensor, cfg: KDConfig) -> Tensor:
    """Divergence of two distributions given as log-probabilities along the last axis: (..., C) → (...)."""
    return pointwise_divergence(logp, logq, cfg).sum(-1)


def bucket_divergence(logp_ids: Tensor, log_rest: Tensor, logq_ids: Tensor, log_rest_q: Tensor, cfg: KDConfig) -> Tensor:
    """(n,) the divergence of the coarse-grained distributions: the ids (n, S) one by one, and the rest of the
    vocabulary as one category, teacher ``logp_ids``/``log_rest`` (n,) against student ``logq_ids``/``log_rest_q``.
    An id whose teacher value is −inf is a pad (an id repeated with no value of its own): it is compared with itself
    (φ(x, x) = 0, no gradient), so no φ(−inf, q) is formed anywhere."""
    real = torch.isfinite(logp_ids)
    logp = torch.where(real, logp_ids, logq_ids.detach())
    terms = torch.where(real, pointwise_divergence(logp, logq_ids, cfg), 0.0).sum(-1)
    # (every token stored: both rests are empty, log 0 on both sides, floored so that the term is 0, not NaN)
    rest_q = log_rest_q.clamp_min(LOG_FLOOR).unsqueeze(1)
    rest = pointwise_divergence(log_rest.clamp_min(LOG_FLOOR).unsqueeze(1), rest_q, cfg).squeeze(1)
    return terms + rest


def mixed_bucket_target(logp_ids: Tensor, log_rest: Tensor, logq_ids: Tensor, log_rest_q: Tensor,
                        alpha: float) -> tuple[Tensor, Tensor]:
    """ChooBaCa's mixed target on the coarse-grained categories (the ids, and the rest as one): log r̄ ∝
    α·log p̄ + (1−α)·log q̄ with the student part ``logq_ids``/``log_rest_q`` as given (detach it for a constant
    target). With the teacher's rest shaped like the student (tail_mode bucket) this is exactly the dense mixed
    target, coarse-grained (``sparse.student_shaped_logp``). Pads (−inf teacher values) stay −inf. 0 < α ≤ 1."""
    a, b = alpha, 1.0 - alpha
    mix_ids = torch.where(torch.isfinite(logp_ids), a * logp_ids + b * logq_ids, -math.inf)
    mix_rest = a * log_rest.clamp_min(LOG_FLOOR) + b * log_rest_q.clamp_min(LOG_FLOOR)
    log_z = torch.logaddexp(torch.logsumexp(mix_ids, dim=-1), mix_rest)
    return mix_ids - log_z.unsqueeze(1), mix_rest - log_z
