"""Cohorts: a one-peer cohort and a grid equal single runs bit for bit, WML runs and resumes exactly, fixed peers
are cached (no forward, no gradient), ω is logged and plotted, bad input is one sentence with nothing written,
and the peer search is seeded and resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cachekd.cohort.config import load_cohort_config
from cachekd.cohort.run import run_cohort, run_search
from cachekd.train_config import load_train_config
from cachekd.trainer import run
from tests.conftest import assert_clean_error, invoke

SMALL = {"arch": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}
WIDE = {"arch": "llama", "hidden_size": 48, "num_layers": 1, "num_heads": 2, "intermediate_size": 96}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, store_path, teacher_path, teacher_b_path):
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("cohort_cache") / "cache"
    r = invoke(CliRunner(), ["precompute", "--store", store_path, "--teacher", f"ta={teacher_path}",
                             "--teacher", f"tb={teacher_b_path}", "-o", out, "--top-k", "8", "--temperatures", "1,2",
                             "--quiet"])
    assert r.exit_code == 0, r.output
    return out


def _cohort(store, out, peers, mutual=None, cache=None, steps=6, **over):
    d = {"name": "c", "output": str(out), "seed": 5, "device": "cpu",
         "data": {"store": str(store), "batch_size": 8, "micro_batch_size": 4, "eval_windows": 16, "block_chunks": 1},
         "optim": {"lr": 3e-3, "warmup_steps": 2, "max_steps": steps}, "log_every": 1, "save_every": 0,
         "peers": peers, "mutual": mutual, "cache": str(cache) if cache else None, **over}
    return load_cohort_config(d)


def _single(store, out, seed, model, distill=None, steps=6, order_seed=5):
    return load_train_config({
        "name": Path(out).name, "output": str(out), "seed": seed, "device": "cpu", "model": dict(model),
        "data": {"store": str(store), "batch_size": 8, "micro_batch_size": 4, "eval_windows": 16, "block_chunks": 1,
                 "order_seed": order_seed},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "max_steps": steps}, "log_every": 1, "save_every": 0,
        "distill": distill})


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def _same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_one_peer_at_alpha_zero_equals_a_single_run(tmp_path, store_path):
    c = _cohort(store_path, tmp_path / "c", [{"name": "p", "seed": 11, "model": SMALL}],
                mutual={"alpha": 0.0, "update_every": 0})
    run_cohort(c, progress=False)
    run(_single(store_path, tmp_path / "single", 11, SMALL), progress=False)
    _same(tmp_path / "c" / "peers" / "p", tmp_path / "single")


def test_grid_equals_separate_runs(tmp_path, store_path, cache):
    fkl = {"objective": "forward_kl", "temperature": 2.0, "teachers": ["ta"]}
    rkl = {"objective": "reverse_kl", "temperature": 1.0, "tail_mode": "uniform", "alpha": 0.8,
           "teacher_combine": "losses"}
    peers = [{"name": "ce", "seed": 1, "model": SMALL},
             {"name": "fkl", "seed": 2, "model": WIDE, "distill": fkl},
             {"name": "rkl", "seed": 3, "model": SMALL, "distill": rkl, "optim": {"lr": 1e-3}}]
    summary = run_cohort(_cohort(store_path, tmp_path / "grid", peers, cache=cache), progress=False)
    assert summary["mode"] == "grid" and summary["peers"] == ["ce", "fkl", "rkl"]
    run(_single(store_path, tmp_path / "ce", 1, SMALL), progress=False)
    run(_single(store_path, tmp_path / "fkl", 2, WIDE, {**fkl, "cache": str(cache)}), progress=False)
    single_rkl = _single(store_path, tmp_path / "rkl", 3, SMALL, {**rkl, "cache": str(cache)})
    single_rkl.optim.lr = 1e-3
    run(single_rkl, progress=False)
    for name in ("ce", "fkl", "rkl"):
        _same(tmp_path / "grid" / "peers" / name, tmp_path / name)
    # each peer is an ordinary run: the saved config reproduces it
    peer_cfg = (tmp_path / "grid" / "peers" / "fkl" / "config.yaml").read_text()
    assert "order_seed: 5" in peer_cfg and "forward_kl" in peer_cfg


def _wml(detach=True, fixed=(), **mutual):
    return {"alpha": 0.5, "temperature": 1.5, "detach": detach, "update_every": 2,
            "eta": {"kind": "cosine", "start": 0.25, "end": 0.0025}, "fixed_peers": list(fixed), **mutual}


PEERS = [{"name": "a", "seed": 1, "model": SMALL}, {"name": "b", "seed": 2, "model": WIDE}]


@pytest.mark.parametrize("detach", [True, False])
def test_wml_cohort_resumes_exactly(tmp_path, store_path, detach):
    from cachekd.cohort.trainer import CohortTrainer
    from cachekd.cohort.config import peer_configs

    full = _cohort(store_path, tmp_path / "full", PEERS, _wml(detach), steps=7)
    s = run_cohort(full, progress=False)
    assert s["mode"] == "mutual" and abs(sum(s["weights"]) - 1) < 1e-12
    peer = json.loads((tmp_path / "full" / "peers" / "a" / "summary.json").read_text())
    assert (peer["mode"], peer["objective"], peer["cohort"]) == ("mutual", "wml-forward_kl", "c")
    # stopped after 3 steps with a checkpoint there, then resumed to 7
    part = _cohort(store_path, tmp_path / "part", PEERS, _wml(detach), steps=7)
    t = CohortTrainer(part, peer_configs(part), progress=False)
    it = t.batch_generator()
    for _ in range(3):
        m = t.train_step(next(it))
        t.step += 1
        t.tokens_seen += m["tokens"]
        t._after_step(m, _NoBar())
    t._save_checkpoint()
    it.close()
    s2 = run_cohort(part, resume=True, progress=False)
    assert s2["weights"] == s["weights"]
    for name in ("a", "b"):
        _same(tmp_path / "full" / "peers" / name, tmp_path / "part" / "peers" / name)
    recs = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r["kind"] == "weights"]
    assert steps == [0, 2, 4, 6]  # ω at the start and after each update, none twice after the resume


class _NoBar:
    def set_postfix(self, **kw):
        pass


def test_weights_follow_the_dev_losses(tmp_path, store_path):
    c = _cohort(store_path, tmp_path / "w", PEERS, _wml(update_every=3), steps=6)
    run_cohort(c, progress=False)
    recs = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    upd = [r for r in recs if r["kind"] == "weights" and r["dev_losses"]]
    assert upd and upd[0]["members"] == ["a", "b"]
    from cachekd.cohort.weights import mirror_descent_step

    r = upd[0]
    assert r["weights"] == pytest.approx(mirror_descent_step([0.5, 0.5], r["dev_batch_losses"], eta=r["eta"]),
                                         rel=1e-12)
    assert len(r["dev_batch_losses"][0]) == 60  # the seed's 60 validation batches (the whole dev split scored)
    # ω moves (the dev CE of a language model is > 1 nat: a clamp on the mean would freeze it), and the peer with
    # the lower dev loss gains weight
    assert min(r["dev_losses"]) > 1.0
    assert abs(r["weights"][0] - 0.5) > 1e-4
    best = min(range(2), key=lambda i: r["dev_losses"][i])
    assert r["weights"][best] > 0.5


def test_fixed_teacher_peer_is_cached(tmp_path, store_path, cache, monkeypatch):
    """The cached teacher joins with no model load, no forward and targets that carry no gradient."""
    import cachekd.models as models
    from cachekd.cohort import wml

    def no_load(*a, **k):
        raise AssertionError("a fixed peer must not load a model")

    monkeypatch.setattr(models, "load_model", no_load)
    seen = []
    real = wml.mutual_sums

    def spy(logits, labels, fixed_targets, **kw):
        seen.append([t.logits.requires_grad or t.tail_lse.requires_grad for t in fixed_targets])
        return real(logits, labels, fixed_targets, **kw)

    monkeypatch.setattr(wml, "mutual_sums", spy)
    c = _cohort(store_path, tmp_path / "f", [PEERS[0]], _wml(fixed=["tb"], fixed_weights=[0.3], temperature=1.0), cache=cache)
    s = run_cohort(c, progress=False)
    assert s["members"] == ["a", "tb"] and s["weights"][1] == 0.3
    assert seen and all(flags == [False] for flags in seen)
    assert not (tmp_path / "f" / "peers" / "tb").exists()


def test_teacher_as_fixed_peer_at_full_weight_is_distillation(tmp_path, store_path, cache):
    """One peer and a fixed teacher: the teacher-guided end of the knob trains and differs from CE alone."""
    c = _cohort(store_path, tmp_path / "kd", [PEERS[0]], _wml(fixed=["ta"], update_every=0, alpha=0.9, temperature=2.0), cache=cache)
    run_cohort(c, progress=False)
    ce = _cohort(store_path, tmp_path / "ce", [PEERS[0]], {"alpha": 0.0, "update_every": 0})
    run_cohort(ce, progress=False)
    wa, wb = _weights(tmp_path / "kd" / "peers" / "a"), _weights(tmp_path / "ce" / "peers" / "a")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("change, fragment", [
    ({"mutual": {"alpha": 1.5}}, "alpha must be in [0, 1]"),
    ({"mutual": {"eta": 0}}, "eta must be > 0"),
    ({"mutual": {"eta": {"kind": "cosine", "start": 0.25, "end": -1}}}, "mutual.eta.end must be > 0"),
    ({"peers": [{"name": "solo", "model": SMALL}], "mutual": {"alpha": 0.5}}, "at least two members"),
    ({"mutual": {"fixed_peers": ["nobody"]}}, "fixed peer 'nobody' is not a teacher of the cache"),
    ({"peers": [{"name": "x", "model": {**SMALL, "init_from": "BIG"}}, {"name": "y", "model": SMALL}]},
     "vocabulary of"),
    ({"cache": None, "mutual": {"fixed_peers": ["ta"]}}, "add the line `cache: PATH`"),
    ({"mutual": {"initial_weights": [1e308, 1e308]}}, "with a finite sum"),
])
def test_bad_cohorts_are_refused_with_nothing_written(tmp_path, store_path, cache, runner, change, fragment, big_vocab):
    import yaml

    d = {"name": "bad", "output": str(tmp_path / "out"), "cache": str(cache),
         "data": {"store": str(store_path), "batch_size": 8}, "optim": {"max_steps": 2},
         "peers": [{"name": "a", "model": SMALL}, {"name": "b", "model": WIDE}], "mutual": {"alpha": 0.5}}
    for k, v in change.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    if "peers" in change and "init_from" in str(change):
        d["peers"][0]["model"]["init_from"] = str(big_vocab)
    cfg = tmp_path / "cohort.yaml"
    cfg.write_text(yaml.safe_dump(d))
    r = invoke(runner, ["cohort", "-c", cfg])
    assert_clean_error(r, fragment)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory, store_path):
    """A checkpoint whose vocabulary is smaller than the store's: it cannot be a peer."""
    from tests.conftest import make_teacher

    return make_teacher(store_path, tmp_path_factory.mktemp("small_vocab") / "m", extra_vocab=-10)


