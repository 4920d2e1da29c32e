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
    from cachekd.losses.api import KDConfig

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
