"""What a sampled (or hybrid) logit cache stores for each position: N ids drawn from the teacher, with their
counts and τ=1 log-probabilities, the normaliser of the undrawn-from part and the teacher's exact entropy.

Notation (per position): ℓ_v = log p₁(v), the teacher's τ=1 log-probability; at temperature τ the teacher is
p_τ(v) = exp(ℓ_v/τ − N_τ) with N_τ = log Σ_v exp(ℓ_v/τ) over the WHOLE vocabulary. A hybrid cache keeps the exact
top-K (as a top-k cache does) and stores ``tail_lse[τ] = log Σ_{v ∉ top-K} exp(ℓ_v/τ)``; with K = 0 the "tail" is
the whole vocabulary, so ``tail_lse[τ] = N_τ``. Either way ``N_τ = logaddexp(logsumexp_{top-K} ℓ/τ, tail_lse[τ])``.

Draws: for each proposal (one per cached τ with τ_r = τ by default, or one at ``proposal_temperature``) N ids are
drawn with replacement from r(v) ∝ exp(ℓ_v/τ_r) over the tokens beyond the top-K (all tokens when K = 0), by the
inverse CDF of uniforms that depend only on (seed, proposal, global window, position, draw): one numpy generator per
(seed, proposal, window) yields the window's (L, N) uniforms in a fixed order. The drawn ids are merged into the
sorted distinct ids of the position with a count per proposal, padded to the array width with count 0.

The estimator weights that these make possible are in ``cachekd.losses.sampled``; the entropy stored here is
``H_τ = N_τ − Σ_v p_τ(v) ℓ_v/τ``, exact up to float32 rounding.
"""

from __future__ import annotations

import numpy as np
import torch

from cachekd.rows import row_blocks
from cachekd.teacher_rows import ENTROPY_STRIDE, teacher_targets


def draw_uniforms(seed: int, proposal: int, window_ids: np.ndarray, seq_len: int, num_draws: int) -> np.ndarray:
    """(b·L, N) float64 uniforms in [0, 1) for the windows `window_ids` (global indices in their split): a pure
    function of (seed, proposal, window), so any chunk, batch or part of a run draws the same numbers."""
    out = np.empty((len(window_ids), seq_len, num_draws))
    for i, w in enumerate(window_ids):
        out[i] = np.random.default_rng([int(seed), int(proposal), int(w)]).random((seq_len, num_draws))
    return out.reshape(-1, num_draws)


