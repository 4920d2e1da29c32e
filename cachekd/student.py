"""A student: one model being trained, with everything that belongs to it and to no other student.

`Student` holds the model, its optimizer, learning-rate scheduler and gradient scaler, the loss module (the model
plus its loss in one forward, wrapped for data parallelism), the schedules of τ, λ and α, its teacher source, its
run directory with its checkpoint manager and metrics, and its own random-number state. The trainer
(`cachekd.trainer.Trainer`) owns what students share: the batch stream, the step counter, the signals and the loop;
a cohort is N students fed by one stream.

`Placement` says where a trainer runs (rank, world size, device, autocast dtype); `StepPlan` is the arithmetic
of a step (global, local and micro batches, accumulation, steps per epoch, run length).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cachekd import distributed
from cachekd.batch import Batch
from cachekd.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from cachekd.errors import CachekdError, check_finite
from cachekd.losses import total_loss, total_loss_weights
from cachekd.rundir import RunDir

if TYPE_CHECKING:
    from cachekd.losses import KDConfig, LossParts, Target
    from cachekd.teachers import TeacherSource
    from cachekd.tokens import TokenStore
    from cachekd.train_config import TrainConfig


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (a model's initialisation draws from them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Placement:
    """Where a trainer runs: this process's rank of `world`, its device and the autocast dtype (None: fp32)."""

    rank: int
    world: int
    device: torch.device
    amp: torch.dtype | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


@dataclass(frozen=True)
class StepPlan:
    """The arithmetic of an optimizer step and of the run's length."""

    global_batch: int
    """Windows a step, over all processes and accumulation steps."""
    micro: int
    """Windows a forward in one process."""
    accum: int
    """Micro-batches a step in one process."""
    steps_per_epoch: int
    total_steps: int
    total_epochs: int

    @classmethod
    def of(cls, cfg: TrainConfig, num_windows: int, world: int) -> StepPlan:
        g = cfg.data.batch_size
        micro, accum = cfg.data.micro_batch(world), cfg.data.accumulation_steps(world)
        steps_per_epoch = num_windows // g
        if steps_per_epoch < 1:
            raise CachekdError(f"the train split has {num_windows} windows, fewer than one batch of {g}; "
                               f"lower data.batch_size.")
        total = cfg.optim.max_steps or cfg.optim.epochs * steps_per_epoch
        return cls(g, micro, accum, steps_per_epoch, total, math.ceil(total / steps_per_epoch))

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch


@dataclass
class Norms:
    """The global counts of one optimizer step, known before the forward from the labels: every micro-batch's loss
    is its local sum divided by these, so accumulation and data parallelism give the same update as one batch."""

    num_tokens: float
    num_sequences: float

    def kd_count(self, reduction: str) -> float:
        """What the KD sum is divided by: sequences for Baby Llama's ``batchmean``, else tokens (at least 1)."""
        return max(self.num_sequences if reduction == "batchmean" else self.num_tokens, 1)


