"""Wrong numbers with exit 0, round two (issue 20, item 2): reverse KL from a pure sampled cache was infinite where
the fixed-point log-probabilities of the drawn ids rounded up to more mass than the normaliser, and runs whose loss or
gradient norm was not finite ended with exit 0."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import assert_clean_error, invoke, make_teacher
from tests.test_cache import _precompute

STUDENT = ["--set", "model.hidden_size=32", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
           "--set", "model.intermediate_size=32", "--batch-size", "4"]


def _sharp_teacher(store_path, out, scale: float):
    """A tiny teacher whose output layer is scaled by `scale`: near one-hot distributions (entropy near 0), where
    a few draws cover almost all the mass and the stored rounding decides whether any rest is left."""
    from transformers import AutoModelForCausalLM

    make_teacher(store_path, out, seed=5)
    m = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(scale)
    m.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sharp_sampled(tmp_path_factory, store_path):
    from click.testing import CliRunner

    d = tmp_path_factory.mktemp("sharp")
    teacher = _sharp_teacher(store_path, d / "teacher", scale=40.0)
    _precompute(CliRunner(), store_path, [teacher], d / "cache", "--sample", "20", "--temperatures", "0.5,1,2")
    return d / "cache", teacher


def _drawn_share_and_truth(cache_path, teacher, store_path, tau):
    """For the first chunk of the train split: the cache's target at τ, the drawn ids' share of the mass as the
    stored (rounded) values give it, and the true rest mass from the teacher's own logits."""
    from transformers import AutoModelForCausalLM

    from cachekd.cache.reader import LogitCache
    from cachekd.teacher_samples import target_at
    from cachekd.tokens import TokenStore

    cache = LogitCache.open(cache_path)
    b = cache.read_chunk("train", 0)[cache.teachers[0]]
    arrays = {n: None if getattr(b, n) is None else torch.from_numpy(getattr(b, n)) for n in b.NAMES}
    tgt = target_at(arrays, cache.temperatures, tau, None, rounding=cache.plan.rounding, vocab_size=cache.vocab_size)
    ti = cache.temperatures.index(tau)
    real = arrays["sample_counts"].sum(-1) > 0
    ell = arrays["sample_logprobs"].double()
    share = torch.logsumexp(torch.where(real, ell / tau, -math.inf), -1) - arrays["tail_lse"][..., ti].double()
    ids = TokenStore.open(store_path).read_chunk("train", 0)
    with torch.no_grad():
        z = AutoModelForCausalLM.from_pretrained(teacher)(input_ids=torch.from_numpy(ids.astype(np.int64))).logits
    logp = torch.log_softmax(z.double() / tau, -1)
    # (pads repeat a real id: count each id's real entries, not the last write)
    stored = torch.zeros_like(logp).scatter_add_(-1, arrays["sample_ids"].long(), real.double()) > 0
    true_rest = torch.where(stored, 0.0, logp.exp()).sum(-1)
    return tgt, share, true_rest, cache.plan.rounding


@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_rest_mass_is_bounded_by_the_rounding(sharp_sampled, store_path, tau):
    cache_path, teacher = sharp_sampled
    tgt, log_share, true_rest, delta = _drawn_share_and_truth(cache_path, teacher, store_path, tau)
    # the case of the issue occurs: stored values whose drawn share rounds up to more than all the mass
    assert (log_share > 0).any()
    rest = tgt.log_rest.double().exp()
    assert torch.isfinite(tgt.log_rest).all()
    assert (rest > 0).all()
    # within what the rounding allows: the drawn share is known within e^{±ε}, ε = δ/τ + δ
    eps = delta * (1 / tau + 1)
    assert ((rest - true_rest).abs() <= 2 * eps + 1e-6).all(), float((rest - true_rest).abs().max())


