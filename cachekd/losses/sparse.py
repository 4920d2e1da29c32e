"""Sparse (top-k) teacher targets: their rows at τ, the fused student side, and the three tail modes.

A ``SparseTarget`` holds the k cached teacher logits, their ids and the log-sum-exp of the rest. ``bucket`` and
``renormalize`` cost ``O(k)`` a position beyond the student's own log-normaliser, which the cross-entropy needs
anyway: ``SparseStudent`` computes the CE, the k student log-probabilities and the student's tail mass together,
reading the logits once in forward and writing their gradient once in backward, without ever forming the (n, V)
log-softmax (on CPU, CE + sparse KD this way is cheaper than ``F.cross_entropy`` alone;
benchmarks/bench_losses.py). ``uniform`` tails are computed in closed form from reductions of the student's
(n, V) log-softmax, or expanded to a dense target (``SparseRows.dense_logp``) for mixing and for combining teachers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from cachekd.losses.divergences import LOG_FLOOR, divergence
from cachekd.losses.plan import FlatSparse, Rows, take
from cachekd.losses.student import CHEAP_TAIL_MIN, Student
from cachekd.rows import block_rows, row_blocks, tail_underflows

if TYPE_CHECKING:
    from cachekd.losses.types import KDConfig


class SparseStudent(torch.autograd.Function):
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
        ids = index[:, 1:]  # (in range at ignored rows too: sparse_rows sanitises them)
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
        # d log q_tail/dx_v = q_v ([v ∉ ids]/q_tail − 1). Where q_tail ≥ CHEAP_TAIL_MIN, the last is folded into
        # the per-row coefficient of q_τ (1/q_tail − 1) and q_i/q_tail is taken back on the ids (both bounded by
        # 2^8: nothing cancels). On the other ("hard") rows the tail part is formed in log space, zeroed on the ids,
        # on those rows only.
        easy = log_tail >= math.log(CHEAP_TAIL_MIN)  # (n, G)
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
            back = tail_scale[:, g : g + 1] / tau * logq_ids[:, cols].exp()
            # an id repeated in the next column (the pads of a sampled target) is outside the tail once: taken back once
            group = ids[:, cols]
            back[:, 1:] *= group[:, 1:] != group[:, :-1]
            at_ids[:, cols] -= back
        grad.scatter_add_(1, index[:, :1], -g_ce)
        grad.scatter_add_(1, ids, at_ids)
        if ignored is not None:
            grad.index_fill_(0, ignored, 0.0)
        return grad, None, None, None, None


@dataclass
class SparseRows:
    """A sparse teacher on n rows, normalised at τ."""

    ids: Tensor  # (n, k) int64
    logp: Tensor  # (n, k) teacher log-probabilities at τ at `ids` (full normalisation, tail included)
    log_tail: Tensor  # (n,) log of the teacher's tail mass at τ (-inf without a tail)
    shifted: Tensor  # (n, k) logits/τ in the cache's per-position shift (for renormalize)

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def student_shaped_logp(self, logq: Tensor) -> Tensor:
        """(n, V) the reconstruction whose tail follows the student (``student_shaped_logp``)."""
        return student_shaped_logp(self.ids, self.logp, self.log_tail, logq)

    def dense_logp(self, vocab_size: int) -> Tensor:
        """(n, V) the uniform-tail reconstruction: ids keep their log-probs, the tail shares its mass evenly."""
        if self.k == vocab_size:
            fill = torch.zeros_like(self.log_tail)  # every entry is overwritten
        else:
            fill = self.log_tail - math.log(vocab_size - self.k)
        out = fill.unsqueeze(1).expand(-1, vocab_size).contiguous()
        return out.scatter_(1, self.ids, self.logp)


def student_shaped_logp(ids: Tensor, logp: Tensor, log_rest: Tensor, logq: Tensor) -> Tensor:
    """(n, V) a dense teacher target whose rest follows the student: the stored ids (n, S) keep their exact
    log-probabilities ``logp`` (entries at −inf are pads: an id repeated with no value of its own), and the exact
    rest mass ``exp(log_rest)`` (n,) is spread over the other tokens in proportion to the student's ``q``
    (``logq`` (n, V), taken as a constant): ``log p̃_v = log_rest + log q_v − log Q_rest``.

    This is the ``bucket`` tail made dense. Against it every divergence, mixed target and logit/probability
    combination of teachers equals the one computed on the coarse-grained distributions (the stored ids, and the
    rest as one category): within the rest the target has the student's own shape, so the loss can move only the
    rest's total mass, never its shape. (The ``uniform`` tail instead pulls the rest toward a flat distribution.)"""
    logq = logq.detach()
    stored = _stored_mask(ids, logp, logq.shape[1])
    log_q_rest = torch.logsumexp(logq.masked_fill(stored, -math.inf), dim=-1).clamp_min(LOG_FLOOR)  # (n,)
    fill = logq + (log_rest - log_q_rest).unsqueeze(1)
    values = torch.full_like(logq, -math.inf).scatter_reduce_(1, ids, logp.to(logq.dtype), "amax")
    return torch.where(stored, values, fill)


