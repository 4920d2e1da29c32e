"""The command-line options of each command that the library's errors name by config key, in tables.

For `cachekd train` / `cachekd distill` the table maps a config key to its option names; the option's type,
choices and help text come from the config tree itself (the field's annotation and its docstring,
`cachekd.train_config`), and errors about a key name its option too (``distill.alpha (--alpha) must be in [0, 1]
...``). For the other commands `COMMAND_OPTIONS` maps the keys of their configs and parameters (`PrecomputeConfig`,
`PrepareConfig`, the arguments of `audit`, `verify_path`, `evaluate`, ...) to the option that sets them, so an
error the library raises as ``top_k must be at least 1 (got 0).`` reads ``--top-k must be at least 1 (got 0).``
(`error_message`). The library knows nothing of these spellings.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

import click

from cachekd.errors import ConfigFieldError, ConfigKeysError, KeyedText
from cachekd_cli.single_options import SingleOptionsCommand

TRAIN_OPTIONS: dict[str, tuple[str, ...]] = {
    "data.store": ("--store",),
    "output": ("-o", "--output"),
    "name": ("--name",),
    "optim.max_steps": ("--max-steps",),
    "optim.max_time_s": ("--max-time",),
    "optim.epochs": ("--epochs",),
    "data.batch_size": ("--batch-size",),
    "optim.lr": ("--lr",),
    "device": ("--device",),
    "precision": ("--precision",),
    "seed": ("--seed",),
}
"""Config keys that both `cachekd train` and `cachekd distill` take as an option."""

DISTILL_OPTIONS: dict[str, tuple[str, ...]] = {
    "distill.cache": ("--cache",),
    "distill.objective": ("--objective",),
    "distill.temperature": ("--temperature",),
    "distill.ce_weight": ("--ce-weight",),
    "distill.alpha": ("--alpha",),
    "distill.tail_mode": ("--tail-mode",),
    "distill.teacher_combine": ("--teacher-combine",),
    "distill.teachers": ("--teachers",),
    "distill.chunk_size": ("--chunk-size",),
    "distill.online": ("--online",),
}
"""Config keys that `cachekd distill` also takes as an option."""


_RUN_OPTIONS = {"output": "--output", "force": "--force", "resume": "--resume", "max_steps": "--max-steps",
                "device": "--device"}
"""Parameters of a run (`RunDir.plan_start`, the trainer) that train, distill and cohort take as options."""

_PRECOMPUTE_OPTIONS = {
    "store": "--store", "teachers": "--teacher", "output": "--output", "top_k": "--top-k", "sample": "--sample",
    "proposal_temperature": "--proposal-temperature", "sample_seed": "--sample-seed", "full": "--full",
    "ensemble": "--ensemble", "ensemble_weights": "--ensemble-weights", "temperatures": "--temperatures",
    "logprob_step": "--logprob-step", "splits": "--splits", "batch_size": "--batch-size", "device": "--device",
    "dtype": "--dtype", "registry": "--registry", "part": "--part", "force": "--force",
    "factored": "--factored", "factored_dtype": "--factored-dtype", "factored_rounding": "--factored-rounding",
    "factored_rank": "--factored-rank", "factored_fit_windows": "--factored-fit-windows",
    "factored_fit_seed": "--factored-fit-seed",
}
"""`PrecomputeConfig` (with `cachekd.ensemble`'s checks of its ensemble fields) and `precompute(force=...)`."""

GROUP_OPTIONS = {"storage_option": "--storage-option", "chunk_cache": "--chunk-cache",
                 "chunk_cache_bytes": "--chunk-cache-size"}
"""The `cachekd` group's own options (before the command), which any command's errors may name."""

COMMAND_OPTIONS: dict[str, dict[str, str]] = {
    "precompute": _PRECOMPUTE_OPTIONS,
    "verify": {"store_path": "--store", "recompute": "--recompute", "repair": "--repair", "seed": "--seed"},
    "prepare": {  # `PrepareConfig`, `prepare(force=...)`
        "output": "--output", "seq_len": "--seq-len", "vocab_size": "--vocab-size", "tokenizer": "--tokenizer",
        "text_column": "--text-column", "doc_sep": "--doc-sep", "clean": "--clean", "dev_fraction": "--dev-fraction",
        "dev_mode": "--dev-mode", "seed": "--seed", "force": "--force",
    },
    "audit": {  # `audit(...)` and its `AuditOptions`
        "teacher": "--teacher", "teachers": "--teacher", "student": "--student", "positions": "--positions",
        "store_path": "--store", "objective": "--objective", "temperatures": "--temperatures", "top_k": "--top-k",
        "sample": "--sample", "hybrid_top_k": "--hybrid-top-k", "seed": "--seed",
    },
    "eval": {  # `evaluate(...)`, `dev_loss`, `minimal_pair_accuracy`, `distributed.resolve_device`
        "dev_store": "--dev", "split": "--split", "minimal_pairs": "--minimal-pairs", "prefix": "--prefix",
        "max_pairs": "--max-pairs", "pair_seed": "--pair-seed", "batch_size": "--batch-size", "device": "--device",
        "max_windows": "--max-windows", "against_cache": "--against-cache",
    },
    "train": _RUN_OPTIONS,
    "distill": _RUN_OPTIONS,
    "cohort": {"output": "--output", "store": "--store", "cache": "--cache", "max_steps": "--max-steps",
               "resume": "--resume", "force": "--force"},
    "demo": {"out": "--out", "device": "--device", "seed": "--seed"},
}
"""Per command: the config keys and parameters its errors name → the option that sets them."""


def option_label(command: str | None) -> Callable[[str], str | None]:
    """How `command`'s errors and notes name a key: by the option that sets it (for train and distill also the
    config keys of `TRAIN_OPTIONS` / `DISTILL_OPTIONS`), else as the key. A key prefixed with another command's
    name (``precompute.top_k``, in a note of distill's on how the cache was made) names that command's option."""
    table = COMMAND_OPTIONS.get(command or "", {})

    def label(key: str) -> str | None:
        other, _, rest = key.partition(".")
        return (table.get(key) or GROUP_OPTIONS.get(key)
                or (flag_of(key) if command in ("train", "distill") or (other == "distill" and command not in (
                    "cohort", "demo")) else None)  # a distill key named by another command: distill's option
                or (COMMAND_OPTIONS[other].get(rest) if other != command and other in COMMAND_OPTIONS else None))

    return label


def user_text(text: str, command: str | None) -> str:
    """A note of the library's for the user of `command`: a `KeyedText` names each key by its option."""
    return text.message(label=option_label(command)) if isinstance(text, KeyedText) else text


def error_message(e: ConfigFieldError | ConfigKeysError, command: str | None) -> str:
    """The sentence of a field-keyed error raised under `command`, naming each key by the option that sets it."""
    if isinstance(e, ConfigKeysError):
        return e.message(label=option_label(command))
    if command in ("train", "distill", "cohort", None):
        return field_error_message(e)
    return e.message(label=COMMAND_OPTIONS.get(command, {}).get(e.key))


def flag_of(key: str) -> str | None:
    """The long option that sets config ``key`` (``--alpha`` for ``distill.alpha``), or None."""
    names = TRAIN_OPTIONS.get(key) or DISTILL_OPTIONS.get(key)
    return next((n for n in names if n.startswith("--")), None) if names else None


def field_error_message(e: ConfigFieldError) -> str:
    """The error's sentence, naming the option beside the key where there is one."""
    flag = flag_of(e.key)
    return e.message(label=f"{e.key} ({flag})" if flag else None)


def _field(key: str) -> tuple[dataclasses.Field, Any, str]:
    """The dataclass field of config ``key``, its resolved type and its docstring."""
    from cachekd.config import field_docs
    from cachekd.train_config import TrainConfig

    cls: Any = TrainConfig
    *sections, name = key.split(".")
    for section in sections:
        cls = _dataclass_in(typing.get_type_hints(cls)[section])
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f, typing.get_type_hints(cls)[name], field_docs(cls).get(name, "")


def _dataclass_in(tp: Any) -> type:
    """``DistillConfig`` from ``DistillConfig | None``."""
    return next(a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a))


