"""Sampled and hybrid teacher targets (RS-KD): an unbiased forward-KL estimator over the drawn ids, and the
other objectives over the stored ids with the rest of the vocabulary as one bucket of exact mass.

What a sampled cache gives for a position (``cachekd.teacher_samples``): the τ=1 log-probabilities ℓ_v of the
stored ids S (an exact top-K, K ≥ 0, and the distinct drawn ids), counts c_v of N draws from a proposal r, the
log-sum-exp ``tail_lse[τ] = log Σ_{v ∉ top-K} exp(ℓ_v/τ)`` (the whole vocabulary's normaliser N_τ when K = 0) and
the teacher's exact entropy H_τ. At the loss temperature τ:

* ``N_τ = logaddexp(logsumexp_{top-K} ℓ/τ, tail_lse[τ])`` and ``log p_τ(v) = ℓ_v/τ − N_τ``: exact (up to the
  stored rounding, 2⁻¹⁰ nat) for every stored id.
* The draws come from ``r_tail(v) = exp(ℓ_v/τ_r − tail_lse[τ_r])`` over the tokens beyond the top-K (all tokens
  when K = 0; τ_r the proposal temperature). The weights ``w_v = (c_v/N) · p_τ(v) / r_tail(v)
  = (c_v/N) · exp(ℓ_v (1/τ − 1/τ_r) − N_τ + tail_lse[τ_r])`` make ``Σ_drawn w_v f(v)`` an unbiased estimate of
  ``Σ_{v ∉ top-K} p_τ(v) f(v)`` (E[c_v/N] = r_tail(v)). With τ_r = τ they are ``(c_v/N) · m_τ`` (m_τ the mass beyond
  the top-K; 1 without one). The top-K ids get their exact ``w_v = p_τ(v)``.
* Forward KL: ``KL(p‖q) = −H_τ − Σ_v p_τ(v) log q_v`` is estimated by ``−H_τ − Σ_{v∈S} w_v log q_v`` (H_τ exact, so
  the estimate is a divergence: 0 in expectation at q = p, never the cross-entropy). Its gradient with respect to
  the student's logits over τ, ``(Σ w) q − w``, is unbiased for ``q − p``.
* Every other objective (reverse KL, JSD, the skews, TV) is computed exactly on the coarse-grained distributions:
  the stored ids, and the rest of the vocabulary as one bucket. The teacher's bucket mass
  ``1 − Σ_{v∈S} p_τ(v) = m_τ − Σ_drawn p_τ(v)`` is formed as ``m_τ · (1 − Σ_drawn p_τ/m_τ)`` with ``log1p`` (no
  ``1 − Σ`` over the top-K), the student's is summed directly over the tokens outside S (``SparseStudent``). This
  is the top-k cache's ``bucket`` tail with the stored ids as the "top". Its absolute error is that of the stored
  log-probabilities (each drawn p within 2⁻¹⁰ relative, so the rest mass within ~1e-3 absolute): a small
  rest carries a larger relative error, which the bucket term weighs by that small mass.
* The rest is bounded by what the rounding allows. The drawn share of the mass beyond the top-K,
  ``f = Σ_drawn exp(ℓ_v/τ − tail_lse[τ])``, is known only within a factor ``e^{±ε}``, ``ε = δ/τ + δ`` for stored
  values rounded by at most δ (ℓ and tail_lse each). Where ``1 − f̂`` is not resolved (smaller than half the
  largest rest the rounding allows, ``½(1 − f̂·e^{−ε})``) the rest takes that half: a positive mass inside the
  rounding interval. (Fixed-point values rounded up made ``f̂`` exceed 1 on ~9% of positions of a pure sampled
  cache, and the rest −inf made reverse KL infinite.) Only a row whose stored ids cover the whole vocabulary has
  no rest (−inf); stored values beyond their rounding (a damaged cache; `verify` reports them) keep the smallest
  positive rest, so every objective stays finite.

Pads (positions with fewer distinct ids than the array width) repeat a real id with ``logp = −inf`` and weight 0;
they count for nothing in any objective.

Mixing with the student (ChooBaCa) and combining teachers by logits or probabilities need a dense target:
``uniform_tail_form`` turns the sampled target into the top-k-with-``uniform``-tail form of a ``SparseTarget`` — the
stored ids at their exact ``log p_τ``, the exact rest mass ``1 − Σ_S p_τ(v)`` spread evenly over the other
``V − |S|`` tokens. The mass of every stored id and of the rest is exact; the shape of the rest (uniform) is the
approximation. Pads become distinct unused ids at the uniform value (``SparseTarget`` ids must be distinct), so
the dense reconstruction is the same as with the distinct stored ids alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cachekd.losses.divergences import bucket_divergence
from cachekd.losses.plan import FlatSampled, Rows, take
from cachekd.losses.sparse import student_shaped_logp

if TYPE_CHECKING:
    from cachekd.losses.types import KDConfig
    from cachekd.losses.student import Student


@dataclass
class SampledTarget:
    """A sampled or hybrid teacher target at the loss temperature (build it with ``sampled_target``)."""

    ids: Tensor
    """(B, T, S) integer ids: the exact top-K, then the drawn ids; pads repeat a real id."""
    logp: Tensor
    """(B, T, S) the teacher's log-probability at τ of each id (normalised over the whole vocabulary); −inf at pads."""
    weights: Tensor
    """(B, T, S) forward-KL estimator weights: p_τ(v) for the top-K, the importance weights for the drawn ids,
    0 at pads."""
    log_rest: Tensor
    """(B, T) log of the teacher's mass at τ outside the stored ids (−inf when none is left)."""
    entropy: Tensor
    """(B, T) the teacher's exact entropy at τ."""