def _stored_mask(ids: Tensor, logp: Tensor, vocab_size: int) -> Tensor:
    """(n, V) which tokens hold a stored value (pads, at −inf, mark nothing)."""
    real = torch.isfinite(logp).to(torch.uint8)
    mask = torch.zeros(ids.shape[0], vocab_size, dtype=torch.uint8, device=ids.device)
    return mask.scatter_reduce_(1, ids, real, "amax").bool()


def sparse_rows(
    t: FlatSparse, rows: Rows, temperature: float, dtype: torch.dtype, device: torch.device,
    ignored: Tensor | None,
) -> SparseRows:
    """The sparse teacher ``t`` on ``rows``, normalised at ``temperature``; ``ignored`` rows (an index into
    ``rows``, or None) get a harmless finite target (ids 0..k−1, equal logits)."""
    ids = take(t.ids, rows).to(device=device, dtype=torch.int64)
    shifted = take(t.logits, rows).to(device=device, dtype=dtype) / temperature  # (n, k)
    tail_lse = take(t.tail_lse, rows).to(device=device, dtype=dtype)  # (n,)
    if ignored is not None:  # whatever the teacher holds at ignored rows, make it a harmless finite target
        k = ids.shape[1]
        ids = ids.index_copy(0, ignored, torch.arange(k, device=device).expand(ignored.numel(), k))
        shifted = shifted.index_fill(0, ignored, 0.0)
        tail_lse = tail_lse.index_fill(0, ignored, 0.0)
    lse = torch.logaddexp(torch.logsumexp(shifted, dim=-1), tail_lse)  # full log-normaliser at τ
    return SparseRows(ids=ids, logp=shifted - lse.unsqueeze(1), log_tail=tail_lse - lse, shifted=shifted)


def sparse_divergence(
    student: Student,
    target: SparseRows,
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
        return divergence(logp, logq + (exact - logq).detach(), cfg)
    if not has_tail:  # k = V: the ids are a permutation of the vocabulary and every mode is the dense loss
        return divergence(target.logp, logq_ids, cfg)
    if mode == "bucket":
        if log_tail_q is None:
            log_tail_q = student.log_tail_mass(target.ids, logq_ids)
        logp = torch.cat([target.logp, target.log_tail.unsqueeze(1)], dim=1)  # (n, k + 1)
        logq = torch.cat([logq_ids, log_tail_q.unsqueeze(1)], dim=1)
        return divergence(logp, logq, cfg)

    # uniform: the teacher puts u = m/(V−k) on every tail token. The tail's contribution is computed in closed
    # form from reductions of the student's own log-softmax (no (n, V) teacher tensor):
    #   Σ_tail φ(u, q_v) = Σ_all φ(u, q_v) − Σ_ids φ(u, q_i).
    # Every φ here is bounded by O(|log u| + |log q|) on the ids, so the subtraction loses ~1e-7 absolute.
    log_u = (target.log_tail - math.log(vocab_size - k)).clamp_min(LOG_FLOOR)  # (n,)
    head = divergence(target.logp, logq_ids, cfg)
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
        tail = divergence(log_u, logq, cfg) - divergence(log_u, logq_ids, cfg)
    return head + tail
