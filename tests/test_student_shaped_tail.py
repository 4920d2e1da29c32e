"""tail_mode bucket where a dense target is needed (mixing, combining teachers by logits or probs): the teacher's
rest is shaped like the student, so the loss must equal the one computed on coarse-grained distributions — the
stored ids one by one and the rest as one category. The reference below is written on those categories only (it
never forms a distribution over the vocabulary), in float64, independently of cachekd.losses."""

from __future__ import annotations

import math

import pytest
import torch

from cachekd.losses import KDConfig, SparseTarget, distill_loss
from cachekd.losses.api import _prepare
from tests.reference_losses import make_sparse, ref_divergence

f64 = torch.float64


def _coarse_teacher(p: torch.Tensor, stored: torch.Tensor, cats: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(|U| + 1,) a teacher's mass on the categories U = ``cats`` and the rest of the vocabulary: exact at its own
    stored ids; at an id of U it did not store, its rest mass m times the student's share of that rest
    (q_c / Q_rest); on the rest of U's complement, m · Q(complement of U) / Q_rest."""
    vocab_size = p.shape[0]
    own = torch.zeros(vocab_size, dtype=torch.bool)
    own[stored] = True
    m = 1.0 - p[own].sum()
    q_rest = q[~own].sum()
    in_u = torch.zeros(vocab_size, dtype=torch.bool)
    in_u[cats] = True
    at_u = torch.where(own[cats], p[cats], m * q[cats] / q_rest)
    return torch.cat([at_u, (m * q[~in_u].sum() / q_rest).reshape(1)])


def _coarse_student(logq: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
    in_u = torch.zeros(logq.shape[0], dtype=torch.bool)
    in_u[cats] = True
    return torch.cat([logq[cats], torch.logsumexp(logq[~in_u], 0).reshape(1)])


def _inputs(seed: int, vocab_size: int = 13):
    g = torch.Generator().manual_seed(seed)
    z_student = torch.randn(2, 3, vocab_size, generator=g, dtype=f64) * 2
    teachers = [torch.randn(2, 3, vocab_size, generator=g, dtype=f64) * 3 for _ in range(2)]
    labels = torch.randint(0, vocab_size, (2, 3), generator=g)
    return z_student, teachers, labels, g


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("chunk", [None, 4])
def test_mixing_one_topk_teacher_is_the_coarse_mixture(objective, tau, detach, chunk):
    """ChooBaCa with a top-k cache and the bucket tail: D between softmax(α·log p̄ + (1−α)·log q̄) and q̄ over the
    k ids and the tail (student part detached or not), value and gradient."""
    alpha, k = 0.6, 4
    z, (zt, _), labels, g = _inputs(11)
    target = make_sparse(zt, k, tau, generator=g, top=False)
    _, ids, logits, tail_lse = target
    cfg = KDConfig(objective=objective, temperature=tau, tail_mode="bucket", beta=0.3, detach_mix=detach)
    sparse = SparseTarget(ids=ids, logits=logits, tail_lse=tail_lse)
    # a detached student part is mixed on the categories (fused, O(k)); an attached one through the dense target
    assert _prepare(z, labels, [sparse], cfg, alpha, chunk, source_dim=None).plan.mix_bucket == detach
    s = z.clone().requires_grad_(True)
    parts = distill_loss(s, labels, [SparseTarget(ids=ids, logits=logits, tail_lse=tail_lse)], cfg, mix_alpha=alpha,
                         chunk_size=chunk)
    parts.kd_sum.backward()
    zr = z.clone().requires_grad_(True)
    total = torch.zeros((), dtype=f64)
    for b in range(2):
        for t in range(3):
            p = torch.softmax(zt[b, t] / tau, 0)
            logq = torch.log_softmax(zr[b, t] / tau, 0)
            cats = ids[b, t]
            p_bar = _coarse_teacher(p, cats, cats, logq.detach().exp())
            lq_bar = _coarse_student(logq, cats)
            lq_mix = lq_bar.detach() if detach else lq_bar
            r_bar = torch.log_softmax(alpha * p_bar.log() + (1 - alpha) * lq_mix, 0)
            total = total + ref_divergence(objective, r_bar, lq_bar, beta=0.3)
    total.backward()
    torch.testing.assert_close(parts.kd_sum, total, rtol=1e-6, atol=1e-6)  # (tail_lse is stored float32)
    torch.testing.assert_close(s.grad, zr.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("combine", ["logits", "probs"])
@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_combining_two_topk_teachers_is_the_coarse_combination(combine, objective, alpha):
    """Baby Llama's two teachers with top-k caches of different ids and the bucket tail: the categories are the
    union U of the stored ids and the rest; each teacher's mass on an id of U it did not store is its rest mass
    shared like the student; combined by logits (normalised weighted geometric mean) or probs (weighted mean),
    optionally mixed with the student; value and gradient."""
    tau, w = 2.0, (0.3, 0.7)
    z, teachers, labels, g = _inputs(12)
    sparse = [make_sparse(zt, k, tau, generator=g, top=False) for zt, k in zip(teachers, (3, 5))]
    cfg = KDConfig(objective=objective, temperature=tau, tail_mode="bucket", teacher_combine=combine,
                   teacher_weights=w)
    s = z.clone().requires_grad_(True)
    parts = distill_loss(s, labels, [SparseTarget(ids=i, logits=l, tail_lse=tl) for _, i, l, tl in sparse], cfg,
                         mix_alpha=alpha)
    parts.kd_sum.backward()
    zr = z.clone().requires_grad_(True)
    total = torch.zeros((), dtype=f64)
    overlap = 0
    for b in range(2):
        for t in range(3):
            logq = torch.log_softmax(zr[b, t] / tau, 0)
            q = logq.detach().exp()
            own = [sp[1][b, t] for sp in sparse]
            cats = torch.unique(torch.cat(own))
            overlap += int(sum(len(o) for o in own) - len(cats))
            bars = [_coarse_teacher(torch.softmax(zt[b, t] / tau, 0), o, cats, q) for zt, o in zip(teachers, own)]
            if combine == "logits":
                r_bar = torch.log_softmax(w[0] * bars[0].log() + w[1] * bars[1].log(), 0)
            else:
                r_bar = torch.log(w[0] * bars[0] + w[1] * bars[1])
            lq_bar = _coarse_student(logq, cats)
            if alpha < 1.0:
                r_bar = torch.log_softmax(alpha * r_bar + (1 - alpha) * lq_bar.detach(), 0)
            total = total + ref_divergence(objective, r_bar, lq_bar)
    assert overlap > 0 and overlap < 6 * 8, "the fixture must have ids stored by one teacher only, and shared ones"
    total.backward()
    torch.testing.assert_close(parts.kd_sum, total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.grad, zr.grad, rtol=1e-5, atol=1e-6)


def test_bucket_tail_leaves_the_students_rest_shape_alone():
    """The point of the bucket tail in a dense target: the gradient on the student's rest tokens is proportional
    to q (it changes the rest's total mass, not its shape), where the uniform tail pulls the rest toward flat."""
    z, (zt, _), labels, g = _inputs(13, vocab_size=20)
    _, ids, logits, tail_lse = make_sparse(zt, 5, 1.0, generator=g)
    target = SparseTarget(ids=ids, logits=logits, tail_lse=tail_lse)
    grads = {}
    for tail in ("bucket", "uniform"):
        s = z.clone().requires_grad_(True)
        distill_loss(s, labels, [target], KDConfig(objective="reverse_kl", temperature=1.0, tail_mode=tail),
                     mix_alpha=0.5).kd_sum.backward()
        grads[tail] = s.grad
    q = torch.softmax(z, -1)
    rest = torch.ones_like(z, dtype=torch.bool).scatter_(-1, ids, False)
    for tail, shape_kept in (("bucket", True), ("uniform", False)):
        ratio = torch.where(rest, grads[tail] / q, math.nan)  # per position: constant over the rest iff q-shaped
        spread = (ratio.nan_to_num(nan=-math.inf).amax(-1) - ratio.nan_to_num(nan=math.inf).amin(-1)).max()
        assert (spread < 1e-10) == shape_kept, (tail, float(spread))


def test_renormalize_cannot_make_a_dense_target():
    z, (zt, _), labels, g = _inputs(14)
    _, ids, logits, tail_lse = make_sparse(zt, 4, 1.0, generator=g)
    target = SparseTarget(ids=ids, logits=logits, tail_lse=tail_lse)
    with pytest.raises(ValueError, match="renormalize.*bucket"):
        distill_loss(z, labels, [target], KDConfig(tail_mode="renormalize"), mix_alpha=0.5)