def inverse_cdf(log_weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(r, N) int64 draws from the rows of unnormalised ``log_weights`` (r, V) (−inf: never drawn) for uniforms
    ``u`` (r, N) in [0, 1): the first id whose cumulative weight exceeds u·total (float64 cumulative sums)."""
    w = torch.exp(log_weights.double() - log_weights.amax(-1, keepdim=True).double())
    cdf = torch.cumsum(w, dim=-1)
    x = u.to(cdf) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, x.contiguous(), right=True)
    return idx.clamp_(max=log_weights.shape[-1] - 1)


UNDERFLOW_TAIL = 1e-20
"""Rows whose weights beyond the top-K sum to less than this (relative to the position's largest exp(z/τ) term) are
drawn from their own log-weights instead (`inverse_cdf`): there the float32 exponentials taken relative to the whole
row's maximum have lost the tail's shape."""


def _draw(weights: torch.Tensor, d: torch.Tensor, tau_r: float, top: torch.Tensor | None,
          u: torch.Tensor) -> torch.Tensor:
    """(r, N) draws for uniforms `u` from the non-negative `weights` (r, V) (exp(d/τ_r) beyond the top-K): the first
    id whose float64 cumulative weight exceeds u·total; rows whose weights underflow go through `inverse_cdf` on the
    log-weights `d/τ_r` (top-K masked), which normalises by the rows' own maximum."""
    cdf = torch.cumsum(weights.double(), dim=-1)
    total = cdf[:, -1:]
    idx = torch.searchsorted(cdf, (u.to(cdf) * total).contiguous(), right=True).clamp_(max=weights.shape[-1] - 1)
    low = (total.squeeze(1) < UNDERFLOW_TAIL).nonzero().squeeze(1)
    if low.numel():
        logw = d.index_select(0, low) / tau_r
        if top is not None:
            logw = logw.scatter(1, top.index_select(0, low), float("-inf"))
        idx[low] = inverse_cdf(logw, u.index_select(0, low))
    return idx


def merge_draws(draws: torch.Tensor, num_proposals: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws (r, n_r, N) → (ids (r, width) sorted distinct with pads repeating the last id, counts
    (r, width, n_r) with 0 at the pads)."""
    r, nr, n = draws.shape
    flat = draws.reshape(r, nr * n)
    tags = torch.arange(nr, device=draws.device).repeat_interleave(n).expand(r, -1)
    ids_sorted, order = flat.sort(dim=-1, stable=True)
    tags = tags.gather(1, order)
    new = torch.ones_like(ids_sorted, dtype=torch.bool)
    new[:, 1:] = ids_sorted[:, 1:] != ids_sorted[:, :-1]
    slot = new.long().cumsum(-1) - 1  # (r, nr·n): the distinct id each draw belongs to
    counts = torch.zeros(r, width * nr, dtype=torch.int64, device=draws.device)
    counts.scatter_add_(1, slot * nr + tags, torch.ones_like(slot))
    ids = ids_sorted[:, -1:].expand(r, width).clone()  # pads repeat the row's last (largest) id
    ids.scatter_(1, slot, ids_sorted)
    return ids, counts.view(r, width, nr)


@torch.no_grad()
def sampled_teacher_targets(logits: torch.Tensor, vocab_size: int, k: int, temperatures: list[float],
                            num_draws: int, proposal_temperature: float | None, seed: int, window_ids: np.ndarray
                            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What a sampled cache stores for teacher logits (b, L, V_model) of the windows `window_ids` (b,).

    Returns (arrays, stats): `ids`, `logprobs` (b, L, k) the exact top-k (k > 0 only), `tail_lse` (b, L, n_τ)
    over the tokens beyond the top-k (N_τ when k = 0), `sample_ids` (b, L, W) int64, `sample_logprobs` (b, L, W)
    τ=1 log-probabilities of the drawn ids (0 at pads), `sample_counts` (b, L, W, n_r) and `entropy` (b, L, n_τ)
    H_τ; stats as `teacher_targets` (with k = 0: `lse`, `entropy`)."""
    z = logits[..., :vocab_size]
    b, L = z.shape[:2]
    flat = z.reshape(b * L, vocab_size)
    n, dev = flat.shape[0], flat.device
    proposals = list(temperatures) if proposal_temperature is None else [proposal_temperature]
    nr = len(proposals)
    width = num_draws * nr
    if k:
        arrays, stats = teacher_targets(logits, vocab_size, k, temperatures)
        top = arrays["ids"].reshape(n, k).to(dev)
    else:
        arrays, stats, top = {}, {}, None
    tails = torch.empty(n, len(temperatures), device=dev)
    entropy = torch.empty(n, len(temperatures), device=dev)
    lse = torch.empty(n, device=dev)
    entropy1 = torch.empty(n, device=dev)  # the τ=1 entropy statistic of the manifest
    draws = torch.empty(n, nr, num_draws, dtype=torch.int64, device=dev)
    sample_ids = torch.empty(n, width, dtype=torch.int64, device=dev)
    sample_counts = torch.empty(n, width, nr, dtype=torch.int64, device=dev)
    ell_drawn = torch.empty(n, width, device=dev)
    uniforms = [torch.from_numpy(draw_uniforms(seed, c, window_ids, L, num_draws)).to(dev) for c in range(nr)]
    for rows in row_blocks(flat):
        zb = flat[rows].float()
        top_b = None if top is None else top[rows]
        # One exponential of d = z − max per temperature (a square root of the τ=1 one at τ=2) serves the
        # normaliser, the entropy, the tail sum and the proposal's CDF. With c = log Σ exp(d) (so ℓ = d − c):
        # N_τ = log Z_τ − c/τ, H_τ = log Z_τ − Σ e_τ d / (τ Z_τ), tail_lse[τ] = log Σ_beyond e_τ − c/τ.
        m = zb.amax(dim=-1, keepdim=True)
        d = zb - m
        d_finite = d.clamp_min(-1e30)  # (−inf logits, e.g. masked tokens, have e = 0: their e·d is then 0)
        e1 = d.exp()
        z1 = e1.sum(-1)
        c = z1.log()  # (r,)
        lse[rows] = m.squeeze(1) + c
        beyond_e: dict[float, torch.Tensor] = {}
        h: dict[float, torch.Tensor] = {}
        for t, tau in enumerate(temperatures):
            e = e1 if tau == 1.0 else e1.sqrt() if tau == 2.0 else (d / tau).exp()
            z = e.sum(-1)
            log_z = z.log()
            h[tau] = entropy[rows, t] = log_z - torch.linalg.vecdot(e, d_finite) / (tau * z)
            beyond = e if top_b is None else e.scatter(1, top_b, 0.0)
            beyond_e[tau] = beyond
            tails[rows, t] = (log_z if top_b is None else beyond.sum(-1).log()) - c / tau
        entropy1[rows] = h[1.0] if 1.0 in h else c - torch.linalg.vecdot(e1, d_finite) / z1
        for p_idx, tau_r in enumerate(proposals):
            w = beyond_e.get(tau_r)
            if w is None:  # a proposal temperature equal to a cached one only up to rounding (math.isclose)
                e = (d / tau_r).exp()
                w = e if top_b is None else e.scatter(1, top_b, 0.0)
            draws[rows, p_idx] = _draw(w, d, tau_r, top_b, uniforms[p_idx][rows])
        ids_b, counts_b = merge_draws(draws[rows], nr, width)
        ell_drawn[rows] = d.gather(1, ids_b) - c.unsqueeze(1)
        sample_ids[rows], sample_counts[rows] = ids_b, counts_b
    real = sample_counts.sum(-1) > 0
    arrays.update({
        "tail_lse": tails.view(b, L, -1),
        "sample_ids": sample_ids.view(b, L, width),
        "sample_logprobs": torch.where(real, ell_drawn, 0.0).view(b, L, width),
        "sample_counts": sample_counts.view(b, L, width, nr),
        "entropy": entropy.view(b, L, -1),
    })
    if not k:  # (a hybrid has teacher_targets' statistics)
        stats = {"lse": lse.view(b, L), "entropy": entropy1.view(b, L)[:, ::ENTROPY_STRIDE].contiguous()}
    stats["distinct_ids"] = real.sum(-1).float().view(b, L)
    return arrays, stats


def target_at(arrays: dict[str, torch.Tensor], temperatures: list[float], temperature: float,
              proposal_temperature: float | None, *, vocab_size: int, rounding: float = 0.0):
    """The ``SampledTarget`` at `temperature` (one of `temperatures`) from a sampled cache's decoded arrays
    (torch tensors keyed as ``TeacherBlock``'s fields, (B, T, ...)): picks the τ's normaliser and entropy, the
    counts of the proposal that serves it and the proposal's normaliser. `rounding` is the stored values' largest
    rounding error (`LogitCache.rounding`; 0 for a teacher's fresh values), `vocab_size` V (both bound the rest's
    mass: ``cachekd.losses.sampled.rest_log_mass``). Used by training, evaluation and audit."""
    from cachekd.losses.sampled import sampled_target

    ti = _index(temperatures, temperature)
    if proposal_temperature is None:
        ci, tau_r = ti, temperature
    else:
        ci, tau_r = 0, proposal_temperature
    ri = _index(temperatures, tau_r)
    tail = arrays["tail_lse"]
    return sampled_target(
        arrays["sample_ids"].long(), arrays["sample_logprobs"], arrays["sample_counts"][..., ci], tail[..., ti],
        arrays["entropy"][..., ti], temperature, tau_r, tail[..., ri],
        exact_ids=None if arrays.get("ids") is None else arrays["ids"].long(),
        exact_logprobs=arrays.get("logprobs"), stored=arrays["sample_counts"].sum(-1) > 0, rounding=rounding,
        vocab_size=vocab_size,
    )


def _index(temperatures: list[float], tau: float) -> int:
    import math

    for i, t in enumerate(temperatures):
        if math.isclose(t, tau, rel_tol=1e-9, abs_tol=1e-12):
            return i
    raise ValueError(f"temperature {tau:g} is not one of {temperatures}")
