"""Distillation losses: divergences, sparse (top-k) teacher targets, several teachers, mixing, chunking.

Everything here is a pure function of tensors. Conventions:

* ``q`` is the student, ``p`` the teacher target, both at the loss temperature ``τ``: ``q = softmax(z_S/τ)``,
  ``p = softmax(z_T/τ)``. The hard-label cross-entropy is on the student's logits at ``τ = 1`` (not tempered).
* Divergences are divergences: ``≥ 0`` and exactly ``0`` when the two distributions agree (no teacher entropy
  is carried along).
* Losses come back as ``(sum, count)`` pairs over the non-ignored positions (``LossParts``); the trainer divides
  by the *global* counts once per optimizer step and calls ``total_loss``. Nothing is multiplied by ``τ²`` here.
* All arithmetic is float32 whatever the input dtype (float64 stays float64, which ``gradcheck`` needs).
* Teacher tensors are constants: they never receive gradients.
* Ignored positions (``labels == ignore_index``) count for nothing and get a zero gradient, and garbage there
  (padding, ``-inf`` teacher values, non-finite student logits) can never turn into a NaN value or gradient: the
  fused sparse path computes them on sanitised inputs and masks them out (cheaper than copying the other rows
  of the (N, V) logits), every other path drops them before any arithmetic. Student logits must be finite at the
  other positions; teacher values may be ``-inf`` (zero probability).

Sparse targets (``SparseTarget``: the k cached teacher logits, their ids and the log-sum-exp of the rest) are
handled in one of three ``tail_mode`` s. ``bucket`` and ``renormalize`` cost ``O(k)`` a position beyond the
student's own log-normaliser, which the cross-entropy needs anyway: ``_SparseStudent`` computes the CE, the k
student log-probabilities and the student's tail mass together, reading the logits once in forward and writing
their gradient once in backward, without ever forming the (n, V) log-softmax (on CPU, CE + sparse KD this way
is cheaper than ``F.cross_entropy`` alone; benchmarks/bench_losses.py). Dense targets, ``uniform`` tails and
mixing go through the ordinary (n, V) log-softmax; ``distill_loss(chunk_size=...)`` or ``chunked_distill_loss``
bound their memory.

Several teachers: ``teacher_combine="losses"`` keeps every sparse teacher sparse (any tail mode). ``logits`` and
``probs`` need one dense target, so several sparse teachers are expanded to their (n, V) uniform-tail
reconstruction (``tail_mode="uniform"`` is required there; O(V) a position).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from cachekd.errors import ConfigFieldError
from cachekd.kd_options import (  # noqa: F401  (the choices are re-exported: the losses' callers list them)
    OBJECTIVES,
    REDUCTIONS,
    TAIL_MODES,
    TEACHER_COMBINES,
    KDOptions,
    check_temperature,
)
from cachekd.rows import block_rows, row_blocks, tail_underflows

# Log-probabilities of exactly-zero probabilities (-inf) are raised to this finite floor before they enter a
# divergence, so that 0·log 0 terms give 0 (and a zero gradient) instead of NaN, while a genuinely infinite
# divergence (mass where the other side has none) shows up as a huge finite number. No real log-probability
# is anywhere near it.
_LOG_FLOOR = -1e30

# The student's mass outside the k teacher ids, 1 − Σ_topk q, loses about 4e-7 absolute to float32 rounding
# (Σ_topk q ≈ 1), i.e. a relative error of ~4e-7/q_tail. Where the (n, V) log-softmax exists anyway
# (_Student.log_tail_mass), rows whose tail mass is below this threshold (relative error above ~1e-4) are
# recomputed exactly as a masked log-sum-exp over the tail, an O(V) pass for those rows only. The fused sparse
# path (_SparseStudent) sums each row's tail directly instead and uses the threshold only to pick a
# cancellation-free form of the gradient.
_CHEAP_TAIL_MIN = 2.0**-8
_LOG_1M_CHEAP_TAIL_MIN = math.log1p(-_CHEAP_TAIL_MIN)


# ----------------------------------------------------------------------------------------------------------
# Public types


@dataclass
class DenseTarget:
    """Full teacher logits for every position."""

    logits: Tensor
    """(B, T, V) teacher logits, any float dtype."""


@dataclass
class SparseTarget:
    """Top-k teacher logits plus the log-sum-exp of the rest, as the logit cache stores them."""

    ids: Tensor
    """(B, T, k) integer token ids, distinct within each row, in any order."""
    logits: Tensor
    """(B, T, k) teacher logits at ``ids``, up to an additive constant per position (the cache stores τ=1
    log-probabilities; they are treated as shift-invariant logits)."""
    tail_lse: Tensor
    """(B, T) logsumexp over the ids NOT in ``ids`` of ``logit_v / τ`` at the loss temperature τ, in the same
    per-position shift as ``logits``; ``-inf`` when k == V (no tail)."""


Target = DenseTarget | SparseTarget


@dataclass(frozen=True)
class KDConfig(KDOptions):
    """How the distillation term is computed: the `KDOptions` (objective, tails, teachers, reduction) plus the
    temperature and the ignored label. Every field is validated on construction (`ConfigFieldError`, a
    ValueError naming the field)."""

    temperature: float = 1.0
    """τ > 0: both distributions are softmax(logits/τ). The trainer multiplies the KD term by τ²."""
    ignore_index: int = -100
    """Label value of positions that count for neither the cross-entropy nor the KD term."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_temperature("temperature", self.temperature)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ConfigFieldError("ignore_index", "an integer", self.ignore_index)


