"""Weighted mutual learning, the ω update and the peer search's pure logic, against independent references."""

from __future__ import annotations

import math

import pytest
import torch

from cachekd.cohort.search import (Rung, Shape, best_distinct, candidate_shapes, llama_num_params, next_rung,
                                   sample_shapes)
from cachekd.cohort.weights import group_losses, initial_weights, mirror_descent_step
from cachekd.cohort.wml import mutual_sums, wml_loss

f64 = torch.float64
IGNORE = -100


def ref_wml(logits, labels, weights, alpha, tau, objective, detach, fixed_logits=()):
    """Float64 WML loss written from the formula, one position at a time with explicit softmaxes:
    (1−α)·Σ_i ω_i·mean CE_i + α·τ²·Σ_i Σ_{j≠i} ω_j·mean D(p_j, p_i)."""
    n = len(logits)
    members = list(logits) + list(fixed_logits)
    B, T, V = logits[0].shape
    positions = [(b, t) for b in range(B) for t in range(T) if labels[b, t] != IGNORE]

    def probs(z):
        e = torch.exp(z / tau - (z / tau).max())
        return e / e.sum()

    ce_total = torch.zeros((), dtype=f64)
    kd_total = torch.zeros((), dtype=f64)
    for i in range(n):
        ce_i = sum(-torch.log(probs(logits[i][b, t] * tau)[labels[b, t]]) for b, t in positions) / len(positions)
        ce_total = ce_total + weights[i] * ce_i
        for j, zj in enumerate(members):
            if j == i:
                continue
            d = torch.zeros((), dtype=f64)
            for b, t in positions:
                p_i = probs(logits[i][b, t])
                p_j = probs(zj[b, t])
                if detach or j >= n:
                    p_j = p_j.detach()
                a, c = (p_j, p_i) if objective == "forward_kl" else (p_i, p_j)
                d = d + (a * (torch.log(a) - torch.log(c))).sum()
            kd_total = kd_total + weights[j] * d / len(positions)
    return (1 - alpha) * ce_total + alpha * tau**2 * kd_total


def _case(n=3, fixed=0, seed=0, B=2, T=5, V=7):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(B, T, V, generator=g, dtype=f64) * 2 for _ in range(n)]
    fixed_logits = [torch.randn(B, T, V, generator=g, dtype=f64) * 2 for _ in range(fixed)]
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, -1] = IGNORE
    labels[0, 1] = IGNORE
    return logits, labels, fixed_logits


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("fixed", [0, 1])
def test_wml_loss_and_gradients_match_float64_reference(detach, objective, fixed):
    from cachekd.losses import DenseTarget

    logits, labels, fixed_logits = _case(fixed=fixed, seed=3 + fixed)
    n = len(logits)
    weights = torch.tensor([0.5, 0.2, 0.2, 0.1][: n + fixed], dtype=f64)
    weights = weights / weights.sum()
    alpha, tau = 0.4, 1.7

    mine = [z.detach().float().requires_grad_(True) for z in logits]
    ce, div = mutual_sums(mine, labels, [DenseTarget(z.float()) for z in fixed_logits], objective=objective,
                          temperature=tau, detach=detach, ignore_index=IGNORE)
    count = int((labels != IGNORE).sum())
    loss = wml_loss(ce / count, div / count, weights.float(), alpha=alpha, temperature=tau)
    loss.backward()

    ref_in = [z.detach().clone().requires_grad_(True) for z in logits]
    ref = ref_wml(ref_in, labels, weights, alpha, tau, objective, detach, fixed_logits)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(mine, ref_in):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-6)


def test_detach_changes_only_the_gradient():
    logits, labels, _ = _case(n=2)
    outs = {}
    for detach in (True, False):
        zs = [z.detach().float().requires_grad_(True) for z in logits]
        ce, div = mutual_sums(zs, labels, [], objective="forward_kl", temperature=1.0, detach=detach,
                              ignore_index=IGNORE)
        # peer 0's divergence from peer 1 alone: with detach it must not reach peer 1
        div[0, 1].backward()
        outs[detach] = (div[0, 1].item(), zs[1].grad)
    assert outs[True][0] == outs[False][0]
    assert outs[True][1] is None or torch.count_nonzero(outs[True][1]) == 0
    assert torch.count_nonzero(outs[False][1]) > 0


