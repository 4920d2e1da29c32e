"""precompute.teacher_targets against an independent float64 reference: top-k, normaliser, tails at several
temperatures (including tails that underflow float32 exp()), top-k mass and entropy, padded vocabularies, and
row blocks that do not divide the batch."""

from __future__ import annotations

import math

import pytest
import torch

import cachekd.rows
from cachekd.precompute import ENTROPY_STRIDE, teacher_targets

f64 = torch.float64


def reference(logits: torch.Tensor, vocab: int, k: int, taus: list[float]) -> dict[str, torch.Tensor]:
    z = logits[..., :vocab].to(f64)
    lse = torch.logsumexp(z, -1)
    logp = z - lse[..., None]
    ids = z.topk(k, -1).indices
    tail_mask = torch.ones_like(z, dtype=torch.bool).scatter(-1, ids, False)
    tails, masses = [], []
    for tau in taus:
        scaled = logp / tau
        tail = torch.where(tail_mask, scaled, -math.inf).logsumexp(-1)
        head = torch.where(tail_mask, -math.inf, scaled).logsumexp(-1)
        tails.append(tail)
        masses.append(torch.exp(head - torch.logaddexp(head, tail)))
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, 0.0).sum(-1)[:, ::ENTROPY_STRIDE]
    return {"lse": lse, "ids": ids, "logprobs": logp.gather(-1, ids), "tail_lse": torch.stack(tails, -1),
            "topk_mass": torch.stack(masses, -1), "entropy": entropy}


def make_logits(seed: int, b=3, L=13, V=40, pad=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, L, V + pad, generator=g, dtype=f64) * 3
    z[0, 1, :V] -= 100.0  # tail ~e^-100 below the top tokens: exp() gives denormals or zeros there
    z[0, 1, :3] += 100.0  # (fewer than every k tested: the tail is all at e^-100)
    z[1, 2, :V] -= 300.0  # a tail that underflows completely
    z[1, 2, 3] += 300.0
    z[2, 4] *= 30.0  # very peaked
    z[2, 5] = 0.0  # uniform: ties everywhere
    return z.float()


@pytest.mark.parametrize("block_rows", [1, 4, None])  # 4 rows: blocks straddle windows, the last is partial
@pytest.mark.parametrize("k,taus", [(5, [1.0, 2.0]), (8, [2.0, 0.5, 1.0]), (40, [1.0, 2.0])])
def test_topk_targets_match_float64(monkeypatch, block_rows, k, taus):
    if block_rows is not None:
        monkeypatch.setattr(cachekd.rows, "BLOCK_BYTES", block_rows * 40 * 4 // torch.get_num_threads())
    V, pad = 40, 3
    logits = make_logits(1, V=V, pad=pad)
    arrays, stats = teacher_targets(logits, V, k, taus)
    ref = reference(logits, V, k, taus)
    got_vals = logits[..., :V].to(f64).gather(-1, arrays["ids"])
    ref_vals = logits[..., :V].to(f64).gather(-1, ref["ids"])
    assert torch.equal(got_vals.sort(-1).values, ref_vals.sort(-1).values)  # the same values (ties may swap ids)
    assert (arrays["ids"] < V).all()
    for row in arrays["ids"].reshape(-1, k):
        assert row.unique().numel() == k
    torch.testing.assert_close(stats["lse"].to(f64), ref["lse"], rtol=0, atol=2e-5)
    ref_lp = logits[..., :V].to(f64).gather(-1, arrays["ids"]) - ref["lse"][..., None]
    torch.testing.assert_close(arrays["logprobs"].to(f64), ref_lp, rtol=0, atol=3e-5)
    if k == V:
        assert torch.isneginf(arrays["tail_lse"]).all()
    else:
        torch.testing.assert_close(arrays["tail_lse"].to(f64), ref["tail_lse"], rtol=1e-6, atol=2e-5)
    torch.testing.assert_close(stats["topk_mass"].to(f64), ref["topk_mass"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["entropy"].to(f64), ref["entropy"], rtol=1e-5, atol=1e-4)


def test_full_mode_keeps_fp16_logits_and_stats(monkeypatch):
    monkeypatch.setattr(cachekd.rows, "BLOCK_BYTES", 1)
    V = 40
    logits = make_logits(2, V=V, pad=2)
    arrays, stats = teacher_targets(logits, V, None, [])
    assert arrays["logits"].dtype == torch.float16 and arrays["logits"].shape == (3, 13, V)
    assert torch.equal(arrays["logits"], logits[..., :V].half())
    ref = reference(logits, V, 1, [1.0])
    torch.testing.assert_close(stats["lse"].to(f64), ref["lse"], rtol=0, atol=2e-5)
    torch.testing.assert_close(stats["entropy"].to(f64), ref["entropy"], rtol=1e-5, atol=1e-4)


def test_masked_tokens_with_minus_inf_logits_are_zero_probability():
    logits = make_logits(4)
    logits[..., 7] = -math.inf  # e.g. a model that masks a special token
    arrays, stats = teacher_targets(logits, 40, 5, [1.0, 2.0])
    ref = reference(logits, 40, 5, [1.0, 2.0])
    for key in ("lse", "entropy"):
        assert torch.isfinite(stats[key]).all(), key
        torch.testing.assert_close(stats[key].to(f64), ref[key], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(arrays["tail_lse"].to(f64), ref["tail_lse"], rtol=1e-6, atol=2e-5)


def test_nonfinite_logits_show_in_the_normaliser():
    logits = make_logits(3)
    logits[1, 7, 5] = math.nan
    logits[2, 0, 1] = math.inf
    _, stats = teacher_targets(logits, 40, 4, [1.0])
    bad = ~torch.isfinite(stats["lse"])
    assert bad[1, 7] and bad[2, 0] and int(bad.sum()) == 2