@dataclass
class LossParts:
    """Sums and counts over one micro-batch; divide by the global counts, then call ``total_loss``.

    Sums are float32 scalars (float64 for float64 student logits); counts are int64 scalars.
    """

    ce_sum: Tensor
    """Sum of the per-token hard-label cross-entropy (τ = 1) over non-ignored positions."""
    ce_count: Tensor
    """Number of non-ignored positions."""
    kd_sum: Tensor
    """Sum of the per-position divergence over non-ignored positions, NOT multiplied by τ²."""
    kd_count: Tensor
    """token_mean: number of non-ignored positions; batchmean: number of sequences B; 0 without teachers."""


def total_loss(ce_mean: Tensor, kd_mean: Tensor, ce_weight: float, temperature: float) -> Tensor:
    """``λ·CE + (1−λ)·τ²·KD`` with ``λ = ce_weight`` (the means already divided by global counts)."""
    if not _is_real(ce_weight) or not (0.0 <= ce_weight <= 1.0):
        raise ValueError(f"ce_weight must be in [0, 1] (got {ce_weight!r}).")
    if not _is_real(temperature) or not (0 < temperature < math.inf):
        raise ValueError(f"temperature must be > 0 (got {temperature!r}).")
    return ce_weight * ce_mean + (1.0 - ce_weight) * temperature**2 * kd_mean


def distill_loss(
    student_logits: Tensor,
    labels: Tensor,
    teachers: Sequence[Target],
    cfg: KDConfig,
    mix_alpha: float = 1.0,
    chunk_size: int | None = None,
) -> LossParts:
    """Cross-entropy and distillation sums for one micro-batch of student logits.

    Args:
        student_logits: (B, T, V) student logits, any float dtype; the arithmetic is float32.
        labels: (B, T) int64 next-token labels, already aligned with the positions (no shifting here);
            ``cfg.ignore_index`` masks a position out of both terms.
        teachers: zero or more targets with the same B, T (and V for dense ones); none gives a CE-only result
            with ``kd_sum = 0`` and ``kd_count = 0``.
        cfg: the objective, temperature, tail handling, teacher combination and reduction.
        mix_alpha: ChooBaCa mixing in logit space, target logits ``α·z_T + (1−α)·z_S`` (student part detached
            when ``cfg.detach_mix``); 1 means no mixing. Needs a dense target: a DenseTarget, or a SparseTarget
            with ``tail_mode="uniform"``.
        chunk_size: if given, positions are processed ``chunk_size`` at a time and recomputed in backward, so the
            float32 (B·T, V) intermediates never exist for the whole batch at once (only the gradient of
            ``student_logits``, in its own dtype, is full-size). Same value and gradient as unchunked.

    Returns:
        LossParts with sums over non-ignored positions and their counts.
    """
    prep = _prepare(student_logits, labels, teachers, cfg, mix_alpha, chunk_size, source_dim=None)
    if chunk_size is None and prep.num_teachers == 0 and prep.compute_dtype == torch.float32:
        # Cross-entropy alone (plain LM training): PyTorch's fused kernel is ~1.6x faster than the general path.
        ce_sum = F.cross_entropy(prep.source.float(), prep.labels, ignore_index=cfg.ignore_index, reduction="sum")
        return prep.parts(ce_sum, torch.zeros((), dtype=torch.float32, device=ce_sum.device))
    if chunk_size is None and isinstance(prep.rows, Tensor) and _fused(prep):
        # Ignored positions (e.g. the last of every window) are computed and masked out rather than dropped:
        # selecting the other rows would copy the (N, V) logits and, in backward, scatter their gradient back.
        z = prep.source.to(prep.compute_dtype)
        ce_sum, kd_sum = _loss_on_rows(z, slice(0, z.shape[0]), prep, ignored=prep.ignored)
    elif chunk_size is None:
        z = _take(prep.source, prep.rows).to(prep.compute_dtype)
        ce_sum, kd_sum = _loss_on_rows(z, prep.rows, prep)
    else:
        ce_sum, kd_sum = _ChunkedLoss.apply(prep.source, None, None, prep)
    return prep.parts(ce_sum, kd_sum)


