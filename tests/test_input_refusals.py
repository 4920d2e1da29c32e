"""Bad inputs of issue 20 ("Tracebacks and silent acceptances", item 6, "Cosmetic"): each is one sentence and a
non-zero exit, no traceback, nothing written; and the silent acceptances now refused or said."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_clean_error, invoke


def _precompute(runner, store_path, teacher_path, out, *extra):
    r = invoke(runner, ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", out, "--quiet", *extra])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, store_path, teacher_path):
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("caches") / "topk"
    return _precompute(CliRunner(), store_path, teacher_path, out, "--top-k", "8", "--splits", "train,dev")


# ------------------------------------------------------------------------------------------ options given twice


@pytest.mark.parametrize("args,option", [
    (["precompute", "--store", "S", "--teacher", "T", "-o", "OUT", "--temperatures", "1", "--temperatures", "2"],
     "--temperatures"),
    (["precompute", "--store", "S", "--teacher", "T", "-o", "OUT", "--top-k", "4", "--top-k", "8"], "--top-k"),
    (["distill", "--store", "S", "--cache", "C", "-o", "OUT", "--lr", "1", "--lr", "2"], "--lr"),
    (["verify", "OUT", "--seed", "1", "--seed", "2"], "--seed"),
    (["audit", "OUT", "--top-k", "4", "--top-k", "8"], "--top-k"),
    (["cohort", "-c", "a", "--config", "b", "-o", "OUT"], "--config"),
    (["cohort", "search", "-c", "a", "-c", "b", "-o", "OUT"], "--config"),
    (["eval", "OUT", "--dev", "a", "--dev", "b"], "--dev"),
])
def test_an_option_given_twice_is_refused(tmp_path, runner, args, option):
    """click kept the last value: `--temperatures 1 --temperatures 2` cached τ=2 only, without a word."""
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    r = invoke(runner, args)
    assert_clean_error(r, f"{option} is given 2 times", "give it once")
    assert r.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_options_that_collect_values_may_repeat(tmp_path, runner, store_path, teacher_path, teacher_b_path):
    """`--teacher` (multiple) still takes several values; a plain flag repeated (`--quiet`) loses nothing."""
    r = invoke(runner, ["precompute", "--store", store_path, "--teacher", teacher_path, "--teacher", teacher_b_path,
                        "-o", tmp_path / "c", "--top-k", "4", "--splits", "dev", "--quiet", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "c" / "plan.json").read_text())
    assert len(plan["teachers"]) == 2


# ------------------------------------------------------------------------------------------------- precompute


@pytest.mark.parametrize("extra,fragments", [
    (["--sample", "5", "--sample-seed", "-1"], ["--sample-seed", "-1"]),
    (["--splits", ","], ["--splits", "empty entry"]),
    (["--splits", "train,,dev"], ["--splits", "empty entry"]),
    (["--top-k", "4", "--temperatures", "1,,2"], ["--temperatures", "empty entry"]),
    (["--proposal-temperature", "1"], ["--proposal-temperature needs --sample"]),
    (["--top-k", "8", "--temperatures", "0.02,1"], ["--temperatures 0.02 is below 0.12", "300 tokens", "-64 nats"]),
    (["--sample", "8", "--temperatures", "0.05"], ["--temperatures 0.05 is below 0.12"]),
])
def test_precompute_option_refusals(tmp_path, runner, store_path, teacher_path, extra, fragments):
    """A negative seed failed inside numpy after the cache was created (the corrected command then met a cache
    "begun with other settings"); ',' made a complete cache of nothing; '1,,2' dropped an entry; the proposal τ
    was accepted without --sample (with the default storage); τ=0.02 was clipped at −64 nats."""
    r = invoke(runner, ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", tmp_path / "c",
                        "--quiet", *extra])
    assert_clean_error(r, *fragments)
    assert not (tmp_path / "c").exists()


def test_ensemble_weight_refusals_and_an_overflowing_sum(tmp_path, runner, store_path, teacher_path, teacher_b_path):
    """'1,,2' was read as 1,2; 1e308,1e308 (finite weights whose sum overflows) failed with a TypeError after
    the cache was created. They are equal weights."""
    base = ["precompute", "--store", store_path, "--teacher", teacher_path, "--teacher", teacher_b_path,
            "--ensemble", "logits", "--top-k", "4", "--splits", "dev", "--quiet"]
    assert_clean_error(invoke(runner, base + ["-o", tmp_path / "a", "--ensemble-weights", "1,,2"]),
                       "--ensemble-weights", "empty entry")
    assert not (tmp_path / "a").exists()
    r = invoke(runner, base + ["-o", tmp_path / "b", "--ensemble-weights", "1e308,1e308"])
    assert r.exit_code == 0, r.output
    (info,) = json.loads((tmp_path / "b" / "plan.json").read_text())["teachers"]
    assert info["weights"] == [0.5, 0.5]


def test_min_temperature_bound_against_a_float64_reference():
    """The bound: a tail clipped to the smallest stored value counts for at most 2⁻²⁴ of the tempered mass."""
    from cachekd.cache import encoding as enc

    for V in (300, 32000, 128256):
        tau = enc.min_temperature(V)
        clipped_share_worst = math.exp(-32767 / 512 + math.log(V) / tau)  # top token's term ≥ V^(−1/τ)
        assert clipped_share_worst == pytest.approx(2.0 ** -24, rel=1e-9)
    assert enc.min_temperature(300) == pytest.approx(math.log(300) / (32767 / 512 - 24 * math.log(2)))


def test_verify_recompute_accepts_a_tail_clipped_by_design(tmp_path, store_path, teacher_path):
    """At an allowed τ a tail below −64 nats is stored clipped; verify --recompute compared it with the unclipped
    value and called the cache damaged. A sharp teacher (scaled logits) gives such tails at τ=1."""
    import torch

    from cachekd.verify import verify_path
    from cachekd.models import load_model
    from cachekd.precompute import PrecomputeConfig, precompute

    sharp = tmp_path / "sharp"
    model = load_model(teacher_path)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(400.0)
    model.save_pretrained(sharp)
    for f in Path(teacher_path).glob("tokenizer*"):
        (sharp / f.name).write_bytes(f.read_bytes())
    cache = tmp_path / "c"
    precompute(PrecomputeConfig(store=str(store_path), teachers=[str(sharp)], output=str(cache), top_k=4,
                                temperatures=[1.0], splits=["train"], device="cpu"), progress=False)
    from cachekd.cache.reader import LogitCache

    tail = LogitCache.open(cache).read_chunk("train", 0)["sharp"].tail_lse
    assert (tail <= -63.99).any(), float(tail.min())  # clipped positions exist
    report = verify_path(cache, recompute=4, seed=0, progress=False)
    assert report["ok"], report["problems"]


def test_precompute_config_refusals_in_the_library():
    from cachekd.errors import CachekdError, ConfigFieldError
    from cachekd.precompute import PrecomputeConfig

    with pytest.raises(ConfigFieldError, match=r"sample_seed must be an integer ≥ 0 \(got -1\)"):
        PrecomputeConfig(sample=5, sample_seed=-1)
    with pytest.raises(CachekdError, match="at least one split"):
        PrecomputeConfig(splits=[])
    with pytest.raises(CachekdError, match="proposal_temperature needs sample") as info:
        PrecomputeConfig(proposal_temperature=1.0)
    # the library names config fields; the CLI names the options that set them, in the same sentence
    from cachekd_cli.config_options import error_message
    assert error_message(info.value, "precompute") == "--proposal-temperature needs --sample N."


# ------------------------------------------------------------------------------------------- verify and audit


def test_verify_recompute_fails_when_a_teacher_is_gone(tmp_path, runner, store_path, teacher_path):
    """It printed "skipped" and then OK with exit 0: a requested check that did not run is not a pass."""
    import shutil

    gone = tmp_path / "gone"
    shutil.copytree(teacher_path, gone)
    cache = _precompute(runner, store_path, gone, tmp_path / "c", "--top-k", "4", "--splits", "dev")
    shutil.rmtree(gone)
    r = invoke(runner, ["verify", cache, "--recompute", "2", "--quiet"])
    assert r.exit_code == 1, r.output
    assert "--recompute could not check teacher 'gone'" in r.output and "OK" not in r.output.splitlines()[-1]
    assert "Traceback" not in r.output


@pytest.mark.parametrize("command", [["verify", "CACHE", "--recompute", "2"], ["audit", "CACHE"]])
def test_negative_seeds_name_the_option(runner, topk_cache, command):
    """numpy's "expected non-negative integer", without the option's name (a traceback from verify)."""
    r = invoke(runner, [topk_cache if a == "CACHE" else a for a in command] + ["--seed", "-1"])
    assert_clean_error(r, "--seed", "-1")


def test_audit_refusals(tmp_path, runner, store_path, topk_cache):
    """--hybrid-top-k ≥ V became K = V − 1; a student of another vocabulary was accepted."""
    from tests.conftest import make_teacher

    r = invoke(runner, ["audit", topk_cache, "--hybrid-top-k", "300", "--positions", "16"])
    assert_clean_error(r, "--hybrid-top-k 300 leaves no tokens to draw from", "300")
    small = make_teacher(store_path, tmp_path / "small", extra_vocab=-10)
    assert_clean_error(invoke(runner, ["audit", topk_cache, "--student", small, "--positions", "16"]),
                       "student", "vocabulary of 290")
    big = make_teacher(store_path, tmp_path / "big", extra_vocab=50)
    for f in big.glob("tokenizer*"):
        f.unlink()
    assert_clean_error(invoke(runner, ["audit", topk_cache, "--student", big, "--positions", "16"]),
                       "350 outputs", "no tokenizer", "real tokens")


def test_a_teacher_without_a_tokenizer_is_cached_with_a_note(tmp_path, runner, store_path):
    """Only its vocabulary size can be checked: precompute says so instead of nothing."""
    from tests.conftest import make_teacher

    t = make_teacher(store_path, tmp_path / "bare", seed=4)
    for f in t.glob("tokenizer*"):
        f.unlink()
    r = invoke(runner, ["precompute", "--store", store_path, "--teacher", t, "-o", tmp_path / "c", "--top-k", "4",
                        "--splits", "dev", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "teacher 'bare' has no tokenizer" in r.output and "only its vocabulary size (300" in r.output


# ------------------------------------------------------------------------------------------------------ cohorts


PEER = {"arch": "llama", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}


def _cohort_yaml(tmp_path, store_path, **changes) -> Path:
    import yaml

    d = {"name": "t", "seed": 0, "device": "cpu", "output": str(tmp_path / "out"),
         "data": {"store": str(store_path), "batch_size": 8, "eval_windows": 16},
         "optim": {"max_steps": 2, "warmup_steps": 1},
         "peers": [{"name": "a", "model": dict(PEER)}, {"name": "b", "model": dict(PEER)}], "mutual": {"alpha": 0.5}}
    d.update(changes)
    cfg = tmp_path / "cohort.yaml"
    cfg.write_text(yaml.safe_dump(d))
    return cfg


def test_cohort_peer_refusals(tmp_path, runner, store_path, topk_cache):
    """A trained peer named like a fixed peer (members a, teacher, teacher); a peer starting from a checkpoint with
    more outputs than the store's vocabulary and no tokenizer (precompute refuses such a teacher)."""
    from tests.conftest import make_teacher

    cfg = _cohort_yaml(tmp_path, store_path, cache=str(topk_cache),
                       peers=[{"name": "teacher", "model": dict(PEER)}, {"name": "b", "model": dict(PEER)}],
                       mutual={"alpha": 0.5, "fixed_peers": ["teacher"]})
    assert_clean_error(invoke(runner, ["cohort", "-c", cfg]), "peer 'teacher' has the name of a fixed peer")
    assert not (tmp_path / "out").exists()
    big = make_teacher(store_path, tmp_path / "big", extra_vocab=50)
    for f in big.glob("tokenizer*"):
        f.unlink()
    cfg = _cohort_yaml(tmp_path, store_path, peers=[{"name": "a", "model": {**PEER, "init_from": str(big)}},
                                                    {"name": "b", "model": dict(PEER)}])
    assert_clean_error(invoke(runner, ["cohort", "-c", cfg]), "peer 'a'", "350 outputs", "real tokens")
    assert not (tmp_path / "out").exists()


