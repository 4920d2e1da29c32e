"""One training loop for plain language-model training (`cachekd train`) and distillation (`cachekd distill`).

Components: the run directory (`cachekd.rundir.RunDir`: layout, state, metrics, model/ and summary.json), its
checkpoints (`cachekd.checkpoint.CheckpointManager`) and the teachers (`cachekd.teachers.TeacherSource`: a logit
cache or live models). The stages of a step are methods: `batches` (aligned tokens + cached teacher outputs),
`targets` (the teacher source's targets for a micro-batch), `micro_step` (forward, loss as local sums,
backward), `train_step` (global counts, optimizer, schedules) and `train` (the loop, evaluation, checkpoints,
metrics).

Loss normalisation: each micro-batch's loss is its local *sum* divided by the *global* number of tokens (or
sequences, for `batchmean`) of the whole optimizer step, known before the forward from the labels. So gradient
accumulation and data parallelism give the same update as one big batch.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from cachekd import distributed
from cachekd.batch import IGNORE_INDEX, Batch
from cachekd.config import OBJECTIVE_ALIASES, show_value, from_dict, to_dict
from cachekd.errors import CachekdError
from cachekd.loader import Order
from cachekd.models import ModelConfig
from cachekd.schedules import Schedule
from cachekd.student import Norms, Placement, StepPlan, Student
from cachekd.teachers import CachedTeachers, TeacherSource, open_teacher_source


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
    """Dev windows scored at each evaluation (0: all of them)."""
    order_seed: int | None = None
    """Seed of the window order (null: the run's seed). A cohort's peers share one order with their own seeds."""


@dataclass
class OptimConfig:
    """AdamW with a cosine schedule after a linear warmup."""

    lr: float = 3e-4
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
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs for the schedule length)."""
    max_time_s: float | None = None
    """Stop once this much training wall time has passed (for equal-compute comparisons); the LR schedule still
    follows max_steps/epochs."""


@dataclass
class DistillConfig:
    """The distillation term. Every constant is a config value; defaults follow Baby Llama where it is known."""

    cache: str | None = None
    """Logit cache made by `cachekd precompute` (not needed with `online`)."""
    teachers: list[str] = field(default_factory=list)
    """Subset of the cache's teachers (empty: all); with `online`, teacher checkpoints to run live."""
    online: bool = False
    """Run the teachers live at every step instead of reading the cache (the baseline for benchmarks)."""
    objective: str = "forward_kl"
    """forward_kl | reverse_kl | jsd | skew_forward_kl | skew_reverse_kl | tv."""
    temperature: Schedule | float = 2.0
    """τ (Baby Llama: 2; BabyLlama-2: 1). A top-k cache only has tail_lse for the temperatures it was built with."""
    ce_weight: Schedule | float = 0.5
    """λ in λ·CE + (1−λ)·τ²·KD (Baby Llama α=0.5)."""
    alpha: Schedule | float = 1.0
    """ChooBaCa mixing coefficient: target logits α·z_T + (1−α)·z_S; 1 = no mixing. A schedule such as
    {kind: epoch_linear, start: 0.9, end: 0.5} gives the progressive α."""
    tail_mode: str = "bucket"
    """bucket | uniform | renormalize (top-k caches); mixing needs uniform."""
    teacher_combine: str = "logits"
    """logits (Baby Llama: average raw logits) | probs | losses."""
    teacher_weights: list[float] | None = None
    beta: float = 0.5
    """JSD β."""
    skew_lambda: float = 0.1
    """Skew KL λ."""
    detach_mix: bool = True
    reduction: str = "token_mean"
    """token_mean (default) | batchmean (Baby Llama compatibility: sum over positions, mean over sequences)."""
    chunk_size: int | None = None
    """Step-wise loss: positions per chunk; the student's logits are formed chunk by chunk and never all exist."""

    def __post_init__(self) -> None:
        self.objective = OBJECTIVE_ALIASES.get(self.objective, self.objective)


@dataclass
class TrainConfig:
    """Everything `cachekd train` and `cachekd distill` need; saved as config.yaml with every run."""

    name: str = "run"
    output: str = ""
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, model/ (HF format), summary.json."""
    seed: int = 0
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, cuda:N."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype of the forward; fp16 uses a gradient scaler (CUDA only)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig | None = None
    """None: plain language-model training (cross-entropy)."""
    log_every: int = 10
    eval_every: int = 0
    """Steps between dev evaluations (0: only at the end)."""
    save_every: int = 200
    """Steps between resumable checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    tensorboard: bool = False

    def __post_init__(self) -> None:
        validate_config(self)


    def kd_config(self, temperature: float):
        from cachekd.losses import KDConfig

        d = self.distill
        assert d is not None
        try:
            return KDConfig(
                objective=d.objective, temperature=temperature, beta=d.beta, skew_lambda=d.skew_lambda,
                tail_mode=d.tail_mode, teacher_combine=d.teacher_combine,
                teacher_weights=tuple(d.teacher_weights) if d.teacher_weights else None,
                detach_mix=d.detach_mix, reduction=d.reduction,
            )
        except ValueError as e:
            msg = str(e)  # "unknown tail_mode 'x'; ..." or "beta must be in [0, 1] ...": name the config key
            words = msg.split(" ")
            i = 1 if msg.startswith("unknown ") else 0
            if len(words) > i and hasattr(d, words[i]):
                words[i] = key_name(f"distill.{words[i]}")
                raise CachekdError(" ".join(words)) from None
            raise CachekdError(f"distill: {msg}") from None


# ------------------------------------------------------------------------------------------------ validation
# Every value check of a training config happens here, when the config is built: before a run directory is
# created, replaced or resumed, so a bad value never costs an earlier run or leaves a half-made one behind.

CLI_FLAGS = {
    "data.batch_size": "--batch-size", "optim.lr": "--lr", "optim.epochs": "--epochs", "optim.max_steps": "--max-steps",
    "optim.max_time_s": "--max-time", "distill.temperature": "--temperature", "distill.ce_weight": "--ce-weight",
    "distill.alpha": "--alpha", "distill.chunk_size": "--chunk-size", "distill.tail_mode": "--tail-mode",
    "distill.teacher_combine": "--teacher-combine", "device": "--device", "seed": "--seed",
}
"""Config keys that `cachekd train` / `cachekd distill` also take as an option; errors name both."""


def key_name(key: str) -> str:
    """``distill.alpha (--alpha)`` for a key with a command-line option, else the key."""
    flag = CLI_FLAGS.get(key)
    return f"{key} ({flag})" if flag else key


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise CachekdError(f"{key_name(key)} must be {rule} (got {show_value(value)}).")


def _check_int(key: str, value: Any, minimum: int, rule: str | None = None, optional: bool = False) -> None:
    if optional and value is None:
        return
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, key,
             rule or f"a whole number of at least {minimum}", value)