class StudentLoss(torch.nn.Module):
    """The student plus its loss in one forward, so DistributedDataParallel sees every parameter use. Without
    labels it returns the logits (a cohort forms its joint loss from them)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels=None, targets=(), kd_cfg=None, alpha: float = 1.0,
                chunk_size: int | None = None, grad_weights: tuple[float, float] | None = None):
        from cachekd.losses import chunked_distill_loss, distill_loss
        from cachekd.models import backbone, output_embedding

        if labels is None:
            return self.model(input_ids=input_ids).logits
        if chunk_size:
            hidden = backbone(self.model)(input_ids=input_ids).last_hidden_state
            head = output_embedding(self.model)
            return chunked_distill_loss(hidden, head.weight, getattr(head, "bias", None), labels, targets, kd_cfg,
                                        mix_alpha=alpha, chunk_size=chunk_size, grad_weights=grad_weights)
        logits = self.model(input_ids=input_ids).logits
        return distill_loss(logits, labels, targets, kd_cfg, mix_alpha=alpha)


class Student:
    """One model being trained (see the module docstring). Built after the config checks; writes nothing until
    `start` decides how its run directory begins."""

    def __init__(self, cfg: TrainConfig, place: Placement, plan: StepPlan, store: TokenStore,
                 teacher_source: TeacherSource | None, identity: dict[str, Any],
                 identity_of_saved: Callable[[dict[str, Any]], dict[str, Any]],
                 say: Callable[[str], None] | None = None):
        from cachekd.models import build_model, check_positions, count_parameters

        self.cfg, self.place, self.plan, self.store = cfg, place, plan, store
        self.teacher_source = teacher_source
        self.run_dir = RunDir(Path(cfg.output))
        self.checkpoints = CheckpointManager(self.run_dir, identity, keep=cfg.keep_checkpoints,
                                             identity_of_saved=identity_of_saved)
        self.schedules = cfg.distill.schedules() if cfg.distill is not None else None  # (τ, λ, α)
        seed_all(cfg.seed)
        special = store.manifest.get("special_tokens", {})
        self.model = build_model(cfg.model, store.vocab_size, store.seq_len, special).to(place.device)
        if cfg.model.init_from is not None:
            from cachekd.models import resolve_model_dir
            from cachekd.teachers import check_vocabulary

            label = f"model.init_from {cfg.model.init_from!r}"
            check_vocabulary(
                label, resolve_model_dir(cfg.model.init_from), self.model, store, say=say if place.rank == 0 else None,
                tokenizer_error=lambda fp: f"{label} comes with another tokenizer than the token store "
                                           f"{str(store.path)!r}; start from a checkpoint of this tokenizer.",
                vocab_error=lambda v: f"model.init_from has a vocabulary of {v}, smaller than the store's "
                                      f"{store.vocab_size}.",
                advice="start from a checkpoint trained with this store's tokenizer (and save that tokenizer next to "
                       "it)")
            check_positions(self.model, store.seq_len, f"model.init_from {cfg.model.init_from!r}")
        self.num_params = count_parameters(self.model)
        self.optimizer = _adamw(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.loss_module: torch.nn.Module = StudentLoss(self.model)
        if place.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [place.device.index] if place.device.type == "cuda" else None
            self.loss_module = DDP(self.loss_module, device_ids=ids)
        self.rng = capture_rng_state()  # its own random stream from here on (dropout), whatever other students draw
        self.tensorboard = None
        self.dev_sample = None  # the periodic evaluation's dev windows, drawn at the first evaluation
        self.say = say or (lambda msg: None)

    # ------------------------------------------------------------------------------------------ schedules
    @property
    def run_name(self) -> str:
        """How messages name this student: its run directory."""
        return f"run {str(self.run_dir.path)!r}"

    def lr_factor(self, step: int) -> float:
        """Linear warmup, then a cosine down to lr · min_lr_ratio at the last step."""
        o = self.cfg.optim
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        span = max(1, self.plan.total_steps - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def schedule_values(self, step: int) -> dict[str, float]:
        """τ, λ and α at `step` (distillation only; {} for plain training)."""
        if self.schedules is None:
            return {}
        args = dict(step=step, total_steps=self.plan.total_steps, epoch=self.plan.epoch_of(step),
                    total_epochs=self.plan.total_epochs)
        tau, lam, alpha = (s.value(**args) for s in self.schedules)
        return {"temperature": tau, "ce_weight": lam, "alpha": alpha}

    def kd_config(self, temperature: float) -> KDConfig:
        from cachekd.losses import KDConfig

        return self.cfg.kd_config(temperature) if self.cfg.distill is not None else KDConfig()

    @contextmanager
    def own_rng(self) -> Iterator[None]:
        """Run with this student's random state in the global generators, and keep what it drew."""
        restore_rng_state(self.rng)
        try:
            yield
        finally:
            self.rng = capture_rng_state()

    # ------------------------------------------------------------------------------------------ the step
    def targets(self, batch: Batch, input_ids: torch.Tensor) -> list[Target]:
        """Loss targets for a micro-batch, from the teacher source (cached or live teachers); [] without one."""
        return self.teacher_source.targets(batch, input_ids) if self.teacher_source is not None else []

    def forward_backward_step(self, micro: Batch, norms: Norms, scalars: dict[str, float], kd_cfg: KDConfig,
                              sync: bool) -> LossParts:
        """Forward, the loss as local sums over global counts, backward (gradients all-reduced when `sync`)."""
        tau, lam = scalars.get("temperature", 1.0), scalars.get("ce_weight", 1.0)
        targets = self.targets(micro, micro.input_ids)
        no_sync = getattr(self.loss_module, "no_sync", None)
        with nullcontext() if sync or no_sync is None else no_sync():
            with self.place.autocast():
                chunk = self.cfg.distill.chunk_size if self.cfg.distill else None
                # the weights the loss below gives the two sums: the step-wise loss forms its gradients in forward
                ce_norm, kd_norm = max(norms.num_tokens, 1), norms.kd_count(kd_cfg.reduction) if targets else 1
                w_ce, w_kd = total_loss_weights(lam, tau) if targets else (1.0, 0.0)
                parts = self.loss_module(micro.input_ids, micro.labels, targets, kd_cfg, scalars.get("alpha", 1.0),
                                         chunk, (w_ce / ce_norm, w_kd / kd_norm))
            ce = parts.ce_sum.float() / ce_norm
            loss = total_loss(ce, parts.kd_sum.float() / kd_norm, lam, tau) if targets else ce
            self.backward(loss)
        return parts

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss already normalised by the global counts (scaled for fp16)."""
        loss = loss * self.place.world  # DDP averages gradients over processes; our sums are already global
        if self.scaler:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def optimizer_step(self, step: int) -> tuple[float, float]:
        """Optimizer step number `step` (from 1): clip, step the optimizer and the LR schedule; returns (the LR used, the gradient norm before clipping).
        A gradient norm that is not finite stops the run (`NonFiniteError`) before the optimizer applies it, except
        under fp16 loss scaling, whose scaler skips such a step by design."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        if not self.scaler:
            check_finite(self.run_name, step, {"gradient norm": float(gnorm)})
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return lr, float(gnorm)

    def train_step(self, batch: Batch, step: int, norms: Norms) -> dict[str, float]:
        """One optimizer step on this process's `batch` (already on the device); returns the step's metrics."""
        scalars = self.schedule_values(step)
        kd_cfg = self.kd_config(scalars.get("temperature", 1.0))
        sums = torch.zeros(2, dtype=torch.float64, device=self.place.device)  # CE sum, KD sum
        with self.own_rng():
            self.model.train()
            micro, accum = self.plan.micro, self.plan.accum
            for i in range(accum):
                parts = self.forward_backward_step(batch.rows(slice(i * micro, (i + 1) * micro)), norms, scalars,
                                                   kd_cfg, sync=self.place.world == 1 or i == accum - 1)
                sums += torch.stack([parts.ce_sum.detach().double(), parts.kd_sum.detach().double()])
            distributed.all_reduce(sums, self.place.world)
            ce_sum, kd_sum = sums.tolist()
            check_finite(self.run_name, step + 1, {"cross-entropy": ce_sum, "distillation loss": kd_sum})
            lr, gnorm = self.optimizer_step(step + 1)
        return self.step_metrics(sums, norms, scalars, kd_cfg, lr, gnorm)

    def step_metrics(self, sums: torch.Tensor, norms: Norms, scalars: dict[str, float], kd_cfg: KDConfig, lr: float,
                     gnorm: float) -> dict[str, float]:
        ce_mean = sums[0].item() / max(norms.num_tokens, 1)
        out = {"ce": ce_mean, "lr": lr, "grad_norm": gnorm, "tokens": int(norms.num_tokens)}
        if self.cfg.distill is None:
            out["loss"] = ce_mean
            return out
        tau, lam = scalars["temperature"], scalars["ce_weight"]
        kd_mean = sums[1].item() / norms.kd_count(kd_cfg.reduction)
        out.update({"kd": kd_mean, "loss": total_loss(ce_mean, kd_mean, lam, tau), "alpha": scalars["alpha"],
                    "ce_weight": lam, "temperature": tau})
        return out

    def evaluate(self, windows: int | None = None) -> float | None:
        """The dev loss: on a fixed sample of `windows` dev windows (default data.eval_windows) drawn from every
        source (`cachekd.tokens.reader.dev_sample`, the same for every run on the store), or the whole dev split
        when that is no larger (0: always); None without a dev split. `self.dev_sample` says which (the periodic
        evaluation's sample)."""
        res = self.dev_result(windows)
        return None if res is None else float(res["loss"])

    def dev_result(self, windows: int | None = None) -> dict[str, Any] | None:
        """`evaluate`'s whole record (`cachekd.dev_loss.dev_loss`: the loss, and each dev batch's loss); None without
        a dev split."""
        from cachekd.dev_loss import dev_loss
        from cachekd.tokens.reader import dev_sample

        if "dev" not in self.store.splits() or self.store.num_windows("dev") == 0:
            return None
        if windows is None:
            if self.dev_sample is None:
                self.dev_sample = dev_sample(self.store, self.cfg.data.eval_windows)
                if self.dev_sample.note and self.place.is_main:
                    self.say(self.dev_sample.note)
            sample = self.dev_sample
        else:
            sample = dev_sample(self.store, windows)
        res = dev_loss(self.model, self.store, split="dev", batch_size=self.plan.micro, device=self.place.device,
                       windows=None if sample.whole_split else sample.windows, progress=False)
        self.model.train()
        return res

    def dev_record(self, dev: float) -> dict[str, Any]:
        """The dev loss under a key that says what it covers: ``dev_loss`` for the whole dev split, else
        ``dev_loss_sample`` with ``dev_sample_windows``."""
        if self.dev_sample is None or self.dev_sample.whole_split:
            return {"dev_loss": dev}
        return {"dev_loss_sample": dev, "dev_sample_windows": self.dev_sample.num_windows}

    def final_dev(self, dev: float | None) -> dict[str, Any]:
        """The summary's last dev loss and perplexity, keyed like `dev_record` (``final_dev_loss_sample``, ... for
        a sample)."""
        if dev is None:
            return {"final_dev_loss": None, "final_dev_ppl": None}
        rec = self.dev_record(dev)
        suffix = "" if "dev_loss" in rec else "_sample"
        return {f"final_dev_loss{suffix}": dev, f"final_dev_ppl{suffix}": math.exp(dev) if dev < 50 else None,
                **{k: v for k, v in rec.items() if k == "dev_sample_windows"}}

    # --------------------------------------------------------------------------------- checkpoints, output
    def save_checkpoint(self, step: int, counters: dict[str, Any]) -> Path | None:
        """Write a resumable checkpoint of `step` (rank 0) with the trainer's `counters`; returns its path. The
        trainer deletes the old ones (`CheckpointManager.rotate`) once every student has written the new one."""
        if not self.place.is_main:
            return None
        state = {**counters, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None}
        with self.own_rng():  # the checkpoint records this student's random state
            return self.checkpoints.save(step, state, rotate=False)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore the model, optimizer, schedules and random state; returns the checkpoint (with the counters)."""
        state = self.checkpoints.load(path)
        self.rng = capture_rng_state()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.place.is_main:
            self.run_dir.truncate_metrics(state["step"])  # records after the checkpoint will be logged again
        return state

    def open_tensorboard(self) -> None:
        if not (self.cfg.tensorboard and self.place.is_main):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise CachekdError("tensorboard: true needs the tensorboard package (pip install tensorboard).") from None
        self.tensorboard = SummaryWriter(str(self.run_dir.tensorboard_dir))

    def close_tensorboard(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def log(self, record: dict[str, Any]) -> None:
        """Append a record to metrics.jsonl (and TensorBoard), on rank 0."""
        if not self.place.is_main:
            return
        self.run_dir.append_metrics(record)
        if self.tensorboard is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step",) and v is not None:
                    self.tensorboard.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write model/ and summary.json (rank 0): the trainer's `summary` plus what is this student's."""
        cfg = self.cfg
        out = {"name": cfg.name, "mode": "distill" if cfg.distill is not None else "train",
               "online": bool(cfg.distill and cfg.distill.online),
               "objective": cfg.distill.objective if cfg.distill else "ce", **summary}
        out["num_params"] = self.num_params
        out.update(self.teacher_source.summary() if self.teacher_source else {"cache": None, "teachers": None})
        order = ["name", "mode", "online", "objective", "steps", "tokens", "wall_s", "tokens_per_s", "num_params",
                 "final_dev_loss", "final_dev_ppl", "final_dev_loss_sample", "final_dev_ppl_sample",
                 "dev_sample_windows", "stopped_by", "processes"]
        out = {k: out[k] for k in order if k in out} | {k: v for k, v in out.items() if k not in order}
        if self.place.is_main:
            self.run_dir.save_model(self.model, self.store.load_tokenizer())
            self.run_dir.write_summary(out)
            self.close_tensorboard()
        return out


def _adamw(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    o = cfg.optim
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
