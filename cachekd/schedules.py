"""Schedules for the mixing α, the CE weight λ, the temperature τ or any other scalar of training.

A ``Schedule`` is a small frozen dataclass; ``value(step, total_steps, epoch, total_epochs)`` is a pure function,
so resuming a run needs only the step and epoch counters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULE_KINDS = ("constant", "epoch_linear", "linear", "cosine")
EPOCH_LINEAR_MIN_EPOCHS = 2
"""An ``epoch_linear`` schedule decays per epoch in runs of at least this many epochs, per step in shorter ones."""


@dataclass(frozen=True)
class Schedule:
    """A scalar that changes over training.

    * ``constant``: always ``start``.
    * ``epoch_linear``: ChooBaCa's per-epoch decay with a floor, ``max(end, start·(1 − e/E))`` for epoch ``e``
      (0-based) of ``E`` epochs: constant within an epoch. A run of fewer than two epochs (E = 1: it ends within
      its first epoch, e.g. a short ``max_steps``) would never leave ``start``, so there the fraction of training
      done takes the place of e/E: ``max(end, start·(1 − s/S))`` at step ``s`` of ``S``, the same decay, per step.
    * ``linear`` / ``cosine``: per step from ``start`` (at step ``warmup_steps``) to ``end`` (at ``total_steps``),
      linearly or along a half cosine; held at ``end`` afterwards.

    With ``warmup_steps > 0`` the value first goes linearly from ``end`` to ``start`` over the first
    ``warmup_steps`` steps (``linear``/``cosine`` only; for example a mixing α that ramps up, then decays).
    """

    kind: str = "constant"
    """constant | epoch_linear | linear | cosine."""
    start: float = 1.0
    """Value at the start (after any warmup)."""
    end: float = 0.0
    """Final value (linear, cosine) or floor (epoch_linear); unused by constant."""
    warmup_steps: int = 0
    """linear/cosine: steps spent going from ``end`` up to ``start`` first."""

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}.")
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"schedule {name} must be a finite number (got {value!r}).")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"schedule warmup_steps must be an integer >= 0 (got {self.warmup_steps!r}).")
        if self.warmup_steps and self.kind not in ("linear", "cosine"):
            raise ValueError(f"schedule warmup_steps applies to linear and cosine schedules, not {self.kind!r}.")

    def value(self, step: int, total_steps: int, epoch: int, total_epochs: int) -> float:
        """The value at optimizer step ``step`` (0-based) of ``total_steps``, in epoch ``epoch`` (0-based) of
        ``total_epochs``. Arguments a kind does not use are ignored."""
        if self.kind == "constant":
            return float(self.start)
        if self.kind == "epoch_linear":
            if total_epochs < 1:
                raise ValueError(f"total_epochs must be >= 1 for an epoch_linear schedule (got {total_epochs}).")
            if total_epochs < EPOCH_LINEAR_MIN_EPOCHS:
                if total_steps < 1:
                    raise ValueError(f"total_steps must be >= 1 for an epoch_linear schedule (got {total_steps}).")
                return float(max(self.end, self.start * (1.0 - min(step, total_steps) / total_steps)))
            return float(max(self.end, self.start * (1.0 - epoch / total_epochs)))
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 for a {self.kind} schedule (got {total_steps}).")
        if step < self.warmup_steps:
            return float(self.end + (self.start - self.end) * step / self.warmup_steps)
        span = total_steps - self.warmup_steps
        frac = 1.0 if span <= 0 else min(1.0, max(0.0, (step - self.warmup_steps) / span))
        if self.kind == "linear":
            return float(self.start + (self.end - self.start) * frac)
        return float(self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * frac)))