def test_cli_cohort_runs_and_compare_plots_weights(tmp_path, store_path, runner):
    import yaml

    d = {"name": "cli", "seed": 0, "device": "cpu", "data": {"batch_size": 8, "eval_windows": 16},
         "optim": {"max_steps": 4, "warmup_steps": 1}, "peers": PEERS, "mutual": _wml(update_every=2)}
    cfg = tmp_path / "cohort.yaml"
    cfg.write_text(yaml.safe_dump(d))
    r = invoke(runner, ["cohort", "-c", cfg, "-o", tmp_path / "run", "--store", store_path, "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["peers"] == ["a", "b"]
    r = invoke(runner, ["compare", tmp_path / "run", "--out", tmp_path / "cmp", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert len(out["rows"]) == 2 and Path(out["files"]["weights"]).exists()
    r = invoke(runner, ["eval", tmp_path / "run" / "peers" / "a", "--dev", store_path, "--json"])
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["store"] == str(store_path)
    r = invoke(runner, ["cohort", "-c", cfg, "-o", tmp_path / "run", "--store", store_path, "--quiet"])
    assert_clean_error(r, "finished")


def test_choobaca_grid_example_loads_into_eight_peer_runs():
    from cachekd.cohort.config import peer_configs
    from cachekd.config import load_yaml
    from cachekd_cli.cohort_cmd import COHORT_EXAMPLES

    c = load_cohort_config({**load_yaml(COHORT_EXAMPLES / "cohort-choobaca-grid.yaml"), "output": "x"})
    cfgs = peer_configs(c)
    assert len(cfgs) == 8 and c.mutual is None
    assert {x.distill.objective for x in cfgs} == {"forward_kl", "reverse_kl"}
    assert {x.data.order_seed for x in cfgs} == {0} and {x.optim.epochs for x in cfgs} == {6}


def test_peer_search_is_seeded_and_resumable(tmp_path, store_path):
    search = {"keep": 2, "pool": 4, "rung_steps": 2, "min_params": 0, "max_params": 10**6, "layers": [1, 2],
              "heads": [2], "hidden_sizes": [16, 32, 48]}
    c = _cohort(store_path, tmp_path / "s", [], search=search)
    res = run_search(c, progress=False)
    assert [r["steps"] for r in res["rungs"]] == [2, 4] and len(res["best"]) == 2
    assert len({b["shape"] for b in res["best"]}) == 2
    # a second run reads the finished candidates back: same result, nothing trained again
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "s" / "search").glob("*/summary.json")}
    assert run_search(c, progress=False) == res
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "s" / "search").glob("*/summary.json")}


