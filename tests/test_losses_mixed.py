"""The fused ChooBaCa path (cachekd/losses/mixed.py: reverse or forward KL, τ = 1, one sparse uniform-tail teacher
mixed with the student) against the general (n, V) log-softmax path it replaces and the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import cachekd.losses.mixed as mixed
from cachekd.losses import KDConfig, SparseTarget, chunked_distill_loss, distill_loss
from cachekd.losses.api import _prepare
from tests.reference_losses import make_sparse, ref_distill

B, T, V, H = 2, 7, 29, 8
IGNORED = ((0, 1), (1, 4), (1, 6))


def general_path(monkeypatch):
    """Send mixing through the general (n, V) log-softmax path, as before the fused path existed."""
    monkeypatch.setattr(mixed, "FUSED_MIX_OBJECTIVES", ())


def inputs(seed, k, top=True, dtype=torch.float32, ignore=IGNORED):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    shift = torch.randn(B, T, 1, generator=g, dtype=torch.float64) * 3
    target = make_sparse(teacher, k, 1.0, shift=shift, generator=g, top=top)
    labels = torch.randint(0, V, (B, T), generator=g)
    for b, t in ignore:
        labels[b, t] = -100
    return z, target, labels


def to_target(t, dtype=torch.float32):
    return SparseTarget(ids=t[1], logits=t[2].to(dtype), tail_lse=t[3])


def loss_and_grad(z, labels, target, cfg, alpha, chunk_size=None):
    zc = z.clone().requires_grad_(True)
    parts = distill_loss(zc, labels, [target], cfg, mix_alpha=alpha, chunk_size=chunk_size)
    (0.3 * parts.ce_sum + 0.7 * parts.kd_sum).backward()
    return parts.ce_sum.detach(), parts.kd_sum.detach(), zc.grad


def rel_close(a, b, rtol):
    a, b = a.detach(), b.detach()
    scale = b.abs().max().clamp_min(1e-12)
    assert float((a - b).abs().max() / scale) <= rtol, float((a - b).abs().max() / scale)


def test_the_choobaca_config_takes_the_fused_path_and_keeps_chunk_statistics():
    z, target, labels = inputs(0, 5)
    cfg = KDConfig(objective="reverse_kl", tail_mode="uniform", detach_mix=True)
    for chunk_size, entry in ((None, "rows"), (4, "chunked")):
        prep = _prepare(z, labels, [to_target(target)], cfg, 0.5, chunk_size, source_dim=None)
        assert prep.plan.student == "fused_mix" and prep.plan.entry == entry
        assert prep.plan.chunk_state == (entry == "chunked")
        assert prep.plan.mask_ignored == (entry == "rows")
    # τ ≠ 1, other objectives and several teachers keep the general path
    for other in (KDConfig(objective="jsd", tail_mode="uniform"), KDConfig(temperature=2.0, tail_mode="uniform")):
        assert _prepare(z, labels, [to_target(target)], other, 0.5, None, None).plan.student == "log_softmax"
    two = KDConfig(objective="reverse_kl", tail_mode="uniform", teacher_combine="losses")
    prep = _prepare(z, labels, [to_target(target)] * 2, two, 0.5, None, None)
    assert prep.plan.student == "log_softmax"


@pytest.mark.parametrize("chunk_size", [None, 4])  # 4: 11 valid positions, a leftover chunk of 3
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.7])
@pytest.mark.parametrize("detach_mix", [True, False])
@pytest.mark.parametrize("k", [1, 6, V])
@pytest.mark.parametrize("objective", ["reverse_kl", "forward_kl"])
def test_fused_mix_matches_general_path_and_reference(monkeypatch, objective, k, detach_mix, alpha, chunk_size):
    z, target, labels = inputs(hash((objective, k, detach_mix, alpha)) % 1000, k, top=k != 6)
    if chunk_size is None:  # the masked path: garbage at an ignored position must not leak
        z[0, 1, 3] = float("nan")
    cfg = KDConfig(objective=objective, tail_mode="uniform", detach_mix=detach_mix)
    fast = loss_and_grad(z, labels, to_target(target), cfg, alpha, chunk_size)
    assert all(torch.isfinite(x).all() for x in fast)
    with monkeypatch.context() as m:
        general_path(m)
        before = loss_and_grad(z, labels, to_target(target), cfg, alpha, chunk_size)
    for a, b in zip(fast, before):
        rel_close(a, b, rtol=2e-6)
    z64 = z.double().masked_fill(z.isnan(), 0.0).requires_grad_(True)
    ref = ref_distill(z64, labels, [target], objective=objective, tail_mode="uniform", mix_alpha=alpha,
                      detach_mix=detach_mix)
    (0.3 * ref["ce_sum"] + 0.7 * ref["kd_sum"]).backward()
    rel_close(fast[0].double(), ref["ce_sum"], rtol=1e-6)
    rel_close(fast[1].double(), ref["kd_sum"], rtol=1e-5)
    rel_close(fast[2].double().nan_to_num(), z64.grad, rtol=1e-5)


@pytest.mark.parametrize("objective", ["reverse_kl", "forward_kl"])
def test_fused_mix_in_float64_equals_general_path(monkeypatch, objective):
    z, target, labels = inputs(7, 6, top=False, dtype=torch.float64)
    for detach_mix in (True, False):
        cfg = KDConfig(objective=objective, tail_mode="uniform", detach_mix=detach_mix)
        fast = loss_and_grad(z, labels, to_target(target, torch.float64), cfg, 0.3)
        with monkeypatch.context() as m:
            general_path(m)
            before = loss_and_grad(z, labels, to_target(target, torch.float64), cfg, 0.3)
        for a, b in zip(fast, before):
            rel_close(a, b, rtol=1e-12)


@pytest.mark.parametrize("objective", ["reverse_kl", "forward_kl"])
def test_fused_mix_gradcheck(objective):
    """With the target not detached, the gradient is the true derivative (detached, it is not by design)."""
    z, target, labels = inputs(3, 4, top=False, dtype=torch.float64, ignore=((1, 2),))
    cfg = KDConfig(objective=objective, tail_mode="uniform", detach_mix=False)
    sparse = to_target(target, torch.float64)

    def f(x):
        parts = distill_loss(x, labels, [sparse], cfg, mix_alpha=0.6)
        return parts.ce_sum, parts.kd_sum

    assert torch.autograd.gradcheck(f, (z.clone().requires_grad_(True),))


def test_zero_probability_teacher_values(monkeypatch):
    """-inf teacher values at an id and a tail of zero mass: the clamped target of the general path."""
    z, target, labels = inputs(5, 6, dtype=torch.float64)
    ids, logits, tail = target[1], target[2].clone(), target[3].clone()
    logits[0, 0, 2] = -math.inf
    tail[1, 3] = -math.inf
    sparse = SparseTarget(ids=ids, logits=logits, tail_lse=tail)
    for objective in ("reverse_kl", "forward_kl"):
        for detach_mix in (True, False):
            cfg = KDConfig(objective=objective, tail_mode="uniform", detach_mix=detach_mix)
            fast = loss_and_grad(z, labels, sparse, cfg, 0.5)
            assert all(torch.isfinite(x).all() for x in fast)
            with monkeypatch.context() as m:
                general_path(m)
                before = loss_and_grad(z, labels, sparse, cfg, 0.5)
            for a, b in zip(fast, before):
                rel_close(a, b, rtol=1e-9)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_all_ignored_rows_give_zero_and_a_zero_gradient(chunk_size):
    z, target, labels = inputs(9, 6, ignore=[(b, t) for b in range(B) for t in range(T)])
    z[0, 0, 0] = float("inf")
    cfg = KDConfig(objective="reverse_kl", tail_mode="uniform")
    ce, kd, grad = loss_and_grad(z, labels, to_target(target), cfg, 0.5, chunk_size)
    assert float(ce) == 0.0 and float(kd) == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("detach_mix", [True, False])
def test_step_wise_choobaca_matches_the_general_path(monkeypatch, detach_mix):
    """The full ChooBaCa loss from hidden states (chunked, statistics kept per chunk) against the general path."""
    g = torch.Generator().manual_seed(21)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    bias = torch.randn(V, generator=g)
    _, target, labels = inputs(21, 6)
    cfg = KDConfig(objective="reverse_kl", tail_mode="uniform", detach_mix=detach_mix)

    def run():
        params = [p.clone().requires_grad_(True) for p in (hidden, weight, bias)]
        parts = chunked_distill_loss(*params, labels, [to_target(target)], cfg, mix_alpha=0.7, chunk_size=4)
        (0.5 * parts.ce_sum + 0.5 * parts.kd_sum).backward()
        return [parts.ce_sum.detach(), parts.kd_sum.detach(), *(p.grad for p in params)]

    fast = run()
    with monkeypatch.context() as m:
        general_path(m)
        before = run()
    for a, b in zip(fast, before):
        rel_close(a, b, rtol=2e-6)
    logits = F.linear(hidden, weight, bias)
    unchunked = distill_loss(logits, labels, [to_target(target)], cfg, mix_alpha=0.7)
    rel_close(fast[1], unchunked.kd_sum, rtol=2e-6)