def _check_scalar(key: str, value: Any, ok, rule: str, extra: str = "") -> None:
    """`value` is a plain number or a Schedule; every value the schedule can take must pass `ok`."""
    from cachekd.schedules import Schedule

    if isinstance(value, Schedule):
        points = [("start", value.start)] if value.kind == "constant" else [("start", value.start), ("end", value.end)]
        for part, v in points:
            if not ok(v, part, value.kind):
                raise CachekdError(f"{key}.{part} ({value.kind} schedule) must be {rule} (got {show_value(v)}).")
        return
    if not (_is_num(value) and ok(value, "start", "constant")):
        raise CachekdError(f"{key_name(key)} must be {rule} (got {show_value(value)}){extra}.")


def validate_config(cfg: TrainConfig) -> None:
    """Refuse any value of `cfg` that cannot work, with one sentence naming the key (and its option)."""
    d, o = cfg.data, cfg.optim
    _check_int("data.batch_size", d.batch_size, 1)
    _check_int("data.micro_batch_size", d.micro_batch_size, 1, "a whole number of at least 1, or null for no "
               "gradient accumulation", optional=True)
    _check_int("data.block_chunks", d.block_chunks, 1)
    _check_int("data.prefetch", d.prefetch, 1)
    _check_int("data.num_workers", d.num_workers, 0)
    _check_int("data.eval_windows", d.eval_windows, 0, "a whole number of at least 0 (0: every dev window)")
    _require(_is_num(o.lr) and o.lr > 0, "optim.lr", "a positive number", o.lr)
    _require(_is_num(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay)
    for k in ("beta1", "beta2"):
        v = getattr(o, k)
        _require(_is_num(v) and 0 <= v < 1, f"optim.{k}", "in [0, 1)", v)
    _require(_is_num(o.eps) and o.eps > 0, "optim.eps", "a positive number", o.eps)
    _check_int("optim.warmup_steps", o.warmup_steps, 0)
    _require(_is_num(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "in [0, 1]", o.min_lr_ratio)
    _require(_is_num(o.grad_clip) and o.grad_clip >= 0, "optim.grad_clip", "a number >= 0 (0: no clipping)",
             o.grad_clip)
    _check_int("optim.max_steps", o.max_steps, 1, "a whole number of at least 1 (leave it unset, null, for no step "
               "limit)", optional=True)
    if o.max_steps is None:
        _check_int("optim.epochs", o.epochs, 1, "a whole number of at least 1 (or set optim.max_steps)")
    if o.max_time_s is not None:
        _require(_is_num(o.max_time_s) and o.max_time_s >= 0, "optim.max_time_s", "a number of seconds >= 0, or null "
                 "for no time limit", o.max_time_s)
    _check_int("log_every", cfg.log_every, 1)
    _check_int("eval_every", cfg.eval_every, 0, "a whole number of at least 0 (0: evaluate only at the end)")
    _check_int("save_every", cfg.save_every, 0, "a whole number of at least 0 (0: checkpoint only at the end)")
    _check_int("keep_checkpoints", cfg.keep_checkpoints, 1)
    if cfg.precision == "fp16" and cfg.device == "cpu":
        raise CachekdError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU.")
    ds = cfg.distill
    if ds is None:
        return
    _check_scalar("distill.temperature", ds.temperature,
                  lambda v, part, kind: v > 0 or (part == "end" and kind == "epoch_linear" and v == 0),
                  "a positive number", ": the logits are divided by it")
    _check_scalar("distill.ce_weight", ds.ce_weight, lambda v, part, kind: 0 <= v <= 1, "in [0, 1]",
                  ": it is λ in λ·CE + (1−λ)·τ²·KD, so 1 means cross-entropy only and 0 distillation only")
    _check_scalar("distill.alpha", ds.alpha, lambda v, part, kind: 0 <= v <= 1, "in [0, 1]",
                  ": it is the teacher's share of the mixed target logits, 1 meaning no mixing")
    _check_int("distill.chunk_size", ds.chunk_size, 1, "a whole number of positions of at least 1, or null for no "
               "step-wise loss", optional=True)
    tau = ds.temperature if _is_num(ds.temperature) else ds.temperature.start
    cfg.kd_config(float(tau))  # objective, beta, skew_lambda, tail_mode, teacher_combine, weights, reduction


# Fields that may change between a run and its resumption.
RUNTIME_ONLY = {"output", "device", "log_every", "tensorboard", "save_every", "keep_checkpoints", "eval_every"}
RUNTIME_ONLY_DATA = {"prefetch", "num_workers"}


def config_identity(cfg: TrainConfig) -> dict[str, Any]:
    d = to_dict(cfg)
    for k in RUNTIME_ONLY:
        d.pop(k, None)
    for k in RUNTIME_ONLY_DATA:
        d["data"].pop(k, None)
    if d["data"].get("order_seed") is None:  # runs from before data.order_seed existed have the same identity
        d["data"].pop("order_seed", None)
    d["optim"].pop("max_time_s", None)
    d["optim"].pop("max_steps", None)
    return d


def as_schedule(v: Schedule | float) -> Schedule:
    return v if isinstance(v, Schedule) else Schedule(kind="constant", start=float(v), end=float(v))


def load_train_config(data: dict[str, Any]) -> TrainConfig:
    """TrainConfig from a YAML mapping; schedules may be written as plain numbers."""
    return from_dict(TrainConfig, data, "config")


# ---------------------------------------------------------------------------------------------- trainer


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped a single-process run at a step boundary, after saving a checkpoint there. A
    KeyboardInterrupt, so code that handles Ctrl-C (and no `except Exception`) handles it too."""

    def __init__(self, step: int, total_steps: int, checkpoint: Path, signum: int):
        super().__init__(f"interrupted at step {step}")
        self.step, self.total_steps, self.checkpoint, self.signum = step, total_steps, checkpoint, signum


class Trainer:
    """The loop: one batch stream, the step counter, signals, evaluation, checkpoints and metrics, for one student
    (`cachekd train` / `distill`) or several fed by the same batches (a cohort: `configs` holds one config each,
    all sharing the first's data section, window order and length)."""

    def __init__(self, cfg: TrainConfig | list[TrainConfig], *, resume: bool = False, force: bool = False,
                 progress: bool = True, say: Callable[[str], None] | None = None):
        from cachekd.models import quiet_transformers
        from cachekd.tokens import TokenStore

        quiet_transformers()
        configs = list(cfg) if isinstance(cfg, (list, tuple)) else [cfg]
        self.progress, self.say = progress, say or (lambda msg: None)
        lead = configs[0]
        rank, world, local_rank = distributed.setup()
        device = distributed.resolve_device(lead.device, local_rank)
        if lead.precision == "fp16" and device.type != "cuda":
            raise CachekdError(f"precision fp16 needs a CUDA device (the device is {device}); use bf16 or fp32.")
        if not all(c.output for c in configs):
            raise CachekdError("no output directory given: pass --output DIR.")
        amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[lead.precision]
        self.place = Placement(rank, world, device, amp)
        self.rank, self.world, self.is_main, self.device = rank, world, rank == 0, device
        self.store = TokenStore.open(lead.data.store)
        self.plan = StepPlan.of(lead, self.store.num_windows("train"), world)
        self.total_steps, self.steps_per_epoch = self.plan.total_steps, self.plan.steps_per_epoch
        self.order = Order(self.store.num_windows("train"), self.store.chunk_windows, self.plan.global_batch,
                           seed=order_seed(lead), block_chunks=lead.data.block_chunks, shuffle=lead.data.shuffle)
        self.students = [self._build_student(c) for c in configs]
        self.step, self.tokens_seen, self.wall_s = 0, 0, 0.0
        self._stop_signal: int | None = None
        self._prepare_output(resume, force)
        self._last_log = (time.perf_counter(), self.tokens_seen)  # (time, tokens) of the last train record

    def _build_student(self, cfg: TrainConfig) -> Student:
        """A student with its teacher source (the cache's, or live teachers with --online)."""
        source = None
        if cfg.distill is not None:
            tau, _, alpha = (as_schedule(v) for v in (cfg.distill.temperature, cfg.distill.ce_weight,
                                                      cfg.distill.alpha))
            source = open_teacher_source(cfg.distill, self.store, temperature=tau, alpha=alpha, device=self.device,
                                         autocast=self.place.autocast)
        return Student(cfg, self.place, self.plan, self.store, source, config_identity(cfg),
                       lambda data: config_identity(load_train_config(data)))

    # ------------------------------------------------------------------ the one student of train / distill
    @property
    def cfg(self) -> TrainConfig:
        return self.students[0].cfg

    @property
    def model(self) -> torch.nn.Module:
        return self.students[0].model

    @property
    def teacher_source(self) -> TeacherSource | None:
        return self.students[0].teacher_source

    @property
    def mode(self) -> str:
        return "distill" if self.cfg.distill is not None else "train"

    def targets(self, batch: Batch, input_ids: torch.Tensor, temperature: float | None = None) -> list:
        """The first student's loss targets for a micro-batch (cached or live teachers); [] without teachers."""
        return self.students[0].targets(batch, input_ids)

    # ------------------------------------------------------------------------------------------ output
    def _prepare_output(self, resume: bool, force: bool) -> None:
        """Create each student's run directory, or resume / replace the run in it. Runs after every check of the
        configs; a cohort resumes only when all its students stopped at the same checkpoint step."""
        plans = [s.run_dir.plan_start(resume=resume, force=force) for s in self.students]
        if plans[0].action == "resume":
            steps = {p.checkpoint.name if p.checkpoint else None for p in plans}
            if len(steps) > 1 or any(p.action != "resume" for p in plans):
                raise CachekdError("the students' last checkpoints are not at the same step; pass --force to start over.")
            for s, p in zip(self.students, plans):
                s.checkpoints.check_same_length(s.cfg.optim.max_steps)
                state = s.load_checkpoint(p.checkpoint)
            self.step, self.tokens_seen, self.wall_s = state["step"], state["tokens"], state["wall_s"]
            return
        for s, p in zip(self.students, plans):
            if p.action == "restart":
                # Stopped before its first checkpoint: start again from step 0 in the same directory, same config.
                s.checkpoints.check_saved_config()
                if self.is_main:
                    s.run_dir.reset_metrics()
                    self.say(f"{s.run_dir.path} has no checkpoint yet: starting it again from step 0.")
            elif p.replace and self.is_main:
                kept = s.run_dir.remove_run_files()
                if kept:
                    self.say(f"--force: replaced the run in {s.run_dir.path}; kept what cachekd did not write "
                             f"there: {', '.join(kept)}")
        self.place.barrier()
        for s, p in zip(self.students, plans):
            if p.action == "new" and self.is_main:
                s.run_dir.create(s.cfg)

    def _save_checkpoint(self) -> Path | None:
        """Write every student's resumable checkpoint of the current step (rank 0); returns the first's path."""
        counters = {"tokens": self.tokens_seen, "wall_s": self.wall_s}
        paths = [s.save_checkpoint(self.step, counters) for s in self.students]
        return paths[0]

    def _log(self, record: dict[str, Any], student: Student | None = None) -> None:
        (student or self.students[0]).log(record)

    # ---------------------------------------------------------------------------------- stages
    def batch_generator(self) -> Iterator[Batch]:
        """This process's batches from the current step on: tokens and the cached outputs of every teacher any
        student reads (one read and decode of the store and the cache for all students)."""
        from cachekd.loader import CachedBatches, Prefetcher

        cached = self.cached_sources()
        names = list(dict.fromkeys(n for src in cached for n in src.names))
        tails = {src.tail_index for src in cached}
        ds = CachedBatches(
            self.store, "train", self.order, rank=self.rank, world=self.world,
            cache=cached[0].cache if cached else None, teachers=names if cached else None,
            temperature_index=tails.pop() if len(tails) == 1 else None,  # several: keep all, each student picks
            start_epoch=self.step // self.steps_per_epoch, start_step=self.step % self.steps_per_epoch,
        )
        pin = self.device.type == "cuda"
        workers = self.cfg.data.num_workers
        if workers > 0:
            return iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=pin,
                                                    prefetch_factor=self.cfg.data.prefetch, persistent_workers=False))
        return Prefetcher(iter(ds), depth=self.cfg.data.prefetch, pin=pin)

    batches = batch_generator

    def cached_sources(self) -> list[CachedTeachers]:
        """The logit-cache teacher sources the batch stream serves (one cache for all of them)."""
        return [s.teacher_source for s in self.students if isinstance(s.teacher_source, CachedTeachers)]

    def global_norms(self, batch: Batch) -> Norms:
        """The step's global token and sequence counts (summed over processes)."""
        counts = torch.tensor([batch.num_tokens(IGNORE_INDEX), batch.labels.shape[0]], dtype=torch.float64,
                              device=self.device)
        n_tok, n_seq = distributed.all_reduce(counts, self.world).tolist()
        return Norms(n_tok, n_seq)

    def train_step(self, batch: Batch) -> dict[str, Any]:
        """One optimizer step of every student on `batch`: {"tokens": global tokens, "students": [metrics]}, and
        the first student's metrics at the top level."""
        batch = batch.to(self.device)
        norms = self.global_norms(batch)
        metrics = [s.train_step(batch, self.step, norms) for s in self.students]
        return {**metrics[0], "tokens": int(norms.num_tokens), "students": metrics}

    def evaluate(self) -> list[float | None]:
        """Every student's dev loss (None without a dev split)."""
        return [s.evaluate() for s in self.students]

    def train(self) -> dict[str, Any]:
        """Run the loop to the end (or the time budget); returns the (first student's) summary. In a single
        process, SIGINT/SIGTERM stop it at the next step boundary with a checkpoint there (TrainingInterrupted); a
        second one aborts."""
        from tqdm.auto import tqdm

        for s in self.students:
            s.open_tensorboard()
        self._mark_running(True)
        try:
            previous = self._install_signal_handlers()
            try:
                stop_reason = self._loop(tqdm)
            finally:
                self._restore_signal_handlers(previous)
            if stop_reason == "signal":
                path = self.students[0].checkpoints.path_for(self.step)
                if not path.exists():
                    path = self._save_checkpoint()
                for s in self.students:
                    s.close_tensorboard()
                raise TrainingInterrupted(self.step, self.total_steps, path, self._stop_signal)
            self._save_checkpoint()
            dev = self._eval_and_log()
            return self._finish(dev, stop_reason)
        finally:
            self._mark_running(False)

    def _loop(self, tqdm) -> str:
        """Optimizer steps until the end; returns why it stopped: steps, epochs, time or signal."""
        cfg = self.cfg
        it = self.batch_generator()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{self.mode} {cfg.name}", unit="step",
                   disable=not (self.progress and self.is_main), dynamic_ncols=True)
        self._last_log = (time.perf_counter(), self.tokens_seen)
        # max_steps given: the run ends at that step; otherwise it ends when its epochs are done.
        stop_reason = "steps" if cfg.optim.max_steps is not None else "epochs"
        start_step, start_wall = self.step, self.wall_s
        try:
            while self.step < self.total_steps:
                if self._stop_signal is not None:
                    return "signal"
                if cfg.optim.max_time_s is not None and self._time_is_up(start_step, start_wall):
                    return "time"
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except Exception:
                    if self._stop_signal is not None:  # e.g. DataLoader workers killed by the same Ctrl-C
                        return "signal"
                    raise
                m = self.train_step(batch)
                self.step += 1
                self.tokens_seen += m["tokens"]
                self.wall_s += time.perf_counter() - t0
                bar.update(1)
                self._after_step(m, bar)
        finally:
            bar.close()
            if hasattr(it, "close"):
                try:
                    it.close()
                except Exception:  # a loader broken by the interrupt: the interrupt is what is reported
                    if self._stop_signal is None:
                        raise
        return stop_reason

    def _after_step(self, m: dict[str, Any], bar) -> None:
        """Log the step's metrics every log_every steps; evaluate and checkpoint on their schedules."""
        cfg = self.cfg
        if self.step % cfg.log_every == 0 or self.step == self.total_steps:
            now = time.perf_counter()
            tps = (self.tokens_seen - self._last_log[1]) / max(now - self._last_log[0], 1e-9)
            self._last_log = (now, self.tokens_seen)
            for s, sm in zip(self.students, m["students"]):
                s.log({"kind": "train", "step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch,
                       "tokens": self.tokens_seen, "wall_s": round(self.wall_s, 4), "loss": sm["loss"],
                       "ce": sm["ce"], "kd": sm.get("kd"), "alpha": sm.get("alpha"), "ce_weight": sm.get("ce_weight"),
                       "temperature": sm.get("temperature"), "lr": sm["lr"], "grad_norm": sm["grad_norm"],
                       "tokens_per_s": tps})
            bar.set_postfix(loss=f"{m['loss']:.3f}", ce=f"{m['ce']:.3f}")
        if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
            self._eval_and_log()
        if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
            self._save_checkpoint()

    # ---------------------------------------------------------------------------------- interrupts
    def _install_signal_handlers(self) -> dict[int, Any] | None:
        """In a single process on the main thread: SIGINT and SIGTERM set a flag the loop checks after each
        optimizer step. Multi-process runs keep the default (an interrupt stops at once; --resume goes back to the
        last periodic checkpoint), since the ranks would have to agree on the step to stop at."""
        if self.world > 1 or threading.current_thread() is not threading.main_thread():
            return None
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any] | None) -> None:
        for sig, handler in (previous or {}).items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:
            raise KeyboardInterrupt  # the second one: abort now
        self._stop_signal = signum
        self.say(f"\n{signal.Signals(signum).name} received: stopping after the current step and saving a checkpoint "
                 f"({'press Ctrl-C' if signum == signal.SIGINT else 'send it'} again to abort at once).")

    def _mark_running(self, on: bool) -> None:
        if self.is_main:
            for s in self.students:
                s.run_dir.mark_running(on)

    def _time_is_up(self, start_step: int, start_wall: float) -> bool:
        """Whether another step would end past optim.max_time_s (judged by this run's mean step time so far), so
        a run stops within its time budget instead of overrunning it by one step."""
        done = self.step - start_step
        mean_step = (self.wall_s - start_wall) / done if done else 0.0
        budget = self.cfg.optim.max_time_s
        up = torch.tensor([1.0 if self.wall_s >= budget or self.wall_s + mean_step > budget else 0.0])
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast(up, 0)
        return bool(up.item())

    def _eval_and_log(self) -> list[float | None]:
        devs = self.evaluate() if self.is_main else [None] * len(self.students)
        for s, dev in zip(self.students, devs):
            if dev is not None:
                s.log({"kind": "dev", "step": self.step, "tokens": self.tokens_seen, "wall_s": round(self.wall_s, 4),
                       "dev_loss": dev})
        return devs

    def _finish(self, devs: list[float | None], stop_reason: str) -> dict[str, Any]:
        """Every student's model/ and summary.json; returns the first student's summary (all in self.summaries)."""
        common = {"steps": self.step, "tokens": self.tokens_seen, "wall_s": round(self.wall_s, 3),
                  "tokens_per_s": self.tokens_seen / self.wall_s if self.wall_s else None,
                  "stopped_by": stop_reason, "processes": self.world}
        out = []
        for s, dev in zip(self.students, devs):
            ppl = math.exp(dev) if dev is not None and dev < 50 else None
            out.append(s.finish({**common, "final_dev_loss": dev, "final_dev_ppl": ppl}))
        self.place.barrier()
        self.summaries = out
        return out[0]


def order_seed(cfg: TrainConfig) -> int:
    """The seed of the window order: data.order_seed, or the run's seed."""
    return cfg.data.order_seed if cfg.data.order_seed is not None else cfg.seed


def run(cfg: TrainConfig, *, resume: bool = False, force: bool = False, progress: bool = True,
        say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train or distil according to `cfg`; returns the run summary. `say` receives notes for the user (what
    --force kept, an interrupt being handled). A single-process run stopped by SIGINT/SIGTERM raises
    TrainingInterrupted after saving a checkpoint at the step it reached."""
    return Trainer(cfg, resume=resume, force=force, progress=progress, say=say).train()
