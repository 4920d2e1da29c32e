"""cachekd.losses against the independent float64 reference (tests/reference_losses.py), golden values,
gradcheck, properties, chunking and validation. Tiny sizes throughout."""

from __future__ import annotations

import json
import zlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cachekd.losses import (
    OBJECTIVES,
    DenseTarget,
    KDConfig,
    LossParts,
    SparseTarget,
    chunked_distill_loss,
    distill_loss,
    total_loss,
)
from tests.reference_losses import make_sparse, ref_distill

KINDS = ("dense", "bucket", "uniform", "renormalize")
GOLDEN = Path(__file__).parent / "golden" / "losses.json"


def to_target(t):
    if t[0] == "dense":
        return DenseTarget(t[1])
    return SparseTarget(ids=t[1], logits=t[2], tail_lse=t[3])


def upcast(target):
    return (target[0], *(x.float() if x.is_floating_point() else x for x in target[1:]))


def make_inputs(seed, B=2, T=5, V=13, scale=2.0, ignore=((0, 1), (1, 4)), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    teachers = [(torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype) for _ in range(2)]
    labels = torch.randint(0, V, (B, T), generator=g)
    for b, t in ignore:
        labels[b, t] = -100
    return z, teachers, labels, g


def build_targets(kind, teacher_logits, tau, g, ks=(4, 6)):
    if kind == "dense":
        return [("dense", t) for t in teacher_logits]
    shifts = [torch.randn(*teacher_logits[0].shape[:2], 1, generator=g, dtype=torch.float64) * 3 for _ in ks]
    return [make_sparse(t, k, tau, shift=s, generator=g) for t, k, s in zip(teacher_logits, ks, shifts)]


def close(actual, expected, rtol=2e-5, atol=2e-6):
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------------------------
# The full sweep against the reference: objective × target kind × teachers × mixing × temperature (× reduction,
# × detach_mix inside).

SETUPS = ("one", "logits", "probs", "losses")


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [1.0, 0.6])
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_matches_reference(objective, kind, setup, alpha, tau):
    seed = zlib.crc32(repr((objective, kind, setup, alpha, tau)).encode())
    z, teacher_logits, labels, g = make_inputs(seed)
    targets = build_targets(kind, teacher_logits, tau, g)
    if setup == "one":
        targets, combine, weights = targets[:1], "logits", None
    else:
        combine, weights = setup, (0.3, 0.9)
    tail_mode = "bucket" if kind == "dense" else kind
    opts = dict(objective=objective, temperature=tau, beta=0.3, skew_lambda=0.2, tail_mode=tail_mode,
                teacher_combine=combine, teacher_weights=weights)
    sparse_dense_needed = kind == "renormalize" and (alpha < 1 or setup in ("logits", "probs"))
    for reduction in ("token_mean", "batchmean"):
        for detach in ((True, False) if alpha < 1 else (True,)):
            cfg = KDConfig(**opts, reduction=reduction, detach_mix=detach)
            zc = z.clone().requires_grad_(True)
            if sparse_dense_needed:
                with pytest.raises(ValueError, match="tail_mode"):
                    distill_loss(zc, labels, [to_target(t) for t in targets], cfg, mix_alpha=alpha)
                return
            parts = distill_loss(zc, labels, [to_target(t) for t in targets], cfg, mix_alpha=alpha)
            zr = z.double().requires_grad_(True)
            ref = ref_distill(zr, labels, targets, **opts, reduction=reduction, mix_alpha=alpha, detach_mix=detach)
            close(parts.kd_sum, ref["kd_sum"])
            close(parts.ce_sum, ref["ce_sum"])
            assert int(parts.ce_count) == ref["ce_count"] == 8
            assert int(parts.kd_count) == ref["kd_count"] == (2 if reduction == "batchmean" else 8)
            # gradients of a combined loss against the reference's
            (parts.kd_sum * 0.7 + parts.ce_sum * 0.3).backward()
            (ref["kd_sum"] * 0.7 + ref["ce_sum"] * 0.3).backward()
            close(zc.grad, zr.grad, rtol=1e-4, atol=2e-6)


def test_dense_and_sparse_teachers_combine():
    z, (t0, t1), labels, g = make_inputs(11)
    targets = [("dense", t0), make_sparse(t1, 5, 1.5, generator=g, top=False)]
    for combine in ("logits", "probs", "losses"):
        opts = dict(objective="forward_kl", temperature=1.5, tail_mode="uniform", teacher_combine=combine)
        parts = distill_loss(z, labels, [to_target(t) for t in targets], KDConfig(**opts))
        close(parts.kd_sum, ref_distill(z, labels, targets, **opts)["kd_sum"])


def test_single_teacher_ignores_combine_and_weights_are_normalised():
    z, (t0, t1), labels, g = make_inputs(3)
    one = [DenseTarget(t0)]
    values = [distill_loss(z, labels, one, KDConfig(teacher_combine=c)).kd_sum for c in ("logits", "probs", "losses")]
    assert values[0] == values[1] == values[2]
    two = [DenseTarget(t0), DenseTarget(t1)]
    for combine in ("logits", "probs", "losses"):
        a = distill_loss(z, labels, two, KDConfig(teacher_combine=combine, teacher_weights=(2.0, 6.0))).kd_sum
        b = distill_loss(z, labels, two, KDConfig(teacher_combine=combine, teacher_weights=(0.25, 0.75))).kd_sum
        c = distill_loss(z, labels, two, KDConfig(teacher_combine=combine)).kd_sum
        close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(a, c)
    # a zero weight drops the teacher
    a = distill_loss(z, labels, two, KDConfig(teacher_weights=(1.0, 0.0))).kd_sum
    close(a, distill_loss(z, labels, one, KDConfig()).kd_sum, rtol=1e-6, atol=1e-7)


