"""Peer search (the seed paper's "student model search"): find N diverse, good student shapes within a size range.

The paper searched (layers, heads, hidden size) by Bayesian optimisation. Here: **successive halving over a
random pool**. A seeded random sample of distinct shapes within the parameter range is trained for
``rung_steps`` steps; the better half (by dev loss) goes on to a rung with twice as many steps, and so on until
``keep`` shapes are left or the budget is spent. Why: at a few hundred steps a candidate, the early ranking is
informative enough that spending the budget on the survivors beats spending it evenly (plain random search), it
needs no surrogate model, and every decision is a pure function of (seed, space, results so far), so a stopped
search resumes by re-deriving its plan and skipping candidates whose results are recorded.

This module is the pure part: the shape space, the parameter count, the sampling, the rungs and the choice of
the final N. `cachekd.cohort.search_run` trains the candidates.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Shape:
    """A LLaMA student shape: the search's three coordinates (the FFN width follows the hidden size)."""

    num_layers: int
    num_heads: int
    hidden_size: int

    @property
    def intermediate_size(self) -> int:
        """Feed-forward width: 2·hidden (Baby Llama's student: 512 → 1024), rounded to a multiple of 8."""
        return 8 * math.ceil(2 * self.hidden_size / 8)

    @property
    def name(self) -> str:
        return f"L{self.num_layers}-H{self.num_heads}-D{self.hidden_size}"


def llama_num_params(shape: Shape, vocab_size: int, tie_embeddings: bool = False) -> int:
    """Parameters of `cachekd.models.build_model` for this LLaMA shape (embeddings, per layer 4·D² attention +
    3·D·F MLP + 2 RMSNorms, final norm, LM head unless tied)."""
    d, f = shape.hidden_size, shape.intermediate_size
    per_layer = 4 * d * d + 3 * d * f + 2 * d
    head = 0 if tie_embeddings else vocab_size * d
    return vocab_size * d + shape.num_layers * per_layer + d + head


def candidate_shapes(*, layers: tuple[int, int], heads: tuple[int, ...], hidden_sizes: tuple[int, ...],
                     vocab_size: int, min_params: int, max_params: int) -> list[Shape]:
    """Every shape of the space whose parameter count lies in [min_params, max_params] and whose hidden size the
    heads divide, in a fixed order."""
    out = []
    for num_layers in range(layers[0], layers[1] + 1):
        for num_heads in heads:
            for hidden in hidden_sizes:
                if hidden % num_heads or (hidden // num_heads) % 2:  # RoPE needs an even head dimension
                    continue
                s = Shape(num_layers, num_heads, hidden)
                if min_params <= llama_num_params(s, vocab_size) <= max_params:
                    out.append(s)
    return sorted(out)


def sample_shapes(space: list[Shape], num: int, seed: int) -> list[Shape]:
    """`num` distinct shapes drawn without replacement (all of them when the space is smaller), seeded."""
    rng = random.Random(seed)
    return rng.sample(space, min(num, len(space)))


@dataclass(frozen=True)
class Rung:
    """One round of successive halving: which shapes train, and for how many steps in total."""

    index: int
    steps: int
    shapes: tuple[Shape, ...]


def next_rung(previous: Rung, dev_losses: dict[Shape, float], *, keep: int, eta: int = 2) -> Rung | None:
    """The survivors of `previous` (the best 1/eta by dev loss, at least `keep`) trained `eta` times longer; None
    when `previous` already had `keep` shapes or fewer (the search is over)."""
    if len(previous.shapes) <= keep:
        return None
    ranked = sorted(previous.shapes, key=lambda s: (dev_losses[s], s))
    survivors = ranked[:max(keep, math.ceil(len(ranked) / eta))]
    return Rung(previous.index + 1, previous.steps * eta, tuple(survivors))


def rung_cost(rung: Rung) -> int:
    """Training steps a rung spends (each candidate trained from scratch for `rung.steps`)."""
    return rung.steps * len(rung.shapes)


def best_distinct(dev_losses: dict[Shape, float], keep: int) -> list[Shape]:
    """The `keep` best shapes by dev loss (ties by shape); shapes are distinct by construction, so the cohort's
    peers differ in shape."""
    return sorted(dev_losses, key=lambda s: (dev_losses[s], s))[:keep]
