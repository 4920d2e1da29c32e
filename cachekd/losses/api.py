"""The public face of the distillation losses: targets, ``KDConfig``, ``LossParts``, ``distill_loss``,
``chunked_distill_loss``, ``total_loss``; the inputs are validated and flattened here, once.

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
handled in one of three ``tail_mode`` s (``sparse``): ``bucket`` and ``renormalize`` through the fused student
side, O(k) a position beyond the student's own log-normaliser; ``uniform`` tails through the (n, V) log-softmax.
Mixing goes through the (n, V) log-softmax too, except the ChooBaCa case (one sparse uniform-tail teacher, τ = 1,
forward or reverse KL), which has its own fused path (``mixed``). ``distill_loss(chunk_size=...)`` or
``chunked_distill_loss`` bound the memory (``chunked``). Which path a batch takes is decided once, by
``plan.make_plan``.

Sampled targets (``SampledTarget``, from a sampled or hybrid cache; ``sampled``) take the same fused student side:
forward KL is the unbiased estimate over the drawn ids, every other objective the stored ids plus one bucket of the
exact remaining mass; ``tail_mode`` does not apply to them compared one by one.

Mixing with the student and combining teachers by logits or probabilities need a dense target: a sparse or sampled
teacher is expanded to (n, V) (O(V) a position) with its stored ids at their exact probabilities and its exact
rest mass either shaped like the student (``tail_mode="bucket"``, the default: ``sparse.student_shaped_logp``; the
loss then equals the one on the coarse-grained distributions, and cannot pull the rest's shape anywhere) or spread
evenly (``tail_mode="uniform"``; a sampled target through ``sampled.uniform_tail_form``, and the ChooBaCa case
takes the fused ``mixed`` path). ``renormalize`` cannot form a dense target and is refused there.
``teacher_combine="losses"`` keeps every sparse teacher sparse (any tail mode).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cachekd.kd_options import (  # noqa: F401  (the choices are re-exported: the losses' callers list them)
    OBJECTIVES,
    REDUCTIONS,
    TAIL_MODES,
    TEACHER_COMBINES,
    check_temperature,
    check_unit_interval,
)
from cachekd.losses.chunked import ChunkedLoss
from cachekd.losses.divergences import POINTWISE
from cachekd.losses.plan import (
    FlatDense,
    FlatFactored,
    FlatSampled,
    FlatSparse,
    FlatTarget,
    Prepared,
    Rows,
    make_plan,
    take,
)
from cachekd.losses.rowloss import loss_on_rows
from cachekd.losses.sampled import SampledTarget, uniform_tail_form
from cachekd.losses.types import DenseTarget, FactoredTarget, KDConfig, LossParts, SparseTarget  # noqa: F401

assert set(POINTWISE) == set(OBJECTIVES), "every objective has a pointwise divergence"


# ----------------------------------------------------------------------------------------------------------
# Public types


Target = DenseTarget | SparseTarget | SampledTarget | FactoredTarget


def total_loss_weights(ce_weight: float, temperature: float) -> tuple[float, float]:
    """The coefficients ``(λ, (1−λ)·τ²)`` that ``total_loss`` gives its two means, ``λ = ce_weight``."""
    check_unit_interval("ce_weight", ce_weight)
    check_temperature("temperature", temperature)
    return ce_weight, (1.0 - ce_weight) * temperature**2


def total_loss(ce_mean: Tensor, kd_mean: Tensor, ce_weight: float, temperature: float) -> Tensor:
    """``λ·CE + (1−λ)·τ²·KD`` with ``λ = ce_weight`` (the means already divided by global counts)."""
    w_ce, w_kd = total_loss_weights(ce_weight, temperature)
    return w_ce * ce_mean + w_kd * kd_mean


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
            when ``cfg.detach_mix``); 1 means no mixing. Needs a dense target: a DenseTarget, or a SparseTarget or
            SampledTarget with ``tail_mode`` bucket (rest shaped like the student) or uniform (rest spread evenly).
        chunk_size: if given, positions are processed ``chunk_size`` at a time and recomputed in backward, so the
            float32 (B·T, V) intermediates never exist for the whole batch at once (only the gradient of
            ``student_logits``, in its own dtype, is full-size). Same value and gradient as unchunked.

    Returns:
        LossParts with sums over non-ignored positions and their counts.
    """
    prep = _prepare(student_logits, labels, teachers, cfg, mix_alpha, chunk_size, source_dim=None)
    plan = prep.plan
    if plan.entry == "cross_entropy":
        ce_sum = F.cross_entropy(prep.source.float(), prep.labels, ignore_index=cfg.ignore_index, reduction="sum")
        return _parts(prep, ce_sum, torch.zeros((), dtype=torch.float32, device=ce_sum.device))
    if plan.entry == "chunked":
        return _parts(prep, *ChunkedLoss.apply(prep.source, None, None, prep))
    if plan.mask_ignored:
        # Every row, the ignored ones masked out (see LossPlan.mask_ignored).
        z = prep.source.to(prep.compute_dtype)
        return _parts(prep, *loss_on_rows(z, slice(0, z.shape[0]), prep, ignored=prep.ignored))
    z = take(prep.source, prep.rows).to(prep.compute_dtype)
    return _parts(prep, *loss_on_rows(z, prep.rows, prep))


