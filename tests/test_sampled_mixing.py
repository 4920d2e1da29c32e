"""Mixing (ChooBaCa) and combining teachers by logits/probs from sampled and hybrid targets: the target's
dense forms (stored ids at their exact p; the exact rest spread evenly with tail_mode uniform, shaped like the
student with bucket) against the float64 reference (tests/reference_sampled.py), against the top-k target built
from the same ids, pads, and the k = V limit."""

from __future__ import annotations

import math

import pytest
import torch

from cachekd.losses import DenseTarget, KDConfig, SampledTarget, SparseTarget, distill_loss
from cachekd.losses.api import _prepare
from cachekd.losses.sampled import uniform_tail_form
from cachekd.losses.sparse import sparse_rows
from cachekd.losses.plan import FlatSparse
from cachekd.teacher_samples import target_at
from tests.reference_losses import ref_divergence
from tests.reference_sampled import ref_mixed, ref_student_shaped_logp, ref_uniform_tail_logp
from tests.test_sampled_losses import TEMPS, _cached, _teacher

f64 = torch.float64


def _dense_of(ids, logits, tail_lse, vocab_size, tau):
    """(B, T, V) the uniform-tail reconstruction of a top-k target, through the library's own sparse rows."""
    b, t, k = ids.shape
    flat = FlatSparse(ids.reshape(-1, k), logits.reshape(-1, k), tail_lse.reshape(-1))
    rows = sparse_rows(flat, slice(0, b * t), tau, f64, torch.device("cpu"), None)
    return rows.dense_logp(vocab_size).reshape(b, t, vocab_size)


def _stored(tgt: SampledTarget, b: int, t: int) -> list[int]:
    return sorted(set(tgt.ids[b, t][torch.isfinite(tgt.logp[b, t])].tolist()))


@pytest.mark.parametrize("k,tau", [(0, 1.0), (0, 2.0), (3, 1.0), (3, 2.0)])
def test_uniform_tail_form_against_float64(k, tau):
    """The converted target equals the float64 uniform-tail target of the stored ids, and the uniform-tail top-k
    target built from the same distinct ids and their log-probabilities; its rows have distinct ids."""
    vocab_size = 40
    z = _teacher(2, 3, vocab_size, seed=21)
    tgt = target_at(_cached(z, k, 12, seed=4), TEMPS, tau, None, vocab_size=z.shape[-1])
    ids, logits, tail_lse = uniform_tail_form(tgt, vocab_size, tau)
    dense = _dense_of(ids, logits, tail_lse, vocab_size, tau)
    num_pads = 0
    for b in range(2):
        for t in range(3):
            assert len(set(ids[b, t].tolist())) == ids.shape[-1]  # distinct, pads replaced
            stored = _stored(tgt, b, t)
            num_pads += ids.shape[-1] - len(stored)
            ref = ref_uniform_tail_logp(z[b, t], stored, tau)
            # the stored log-probabilities are within 2^-10 (relative 2e-3 on p, ~1e-3 absolute on the rest)
            assert (dense[b, t].exp() - ref.exp()).abs().max() < 2e-3
            assert (dense[b, t] - ref).abs()[stored].max() < 2e-3
            # the top-k target with the same ids (k = |S|) and logits, its tail the rest at τ
            real = torch.isfinite(tgt.logp[b, t])
            same = _dense_of(tgt.ids[b, t][real].view(1, 1, -1), tau * tgt.logp[b, t][real].view(1, 1, -1).double(),
                             tgt.log_rest[b, t].view(1, 1).double(), vocab_size, tau)
            torch.testing.assert_close(dense[b, t], same[0, 0], rtol=0, atol=1e-6)
    assert num_pads > 0, "the fixture must have pads"


