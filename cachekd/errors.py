"""The exception types whose message is meant for the user."""

from __future__ import annotations

import json
import math
from typing import Any


class CachekdError(ValueError):
    """Bad input or state a user can fix. The CLI prints the message (one sentence) and exits non-zero."""


class NonFiniteError(CachekdError):
    """A training step whose loss or gradient norm is not finite: the run stops before the optimizer applies it."""


def check_finite(who: str, step: int, values: dict[str, float]) -> None:
    """Raise `NonFiniteError` naming `who` (a run) and `step` when any of `values` (a loss, a gradient norm) is
    not finite: a run whose loss or gradient is inf or NaN has failed and must not go on (or end with exit 0)."""
    bad = [f"{name} is {value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise NonFiniteError(
            f"{who}: at step {step} the {' and the '.join(bad)}, so the run stops before applying it (its last "
            f"checkpoint is kept); verify the teacher cache and check the objective, temperature and learning rate.")


def show_value(value: Any) -> str:
    """A value as it would be written in YAML/JSON (true, [1, 2], "text"), not as a Python repr."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


class ConfigFieldError(CachekdError):
    """A config value outside its allowed range, as data: which key, the rule it breaks, the value given.

    The message reads ``{key} must be {rule} (got {value}): {reason}.``; a front end that knows another name for
    the key (a command-line option) builds the same sentence with ``message(label=...)`` instead of parsing it.
    A value inside a schedule names its point (``part``: start / end) and the schedule's ``kind``.
    """

    def __init__(self, key: str, rule: str, value: Any, reason: str = "", part: str | None = None,
                 kind: str | None = None):
        self.key, self.rule, self.value, self.reason, self.part, self.kind = key, rule, value, reason, part, kind
        super().__init__(self.message())

    def message(self, label: str | None = None) -> str:
        """The sentence, with ``label`` in place of the key (not used for a point of a schedule, which only a
        config file can give)."""
        if self.part is not None:
            where = f"{self.key}.{self.part} ({self.kind} schedule)"
        else:
            where = label or self.key
        reason = f": {self.reason}" if self.reason else ""
        return f"{where} must be {self.rule} (got {show_value(self.value)}){reason}."

    def within(self, section: str) -> ConfigFieldError:
        """The same error for a field of a nested section: key ``beta`` becomes ``distill.beta``."""
        return ConfigFieldError(f"{section}.{self.key}", self.rule, self.value, self.reason, self.part, self.kind)
