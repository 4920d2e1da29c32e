"""cachekd audit: the cache's own targets against the teacher re-run, beside simulated storage options."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from cachekd.audit import AuditOptions, audit_targets
from tests.conftest import assert_clean_error, invoke
from tests.test_cache import _precompute


def test_audit_cli_full_and_sampled(tmp_path, runner, store_path, teacher_path):
    _precompute(runner, store_path, [teacher_path], tmp_path / "full", "--full")
    r = invoke(runner, ["audit", tmp_path / "full", "--positions", "40", "--temperatures", "2", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    own = rep["options"]["cache (full logits)"]["2"]
    assert rep["teacher_matches_cache"] and rep["positions"] >= 40
    # full logits: the whole mass, nothing lost, the same gradient (fp16 storage only)
    assert abs(own["captured_mass"] - 1) < 1e-5 and own["kl_full_to_target"] < 1e-6 and own["grad_angle_deg"] < 0.5
    assert math.isinf(rep["options"]["top-64 renormalize"]["2"]["kl_full_to_target"])
    _precompute(runner, store_path, [teacher_path], tmp_path / "s", "--sample", "8", "--temperatures", "1")
    r = invoke(runner, ["audit", tmp_path / "s", "--positions", "30", "--objective", "reverse_kl"])
    assert r.exit_code == 0 and "cache (sampled N=8)" in r.output and "hybrid top-16 + sampled N=50" in r.output
    assert_clean_error(invoke(runner, ["audit", tmp_path / "s", "--temperatures", "2"]), "not 2")
    assert_clean_error(invoke(runner, ["audit", tmp_path / "s", "--sample", "0"]), "--sample")


def test_audit_targets_angles_shrink_with_more_draws():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 9, 40, generator=g) * 3
    s = torch.randn(4, 9, 40, generator=g)
    small = audit_targets(z, s, [1.0], AuditOptions(top_k=4, sample=4, hybrid_top_k=2))
    big = audit_targets(z, s, [1.0], AuditOptions(top_k=40, sample=4000, hybrid_top_k=2))
    assert big["sampled N=4000"]["1"]["grad_angle_deg"] < 5 < small["sampled N=4"]["1"]["grad_angle_deg"]
    assert big["top-40 bucket"]["1"]["grad_angle_deg"] < 1e-2 and big["top-40 bucket"]["1"]["kl_full_to_target"] < 1e-6
    assert np.isclose(big["top-40 renormalize"]["1"]["captured_mass"], 1.0)