def chunked_distill_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    teachers: Sequence[Target],
    cfg: KDConfig,
    mix_alpha: float = 1.0,
    chunk_size: int = 128,
) -> LossParts:
    """``distill_loss(hidden @ weight.T + bias, ...)`` without ever forming the (B, T, V) logits.

    The non-ignored positions (flattened over B·T) are processed ``chunk_size`` at a time: a chunk's logits
    are formed, its loss computed and thrown away; backward recomputes each chunk's logits and loss, takes the
    gradient with respect to those logits and pushes it through the projection by hand (a custom
    ``autograd.Function``: 4 matmuls in all, against 3 for the unchunked loss). Peak extra memory is a few
    (chunk_size, V) float32 buffers. Autocast, if active in forward, is re-entered for the recomputation.

    Args:
        hidden: (B, T, H) final hidden states (after the final norm).
        weight: (V, H) output projection (``lm_head.weight``).
        bias: (V,) or None.
        labels, teachers, cfg, mix_alpha: as in ``distill_loss``.
        chunk_size: positions per chunk.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, H); got shape {tuple(hidden.shape)}.")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"weight must be (V, H) with H = {hidden.shape[2]} (the hidden size); got {tuple(weight.shape)}."
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (V,) = ({weight.shape[0]},); got {tuple(bias.shape)}.")
    prep = _prepare(hidden, labels, teachers, cfg, mix_alpha, chunk_size, source_dim=weight.shape[0])
    ce_sum, kd_sum = _ChunkedLoss.apply(prep.source, weight, bias, prep)
    return prep.parts(ce_sum, kd_sum)


# ----------------------------------------------------------------------------------------------------------
# Divergences on explicit distributions


def _pointwise_divergence(logp: Tensor, logq: Tensor, cfg: KDConfig) -> Tensor:
    """φ(p_v, q_v) elementwise (broadcasting), so that the divergence is ``φ.sum(-1)``.

    Every objective here is such a sum, with φ(x, x) = 0. Inputs are log-probabilities; ``logp`` (the teacher
    side) may hold ``-inf``. ``logq`` is the student's, finite for finite student logits (it comes from a
    log-softmax, a logsumexp or a gather of those), so it is not floored: one (n, V) pass fewer.
    """
    logp = logp.clamp_min(_LOG_FLOOR)
    objective = cfg.objective
    if objective == "forward_kl":
        return logp.exp() * (logp - logq)
    if objective == "reverse_kl":
        return logq.exp() * (logq - logp)
    if objective == "tv":
        return 0.5 * (logp.exp() - logq.exp()).abs()
    if objective == "jsd":
        beta = cfg.beta
        if beta in (0.0, 1.0):  # m equals q (resp. p) and the other term has weight 0
            return (logq - logq) + (logp - logp)
        logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
        return beta * logp.exp() * (logp - logm) + (1.0 - beta) * logq.exp() * (logq - logm)
    lam = cfg.skew_lambda
    if objective == "skew_forward_kl":
        if lam == 1.0:
            return (logq - logq) + (logp - logp)
        logr = logq if lam == 0.0 else torch.logaddexp(logp + math.log(lam), logq + math.log1p(-lam))
        return logp.exp() * (logp - logr)
    if objective == "skew_reverse_kl":
        if lam == 1.0:
            return (logq - logq) + (logp - logp)
        logr = logp if lam == 0.0 else torch.logaddexp(logq + math.log(lam), logp + math.log1p(-lam))
        return logq.exp() * (logq - logr)
    raise AssertionError(objective)  # KDConfig validated it


def _divergence(logp: Tensor, logq: Tensor, cfg: KDConfig) -> Tensor:
    """Divergence of two distributions given as log-probabilities along the last axis: (..., C) → (...)."""
    return _pointwise_divergence(logp, logq, cfg).sum(-1)


# ----------------------------------------------------------------------------------------------------------
# Preparation: validation, flattening, selection of the non-ignored rows


@dataclass
class _Prepared:
    """Everything the per-rows loss needs, flattened to N = B·T rows (built once per call)."""

    source: Tensor  # (N, V) student logits or (N, H) hidden states
    labels: Tensor  # (N,) int64
    teachers: list[Target]  # flattened: DenseTarget.logits (N, V); SparseTarget fields (N, k) / (N,)
    weights: list[float]  # normalised, one per teacher in `teachers` (zero-weight teachers dropped)
    cfg: KDConfig
    mix_alpha: float
    vocab_size: int
    rows: slice | Tensor  # the non-ignored rows: a slice when all are, else an int64 index
    ignored: Tensor | None  # the ignored rows (int64 index), None when there are none
    chunks: list[slice | Tensor]  # `rows` split into chunks (chunked paths only)
    num_valid: int
    batch_size: int
    num_teachers: int  # as given (before dropping zero weights): decides kd_count
    compute_dtype: torch.dtype

    def parts(self, ce_sum: Tensor, kd_sum: Tensor) -> LossParts:
        device = ce_sum.device
        count = torch.tensor(self.num_valid, dtype=torch.int64, device=device)
        if self.num_teachers == 0:
            kd_count = torch.tensor(0, dtype=torch.int64, device=device)
        elif self.cfg.reduction == "batchmean":
            kd_count = torch.tensor(self.batch_size, dtype=torch.int64, device=device)
        else:
            kd_count = count.clone()
        return LossParts(ce_sum=ce_sum, ce_count=count, kd_sum=kd_sum, kd_count=kd_count)


def _prepare(
    source: Tensor,
    labels: Tensor,
    teachers: Sequence[Target],
    cfg: KDConfig,
    mix_alpha: float,
    chunk_size: int | None,
    source_dim: int | None,
) -> _Prepared:
    if not isinstance(cfg, KDConfig):
        raise ValueError(f"cfg must be a KDConfig (got {type(cfg).__name__}).")
    if source.dim() != 3 or not source.is_floating_point():
        what = "student logits must be a float (B, T, V)" if source_dim is None else "hidden must be a float (B, T, H)"
        raise ValueError(f"{what} tensor; got {source.dtype} {tuple(source.shape)}.")
    batch_size, seq_len = source.shape[:2]
    vocab_size = source.shape[2] if source_dim is None else source_dim
    if tuple(labels.shape) != (batch_size, seq_len):
        raise ValueError(f"labels must be (B, T) = {(batch_size, seq_len)}; got {tuple(labels.shape)}.")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor (got {labels.dtype}).")
    if not _is_real(mix_alpha) or not (0.0 <= mix_alpha <= 1.0):
        raise ValueError(f"mix_alpha must be in [0, 1] (got {mix_alpha!r}).")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer (got {chunk_size!r}).")
    teachers = list(teachers)
    if cfg.teacher_weights is not None and len(cfg.teacher_weights) != len(teachers):
        raise ValueError(
            f"teacher_weights has {len(cfg.teacher_weights)} weights but {len(teachers)} teachers were given."
        )
    mixing = mix_alpha < 1.0
    combine_dense = len(teachers) > 1 and cfg.teacher_combine != "losses"
    device = source.device
    flat: list[Target] = []
    for i, t in enumerate(teachers):
        name = f"teacher {i}"
        if isinstance(t, DenseTarget):
            if tuple(t.logits.shape) != (batch_size, seq_len, vocab_size) or not t.logits.is_floating_point():
                raise ValueError(
                    f"{name}: dense teacher logits must be float (B, T, V) = {(batch_size, seq_len, vocab_size)}; "
                    f"got {t.logits.dtype} {tuple(t.logits.shape)}."
                )
            flat.append(DenseTarget(t.logits.detach().reshape(-1, vocab_size)))
        elif isinstance(t, SparseTarget):
            k = t.ids.shape[-1] if t.ids.dim() == 3 else -1
            if t.ids.dim() != 3 or tuple(t.ids.shape[:2]) != (batch_size, seq_len) or not 1 <= k <= vocab_size:
                raise ValueError(
                    f"{name}: sparse ids must be (B, T, k) with B, T = {(batch_size, seq_len)} and 1 <= k <= V = "
                    f"{vocab_size}; got {tuple(t.ids.shape)}."
                )
            if t.ids.dtype.is_floating_point or t.ids.dtype == torch.bool:
                raise ValueError(f"{name}: sparse ids must be an integer tensor (got {t.ids.dtype}).")
            if tuple(t.logits.shape) != tuple(t.ids.shape) or not t.logits.is_floating_point():
                raise ValueError(
                    f"{name}: sparse logits must be float with the ids' shape {tuple(t.ids.shape)}; got "
                    f"{t.logits.dtype} {tuple(t.logits.shape)}."
                )
            if tuple(t.tail_lse.shape) != (batch_size, seq_len):
                raise ValueError(
                    f"{name}: tail_lse must be (B, T) = {(batch_size, seq_len)}; got {tuple(t.tail_lse.shape)}."
                )
            needs_dense = mixing or combine_dense
            if needs_dense and cfg.tail_mode != "uniform":
                why = f"mixing (mix_alpha={mix_alpha})" if mixing else f"teacher_combine={cfg.teacher_combine!r}"
                raise ValueError(
                    f"{why} needs a dense teacher target, but tail_mode={cfg.tail_mode!r} keeps the sparse "
                    f"teacher's tail out of it; use tail_mode='uniform'"
                    + (" or teacher_combine='losses'." if not mixing else " or a DenseTarget.")
                )
            flat.append(
                SparseTarget(
                    ids=t.ids.detach().reshape(-1, k),
                    logits=t.logits.detach().reshape(-1, k),
                    tail_lse=t.tail_lse.detach().reshape(-1),
                )
            )
        else:
            raise ValueError(f"{name} must be a DenseTarget or SparseTarget (got {type(t).__name__}).")
    raw_weights = cfg.teacher_weights or (1.0,) * len(teachers)
    total = sum(raw_weights) if teachers else 1.0
    kept = [(t, w / total) for t, w in zip(flat, raw_weights) if w > 0]
    labels_flat = labels.reshape(-1).to(device=device, dtype=torch.int64)
    valid = labels_flat != cfg.ignore_index
    num_valid = int(valid.sum())
    ignored: Tensor | None = None
    if num_valid == labels_flat.numel():
        rows: slice | Tensor = slice(0, num_valid)
    else:
        rows = valid.nonzero().squeeze(1)
        ignored = (~valid).nonzero().squeeze(1)
    if num_valid:
        valid_labels = labels_flat[rows]
        low, high = int(valid_labels.min()), int(valid_labels.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"labels must be token ids in [0, {vocab_size}) or ignore_index={cfg.ignore_index}; "
                f"found {low if low < 0 else high}."
            )
    chunks: list[slice | Tensor] = []
    if chunk_size is not None:
        if isinstance(rows, slice):
            chunks = [slice(s, min(s + chunk_size, num_valid)) for s in range(0, num_valid, chunk_size)]
        else:
            chunks = list(rows.split(chunk_size))
    compute_dtype = torch.float64 if source.dtype == torch.float64 else torch.float32
    return _Prepared(
        source=source.reshape(batch_size * seq_len, source.shape[2]),
        labels=labels_flat,
        teachers=[t for t, _ in kept],
        weights=[w for _, w in kept],
        cfg=cfg,
        mix_alpha=float(mix_alpha),
        vocab_size=vocab_size,
        rows=rows,
        ignored=ignored,
        chunks=chunks,
        num_valid=num_valid,
        batch_size=batch_size,
        num_teachers=len(teachers),
        compute_dtype=compute_dtype,
    )


def _take(x: Tensor, rows: slice | Tensor) -> Tensor:
    """Rows of a flattened (N, ...) tensor: the tensor itself or a view for a slice, a copy for an index."""
    if isinstance(rows, slice):
        # Slicing would put a SliceBackward in the graph, which allocates a zero (N, ...) gradient.
        return x if rows == slice(0, x.shape[0]) else x[rows]
    return x.index_select(0, rows)


# ----------------------------------------------------------------------------------------------------------
# The loss on a set of rows


class _Student:
    """Student quantities for n rows, computed on first use and shared by the CE and every teacher."""

    def __init__(self, z: Tensor, temperature: float) -> None:
        self.z = z  # (n, V) logits in the compute dtype
        self.temperature = temperature

    @cached_property
    def logq1(self) -> Tensor:  # (n, V) log-softmax at τ = 1, for the cross-entropy
        return F.log_softmax(self.z, dim=-1)

    @cached_property
    def logq(self) -> Tensor:  # (n, V) log-softmax at τ
        if self.temperature == 1.0:
            return self.logq1
        return F.log_softmax(self.z / self.temperature, dim=-1)

    def log_tail_mass(self, ids: Tensor, logq_ids: Tensor) -> Tensor:
        """(n,) log of the student's mass at τ outside ``ids`` (n, k < V); see _CHEAP_TAIL_MIN."""
        log_topk = torch.logsumexp(logq_ids, dim=-1)  # (n,)
        hard = log_topk > _LOG_1M_CHEAP_TAIL_MIN  # tail mass below the threshold
        # The clamp keeps log1mexp and its gradient finite on the rows that are overwritten below.
        log_tail = torch.log(-torch.expm1(log_topk.clamp(max=_LOG_1M_CHEAP_TAIL_MIN)))
        hard_rows = hard.nonzero().squeeze(1)
        if hard_rows.numel():
            tail_logq = self.logq.index_select(0, hard_rows).scatter(1, ids.index_select(0, hard_rows), -math.inf)
            log_tail = log_tail.index_put((hard_rows,), torch.logsumexp(tail_logq, dim=-1))
        return log_tail


