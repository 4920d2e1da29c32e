"""The cohort's loop: `cachekd.trainer.Trainer` over N students, plus the cohort directory and, with mutual
learning, the joint step and the peer weights ω.

* Variant grid (no ``mutual:``): each student's `train_step` as in a single run, on the one batch stream; the
  grid's only difference from N separate runs is that the store and cache are read and decoded once.
* Weighted mutual learning: each micro-batch, every peer's forward (in its own random stream), the fixed peers'
  cached targets, one loss (`cachekd.cohort.wml`), one backward, then every peer's optimizer step. Every
  ``update_every`` steps the peers' dev losses move ω (`cachekd.cohort.weights`).

The cohort directory is a `RunDir` of its own: config.yaml (the cohort config), metrics.jsonl (ω records, kind
"weights"), checkpoints/ (ω and the step, beside the peers' own checkpoints of the same step) and summary.json.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from cachekd import distributed
from cachekd.batch import IGNORE_INDEX, Batch
from cachekd.checkpoint import CheckpointManager
from cachekd.cohort.config import PEERS_DIR, CohortConfig
from cachekd.config import to_dict
from cachekd.errors import CachekdError, check_finite
from cachekd.rundir import RunDir
from cachekd.teachers import CachedTeachers
from cachekd.train_config import TrainConfig
from cachekd.trainer import Trainer


def cohort_identity(cohort: CohortConfig) -> dict[str, Any]:
    """The cohort config without what may change on resume (runtime options, the stop limits)."""
    from cachekd.train_config import without_runtime_options

    d = without_runtime_options(to_dict(cohort))
    d.pop("search", None)
    return d


class CohortTrainer(Trainer):
    """N students on one batch stream, in the cohort directory; mutual learning when the config has it."""

    def __init__(self, cohort: CohortConfig, configs: list[TrainConfig], *, resume: bool = False, force: bool = False,
                 progress: bool = True, say: Callable[[str], None] | None = None):
        self.cohort, self.mutual = cohort, cohort.mutual
        self.cohort_dir = RunDir(Path(cohort.output))
        self.cohort_checkpoints = CheckpointManager(
            self.cohort_dir, cohort_identity(cohort), keep=cohort.keep_checkpoints,
            identity_of_saved=lambda data: cohort_identity(_load(data)))
        # Refuse what the cohort directory cannot do (a live cohort too) before a peer's directory is touched.
        rank = distributed.setup()[0]
        self._cohort_plan = self.cohort_dir.plan_start(resume=resume, force=force, check_live=rank == 0)
        self.fixed: CachedTeachers | None = None
        if self.mutual and self.mutual.fixed_peers:
            from cachekd.tokens import TokenStore

            self.fixed = open_fixed_peers(cohort, TokenStore.open(configs[0].data.store))
        self.weights: list[float] = cohort.start_weights() if self.mutual else []
        super().__init__(configs, resume=resume, force=force, progress=progress, say=say)
        self.vocab_size = self.store.vocab_size

    @property
    def mode(self) -> str:
        return "cohort"

    def cached_sources(self) -> list[CachedTeachers]:
        fixed = [self.fixed] if self.fixed is not None else []
        return super().cached_sources() + fixed

    # ------------------------------------------------------------------------------------------ the step
    def train_step(self, batch: Batch) -> dict[str, Any]:
        if self.mutual is None:
            return super().train_step(batch)
        batch = batch.to(self.device).decode()  # the cache's stored values, decoded on the device
        norms = self.global_norms(batch)
        n, m = len(self.students), len(self.weights)
        sums = torch.zeros(n + n * m, dtype=torch.float64, device=self.device)  # CE sums, then divergence sums
        for s in self.students:
            s.model.train()
        micro, accum = self.plan.micro, self.plan.accum
        for i in range(accum):
            sync = self.world == 1 or i == accum - 1
            ce, div = self.forward_backward_step(batch.rows(slice(i * micro, (i + 1) * micro)), norms.num_tokens, sync)
            sums += torch.cat([ce.detach().double(), div.detach().double().reshape(-1)])
        distributed.all_reduce(sums, self.world)
        for i, (s, ce) in enumerate(zip(self.students, sums[:n].tolist())):
            check_finite(s.run_name, self.step + 1, {"cross-entropy": ce,
                                                 "mutual divergence": sum(sums[n + i * m:n + (i + 1) * m].tolist())})
        steps = [s.optimizer_step(self.step + 1) for s in self.students]
        return self._mutual_metrics(sums, norms.num_tokens, steps)

    def forward_backward_step(self, micro: Batch, num_tokens: float, sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Every peer's forward, the WML loss over the global token count, one backward; returns the CE sums (N,)
        and the divergence sums (N, N + F) of this micro-batch."""
        from cachekd.cohort.wml import mutual_sums, wml_loss

        mu = self.mutual
        with ExitStack() as stack:
            if not sync:
                for s in self.students:
                    if hasattr(s.loss_module, "no_sync"):
                        stack.enter_context(s.loss_module.no_sync())
            logits = []
            for s in self.students:
                with s.own_rng(), self.place.autocast():
                    logits.append(s.loss_module(micro.input_ids)[..., :self.vocab_size])
            fixed = self.fixed.targets(micro, micro.input_ids) if self.fixed is not None else []
            with self.place.autocast():
                ce, div = mutual_sums(logits, micro.labels, fixed, objective=mu.objective, temperature=mu.temperature,
                                      detach=mu.detach, ignore_index=IGNORE_INDEX, tail_mode=mu.tail_mode,
                                      divergences=mu.alpha > 0)
            w = torch.tensor(self.weights, dtype=torch.float32, device=self.device)
            loss = wml_loss(ce / max(num_tokens, 1), div / max(num_tokens, 1), w, alpha=mu.alpha,
                            temperature=mu.temperature)
            (loss * self.world).backward()  # DDP averages gradients over processes; our sums are already global
        return ce, div

    def _mutual_metrics(self, sums: torch.Tensor, num_tokens: float, steps: list[tuple[float, float]]) -> dict[str, Any]:
        mu = self.mutual
        n, m = len(self.students), len(self.weights)
        ce = (sums[:n] / max(num_tokens, 1)).tolist()
        div = (sums[n:].reshape(n, m) / max(num_tokens, 1)).tolist()
        w = self.weights
        kd = [sum(w[j] * div[i][j] for j in range(m) if j != i) for i in range(n)]
        loss = (1 - mu.alpha) * sum(w[i] * ce[i] for i in range(n)) + mu.alpha * mu.temperature**2 * sum(kd)
        per = [{"ce": ce[i], "kd": kd[i], "loss": loss, "lr": steps[i][0], "grad_norm": steps[i][1],
                "tokens": int(num_tokens), "alpha": mu.alpha, "temperature": mu.temperature, "weight": w[i]}
               for i in range(n)]
        return {**per[0], "tokens": int(num_tokens), "students": per}

    def _after_step(self, m: dict[str, Any], bar) -> None:
        mu = self.mutual
        if mu is not None and mu.update_every and self.step % mu.update_every == 0 and self.step < self.total_steps:
            self.update_weights()
        super()._after_step(m, bar)

    def update_weights(self) -> None:
        """The first-order mirror-descent step of ω on the peers' dev losses (rank 0 decides; all ranks agree)."""
        from cachekd.cohort.weights import group_losses, mirror_descent_step

        mu = self.mutual
        eta = mu.eta_schedule.value(step=self.step, total_steps=self.total_steps, epoch=self.plan.epoch_of(self.step),
                                    total_epochs=self.plan.total_epochs)
        results = [s.dev_result(mu.eval_windows) for s in self.students] if self.is_main else []
        devs = [None if r is None else float(r["loss"]) for r in results]
        if self.is_main and all(r is not None for r in results):
            batches = [group_losses(r["window_losses"], mu.num_batches) for r in results]
            self.weights = mirror_descent_step(self.weights, batches, eta=eta, clip=mu.grad_clip)
        if self.world > 1:
            import torch.distributed as dist

            w = torch.tensor(self.weights, dtype=torch.float64, device=self.device)
            dist.broadcast(w, 0)
            self.weights = w.tolist()
        self._log_weights(eta, devs, batches if self.is_main and all(results) else None)

    def _log_weights(self, eta: float | None, devs: list[float | None],
                     batch_losses: list[list[float] | None] | None = None) -> None:
        if self.is_main:
            self.cohort_dir.append_metrics({
                "kind": "weights", "step": self.step, "members": self.cohort.member_names,
                "weights": list(self.weights), "eta": eta, "dev_losses": devs or None,
                "dev_batch_losses": batch_losses or None})

    # --------------------------------------------------------------------------------------- cohort dir
    def run_dirs(self) -> list[RunDir]:
        return [*super().run_dirs(), self.cohort_dir]

    def checkpoint_managers(self) -> list[Any]:
        return [*super().checkpoint_managers(), self.cohort_checkpoints]

    def _prepare_output(self, resume: bool, force: bool) -> None:
        plan = self._cohort_plan
        super()._prepare_output(resume, force)  # (claims the cohort directory too: `run_dirs`)
        if self.resumed_from is not None:
            return
        if self.is_main:
            if resume:
                self.cohort_checkpoints.check_saved_config()
                self.cohort_dir.drop_checkpoints_after(0)
                self.cohort_dir.reset_metrics()
            else:
                if plan.replace:
                    self.cohort_dir.remove_run_files()  # the peers' runs were replaced by the trainer
                self.cohort_dir.create(self.cohort)
            if self.mutual:
                self._log_weights(None, [])

    def _resume_from(self, step: int) -> None:
        """The peers' checkpoints and ω of `step`, the last step every peer and the cohort directory hold."""
        super()._resume_from(step)
        state = self.cohort_checkpoints.load(self.cohort_checkpoints.path_for(step), restore_rng=False)
        self.weights = list(state["weights"])
        if self.is_main:
            self.cohort_dir.truncate_metrics(step)

    def _save_own_checkpoint(self) -> None:
        if self.is_main:
            self.cohort_checkpoints.save(self.step, {"weights": list(self.weights), "tokens": self.tokens_seen},
                                         rotate=False)

    def summary_fields(self) -> dict[str, Any]:
        """A peer's summary names its cohort; a mutual-learning peer's mode and objective say how it was trained."""
        fields = {"cohort": self.cohort.name}
        if self.mutual:
            fields.update({"mode": "mutual", "objective": f"wml-{self.mutual.objective}"})
        return fields

    def _finish(self, devs: list[float | None], stop_reason: str) -> dict[str, Any]:
        super()._finish(devs, stop_reason)
        summary = {
            "name": self.cohort.name, "mode": "mutual" if self.mutual else "grid", "steps": self.step,
            "tokens": self.tokens_seen, "wall_s": round(self.wall_s, 3), "stopped_by": stop_reason,
            "processes": self.world, "peers": [s.cfg.name for s in self.students],
            "peer_dirs": [str(Path(PEERS_DIR) / s.cfg.name) for s in self.students],
            "final_dev": {s.cfg.name: s.final_dev(d) for s, d in zip(self.students, devs)},
        }
        if self.mutual:
            summary["members"] = self.cohort.member_names
            summary["weights"] = list(self.weights)
        if self.is_main:
            self.cohort_dir.write_summary(summary)
        return summary


def open_fixed_peers(cohort: CohortConfig, store) -> CachedTeachers:
    """The cache's teachers named by mutual.fixed_peers, with their tail at the mutual temperature; a name the
    cache does not hold is refused."""
    from cachekd.cache.reader import LogitCache

    mu = cohort.mutual
    cache = LogitCache.open(cohort.cache)
    cache.check_store(store)
    missing = [t for t in mu.fixed_peers if t not in cache.teachers]
    if missing:
        raise CachekdError(f"fixed peer {missing[0]!r} is not a teacher of the cache {cohort.cache!r} (it holds: "
                           f"{', '.join(cache.teachers)}).")
    # a τ the cache holds no normaliser for is refused here (top-k and sampled caches alike); sampled targets are
    # built at the mutual τ, top-k ones read its tail
    tail_index = cache.temperature_index(mu.temperature) if cache.mode != "full" else None
    return CachedTeachers(cache, list(mu.fixed_peers), cohort.cache, temperature=mu.temperature,
                          tail_index=tail_index if cache.mode == "topk" else None)


def _load(data: dict[str, Any]) -> CohortConfig:
    from cachekd.cohort.config import load_cohort_config

    return load_cohort_config(data)