def test_wml_loss_at_alpha_zero_is_the_weighted_cross_entropy_exactly():
    ce = torch.tensor([2.5, 3.25])
    div = torch.rand(2, 2)
    w = torch.tensor([0.75, 0.25])
    assert wml_loss(ce, div, w, alpha=0.0, temperature=2.0).item() == 0.75 * 2.5 + 0.25 * 3.25
    one = torch.tensor([3.1234567])
    assert torch.equal(wml_loss(one, torch.zeros(1, 1), torch.ones(1), alpha=0.0, temperature=1.0), one[0])


def test_mirror_descent_step_matches_hand_computation():
    # The seed code's rule: one step per dev batch b with g_ib = CE_ib / B clamped to [0, clip].
    # ω = (0.5, 0.3, 0.2), two batches of realistic dev CE (nats): peer 0 (3.2, 3.6) is the best, peer 1 (4.1, 4.5),
    # peer 2 (5.0, 4.8). η = 0.25, B = 2: g = CE / 2 (1.6 … 2.5 > clip 1 → clamped to 1) with clip 1; no clamp with 0.
    losses = [[3.2, 3.6], [4.1, 4.5], [5.0, 4.8]]
    eta = 0.25
    w = [0.5, 0.3, 0.2]
    for b in range(2):  # by hand, unclamped
        u = [w[i] * math.exp(-eta * losses[i][b] / 2) for i in range(3)]
        w = [x / sum(u) for x in u]
    got = mirror_descent_step([0.5, 0.3, 0.2], losses, eta=eta, clip=0.0)
    assert got == pytest.approx(w, rel=1e-12)
    # one pass moves ω by exp(−η·mean_b CE_ib): the closed form
    u = [0.5 * math.exp(-eta * 3.4), 0.3 * math.exp(-eta * 4.3), 0.2 * math.exp(-eta * 4.9)]
    assert got == pytest.approx([x / sum(u) for x in u], rel=1e-12)
    # ω moves, and the best peer gains weight while the worst loses it
    assert got[0] > 0.5 + 0.02 and got[2] < 0.2 - 0.01
    assert sum(got) == pytest.approx(1.0, rel=1e-12)
    # with the seed's clip 1 and only two batches every g is clamped to 1: equal steps, ω unchanged
    assert mirror_descent_step([0.5, 0.3, 0.2], losses, eta=eta, clip=1.0) == pytest.approx([0.5, 0.3, 0.2])
    # the seed's 60 batches: g = CE/60 < 1, the clamp does not bite, and ω moves as the closed form says
    sixty = [[3.4] * 60, [4.3] * 60, [4.9] * 60]
    assert mirror_descent_step([0.5, 0.3, 0.2], sixty, eta=eta, clip=1.0) == pytest.approx(
        [x / sum(u) for x in u], rel=1e-12)
    # negative losses cannot push ω the wrong way (g clamped at 0)
    assert mirror_descent_step([0.5, 0.5], [[-1.0], [0.0]], eta=1.0) == pytest.approx([0.5, 0.5])


def test_mirror_descent_keeps_fixed_peer_weights():
    # two trained peers with ω 0.3 / 0.3 and a fixed peer at 0.4: the trained pair keeps its mass 0.6
    w = mirror_descent_step([0.3, 0.3, 0.4], [[3.0, 4.0], [4.0, 6.0]], eta=1.0, clip=0.0)
    a, b = 0.3 * math.exp(-3.5), 0.3 * math.exp(-5.0)
    assert w == pytest.approx([0.6 * a / (a + b), 0.6 * b / (a + b), 0.4], rel=1e-12)
    with pytest.raises(ValueError, match="eta"):
        mirror_descent_step([0.5, 0.5], [[1.0], [1.0]], eta=0.0)
    with pytest.raises(ValueError, match="same"):
        mirror_descent_step([0.5, 0.5], [[1.0], [1.0, 2.0]], eta=1.0)