def test_pads_count_once():
    """A pad (a repeated id, logp −inf), anywhere in the row, is replaced by an id not stored in its row at the uniform
    value; the stored id keeps its mass once; a row of all-distinct ids is unchanged; a lone −inf id (p = 0) stays."""
    vocab_size = 10
    logp = torch.tensor([[[-1.0, -2.0, -math.inf, -3.0], [-1.5, -math.inf, -2.5, -math.inf],
                          [-0.5, -2.0, -3.0, -4.0], [-1.0, -math.inf, -2.0, -3.0],
                          [-1.0, -math.inf, -2.0, -3.0]]], dtype=f64)
    ids = torch.tensor([[[4, 1, 4, 0], [2, 2, 5, 5], [3, 1, 2, 0], [7, 9, 8, 6], [9, 9, 8, 0]]])
    # the rest: 1 − Σ_stored p (row 1: ids 2 and 5 only)
    stored_p = torch.where(torch.isfinite(logp), logp.exp(), 0.0).sum(-1)
    stored_p[0, 3] = logp[0, 3, [0, 2, 3]].exp().sum()
    log_rest = (1 - stored_p).log()
    tgt = SampledTarget(ids=ids, logp=logp, weights=torch.zeros_like(logp), log_rest=log_rest,
                        entropy=torch.zeros(1, 5, dtype=f64))
    out_ids, logits, tail_lse = uniform_tail_form(tgt, vocab_size, 1.0)
    assert out_ids[0, 0].tolist()[:2] == [4, 1] and out_ids[0, 0, 3] == 0 and out_ids[0, 0, 2] not in (4, 1, 0)
    assert out_ids[0, 1, 0] == 2 and out_ids[0, 1, 2] == 5 and len(set(out_ids[0, 1].tolist())) == 4
    assert len(set(out_ids[0, 3].tolist())) == 4
    assert torch.equal(out_ids[0, 2], ids[0, 2]) and torch.equal(logits[0, 2], logp[0, 2])
    assert out_ids[0, 3, 1] == 9 and logits[0, 3, 1] == -math.inf  # a real id of zero probability
    dense = _dense_of(out_ids, logits, tail_lse, vocab_size, 1.0)[0].exp()
    assert out_ids[0, 4, 1] not in (9, 8, 0) and len(set(out_ids[0, 4].tolist())) == 4  # ids beyond the fillers' range
    for row, stored in enumerate(([4, 1, 0], [2, 5], [3, 1, 2, 0], [7, 8, 6], [9, 8, 0])):
        p = torch.zeros(vocab_size, dtype=f64)
        stored_logp = {int(v): float(lp) for v, lp in zip(ids[0, row], logp[0, row]) if math.isfinite(lp)}
        for v in stored:
            p[v] = math.exp(stored_logp[v])
        rest_ids = [v for v in range(vocab_size) if v not in ids[0, row].tolist()]  # id 9 of row 3 stays at p = 0
        p[rest_ids] = (1 - sum(p[stored])) / len(rest_ids)
        torch.testing.assert_close(dense[row], p, rtol=0, atol=1e-12)


def _sampled_and_topk(vocab_size, k_exact, n, tau, seed):
    """A sampled (or hybrid) target and the top-k target of the same distinct ids (k = |S| per row is ragged, so
    each position is checked on its own)."""
    z = _teacher(2, 3, vocab_size, seed=seed)
    tgt = target_at(_cached(z, k_exact, n, seed=seed, rounded=False), TEMPS, tau, None, vocab_size=z.shape[-1])
    # float64, unrounded: the comparisons below are of the formulas, not of the cache's rounding (tested above)
    return z, SampledTarget(*(getattr(tgt, f).double() if getattr(tgt, f).is_floating_point() else getattr(tgt, f)
                              for f in ("ids", "logp", "weights", "log_rest", "entropy")))


@pytest.mark.parametrize("objective,tau,chunk", [("reverse_kl", 1.0, None), ("forward_kl", 1.0, 2),
                                                 ("reverse_kl", 2.0, None), ("jsd", 1.0, None)])