@pytest.mark.parametrize("args", [
    ["--objective", "reverse_kl", "--temperature", "1"],
    ["--objective", "reverse_kl", "--temperature", "0.5"],
    ["--objective", "reverse_kl", "--temperature", "1", "--alpha", "0.7"],
    ["--objective", "reverse_kl", "--temperature", "1", "--tail-mode", "uniform"],
    ["--objective", "jsd", "--temperature", "2"],
])
def test_reverse_kl_from_a_pure_sampled_cache_is_finite(tmp_path, runner, store_path, sharp_sampled, args):
    cache_path, _ = sharp_sampled
    out = tmp_path / "run"
    r = invoke(runner, ["distill", "--store", store_path, "--cache", cache_path, "-o", out, "--quiet",
                        "--max-steps", "3", "--set", "log_every=1", *STUDENT, *args])
    assert r.exit_code == 0, r.output
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "kd" in m]
    assert len(steps) == 3
    for m in steps:
        assert math.isfinite(m["kd"]) and 0 <= m["kd"] < 50, m
        assert math.isfinite(m["grad_norm"]) and m["grad_norm"] < 1e4, m


def test_a_step_whose_loss_is_not_finite_stops_the_run(tmp_path, runner, store_path, sharp_sampled, monkeypatch):
    """Any run (here a distill step whose KD sum is inf) stops with one sentence and a non-zero exit, before the
    optimizer applies the step; the model saved at the last checkpoint is untouched."""
    from cachekd import student as student_mod

    cache_path, _ = sharp_sampled
    real_step = student_mod.Student.forward_backward_step

    def poisoned(self, micro, norms, scalars, kd_cfg, sync):
        parts = real_step(self, micro, norms, scalars, kd_cfg, sync)
        if getattr(self, "_calls", 0) >= 2:  # the third step
            parts.kd_sum = parts.kd_sum + math.inf
        self._calls = getattr(self, "_calls", 0) + 1
        return parts

    monkeypatch.setattr(student_mod.Student, "forward_backward_step", poisoned)
    out = tmp_path / "run"
    r = invoke(runner, ["distill", "--store", store_path, "--cache", cache_path, "-o", out, "--quiet",
                        "--max-steps", "5", "--objective", "reverse_kl", "--temperature", "1", *STUDENT])
    assert_clean_error(r, "at step 3", "distillation loss is inf", "stops")
    assert not (out / "summary.json").exists()


def test_a_gradient_that_is_not_finite_stops_the_run(tmp_path, runner, store_path, monkeypatch):
    """The same for a gradient norm (a cross-entropy run: every run is guarded, not only distillation)."""
    from cachekd import student as student_mod

    real_backward = student_mod.Student.backward

    def poisoned(self, loss):
        real_backward(self, loss)
        next(iter(self.model.parameters())).grad.fill_(math.nan)

    monkeypatch.setattr(student_mod.Student, "backward", poisoned)
    r = invoke(runner, ["train", "--store", store_path, "-o", tmp_path / "ce", "--quiet", "--max-steps", "2",
                        *STUDENT])
    assert_clean_error(r, "at step 1", "gradient norm is nan")



def test_verify_accepts_rounding_and_reports_more(sharp_sampled, runner):
    """`verify` allows exactly what the rounding allows (the share of the drawn ids up to e^ε, the bound the losses
    use) and reports stored values beyond it."""
    from dataclasses import replace

    from cachekd.cache.reader import LogitCache
    from cachekd.verify import _sampled_problems

    cache_path, _ = sharp_sampled
    r = invoke(runner, ["verify", cache_path])
    assert r.exit_code == 0, r.output
    cache = LogitCache.open(cache_path)
    b = cache.read_chunk("train", 0)[cache.teachers[0]]
    assert not _sampled_problems(cache, b)
    # every tail lowered by 4 rounding steps: beyond the rounding at τ = 1 where a share was near 1
    tail = b.tail_lse - 4 * cache.plan.rounding
    assert any("more mass at τ=1" in p for p in _sampled_problems(cache, replace(b, tail_lse=tail)))


# ------------------------------------------------------------------ a teacher whose outputs are not finite: precompute

