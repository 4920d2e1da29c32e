"""One micro-batch flattened to rows, and the plan of how its loss is computed (decided once, here).

``api`` validates the public inputs and builds a ``Prepared`` batch: N = B·T rows of student logits (or hidden
states), labels, the teachers as flat row tensors, the non-ignored rows and the chunks. ``LossPlan`` then makes
every choice of method once: plain ``F.cross_entropy``; the fused sparse student (``sparse.SparseStudent``: no
(n, V) log-softmax, ignored rows masked rather than dropped when unchunked); the (n, V) log-softmax; teachers
compared one by one or combined into one dense target; mixing; chunking. ``rowloss`` and ``chunked`` follow it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

import cachekd.losses.mixed as mixed

if TYPE_CHECKING:
    from cachekd.losses.types import KDConfig

Rows = slice | Tensor
"""A set of flattened rows: a slice, or an int64 index."""


@dataclass
class FlatDense:
    """A dense teacher on the N flattened rows (a constant: detached)."""

    logits: Tensor  # (N, V)


@dataclass
class FlatSparse:
    """A sparse teacher on the N flattened rows (constants: detached)."""

    ids: Tensor  # (N, k) integer ids
    logits: Tensor  # (N, k)
    tail_lse: Tensor  # (N,)


@dataclass
class FlatSampled:
    """A sampled or hybrid teacher on the N flattened rows (constants: detached; see ``sampled``)."""

    ids: Tensor  # (N, S) integer ids
    logp: Tensor  # (N, S) log p_τ at the ids, −inf at pads
    weights: Tensor  # (N, S) forward-KL estimator weights
    log_rest: Tensor  # (N,)
    entropy: Tensor  # (N,)


@dataclass
class FlatFactored:
    """A factored teacher on the N flattened rows (constants: detached): its logits are ``hidden @ weight.T + bias``,
    formed only for the rows a pass takes (``rowloss.teacher_rows``), so a chunked loss never holds more than a
    chunk of them. Everywhere else it is a dense teacher."""

    hidden: Tensor  # (N, d)
    weight: Tensor  # (V, d)
    bias: Tensor | None  # (V,)


FlatTarget = FlatDense | FlatSparse | FlatSampled | FlatFactored


@dataclass(frozen=True)
class LossPlan:
    """How the loss of a batch is computed; every path follows these fields and decides nothing itself."""

    entry: Literal["cross_entropy", "rows", "chunked"]
    """cross_entropy: CE alone through ``F.cross_entropy`` (no teacher, float32, unchunked); rows: one pass over
    the rows (all of them with ``mask_ignored``, else the non-ignored ones); chunked: ``chunked.ChunkedLoss``."""
    student: Literal["fused", "fused_mix", "log_softmax"]
    """fused: the CE and the sparse teachers' student values from ``sparse.SparseStudent`` (no (n, V)
    log-softmax); fused_mix: the CE and the KD term against one sparse uniform-tail teacher mixed with the
    student from ``mixed.MixedSparseStudent`` (τ = 1, forward or reverse KL: the ChooBaCa path); log_softmax:
    from the (n, V) log-softmax (``student.Student``)."""
    combine: Literal["per_teacher", "logits", "probs"]
    """per_teacher: a weighted sum of per-teacher divergences (one teacher, or teacher_combine="losses");
    logits/probs: the teachers combined into one dense target first."""
    mixing: bool
    """mix_alpha < 1: every teacher's target is mixed with the student's logits: on the coarse-grained categories
    (``mix_bucket``), else as a dense target."""
    mix_bucket: bool
    """Mixing with sparse or sampled teachers compared one by one, their rest shaped like the student (any tail mode
    but uniform) and a detached student part: the mixed target is formed on the stored ids and the rest as one
    category (``divergences.mixed_bucket_target``), O(k) a position on the fused student, which equals the dense
    mixed target with ``sparse.student_shaped_logp``."""
    mask_ignored: bool
    """The rows pass covers every row and masks the ignored ones out (fused students, unchunked, only): selecting
    the others would copy the (N, V) logits and, in backward, scatter their gradient back."""
    bucket_tails: bool
    """Sparse teachers with k < V take the student's tail mass from the fused student (tail_mode bucket)."""
    chunk_state: bool
    """Chunked with the fused_mix student: forward keeps each chunk's O(n·k) statistics (``mixed.MixedRows``) and
    backward recomputes only the chunk's logits, not its loss."""

    @property
    def sparse_by_ids(self) -> bool:
        """Sparse teachers are compared at their ids (no dense reconstruction): per teacher, without mixing or
        mixed on the coarse-grained categories."""
        return self.combine == "per_teacher" and (not self.mixing or self.mix_bucket)


