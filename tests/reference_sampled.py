"""Independent float64 reference for sampled and hybrid targets (cachekd.losses.sampled), from the teacher's full
logits: explicit distributions one position at a time, never importing cachekd.

A sampled target here is the teacher's logits (V,), the exact top-K ids (a list, maybe empty), the drawn ids with
their counts, and the proposal temperature. The importance weights are p_τ(v)/r_tail(v)·c_v/N with both
distributions formed explicitly over the vocabulary.
"""

from __future__ import annotations

import torch

from tests.reference_losses import ref_divergence

f64 = torch.float64


def ref_weights(z: torch.Tensor, exact: list[int], drawn: list[int], counts: list[int], tau: float,
                tau_r: float) -> dict[int, float]:
    """{id: weight}: p_τ(v) for the exact ids; (c_v/N)·p_τ(v)/r_tail(v) for the drawn ones, r_tail the proposal at
    τ_r restricted to the tokens outside `exact` and renormalised."""
    z = z.to(f64)
    p = torch.softmax(z / tau, 0)
    r = torch.softmax(z / tau_r, 0)
    outside = torch.ones_like(r, dtype=torch.bool)
    outside[exact] = False
    r_tail = torch.where(outside, r, torch.zeros((), dtype=f64))
    r_tail = r_tail / r_tail.sum()
    n = sum(counts)
    out = {v: float(p[v]) for v in exact}
    for v, c in zip(drawn, counts):
        out[v] = c / n * float(p[v] / r_tail[v])
    return out


def ref_forward_kl_estimate(z_teacher: torch.Tensor, z_student: torch.Tensor, weights: dict[int, float],
                            tau: float) -> torch.Tensor:
    """−H(p_τ) − Σ_v w_v log q_τ(v) (differentiable in the student logits)."""
    logp = torch.log_softmax(z_teacher.to(f64) / tau, 0)
    entropy = -(logp.exp() * logp).sum()
    logq = torch.log_softmax(z_student / tau, 0)
    return -entropy - sum(w * logq[v] for v, w in weights.items())


def ref_bucket(objective: str, z_teacher: torch.Tensor, z_student: torch.Tensor, stored: list[int], tau: float,
               beta: float = 0.5, lam: float = 0.1) -> torch.Tensor:
    """The divergence of the coarse-grained distributions: each stored id, and one bucket for the rest."""
    logp = torch.log_softmax(z_teacher.to(f64) / tau, 0)
    logq = torch.log_softmax(z_student / tau, 0)
    rest = torch.ones(logp.shape[0], dtype=torch.bool)
    rest[stored] = False
    cats_p = [logp[v] for v in stored]
    cats_q = [logq[v] for v in stored]
    if rest.any():
        cats_p.append(torch.logsumexp(logp[rest], 0))
        cats_q.append(torch.logsumexp(logq[rest], 0))
    return ref_divergence(objective, torch.stack(cats_p), torch.stack(cats_q), beta=beta, lam=lam)


def ref_uniform_tail_logp(z_teacher: torch.Tensor, stored: list[int], tau: float) -> torch.Tensor:
    """(V,) the dense target of a sampled or hybrid cache for mixing and combining: the stored ids (distinct) at
    their exact p_τ, the rest's exact mass 1 − Σ_stored p_τ spread evenly over the other tokens."""
    p = torch.softmax(z_teacher.to(f64) / tau, 0)
    vocab_size = p.shape[0]
    out = torch.empty(vocab_size, dtype=f64)
    rest = torch.ones(vocab_size, dtype=torch.bool)
    rest[stored] = False
    if rest.any():
        out[rest] = (1.0 - p[stored].sum()) / int(rest.sum())
    out[stored] = p[stored]
    return out.log()


def ref_student_shaped_logp(z_teacher: torch.Tensor, stored: list[int], tau: float,
                            logq_student: torch.Tensor) -> torch.Tensor:
    """(V,) the dense target with tail_mode bucket: the stored ids (distinct) at their exact p_τ, the rest's exact
    mass 1 − Σ_stored p_τ spread over the other tokens in proportion to the student's q (``logq_student`` at τ)."""
    p = torch.softmax(z_teacher.to(f64) / tau, 0)
    q = logq_student.detach().to(f64).exp()
    rest = torch.ones(p.shape[0], dtype=torch.bool)
    rest[stored] = False
    out = torch.zeros_like(p)
    if rest.any():
        out[rest] = (1.0 - p[stored].sum()) * q[rest] / q[rest].sum()
    out[stored] = p[stored]
    return out.log()


def ref_mixed(objective: str, logp_teacher: torch.Tensor, z_student: torch.Tensor, tau: float, alpha: float,
              detach: bool = True) -> torch.Tensor:
    """ChooBaCa: the divergence against softmax(α·log p + (1−α)·z_S/τ) (student part detached if `detach`)."""
    zs = z_student.detach() if detach else z_student
    target = torch.log_softmax(alpha * logp_teacher + (1 - alpha) * zs / tau, 0)
    return ref_divergence(objective, target, torch.log_softmax(z_student / tau, 0))