class _SparseStudent(torch.autograd.Function):
    """The student side of CE + sparse KD without an (n, V) log-softmax.

    Outputs, for student logits ``z`` (n, V) and ``index`` (n, 1 + K) = [label, ids of each sparse teacher]:

    * ``ce`` (n,): ``−log softmax(z)[label]``;
    * ``logq_ids`` (n, K): ``log softmax(z/τ)`` at the ids;
    * ``log_tail`` (n, G): for each group of ids in ``tail_groups`` (``(start, k)`` column ranges of ``index[:, 1:]``),
      the log of the student's mass at τ outside those ids.

    Rows in ``ignored`` (an int64 index, or None) give zeros in every output and a zero gradient, whatever ``z``
    holds there.

    Forward reads ``z`` once (in row blocks) for the row max ``m``, the log-normalisers ``s = log Σ exp((z − m)/τ)``
    at τ and at 1, and each tail's own sum (the exponentials with the group's ids zeroed: exact, no ``1 − Σ_topk``
    cancellation). Backward writes the gradient once, ``g_ce·q₁ + c·q_τ``, plus scatters at the label and ids.
    The (n, V) temporaries are made a row block at a time on CPU (``cachekd.rows``); on GPU the whole batch is
    one block. Log-probs are formed as ``(z − m)/τ − s``, as accurate as ``log_softmax``.
    """

    @staticmethod
    def forward(
        ctx, z: Tensor, index: Tensor, temperature: float, tail_groups: tuple[tuple[int, int], ...],
        ignored: Tensor | None,
    ):
        n, vocab_size = z.shape
        tau = temperature
        ids = index[:, 1:]  # (in range at ignored rows too: _loss_on_rows sanitises them)
        m = z.amax(dim=-1, keepdim=True)  # (n, 1)
        s1 = torch.empty_like(m)
        s_tau = torch.empty_like(m) if tau != 1.0 else s1
        tail_sum = torch.empty(n, len(tail_groups), dtype=z.dtype, device=z.device)
        for rows in row_blocks(z):
            d = z[rows] - m[rows]
            if tau == 2.0:  # exp(d/2) = √exp(d): a square root is far cheaper than a second exp
                e1 = d.exp_()
                torch.sum(e1, dim=-1, keepdim=True, out=s1[rows])
                e_tau = e1.sqrt_()
            else:
                e1 = d.exp()
                torch.sum(e1, dim=-1, keepdim=True, out=s1[rows])
                e_tau = e1 if tau == 1.0 else d.div_(tau).exp_()
            if tau != 1.0:
                torch.sum(e_tau, dim=-1, keepdim=True, out=s_tau[rows])
            for g, (start, k) in enumerate(tail_groups):
                e = e_tau if g == len(tail_groups) - 1 else e_tau.clone()
                tail_sum[rows, g] = e.scatter_(1, ids[rows, start : start + k], 0.0).sum(-1)
        s1.log_()
        if tau != 1.0:
            s_tau.log_()
        values = z.gather(1, index)  # (n, 1 + K)
        ce = (m - values[:, :1]) + s1
        logq_ids = (values[:, 1:] - m) / tau - s_tau
        log_tail = tail_sum.log_() - s_tau  # (n, G)
        if ignored is not None:  # whatever z holds there, ignored rows give finite zeros
            for out in (ce, logq_ids, log_tail):
                out.index_fill_(0, ignored, 0.0)
        # A tail far below the row max loses the terms that underflow exp(): redo those rows with a masked
        # log-sum-exp in log space (rare: extreme logits).
        tiny = tail_underflows(log_tail + s_tau, vocab_size, sqrt=tau == 2.0)
        if tiny.any():
            for g, (start, k) in enumerate(tail_groups):
                rows = tiny[:, g].nonzero().squeeze(1)
                if rows.numel():
                    d = (z.index_select(0, rows) - m[rows]) / tau
                    d.scatter_(1, ids[rows, start : start + k], -math.inf)
                    log_tail[rows, g] = torch.logsumexp(d, dim=-1) - s_tau[rows, 0]
        ctx.save_for_backward(z, index, m, s1, s_tau, logq_ids, log_tail)
        ctx.ignored = ignored
        ctx.temperature = tau
        ctx.tail_groups = tail_groups
        return ce.squeeze(1), logq_ids, log_tail

    @staticmethod
    @once_differentiable
    def backward(ctx, g_ce: Tensor, g_ids: Tensor, g_tail: Tensor):
        z, index, m, s1, s_tau, logq_ids, log_tail = ctx.saved_tensors
        tau = ctx.temperature
        ids = index[:, 1:]
        ignored = ctx.ignored  # (whatever flows in or is formed on those rows, their gradient is zeroed at the end)
        g_ce = g_ce.unsqueeze(1)  # (n, 1)
        # With x = z/τ: d ce/dz = q₁ − onehot(label); d log q_i/dx = onehot(i) − q_τ; and for a tail,
        # d log q_tail/dx_v = q_v ([v ∉ ids]/q_tail − 1). Where q_tail ≥ _CHEAP_TAIL_MIN, the last is folded into
        # the per-row coefficient of q_τ (1/q_tail − 1) and q_i/q_tail is taken back on the ids (both bounded by
        # 2^8: nothing cancels). On the other ("hard") rows the tail part is formed in log space, zeroed on the ids,
        # on those rows only.
        easy = log_tail >= math.log(_CHEAP_TAIL_MIN)  # (n, G)
        hard = ~easy
        tail_scale = torch.where(easy, g_tail * torch.exp(-log_tail), 0.0)  # (n, G), on q_τ everywhere
        coef_tau = (tail_scale.sum(1, keepdim=True) - g_ids.sum(1, keepdim=True) - g_tail.sum(1, keepdim=True)) / tau
        # The gradient is a·exp(z − m) + b·exp((z − m)/τ) with per-row a, b (q₁ = exp(z − m − s₁), q_τ likewise).
        if tau == 1.0:
            a, b = (g_ce + coef_tau) * torch.exp(-s1), None
        else:
            a, b = g_ce * torch.exp(-s1), coef_tau * torch.exp(-s_tau)
        grad = torch.empty_like(z)
        for rows in row_blocks(z):
            out = torch.sub(z[rows], m[rows], out=grad[rows])
            if tau == 1.0:
                out.exp_().mul_(a[rows])
                continue
            e_tau = out.div(tau).exp_() if tau != 2.0 else None
            out.exp_()
            if e_tau is None:
                e_tau = out.sqrt()  # exp((z − m)/2), as in forward
            out.mul_(a[rows]).addcmul_(e_tau, b[rows])
        if ctx.tail_groups:
            hard_rows = hard.any(1).nonzero().squeeze(1)
            for rows in hard_rows.split(block_rows(z)):
                log_q_tau = (z.index_select(0, rows) - m[rows]).div_(tau).sub_(s_tau[rows])
                tails = None
                for g, (start, k) in enumerate(ctx.tail_groups):
                    scale = torch.where(hard[rows, g : g + 1], g_tail[rows, g : g + 1] / tau, 0.0)
                    tail = (log_q_tau - log_tail[rows, g : g + 1]).exp_().mul_(scale)
                    tail.scatter_(1, ids[rows, start : start + k], 0.0)
                    tails = tail if tails is None else tails.add_(tail)
                grad.index_add_(0, rows, tails)
        at_ids = g_ids / tau  # (n, K)
        for g, (start, k) in enumerate(ctx.tail_groups):
            cols = slice(start, start + k)
            at_ids[:, cols] -= tail_scale[:, g : g + 1] / tau * logq_ids[:, cols].exp()
        grad.scatter_add_(1, index[:, :1], -g_ce)
        grad.scatter_add_(1, ids, at_ids)
        if ignored is not None:
            grad.index_fill_(0, ignored, 0.0)
        return grad, None, None, None, None


