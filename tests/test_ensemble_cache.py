"""`precompute --ensemble logits|probs`: several teachers cached as one exact combined teacher (Baby Llama's
target), rebuilt from its members by verify --recompute, --repair and audit; refusals."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import assert_clean_error, invoke

f64 = torch.float64


def _member_logp(path: Path, x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float64 log-probabilities of one teacher over the store's vocabulary, loaded here independently."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path / "model" if (path / "model").is_dir() else path).eval()
    with torch.inference_mode():
        z = m(input_ids=x).logits[..., :vocab_size].double()
    return torch.log_softmax(z, -1)


@pytest.mark.parametrize("combine,weights", [("logits", None), ("probs", "1,3")])
def test_full_ensemble_cache_is_the_exact_combination(tmp_path, runner, store_path, teacher_path, teacher_b_path,
                                                     combine, weights):
    """A --full ensemble cache holds the combined log-probabilities: logits Σ w_i log p_i renormalised, probs
    log Σ w_i p_i, against a float64 reference from the two teachers loaded separately."""
    from cachekd.cache.reader import LogitCache
    from cachekd.tokens import TokenStore

    out = tmp_path / "cache"
    args = ["precompute", "--store", store_path, "--teacher", teacher_path, "--teacher", teacher_b_path, "-o", out,
            "--full", "--splits", "dev", "--ensemble", combine, "--quiet"]
    r = invoke(runner, args + (["--ensemble-weights", weights] if weights else []))
    assert r.exit_code == 0, r.output
    cache = LogitCache.open(out)
    assert cache.teachers == ["ensemble"]
    info = cache.plan.teachers[0]
    assert [m["path"] for m in info["members"]] == [str(Path(p).resolve() / "model") if (Path(p) / "model").is_dir()
                                                    else str(Path(p).resolve()) for p in (teacher_path, teacher_b_path)]
    w = np.array([1.0, 3.0]) / 4 if weights else np.array([0.5, 0.5])
    assert info["combine"] == combine and np.allclose(info["weights"], w)
    store = TokenStore.open(store_path)
    n = min(4, store.num_windows("dev"))
    x = torch.from_numpy(store.read("dev", 0, n).astype(np.int64))
    la, lb = (_member_logp(Path(p), x, store.vocab_size) for p in (teacher_path, teacher_b_path))
    if combine == "logits":
        ref = torch.log_softmax(w[0] * la + w[1] * lb, -1)
    else:
        ref = torch.logaddexp(math.log(w[0]) + la, math.log(w[1]) + lb)
    got = torch.log_softmax(torch.from_numpy(cache.read("dev", 0, n)["ensemble"].logits.astype(np.float32)).double(), -1)
    # fp16 storage: half a step of 11 significant bits of |logit| (the combined logits are log-probabilities ≤ ~10)
    assert float((got - ref).abs().max()) < 2 * float(ref.abs().max()) * 2.0**-11 + 1e-4


def test_ensemble_hybrid_cache_verifies_recomputes_and_trains(tmp_path, runner, store_path, teacher_path,
                                                             teacher_b_path):
    """The default (hybrid) storage of an ensemble: verify --recompute rebuilds the ensemble from its members and
    passes; the repair command names both members and --ensemble, and re-running it resumes the same cache; audit
    rebuilds the teacher; a student distils from it; --online from it is refused with what to do instead."""
    from cachekd.cache.reader import LogitCache
    from cachekd.verify import precompute_command

    out = tmp_path / "cache"
    r = invoke(runner, ["precompute", "--store", store_path, "--teacher", f"ta={teacher_path}", "--teacher",
                        f"tb={teacher_b_path}", "-o", out, "--ensemble", "logits", "--quiet"])
    assert r.exit_code == 0, r.output
    cache = LogitCache.open(out)
    assert cache.plan.storage_kind.startswith("hybrid") and cache.teachers == ["ensemble"]
    r = invoke(runner, ["verify", out, "--recompute", "3", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.output)["recompute"]["ensemble"]
    assert "skipped" not in rec, rec
    cmd = precompute_command(cache)
    assert "--ensemble logits" in cmd and "ta=" in cmd and "tb=" in cmd
    r = invoke(runner, shlex.split(cmd)[1:] + ["--quiet"])  # the same plan: resumes (nothing to do), no --force
    assert r.exit_code == 0, r.output
    r = invoke(runner, ["audit", out, "--positions", "40", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["teacher_matches_cache"] is True
    base = ["distill", "--store", store_path, "--cache", out, "--quiet", "--max-steps", "2", "--batch-size", "4",
            "--set", "model.hidden_size=32", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
            "--set", "model.intermediate_size=32"]
    r = invoke(runner, base + ["-o", tmp_path / "student", "--temperature", "2"])
    assert r.exit_code == 0, r.output
    r = invoke(runner, base + ["-o", tmp_path / "online", "--online"])
    assert_clean_error(r, "ensemble", "--teacher-combine logits")
    assert not (tmp_path / "online").exists()


def test_ensemble_refusals(tmp_path, runner, store_path, teacher_path, teacher_b_path):
    base = ["precompute", "--store", store_path, "--teacher", teacher_path, "--quiet"]
    two = base + ["--teacher", teacher_b_path]
    cases = [
        (base + ["-o", tmp_path / "c1", "--ensemble", "logits"], ("at least two --teacher",)),
        (two + ["-o", tmp_path / "c2", "--ensemble-weights", "1,2"], ("--ensemble-weights needs --ensemble",)),
        (two + ["-o", tmp_path / "c3", "--ensemble", "logits", "--ensemble-weights", "1,2,3"], ("one weight per",)),
        (two + ["-o", tmp_path / "c4", "--ensemble", "probs", "--ensemble-weights", "1,-1"], ("≥ 0",)),
        (two + ["-o", tmp_path / "c5", "--ensemble", "probs", "--ensemble-weights", "0,0"], ("positive sum",)),
        (two + ["-o", tmp_path / "c6", "--ensemble", "median"], ("median",)),
    ]
    for args, fragments in cases:
        r = invoke(runner, args)
        assert_clean_error(r, *fragments)
        assert not Path(args[args.index("-o") + 1]).exists()
