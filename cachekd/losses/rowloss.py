"""The loss on a set of flattened rows: the CE and the KD sum, following the batch's ``LossPlan``.

Ignored positions count for nothing and get a zero gradient. On the fused plan with ``mask_ignored`` they are
computed on sanitised inputs and masked out (``ignored``); every other plan drops them (``rows`` are the
non-ignored rows) before any arithmetic.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from cachekd.losses.divergences import LOG_FLOOR, bucket_divergence, divergence, mixed_bucket_target
from cachekd.losses.mixed import (
    GradCoefficients,
    LogitStats,
    MixedRows,
    MixedSparseStudent,
    grad_coefficients,
    gradient_pass,
    logit_stats,
    mixed_from_stats,
)
from cachekd.losses.plan import FlatDense, FlatFactored, FlatSampled, FlatTarget, Prepared, Rows, take
from cachekd.losses.sampled import SampledRows, needs_student_rest, sampled_divergence, sampled_rows
from cachekd.losses.sparse import SparseRows, SparseStudent, sparse_divergence, sparse_rows
from cachekd.losses.student import Student

if TYPE_CHECKING:
    from cachekd.losses.types import KDConfig

TeacherRows = Tensor | SparseRows | SampledRows
"""A teacher on n rows: dense log-probabilities at τ (n, V), sparse rows, or sampled rows."""


def loss_on_rows(z: Tensor, rows: Rows, prep: Prepared, ignored: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(ce_sum, kd_sum) for the student logits ``z`` (n, V) of the flattened rows ``rows``.

    ``ignored`` (plans with ``mask_ignored`` only): rows of ``z`` to leave out of both sums and give a zero
    gradient.
    """
    plan = prep.plan
    assert ignored is None or plan.mask_ignored, "ignored rows are only masked on the fused paths"
    if plan.student == "fused_mix":
        cfg = prep.cfg
        inputs = _mixed_inputs(rows, prep, z.dtype, z.device, ignored)
        ce, kd = MixedSparseStudent.apply(z, *inputs, prep.mix_alpha, cfg.objective, cfg.detach_mix, ignored)
        return ce.sum(), (prep.weights[0] * kd).sum()
    tau = prep.cfg.temperature
    labels = take(prep.labels, rows)  # (n,)
    if ignored is not None:
        labels = labels.index_fill(0, ignored, 0)
    targets = [teacher_rows(t, rows, tau, z.dtype, z.device, ignored) for t in prep.teachers]
    student = Student(z, tau)
    # Student values at the sparse teachers' ids (teachers compared one by one, without mixing).
    sparse = [t for t in targets if isinstance(t, (SparseRows, SampledRows))] if plan.sparse_by_ids else []
    ce, logq_ids, log_tails = _student_values(student, labels, sparse, prep, ignored)
    if ignored is not None:
        ce = ce.index_fill(0, ignored, 0.0)
    ce_sum = ce.sum()
    if not targets:
        return ce_sum, torch.zeros((), dtype=z.dtype, device=z.device)
    if plan.combine == "per_teacher":
        at_ids = iter(zip(logq_ids, log_tails))
        kd = None
        for target, weight in zip(targets, prep.weights):
            if isinstance(target, (SampledRows, SparseRows)) and plan.mix_bucket:
                logq_at_ids, log_tail = next(at_ids)
                d = _mixed_bucket_divergence(target, logq_at_ids, log_tail, prep)
            elif isinstance(target, SampledRows) and plan.sparse_by_ids:
                logq_at_ids, log_tail = next(at_ids)
                d = sampled_divergence(student, target, logq_at_ids, log_tail, prep.cfg)
            elif isinstance(target, SparseRows) and plan.sparse_by_ids:
                logq_at_ids, log_tail = next(at_ids)
                d = sparse_divergence(student, target, logq_at_ids, log_tail, prep.cfg, prep.vocab_size)
            else:
                d = dense_divergence(student, _dense_logp(target, student, prep), prep.cfg, prep.mix_alpha)
            kd = weight * d if kd is None else kd + weight * d
    else:
        logp = combine_teachers([_dense_logp(t, student, prep) for t in targets], prep.weights, plan.combine)
        kd = dense_divergence(student, logp, prep.cfg, prep.mix_alpha)
    if ignored is not None:
        kd = kd.index_fill(0, ignored, 0.0)
    return ce_sum, kd.sum()