def sampled_target(
    sample_ids: Tensor, sample_logprobs: Tensor, counts: Tensor, tail_lse: Tensor, entropy: Tensor,
    temperature: float, proposal_temperature: float, tail_lse_proposal: Tensor,
    exact_ids: Tensor | None = None, exact_logprobs: Tensor | None = None, stored: Tensor | None = None,
    rounding: float = 0.0, vocab_size: int | None = None,
) -> SampledTarget:
    """The target at ``temperature`` τ from what a sampled cache stores (all (B, T, ...) tensors, τ=1 values):

    ``sample_ids``, ``sample_logprobs`` (B, T, W) the distinct drawn ids and their ℓ; ``counts`` (B, T, W) their
    counts in the N draws of the proposal at ``proposal_temperature`` (0 at pads); ``tail_lse`` (B, T) at τ and
    ``tail_lse_proposal`` (B, T) at τ_r, over the tokens beyond the exact top-K; ``entropy`` (B, T) H_τ;
    ``exact_ids``, ``exact_logprobs`` (B, T, K) the hybrid's exact top-K (None without one); ``stored`` (B, T, W)
    which drawn ids are real (drawn by any proposal; default ``counts > 0``): an id drawn only by another
    proposal gets weight 0 but still counts as stored for the bucket objectives, whose categories must be the
    ids the student side sees; ``rounding`` the largest rounding error δ (nats) of the stored ℓ and tail_lse (0
    for unrounded values), which bounds the rest's mass; ``vocab_size`` V, to know the rows whose stored ids
    leave no rest. See the module docstring for the formulas; computed in float32 (float64 stays float64)."""
    dtype = torch.float64 if sample_logprobs.dtype == torch.float64 else torch.float32
    tau, tau_r = float(temperature), float(proposal_temperature)
    ell = sample_logprobs.to(dtype)
    tail = tail_lse.to(dtype)
    real = counts > 0 if stored is None else stored
    if exact_ids is not None and exact_ids.shape[-1] > 0:
        s_exact = exact_logprobs.to(dtype) / tau
        lse = torch.logaddexp(torch.logsumexp(s_exact, dim=-1), tail)  # N_τ
    else:
        s_exact, lse = None, tail
    logp_drawn = torch.where(real, ell / tau - lse.unsqueeze(-1), -math.inf)
    c = counts.to(dtype)
    share = c / c.sum(-1, keepdim=True).clamp_min(1.0)  # c_v / N
    log_ratio = ell * (1.0 / tau - 1.0 / tau_r) - lse.unsqueeze(-1) + tail_lse_proposal.to(dtype).unsqueeze(-1)
    w_drawn = torch.where(counts > 0, share * torch.exp(torch.where(real, log_ratio, 0.0)), 0.0)
    # The rest: the mass beyond the top-K (log m = tail − N_τ) less the drawn ids' mass, without 1 − Σ_top-K.
    log_m = tail - lse
    num_stored = real.sum(-1) + (0 if s_exact is None else s_exact.shape[-1])
    log_frac = torch.logsumexp(torch.where(real, ell / tau, -math.inf), dim=-1) - tail  # drawn share of m
    log_rest = rest_log_mass(log_m, log_frac, share_rounding(rounding, tau),
                             None if vocab_size is None else num_stored >= vocab_size)
    if s_exact is None:
        ids, logp, weights = sample_ids, logp_drawn, w_drawn
    else:
        logp_exact = s_exact - lse.unsqueeze(-1)
        ids = torch.cat([exact_ids.to(sample_ids.dtype), sample_ids], dim=-1)
        logp = torch.cat([logp_exact, logp_drawn], dim=-1)
        weights = torch.cat([logp_exact.exp(), w_drawn], dim=-1)
    return SampledTarget(ids=ids, logp=logp, weights=weights, log_rest=log_rest, entropy=entropy.to(dtype))


