"""The peer weights ω of weighted mutual learning: a point on the simplex moved by mirror descent on dev losses.

Every ``update_every`` optimizer steps, with g_i the trained peer i's cross-entropy on the dev split clamped to
[0, clip] (the derivative of Σ_i ω_i·CE_i with respect to ω_i):

    ω_i ← ω_i·exp(−η·g_i) / Σ_j ω_j·exp(−η·g_j)

This is the first-order rule of the seed paper's bi-level update: the public code's second-order term
differentiates a detached leaf and is always zero, so it is left out here. Fixed peers (cached teachers) have no
dev loss of their own in a cohort: their weights stay as given and the trained peers share the rest of the simplex.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mirror_descent_step(weights: Sequence[float], dev_losses: Sequence[float], *, eta: float,
                        clip: float = 1.0) -> list[float]:
    """One exponentiated-gradient step of the trained peers' weights.

    Args:
        weights: ω of all members, trained peers first then fixed peers; non-negative, summing to 1.
        dev_losses: the N trained peers' dev cross-entropies (nats), N ≤ len(weights).
        eta: the step size η > 0.
        clip: g_i = min(max(dev_loss_i, 0), clip); clip ≤ 0 means no upper clamp.

    Returns:
        The new ω (same length): the trained peers' weights rescaled to keep their total, the fixed ones unchanged.
    """
    n = len(dev_losses)
    if not eta > 0:
        raise ValueError(f"the peer-weight step size eta must be > 0 (got {eta!r}).")
    if n > len(weights):
        raise ValueError(f"{n} dev losses for {len(weights)} weights.")
    grads = [max(float(g), 0.0) for g in dev_losses]
    if clip > 0:
        grads = [min(g, clip) for g in grads]
    trained = [float(w) for w in weights[:n]]
    mass = sum(trained)
    moved = [w * math.exp(-eta * g) for w, g in zip(trained, grads)]
    total = sum(moved)
    if total <= 0:  # every trained weight is 0: nothing to move
        return [float(w) for w in weights]
    return [w * mass / total for w in moved] + [float(w) for w in weights[n:]]


def initial_weights(num_trained: int, fixed: Sequence[float] = (), given: Sequence[float] | None = None) -> list[float]:
    """ω at step 0: `given` normalised to sum 1 when given (trained peers first, then the fixed peers); otherwise the
    fixed peers' weights `fixed` as they are and the rest of the simplex shared equally by the trained peers."""
    if given is not None:
        total = sum(given)
        return [float(w) / total for w in given]
    rest = 1.0 - sum(fixed)
    return [rest / num_trained] * num_trained + [float(w) for w in fixed]
