"""The exception types whose message is meant for the user."""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Callable
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


Label = Callable[[str], "str | None"]
"""Another name for a config key or parameter (a command-line option), or None to keep the key."""


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


class ConfigKeysError(CachekdError):
    """A refusal whose sentence names config keys (or a call's parameters), as data, for any sentence that is not
    one key's range (`ConfigFieldError`): ``template`` writes each key as ``{key}`` and each value as ``{name}``
    given in ``values`` (``"{top_k} {k} is larger than the vocabulary"``, ``k=70``; format specs such as ``{tau:g}``
    apply to values). The message names the keys as they are (``top_k 70 is larger ...``); a front end that knows
    other names for them (command-line options) builds the same sentence with ``message(label=...)``."""

    def __init__(self, template: str, **values: Any):
        self.template, self.values = template, values
        super().__init__(self.message())

    @property
    def keys(self) -> list[str]:
        """The config keys the sentence names, in order."""
        return [field for _, field, spec, conversion in _template_parts(self.template)
                if field is not None and field not in self.values and _is_key(field, spec, conversion)]

    def message(self, label: Label | None = None) -> str:
        """The sentence, each key named by ``label(key)`` where that gives a name, else as it is."""
        return keyed_sentence(self.template, label, **self.values)


class KeyedText(str):
    """A sentence for the user that is not an error (a note) and names config keys, as data: the string is the
    library's sentence, keys as they are; a front end that knows other names for them (command-line options)
    builds the same sentence with ``message(label=...)``. ``template`` and ``values`` as for `ConfigKeysError`."""

    template: str
    values: dict[str, Any]

    def __new__(cls, template: str, **values: Any) -> KeyedText:
        text = super().__new__(cls, keyed_sentence(template, None, **values))
        text.template, text.values = template, values
        return text

    def message(self, label: Label | None = None) -> str:
        """The sentence, each key named by ``label(key)`` where that gives a name, else as it is."""
        return keyed_sentence(self.template, label, **self.values)


def _template_parts(template: str) -> list[tuple[str, str | None, str | None, str | None]]:
    try:
        return list(string.Formatter().parse(template))
    except ValueError:  # not a template (a message re-raised as the type, e.g. from a DataLoader worker)
        return [(template, None, None, None)]


def keyed_sentence(template: str, label: Label | None = None, **values: Any) -> str:
    """``template`` (see `ConfigKeysError`) with ``values`` filled in and each config key named by ``label(key)``
    where that gives a name, else as it is: for sentences a report returns rather than raises."""
    out = []
    for literal, field, spec, conversion in _template_parts(template):
        out.append(literal)
        if field is None:
            continue
        if field in values:
            value = values[field]
            value = repr(value) if conversion == "r" else str(value) if conversion == "s" else value
            out.append(format(value, spec or ""))
        elif _is_key(field, spec, conversion):
            out.append((label(field) if label else None) or field)
        else:  # not a key (a message given as the template, holding a dict's repr): kept as written
            out.append("{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}")
    return "".join(out)


_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _is_key(field: str, spec: str | None, conversion: str | None) -> bool:
    """A ``{field}`` of a template that names a config key (``top_k``, ``distill.tail_mode``)."""
    return bool(_KEY.fullmatch(field)) and not spec and not conversion