def test_combines_differ_on_two_teachers():
    z, (t0, t1), labels, _ = make_inputs(5)
    two = [DenseTarget(t0), DenseTarget(t1)]
    vals = [float(distill_loss(z, labels, two, KDConfig(teacher_combine=c)).kd_sum) for c in ("logits", "probs", "losses")]
    assert len(set(vals)) == 3


# ------------------------------------------------------------------------------------------------------------
# Golden values from tests/golden/make_golden_losses.py


def test_golden_values():
    data = json.loads(GOLDEN.read_text())
    inputs = data["inputs"]
    z = torch.tensor(inputs["student_logits"], dtype=torch.float32)
    labels = torch.tensor(inputs["labels"], dtype=torch.int64)
    teachers = {}
    for name, t in inputs["teachers"].items():
        if t["kind"] == "dense":
            teachers[name] = DenseTarget(torch.tensor(t["logits"], dtype=torch.float32))
        else:
            teachers[name] = SparseTarget(
                ids=torch.tensor(t["ids"], dtype=torch.int64),
                logits=torch.tensor(t["logits"], dtype=torch.float32),
                tail_lse=torch.tensor(t["tail_lse"], dtype=torch.float32),
            )
    assert len(data["cases"]) >= 40
    for case in data["cases"]:
        cfg = KDConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in case["config"].items()})
        parts = distill_loss(z, labels, [teachers[n] for n in case["teachers"]], cfg, mix_alpha=case["mix_alpha"])
        close(parts.kd_sum, case["kd_sum"])
        close(parts.ce_sum, case["ce_sum"])
        assert int(parts.kd_count) == case["kd_count"]


# ------------------------------------------------------------------------------------------------------------
# gradcheck (float64 stays float64)


GRAD_CASES = ("dense", "bucket", "uniform", "renormalize", "dense_mix", "uniform_mix", "two_probs_mix")