def share_rounding(rounding: float, temperature: float) -> float:
    """ε: the drawn ids' share of the mass beyond the top-K, ``Σ exp(ℓ_v/τ − tail_lse[τ])``, from values each
    rounded by at most `rounding` δ, is within a factor ``e^{±ε}`` of the true share, ``ε = δ/τ + δ``."""
    return rounding * (1.0 / temperature + 1.0)


def rest_log_mass(log_m: Tensor, log_frac: Tensor, eps: float, no_rest: Tensor | None = None) -> Tensor:
    """(n,) log of the teacher's mass outside the stored ids: ``log m + log(1 − f)`` with ``f = exp(log_frac)`` the
    drawn ids' share of the mass m beyond the top-K, known within ``e^{±eps}``. Where ``1 − f̂`` is not resolved the
    rest takes half the largest value the rounding allows, ``½(1 − f̂·e^{−eps})`` (module docstring); values beyond
    the rounding keep the smallest positive rest; −inf where ``no_rest`` (the stored ids cover the vocabulary) or
    m = 0 (no mass beyond the top-K)."""
    eps = max(float(eps), 1e-6)  # float32 arithmetic on unrounded values
    frac = torch.exp(log_frac)
    resolved = -torch.expm1(log_frac)  # 1 − f̂
    allowed = 0.5 * -torch.expm1(log_frac - eps)  # ½(1 − f̂·e^{−ε})
    share = torch.maximum(resolved, allowed).clamp_min(torch.finfo(frac.dtype).tiny)
    log_rest = torch.where(torch.isfinite(log_m), log_m + torch.log(share), -math.inf)
    if no_rest is not None:
        log_rest = log_rest.masked_fill(no_rest, -math.inf)
    return log_rest