def _mixed_bucket_divergence(target: SparseRows | SampledRows, logq_ids: Tensor, log_rest_q: Tensor | None,
                             prep: Prepared) -> Tensor:
    """(n,) the divergence against the teacher mixed with the (detached) student on the coarse-grained categories:
    the stored ids and the rest (``plan.mix_bucket``). ``log_rest_q`` None: every token is stored (no rest)."""
    logp, log_rest = (target.logp, target.log_tail) if isinstance(target, SparseRows) else (target.logp, target.log_rest)
    if log_rest_q is None:
        log_rest_q = torch.full_like(log_rest, -math.inf)
    mix_ids, mix_rest = mixed_bucket_target(logp, log_rest, logq_ids.detach(), log_rest_q.detach(), prep.mix_alpha)
    return bucket_divergence(mix_ids, mix_rest, logq_ids, log_rest_q, prep.cfg)


def teacher_rows(
    t: FlatTarget, rows: Rows, tau: float, dtype: torch.dtype, device: torch.device, ignored: Tensor | None
) -> TeacherRows:
    """A flat teacher on ``rows`` at τ: a dense one as log-probabilities (n, V) (a factored one's logits rebuilt
    for these rows only, in ``dtype``), a sparse one as SparseRows."""
    if isinstance(t, FlatDense):
        logits = take(t.logits, rows).to(device=device, dtype=dtype)
        return F.log_softmax(logits / tau, dim=-1)
    if isinstance(t, FlatFactored):
        hidden = take(t.hidden, rows).to(device=device, dtype=dtype)
        bias = None if t.bias is None else t.bias.to(device=device, dtype=dtype)
        # in `dtype` whatever autocast is active (the trainer's loss runs under it): a bf16 matmul would round the
        # teacher's logits by ~|z|·2⁻⁸, and forward and the recomputing backward would differ
        with torch.autocast(device.type, enabled=False):
            logits = F.linear(hidden, t.weight.to(device=device, dtype=dtype), bias)
        return F.log_softmax(logits / tau, dim=-1)
    if isinstance(t, FlatSampled):
        return sampled_rows(t, rows, dtype, device, ignored)
    return sparse_rows(t, rows, tau, dtype, device, ignored)


def _student_values(
    student: Student, labels: Tensor, sparse: list[SparseRows | SampledRows], prep: Prepared, ignored: Tensor | None
) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
    """The per-row CE (n,), and for each sparse or sampled teacher the student's log q at its ids (n, k) and,
    where the fused student computed it, the log of the student's mass outside them (n,) (else None)."""
    z, tau, vocab_size = student.z, student.temperature, prep.vocab_size
    split = [t.k for t in sparse]
    if prep.plan.student == "fused":
        # The fused path, no (n, V) log-softmax at all.
        index = torch.cat([labels.unsqueeze(1), *[t.ids for t in sparse]], dim=1)
        with_tail = [(needs_student_rest(prep.cfg) or prep.plan.mix_bucket) if isinstance(t, SampledRows)
                     else prep.plan.bucket_tails and t.k < vocab_size for t in sparse]
        starts = [sum(split[:i]) for i in range(len(sparse))]
        groups = tuple((start, t.k) for start, t, tail in zip(starts, sparse, with_tail) if tail)
        ce, values, tails = SparseStudent.apply(z, index, tau, groups, ignored)
        tail_iter = iter(tails.unbind(1))
        return ce, list(values.split(split, dim=1)), [next(tail_iter) if tail else None for tail in with_tail]
    no_tails: list[Tensor | None] = [None] * len(sparse)
    if sparse and tau == 1.0:
        # The (n, V) log-softmax exists for the other targets: gather the label and the ids from it at once.
        values = student.logq.gather(1, torch.cat([labels.unsqueeze(1), *[t.ids for t in sparse]], dim=1))
        return -values[:, 0], list(values[:, 1:].split(split, dim=1)), no_tails
    ce = -student.logq1.gather(1, labels.unsqueeze(1)).squeeze(1)
    if not sparse:
        return ce, [], no_tails
    logq_ids = student.logq.gather(1, torch.cat([t.ids for t in sparse], dim=1))
    return ce, list(logq_ids.split(split, dim=1)), no_tails