def test_init_from_without_a_tokenizer_is_measured_or_said(tmp_path, runner, store_path, teacher_path):
    """`train`/`distill` with model.init_from checked only that the vocabulary was not smaller: extra rows without
    a tokenizer (real tokens) were accepted, a checkpoint without one passed without a word."""
    import shutil

    from tests.conftest import make_teacher

    big = make_teacher(store_path, tmp_path / "big", extra_vocab=50)
    bare = tmp_path / "bare"
    shutil.copytree(teacher_path, bare)
    for d in (big, bare):
        for f in d.glob("tokenizer*"):
            f.unlink()
    r = invoke(runner, ["train", "--store", store_path, "-o", tmp_path / "r1", "--set", f"model.init_from={big}",
                        *TINY_RUN])
    assert_clean_error(r, "model.init_from", "350 outputs", "real tokens")
    assert not (tmp_path / "r1").exists()
    r = invoke(runner, ["train", "--store", store_path, "-o", tmp_path / "r2", "--set", f"model.init_from={bare}",
                        *TINY_RUN])
    assert r.exit_code == 0, r.output
    assert "has no tokenizer" in r.output and "only its vocabulary size (300" in r.output


def test_eval_of_a_cohort_directory_names_its_peers(tmp_path, runner, store_path):
    """It advised `cachekd train -c OUT/config.yaml --resume`, which fails: a cohort's models are its peers'."""
    r = invoke(runner, ["cohort", "-c", _cohort_yaml(tmp_path, store_path), "--quiet"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    r = invoke(runner, ["eval", out, "--dev", store_path, "--quiet"])
    assert_clean_error(r, "is a cohort directory", str(out / "peers" / "a"), str(out / "peers" / "b"))
    assert "--resume" not in r.output


# ------------------------------------------------------------------------------------- damaged stores and caches

TINY_RUN = ["--set", "model.hidden_size=32", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
            "--set", "model.intermediate_size=32", "--batch-size", "8", "--max-steps", "2", "--quiet"]


def _edit_zarr_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("what,change", [
    ("shape", lambda m: m["shape"].__setitem__(0, m["shape"][0] - 40)),
    ("shape", lambda m: m["shape"].__setitem__(2, m["shape"][2] + 1)),
    ("dtype", lambda m: m.__setitem__("data_type", "int16")),
])
def test_an_edited_zarr_json_is_one_sentence(tmp_path, runner, store_path, topk_cache, what, change):
    """An edited shape was a traceback in verify, --repair and distill (or, in the last axis, "repeated ids" that
    --repair marked for a recomputation that could never fix them); an edited dtype went unnoticed."""
    import shutil

    cache = tmp_path / "c"
    shutil.copytree(topk_cache, cache)
    _edit_zarr_json(cache / "train" / "teacher_a" / "ids" / "zarr.json", change)
    for args in (["verify", cache, "--quiet"], ["verify", cache, "--repair", "--quiet"]):
        r = invoke(runner, args)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert "the ids array of teacher 'teacher_a' (train split)" in r.output and "zarr.json" in r.output, r.output
        assert "--force" in r.output and "Marked" not in r.output
    assert sorted(p.name for p in (cache / "done" / "train").iterdir()) == \
        sorted(p.name for p in (topk_cache / "done" / "train").iterdir())  # nothing marked for recomputation
    r = invoke(runner, ["distill", "--store", store_path, "--cache", cache, "-o", tmp_path / "run", *TINY_RUN])
    assert_clean_error(r, "ids array", what, "zarr.json", "--force")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("array", ["tail_lse", "entropy", "sample_ids", "sample_logprobs"])
def test_a_deleted_chunk_file_is_reported_missing(tmp_path, runner, store_path, teacher_path, array):
    """These four arrays of a sampled cache were reported as "misplaced or stale" when a chunk file was deleted."""
    cache = _precompute(runner, store_path, teacher_path, tmp_path / "s", "--sample", "8", "--top-k", "4",
                        "--splits", "dev")
    (f,) = [p for p in (cache / "dev" / "teacher_a" / array / "c" / "0").rglob("*") if p.is_file()]
    f.unlink()
    r = invoke(runner, ["verify", cache, "--quiet"])
    assert r.exit_code == 1
    assert f"dev chunk 0, teacher 'teacher_a': the {array} data cannot be read (file missing)" in r.output, r.output
    assert "misplaced or stale" not in r.output


def test_a_temporary_done_marker_is_removed_on_resume(tmp_path, runner, store_path, teacher_path):
    """A process killed while writing a done-marker left `.0000001.json.<random>.tmp`; the resume kept it."""
    args = ["--top-k", "4", "--splits", "train"]
    cache = _precompute(runner, store_path, teacher_path, tmp_path / "c", *args)
    done = cache / "done" / "train"
    (done / "0000001.json").unlink()
    (done / ".0000001.json.x1y2z3.tmp").write_text('{"half": ')
    _precompute(runner, store_path, teacher_path, cache, *args)
    assert not [p.name for p in done.iterdir() if p.name.endswith(".tmp")]
    assert (done / "0000001.json").exists()


def test_a_deleted_token_store_chunk_is_found_before_a_run_starts(tmp_path, runner, store_path):
    """A short run never reached the deleted chunk and exited 0."""
    import shutil

    from cachekd.tokens import TokenStore

    store = tmp_path / "store"
    shutil.copytree(store_path, store)
    st = TokenStore.open(store)
    last = st.num_chunks("train") - 1
    from cachekd.tokens import format as tfmt

    tfmt.chunk_file(store, "train", st.array("train"), last).unlink()
    assert TokenStore.open(store).missing_chunks("train") == [last]
    r = invoke(runner, ["train", "--store", store, "-o", tmp_path / "run", *TINY_RUN])
    assert_clean_error(r, f"train split's chunk {last}", "file is missing")
    assert not (tmp_path / "run").exists()