def chunked_distill_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    teachers: Sequence[Target],
    cfg: KDConfig,
    mix_alpha: float = 1.0,
    chunk_size: int = 128,
    grad_weights: tuple[float, float] | None = None,
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
        grad_weights: (w_ce, w_kd), the weights the caller's loss gives ``ce_sum`` and ``kd_sum`` (only their ratio
            counts). Given (and gradients enabled), forward also forms the gradients while each chunk is at hand,
            so backward need not recompute the logits and the loss (3 matmuls, and a factored teacher rebuilt
            once); a backward whose incoming gradients are in another ratio recomputes as without them.
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
    eager = _grad_weights(grad_weights) if torch.is_grad_enabled() else None
    return _parts(prep, *ChunkedLoss.apply(prep.source, weight, bias, prep, eager))


def _grad_weights(w: tuple[float, float] | None) -> tuple[float, float] | None:
    """`chunked_distill_loss`'s grad_weights checked: two finite numbers, not both 0 (else None: recompute)."""
    if w is None:
        return None
    if len(w) != 2 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in w):
        raise ValueError(f"grad_weights must be two finite numbers (w_ce, w_kd); got {w!r}.")
    return (float(w[0]), float(w[1])) if any(w) else None


# ----------------------------------------------------------------------------------------------------------
# Validation and flattening


def _prepare(
    source: Tensor,
    labels: Tensor,
    teachers: Sequence[Target],
    cfg: KDConfig,
    mix_alpha: float,
    chunk_size: int | None,
    source_dim: int | None,
) -> Prepared:
    """Checks the inputs and flattens them to N = B·T rows; ``source_dim`` is V for hidden states, else None."""
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
    check_unit_interval("mix_alpha", mix_alpha)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer (got {chunk_size!r}).")
    teachers = list(teachers)
    if cfg.teacher_weights is not None and len(cfg.teacher_weights) != len(teachers):
        raise ValueError(
            f"teacher_weights has {len(cfg.teacher_weights)} weights but {len(teachers)} teachers were given."
        )
    shape = (batch_size, seq_len, vocab_size)
    flat = [_flatten_teacher(t, f"teacher {i}", shape, cfg, mix_alpha, len(teachers)) for i, t in enumerate(teachers)]
    raw_weights = cfg.teacher_weights or (1.0,) * len(teachers)
    total = sum(raw_weights) if teachers else 1.0
    kept = [(t, w / total) for t, w in zip(flat, raw_weights) if w > 0]
    labels_flat = labels.reshape(-1).to(device=source.device, dtype=torch.int64)
    rows, ignored, num_valid = _valid_rows(labels_flat, vocab_size, cfg.ignore_index)
    chunks: list[Rows] = []
    if chunk_size is not None:
        if isinstance(rows, slice):
            chunks = [slice(s, min(s + chunk_size, num_valid)) for s in range(0, num_valid, chunk_size)]
        else:
            chunks = list(rows.split(chunk_size))
    compute_dtype = torch.float64 if source.dtype == torch.float64 else torch.float32
    kept_teachers = [t for t, _ in kept]
    return Prepared(
        source=source.reshape(batch_size * seq_len, source.shape[2]),
        labels=labels_flat,
        teachers=kept_teachers,
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
        plan=make_plan(kept_teachers, cfg, float(mix_alpha), chunk_size is not None, compute_dtype, len(teachers)),
    )