@pytest.mark.parametrize("k_exact", [0, 3])
@pytest.mark.parametrize("tail", ["uniform", "bucket"])
def test_mixing_equals_topk_and_float64(objective, tau, chunk, k_exact, tail):
    """Mixing from a sampled target: the same loss and gradient as from the top-k cache of the same ids (each
    position alone, k = |S|), and as the float64 reference; the fused ChooBaCa path (τ = 1, forward/reverse KL)
    and the general one both."""
    vocab_size, alpha = 30, 0.6
    z, tgt = _sampled_and_topk(vocab_size, k_exact, 10, tau, seed=31 + k_exact)
    z_s = _teacher(2, 3, vocab_size, seed=32).double()
    labels = torch.randint(0, vocab_size, (2, 3), generator=torch.Generator().manual_seed(1))
    cfg = KDConfig(objective=objective, temperature=tau, tail_mode=tail)
    plan = _prepare(z_s, labels, [tgt], cfg, alpha, chunk, source_dim=None).plan
    fused = tau == 1.0 and objective in ("forward_kl", "reverse_kl") and tail == "uniform"
    expected = "fused" if tail == "bucket" else "fused_mix" if fused else "log_softmax"  # bucket: coarse mixing
    assert plan.student == expected and plan.chunk_state == (fused and chunk is not None)
    assert plan.mix_bucket == (tail == "bucket")
    s = z_s.clone().requires_grad_(True)
    parts = distill_loss(s, labels, [tgt], cfg, mix_alpha=alpha, chunk_size=chunk)
    (parts.kd_sum + parts.ce_sum).backward()
    ref_total = torch.zeros((), dtype=f64)
    ref_grad = torch.zeros_like(z_s)
    for b in range(2):
        for t in range(3):
            stored = _stored(tgt, b, t)
            zs = z_s[b, t].clone().requires_grad_(True)
            teacher = (ref_uniform_tail_logp(z[b, t], stored, tau) if tail == "uniform" else
                       ref_student_shaped_logp(z[b, t], stored, tau, torch.log_softmax(zs.detach() / tau, 0)))
            ref = ref_mixed(objective, teacher, zs, tau, alpha)
            ref = ref - torch.log_softmax(zs, 0)[labels[b, t]]
            ref.backward()
            ref_total += ref.detach()
            ref_grad[b, t] = zs.grad
            # the top-k target of the same ids and logits, one position
            real = torch.isfinite(tgt.logp[b, t])
            top = SparseTarget(ids=tgt.ids[b, t][real].view(1, 1, -1), logits=tau * tgt.logp[b, t][real].view(1, 1, -1),
                               tail_lse=tgt.log_rest[b, t].view(1, 1))
            one = z_s[b, t].view(1, 1, -1).clone().requires_grad_(True)
            p_top = distill_loss(one, labels[b, t].view(1, 1), [top], cfg, mix_alpha=alpha)
            one_s = z_s[b, t].view(1, 1, -1).clone().requires_grad_(True)
            sub = SampledTarget(*(getattr(tgt, f)[b : b + 1, t : t + 1] for f in ("ids", "logp", "weights", "log_rest",
                                                                                   "entropy")))
            p_smp = distill_loss(one_s, labels[b, t].view(1, 1), [sub], cfg, mix_alpha=alpha)
            p_top.kd_sum.backward()
            p_smp.kd_sum.backward()
            torch.testing.assert_close(p_smp.kd_sum, p_top.kd_sum, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(one_s.grad, one.grad, rtol=1e-10, atol=1e-12)
    # (the target's τ=1 log-probabilities were float32 before the τ's normaliser was taken out)
    torch.testing.assert_close(parts.kd_sum + parts.ce_sum, ref_total, rtol=0, atol=1e-4)
    torch.testing.assert_close(s.grad, ref_grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("tail", ["uniform", "bucket"])
def test_k_equals_v_limit_is_the_dense_mixed_loss(objective, tail):
    """Every token stored (N draws covering the vocabulary): the mixed loss is the dense mixed loss."""
    vocab_size = 8
    z = _teacher(2, 3, vocab_size, seed=41, scale=0.5)
    tgt = target_at(_cached(z, 0, 4000, seed=5, rounded=False), TEMPS, 1.0, None, vocab_size=z.shape[-1])
    assert all(len(_stored(tgt, b, t)) == vocab_size for b in range(2) for t in range(3))
    z_s = _teacher(2, 3, vocab_size, seed=42).double()
    labels = torch.zeros(2, 3, dtype=torch.long)
    cfg = KDConfig(objective=objective, tail_mode=tail)
    grads = []
    sums = []
    for target in (tgt, DenseTarget(z.double())):
        s = z_s.clone().requires_grad_(True)
        parts = distill_loss(s, labels, [target], cfg, mix_alpha=0.5)
        parts.kd_sum.backward()
        sums.append(parts.kd_sum.detach())
        grads.append(s.grad)
    torch.testing.assert_close(sums[0], sums[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("combine", ["logits", "probs"])
@pytest.mark.parametrize("tail", ["uniform", "bucket"])
def test_combining_sampled_teachers(combine, tail):
    """Two sampled teachers (or a sampled and a dense one) combined by logits or probs: each in its dense form
    (uniform tail, or shaped like the student), against the float64 reference of the combined target."""
    vocab_size, tau = 30, 2.0
    za, zb = _teacher(2, 3, vocab_size, seed=51), _teacher(2, 3, vocab_size, seed=52)
    ta = target_at(_cached(za, 0, 10, seed=6), TEMPS, tau, None, vocab_size=za.shape[-1])
    tb = target_at(_cached(zb, 2, 10, seed=7), TEMPS, tau, None, vocab_size=zb.shape[-1])
    z_s = _teacher(2, 3, vocab_size, seed=53).double()
    labels = torch.zeros(2, 3, dtype=torch.long)
    cfg = KDConfig(objective="reverse_kl", temperature=tau, teacher_combine=combine, teacher_weights=(0.3, 0.7),
                   tail_mode=tail)
    for second, ref_b in ((tb, None), (DenseTarget(zb.double()), "dense")):
        s = z_s.clone().requires_grad_(True)
        parts = distill_loss(s, labels, [ta, second], cfg)
        parts.kd_sum.backward()
        total = torch.zeros((), dtype=f64)
        grad = torch.zeros_like(z_s)
        for b in range(2):
            for t in range(3):
                logq = torch.log_softmax(z_s[b, t] / tau, 0)

                def dense(zt, stored):
                    return (ref_uniform_tail_logp(zt, stored, tau) if tail == "uniform" else
                            ref_student_shaped_logp(zt, stored, tau, logq))

                la = dense(za[b, t], _stored(ta, b, t))
                lb = torch.log_softmax(zb[b, t].double() / tau, 0) if ref_b else dense(zb[b, t], _stored(tb, b, t))
                if combine == "logits":
                    target = torch.log_softmax(0.3 * la + 0.7 * lb, 0)
                else:
                    target = torch.log(0.3 * la.exp() + 0.7 * lb.exp())
                zs = z_s[b, t].clone().requires_grad_(True)
                d = ref_divergence("reverse_kl", target, torch.log_softmax(zs / tau, 0))
                d.backward()
                total += d.detach()
                grad[b, t] = zs.grad
        torch.testing.assert_close(parts.kd_sum, total, rtol=0, atol=5e-3)
        torch.testing.assert_close(s.grad, grad, rtol=0, atol=2e-3)