@dataclass
class _SparseRows:
    """A sparse teacher on n rows, normalised at τ."""

    ids: Tensor  # (n, k) int64
    logp: Tensor  # (n, k) teacher log-probabilities at τ at `ids` (full normalisation, tail included)
    log_tail: Tensor  # (n,) log of the teacher's tail mass at τ (-inf without a tail)
    shifted: Tensor  # (n, k) logits/τ in the cache's per-position shift (for renormalize)

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def dense_logp(self, vocab_size: int) -> Tensor:
        """(n, V) the uniform-tail reconstruction: ids keep their log-probs, the tail shares its mass evenly."""
        if self.k == vocab_size:
            fill = torch.zeros_like(self.log_tail)  # every entry is overwritten
        else:
            fill = self.log_tail - math.log(vocab_size - self.k)
        out = fill.unsqueeze(1).expand(-1, vocab_size).contiguous()
        return out.scatter_(1, self.ids, self.logp)


def _sparse_rows(
    t: SparseTarget, rows: slice | Tensor, temperature: float, dtype: torch.dtype, device, ignored: Tensor | None
) -> _SparseRows:
    ids = _take(t.ids, rows).to(device=device, dtype=torch.int64)
    shifted = _take(t.logits, rows).to(device=device, dtype=dtype) / temperature  # (n, k)
    tail_lse = _take(t.tail_lse, rows).to(device=device, dtype=dtype)  # (n,)
    if ignored is not None:  # whatever the teacher holds at ignored rows, make it a harmless finite target
        k = ids.shape[1]
        ids = ids.index_copy(0, ignored, torch.arange(k, device=device).expand(ignored.numel(), k))
        shifted = shifted.index_fill(0, ignored, 0.0)
        tail_lse = tail_lse.index_fill(0, ignored, 0.0)
    lse = torch.logaddexp(torch.logsumexp(shifted, dim=-1), tail_lse)  # full log-normaliser at τ
    return _SparseRows(ids=ids, logp=shifted - lse.unsqueeze(1), log_tail=tail_lse - lse, shifted=shifted)


