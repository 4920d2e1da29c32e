"""The losses' shared types, at the bottom of the package (every other module of ``cachekd.losses`` may import
them; they import none of it): the dense, top-k and factored teacher targets, ``KDConfig`` and ``LossParts``."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from cachekd.batch import IGNORE_INDEX
from cachekd.errors import ConfigFieldError
from cachekd.kd_options import KDOptions, check_temperature


@dataclass
class DenseTarget:
    """Full teacher logits for every position."""

    logits: Tensor
    """(B, T, V) teacher logits, any float dtype."""


@dataclass
class SparseTarget:
    """Top-k teacher logits plus the log-sum-exp of the rest, as the logit cache stores them."""

    ids: Tensor
    """(B, T, k) integer token ids, distinct within each row, in any order."""
    logits: Tensor
    """(B, T, k) teacher logits at ``ids``, up to an additive constant per position (the cache stores τ=1
    log-probabilities; they are treated as shift-invariant logits)."""
    tail_lse: Tensor
    """(B, T) logsumexp over the ids NOT in ``ids`` of ``logit_v / τ`` at the loss temperature τ, in the same
    per-position shift as ``logits``; ``-inf`` when k == V (no tail)."""


@dataclass
class FactoredTarget:
    """A teacher's full logits as the product of its output layer and that layer's input (a factored cache):
    ``logits = hidden @ weight.T + bias``. The losses form them a chunk of rows at a time, in the compute dtype,
    and treat the teacher as a dense one in every other respect (every objective, τ, mixing, combination)."""

    hidden: Tensor
    """(B, T, d) float: the input of the teacher's output layer (in a factored cache: over its per-dimension scale,
    which ``weight`` holds)."""
    weight: Tensor
    """(V, d) float: the output layer's weight (rows beyond the vocabulary dropped)."""
    bias: Tensor | None = None
    """(V,) float, or None for a head without one."""


@dataclass(frozen=True)
class KDConfig(KDOptions):
    """How the distillation term is computed: the `KDOptions` (objective, tails, teachers, reduction) plus the
    temperature and the ignored label. Every field is validated on construction (`ConfigFieldError`, a
    ValueError naming the field)."""

    temperature: float = 1.0
    """τ > 0: both distributions are softmax(logits/τ). The trainer multiplies the KD term by τ²."""
    ignore_index: int = IGNORE_INDEX
    """Label value of positions that count for neither the cross-entropy nor the KD term (the loader's
    `cachekd.batch.IGNORE_INDEX`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_temperature("temperature", self.temperature)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ConfigFieldError("ignore_index", "an integer", self.ignore_index)


@dataclass
class LossParts:
    """Sums and counts over one micro-batch; divide by the global counts, then call ``total_loss``.

    Sums are float32 scalars (float64 for float64 student logits); counts are int64 scalars.
    """

    ce_sum: Tensor
    """Sum of the per-token hard-label cross-entropy (τ = 1) over non-ignored positions."""
    ce_count: Tensor
    """Number of non-ignored positions."""
    kd_sum: Tensor
    """Sum of the per-position divergence over non-ignored positions, NOT multiplied by τ²."""
    kd_count: Tensor
    """token_mean: number of non-ignored positions; batchmean: number of sequences B; 0 without teachers."""