def _click_type(tp: Any, f: dataclasses.Field) -> tuple[Any, bool]:
    """(click type, is a flag) for a field's annotation: numbers and schedules as numbers, a Literal as a choice
    (unless the field also takes short names, which the config resolves), a list as comma-separated text."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = float if float in args else args[0]  # `Schedule | float`: a constant; `int | None`: an int
    if tp is bool:
        return None, True
    if typing.get_origin(tp) is typing.Literal:
        return (str if f.metadata.get("aliases") else click.Choice(typing.get_args(tp))), False
    if tp in (int, float):
        return tp, False
    return str, False


def config_options(table: dict[str, tuple[str, ...]]) -> list[click.Option]:
    """One click option per config key of ``table``, typed and documented by the config field; unset, it leaves
    the config's value alone."""
    opts = []
    for key, names in table.items():
        f, tp, doc = _field(key)
        click_type, is_flag = _click_type(tp, f)
        doc = doc.replace('``', '')
        help_text = f"{doc.rstrip('.')} ({key})." if doc else f"Config value {key}."
        if is_flag:
            opts.append(click.Option(list(names), is_flag=True, default=False, help=help_text))
        else:
            opts.append(click.Option(list(names), type=click_type, default=None, help=help_text))
        opts[-1].config_key = key  # type: ignore[attr-defined]
    return opts


def overrides_from_options(ctx_params: dict[str, Any], params: list[click.Parameter]) -> dict[str, Any]:
    """The nested config mapping set by the given options (a flag only when on)."""
    out: dict[str, Any] = {}
    for p in params:
        key = getattr(p, "config_key", None)
        value = ctx_params.get(p.name)
        if key is None or value is None or value is False:
            continue
        node = out
        *sections, name = key.split(".")
        for s in sections:
            node = node.setdefault(s, {})
        node[name] = value
    return out


class ConfigCommand(SingleOptionsCommand):
    """A command whose options are built on first use (its help or a run) by ``build_params``, so starting the
    CLI does not import the config tree's modules (and torch with them)."""

    def __init__(self, *args: Any, build_params: Callable[[], list[click.Parameter]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._build_params: Callable[[], list[click.Parameter]] | None = build_params

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if self._build_params is not None:
            build, self._build_params = self._build_params, None
            self.params[:0] = build()
        return super().get_params(ctx)