def uniform_tail_form(target: SampledTarget, vocab_size: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, logits, tail_lse) of the top-k target with a uniform tail equal to ``target`` at τ = ``temperature``:
    ids (B, T, W) distinct in each row, logits (B, T, W) with ``logits/τ = log p_τ``, tail_lse (B, T) the log of the
    teacher's mass at τ outside those ids (the ``SparseTarget`` convention with the normaliser 0; −inf when W = V).

    The distinct stored ids keep their log-probabilities; a pad (an id repeated in its row; the entry with a finite
    ``logp`` is the one kept) becomes an id that is not stored in its row, with the uniform value
    ``log u = log_rest − log(V − |S|)``; the tail is the rest less the pads' share, so the uniform-tail
    reconstruction (``u`` on every token outside S) is the same as from the stored ids alone. W is the target's
    width, or V when that is wider (only pads are dropped: a row has at most V distinct ids)."""
    ids, logp, log_rest = target.ids, target.logp, target.log_rest
    *lead, width = ids.shape
    ids = ids.reshape(-1, width).to(torch.int64)  # (n, W)
    logp = logp.reshape(-1, width)
    log_rest = log_rest.reshape(-1).to(logp.dtype)
    # Duplicates: sort each row by (id, pad last) and mark an entry equal to its predecessor (a stored pad must not
    # count twice; the kept entry of a repeated id is a finite one where there is one).
    key = ids * 2 + (~torch.isfinite(logp)).to(torch.int64)
    order = torch.sort(key, dim=1, stable=True).indices
    sorted_ids = ids.gather(1, order)
    dup_sorted = torch.zeros_like(sorted_ids, dtype=torch.bool)
    dup_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    pad = torch.empty_like(dup_sorted).scatter_(1, order, dup_sorted)  # (n, W) in the original column order
    if width > vocab_size:  # wider than the vocabulary: the stored ids first (in order), at most V columns kept
        keep = torch.sort(pad.to(torch.int8), dim=1, stable=True).indices[:, :vocab_size]
        ids, logp, pad, width = ids.gather(1, keep), logp.gather(1, keep), pad.gather(1, keep), vocab_size
    num_stored = (~pad).sum(1)  # (n,) |S|
    # The rest spread evenly over the V − |S| other tokens (none when every token is stored).
    num_other = (vocab_size - num_stored).to(logp.dtype)
    log_u = torch.where(num_other > 0, log_rest - torch.log(num_other.clamp_min(1.0)), -math.inf)  # (n,)
    # Fillers: the first unused ids among 0..C−1 (C = min(V, 2W) holds ≥ W − |S| unused ones since W ≤ V).
    num_cand = min(vocab_size, 2 * width)
    slot = torch.where(pad | (ids >= num_cand), num_cand, ids)  # (n, W): a stored id below C, else the spare column
    used = torch.zeros(ids.shape[0], num_cand + 1, dtype=torch.bool, device=ids.device)
    used = used.scatter_(1, slot, True)[:, :num_cand]  # (n, C)
    unused_first = torch.sort(used.to(torch.int8), dim=1, stable=True).indices  # (n, C): unused ids first
    rank = (pad.cumsum(1) - 1).clamp_min(0)  # (n, W) which filler a pad takes
    fillers = unused_first.gather(1, rank.clamp_max(num_cand - 1))
    out_ids = torch.where(pad, fillers, ids)
    out_logp = torch.where(pad, log_u.unsqueeze(1).expand_as(logp), logp)
    # tail = rest − (#pads)·u = u·(V − W), formed without the subtraction.
    tail_lse = log_u + math.log(vocab_size - width) if width < vocab_size else torch.full_like(log_u, -math.inf)
    tau = float(temperature)
    return (out_ids.reshape(*lead, width), (tau * out_logp).reshape(*lead, width), tail_lse.reshape(lead))


@dataclass
class SampledRows:
    """A sampled target on n rows (see ``SampledTarget``)."""

    ids: Tensor  # (n, S) int64
    logp: Tensor  # (n, S)
    weights: Tensor  # (n, S)
    log_rest: Tensor  # (n,)
    entropy: Tensor  # (n,)

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def student_shaped_logp(self, logq: Tensor) -> Tensor:
        """(n, V) the dense target with the rest shaped like the student (``sparse.student_shaped_logp``)."""
        return student_shaped_logp(self.ids, self.logp, self.log_rest, logq)


def needs_student_rest(cfg: KDConfig) -> bool:
    """Whether the objective needs the student's mass outside the stored ids (all but the forward-KL estimator)."""
    return cfg.objective != "forward_kl"


def sampled_rows(t: FlatSampled, rows: Rows, dtype: torch.dtype, device: torch.device,
                 ignored: Tensor | None) -> SampledRows:
    """The target ``t`` on ``rows``; ``ignored`` rows (an index into ``rows``, or None) get a harmless finite
    target (id 0 everywhere, zero weights)."""
    ids = take(t.ids, rows).to(device=device, dtype=torch.int64)
    logp = take(t.logp, rows).to(device=device, dtype=dtype)
    weights = take(t.weights, rows).to(device=device, dtype=dtype)
    log_rest = take(t.log_rest, rows).to(device=device, dtype=dtype)
    entropy = take(t.entropy, rows).to(device=device, dtype=dtype)
    if ignored is not None:
        ids = ids.index_fill(0, ignored, 0)
        logp = logp.index_fill(0, ignored, 0.0)
        weights = weights.index_fill(0, ignored, 0.0)
        log_rest = log_rest.index_fill(0, ignored, 0.0)
        entropy = entropy.index_fill(0, ignored, 0.0)
    return SampledRows(ids=ids, logp=logp, weights=weights, log_rest=log_rest, entropy=entropy)


def sampled_divergence(student: Student, target: SampledRows, logq_ids: Tensor, log_rest_q: Tensor | None,
                       cfg: KDConfig) -> Tensor:
    """(n,) the divergence against a sampled target: the unbiased estimate for forward KL, the bucket form for
    every other objective. ``logq_ids`` (n, S) the student's log q at τ at the ids; ``log_rest_q`` (n,) the log of
    its mass outside them (computed here from the (n, V) log-softmax when None and needed)."""
    if cfg.objective == "forward_kl":
        return -target.entropy - (target.weights * logq_ids).sum(-1)
    if log_rest_q is None:
        log_rest_q = torch.logsumexp(student.logq.scatter(1, target.ids, -math.inf), dim=-1)
    return bucket_divergence(target.logp, target.log_rest, logq_ids, log_rest_q, cfg)