@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gradcheck(objective, case):
    g = torch.Generator().manual_seed(7)
    B, T, V, tau = 1, 3, 7, 1.7
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    t0, t1 = (torch.randn(B, T, V, generator=g, dtype=torch.float64) for _ in range(2))
    labels = torch.randint(0, V, (B, T), generator=g)
    alpha, combine = 1.0, "logits"
    kind = case.split("_")[0]
    if kind in ("dense", "two"):
        targets = [DenseTarget(t0)]
    else:
        targets = [to_target(make_sparse(t0, 3, tau, generator=g))]
        targets[0].tail_lse = targets[0].tail_lse.double()
    if case.startswith("two"):
        targets.append(DenseTarget(t1))
        combine = "probs"
    if case.endswith("mix"):
        alpha = 0.7
    cfg = KDConfig(objective=objective, temperature=tau, beta=0.4, tail_mode=kind if kind in ("bucket", "uniform",
                   "renormalize") else "bucket", teacher_combine=combine, detach_mix=False)

    def f(x):
        parts = distill_loss(x, labels, targets, cfg, mix_alpha=alpha)
        return parts.kd_sum + 0.5 * parts.ce_sum

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_chunked_paths():
    g = torch.Generator().manual_seed(8)
    B, T, H, V = 2, 3, 4, 7
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 0] = -100
    teacher = to_target(make_sparse(torch.randn(B, T, V, generator=g, dtype=torch.float64), 3, 2.0, generator=g))
    teacher.tail_lse = teacher.tail_lse.double()
    cfg = KDConfig(objective="jsd", temperature=2.0, tail_mode="uniform", detach_mix=False)

    def f(h, w, b):
        parts = chunked_distill_loss(h, w, b, labels, [teacher], cfg, mix_alpha=0.5, chunk_size=2)
        return parts.kd_sum + 0.3 * parts.ce_sum

    assert torch.autograd.gradcheck(f, (hidden, weight, bias), eps=1e-6, atol=1e-6, rtol=1e-4)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)

    def f2(x):
        parts = distill_loss(x, labels, [teacher], cfg, mix_alpha=0.5, chunk_size=4)
        return parts.kd_sum + 0.3 * parts.ce_sum

    assert torch.autograd.gradcheck(f2, (logits,), eps=1e-6, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Properties


def _all_kinds_targets(teacher, tau, g, k=4):
    sparse = to_target(make_sparse(teacher, k, tau, shift=torch.full((*teacher.shape[:2], 1), 5.0), generator=g))
    return {"dense": (DenseTarget(teacher), "bucket"), "bucket": (sparse, "bucket"),
            "uniform": (sparse, "uniform"), "renormalize": (sparse, "renormalize")}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_nonnegative_and_zero_when_equal(objective):
    z, (t0, _), labels, g = make_inputs(21, scale=3.0)
    for tau in (0.5, 1.0, 3.0):
        for kind, (target, mode) in _all_kinds_targets(t0, tau, g).items():
            cfg = KDConfig(objective=objective, temperature=tau, tail_mode=mode)
            parts = distill_loss(z, labels, [target], cfg)
            per_pos = [distill_loss(z, torch.where(torch.arange(labels.numel()).view_as(labels) == i, labels, -100),
                                    [target], cfg).kd_sum for i in range(labels.numel())]
            assert all(float(d) >= 0 for d in per_pos), (kind, tau)
            assert float(parts.kd_sum) > 1e-3, (kind, tau)
        # student equals teacher: 0 for dense, bucket and renormalize (uniform differs on the tail unless k = V)
        for kind, (target, mode) in _all_kinds_targets(z, tau, g).items():
            cfg = KDConfig(objective=objective, temperature=tau, tail_mode=mode)
            d = float(distill_loss(z, labels, [target], cfg).kd_sum)
            if kind == "uniform":
                assert d > 1e-4
            else:
                assert abs(d) < 1e-5, (kind, tau, d)


def test_forward_differs_from_reverse_and_jsd_symmetric():
    z, (t0, _), labels, _ = make_inputs(4)
    fwd = distill_loss(z, labels, [DenseTarget(t0)], KDConfig(objective="forward_kl")).kd_sum
    rev = distill_loss(z, labels, [DenseTarget(t0)], KDConfig(objective="reverse_kl")).kd_sum
    assert abs(float(fwd - rev)) > 1e-2
    # swapping student and teacher: forward KL becomes reverse KL, JSD(0.5) is unchanged, JSD(0.3) is not
    fwd_swapped = distill_loss(t0, labels, [DenseTarget(z)], KDConfig(objective="reverse_kl")).kd_sum
    close(fwd_swapped, fwd, rtol=1e-5, atol=1e-6)
    for beta, symmetric in ((0.5, True), (0.3, False)):
        cfg = KDConfig(objective="jsd", beta=beta, temperature=1.3)
        a = distill_loss(z, labels, [DenseTarget(t0)], cfg).kd_sum
        b = distill_loss(t0, labels, [DenseTarget(z)], cfg).kd_sum
        assert (abs(float(a - b)) < 1e-6) == symmetric
    # JSD(β) with p and q swapped equals JSD(1−β)
    a = distill_loss(z, labels, [DenseTarget(t0)], KDConfig(objective="jsd", beta=0.3)).kd_sum
    b = distill_loss(t0, labels, [DenseTarget(z)], KDConfig(objective="jsd", beta=0.7)).kd_sum
    close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_k_equals_v_matches_dense_in_every_tail_mode(objective):
    z, (t0, _), labels, g = make_inputs(31)
    V = z.shape[-1]
    for tau in (1.0, 2.5):
        dense = distill_loss(z, labels, [DenseTarget(t0)], KDConfig(objective=objective, temperature=tau))
        sparse = to_target(make_sparse(t0, V, tau, shift=torch.randn(2, 5, 1, generator=g, dtype=torch.float64),
                                       generator=g))
        assert torch.isneginf(sparse.tail_lse).all()
        for mode in ("bucket", "uniform", "renormalize"):
            for alpha in ((1.0, 0.5) if mode == "uniform" else (1.0,)):
                cfg = KDConfig(objective=objective, temperature=tau, tail_mode=mode)
                d = distill_loss(z, labels, [DenseTarget(t0)], cfg, mix_alpha=alpha).kd_sum
                s = distill_loss(z, labels, [sparse], cfg, mix_alpha=alpha).kd_sum
                close(s, d, rtol=1e-5, atol=1e-6)
                if alpha == 1.0:
                    close(s, dense.kd_sum, rtol=1e-5, atol=1e-6)


def test_tail_modes_differ_and_uniform_is_closed_form_of_dense_reconstruction():
    z, (t0, _), labels, g = make_inputs(41)
    sparse_t = make_sparse(t0, 4, 1.0, generator=g)
    vals = {m: float(distill_loss(z, labels, [to_target(sparse_t)], KDConfig(tail_mode=m)).kd_sum) for m in
            ("bucket", "uniform", "renormalize")}
    assert len(set(vals.values())) == 3
    # uniform equals the dense uniform reconstruction fed as a DenseTarget
    _, ids, vals_k, tail = sparse_t
    recon = (tail.double() - math.log(13 - 4)).unsqueeze(-1).expand(-1, -1, 13).clone()
    recon.scatter_(-1, ids, vals_k.double())
    for objective in OBJECTIVES:
        cfg = KDConfig(objective=objective, tail_mode="uniform")
        close(distill_loss(z, labels, [to_target(sparse_t)], cfg).kd_sum,
              distill_loss(z, labels, [DenseTarget(recon.float())], cfg).kd_sum, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Numerics: low precision, extremes, all-ignored, k = 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_low_precision_inputs_accumulate_in_float32(objective, dtype):
    z, (t0, _), labels, g = make_inputs(51, dtype=dtype, V=64, scale=4.0)
    sparse = make_sparse(t0, 8, 2.0, generator=g)
    for target, mode in ((("dense", t0), "bucket"), (sparse, "bucket"), (sparse, "uniform")):
        cfg = KDConfig(objective=objective, temperature=2.0, tail_mode=mode)
        zl = z.clone().requires_grad_(True)
        parts = distill_loss(zl, labels, [to_target(target)], cfg)
        assert parts.kd_sum.dtype == parts.ce_sum.dtype == torch.float32
        (parts.kd_sum + parts.ce_sum).backward()
        assert zl.grad.dtype == dtype and torch.isfinite(zl.grad).all()
        # identical to float32 arithmetic on the same (rounded) values, and to the float64 reference
        up = distill_loss(z.float(), labels, [to_target(upcast(target))], cfg)
        close(parts.kd_sum, up.kd_sum, rtol=1e-6, atol=1e-7)
        ref = ref_distill(z, labels, [target], objective=objective, temperature=2.0, tail_mode=mode)
        close(parts.kd_sum, ref["kd_sum"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tau", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_extreme_logits_and_temperatures(objective, tau):
    g = torch.Generator().manual_seed(61)
    B, T, V = 2, 4, 16
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 5
    z[..., :3] = torch.tensor([1e4, -1e4, 3e3], dtype=torch.float64)
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 5
    t[..., 2:5] = torch.tensor([1e4, -1e4, 2e3], dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    for dtype in (torch.float32, torch.float16):
        zd = z.to(dtype).requires_grad_(True)
        td = t.to(dtype)
        for kind in ("dense", "bucket", "uniform", "renormalize"):
            if kind == "dense":
                target, mode = ("dense", td), "bucket"
            else:
                target, mode = make_sparse(td, 3, tau, generator=g, top=False), kind
            for k_target in ((target,) if kind == "dense" else (target, make_sparse(td, 1, tau, generator=g))):
                cfg = KDConfig(objective=objective, temperature=tau, tail_mode=mode)
                parts = distill_loss(zd, labels, [to_target(k_target)], cfg)
                grad, = torch.autograd.grad(parts.kd_sum + parts.ce_sum, zd)
                assert torch.isfinite(parts.kd_sum) and torch.isfinite(parts.ce_sum)
                assert torch.isfinite(grad).all()
                ref = ref_distill(zd.detach(), labels, [k_target], objective=objective, temperature=tau,
                                  tail_mode=mode)
                # float32 log-softmax of logits ~1e5 (1e4/τ) is exact only to ~1e-7 relative of their size
                close(parts.kd_sum, ref["kd_sum"], rtol=1e-5, atol=1e-5 * max(1.0, 1e4 / tau) * B * T)
                close(parts.ce_sum, ref["ce_sum"], rtol=1e-5, atol=1e-2)


def test_confident_student_tail_mass_is_exact():
    """The student's tail mass is exact however small: 1 − Σ_topk q alone would give 0 or ~1e-7."""
    g = torch.Generator().manual_seed(71)
    B, T, V = 1, 4, 32
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    target = make_sparse(t, 4, 1.0, generator=g)
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = target[1]
    z.scatter_(-1, ids[..., :1], 40.0)  # q on the ids ≈ 1 − 1e-16
    z[0, 0].scatter_(-1, ids[0, 0, :1], 12.0)  # q_tail ≈ 3e-4 (under the threshold)
    z[0, 1].scatter_(-1, ids[0, 1, :1], 6.0)  # q_tail ≈ 0.1 (cheap path)
    z[0, 2].scatter_(-1, ids[0, 2, :1], 1000.0)  # q_tail ≈ e^-1000: exp() underflows, log space needed
    labels = torch.zeros(B, T, dtype=torch.int64)
    for objective in ("forward_kl", "reverse_kl", "jsd"):
        for mode in ("bucket", "uniform"):
            cfg = KDConfig(objective=objective, tail_mode=mode)
            parts = distill_loss(z.float(), labels, [to_target(target)], cfg)
            ref = ref_distill(z.float(), labels, [target], objective=objective, tail_mode=mode)
            close(parts.kd_sum, ref["kd_sum"], rtol=1e-5, atol=1e-6)
            zl = z.float().requires_grad_(True)
            zr = z.float().double().requires_grad_(True)
            distill_loss(zl, labels, [to_target(target)], cfg).kd_sum.backward()
            ref_distill(zr, labels, [target], objective=objective, tail_mode=mode)["kd_sum"].backward()
            close(zl.grad, zr.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_tail_in_float32_underflow_range_is_exact(tau):
    """A student tail ~e^-100 below its top token: exp() gives float32 denormals (~2% off) or zeros there, and
    τ = 2 takes square roots of them; such rows must be redone in log space."""
    g = torch.Generator().manual_seed(73)
    B, T, V = 1, 3, 32
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    target = make_sparse(t, 4, tau, generator=g)
    ids = target[1]
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64) - 100.0
    z[0, 0] += 100.0  # an ordinary row
    z.scatter_(-1, ids[..., :2], 0.0)
    z[0, 2].scatter_(-1, ids[0, 2, 2:3], 3.0)
    labels = torch.tensor([[ids[0, 0, 0], 5, ids[0, 2, 1]]])
    for objective in ("forward_kl", "jsd", "reverse_kl"):
        cfg = KDConfig(objective=objective, temperature=tau)
        zl = z.float().requires_grad_(True)
        parts = distill_loss(zl, labels, [to_target(target)], cfg)
        zr = z.float().double().requires_grad_(True)
        ref = ref_distill(zr, labels, [target], objective=objective, temperature=tau)
        close(parts.kd_sum, ref["kd_sum"], rtol=1e-5, atol=1e-6)
        close(parts.ce_sum, ref["ce_sum"], rtol=1e-5, atol=1e-6)
        (parts.kd_sum + parts.ce_sum).backward()
        (ref["kd_sum"] + ref["ce_sum"]).backward()
        close(zl.grad, zr.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("block_rows", [1, 3])  # 3 rows: the last block of the 10 rows is partial
@pytest.mark.parametrize("tau", [1.0, 0.7, 2.0])
def test_fused_sparse_path_in_small_blocks_with_confident_rows(monkeypatch, tau, block_rows):
    """The sparse-only path works on row blocks and takes the exact tail on some rows."""
    import cachekd.rows

    monkeypatch.setattr(cachekd.rows, "BLOCK_BYTES", block_rows * 24 * 4 // torch.get_num_threads())
    g = torch.Generator().manual_seed(72)
    B, T, V = 2, 5, 24
    t0, t1 = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    targets = [make_sparse(t0, 4, tau, generator=g), make_sparse(t1, 6, tau, generator=g, top=False)]
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    z[0, ::2].scatter_(-1, targets[0][1][0, ::2, :1], 30.0)  # tail of teacher 0's ids ~1e-12: exact path
    z[1, 1].scatter_(-1, targets[1][1][1, 1, :2], 25.0)  # same for teacher 1's ids
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 3] = -100
    for objective in OBJECTIVES:
        for mode in ("bucket", "renormalize"):
            opts = dict(objective=objective, temperature=tau, tail_mode=mode, teacher_combine="losses",
                        teacher_weights=(0.4, 0.6))
            zl = z.float().requires_grad_(True)
            parts = distill_loss(zl, labels, [to_target(t) for t in targets], KDConfig(**opts))
            zr = z.float().double().requires_grad_(True)
            ref = ref_distill(zr, labels, targets, **opts)
            close(parts.kd_sum, ref["kd_sum"])
            close(parts.ce_sum, ref["ce_sum"])
            (parts.kd_sum + 0.5 * parts.ce_sum).backward()
            (ref["kd_sum"] + 0.5 * ref["ce_sum"]).backward()
            close(zl.grad, zr.grad, rtol=1e-4, atol=2e-6)
    cfg = KDConfig(objective="forward_kl", temperature=tau, tail_mode="bucket", teacher_combine="losses")
    sparse64 = [to_target(t) for t in targets]
    for t in sparse64:
        t.tail_lse = t.tail_lse.double()

    def f(x):
        parts = distill_loss(x, labels, sparse64, cfg)
        return parts.kd_sum + 0.5 * parts.ce_sum

    # (the confident rows are exactly where finite differences of a 30-logit gap are most delicate)
    assert torch.autograd.gradcheck(f, (z.clone().requires_grad_(True),), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_bucket_and_renormalize_never_form_a_vocabulary_sized_log_softmax(monkeypatch):
    """The O(k) promise: no (n, V) log-softmax (student or teacher) for sparse bucket/renormalize targets,
    while dense targets do use one (so the probe itself works)."""
    V = 40
    seen = []
    original = F.log_softmax

    def spy(x, *args, **kwargs):
        seen.append(x.shape[-1])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(F, "log_softmax", spy)
    z, (t0, t1), labels, g = make_inputs(73, V=V)
    for tau in (1.0, 2.0):
        sparse = [to_target(make_sparse(t, 5, tau, generator=g)) for t in (t0, t1)]
        for mode in ("bucket", "renormalize"):
            for teachers in (sparse[:1], sparse):
                cfg = KDConfig(objective="reverse_kl", temperature=tau, tail_mode=mode, teacher_combine="losses")
                zl = z.clone().requires_grad_(True)
                parts = distill_loss(zl, labels, teachers, cfg)
                (parts.ce_sum + parts.kd_sum).backward()
                assert V not in seen, (tau, mode)
    distill_loss(z, labels, [DenseTarget(t0)], KDConfig())
    assert V in seen


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_all_ignored_gives_zero_with_count_zero(chunk_size):
    z, (t0, _), _, g = make_inputs(81)
    labels = torch.full((2, 5), -100)
    for target, mode in ((DenseTarget(t0), "bucket"), (to_target(make_sparse(t0, 4, 2.0, generator=g)), "bucket")):
        for reduction in ("token_mean", "batchmean"):
            zl = z.clone().requires_grad_(True)
            cfg = KDConfig(objective="reverse_kl", temperature=2.0, tail_mode=mode, reduction=reduction)
            parts = distill_loss(zl, labels, [target], cfg, chunk_size=chunk_size)
            assert float(parts.ce_sum.detach()) == 0.0 and float(parts.kd_sum.detach()) == 0.0
            assert int(parts.ce_count) == 0
            assert int(parts.kd_count) == (0 if reduction == "token_mean" else 2)
            (parts.ce_sum + parts.kd_sum).backward()
            assert torch.equal(zl.grad, torch.zeros_like(z))


@pytest.mark.parametrize("objective,tau,mode", [("reverse_kl", 1.0, "bucket"), ("forward_kl", 2.0, "bucket"),
                                                ("reverse_kl", 1.0, "renormalize"), ("jsd", 2.0, "renormalize")])
@pytest.mark.parametrize("two_teachers", [False, True])
def test_garbage_at_ignored_positions_is_harmless(objective, tau, mode, two_teachers):
    z, (t0, t1), labels, g = make_inputs(82)
    sparse = [to_target(make_sparse(t, 4, tau, generator=g)) for t in ((t0, t1) if two_teachers else (t0,))]
    cfg = KDConfig(objective=objective, temperature=tau, teacher_combine="losses", tail_mode=mode)
    base = distill_loss(z, labels, sparse, cfg)
    zr = z.clone().requires_grad_(True)
    ref = distill_loss(zr, labels, sparse, cfg, chunk_size=3)  # the chunked path drops ignored rows first
    (ref.ce_sum + ref.kd_sum).backward()
    for s in sparse:
        s.tail_lse[0, 1] = -math.inf
        s.logits[1, 4] = math.nan
        s.ids[0, 1, 0] = -7
        s.ids[1, 4, 1] = 10**6
    zl = z.clone()
    zl[0, 1] = math.inf
    zl[1, 4, 2] = math.nan
    zl.requires_grad_(True)
    parts = distill_loss(zl, labels, sparse, cfg)
    assert float(parts.kd_sum.detach()) == float(base.kd_sum)
    assert float(parts.ce_sum.detach()) == float(base.ce_sum)
    close(parts.kd_sum, ref.kd_sum, rtol=1e-6, atol=1e-6)
    (parts.ce_sum + parts.kd_sum).backward()
    assert torch.isfinite(zl.grad).all() and (zl.grad[0, 1] == 0).all() and (zl.grad[1, 4] == 0).all()
    close(zl.grad, zr.grad, rtol=1e-5, atol=1e-6)


def test_no_teachers_is_ce_only_and_ce_is_untempered():
    z, (t0, _), labels, _ = make_inputs(91)
    parts = distill_loss(z, labels, [], KDConfig(temperature=3.0))
    assert float(parts.kd_sum) == 0.0 and int(parts.kd_count) == 0
    expected = F.cross_entropy(z.reshape(-1, 13), labels.reshape(-1), reduction="sum")
    close(parts.ce_sum, expected, rtol=1e-6, atol=1e-6)
    with_teacher = distill_loss(z, labels, [DenseTarget(t0)], KDConfig(temperature=3.0))
    close(with_teacher.ce_sum, expected, rtol=1e-6, atol=1e-6)


def test_batchmean_matches_baby_llama_kl_div():
    z, (t0, _), _, _ = make_inputs(92)
    labels = torch.randint(0, 13, (2, 5))
    tau = 2.0
    parts = distill_loss(z, labels, [DenseTarget(t0)], KDConfig(temperature=tau, reduction="batchmean"))
    baby_llama = F.kl_div(F.log_softmax(z / tau, -1), F.softmax(t0 / tau, -1), reduction="batchmean")
    close(parts.kd_sum / parts.kd_count, baby_llama, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Mixing and detach_mix


def test_detach_mix_controls_the_target_gradient():
    z, (t0, _), labels, g = make_inputs(101)
    alpha, tau = 0.6, 1.5
    sparse = to_target(make_sparse(t0, 4, tau, generator=g))
    for target in (DenseTarget(t0), sparse):
        for objective in OBJECTIVES:
            grads = {}
            for detach in (True, False):
                zl = z.clone().requires_grad_(True)
                cfg = KDConfig(objective=objective, temperature=tau, tail_mode="uniform", detach_mix=detach)
                distill_loss(zl, labels, [target], cfg, mix_alpha=alpha).kd_sum.backward()
                grads[detach] = zl.grad
            assert (grads[True] - grads[False]).abs().max() > 1e-4, objective
            # detached: the same as a constant dense target holding the mixed logits
            if isinstance(target, DenseTarget):
                mixed = DenseTarget(alpha * t0 + (1 - alpha) * z)
                zl = z.clone().requires_grad_(True)
                cfg = KDConfig(objective=objective, temperature=tau)
                distill_loss(zl, labels, [mixed], cfg).kd_sum.backward()
                close(zl.grad, grads[True], rtol=1e-4, atol=1e-6)


def test_mix_alpha_extremes():
    z, (t0, _), labels, _ = make_inputs(102)
    cfg = KDConfig(objective="reverse_kl", temperature=2.0)
    a1 = distill_loss(z, labels, [DenseTarget(t0)], cfg, mix_alpha=1.0).kd_sum
    assert float(a1) == float(distill_loss(z, labels, [DenseTarget(t0)], cfg).kd_sum)
    a0 = distill_loss(z, labels, [DenseTarget(t0)], cfg, mix_alpha=0.0).kd_sum  # target = student
    assert abs(float(a0)) < 1e-6


# ------------------------------------------------------------------------------------------------------------
# Chunking: same value and gradients, with a leftover chunk, with and without ignored positions


def _rel_close(a, b, rtol=1e-6):
    a, b = a.detach(), b.detach()
    scale = b.abs().max().clamp_min(1e-12)
    assert float((a - b).abs().max() / scale) <= rtol, float((a - b).abs().max() / scale)


@pytest.mark.parametrize("ignore", [(), ((0, 1), (1, 4), (1, 0))])
@pytest.mark.parametrize("kind", ["dense", "bucket", "uniform_mix", "two_losses"])
def test_chunked_equals_unchunked(kind, ignore):
    g = torch.Generator().manual_seed(111)
    B, T, H, V = 2, 7, 8, 29
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    for b, t in ignore:
        labels[b, t] = -100
    t0 = torch.randn(B, T, V, generator=g) * 2
    t1 = torch.randn(B, T, V, generator=g) * 2
    alpha, mode, combine = 1.0, "bucket", "logits"
    if kind == "dense":
        teachers = [DenseTarget(t0)]
    elif kind == "bucket":
        teachers = [to_target(make_sparse(t0, 5, 1.0, generator=g))]
    elif kind == "uniform_mix":
        teachers, alpha, mode = [to_target(make_sparse(t0, 5, 2.0, generator=g))], 0.6, "uniform"
    else:
        teachers, combine = [DenseTarget(t0), to_target(make_sparse(t1, 5, 2.0, generator=g))], "losses"
    tau = 1.0 if kind == "bucket" else 2.0
    cfg = KDConfig(objective="reverse_kl", temperature=tau, tail_mode=mode, teacher_combine=combine, detach_mix=False)

    def run(fn):
        params = [p.clone().requires_grad_(True) for p in (hidden, weight, bias)]
        parts = fn(*params)
        (0.4 * parts.ce_sum + 0.6 * parts.kd_sum).backward()
        return parts, [p.grad for p in params]

    ref, ref_grads = run(lambda h, w, b: distill_loss(F.linear(h, w, b), labels, teachers, cfg, mix_alpha=alpha))
    # chunk sizes with a leftover chunk (14 or 11 valid positions)
    for chunk in (4, 5):
        got, grads = run(lambda h, w, b: chunked_distill_loss(h, w, b, labels, teachers, cfg, alpha, chunk_size=chunk))
        _rel_close(got.ce_sum, ref.ce_sum)
        _rel_close(got.kd_sum, ref.kd_sum)
        assert int(got.ce_count) == int(ref.ce_count) and int(got.kd_count) == int(ref.kd_count)
        for a, b in zip(grads, ref_grads):
            _rel_close(a, b)
        got, grads = run(lambda h, w, b: distill_loss(F.linear(h, w, b), labels, teachers, cfg, alpha, chunk_size=chunk))
        _rel_close(got.ce_sum, ref.ce_sum)
        _rel_close(got.kd_sum, ref.kd_sum)
        for a, b in zip(grads, ref_grads):
            _rel_close(a, b)


@pytest.mark.parametrize("kind", ["dense", "factored_mix", "bucket", "two_losses", "ce_only"])
def test_chunked_gradients_formed_in_forward(kind, monkeypatch):
    """Given the weights of the caller's loss (as the trainer gives them), the step-wise loss forms its gradients in
    forward: each chunk's loss runs once (a factored teacher rebuilt once, the student projected once), and the
    gradients equal the unchunked float64 reference under the loss in that ratio at any scale (a GradScaler's); a
    loss in another ratio recomputes in backward and is right too."""
    from cachekd.losses import FactoredTarget
    from cachekd.losses import chunked as chunked_mod

    g = torch.Generator().manual_seed(113)
    B, T, H, V, d = 2, 7, 8, 29, 6
    f64 = torch.float64
    hidden, weight, bias = (torch.randn(B, T, H, generator=g, dtype=f64), torch.randn(V, H, generator=g, dtype=f64)
                            * 0.5, torch.randn(V, generator=g, dtype=f64))
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 2] = -100
    t0 = torch.randn(B, T, V, generator=g, dtype=f64) * 2
    alpha, combine, mode = 1.0, "logits", "bucket"
    teachers = {"dense": lambda: [DenseTarget(t0)],
                "factored_mix": lambda: [FactoredTarget(torch.randn(B, T, d, generator=g, dtype=f64),
                                                        torch.randn(V, d, generator=g, dtype=f64),
                                                        torch.randn(V, generator=g, dtype=f64))],
                "bucket": lambda: [to_target(make_sparse(t0, 5, 1.0, generator=g))],
                "two_losses": lambda: [DenseTarget(t0), DenseTarget(t0.flip(-1))],
                "ce_only": lambda: []}[kind]()
    if kind == "factored_mix":
        alpha = 0.7
    if kind == "two_losses":
        combine = "losses"
    cfg = KDConfig(objective="reverse_kl", tail_mode=mode, teacher_combine=combine, detach_mix=True)
    calls = []
    real = chunked_mod.loss_on_rows
    monkeypatch.setattr(chunked_mod, "loss_on_rows", lambda *a: calls.append(1) or real(*a))

    def run(fn, w_ce, w_kd, scale=1.0):
        params = [p.clone().requires_grad_(True) for p in (hidden, weight, bias)]
        parts = fn(*params)
        (scale * (w_ce * parts.ce_sum + w_kd * parts.kd_sum)).backward()
        return parts, [p.grad / scale for p in params]

    for w_ce, w_kd in ((0.4, 0.6), (1.0, 0.0), (0.0, 1.0)):
        if kind == "ce_only" and w_ce == 0:
            continue
        ref, ref_grads = run(lambda h, w, b: distill_loss(F.linear(h, w, b), labels, teachers, cfg, mix_alpha=alpha),
                             w_ce, w_kd)
        for given, scale in (((w_ce, w_kd), 1.0), ((w_ce * 3, w_kd * 3), 1024.0), ((1.0, 2.0), 1.0), (None, 1.0)):
            calls.clear()
            got, grads = run(lambda h, w, b: chunked_distill_loss(h, w, b, labels, teachers, cfg, alpha, chunk_size=4,
                                                                  grad_weights=given), w_ce, w_kd, scale)
            in_ratio = given is not None and math.isclose(given[0] * w_kd, given[1] * w_ce, abs_tol=1e-15)
            chunks = 4  # 13 valid positions in chunks of 4
            assert len(calls) == chunks * (1 if in_ratio else 2), (given, len(calls))
            _rel_close(got.ce_sum, ref.ce_sum)
            _rel_close(got.kd_sum, ref.kd_sum)
            for a, b in zip(grads, ref_grads):
                assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (given, float((a - b).abs().max()))


def test_chunked_logits_gradient_dtype_and_no_bias():
    g = torch.Generator().manual_seed(112)
    hidden = torch.randn(1, 9, 4, generator=g, requires_grad=True)
    weight = torch.randn(11, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (1, 9), generator=g)
    parts = chunked_distill_loss(hidden, weight, None, labels, [DenseTarget(torch.randn(1, 9, 11))], KDConfig(),
                                 chunk_size=4)
    (parts.ce_sum + parts.kd_sum).backward()
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape
    z = torch.randn(1, 9, 11, generator=g).to(torch.bfloat16).requires_grad_(True)
    parts = distill_loss(z, labels, [], KDConfig(), chunk_size=4)
    parts.ce_sum.backward()
    assert z.grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(objective="foo"), "objective"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(beta=1.5), "beta"),
        (dict(skew_lambda=-0.1), "skew_lambda"),
        (dict(tail_mode="drop"), "tail_mode"),
        (dict(teacher_combine="mean"), "teacher_combine"),
        (dict(teacher_weights=()), "teacher_weights"),
        (dict(teacher_weights=(1.0, -1.0)), "teacher_weights"),
        (dict(teacher_weights=(0.0, 0.0)), "teacher_weights"),
        (dict(reduction="mean"), "reduction"),
        (dict(detach_mix="yes"), "detach_mix"),
        (dict(ignore_index=1.5), "ignore_index"),
    ],
)
def test_invalid_config_raises_naming_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        KDConfig(**kwargs)


def test_invalid_calls_raise_naming_the_option():
    z, (t0, t1), labels, g = make_inputs(121)
    sparse = to_target(make_sparse(t0, 4, 1.0, generator=g))
    cases = [
        (lambda: distill_loss(z, labels, [sparse], KDConfig(tail_mode="renormalize"), mix_alpha=0.5), "tail_mode"),
        (lambda: distill_loss(z, labels, [sparse, sparse], KDConfig(teacher_combine="probs", tail_mode="renormalize")),
         "tail_mode"),
        (lambda: distill_loss(z, labels, [DenseTarget(t0)], KDConfig(), mix_alpha=1.5), "mix_alpha"),
        (lambda: distill_loss(z, labels, [DenseTarget(t0)], KDConfig(teacher_weights=(1.0, 2.0))), "teacher_weights"),
        (lambda: distill_loss(z, labels, [DenseTarget(t0[..., :5])], KDConfig()), "teacher 0"),
        (lambda: distill_loss(z, labels[:, :3], [], KDConfig()), "labels"),
        (lambda: distill_loss(z, labels + 20, [], KDConfig()), "labels"),
        (lambda: distill_loss(z, labels, [], KDConfig(), chunk_size=0), "chunk_size"),
        (lambda: distill_loss(z, labels, [t0], KDConfig()), "teacher 0"),
        (lambda: total_loss(torch.tensor(1.0), torch.tensor(1.0), 1.5, 1.0), "ce_weight"),
        (lambda: chunked_distill_loss(z[..., :4], torch.randn(13, 5), None, labels, [], KDConfig()), "weight"),
    ]
    for fn, option in cases:
        with pytest.raises(ValueError, match=option):
            fn()
    # sparse targets with several teachers work with combine=losses in any tail mode
    parts = distill_loss(z, labels, [sparse, sparse], KDConfig(teacher_combine="probs", tail_mode="uniform"))
    assert isinstance(parts, LossParts)
    distill_loss(z, labels, [sparse, sparse], KDConfig(teacher_combine="losses", tail_mode="renormalize"))


def test_total_loss():
    ce, kd = torch.tensor(2.0), torch.tensor(0.5)
    assert float(total_loss(ce, kd, 0.5, 2.0)) == pytest.approx(0.5 * 2.0 + 0.5 * 4 * 0.5)
    assert float(total_loss(ce, kd, 1.0, 3.0)) == pytest.approx(2.0)
    assert float(total_loss(ce, kd, 0.0, 1.0)) == pytest.approx(0.5)


def test_kdconfig_normalises_weights_to_a_tuple():
    cfg = KDConfig(teacher_weights=[1, 3])
    assert cfg.teacher_weights == (1.0, 3.0)
