"""teacher_rows.teacher_targets against an independent float64 reference: top-k, normaliser, tails at several
temperatures (including tails that underflow float32 exp()), top-k mass and entropy, padded vocabularies, and
row blocks that do not divide the batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cachekd.rows
from cachekd.teacher_rows import ENTROPY_STRIDE, teacher_targets

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


# ------------------------------------------------------------------ two-stage top-k (cachekd.rows.topk_rows)


def _adversarial_rows(V: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(9, V, generator=g) * 2
    G = V // cachekd.rows._topk_group(V, 16)
    z[1, ::G] += 50.0             # the largest values all in one strided group (column c ≡ 0 mod G)
    z[2, -(V % 8 or 1):] += 50.0  # ... in the leftover columns past the last whole group
    z[3] = 1.0                    # all tied
    z[4, : V // 2] = -math.inf    # half the vocabulary masked
    z[5] = torch.arange(V, dtype=torch.float32)  # increasing: the top-k are the last columns
    z[6] = -torch.arange(V, dtype=torch.float32)  # decreasing: the first columns
    z[7, 100:] = z[7, 100:].round()  # many ties, also at the k-th value
    z[8, ::3] = -math.inf
    return z


@pytest.mark.parametrize("V", [2053, 40000])  # group sizes 8 and 16, both with leftover columns
def test_two_stage_topk_equals_torch_topk(V):
    k = 16
    assert cachekd.rows._topk_group(V, k) > 0  # the two-stage path is the one under test
    z = _adversarial_rows(V, V)
    vals, ids = cachekd.rows.topk_rows(z, k)
    ref = z.topk(k, -1).values
    assert torch.equal(vals.sort(-1, descending=True).values, ref)
    assert torch.equal(z.gather(1, ids), vals)  # ids point at their values
    for row in ids:
        assert row.unique().numel() == k and int(row.min()) >= 0 and int(row.max()) < V


def test_two_stage_targets_match_float64():
    """teacher_targets at a vocabulary large enough for the two-stage top-k, against the float64 reference."""
    V, k, taus = 4099, 16, [1.0, 2.0]
    logits = make_logits(3, b=3, L=9, V=V, pad=5)
    assert cachekd.rows._topk_group(V, k) > 0
    arrays, stats = teacher_targets(logits, V, k, taus)
    ref = reference(logits, V, k, taus)
    got = logits[..., :V].to(f64).gather(-1, arrays["ids"]).sort(-1).values
    assert torch.equal(got, logits[..., :V].to(f64).gather(-1, ref["ids"]).sort(-1).values)
    torch.testing.assert_close(stats["lse"].to(f64), ref["lse"], rtol=0, atol=2e-5)
    torch.testing.assert_close(arrays["tail_lse"].to(f64), ref["tail_lse"], rtol=1e-6, atol=2e-5)
    torch.testing.assert_close(stats["topk_mass"].to(f64), ref["topk_mass"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the stored encoding (cachekd.cache.format)


@pytest.mark.parametrize("V,scale", [(7798, 512.0), (151936, 512.0), (1000, 1000.0)])
def test_encode_topk_round_trip(V, scale):
    """Sorted delta ids and fixed-point log-probabilities decode to the input (ids in id order, each value within
    half a step), with uint32 ids past 2^16 and a scale that is not a power of two."""
    from cachekd.cache import format as fmt

    rng = np.random.default_rng(V)
    ids = np.stack([rng.choice(V, 64, replace=False) for _ in range(30)]).reshape(5, 6, 64)
    lp = (-rng.exponential(4.0, ids.shape)).astype(np.float32)
    lp[0, 0, 0] = 1e-7  # float noise above 0 clips to 0
    deltas, q = fmt.encode_topk(ids, lp, V, scale)
    assert deltas.dtype == (np.uint16 if V <= 1 << 16 else np.uint32) and q.dtype == np.uint16
    got_ids = fmt.decode_ids(deltas)
    order = np.argsort(ids, -1)
    assert np.array_equal(got_ids, np.take_along_axis(ids, order, -1))
    want = np.take_along_axis(lp.astype(np.float64), order, -1)
    err = np.abs(fmt.decode_logprobs(q, scale).astype(np.float64) - np.minimum(want, 0.0))
    assert err.max() <= 0.5 / scale + 1e-6 * np.abs(want).max() / scale
