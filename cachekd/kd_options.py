"""The options of the distillation term, declared once: the losses' `KDConfig` and the training config's
`distill:` section both derive from `KDOptions`. Torch-free, so the command line can read the fields (types,
choices, docstrings) without importing the losses.

Every range check of these fields is here and raises `ConfigFieldError` naming the field; the training config
re-raises it for ``distill.<field>`` (`ConfigFieldError.within`).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cachekd.errors import ConfigFieldError

Objective = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv"]
TailMode = Literal["bucket", "uniform", "renormalize"]
TeacherCombine = Literal["logits", "probs", "losses"]
Reduction = Literal["token_mean", "batchmean"]

OBJECTIVES: tuple[str, ...] = typing.get_args(Objective)
TAIL_MODES: tuple[str, ...] = typing.get_args(TailMode)
TEACHER_COMBINES: tuple[str, ...] = typing.get_args(TeacherCombine)
REDUCTIONS: tuple[str, ...] = typing.get_args(Reduction)

# Short names accepted for the objective in YAML, --set and --objective alike (stored by the full name).
OBJECTIVE_ALIASES = {"forward": "forward_kl", "fkl": "forward_kl", "reverse": "reverse_kl", "rkl": "reverse_kl",
                     "skew_forward": "skew_forward_kl", "skew_reverse": "skew_reverse_kl"}

TEMPERATURE_RULE = "a positive number"
TEMPERATURE_REASON = "the logits are divided by it"


def is_real(x: object) -> bool:
    """A finite int or float (not a bool, not NaN or ±inf)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_temperature(value: Any) -> bool:
    """τ > 0 and finite."""
    return is_real(value) and value > 0


def in_unit_interval(value: Any) -> bool:
    """A finite number in [0, 1]."""
    return is_real(value) and 0 <= value <= 1


def check_temperature(key: str, value: Any, reason: str = "") -> None:
    if not is_temperature(value):
        raise ConfigFieldError(key, TEMPERATURE_RULE, value, reason)


def check_unit_interval(key: str, value: Any, reason: str = "") -> None:
    if not in_unit_interval(value):
        raise ConfigFieldError(key, "in [0, 1]", value, reason)


def check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigFieldError(key, f"one of {', '.join(choices)}", value)


@dataclass(frozen=True)
class KDOptions:
    """How the divergence between teacher and student is formed (everything but the temperature)."""

    objective: Objective = field(default="forward_kl", metadata={"aliases": OBJECTIVE_ALIASES})
    """Divergence between teacher target p and student q: forward_kl KL(p‖q), reverse_kl KL(q‖p), jsd
    (generalised Jensen-Shannon with ``beta``), skew_forward_kl KL(p‖λp+(1−λ)q), skew_reverse_kl
    KL(q‖λq+(1−λ)p), tv (total variation ½Σ|p−q|); short names forward, reverse, fkl, rkl also work."""
    beta: float = 0.5
    """JSD weight β in [0, 1]: β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q; 0 and 1 give 0."""
    skew_lambda: float = 0.1
    """Skew KL λ in [0, 1] (DistiLLM uses 0.1); 0 is the plain KL, 1 gives 0."""
    tail_mode: TailMode = "bucket"
    """How the teacher's tail beyond a top-k cache's ids is treated: bucket (the tail is one extra category on
    both sides: the exact divergence of the coarse-grained distributions; where mixing or combining teachers by
    logits or probs needs a dense target, the tail mass is shaped like the student, which gives the same),
    uniform (the tail mass spread evenly over the V−k other tokens), renormalize (drop the tail and renormalise
    both sides over the k ids: the biased baseline; no dense target)."""
    teacher_combine: TeacherCombine = "logits"
    """Several teachers: logits (weighted mean of raw logits, then the tempered softmax: Baby Llama), probs
    (weighted mean of the tempered probabilities), losses (weighted sum of the per-teacher divergences). A single
    teacher ignores it."""
    teacher_weights: tuple[float, ...] | None = None
    """One non-negative weight per teacher, normalised to sum 1; None gives equal weights."""
    detach_mix: bool = True
    """Mixing only: detach the student's logits inside the mixed target (the target moves with the student but
    is not a path for gradients)."""
    reduction: Reduction = "token_mean"
    """token_mean: the KD count is the number of non-ignored positions. batchmean (Baby Llama's
    ``F.kl_div(reduction="batchmean")``, sum over positions, mean over sequences): the same sum, but the count is
    the number of sequences B."""

    def __post_init__(self) -> None:
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("tail_mode", self.tail_mode, TAIL_MODES)
        check_choice("teacher_combine", self.teacher_combine, TEACHER_COMBINES)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_unit_interval("beta", self.beta)
        check_unit_interval("skew_lambda", self.skew_lambda)
        weights = self.teacher_weights
        if weights is not None:
            if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) == 0:
                raise ConfigFieldError("teacher_weights", "a non-empty list of numbers, one per teacher", weights)
            if not all(is_real(w) and w >= 0 for w in weights):
                raise ConfigFieldError("teacher_weights", "finite and >= 0", list(weights))
            if sum(weights) <= 0:
                raise ConfigFieldError("teacher_weights", "a list with at least one positive weight", list(weights))
            object.__setattr__(self, "teacher_weights", tuple(float(w) for w in weights))
        if not isinstance(self.detach_mix, bool):
            raise ConfigFieldError("detach_mix", "true or false", self.detach_mix)

    def kd_options(self) -> dict[str, Any]:
        """The `KDOptions` fields of this object, by name (to build a `KDConfig` from a subclass)."""
        from dataclasses import fields

        return {f.name: getattr(self, f.name) for f in fields(KDOptions)}