def _flatten_teacher(
    t: Target, name: str, shape: tuple[int, int, int], cfg: KDConfig, mix_alpha: float, num_teachers: int
) -> FlatTarget:
    """One teacher checked against the (B, T, V) ``shape`` and flattened to rows (detached)."""
    batch_size, seq_len, vocab_size = shape
    if isinstance(t, DenseTarget):
        if tuple(t.logits.shape) != shape or not t.logits.is_floating_point():
            raise ValueError(
                f"{name}: dense teacher logits must be float (B, T, V) = {shape}; "
                f"got {t.logits.dtype} {tuple(t.logits.shape)}."
            )
        return FlatDense(t.logits.detach().reshape(-1, vocab_size))
    if isinstance(t, FactoredTarget):
        return _flatten_factored(t, name, shape)
    if isinstance(t, SampledTarget):
        return _flatten_sampled(t, name, shape, cfg, mix_alpha, num_teachers)
    if not isinstance(t, SparseTarget):
        raise ValueError(f"{name} must be a DenseTarget, SparseTarget, SampledTarget or FactoredTarget (got "
                         f"{type(t).__name__}).")
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
    mixing = mix_alpha < 1.0
    combine_dense = num_teachers > 1 and cfg.teacher_combine != "losses"
    if (mixing or combine_dense) and cfg.tail_mode == "renormalize":
        why = f"mixing (mix_alpha={mix_alpha})" if mixing else f"teacher_combine={cfg.teacher_combine!r}"
        raise ValueError(
            f"{why} needs a dense teacher target, but tail_mode='renormalize' drops the sparse teacher's tail; "
            f"use tail_mode='bucket' (the rest shaped like the student) or 'uniform' (the rest spread evenly)"
            + (" or teacher_combine='losses'." if not mixing else ".")
        )
    return FlatSparse(
        ids=t.ids.detach().reshape(-1, k),
        logits=t.logits.detach().reshape(-1, k),
        tail_lse=t.tail_lse.detach().reshape(-1),
    )


def _flatten_factored(t: FactoredTarget, name: str, shape: tuple[int, int, int]) -> FlatFactored:
    """A factored teacher checked against the (B, T, V) ``shape`` and flattened to rows (detached)."""
    batch_size, seq_len, vocab_size = shape
    h, w, b = t.hidden, t.weight, t.bias
    if h.dim() != 3 or tuple(h.shape[:2]) != (batch_size, seq_len) or not h.is_floating_point():
        raise ValueError(f"{name}: factored hidden must be float (B, T, d) with B, T = {(batch_size, seq_len)}; got "
                         f"{h.dtype} {tuple(h.shape)}.")
    if tuple(w.shape) != (vocab_size, h.shape[2]) or not w.is_floating_point():
        raise ValueError(f"{name}: factored weight must be float (V, d) = {(vocab_size, h.shape[2])}; got {w.dtype} "
                         f"{tuple(w.shape)}.")
    if b is not None and (tuple(b.shape) != (vocab_size,) or not b.is_floating_point()):
        raise ValueError(f"{name}: factored bias must be float (V,) = ({vocab_size},); got {b.dtype} {tuple(b.shape)}.")
    return FlatFactored(hidden=h.detach().reshape(-1, h.shape[2]), weight=w.detach(),
                        bias=None if b is None else b.detach())


