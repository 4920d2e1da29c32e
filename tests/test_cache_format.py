"""The cache's typed plan and manifest read and write exactly the JSON of caches already on disk (old caches still
read), array descriptors match the layout, and the done-marker listing."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from cachekd.cache import format as fmt
from cachekd.errors import CachekdError

# plan.json as precompute wrote it before the typed plan existed (keys and values copied from a real cache)
OLD_PLAN = {
    "encoding": {"ids": "sorted, delta", "logits": "float16", "logprob_scale": 512.0,
                 "logprobs": "uint16 fixed point", "tail_lse": "int16 fixed point, 1/512 nat"},
    "format": "cachekd-logit-cache",
    "format_version": 1,
    "k": 8,
    "mode": "topk",
    "splits": {"dev": 3, "train": 70},
    "teachers": [{"fingerprint": "ab" * 32, "model_num_params": None, "model_type": "llama",
                  "model_vocab_size": 260, "name": "t0", "num_params": 12345, "padded_logits_dropped": 0,
                  "path": "/somewhere/t0"}],
    "temperatures": [1.0, 2.0],
    "token_store": {"chunk_windows": 32, "fingerprint": "cd" * 32, "path": "/somewhere/store", "seq_len": 16,
                    "tokenizer_fingerprint": "ef" * 32, "vocab_size": 260},
}
OLD_MANIFEST = dict(OLD_PLAN, complete=True, finished="2026-01-01T00:00:00Z", cachekd_version="0.1.0",
                    stats={"train": {"t0": {"positions": 1120, "entropy_mean": 3.0}}}, bytes_on_disk=12345,
                    bytes_per_position=10.5)


def test_plan_and_manifest_round_trip_the_old_json_exactly():
    assert fmt.CachePlan.from_dict(copy.deepcopy(OLD_PLAN)).to_dict() == OLD_PLAN
    assert fmt.CacheManifest.from_dict(copy.deepcopy(OLD_MANIFEST)).to_dict() == OLD_MANIFEST
    # a plan without the encoding entry (written before it was recorded) and with a key this version does not
    # know: both survive a read and a write unchanged, and the default scale applies
    older = {k: v for k, v in OLD_PLAN.items() if k != "encoding"} | {"future_key": [1, 2]}
    plan = fmt.CachePlan.from_dict(copy.deepcopy(older))
    assert plan.to_dict() == older and plan.logprob_scale == fmt.LOGPROB_SCALE
    assert json.loads(json.dumps(plan.to_dict())) == older


def test_manifest_of_plan_keeps_the_plan_and_adds_the_facts():
    plan = fmt.CachePlan.from_dict(copy.deepcopy(OLD_PLAN))
    m = fmt.CacheManifest.of_plan(plan, complete=True, finished="2026-01-01T00:00:00Z", cachekd_version="0.1.0",
                                  stats=OLD_MANIFEST["stats"], bytes_on_disk=12345, bytes_per_position=10.5)
    assert m.to_dict() == OLD_MANIFEST
    assert m.identity() == plan.identity()


def test_identity_and_difference():
    a = fmt.CachePlan.from_dict(copy.deepcopy(OLD_PLAN))
    moved = copy.deepcopy(OLD_PLAN)
    moved["token_store"]["path"] = "/elsewhere"
    moved["teachers"][0]["path"] = "/elsewhere/t0"
    b = fmt.CachePlan.from_dict(moved)
    assert a.identity() == b.identity() and a.difference(b) == ""  # paths may change between runs
    other_k = fmt.CachePlan.from_dict(dict(copy.deepcopy(OLD_PLAN), k=16))
    assert a.difference(other_k) == "k 8 vs 16"
    other_store = copy.deepcopy(OLD_PLAN)
    other_store["token_store"]["fingerprint"] = "00" * 32
    assert a.difference(fmt.CachePlan.from_dict(other_store)) == "it was built from another token store"


def test_a_plan_missing_a_key_is_one_sentence():
    broken = {k: v for k, v in OLD_PLAN.items() if k != "splits"}
    with pytest.raises(CachekdError, match="lacks the entry 'splits'"):
        fmt.CachePlan.from_dict(broken)
    with pytest.raises(CachekdError, match="lacks the entry 'token_store.fingerprint'"):
        fmt.CachePlan.from_dict(dict(OLD_PLAN, token_store={"path": "x"}))
    with pytest.raises(CachekdError, match="'teachers' entry that is not a JSON list"):
        fmt.CachePlan.from_dict(dict(OLD_PLAN, teachers="t0"))
    with pytest.raises(CachekdError, match="not a JSON object"):
        fmt.CacheManifest.from_dict([1, 2])


def test_array_specs_follow_the_layout():
    plan = fmt.CachePlan.from_dict(copy.deepcopy(OLD_PLAN))
    specs = {s.name: s for s in plan.array_specs("train")}
    assert list(specs) == list(fmt.array_names("topk"))
    assert specs["ids"].shape == (70, 16, 8) and specs["ids"].chunks == (32, 16, 8)
    assert specs["ids"].dtype == np.uint16 and specs["logprobs"].dtype == np.uint16
    assert specs["tail_lse"].shape == (70, 16, 2) and specs["tail_lse"].dtype == np.int16
    assert plan.num_chunks("train") == 3 and plan.chunk_range("train", 2) == (64, 70)
    full = fmt.CachePlan.from_dict(dict(copy.deepcopy(OLD_PLAN), mode="full", k=None, temperatures=[]))
    (logits,) = full.array_specs("dev")
    assert logits.name == "logits" and logits.shape == (3, 16, 260) and logits.dtype == np.float16
    assert logits.chunks[0] == fmt.full_chunk_windows(32, 16, 260)


def test_done_marker_listing(tmp_path):
    assert fmt.done_chunks(tmp_path, "train") == [] and fmt.pending_chunks(tmp_path, "train", 3) == [0, 1, 2]
    for c in (0, 2):
        fmt.done_path(tmp_path, "train", c).parent.mkdir(parents=True, exist_ok=True)
        fmt.done_path(tmp_path, "train", c).write_text("{}")
    assert fmt.done_chunks(tmp_path, "train") == [0, 2]
    assert fmt.pending_chunks(tmp_path, "train", 3) == [1]
    assert fmt.done_path(tmp_path, "dev", 5).relative_to(tmp_path).as_posix() == "done/dev/0000005.json"
