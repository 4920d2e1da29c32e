"""Weighted mutual learning (WML, "When Babies Teach Babies", BabyLM 2024): the loss of one step of a cohort.

For trained peers i = 1..N with logits z_i and the cohort's fixed peers f (cached teachers, never trained):

    L = (1−α)·Σ_i ω_i·CE_i  +  α·τ²·Σ_i Σ_{j≠i} ω_j·D(p_j, p_i)

with p = softmax(z/τ), D the per-position divergence averaged over the non-ignored positions, j running over the
other trained peers and the fixed peers, and ω a point on the simplex over all of them. ``forward`` is the
seed code's KL(p_j ‖ p_i) (the peer i learns to cover the others' mass); ``reverse`` is KL(p_i ‖ p_j). The seed code
has no temperature (τ = 1, where the τ² factor is 1); τ² keeps the gradient scale of the KD term independent of τ,
as in the project's distillation loss. ``detach`` stops the gradient through p_j in the term (i, j), so each term
trains only peer i (deep mutual learning); the seed code does not detach (each term trains both peers).

Sums, not means, come out of `peer_divergence_sums`: the trainer divides by the global token count once per
optimizer step, so gradient accumulation and data parallelism give the same update as one big batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

MutualObjective = Literal["forward_kl", "reverse_kl"]
MUTUAL_OBJECTIVES: tuple[str, ...] = ("forward_kl", "reverse_kl")


def peer_divergence_sums(logits: Sequence[Tensor], labels: Tensor, *, objective: MutualObjective,
                         temperature: float, detach: bool, ignore_index: int) -> Tensor:
    """The pairwise divergences between trained peers, summed over the non-ignored positions.

    Args:
        logits: N tensors (B, T, V) of the peers' logits (any float dtype; the arithmetic is float32).
        labels: (B, T) next-token labels; positions equal to `ignore_index` count for nothing.
        objective: forward_kl: entry (i, j) is KL(p_j ‖ p_i); reverse_kl: KL(p_i ‖ p_j).
        temperature: τ > 0; p = softmax(z / τ).
        detach: whether peer j's distribution in entry (i, j) is a constant (no gradient reaches peer j).
        ignore_index: the label of positions that do not count.

    Returns:
        (N, N) float32 sums; the diagonal is 0.
    """
    n = len(logits)
    keep = (labels != ignore_index).reshape(-1)  # (B·T,)
    logp = [torch.log_softmax(z.reshape(-1, z.shape[-1])[keep].float() / temperature, dim=-1) for z in logits]
    rows = []
    for i in range(n):
        row = []
        for j in range(n):
            if i == j:
                row.append(torch.zeros((), dtype=torch.float32, device=logp[i].device))
                continue
            own, other = logp[i], logp[j].detach() if detach else logp[j]
            row.append(kl_sum(other, own) if objective == "forward_kl" else kl_sum(own, other))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def kl_sum(logp: Tensor, logq: Tensor) -> Tensor:
    """Σ_positions KL(p ‖ q) = Σ p·(log p − log q), from log-probabilities (n, V)."""
    return (logp.exp() * (logp - logq)).sum()


def wml_loss(ce_means: Tensor, divergence_means: Tensor, weights: Tensor, *, alpha: float,
             temperature: float) -> Tensor:
    """``(1−α)·Σ_i ω_i·CE_i + α·τ²·Σ_i Σ_{j≠i} ω_j·D_ij``.

    Args:
        ce_means: (N,) each trained peer's mean cross-entropy.
        divergence_means: (N, M) mean divergence of trained peer i from member j, M ≥ N members: the N trained
            peers first, then the fixed peers; entries (i, i) are ignored.
        weights: (M,) ω over all members (trained peers first), non-negative, summing to 1.
        alpha: the mutual-learning share α in [0, 1].
        temperature: τ of the divergences.
    """
    n, m = divergence_means.shape
    off_diagonal = torch.ones(n, m, dtype=torch.bool, device=divergence_means.device)
    off_diagonal[:, :n].fill_diagonal_(False)
    w = weights.to(divergence_means.dtype)
    ce_term = (w[:n].to(ce_means.dtype) * ce_means).sum()
    kd_term = (divergence_means * w[None, :] * off_diagonal).sum()
    if alpha == 0.0:
        return ce_term  # exactly the weighted cross-entropy (a one-peer cohort at α = 0 is a plain run)
    return (1.0 - alpha) * ce_term + alpha * temperature**2 * kd_term


def mutual_sums(logits: Sequence[Tensor], labels: Tensor, fixed_targets: Sequence[object], *,
                objective: MutualObjective, temperature: float, detach: bool, ignore_index: int,
                tail_mode: str = "bucket", divergences: bool = True) -> tuple[Tensor, Tensor]:
    """Per-peer cross-entropy sums and the divergence sums of each trained peer from every other member.

    Args:
        logits: N tensors (B, T, V), the trained peers' logits.
        labels: (B, T) next-token labels.
        fixed_targets: the fixed peers' targets (`cachekd.losses.DenseTarget` / `SparseTarget`, from the cache);
            they carry no gradient.
        objective, temperature, detach, ignore_index: as in `peer_divergence_sums`.
        tail_mode: how a fixed peer's top-k target treats its tail (see `cachekd.losses.KDConfig`).
        divergences: False skips the divergences (zeros come back): at α = 0 they do not enter the loss.

    Returns:
        ce_sums (N,) and divergence sums (N, N + F), both float32 sums over the non-ignored positions.
    """
    from cachekd.losses import KDConfig, distill_loss

    ce_cfg = KDConfig(ignore_index=ignore_index)
    ce = torch.stack([distill_loss(z, labels, [], ce_cfg).ce_sum for z in logits])
    if not divergences:
        return ce, torch.zeros(len(logits), len(logits) + len(fixed_targets), dtype=ce.dtype, device=ce.device)
    div = peer_divergence_sums(logits, labels, objective=objective, temperature=temperature, detach=detach,
                               ignore_index=ignore_index)
    if fixed_targets:
        kd_cfg = KDConfig(objective=objective, temperature=temperature, tail_mode=tail_mode,
                          ignore_index=ignore_index)
        fixed = torch.stack([torch.stack([distill_loss(z, labels, [t], kd_cfg).kd_sum for t in fixed_targets])
                             for z in logits])  # (N, F)
        div = torch.cat([div, fixed.to(div.dtype)], dim=1)
    return ce, div
