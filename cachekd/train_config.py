"""The training config tree: what `cachekd train` and `cachekd distill` run, saved as RUN/config.yaml.

``TrainConfig`` holds a ``DataConfig``, an ``OptimConfig``, the student's ``ModelConfig`` and, for distillation,
a ``DistillConfig``, whose divergence fields are the losses' own (`KDOptions`, shared with `KDConfig`), so the
YAML ``distill:`` section and the loss options cannot drift apart. Every value check happens here, when the tree
is built (before a run directory is created, replaced or resumed), and raises ``ConfigFieldError`` (key, rule,
value): the library never names command-line options; the CLI adds them when it prints the error. Quantities
derived from the config (micro-batch, accumulation steps, tokens per step) are methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from cachekd.config import from_dict, to_dict
from cachekd.errors import CachekdError, ConfigFieldError
from cachekd.kd_options import (
    TEMPERATURE_REASON,
    TEMPERATURE_RULE,
    KDOptions,
    check_unit_interval,
    in_unit_interval,
    is_real,
    is_temperature,
)
from cachekd.models import ModelConfig
from cachekd.schedules import Schedule


@dataclass
class DataConfig:
    """Which windows, in which order, in what batches."""

    store: str = ""
    """Token store made by `cachekd prepare`."""
    batch_size: int = 32
    """Global batch: windows per optimizer step, over all processes and accumulation steps."""
    micro_batch_size: int | None = None
    """Windows per forward in one process; None = batch_size / processes (no gradient accumulation)."""
    block_chunks: int = 8
    """Shuffle buffer, in whole chunks of ~4096 positions."""
    shuffle: bool = True
    prefetch: int = 4
    """Batches read and decoded ahead by the background loader thread."""
    num_workers: int = 0
    """DataLoader worker processes (0: a background thread in this process, which is usually enough)."""
    eval_windows: int = 512
    """Dev windows scored at each evaluation: a fixed, seeded sample drawn from every source in proportion, the
    same for every run on the store, logged as dev_loss_sample (0, or at least the dev split: all of them, logged
    as dev_loss)."""
    order_seed: int | None = None
    """Seed of the window order (null: the run's seed). A cohort's peers share one order with their own seeds."""

    def local_batch(self, world_size: int) -> int:
        """Windows per optimizer step in one of ``world_size`` processes."""
        if self.batch_size % world_size:
            raise CachekdError(f"data.batch_size ({self.batch_size}) must be divisible by the number of processes "
                               f"({world_size}).")
        return self.batch_size // world_size

    def micro_batch(self, world_size: int) -> int:
        """Windows per forward in one process: micro_batch_size, or the whole per-process batch."""
        local = self.local_batch(world_size)
        micro = self.micro_batch_size or local
        if local % micro:
            raise CachekdError(f"the per-process batch ({local}) must be a multiple of data.micro_batch_size "
                               f"({micro}).")
        return micro

    def accumulation_steps(self, world_size: int) -> int:
        """Forwards (micro-batches) per optimizer step in each process."""
        return self.local_batch(world_size) // self.micro_batch(world_size)

    def tokens_per_step(self, window_length: int) -> int:
        """Positions in one optimizer step (all processes together) for windows of ``window_length`` tokens."""
        return self.batch_size * window_length


@dataclass
class OptimConfig:
    """AdamW with a cosine schedule after a linear warmup."""

    lr: float = 3e-4
    """Peak learning rate, reached after the warmup."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    """The cosine decays to lr · min_lr_ratio at the last step."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    epochs: int = 1
    """Epochs over the train split; max_steps overrides it."""
    max_steps: int | None = None
    """Stop after this many (at least 1) optimizer steps, which also sets the schedules' length; unset, the epochs
    decide."""
    max_time_s: float | None = None
    """Train for at most this many seconds: stop before a step that would, at the mean step time so far, end past
    it (for equal-compute comparisons); the LR schedule still follows max_steps/epochs."""


@dataclass(frozen=True)
class DistillConfig(KDOptions):
    """The distillation term: the loss options (`KDOptions`) plus the teachers and the scalars that may follow a
    schedule. Every constant is a config value; defaults follow Baby Llama where it is known."""

    cache: str | None = None
    """Logit cache made by `cachekd precompute` (not needed with online)."""
    teachers: list[str] = field(default_factory=list)
    """Subset of the cache's teachers, comma-separated (default: all); with online, teacher checkpoints to run
    live."""
    num_teachers: int | None = None
    """How many teachers this config is written for (the ChooBaCa presets: 1 for "one coach", 2); a run whose
    cache (or --teachers) gives another number is refused, naming the cache's teachers. null: any number."""
    online: bool = False
    """Run the teachers live at every step instead of reading the cache (the baseline for benchmarks)."""
    temperature: Schedule | float = 2.0
    """τ > 0 (Baby Llama: 2; BabyLlama-2: 1); a top-k cache only has tail_lse for the temperatures it was built
    with."""
    ce_weight: Schedule | float = 0.5
    """λ in [0, 1] in λ·CE + (1−λ)·τ²·KD (Baby Llama α=0.5; 1: cross-entropy only)."""
    alpha: Schedule | float = 1.0
    """ChooBaCa mixing α in [0, 1]: target logits α·z_T + (1−α)·z_S, 1 = no mixing (below 1 a sparse cache's rest
    is shaped like the student with tail_mode bucket, spread evenly with uniform; renormalize is refused). A schedule such as {kind: epoch_linear, start: 0.9, end: 0.5} gives the progressive α."""
    chunk_size: int | None = None
    """Step-wise loss over chunks of this many positions: the student's logits are formed chunk by chunk and
    never all exist."""

    key_order: ClassVar[tuple[str, ...]] = (
        "cache", "teachers", "num_teachers", "online", "objective", "temperature", "ce_weight", "alpha", "tail_mode",
        "teacher_combine", "teacher_weights", "beta", "skew_lambda", "detach_mix", "reduction", "chunk_size")
    """The order of the keys in a saved config.yaml: the teachers, then the loss from its main choices down."""

    def __post_init__(self) -> None:
        assert sorted(self.key_order) == sorted(f.name for f in fields(self)), "key_order lists every field once"
        if self.teacher_weights is not None and len(self.teacher_weights) == 0:
            object.__setattr__(self, "teacher_weights", None)  # `teacher_weights: []` means equal weights
        try:
            super().__post_init__()
        except ConfigFieldError as e:
            raise e.within("distill") from None
        _check_scalar("distill.temperature", self.temperature,
                      # an epoch_linear floor of 0 is never reached (the value stays above it)
                      lambda v, part, kind: is_temperature(v) or (part == "end" and kind == "epoch_linear" and v == 0),
                      TEMPERATURE_RULE, TEMPERATURE_REASON)
        _check_scalar("distill.ce_weight", self.ce_weight, lambda v, part, kind: in_unit_interval(v), "in [0, 1]",
                      "it is λ in λ·CE + (1−λ)·τ²·KD, so 1 means cross-entropy only and 0 distillation only")
        _check_scalar("distill.alpha", self.alpha, lambda v, part, kind: in_unit_interval(v), "in [0, 1]",
                      "it is the teacher's share of the mixed target logits, 1 meaning no mixing")
        _check_int("distill.num_teachers", self.num_teachers, 1, "a whole number of teachers of at least 1, or null "
                   "for any number", optional=True)
        _check_int("distill.chunk_size", self.chunk_size, 1, "a whole number of positions of at least 1, or null "
                   "for no step-wise loss", optional=True)

    def schedules(self) -> tuple[Schedule, Schedule, Schedule]:
        """(temperature, ce_weight, alpha) as schedules (a plain number is a constant one)."""
        return as_schedule(self.temperature), as_schedule(self.ce_weight), as_schedule(self.alpha)

    def mixing(self) -> bool:
        """Whether α is ever below 1 (the target mixes teacher and student logits)."""
        alpha = as_schedule(self.alpha)
        return alpha.kind != "constant" or alpha.start != 1.0

    def kd_config(self, temperature: float):
        """The losses' `KDConfig` for this section at temperature τ (the shared fields carried over as they are)."""
        from cachekd.losses import KDConfig

        try:
            return KDConfig(**self.kd_options(), temperature=temperature)
        except ConfigFieldError as e:
            raise e.within("distill") from None


@dataclass
class RunCadence:
    """How often a run (a training run, a cohort) logs, evaluates and checkpoints: options that may change when the
    run is resumed. Saved last in config.yaml (`key_order`)."""

    log_every: int = 10
    eval_every: int = 0
    """Steps between dev evaluations (0: only at the end)."""
    save_every: int = 200
    """Steps between resumable checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    tensorboard: bool = False


CADENCE_KEYS = ("log_every", "eval_every", "save_every", "keep_checkpoints", "tensorboard")


@dataclass
class RunPlacement(RunCadence):
    """What every run's config (a training run's, a cohort's) holds: its name, where it writes, its seed and where
    and in what precision it runs, plus the cadence fields of `RunCadence`. In config.yaml these come first and the
    cadence last (`key_order`); in `dataclasses.fields` the cadence comes first."""

    name: str = "run"
    """Run name, shown in progress bars and summary.json; `cachekd compare` labels runs by directory."""
    output: str = ""
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, model/ (HF format), summary.json."""
    seed: int = 0
    """Seed of the model's initialisation and of the data order."""
    device: str = "auto"
    """auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:N, mps."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype of the forward; fp16 uses a gradient scaler (CUDA only)."""


@dataclass
class TrainConfig(RunPlacement):
    """Everything `cachekd train` and `cachekd distill` need; saved as config.yaml with every run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig | None = None
    """None: plain language-model training (cross-entropy)."""

    key_order: ClassVar[tuple[str, ...]] = ("name", "output", "seed", "device", "precision", "model", "data", "optim",
                                            "distill", *CADENCE_KEYS)

    def __post_init__(self) -> None:
        validate_config(self)

    def kd_config(self, temperature: float):
        """The losses' `KDConfig` of the distill section at temperature τ."""
        assert self.distill is not None
        return self.distill.kd_config(temperature)


# ------------------------------------------------------------------------------------------------ validation
# Every value check of a training config happens here, when the config is built: before a run directory is
# created, replaced or resumed, so a bad value never costs an earlier run or leaves a half-made one behind. The
# loss options are checked by KDOptions itself (DistillConfig.__post_init__).


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigFieldError(key, rule, value)


def _check_int(key: str, value: Any, minimum: int, rule: str | None = None, optional: bool = False) -> None:
    if optional and value is None:
        return
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, key,
             rule or f"a whole number of at least {minimum}", value)