def _flatten_sampled(
    t: SampledTarget, name: str, shape: tuple[int, int, int], cfg: KDConfig, mix_alpha: float, num_teachers: int
) -> FlatSampled | FlatSparse:
    """A sampled teacher checked and flattened: compared at its ids, or in its uniform-tail form when it must become
    a dense target (mixing; combining by logits or probabilities)."""
    batch_size, seq_len, vocab_size = shape
    s = t.ids.shape[-1] if t.ids.dim() == 3 else -1
    if t.ids.dim() != 3 or tuple(t.ids.shape[:2]) != (batch_size, seq_len) or s < 1:
        raise ValueError(f"{name}: sampled ids must be (B, T, S) with B, T = {(batch_size, seq_len)}; "
                         f"got {tuple(t.ids.shape)}.")
    if t.ids.dtype.is_floating_point or t.ids.dtype == torch.bool:
        raise ValueError(f"{name}: sampled ids must be an integer tensor (got {t.ids.dtype}).")
    for field_name in ("logp", "weights"):
        v = getattr(t, field_name)
        if tuple(v.shape) != tuple(t.ids.shape) or not v.is_floating_point():
            raise ValueError(f"{name}: sampled {field_name} must be float with the ids' shape {tuple(t.ids.shape)}; "
                             f"got {v.dtype} {tuple(v.shape)}.")
    for field_name in ("log_rest", "entropy"):
        v = getattr(t, field_name)
        if tuple(v.shape) != (batch_size, seq_len):
            raise ValueError(f"{name}: sampled {field_name} must be (B, T) = {(batch_size, seq_len)}; "
                             f"got {tuple(v.shape)}.")
    if cfg.tail_mode == "uniform" and (mix_alpha < 1.0 or (num_teachers > 1 and cfg.teacher_combine != "losses")):
        # A dense target with the uniform rest: the stored ids at their exact p, the exact rest spread evenly.
        # (With the other tail modes the rest is shaped like the student: rowloss builds that from the rows.)
        ids, logits, tail_lse = uniform_tail_form(t, vocab_size, cfg.temperature)
        k = ids.shape[-1]
        return FlatSparse(ids=ids.detach().reshape(-1, k), logits=logits.detach().reshape(-1, k),
                          tail_lse=tail_lse.detach().reshape(-1))
    return FlatSampled(ids=t.ids.detach().reshape(-1, s), logp=t.logp.detach().reshape(-1, s),
                       weights=t.weights.detach().reshape(-1, s), log_rest=t.log_rest.detach().reshape(-1),
                       entropy=t.entropy.detach().reshape(-1))


def _valid_rows(labels: Tensor, vocab_size: int, ignore_index: int) -> tuple[Rows, Tensor | None, int]:
    """(rows, ignored, num_valid) for the flat labels (N,): the non-ignored rows (a slice when all are, else an
    int64 index), the ignored ones (an index, or None) and their count; labels are checked to be token ids."""
    valid = labels != ignore_index
    num_valid = int(valid.sum())
    if num_valid == labels.numel():
        rows: Rows = slice(0, num_valid)
        ignored = None
    else:
        rows = valid.nonzero().squeeze(1)
        ignored = (~valid).nonzero().squeeze(1)
    if num_valid:
        valid_labels = labels[rows]
        low, high = int(valid_labels.min()), int(valid_labels.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"labels must be token ids in [0, {vocab_size}) or ignore_index={ignore_index}; "
                f"found {low if low < 0 else high}."
            )
    return rows, ignored, num_valid


def _parts(prep: Prepared, ce_sum: Tensor, kd_sum: Tensor) -> LossParts:
    """The sums with their counts (see LossParts and KDConfig.reduction)."""
    device = ce_sum.device
    count = torch.tensor(prep.num_valid, dtype=torch.int64, device=device)
    if prep.num_teachers == 0:
        kd_count = torch.tensor(0, dtype=torch.int64, device=device)
    elif prep.cfg.reduction == "batchmean":
        kd_count = torch.tensor(prep.batch_size, dtype=torch.int64, device=device)
    else:
        kd_count = count.clone()
    return LossParts(ce_sum=ce_sum, ce_count=count, kd_sum=kd_sum, kd_count=kd_count)


# ----------------------------------------------------------------------------------------------------------
# Small helpers