def _fused(prep: _Prepared) -> bool:
    """Whether ``_loss_on_rows`` takes the fused ``_SparseStudent`` path (no (n, V) log-softmax)."""
    if prep.cfg.tail_mode == "uniform":
        return False
    if not prep.teachers:
        return True
    per_teacher = len(prep.teachers) == 1 or prep.cfg.teacher_combine == "losses"
    return per_teacher and prep.mix_alpha == 1.0 and all(isinstance(t, SparseTarget) for t in prep.teachers)


def _loss_on_rows(
    z: Tensor, rows: slice | Tensor, prep: _Prepared, ignored: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(ce_sum, kd_sum) for the student logits ``z`` (n, V) of the flattened rows ``rows``.

    ``ignored`` (fused path only): rows of ``z`` to leave out of both sums and give a zero gradient.
    """
    cfg = prep.cfg
    tau = cfg.temperature
    vocab_size = prep.vocab_size
    device, dtype = z.device, z.dtype
    labels = _take(prep.labels, rows)  # (n,)
    if ignored is not None:
        assert _fused(prep), "ignored rows are only masked on the fused path"
        labels = labels.index_fill(0, ignored, 0)
    student = _Student(z, tau)
    mixing = prep.mix_alpha < 1.0
    targets: list[Tensor | _SparseRows] = []  # dense teacher log-probs at τ (n, V) or sparse rows
    for t in prep.teachers:
        if isinstance(t, DenseTarget):
            logits = _take(t.logits, rows).to(device=device, dtype=dtype)
            targets.append(F.log_softmax(logits / tau, dim=-1))
        else:
            targets.append(_sparse_rows(t, rows, tau, dtype, device, ignored))
    per_teacher = len(targets) == 1 or cfg.teacher_combine == "losses"

    # Student values at the sparse teachers' ids (teachers compared one by one, without mixing).
    sparse = [t for t in targets if isinstance(t, _SparseRows)] if per_teacher and not mixing else []
    split = [t.k for t in sparse]
    log_tails: list[Tensor | None] = [None] * len(sparse)
    if _fused(prep):
        # Only bucket/renormalize targets (or none): the fused path, no (n, V) log-softmax at all.
        index = torch.cat([labels.unsqueeze(1), *[t.ids for t in sparse]], dim=1)
        groups, start = [], 0
        for t in sparse:
            if cfg.tail_mode == "bucket" and t.k < vocab_size:
                groups.append((start, t.k))
            start += t.k
        ce, values, tails = _SparseStudent.apply(z, index, tau, tuple(groups), ignored)
        logq_ids = list(values.split(split, dim=1))
        tail_iter = iter(tails.unbind(1))
        log_tails = [next(tail_iter) if cfg.tail_mode == "bucket" and t.k < vocab_size else None for t in sparse]
    elif sparse and tau == 1.0:
        # The (n, V) log-softmax exists for the other targets: gather the label and the ids from it at once.
        values = student.logq.gather(1, torch.cat([labels.unsqueeze(1), *[t.ids for t in sparse]], dim=1))
        ce = -values[:, 0]
        logq_ids = list(values[:, 1:].split(split, dim=1))
    else:
        ce = -student.logq1.gather(1, labels.unsqueeze(1)).squeeze(1)
        logq_ids = list(student.logq.gather(1, torch.cat([t.ids for t in sparse], dim=1)).split(split, dim=1)) \
            if sparse else []
    if ignored is not None:
        ce = ce.index_fill(0, ignored, 0.0)
    ce_sum = ce.sum()
    if not targets:
        return ce_sum, torch.zeros((), dtype=dtype, device=device)

    if per_teacher:
        kd = None
        for target, weight in zip(targets, prep.weights):
            if isinstance(target, _SparseRows) and not mixing:
                i = next(j for j, t in enumerate(sparse) if t is target)
                d = _sparse_divergence(student, target, logq_ids[i], log_tails[i], cfg, vocab_size)
            else:
                logp = target if isinstance(target, Tensor) else target.dense_logp(vocab_size)
                d = _dense_divergence(student, logp, cfg, prep.mix_alpha)
            kd = weight * d if kd is None else kd + weight * d
    else:
        dense = [t if isinstance(t, Tensor) else t.dense_logp(vocab_size) for t in targets]
        if cfg.teacher_combine == "logits":
            # Σ w_i log p_i equals Σ w_i z_i/τ up to a per-position constant, which the softmax removes.
            combined = sum(w * logp.clamp_min(_LOG_FLOOR) for w, logp in zip(prep.weights, dense))
            logp = F.log_softmax(combined, dim=-1)
        else:  # probs
            stacked = torch.stack([logp + math.log(w) for w, logp in zip(prep.weights, dense)])
            logp = torch.logsumexp(stacked, dim=0)
        kd = _dense_divergence(student, logp, cfg, prep.mix_alpha)
    if ignored is not None:
        kd = kd.index_fill(0, ignored, 0.0)
    return ce_sum, kd.sum()


def _dense_divergence(student: _Student, logp: Tensor, cfg: KDConfig, mix_alpha: float) -> Tensor:
    """(n,) divergence against a dense teacher log-probability target (n, V), mixed with the student if α < 1."""
    if mix_alpha < 1.0:
        z_student = student.z.detach() if cfg.detach_mix else student.z
        mixed = z_student / cfg.temperature
        if mix_alpha > 0.0:  # (α = 0 would make 0·(-inf) NaN where the teacher has zero mass)
            mixed = mix_alpha * logp + (1.0 - mix_alpha) * mixed
        logp = F.log_softmax(mixed, dim=-1)
    return _divergence(logp, student.logq, cfg)


def _sparse_divergence(
    student: _Student,
    target: _SparseRows,
    logq_ids: Tensor,
    log_tail_q: Tensor | None,
    cfg: KDConfig,
    vocab_size: int,
) -> Tensor:
    """(n,) divergence against a sparse target (no mixing).

    ``logq_ids`` (n, k): the student's log q at the ids; ``log_tail_q`` (n,): log of its mass outside them, when
    already known (else computed here if needed).
    """
    k = target.k
    has_tail = k < vocab_size
    mode = cfg.tail_mode
    if mode == "renormalize":
        logp = F.log_softmax(target.shifted, dim=-1)
        logq = logq_ids - torch.logsumexp(logq_ids, dim=-1, keepdim=True)
        # log q_ids carry float32 rounding at the size of log q itself (~1e-2 absolute when |log q| ~ 1e5, i.e.
        # logits ~1e4/τ), which renormalising would expose. The values are taken from the logits instead (a
        # gather without gradient); the gradient still flows through the log-softmax path, where it is equal.
        exact = F.log_softmax(student.z.detach().gather(1, target.ids) / student.temperature, dim=-1)
        return _divergence(logp, logq + (exact - logq).detach(), cfg)
    if not has_tail:  # k = V: the ids are a permutation of the vocabulary and every mode is the dense loss
        return _divergence(target.logp, logq_ids, cfg)
    if mode == "bucket":
        if log_tail_q is None:
            log_tail_q = student.log_tail_mass(target.ids, logq_ids)
        logp = torch.cat([target.logp, target.log_tail.unsqueeze(1)], dim=1)  # (n, k + 1)
        logq = torch.cat([logq_ids, log_tail_q.unsqueeze(1)], dim=1)
        return _divergence(logp, logq, cfg)

    # uniform: the teacher puts u = m/(V−k) on every tail token. The tail's contribution is computed in closed
    # form from reductions of the student's own log-softmax (no (n, V) teacher tensor):
    #   Σ_tail φ(u, q_v) = Σ_all φ(u, q_v) − Σ_ids φ(u, q_i).
    # Every φ here is bounded by O(|log u| + |log q|) on the ids, so the subtraction loses ~1e-7 absolute.
    log_u = (target.log_tail - math.log(vocab_size - k)).clamp_min(_LOG_FLOOR)  # (n,)
    head = _divergence(target.logp, logq_ids, cfg)
    logq = student.logq
    if cfg.objective == "forward_kl":
        # Σ_tail u (log u − log q_v) = m log u − u (Σ_all log q − Σ_ids log q)
        u = log_u.exp()
        sum_tail_logq = logq.sum(-1) - logq_ids.sum(-1)
        tail = (vocab_size - k) * u * log_u - u * sum_tail_logq
    elif cfg.objective == "reverse_kl":
        # Σ_tail q_v (log q_v − log u) = (Σ_all q log q − Σ_ids q log q) − q_tail log u
        def neg_entropy(lq: Tensor) -> Tensor:
            return (lq.exp() * lq).sum(-1)

        q_tail = student.log_tail_mass(target.ids, logq_ids).exp()
        tail = neg_entropy(logq) - neg_entropy(logq_ids) - q_tail * log_u
    else:
        log_u = log_u.unsqueeze(1)
        tail = _divergence(log_u, logq, cfg) - _divergence(log_u, logq_ids, cfg)
    return head + tail


# ----------------------------------------------------------------------------------------------------------
# Chunking


class _ChunkedLoss(torch.autograd.Function):
    """(ce_sum, kd_sum) over ``prep.chunks``; backward recomputes each chunk's logits and loss.

    ``source`` is (N, V) student logits when ``weight`` is None, else (N, H) hidden states projected by
    ``weight`` (V, H) and ``bias``. Forward keeps nothing but its inputs; backward takes, chunk by chunk, the
    gradient G (n, V) of ``g_ce·ce + g_kd·kd`` with respect to the chunk's logits and writes ``G`` (logits) or
    ``G @ weight``, ``Gᵀ @ hidden``, ``ΣG`` (projection) into full-size gradient buffers.
    """

    @staticmethod
    def _logits(source: Tensor, weight: Tensor | None, bias: Tensor | None, rows, dtype: torch.dtype) -> Tensor:
        x = _take(source, rows)
        if weight is not None:
            x = F.linear(x, weight, bias)
        return x.to(dtype)

    @staticmethod
    def forward(ctx, source: Tensor, weight: Tensor | None, bias: Tensor | None, prep: _Prepared):
        device_type = source.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ce_total = torch.zeros((), dtype=prep.compute_dtype, device=source.device)
        kd_total = torch.zeros((), dtype=prep.compute_dtype, device=source.device)
        for rows in prep.chunks:
            z = _ChunkedLoss._logits(source, weight, bias, rows, prep.compute_dtype)
            ce, kd = _loss_on_rows(z, rows, prep)
            ce_total += ce
            kd_total += kd
        ctx.save_for_backward(source, weight, bias)
        ctx.prep = prep
        return ce_total, kd_total

    @staticmethod
    def backward(ctx, g_ce: Tensor, g_kd: Tensor):
        source, weight, bias = ctx.saved_tensors
        prep: _Prepared = ctx.prep
        need_source, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_source = torch.zeros_like(source) if need_source else None
        # Weight and bias gradients accumulate over chunks in at least float32.
        acc_dtype = torch.promote_types(weight.dtype, torch.float32) if weight is not None else None
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=acc_dtype) if need_bias else None
        autocast_enabled, autocast_dtype = ctx.autocast
        device_type = source.device.type
        for rows in prep.chunks:
            with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled):
                z = _ChunkedLoss._logits(source, weight, bias, rows, prep.compute_dtype)
            z.requires_grad_(True)
            with torch.enable_grad():
                ce, kd = _loss_on_rows(z, rows, prep)
                (grad_z,) = torch.autograd.grad(g_ce * ce + g_kd * kd, z)  # (n, V)
            if weight is None:
                if need_source:
                    grad_source[rows] = grad_z.to(source.dtype)
                continue
            grad_z_w = grad_z.to(weight.dtype)
            if need_source:
                grad_source[rows] = (grad_z_w @ weight).to(source.dtype)
            if need_weight:
                grad_weight.addmm_(grad_z.to(acc_dtype).t(), _take(source, rows).to(acc_dtype))
            if need_bias:
                grad_bias += grad_z.sum(0).to(acc_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_source, grad_weight, grad_bias, None


# ----------------------------------------------------------------------------------------------------------
# Small helpers


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}.")


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)