def test_torchrun_two_processes_equal_one_for_a_wml_cohort(tmp_path, store_path):
    import os
    import subprocess
    import sys

    import yaml

    d = {"name": "dp", "seed": 5, "device": "cpu",
         "data": {"store": str(store_path), "batch_size": 8, "eval_windows": 16, "block_chunks": 1},
         "optim": {"lr": 3e-3, "warmup_steps": 2, "max_steps": 6}, "log_every": 1, "save_every": 0,
         "peers": PEERS, "mutual": _wml(detach=False, update_every=3)}
    run_cohort(load_cohort_config({**d, "output": str(tmp_path / "one")}), progress=False)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({**d, "output": str(tmp_path / "two")}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "cachekd_cli", "cohort", "-c", str(tmp_path / "two.yaml"), "--quiet"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["processes"] == 2 and two["weights"] == pytest.approx(one["weights"], rel=1e-5)
    for name in ("a", "b"):
        wa, wb = _weights(tmp_path / "one" / "peers" / name), _weights(tmp_path / "two" / "peers" / name)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_sampled_fixed_peer_gives_targets_at_the_mutual_temperature(tmp_path, store_path, teacher_path):
    """A sampled cache as a fixed peer: its targets are built at the mutual τ (here 2, not the default 1), and a τ
    the cache holds no normaliser for is refused in one sentence before anything is written."""
    from click.testing import CliRunner

    from cachekd.cohort.trainer import open_fixed_peers
    from cachekd.errors import CachekdError
    from cachekd.tokens import TokenStore

    sampled = tmp_path / "sampled"
    r = invoke(CliRunner(), ["precompute", "--store", store_path, "--teacher", f"ta={teacher_path}", "-o", sampled,
                             "--sample", "8", "--temperatures", "1,2", "--quiet"])
    assert r.exit_code == 0, r.output
    store = TokenStore.open(store_path)
    c = _cohort(store_path, tmp_path / "s", [PEERS[0]], _wml(fixed=["ta"], update_every=0, temperature=2.0),
                cache=sampled)
    source = open_fixed_peers(c, store)
    assert source.temperature == 2.0 and source.tail_index is None
    run_cohort(c, progress=False)
    bad = _cohort(store_path, tmp_path / "bad", [PEERS[0]], _wml(fixed=["ta"], update_every=0, temperature=3.0),
                  cache=sampled)
    with pytest.raises(CachekdError, match="not 3"):
        open_fixed_peers(bad, store)