@pytest.fixture(scope="module")
def nan_teacher(tmp_path_factory, store_path):
    """A tiny Llama with a NaN in its final norm: every output-layer input and logit is NaN."""
    from transformers import AutoModelForCausalLM

    out = make_teacher(store_path, tmp_path_factory.mktemp("nan") / "teacher", seed=6)
    m = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        m.model.norm.weight[0] = float("nan")
    m.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", [["--top-k", "8"], [], ["--sample", "8"], ["--full"], ["--factored"],
                                  ["--factored", "--factored-rank", "4"], ["--factored", "--factored-dtype", "fp16"]],
                         ids=["top-k", "default", "sampled", "full", "factored", "factored-rank", "factored-fp16"])
def test_a_teacher_with_nan_outputs_is_refused_by_every_storage_kind(tmp_path, runner, store_path, nan_teacher, kind):
    """Every kind refuses with the window named (the check indexed a (B, T) mask as one number, and the factored
    kinds' fit ran a Cholesky on NaN before it) and marks no chunk done."""
    out = tmp_path / "cache"
    r = invoke(runner, ["precompute", "--store", store_path, "--teacher", nan_teacher, "-o", out, "--quiet", *kind])
    assert_clean_error(r, "produced NaN or inf logits on", "window 0", "--dtype fp32")
    assert not _chunk_markers(out)


def test_the_window_named_is_the_first_bad_row_of_the_batch():
    from cachekd.errors import CachekdError
    from cachekd.precompute import _check_finite

    z = torch.zeros(4, 3, 5)
    _check_finite("t", z, "train", range(10, 14))  # finite: nothing
    z[2, 1, 3] = float("inf")
    z[3, 0, 0] = float("nan")
    with pytest.raises(CachekdError, match="train window 12"):
        _check_finite("t", z, "train", range(10, 14))


def test_a_factored_fp16_value_beyond_its_range_is_refused(tmp_path, runner, store_path, teacher_path, monkeypatch):
    """fp16 holds ±65504: a value of h beyond it after the per-dimension scale was stored as inf without a word
    (the rebuilt logits NaN at training time). Forced here with a per-dimension scale of 2⁻³⁰."""
    from cachekd import factored

    monkeypatch.setattr(factored, "fit_dim_scale", lambda h: torch.full((h.shape[-1],), 2.0 ** -30))
    out = tmp_path / "cache"
    r = invoke(runner, ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", out, "--quiet",
                        "--factored", "--factored-dtype", "fp16"])
    assert_clean_error(r, "beyond fp16's range", "window 0", "--factored-dtype int8 or bf16")
    assert not _chunk_markers(out)


def _chunk_markers(cache) -> list:
    """The done-markers of chunks (done/<split>/<chunk>.json) a cache directory holds."""
    return [p for p in (cache / "done").glob("*/*.json")] if (cache / "done").exists() else []


def test_an_fp16_forward_whose_output_layer_overflows_is_refused():
    """Under fp16 autocast the output layer's matmul can overflow (|z| > 65504) with its input h finite: the factored
    kind checked only h there and wrote NaN statistics with exit 0 (found in review)."""
    import types

    from cachekd import precompute as pc
    from cachekd.errors import CachekdError

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
            with torch.no_grad():
                self.emb.weight.fill_(100.0)  # h = 100, z = 4·100·200 = 80,000
                self.head.weight.fill_(200.0)

        def get_output_embeddings(self):
            return self.head

        def forward(self, input_ids):
            return types.SimpleNamespace(logits=self.head(self.emb(input_ids)))

    m, x = Model(), torch.zeros(2, 16, dtype=torch.long)
    layer = pc._Factored(weight=m.head.weight.detach().float(), bias=None, dim_scale=torch.ones(4))
    for dtype in ("int8", "bf16"):
        _, st = pc._factored_targets(m, x, layer, dtype, 10, torch.float16, torch.device("cpu"), True)
        with pytest.raises(CachekdError, match="produced NaN or inf logits on train window 0"):
            pc._check_finite("t", st["finite"], "train", range(2))
        _, st = pc._factored_targets(m, x, layer, dtype, 10, None, torch.device("cpu"), True)  # fp32: finite
        pc._check_finite("t", st["finite"], "train", range(2))