def make_plan(
    teachers: list[FlatTarget], cfg: KDConfig, mix_alpha: float, chunked: bool, compute_dtype: torch.dtype,
    num_teachers_given: int,
) -> LossPlan:
    """The one decision of how to compute the loss (see ``LossPlan``)."""
    mixing = mix_alpha < 1.0
    combine = "per_teacher" if len(teachers) <= 1 or cfg.teacher_combine == "losses" else cfg.teacher_combine
    # (sampled targets compared one by one ignore the tail mode: their rest is always one bucket; one that must be
    # mixed with the uniform tail arrives here already in its uniform-tail sparse form, and a sparse one with the
    # renormalize tail is refused before any mixing)
    by_ids = all(isinstance(t, FlatSampled) or (isinstance(t, FlatSparse) and cfg.tail_mode != "uniform")
                 for t in teachers)
    mix_bucket = (mixing and mix_alpha > 0.0 and combine == "per_teacher" and cfg.detach_mix and bool(teachers)
                  and by_ids)
    fused = (cfg.tail_mode != "uniform" or any(isinstance(t, FlatSampled) for t in teachers)) and (
        not teachers or (combine == "per_teacher" and (not mixing or mix_bucket) and by_ids)
    )
    fused_mix = (
        mixing
        and cfg.temperature == 1.0
        and cfg.objective in mixed.FUSED_MIX_OBJECTIVES
        and len(teachers) == 1
        and isinstance(teachers[0], FlatSparse)
        and cfg.tail_mode == "uniform"
    )
    if not chunked and num_teachers_given == 0 and compute_dtype == torch.float32:
        # Cross-entropy alone (plain LM training): PyTorch's fused kernel is ~1.6x faster than the general path.
        entry = "cross_entropy"
    else:
        entry = "chunked" if chunked else "rows"
    return LossPlan(
        entry=entry,
        student="fused" if fused else "fused_mix" if fused_mix else "log_softmax",
        combine=combine,
        mixing=mixing,
        mix_bucket=mix_bucket,
        mask_ignored=(fused or fused_mix) and entry == "rows",
        bucket_tails=fused and cfg.tail_mode == "bucket",
        chunk_state=fused_mix and entry == "chunked",
    )


@dataclass
class Prepared:
    """Everything the per-rows loss needs, flattened to N = B·T rows (built once per call by ``api``)."""

    source: Tensor  # (N, V) student logits or (N, H) hidden states
    labels: Tensor  # (N,) int64
    teachers: list[FlatTarget]  # zero-weight teachers dropped
    weights: list[float]  # normalised, one per teacher in `teachers`
    cfg: KDConfig
    mix_alpha: float
    vocab_size: int
    rows: Rows  # the non-ignored rows: a slice when all are, else an int64 index
    ignored: Tensor | None  # the ignored rows (int64 index), None when there are none
    chunks: list[Rows]  # `rows` split into chunks (chunked paths only)
    num_valid: int
    batch_size: int
    num_teachers: int  # as given (before dropping zero weights): decides kd_count
    compute_dtype: torch.dtype
    plan: LossPlan


def take(x: Tensor, rows: Rows) -> Tensor:
    """Rows of a flattened (N, ...) tensor: the tensor itself or a view for a slice, a copy for an index."""
    if isinstance(rows, slice):
        # Slicing would put a SliceBackward in the graph, which allocates a zero (N, ...) gradient.
        return x if rows == slice(0, x.shape[0]) else x[rows]
    return x.index_select(0, rows)
