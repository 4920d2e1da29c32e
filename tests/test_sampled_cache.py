"""Sampled and hybrid caches end to end: contents against the teacher (float64), counts summing to N, the same
bytes after kill -9 / resume, with --part, under torchrun and with another batch size; info, verify; distill from
them; every refusal one sentence through the CLI; top-k caches still read and train as before."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cachekd.cache.reader import LogitCache
from cachekd.tokens import TokenStore
from tests.conftest import assert_clean_error, invoke, make_teacher
from tests.test_cache import _big_store, _precompute, _teacher_logits, precompute_killed_mid_run

SAMPLE_ARRAYS = ("ids", "logprobs", "tail_lse", "sample_ids", "sample_logprobs", "sample_counts", "entropy")


def _arrays(cache: LogitCache) -> dict[str, np.ndarray]:
    import zarr

    out = {}
    for split in cache.splits():
        for t in cache.teachers:
            for name in SAMPLE_ARRAYS:
                p = cache.path / split / t / name
                if p.exists():
                    out[f"{split}/{t}/{name}"] = zarr.open_array(str(p), mode="r")[:]
    return out


def _assert_same(a: LogitCache, b: LogitCache) -> None:
    x, y = _arrays(a), _arrays(b)
    assert x.keys() == y.keys() and x
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("extra", [["--sample", "12"], ["--top-k", "4", "--sample", "12"],
                                   ["--sample", "12", "--proposal-temperature", "1"]])
def test_contents_against_the_teacher(tmp_path, runner, store_path, teacher_path, extra):
    cache = _precompute(runner, store_path, [teacher_path], tmp_path / "c", "--temperatures", "1,2", *extra)
    store = TokenStore.open(store_path)
    n = store.num_windows("dev")
    z = _teacher_logits(teacher_path, store.read("dev", 0, n))             # (n, L, V) float64
    logp = torch.log_softmax(z, -1).numpy()
    b = cache.read("dev", 0, n)[cache.teachers[0]]
    k = 4 if "--top-k" in extra else 0
    counts = b.sample_counts
    assert (counts.sum(-2) == 12).all()                                    # N draws per proposal
    real = counts.sum(-1) > 0
    lp_at = np.take_along_axis(logp, b.sample_ids, -1)
    assert np.abs(np.where(real, b.sample_logprobs - lp_at, 0)).max() <= 2**-10 + 1e-6
    ids = np.where(real, b.sample_ids, -1)
    for row in ids.reshape(-1, ids.shape[-1]):                             # distinct, sorted, pads last
        r = row[row >= 0]
        assert (np.diff(r) > 0).all() and (row[len(r):] == -1).all()
    exact = np.zeros(logp.shape, dtype=bool)
    if k:
        np.put_along_axis(exact, b.ids, True, -1)
        drawn = np.zeros(logp.shape, dtype=bool)
        np.put_along_axis(drawn, np.where(real, b.sample_ids, b.ids[..., :1]), True, -1)
        np.put_along_axis(drawn, b.ids[..., :1], False, -1)
        assert not (drawn & exact).any()                                   # draws come from beyond the top-k
    for ti, tau in enumerate((1.0, 2.0)):
        s = logp / tau
        ref_tail = np.logaddexp.reduce(np.where(exact, -np.inf, s), axis=-1)
        assert np.abs(b.tail_lse[..., ti] - ref_tail).max() <= 2**-10 + 1e-5
        p = np.exp(s - np.logaddexp.reduce(s, axis=-1, keepdims=True))
        ent = -(p * np.log(p)).sum(-1)
        assert np.abs(b.entropy[..., ti] - ent).max() <= 2**-10 + 1e-4
    info = json.loads(invoke(runner, ["info", tmp_path / "c", "--json"]).output)
    assert info["mode"] == "sampled" and ("hybrid top-4" if k else "sampled N=12") in info["storage_kind"]
    assert set(info["bytes_per_array"]) >= {"sample_ids", "sample_counts", "entropy"}
    assert 1 <= info["teacher_stats"][f"dev/{cache.teachers[0]}"]["distinct_ids_per_position"] <= 24
    r = invoke(runner, ["verify", tmp_path / "c", "--recompute", "3"])
    assert r.exit_code == 0 and "OK" in r.output, r.output


def test_same_bytes_for_parts_torchrun_and_batch_size(tmp_path, runner, store_path, teacher_path):
    flags = ["--top-k", "2", "--sample", "10", "--temperatures", "1,2"]
    ref = _precompute(runner, store_path, [teacher_path], tmp_path / "ref", *flags)
    other = _precompute(runner, store_path, [teacher_path], tmp_path / "b3", *flags, "--batch-size", "3")
    _assert_same(ref, other)
    parts = tmp_path / "parts"
    r1 = invoke(runner, ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", parts, *flags,
                         "--part", "1/2", "--quiet"])
    assert r1.exit_code == 0, r1.output
    _assert_same(ref, _precompute(runner, store_path, [teacher_path], parts, *flags, "--part", "2/2"))
    tr = tmp_path / "torchrun"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "cachekd_cli", "precompute", "--store", str(store_path), "--teacher", str(teacher_path),
                        "-o", str(tr), *flags, "--quiet"], env=dict(os.environ, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    _assert_same(ref, LogitCache.open(tr))
    # another seed draws other ids
    seeded = _precompute(runner, store_path, [teacher_path], tmp_path / "s1", *flags, "--sample-seed", "1")
    assert not np.array_equal(_arrays(ref)["train/teacher_a/sample_ids"], _arrays(seeded)["train/teacher_a/sample_ids"])


def test_resume_after_kill_gives_identical_arrays(tmp_path, runner):
    store = _big_store(tmp_path)
    teacher = make_teacher(store, tmp_path / "t", hidden=32)
    flags = ["--sample", "16", "--temperatures", "1,2"]
    ref = _precompute(runner, store, [teacher], tmp_path / "ref", *flags)
    out, cmd = precompute_killed_mid_run(store, teacher, tmp_path / "killed", flags)
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    _assert_same(ref, LogitCache.open(out))


def test_distill_from_sampled_and_hybrid_caches(tmp_path, runner, store_path, teacher_path, teacher_b_path):
    base = ["distill", "--store", store_path, "--quiet", "--max-steps", "2", "--set", "model.hidden_size=32",
            "--set", "model.num_layers=1", "--set", "model.num_heads=2", "--set", "model.intermediate_size=32",
            "--batch-size", "4"]
    _precompute(runner, store_path, [teacher_path], tmp_path / "s", "--sample", "8", "--temperatures", "1,2")
    _precompute(runner, store_path, [teacher_path], tmp_path / "h", "--top-k", "3", "--sample", "8",
                "--temperatures", "2", "--proposal-temperature", "2")
    for cache, objective, tau in (("s", "forward_kl", "2"), ("s", "reverse_kl", "1"), ("h", "jsd", "2")):
        out = tmp_path / f"run-{cache}-{objective}"
        r = invoke(runner, base + ["--cache", tmp_path / cache, "-o", out, "--objective", objective,
                                   "--temperature", tau])
        assert r.exit_code == 0, r.output
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    r = invoke(runner, base + ["--cache", tmp_path / "s", "-o", tmp_path / "r1", "--temperature", "3"])
    assert_clean_error(r, "sampled cache", "not 3")
    # mixing (ChooBaCa) from a sampled and a hybrid cache: the uniform-tail form of the target
    _precompute(runner, store_path, [teacher_path], tmp_path / "h1", "--top-k", "3", "--sample", "8",
                "--temperatures", "1")
    for cache in ("s", "h1"):
        out = tmp_path / f"mix-{cache}"
        r = invoke(runner, base + ["--cache", tmp_path / cache, "-o", out, "--objective", "reverse_kl",
                                   "--temperature", "1", "--alpha", "0.5"])
        assert r.exit_code == 0, r.output
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert any("loss" in m for m in metrics) and all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    # two sampled teachers combined by logits (one dense target of their uniform-tail forms)
    _precompute(runner, store_path, [teacher_path, teacher_b_path], tmp_path / "s2", "--sample", "8",
                "--temperatures", "1")
    out = tmp_path / "combine"
    r = invoke(runner, base + ["--cache", tmp_path / "s2", "-o", out, "--objective", "forward_kl", "--temperature",
                               "1", "--teacher-combine", "logits"])
    assert r.exit_code == 0, r.output
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics) and all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)


def test_refusals(tmp_path, runner, store_path, teacher_path):
    base = ["precompute", "--store", store_path, "--teacher", teacher_path, "--quiet"]
    assert_clean_error(invoke(runner, base + ["-o", tmp_path / "a", "--sample", "0"]), "--sample")
    assert_clean_error(invoke(runner, base + ["-o", tmp_path / "b", "--sample", "5", "--proposal-temperature", "0"]),
                       "--proposal-temperature must be a positive number")
    assert_clean_error(invoke(runner, base + ["-o", tmp_path / "c", "--sample", "5", "--proposal-temperature", "3"]),
                       "must be one of --temperatures")
    assert_clean_error(invoke(runner, base + ["-o", tmp_path / "d", "--top-k", "4", "--proposal-temperature", "1"]),
                       "needs --sample")
    assert_clean_error(invoke(runner, base + ["-o", tmp_path / "e", "--sample", "5", "--full"]), "exclude")
    assert_clean_error(invoke(runner, base + ["-o", tmp_path / "f", "--sample", "5", "--top-k", "300"]),
                       "leaves no tokens")


def test_eval_against_a_sampled_cache_and_repair_command(tmp_path, runner, store_path, teacher_path, teacher_b_path):
    """A teacher scored against its own sampled cache: the unbiased KL estimate is ≈ 0 (a divergence, not the
    cross-entropy); another model's is clearly positive. verify's repair command recreates the sampled plan."""
    from cachekd.verify import precompute_command
    from cachekd.evaluate import evaluate

    c = tmp_path / "s"
    cache = _precompute(runner, store_path, [teacher_path], c, "--sample", "16", "--temperatures", "1,2",
                        "--proposal-temperature", "1", "--sample-seed", "3")
    same = evaluate(teacher_path, dev_store=store_path, against_cache=c, progress=False)["against_cache"]
    (res,) = same["teachers"].values()
    assert abs(res["kl"]) < 5e-3 and "unbiased estimate" in same["kl_kind"]
    other = evaluate(teacher_b_path, dev_store=store_path, against_cache=c, progress=False)["against_cache"]
    (res_b,) = other["teachers"].values()
    assert res_b["kl"] > 10 * max(abs(res["kl"]), 1e-4)
    cmd = precompute_command(cache)
    assert "--sample 16 --proposal-temperature 1 --sample-seed 3" in cmd and "--top-k 0" in cmd


def test_verify_finds_what_no_sampled_cache_holds(tmp_path, runner, store_path, teacher_path):
    """The sampled checks of verify on a decoded chunk: counts not summing to N, unsorted or repeated ids, draws
    inside the exact top-k, and drawn mass beyond the normaliser (weights that would be wrong)."""
    from dataclasses import replace

    from cachekd.verify import _sampled_problems

    cache = _precompute(runner, store_path, [teacher_path], tmp_path / "h", "--top-k", "2", "--sample", "6",
                        "--temperatures", "1,2")
    b = cache.read_chunk("train", 0)[cache.teachers[0]]
    assert _sampled_problems(cache, b) == []
    counts = b.sample_counts.copy()
    counts[0, 0, 0, 0] += 1
    assert any("do not sum to 6" in p for p in _sampled_problems(cache, replace(b, sample_counts=counts)))
    ids = b.sample_ids.copy()
    ids[0, 0, 1] = ids[0, 0, 0]
    assert any("sorted and distinct" in p for p in _sampled_problems(cache, replace(b, sample_ids=ids)))
    ids = b.sample_ids.copy()
    ids[0, 0, 0] = b.ids[0, 0, 0]
    assert any("inside the exact top-k" in p for p in _sampled_problems(cache, replace(b, sample_ids=np.sort(ids, -1))))
    tail = b.tail_lse.copy()
    tail[0, 0, :] -= 10.0  # a normaliser far too small for the drawn ids' mass
    assert any("more mass" in p for p in _sampled_problems(cache, replace(b, tail_lse=tail)))


def test_topk_caches_keep_their_format(tmp_path, runner, store_path, teacher_path):
    """A top-k cache is written exactly as before sampled caches existed (no `sample` entry, the same arrays), so
    caches written by earlier versions read and resume unchanged; info names the storage kind."""
    cache = _precompute(runner, store_path, [teacher_path], tmp_path / "t", "--top-k", "4")
    for name in ("plan.json", "manifest.json"):
        assert "sample" not in json.loads((tmp_path / "t" / name).read_text())
    assert sorted(p.name for p in (tmp_path / "t" / "train" / cache.teachers[0]).iterdir() if p.is_dir()) == \
        ["ids", "logprobs", "tail_lse"]
    assert cache.plan.sample_spec is None and cache.plan.storage_kind == "top-4"
    b = cache.read("train", 0, 2)[cache.teachers[0]]
    assert b.sample_ids is None and b.ids.shape == (2, 16, 4)


def test_draws_from_a_tail_that_underflows_relative_to_the_top():
    """A teacher whose tail beyond the exact top-K is e^-120 of its top (float32 exponentials taken relative to the
    row maximum are all 0 there): the draws still come from the tail, in proportion to its own shape, never from
    the top-K; a row without that gap keeps the direct path. Frequencies against the exact tail distribution."""
    import numpy as np
    import torch

    from cachekd.teacher_samples import sampled_teacher_targets

    vocab, k, n_draws = 40, 4, 4000
    z = torch.zeros(1, 2, vocab)
    z[0, :, :k] = 120.0  # the top-K, far above the rest
    tail_logits = torch.linspace(0.0, 3.0, vocab - k)
    z[0, :, k:] = tail_logits
    z[0, 1, :k] = 2.0  # the second position: no gap
    arrays, _ = sampled_teacher_targets(z, vocab, k, [1.0], n_draws, None, 0, np.arange(1))
    ids, counts = arrays["sample_ids"][0, 0], arrays["sample_counts"][0, 0, :, 0]
    assert int(counts.sum()) == n_draws and bool((ids[counts > 0] >= k).all())
    freq = torch.zeros(vocab, dtype=torch.float64).index_add_(0, ids, counts.double()) / n_draws
    expected = torch.softmax(tail_logits.double(), 0)
    assert float((freq[k:] - expected).abs().max()) < 0.02  # ~4 sd of a frequency near 0.06 at N = 4000
    top2 = set(arrays["ids"][0, 1].tolist())  # (the second position's top-K: the largest tail logits)
    ids2, counts2 = arrays["sample_ids"][0, 1], arrays["sample_counts"][0, 1, :, 0]
    assert top2 == set(range(vocab - k, vocab)) and int(counts2.sum()) == n_draws
    assert not top2 & set(ids2[counts2 > 0].tolist())
