"""The peer weights ω of weighted mutual learning: a point on the simplex moved by mirror descent on dev losses.

Every ``update_every`` optimizer steps the trained peers are scored on the dev windows, the windows are grouped
into B validation batches b = 1..B (``num_batches``, the seed's 60; fewer when there are fewer windows), and ω
takes one exponentiated-gradient step per batch, as the seed code's ``validate`` does (``src/WML_distill/train.py``
of AI-DA-STC/generative-ai-research-babylm): with the objective Σ_i ω_i·CE_ib / B of that batch, its gradient is

    g_ib = ∂(Σ_i ω_i·CE_ib / B)/∂ω_i = CE_ib / B,   clamped to [0, clip]
    ω_i ← ω_i·exp(−η·g_ib) / Σ_j ω_j·exp(−η·g_jb)

so one pass moves ω by about exp(−η·mean_b CE_ib): the better peer (lower dev CE) gains weight. The clamp acts
on CE_ib / B (the seed: clip 1, B = 60), so it bites only for a batch loss above B·clip nats. (Clamping the *mean*
dev CE to [0, 1] instead would freeze ω for every language model, whose dev CE is above 1 nat.)

This is the first-order rule of the seed paper's bi-level update: the public code's second-order term
differentiates a detached leaf and is always zero, so it is left out here. (The seed repository's HEAD steps once a
batch, inside the loop over validation batches; an older revision, 2261351, stepped once a pass, after the loop,
with the last batch's gradient alone. This follows HEAD.) Fixed peers (cached teachers) have no
dev loss of their own in a cohort: their weights stay as given and the trained peers share the rest of the simplex.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mirror_descent_step(weights: Sequence[float], batch_losses: Sequence[Sequence[float]], *, eta: float,
                        clip: float = 1.0) -> list[float]:
    """One validation pass of exponentiated-gradient steps on the trained peers' weights (one step a dev batch).

    Args:
        weights: ω of all members, trained peers first then fixed peers; non-negative, summing to 1.
        batch_losses: for each of the N trained peers (N ≤ len(weights)) its mean cross-entropy (nats) on each of
            the same B dev batches, in order: an N × B table.
        eta: the step size η > 0.
        clip: g_ib = min(max(CE_ib / B, 0), clip); clip ≤ 0 means no upper clamp.

    Returns:
        The new ω (same length): the trained peers' weights rescaled to keep their total, the fixed ones unchanged.
    """
    n = len(batch_losses)
    if not eta > 0:
        raise ValueError(f"the peer-weight step size eta must be > 0 (got {eta!r}).")
    if n > len(weights):
        raise ValueError(f"{n} peers' dev losses for {len(weights)} weights.")
    num_batches = {len(row) for row in batch_losses}
    if len(num_batches) > 1 or num_batches == {0}:
        raise ValueError("every trained peer needs a dev loss on each of the same (at least one) dev batches.")
    (num_batches,) = num_batches or {1}
    trained = [float(w) for w in weights[:n]]
    mass = sum(trained)
    for b in range(num_batches):
        grads = [max(float(row[b]) / num_batches, 0.0) for row in batch_losses]
        if clip > 0:
            grads = [min(g, clip) for g in grads]
        moved = [w * math.exp(-eta * g) for w, g in zip(trained, grads)]
        total = sum(moved)
        if total <= 0:  # every trained weight is 0: nothing to move
            return [float(w) for w in weights]
        trained = [w * mass / total for w in moved]
    return trained + [float(w) for w in weights[n:]]


def group_losses(window_losses: Sequence[float], num_batches: int) -> list[float]:
    """The mean loss of each of `num_batches` contiguous groups of windows (as equal as can be; one group a window
    when there are fewer windows): the seed code's validation batches, from the windows the cohort scored."""
    n = len(window_losses)
    groups = max(1, min(int(num_batches), n))
    bounds = [round(g * n / groups) for g in range(groups + 1)]
    return [math.fsum(window_losses[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:])]


def initial_weights(num_trained: int, fixed: Sequence[float] = (), given: Sequence[float] | None = None) -> list[float]:
    """ω at step 0: `given` normalised to sum 1 when given (trained peers first, then the fixed peers); otherwise the
    fixed peers' weights `fixed` as they are and the rest of the simplex shared equally by the trained peers."""
    if given is not None:
        total = sum(given)
        return [float(w) / total for w in given]
    rest = 1.0 - sum(fixed)
    return [rest / num_trained] * num_trained + [float(w) for w in fixed]