def test_initial_weights():
    assert initial_weights(3) == pytest.approx([1 / 3] * 3)
    assert initial_weights(2, fixed=[0.2]) == pytest.approx([0.4, 0.4, 0.2])
    assert initial_weights(2, given=[1, 3]) == [0.25, 0.75]


def test_llama_num_params_matches_the_built_model():
    from cachekd.models import ModelConfig, build_model, count_parameters

    s = Shape(num_layers=2, num_heads=4, hidden_size=48)
    m = build_model(ModelConfig(hidden_size=48, num_layers=2, num_heads=4, intermediate_size=s.intermediate_size),
                    vocab_size=300, max_positions=16)
    assert llama_num_params(s, 300) == count_parameters(m)


def test_candidate_shapes_respect_the_parameter_range_and_heads():
    space = candidate_shapes(layers=(1, 4), heads=(2, 4, 8), hidden_sizes=(32, 64, 96), vocab_size=300,
                             min_params=40_000, max_params=150_000)
    assert space and all(40_000 <= llama_num_params(s, 300) <= 150_000 for s in space)
    assert all(s.hidden_size % s.num_heads == 0 for s in space)
    assert len(set(space)) == len(space)


def test_sampling_is_seeded_and_distinct():
    space = [Shape(l, h, d) for l in (1, 2, 3) for h in (2, 4) for d in (32, 64)]
    a, b = sample_shapes(space, 5, seed=7), sample_shapes(space, 5, seed=7)
    assert a == b and len(set(a)) == 5
    assert sample_shapes(space, 50, seed=1) and len(sample_shapes(space, 50, seed=1)) == len(space)


def test_successive_halving_rungs_and_final_choice():
    shapes = tuple(Shape(1, 2, 32 * k) for k in range(1, 9))
    losses = {s: 5.0 - 0.1 * i for i, s in enumerate(shapes)}  # the larger the better
    r0 = Rung(0, 100, shapes)
    r1 = next_rung(r0, losses, keep=3)
    assert r1.steps == 200 and set(r1.shapes) == set(shapes[4:])
    r2 = next_rung(r1, losses, keep=3)
    assert r2.steps == 400 and set(r2.shapes) == set(shapes[5:])  # half of 4 is 2 < keep: keep 3
    assert next_rung(r2, losses, keep=3) is None
    assert best_distinct(losses, 2) == [shapes[7], shapes[6]]


def test_window_losses_grouped_into_the_seeds_validation_batches():
    # 7 windows into 3 groups as equal as can be (2, 3, 2 by rounding of the bounds), each its mean
    w = [3.0, 5.0, 4.0, 4.0, 4.0, 6.0, 2.0]
    assert group_losses(w, 3) == pytest.approx([4.0, 4.0, 4.0])
    assert group_losses(w, 60) == pytest.approx(w)  # fewer windows than batches: one a window
    assert group_losses(w, 1) == pytest.approx([sum(w) / 7])
    # with the seed's 60 batches of realistic CE the clamp never bites and ω moves by exp(−η·mean CE)
    a, b = [4.0 + 0.01 * (i % 7) for i in range(120)], [4.6 + 0.01 * (i % 5) for i in range(120)]
    w2 = mirror_descent_step([0.5, 0.5], [group_losses(a, 60), group_losses(b, 60)], eta=0.25, clip=1.0)
    ua, ub = 0.5 * math.exp(-0.25 * sum(a) / 120), 0.5 * math.exp(-0.25 * sum(b) / 120)
    assert w2 == pytest.approx([ua / (ua + ub), ub / (ua + ub)], rel=1e-9)
    assert w2[0] > 0.53