def _mixed_inputs(
    rows: Rows, prep: Prepared, dtype: torch.dtype, device: torch.device, ignored: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(labels, ids, logp_ids, log_u) of ``mixed``'s functions for the rows (fused_mix plans)."""
    labels = take(prep.labels, rows)  # (n,)
    if ignored is not None:
        labels = labels.index_fill(0, ignored, 0)
    target = sparse_rows(prep.teachers[0], rows, 1.0, dtype, device, ignored)
    vocab_size = prep.vocab_size
    if target.k < vocab_size:
        log_u = target.log_tail - math.log(vocab_size - target.k)  # as in SparseRows.dense_logp
    else:
        log_u = torch.full_like(target.log_tail, -math.inf)  # no tail
    return labels, target.ids, target.logp, log_u


class MixedChunks:
    """The fused_mix loss over ``prep.rows`` whose logits come a chunk at a time, in order (plans with
    ``chunk_state``): forward keeps each chunk's ``LogitStats`` and computes the loss from all of them at once;
    backward turns the upstream gradients into per-row coefficients once and writes each chunk's gradient from
    its recomputed logits. Keeps O(k) numbers a row, never the logits."""

    def __init__(self, prep: Prepared, dtype: torch.dtype, device: torch.device) -> None:
        self.prep = prep
        self.labels, self.ids, self.logp_ids, self.log_u = _mixed_inputs(prep.rows, prep, dtype, device, None)
        self.parts: list[LogitStats] = []
        self.offset = 0
        self.state: MixedRows | None = None
        self.coef: GradCoefficients | None = None

    def _next_rows(self, n: int) -> slice:
        rows = slice(self.offset, self.offset + n)
        self.offset = rows.stop
        return rows

    def add(self, z: Tensor) -> None:
        """Forward: the next chunk's logits (n, V)."""
        rows = self._next_rows(z.shape[0])
        cfg = self.prep.cfg
        beta, forward_kl = 1.0 - self.prep.mix_alpha, cfg.objective == "forward_kl"
        self.parts.append(logit_stats(z, self.labels[rows], self.ids[rows], beta, with_eb_d=forward_kl))

    def finish(self) -> tuple[Tensor, Tensor]:
        """Forward: (ce_sum, kd_sum) over every chunk added."""
        prep, cfg = self.prep, self.prep.cfg
        if not self.parts:  # no valid rows
            zero = torch.zeros((), dtype=self.logp_ids.dtype, device=self.logp_ids.device)
            return zero, zero.clone()
        ce, kd, self.state = mixed_from_stats(
            LogitStats.cat(self.parts), prep.vocab_size, self.labels, self.ids, self.logp_ids, self.log_u,
            prep.mix_alpha, cfg.objective, cfg.detach_mix, None,
        )
        self.parts = []
        return ce.sum(), (prep.weights[0] * kd).sum()

    def start_backward(self, g_ce: Tensor, g_kd: Tensor) -> None:
        """Backward: the upstream gradients of ce_sum and kd_sum, before the chunks' ``grad`` calls."""
        self.offset = 0
        if self.state is not None:
            self.coef = grad_coefficients(self.state, g_ce, g_kd * self.prep.weights[0])

    def grad(self, z: Tensor) -> Tensor:
        """Backward: (n, V) the gradient for the next chunk's recomputed logits."""
        assert self.state is not None and self.coef is not None
        return gradient_pass(z, self.state, self.coef, self._next_rows(z.shape[0]))


def _dense_logp(target: TeacherRows, student: Student, prep: Prepared) -> Tensor:
    """(n, V) a teacher as a dense target at τ: a sparse or sampled one with its rest spread evenly
    (``tail_mode: uniform``) or shaped like the student (otherwise: the ``bucket`` tail made dense)."""
    if isinstance(target, Tensor):
        return target
    if isinstance(target, SparseRows) and prep.cfg.tail_mode == "uniform":
        return target.dense_logp(prep.vocab_size)
    return target.student_shaped_logp(student.logq)


def combine_teachers(dense: list[Tensor], weights: list[float], combine: str) -> Tensor:
    """(n, V) one target from several teachers' log-probabilities at τ: by ``logits`` or by ``probs``."""
    if combine == "logits":
        # Σ w_i log p_i equals Σ w_i z_i/τ up to a per-position constant, which the softmax removes.
        combined = sum(w * logp.clamp_min(LOG_FLOOR) for w, logp in zip(weights, dense))
        return F.log_softmax(combined, dim=-1)
    assert combine == "probs", combine
    stacked = torch.stack([logp + math.log(w) for w, logp in zip(weights, dense)])
    return torch.logsumexp(stacked, dim=0)


def dense_divergence(student: Student, logp: Tensor, cfg: KDConfig, mix_alpha: float) -> Tensor:
    """(n,) divergence against a dense teacher log-probability target (n, V), mixed with the student if α < 1."""
    if mix_alpha < 1.0:
        z_student = student.z.detach() if cfg.detach_mix else student.z
        mixed = z_student / cfg.temperature
        if mix_alpha > 0.0:  # (α = 0 would make 0·(-inf) NaN where the teacher has zero mass)
            mixed = mix_alpha * logp + (1.0 - mix_alpha) * mixed
        logp = F.log_softmax(mixed, dim=-1)
    return divergence(logp, student.logq, cfg)
