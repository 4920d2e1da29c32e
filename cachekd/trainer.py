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

import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from cachekd import distributed
from cachekd.batch import IGNORE_INDEX, Batch
from cachekd.errors import CachekdError, ConfigKeysError
from cachekd.loader import Order
from cachekd.rundir import RunDir, StartPlan, common_checkpoint_step
from cachekd.student import Norms, Placement, StepPlan, Student
from cachekd.teachers import CachedTeachers, TeacherSource, open_teacher_source
from cachekd.train_config import TrainConfig, config_identity, load_train_config


# ---------------------------------------------------------------------------------------------- trainer


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped a single-process run at a step boundary, after saving a checkpoint there. A
    KeyboardInterrupt, so code that handles Ctrl-C (and no `except Exception`) handles it too."""

    def __init__(self, step: int, total_steps: int, checkpoint: Path, signum: int):
        super().__init__(f"interrupted at step {step}")
        self.step, self.total_steps, self.checkpoint, self.signum = step, total_steps, checkpoint, signum


class DiskFull(CachekdError):
    """A full disk stopped the run in `where`; it continues from the checkpoint of `step` (None: from step 0).
    Every file was written whole or not at all: no temporary file is left."""

    def __init__(self, where: Path, step: int | None):
        self.where, self.step = where, step
        super().__init__(self.message())

    def message(self, how: str = "by resuming it") -> str:
        """The sentence, saying `how` to continue (a front end names its command)."""
        last = f"step {self.step}, the last checkpoint" if self.step is not None else "step 0 (no checkpoint yet)"
        return (f"the disk is full (writing in {str(self.where)!r}), so the run stopped; free space, then continue it "
                f"from {last}, {how}.")


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
            raise ConfigKeysError("no output directory given: pass {output} DIR.")
        amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[lead.precision]
        self.place = Placement(rank, world, device, amp)
        self.rank, self.world, self.is_main, self.device = rank, world, rank == 0, device
        self.store = TokenStore.open(lead.data.store)
        self.store.check_chunks([s for s in ("train", "dev") if s in self.store.splits()])  # not only when reached
        self.plan = StepPlan.of(lead, self.store.num_windows("train"), world)
        self.total_steps, self.steps_per_epoch = self.plan.total_steps, self.plan.steps_per_epoch
        self.order = Order(self.store.num_windows("train"), self.store.chunk_windows, self.plan.global_batch,
                           seed=order_seed(lead), block_chunks=lead.data.block_chunks, shuffle=lead.data.shuffle)
        self.students = [self._build_student(c) for c in configs]
        self.step, self.tokens_seen, self.wall_s = 0, 0, 0.0
        self._stop_signal: int | None = None
        self._claimed: list[RunDir] = []
        self.resumed_from: int | None = None  # the checkpoint step the run resumed from
        weakref.finalize(self, _release, self._claimed)  # a trainer dropped without training lets its runs go
        try:
            self._prepare_output(resume, force)
        except BaseException:
            _release(self._claimed)
            raise
        self._last_log = (time.perf_counter(), self.tokens_seen)  # (time, tokens) of the last train record

    def _build_student(self, cfg: TrainConfig) -> Student:
        """A student with its teacher source (the cache's, or live teachers with --online)."""
        source = None
        if cfg.distill is not None:
            source = open_teacher_source(cfg.distill, self.store, device=self.device, autocast=self.place.autocast)
            for note in source.notes if self.is_main else ():
                self.say(note)
        return Student(cfg, self.place, self.plan, self.store, source, config_identity(cfg),
                       lambda data: config_identity(load_train_config(data)), say=self.say)

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
    def run_dirs(self) -> list[RunDir]:
        """Every run directory this trainer writes: each student's (a cohort adds its own)."""
        return [s.run_dir for s in self.students]

    def _prepare_output(self, resume: bool, force: bool) -> None:
        """Claim each student's run directory (refused while another process trains it), then create it, or resume
        / replace the run in it. Runs after every check of the configs. A cohort resumes from the last checkpoint
        step all its run directories hold (a crash or a full disk between two students' writes leaves one student
        a checkpoint ahead): the newer checkpoints are removed; with none in common, it starts again from step 0."""
        plans = [s.run_dir.plan_start(resume=resume, force=force, check_live=self.is_main) for s in self.students]
        resume_step = self.resumed_from = self._common_step() if resume else None
        if self.is_main:
            self._claim()
        if resume_step is not None:
            for s in self.students:
                s.checkpoints.check_same_length(s.cfg.optim.max_steps)
            self._resume_from(resume_step)
            if self.is_main:  # (only once every checkpoint of the step was found good)
                for d in self.run_dirs():
                    d.drop_checkpoints_after(resume_step)
            return
        if resume:
            plans = [StartPlan("restart") for _ in plans]
        for s, p in zip(self.students, plans):
            if p.action == "restart":
                # Stopped before its first checkpoint: start again from step 0 in the same directory, same config.
                s.checkpoints.check_saved_config()
                if self.is_main:
                    s.run_dir.drop_checkpoints_after(0)
                    s.run_dir.reset_metrics()
                    self.say(f"{s.run_dir.path} has no checkpoint yet: starting it again from step 0.")
            elif p.replace and self.is_main:
                kept = s.run_dir.remove_run_files()
                if kept:
                    self.say(f"replaced the run in {s.run_dir.path} as asked; kept what cachekd did not write "
                             f"there: {', '.join(kept)}")
        self.place.barrier()
        for s, p in zip(self.students, plans):
            if p.action == "new" and self.is_main:
                s.run_dir.create(s.cfg)

    def _resume_from(self, step: int) -> None:
        """Load every student's checkpoint of `step` and the loop's counters."""
        for s in self.students:
            state = s.load_checkpoint(s.checkpoints.path_for(step))
        self.step, self.tokens_seen, self.wall_s = state["step"], state["tokens"], state["wall_s"]

    def _common_step(self) -> int | None:
        """The checkpoint step a resume starts from: the last one every run directory holds; None (start again
        from step 0) when there is none, said when some directory had one."""
        dirs = self.run_dirs()
        last = [d.last_checkpoint_step for d in dirs]
        step = common_checkpoint_step(dirs)
        if len(set(last)) > 1 and self.is_main:
            where = "; ".join(f"{d.path}: {'none' if n is None else f'step {n}'}" for d, n in zip(dirs, last))
            then = f"resuming every one from step {step}, the last they all hold" if step is not None else \
                "they hold none in common, so every one starts again from step 0"
            self.say(f"the last checkpoints differ ({where}): {then}.")
        return step

    def _claim(self) -> None:
        """Claim every run directory for this process (`RunDir.claim`) until the trainer is done with them."""
        for d in self.run_dirs():
            d.claim()
            self._claimed.append(d)

    def _save_checkpoint(self) -> Path | None:
        """Write every student's resumable checkpoint of the current step (rank 0), then delete the old ones: the
        older checkpoints stay until every student has the new one, so a run cut off between two students' writes
        resumes from the last step they all hold. Returns the first student's path."""
        counters = {"tokens": self.tokens_seen, "wall_s": self.wall_s}
        paths = [s.save_checkpoint(self.step, counters) for s in self.students]
        self._save_own_checkpoint()
        if self.is_main:
            for m in self.checkpoint_managers():
                m.rotate()
        return paths[0]

    def _save_own_checkpoint(self) -> None:
        """What a subclass saves beside the students' checkpoints of the step (a cohort: ω)."""

    def checkpoint_managers(self) -> list[Any]:
        """The checkpoint managers of every run directory (a cohort adds its own)."""
        return [s.checkpoints for s in self.students]

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
        batch = batch.to(self.device).decode()  # the cache's stored values, decoded on the device
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
        except Exception as e:
            from cachekd.io import is_disk_full

            if not is_disk_full(e):
                raise
            # (the run's directory, a cohort's own; the step every run directory holds a checkpoint of)
            raise DiskFull(self.run_dirs()[-1].path, common_checkpoint_step(self.run_dirs())) from None
        finally:
            _release(self._claimed)

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
                       **s.dev_record(dev)})
        return devs

    def summary_fields(self) -> dict[str, Any]:
        """What every student's summary.json adds from the loop that trained it (none for train / distill)."""
        return {}

    def _finish(self, devs: list[float | None], stop_reason: str) -> dict[str, Any]:
        """Every student's model/ and summary.json; returns the first student's summary (all in self.summaries)."""
        common = {"steps": self.step, "tokens": self.tokens_seen, "wall_s": round(self.wall_s, 3),
                  "tokens_per_s": self.tokens_seen / self.wall_s if self.wall_s else None,
                  "stopped_by": stop_reason, "processes": self.world, **self.summary_fields()}
        out = [s.finish({**common, **s.final_dev(dev)}) for s, dev in zip(self.students, devs)]
        self.place.barrier()
        self.summaries = out
        return out[0]


def _release(claimed: list[RunDir]) -> None:
    """End the claims a trainer took (`RunDir.claim`), once."""
    while claimed:
        claimed.pop().release()


def order_seed(cfg: TrainConfig) -> int:
    """The seed of the window order: data.order_seed, or the run's seed."""
    return cfg.data.order_seed if cfg.data.order_seed is not None else cfg.seed


def run(cfg: TrainConfig, *, resume: bool = False, force: bool = False, progress: bool = True,
        say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train or distil according to `cfg`; returns the run summary. `say` receives notes for the user (what
    --force kept, an interrupt being handled). A single-process run stopped by SIGINT/SIGTERM raises
    TrainingInterrupted after saving a checkpoint at the step it reached."""
    return Trainer(cfg, resume=resume, force=force, progress=progress, say=say).train()