def _check_scalar(key: str, value: Any, ok, rule: str, reason: str = "") -> None:
    """`value` is a plain number or a Schedule; every value the schedule can take must pass `ok`."""
    if isinstance(value, Schedule):
        points = [("start", value.start)] if value.kind == "constant" else [("start", value.start), ("end", value.end)]
        for part, v in points:
            if not ok(v, part, value.kind):
                raise ConfigFieldError(key, rule, v, part=part, kind=value.kind)
        return
    if not ok(value, "start", "constant"):
        raise ConfigFieldError(key, rule, value, reason)


def validate_config(cfg: TrainConfig) -> None:
    """Refuse any value of `cfg` that cannot work (`ConfigFieldError` naming the key); the distill section checks
    itself when it is built."""
    d, o = cfg.data, cfg.optim
    _check_int("data.batch_size", d.batch_size, 1)
    _check_int("data.micro_batch_size", d.micro_batch_size, 1, "a whole number of at least 1, or null for no "
               "gradient accumulation", optional=True)
    _check_int("data.block_chunks", d.block_chunks, 1)
    _check_int("data.prefetch", d.prefetch, 1)
    _check_int("data.num_workers", d.num_workers, 0)
    _check_int("data.eval_windows", d.eval_windows, 0, "a whole number of at least 0 (0: every dev window)")
    _require(is_real(o.lr) and o.lr > 0, "optim.lr", "a positive number", o.lr)
    _require(is_real(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay)
    for k in ("beta1", "beta2"):
        v = getattr(o, k)
        _require(is_real(v) and 0 <= v < 1, f"optim.{k}", "in [0, 1)", v)
    _require(is_real(o.eps) and o.eps > 0, "optim.eps", "a positive number", o.eps)
    _check_int("optim.warmup_steps", o.warmup_steps, 0)
    check_unit_interval("optim.min_lr_ratio", o.min_lr_ratio)
    _require(is_real(o.grad_clip) and o.grad_clip >= 0, "optim.grad_clip", "a number >= 0 (0: no clipping)",
             o.grad_clip)
    _check_int("optim.max_steps", o.max_steps, 1, "a whole number of at least 1 (leave it unset, null, for no step "
               "limit)", optional=True)
    if o.max_steps is None:
        _check_int("optim.epochs", o.epochs, 1, "a whole number of at least 1 (or set optim.max_steps)")
    if o.max_time_s is not None:
        _require(is_real(o.max_time_s) and o.max_time_s >= 0, "optim.max_time_s", "a number of seconds >= 0, or "
                 "null for no time limit", o.max_time_s)
    _check_int("log_every", cfg.log_every, 1)
    _check_int("eval_every", cfg.eval_every, 0, "a whole number of at least 0 (0: evaluate only at the end)")
    _check_int("save_every", cfg.save_every, 0, "a whole number of at least 0 (0: checkpoint only at the end)")
    _check_int("keep_checkpoints", cfg.keep_checkpoints, 1)
    if cfg.precision == "fp16" and cfg.device == "cpu":
        raise CachekdError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU.")


# ------------------------------------------------------------------------------------------------ identity

RUNTIME_ONLY = {"output", "device", *CADENCE_KEYS}
"""Top-level fields that may change between a run and its resumption."""
RUNTIME_ONLY_DATA = {"prefetch", "num_workers"}
"""data.* fields that may change between a run and its resumption."""


def without_runtime_options(d: dict[str, Any]) -> dict[str, Any]:
    """A saved config (`to_dict` of a training run's or a cohort's) without the options that may change when the run
    is resumed (`RUNTIME_ONLY`, `RUNTIME_ONLY_DATA`) and its stop limits (optim.max_steps, optim.max_time_s)."""
    for k in RUNTIME_ONLY:
        d.pop(k, None)
    for k in RUNTIME_ONLY_DATA:
        d["data"].pop(k, None)
    for k in ("max_time_s", "max_steps"):
        d["optim"].pop(k, None)
    return d


def config_identity(cfg: TrainConfig) -> dict[str, Any]:
    """The config without what may change on resume (runtime options, the stop limits): what a checkpoint must
    match."""
    d = without_runtime_options(to_dict(cfg))
    if d["data"].get("order_seed") is None:  # runs from before data.order_seed existed have the same identity
        d["data"].pop("order_seed", None)
    if d.get("distill"):
        # A check on the teachers, not a training value (the teachers themselves are distill.teachers): checkpoints
        # saved before the key existed resume, and the check runs again when the teachers are opened.
        d["distill"].pop("num_teachers", None)
        # How many positions the step-wise loss forms at a time: memory, not arithmetic (any chunk size gives the
        # same loss and gradients up to float rounding), so a run may resume with another one.
        d["distill"].pop("chunk_size", None)
    return d


def as_schedule(v: Schedule | float) -> Schedule:
    """A plain number as a constant schedule; a schedule as it is."""
    return v if isinstance(v, Schedule) else Schedule(kind="constant", start=float(v), end=float(v))


def load_train_config(data: dict[str, Any]) -> TrainConfig:
    """TrainConfig from a YAML mapping; schedules may be written as plain numbers."""
    return from_dict(TrainConfig, data, "")
