"""The fused ChooBaCa path: CE + forward or reverse KL against a sparse uniform-tail teacher mixed with the student.

The mixed target has logits ``μ_v = α·log p_v + β·z_v`` (β = 1 − α, τ = 1), where ``log p`` is the uniform-tail
reconstruction of the sparse teacher: its log-probabilities at the k ids and ``log u = log(tail mass / (V − k))``
on every other token. On the tail, ``μ_v − β·M = α·log u + β·d_v`` with ``d = z − M`` (M the row max), so every
tail quantity is a per-row constant times one of ``e_v = exp(d_v)`` and ``e_v^β = exp(β·d_v)``, possibly times
``d_v``. ``MixedSparseStudent`` reads the logits once in forward for the row sums of ``e``, ``e·d``, ``e^β`` (and
``e^β·d`` for forward KL) over the tail, and writes the gradient once in backward as
``e·(A + B·d) + e^β·(C + E·d)`` with per-row A, B, C, E, overwritten at the k ids by their exact values. No (n, V)
log-softmax, mixed target or divergence tensor is formed (the general path forms about ten).

Clamping follows ``divergences``: a mixed log-probability of ``-inf`` (a teacher value of ``-inf``, or a tail
of zero mass) is raised to ``LOG_FLOOR`` and passes no gradient. A tail sum that underflows (tail logits more than
~87/β below the row max) is lost: those terms are below e^-87 of the row's mass and change nothing in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from cachekd.losses.divergences import LOG_FLOOR
from cachekd.rows import row_blocks

MixedObjective = Literal["forward_kl", "reverse_kl"]
FUSED_MIX_OBJECTIVES: tuple[str, ...] = ("forward_kl", "reverse_kl")
"""The objectives ``MixedSparseStudent`` computes; the plan sends the others to the (n, V) log-softmax path."""


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """(r,) Σ_v a·b for (r, V) tensors, without an (r, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


@dataclass
class LogitStats:
    """One pass over n rows of logits: all that the loss needs from the (n, V) logits in forward."""

    m: Tensor  # (n, 1) row max
    tail_sums: Tensor  # (4, n) over the tail (columns not in the ids): Σ e, Σ e·d, Σ e^β, Σ e^β·d (0 if not asked)
    z_ids: Tensor  # (n, k) the logits at the ids
    z_label: Tensor  # (n,) the logit of the label

    @staticmethod
    def cat(parts: list[LogitStats]) -> LogitStats:
        """The stats of consecutive row ranges as one."""
        return LogitStats(
            m=torch.cat([p.m for p in parts]), tail_sums=torch.cat([p.tail_sums for p in parts], dim=1),
            z_ids=torch.cat([p.z_ids for p in parts]), z_label=torch.cat([p.z_label for p in parts]),
        )


def logit_stats(z: Tensor, labels: Tensor, ids: Tensor, beta: float, with_eb_d: bool) -> LogitStats:
    """The row max, the tail sums of e = exp(z − m), e·d, e^β = exp(β·d) (and e^β·d if asked; d = z − m), and the
    logits at the ids and the label, for logits ``z`` (n, V), a block of rows at a time."""
    n = z.shape[0]
    m = z.amax(dim=-1, keepdim=True)  # (n, 1)
    sums = torch.zeros(4, n, dtype=z.dtype, device=z.device)
    for rows in row_blocks(z):
        d = z[rows] - m[rows]  # (r, V)
        e = d.exp().scatter_(1, ids[rows], 0.0)
        sums[0, rows] = e.sum(-1)
        sums[1, rows] = _row_dot(e, d)
        if beta == 1.0:  # α = 0: the target is the student itself
            e_beta = e
        elif beta == 0.5:  # exp(d/2) = √exp(d): a square root is far cheaper than a second exp
            e_beta = e.sqrt_()
        else:
            e_beta = torch.mul(d, beta, out=e).exp_().scatter_(1, ids[rows], 0.0)
        sums[2, rows] = e_beta.sum(-1)
        if with_eb_d:
            sums[3, rows] = _row_dot(e_beta, d)
    return LogitStats(m=m, tail_sums=sums, z_ids=z.gather(1, ids), z_label=z.gather(1, labels.unsqueeze(1)).squeeze(1))


@dataclass
class MixedRows:
    """What the gradient needs besides the logits, O(n·k): saved by ``mixed_forward`` for ``mixed_backward``."""

    labels: Tensor  # (n,) int64
    ids: Tensor  # (n, k) int64
    m: Tensor  # (n, 1) row max of the logits
    log_s: Tensor  # (n,) log Σ exp(z − m)
    logq_ids: Tensor  # (n, k) the student's log-probabilities at the ids
    ell_ids: Tensor  # (n, k) the mixed target's log-probabilities there (clamped at LOG_FLOOR)
    slope: Tensor  # (n,) on the tail, log q_v − ℓ_v = slope·d_v + c
    c: Tensor  # (n,)
    p_scale: Tensor  # (n,) on the tail, p_v = p_scale·exp(β·d_v)
    sum_p: Tensor  # (n,) Σ p (1 up to rounding)
    kd: Tensor  # (n,) the divergence
    unclamped_q: Tensor  # (n,) the student's mass where ℓ is not clamped
    finite: Tensor  # (n,) bool: the tail's ℓ is not clamped
    ignored: Tensor | None
    alpha: float
    forward_kl: bool
    detach_mix: bool

    @property
    def with_e_beta(self) -> bool:
        """The tail gradient has an e^β term (everywhere but reverse KL with the target detached)."""
        return self.forward_kl or not self.detach_mix


def mixed_forward(
    z: Tensor, labels: Tensor, ids: Tensor, logp_ids: Tensor, log_u: Tensor, alpha: float,
    objective: MixedObjective, detach_mix: bool, ignored: Tensor | None,
) -> tuple[Tensor, Tensor, MixedRows]:
    """Per-row CE and KD(student ‖ mixed target) for student logits ``z`` (n, V) at τ = 1, no autograd.

    Inputs: ``labels`` (n,) int64; ``ids`` (n, k) int64, distinct in a row; ``logp_ids`` (n, k) the teacher's
    log-probabilities at the ids (tail included in the normalisation); ``log_u`` (n,) the log of the teacher's
    probability of each tail token (``-inf`` for a tail of zero mass; ignored when k = V); ``alpha`` in [0, 1);
    ``objective`` forward_kl (KL(p_mix‖q)) or reverse_kl (KL(q‖p_mix)); ``detach_mix``: the student part of the
    target passes no gradient (for ``mixed_backward``). Rows in ``ignored`` (int64 index or None) give zeros and a
    zero gradient, whatever ``z`` holds there. Returns ``ce`` (n,), ``kd`` (n,) and the state for the gradient.
    """
    stats = logit_stats(z, labels, ids, 1.0 - alpha, with_eb_d=objective == "forward_kl")
    return mixed_from_stats(stats, z.shape[1], labels, ids, logp_ids, log_u, alpha, objective, detach_mix, ignored)


def mixed_from_stats(
    stats: LogitStats, vocab_size: int, labels: Tensor, ids: Tensor, logp_ids: Tensor, log_u: Tensor, alpha: float,
    objective: MixedObjective, detach_mix: bool, ignored: Tensor | None,
) -> tuple[Tensor, Tensor, MixedRows]:
    """``mixed_forward`` from the logits' ``LogitStats`` (O(n·k): no pass over the logits)."""
    beta = 1.0 - alpha
    forward_kl = objective == "forward_kl"
    m = stats.m
    s_tail, ed_tail, eb_tail, ebd_tail = stats.tail_sums.unbind(0)
    d_ids = stats.z_ids - m  # (n, k)
    log_s = torch.logaddexp(s_tail.log(), torch.logsumexp(d_ids, dim=-1))  # (n,) log Σ_all e
    s = log_s.exp()
    logq_ids = d_ids - log_s.unsqueeze(1)
    q_ids = logq_ids.exp()
    # The mixed logits less β·M: α·log p_i + β·d_i on the ids, α·log u + β·d_v on the tail.
    au = alpha * log_u if alpha > 0.0 else torch.zeros_like(log_u)
    mu_ids = alpha * logp_ids + beta * d_ids if alpha > 0.0 else beta * d_ids
    has_tail = ids.shape[1] < vocab_size
    # (n,) whether the tail's mixed log-probabilities are finite (not clamped)
    finite = torch.isfinite(au) if has_tail else torch.zeros_like(au, dtype=torch.bool)
    lse_mix = torch.logaddexp(torch.logsumexp(mu_ids, dim=-1), au + eb_tail.log())  # (n,)
    ell_ids = (mu_ids - lse_mix.unsqueeze(1)).clamp_min(LOG_FLOOR)  # (n, k) mixed log-probabilities
    # On the tail, log q_v − ℓ_v = α·d_v + c (c = L − log S − α log u); clamped (ℓ = LOG_FLOOR): d_v + c_inf.
    slope = torch.ones_like(log_s).masked_fill_(finite, alpha)  # (n,)
    c = torch.where(finite, lse_mix - log_s - au, -log_s - LOG_FLOOR)
    p_scale = torch.where(finite, au - lse_mix, -torch.inf).exp()  # p_v = p_scale·e_v^β on the tail
    p_ids = ell_ids.exp()  # (0 where clamped)
    sum_p = p_ids.sum(-1) + p_scale * eb_tail
    if forward_kl:
        head = (p_ids * (ell_ids - logq_ids)).sum(-1)
        tail = torch.where(finite, -p_scale * (c * eb_tail + alpha * ebd_tail), 0.0)
    else:
        head = (q_ids * (logq_ids - ell_ids)).sum(-1)
        tail = (slope * ed_tail + c * s_tail) / s
    kd = head + tail
    ce = (m.squeeze(1) - stats.z_label) + log_s
    if ignored is not None:  # whatever z holds there, ignored rows give finite zeros
        ce.index_fill_(0, ignored, 0.0)
        kd.index_fill_(0, ignored, 0.0)
    unclamped_q = (q_ids * (ell_ids > LOG_FLOOR)).sum(-1) + torch.where(finite, s_tail / s, 0.0)
    state = MixedRows(
        labels=labels, ids=ids, m=m, log_s=log_s, logq_ids=logq_ids, ell_ids=ell_ids, slope=slope, c=c,
        p_scale=p_scale, sum_p=sum_p, kd=kd.clone(), unclamped_q=unclamped_q, finite=finite, ignored=ignored,
        alpha=alpha, forward_kl=forward_kl, detach_mix=detach_mix,
    )
    return ce, kd, state


def mixed_backward(z: Tensor, st: MixedRows, g_ce: Tensor, g_kd: Tensor) -> Tensor:
    """(n, V) the gradient of ``Σ g_ce·ce + g_kd·kd`` with respect to ``z`` (the logits ``mixed_forward`` saw);
    ``g_ce``, ``g_kd`` per row (n,) or scalars."""
    return gradient_pass(z, st, grad_coefficients(st, g_ce, g_kd))


@dataclass
class GradCoefficients:
    """Per row, the gradient with respect to the logits: ``e·(a + b·d) + e^β·(c_eb + e_eb·d)`` on the tail,
    ``at_ids`` at the ids, ``−g_ce`` added at the label."""

    a: Tensor  # (n, 1)
    b: Tensor  # (n, 1)
    c_eb: Tensor  # (n, 1)
    e_eb: Tensor  # (n, 1)
    at_ids: Tensor  # (n, k)
    g_ce: Tensor  # (n, 1)


def grad_coefficients(st: MixedRows, g_ce: Tensor, g_kd: Tensor) -> GradCoefficients:
    """The ``GradCoefficients`` of ``Σ g_ce·ce + g_kd·kd`` (``g_ce``, ``g_kd`` per row (n,) or scalars)."""
    n = st.log_s.shape[0]
    g_ce, g_kd = g_ce.expand(n), g_kd.expand(n)
    beta = 1.0 - st.alpha
    a, b, c_eb, e_eb = (x.unsqueeze(1) for x in _tail_coefficients(st, g_ce, g_kd))  # (n, 1) each
    # The k ids: their exact gradient (the row formula holds on the tail only).
    q_ids, p_ids, ell_ids, logq_ids = st.logq_ids.exp(), st.ell_ids.exp(), st.ell_ids, st.logq_ids
    kd = st.kd.unsqueeze(1)
    if st.forward_kl:
        kd_ids = q_ids * st.sum_p.unsqueeze(1) - p_ids
        if not st.detach_mix:
            kd_ids = kd_ids + beta * p_ids * (ell_ids - logq_ids + 1.0 - kd - st.sum_p.unsqueeze(1))
    else:
        kd_ids = q_ids * (logq_ids - ell_ids - kd)
        if not st.detach_mix:
            kd_ids = kd_ids + beta * (p_ids * st.unclamped_q.unsqueeze(1) - q_ids * (ell_ids > LOG_FLOOR))
    g_ce1 = g_ce.unsqueeze(1)
    return GradCoefficients(a=a, b=b, c_eb=c_eb, e_eb=e_eb, at_ids=g_ce1 * q_ids + g_kd.unsqueeze(1) * kd_ids,
                            g_ce=g_ce1)


def gradient_pass(z: Tensor, st: MixedRows, coef: GradCoefficients, rows: slice | None = None) -> Tensor:
    """(n, V) the gradient for logits ``z``: all of ``st``'s rows, or the range ``rows`` of them (a chunk)."""
    if rows is None:
        rows = slice(0, z.shape[0])
    m, ids, labels = st.m[rows], st.ids[rows], st.labels[rows]
    a, b, c_eb, e_eb = coef.a[rows], coef.b[rows], coef.c_eb[rows], coef.e_eb[rows]
    beta = 1.0 - st.alpha
    grad = torch.empty_like(z)
    for block in row_blocks(z):
        d = torch.sub(z[block], m[block], out=grad[block])
        e = d.exp()
        if st.with_e_beta:
            e_beta = e.sqrt() if beta == 0.5 else (e.clone() if beta == 1.0 else torch.mul(d, beta).exp_())
            e_beta.mul_(torch.addcmul(c_eb[block], d, e_eb[block]))
        d.mul_(b[block]).add_(a[block]).mul_(e)
        if st.with_e_beta:
            d.add_(e_beta)
    grad.scatter_(1, ids, coef.at_ids[rows])
    grad.scatter_add_(1, labels.unsqueeze(1), -coef.g_ce[rows])
    if st.ignored is not None:
        assert rows == slice(0, st.log_s.shape[0]), "ignored rows are masked on whole batches only"
        grad.index_fill_(0, st.ignored, 0.0)
    return grad


def _tail_coefficients(st: MixedRows, g_ce: Tensor, g_kd: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row (A, B, C, E) of the tail gradient ``e·(A + B·d) + e^β·(C + E·d)`` (each (n,)).

    CE: q_v = e_v/S. Reverse KL, target detached: q_v (log q_v − ℓ_v − D) = q_v (slope·d_v + c − D); through the
    target: β (p_v U − q_v) with U the student's mass where ℓ is not clamped. Forward KL, detached:
    q_v Σp − p_v with p_v = P·e_v^β; through the target: β p_v (ℓ_v − log q_v + 1 − D − Σp), ℓ_v − log q_v =
    −α d_v − c. A clamped tail (``finite`` false) has p_v = 0 and no gradient through the target.
    """
    alpha, beta = st.alpha, 1.0 - st.alpha
    inv_s = torch.exp(-st.log_s)
    zero = torch.zeros_like(g_ce)
    if st.forward_kl:
        a = (g_ce + g_kd * st.sum_p) * inv_s
        c_eb = -g_kd * st.p_scale
        e_eb = zero
        if not st.detach_mix:
            c_eb = c_eb + torch.where(st.finite, beta * g_kd * st.p_scale * (1.0 - st.c - st.kd - st.sum_p), 0.0)
            e_eb = torch.where(st.finite, -beta * alpha * g_kd * st.p_scale, 0.0)
        return a, zero, c_eb, e_eb
    a = (g_ce + g_kd * (st.c - st.kd)) * inv_s
    b = g_kd * st.slope * inv_s
    if st.detach_mix:
        return a, b, zero, zero
    a = a - torch.where(st.finite, beta * g_kd * inv_s, 0.0)
    c_eb = torch.where(st.finite, beta * g_kd * st.p_scale * st.unclamped_q, 0.0)
    return a, b, c_eb, zero


class MixedSparseStudent(torch.autograd.Function):
    """``mixed_forward`` as an autograd function of ``z`` (the other inputs are constants); returns (ce, kd)."""

    @staticmethod
    def forward(
        ctx, z: Tensor, labels: Tensor, ids: Tensor, logp_ids: Tensor, log_u: Tensor, alpha: float,
        objective: MixedObjective, detach_mix: bool, ignored: Tensor | None,
    ):
        ce, kd, state = mixed_forward(z, labels, ids, logp_ids, log_u, alpha, objective, detach_mix, ignored)
        ctx.save_for_backward(z)
        ctx.state = state
        return ce, kd

    @staticmethod
    @once_differentiable
    def backward(ctx, g_ce: Tensor, g_kd: Tensor):
        (z,) = ctx.saved_tensors
        return mixed_backward(z, ctx.state, g_ce, g_kd), None, None, None, None, None, None, None, None
