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
import random
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cachekd import distributed
from cachekd.checkpoint import CheckpointManager
from cachekd.errors import CachekdError
from cachekd.rundir import RunDir
from cachekd.teachers import CachedTeachers, TeacherSource, open_teacher_source
from cachekd.train_config import DistillConfig, TrainConfig, config_identity, load_train_config


# ------------------------------------------------------------------------------------------------ setup


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _StudentLoss(torch.nn.Module):
    """The student plus its loss in one forward, so DistributedDataParallel sees every parameter use."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, targets, kd_cfg, alpha: float, chunk_size: int | None):
        from cachekd.losses import chunked_distill_loss, distill_loss
        from cachekd.models import backbone, output_embedding

        if chunk_size:
            hidden = backbone(self.model)(input_ids=input_ids).last_hidden_state
            head = output_embedding(self.model)
            return chunked_distill_loss(hidden, head.weight, getattr(head, "bias", None), labels, targets, kd_cfg,
                                        mix_alpha=alpha, chunk_size=chunk_size)
        logits = self.model(input_ids=input_ids).logits
        return distill_loss(logits, labels, targets, kd_cfg, mix_alpha=alpha)


# ---------------------------------------------------------------------------------------------- trainer


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped a single-process run at a step boundary, after saving a checkpoint there. A
    KeyboardInterrupt, so code that handles Ctrl-C (and no `except Exception`) handles it too."""

    def __init__(self, step: int, total_steps: int, checkpoint: Path, signum: int):
        super().__init__(f"interrupted at step {step}")
        self.step, self.total_steps, self.checkpoint, self.signum = step, total_steps, checkpoint, signum


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, force: bool = False, progress: bool = True,
                 say: Callable[[str], None] | None = None):
        from cachekd.loader import Order
        from cachekd.models import build_model, check_positions, count_parameters, quiet_transformers
        from cachekd.tokens import TokenStore

        quiet_transformers()
        self.cfg, self.progress = cfg, progress
        self.say = say or (lambda msg: None)
        self.rank, self.world, local_rank = distributed.setup()
        self.is_main = self.rank == 0
        self.device = distributed.resolve_device(cfg.device, local_rank)
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise CachekdError(f"precision fp16 needs a CUDA device (the device is {self.device}); use bf16 or fp32.")
        if not cfg.output:
            raise CachekdError("no output directory given: pass --output DIR.")
        self.out = Path(cfg.output)
        self.run_dir = RunDir(self.out)
        self.store = TokenStore.open(cfg.data.store)
        self.mode = "distill" if cfg.distill is not None else "train"

        self._open_teachers(cfg.distill)

        # Data order and step counts.
        G = cfg.data.batch_size
        self.local_batch = cfg.data.local_batch(self.world)
        self.micro = cfg.data.micro_batch(self.world)
        self.accum = cfg.data.accumulation_steps(self.world)
        self.order = Order(self.store.num_windows("train"), self.store.chunk_windows, G, seed=cfg.seed,
                           block_chunks=cfg.data.block_chunks, shuffle=cfg.data.shuffle)
        self.steps_per_epoch = self.order.steps_per_epoch()
        if self.steps_per_epoch < 1:
            raise CachekdError(f"the train split has {self.order.num_windows} windows, fewer than one batch of {G}; "
                               f"lower data.batch_size.")
        self.total_steps = cfg.optim.max_steps or cfg.optim.epochs * self.steps_per_epoch
        self.total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)

        # Model and optimiser.
        _seed_all(cfg.seed)
        special = self.store.manifest.get("special_tokens", {})
        self.model = build_model(cfg.model, self.store.vocab_size, self.store.seq_len, special).to(self.device)
        if cfg.model.init_from is not None:
            v = self.model.get_output_embeddings().weight.shape[0]
            if v < self.store.vocab_size:
                raise CachekdError(f"model.init_from has a vocabulary of {v}, smaller than the store's {self.store.vocab_size}.")
            check_positions(self.model, self.store.seq_len, f"model.init_from {cfg.model.init_from!r}")
        self.num_params = count_parameters(self.model)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.loss_module: torch.nn.Module = _StudentLoss(self.model)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.loss_module = DDP(self.loss_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        self.step, self.tokens_seen, self.wall_s = 0, 0, 0.0
        self._stop_signal: int | None = None
        self.checkpoints = CheckpointManager(self.run_dir, config_identity(cfg), keep=cfg.keep_checkpoints,
                                             identity_of_saved=lambda data: config_identity(load_train_config(data)))
        self._prepare_output(resume, force)

    # ---------------------------------------------------------------------------------- helpers
    def _lr_factor(self, step: int) -> float:
        o = self.cfg.optim
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        span = max(1, self.total_steps - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _open_teachers(self, d: DistillConfig | None) -> None:
        """The schedules of τ, λ and α, and the teacher side: the cache (default) or live teachers (--online)."""
        self.teacher_source: TeacherSource | None = None
        self.tau_sched = self.lam_sched = self.alpha_sched = None
        if d is not None:
            self.tau_sched, self.lam_sched, self.alpha_sched = d.schedules()
            self.teacher_source = open_teacher_source(d, self.store, device=self.device, autocast=self._autocast)
            for note in self.teacher_source.notes if self.is_main else ():
                self.say(note)

    def schedule_values(self, step: int) -> dict[str, float]:
        if self.cfg.distill is None:
            return {}
        epoch = step // self.steps_per_epoch
        args = dict(step=step, total_steps=self.total_steps, epoch=epoch, total_epochs=self.total_epochs)
        return {"temperature": self.tau_sched.value(**args), "ce_weight": self.lam_sched.value(**args),
                "alpha": self.alpha_sched.value(**args)}

    # ---------------------------------------------------------------------------------- output
    def _prepare_output(self, resume: bool, force: bool) -> None:
        """Create the run directory, or resume / replace the run in it. Runs after every check of the config."""
        plan = self.run_dir.plan_start(resume=resume, force=force)
        if plan.action == "resume":
            self.checkpoints.check_same_length(self.cfg.optim.max_steps)
            self._load_checkpoint(plan.checkpoint)
            return
        if plan.action == "restart":
            # Stopped before its first checkpoint: start again from step 0 in the same directory, same config.
            self.checkpoints.check_saved_config()
            if self.is_main:
                self.run_dir.reset_metrics()
                self.say(f"{self.out} has no checkpoint yet: starting it again from step 0.")
            self._barrier()
            return
        if plan.replace and self.is_main:
            kept = self.run_dir.remove_run_files()
            if kept:
                self.say(f"--force: replaced the run in {self.out}; kept what cachekd did not write there: "
                         f"{', '.join(kept)}")
        self._barrier()
        if self.is_main:
            self.run_dir.create(self.cfg)

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _save_checkpoint(self) -> Path | None:
        """Write a resumable checkpoint of the current step (rank 0); returns its path."""
        if not self.is_main:
            return None
        return self.checkpoints.save(self.step, {
            "tokens": self.tokens_seen, "wall_s": self.wall_s,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
        })

    def _load_checkpoint(self, path: Path) -> None:
        state = self.checkpoints.load(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens_seen, self.wall_s = state["step"], state["tokens"], state["wall_s"]
        if self.is_main:
            self.run_dir.truncate_metrics(self.step)  # records after the checkpoint will be logged again

    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.run_dir.append_metrics(record)
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step",) and v is not None:
                    self._tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    # ---------------------------------------------------------------------------------- stages
    def batches(self):
        """Local batches from the current step on (tokens + aligned cached teacher outputs)."""
        from cachekd.loader import CachedBatches, Prefetcher

        src = self.teacher_source if isinstance(self.teacher_source, CachedTeachers) else None
        ds = CachedBatches(
            self.store, "train", self.order, rank=self.rank, world=self.world,
            cache=src.cache if src else None, teachers=src.names if src else None,
            temperature_index=src.temperature_index(self.tau_sched.start) if src else None,
            start_epoch=self.step // self.steps_per_epoch, start_step=self.step % self.steps_per_epoch,
        )
        pin = self.device.type == "cuda"
        if self.cfg.data.num_workers > 0:
            return iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.cfg.data.num_workers,
                                                    pin_memory=pin, prefetch_factor=self.cfg.data.prefetch,
                                                    persistent_workers=False))
        return Prefetcher(iter(ds), depth=self.cfg.data.prefetch, pin=pin)

    def targets(self, batch: dict[str, Any], input_ids: torch.Tensor, temperature: float) -> list:
        """Loss targets for a micro-batch, from the teacher source (cached or live teachers); [] without one."""
        if self.teacher_source is None:
            return []
        return self.teacher_source.targets(batch, input_ids)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        from cachekd.loader import to_device
        from cachekd.losses import KDConfig

        sv = self.schedule_values(self.step)
        tau = sv.get("temperature", 1.0)
        lam = sv.get("ce_weight", 1.0)
        alpha = sv.get("alpha", 1.0)
        kd_cfg = self.cfg.kd_config(tau) if self.cfg.distill is not None else KDConfig()
        batch = to_device(batch, self.device)
        labels_all = batch["labels"]
        counts = torch.tensor([(labels_all != -100).sum().item(), labels_all.shape[0]], dtype=torch.float64,
                              device=self.device)
        n_tok, n_seq = distributed.all_reduce(counts, self.world).tolist()
        kd_norm = n_seq if kd_cfg.reduction == "batchmean" else n_tok
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # CE sum, KD sum
        self.model.train()
        for i in range(self.accum):
            sl = slice(i * self.micro, (i + 1) * self.micro)
            x, y = batch["input_ids"][sl], batch["labels"][sl]
            micro_batch = {"teachers": {t: {k: v[sl] for k, v in d.items()} for t, d in batch.get("teachers", {}).items()}}
            targets = self.targets(micro_batch, x, tau)
            sync = self.world == 1 or i == self.accum - 1
            ctx = self.loss_module.no_sync() if not sync and hasattr(self.loss_module, "no_sync") else nullcontext()
            with ctx:
                with self._autocast():
                    parts = self.loss_module(x, y, targets, kd_cfg, alpha, self.cfg.distill.chunk_size if self.cfg.distill else None)
                ce = parts.ce_sum.float() / max(n_tok, 1)
                if targets:
                    loss = lam * ce + (1 - lam) * tau**2 * (parts.kd_sum.float() / max(kd_norm, 1))
                else:
                    loss = ce
                loss = loss * self.world  # DDP averages gradients over processes; our sums are already global
                if self.scaler:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            sums += torch.stack([parts.ce_sum.detach().double(), parts.kd_sum.detach().double()])
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                               self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf"))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        distributed.all_reduce(sums, self.world)
        ce_mean = sums[0].item() / max(n_tok, 1)
        out = {"ce": ce_mean, "lr": lr, "grad_norm": float(gnorm), "tokens": int(n_tok)}
        if self.cfg.distill is not None:
            kd_mean = sums[1].item() / max(kd_norm, 1)
            out.update({"kd": kd_mean, "loss": lam * ce_mean + (1 - lam) * tau**2 * kd_mean,
                        "alpha": alpha, "ce_weight": lam, "temperature": tau})
        else:
            out["loss"] = ce_mean
        return out

    def evaluate(self) -> float | None:
        """The periodic dev loss: on a fixed sample of `data.eval_windows` dev windows drawn from every source
        (`cachekd.tokens.reader.dev_sample`, the same for every run on the store), or the whole dev split when
        that is no larger; `self.dev_sample` says which."""
        from cachekd.evaluate import dev_loss
        from cachekd.tokens.reader import dev_sample

        if "dev" not in self.store.splits() or self.store.num_windows("dev") == 0:
            return None
        if getattr(self, "dev_sample", None) is None:
            self.dev_sample = dev_sample(self.store, self.cfg.data.eval_windows)
            if self.dev_sample.note:
                self.say(self.dev_sample.note)
        res = dev_loss(self.model, self.store, split="dev", batch_size=self.micro, device=self.device,
                       windows=None if self.dev_sample.whole_split else self.dev_sample.windows, progress=False)
        self.model.train()
        return float(res["loss"])

    def dev_record(self, dev: float) -> dict[str, Any]:
        """The dev loss under a key that says what it covers: ``dev_loss`` for the whole dev split, else
        ``dev_loss_sample`` with ``dev_sample_windows``."""
        if self.dev_sample.whole_split:
            return {"dev_loss": dev}
        return {"dev_loss_sample": dev, "dev_sample_windows": self.dev_sample.num_windows}

    def train(self) -> dict[str, Any]:
        """Run the loop to the end (or the time budget); returns the summary. In a single process, SIGINT/SIGTERM
        stop it at the next step boundary with a checkpoint there (TrainingInterrupted); a second one aborts."""
        from tqdm.auto import tqdm

        self._tb = None
        if self.cfg.tensorboard and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise CachekdError("tensorboard: true needs the tensorboard package (pip install tensorboard).") from None
            self._tb = SummaryWriter(str(self.run_dir.tensorboard_dir))
        self._mark_running(True)
        try:
            previous = self._install_signal_handlers()
            try:
                stop_reason = self._loop(tqdm)
            finally:
                self._restore_signal_handlers(previous)
            if stop_reason == "signal":
                path = self.checkpoints.path_for(self.step)
                if not path.exists():
                    path = self._save_checkpoint()
                if self._tb is not None:
                    self._tb.close()
                raise TrainingInterrupted(self.step, self.total_steps, path, self._stop_signal)
            self._save_checkpoint()
            dev = self._eval_and_log()
            return self._finish(dev, stop_reason)
        finally:
            self._mark_running(False)

    def _loop(self, tqdm) -> str:
        """Optimizer steps until the end; returns why it stopped: steps, epochs, time or signal."""
        cfg = self.cfg
        it = self.batches()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{self.mode} {cfg.name}", unit="step",
                   disable=not (self.progress and self.is_main), dynamic_ncols=True)
        last_log_t, last_log_tokens = time.perf_counter(), self.tokens_seen
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
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    tps = (self.tokens_seen - last_log_tokens) / max(now - last_log_t, 1e-9)
                    last_log_t, last_log_tokens = now, self.tokens_seen
                    rec = {"kind": "train", "step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch,
                           "tokens": self.tokens_seen, "wall_s": round(self.wall_s, 4), "loss": m["loss"],
                           "ce": m["ce"], "kd": m.get("kd"), "alpha": m.get("alpha"), "ce_weight": m.get("ce_weight"),
                           "temperature": m.get("temperature"), "lr": m["lr"], "grad_norm": m["grad_norm"],
                           "tokens_per_s": tps}
                    self._log(rec)
                    bar.set_postfix(loss=f"{m['loss']:.3f}", ce=f"{m['ce']:.3f}")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    self._eval_and_log()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self._save_checkpoint()
        finally:
            bar.close()
            if hasattr(it, "close"):
                try:
                    it.close()
                except Exception:  # a loader broken by the interrupt: the interrupt is what is reported
                    if self._stop_signal is None:
                        raise
        return stop_reason

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
        if not self.is_main:
            return
        self.run_dir.mark_running(on)

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

    def _eval_and_log(self) -> float | None:
        dev = self.evaluate() if self.is_main else None
        if dev is not None:
            self._log({"kind": "dev", "step": self.step, "tokens": self.tokens_seen, "wall_s": round(self.wall_s, 4),
                       **self.dev_record(dev)})
        return dev

    def _final_dev(self, dev: float | None) -> dict[str, Any]:
        """The summary's last dev loss and perplexity, keyed like `dev_record` (``final_dev_loss_sample``, ... for
        a sample)."""
        if dev is None:
            return {"final_dev_loss": None, "final_dev_ppl": None}
        rec = self.dev_record(dev)
        suffix = "" if "dev_loss" in rec else "_sample"
        return {f"final_dev_loss{suffix}": dev, f"final_dev_ppl{suffix}": math.exp(dev) if dev < 50 else None,
                **{k: v for k, v in rec.items() if k == "dev_sample_windows"}}

    def _finish(self, dev: float | None, stop_reason: str) -> dict[str, Any]:
        summary = {
            "name": self.cfg.name, "mode": self.mode, "online": bool(self.cfg.distill and self.cfg.distill.online),
            "objective": self.cfg.distill.objective if self.cfg.distill else "ce",
            "steps": self.step, "tokens": self.tokens_seen, "wall_s": round(self.wall_s, 3),
            "tokens_per_s": self.tokens_seen / self.wall_s if self.wall_s else None,
            "num_params": self.num_params, **self._final_dev(dev),
            "stopped_by": stop_reason, "processes": self.world,
            **(self.teacher_source.summary() if self.teacher_source else {"cache": None, "teachers": None}),
        }
        if self.is_main:
            self.run_dir.save_model(self.model, self.store.load_tokenizer())
            self.run_dir.write_summary(summary)
            if self._tb is not None:
                self._tb.close()
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        return summary


def run(cfg: TrainConfig, *, resume: bool = False, force: bool = False, progress: bool = True,
        say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train or distil according to `cfg`; returns the run summary. `say` receives notes for the user (what
    --force kept, an interrupt being handled). A single-process run stopped by SIGINT/SIGTERM raises
    TrainingInterrupted after saving a checkpoint at the step it reached."""
    return Trainer(cfg, resume=resume, force=force, progress=progress, say=say).train()
