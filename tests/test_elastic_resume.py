"""Elastic resume: a distill run and a WML cohort resume at another torchrun world size with the same global batch
(2 → 1 → 2 processes on CPU/gloo) and give the losses and weights of an uninterrupted run, within float reduction
order; a
precompute started as one `--part` of three is finished by two torchrun processes, byte for byte one process's.

Run as a module (``python -m tests.test_elastic_resume CONFIG new|resume STOP``, under torchrun or not), this file
is one segment of such a run: it trains to optimizer step STOP and saves a checkpoint there, as a run killed just
after a periodic checkpoint leaves it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _segment(config: str, mode: str, stop: str) -> None:
    """Train the run (or cohort) of `config` (a new one, or resumed from its last checkpoint) to step `stop`,
    logging every step as the trainer does, and save a checkpoint there."""
    from cachekd.config import load_yaml
    from cachekd.train_config import load_train_config
    from cachekd.trainer import Trainer

    class NoBar:
        def set_postfix(self, **_):
            pass

    data = load_yaml(config)
    if "peers" in data:  # a cohort
        from cachekd.cohort.config import load_cohort_config, peer_configs
        from cachekd.cohort.trainer import CohortTrainer

        cohort = load_cohort_config(data)
        t = CohortTrainer(cohort, peer_configs(cohort), resume=mode == "resume", progress=False)
    else:
        t = Trainer(load_train_config(data), resume=mode == "resume", progress=False)
    it = t.batches()
    t._last_log = (time.perf_counter(), t.tokens_seen)
    try:
        while t.step < int(stop):
            m = t.train_step(next(it))
            t.step += 1
            t.tokens_seen += m["tokens"]
            t._after_step(m, NoBar())
        t._save_checkpoint()
    finally:
        it.close()
        if t.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def _torchrun(nproc: int, args: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args] \
        if nproc > 1 else [sys.executable, *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


def _losses(run_dir: Path) -> dict[int, dict[str, float]]:
    """The last logged train record of each step."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            out[rec["step"]] = {k: rec.get(k) for k in ("loss", "ce", "kd")}
    return out


@pytest.fixture(scope="module")
def hybrid_cache(tmp_path_factory, store_path, teacher_path):
    from cachekd.precompute import PrecomputeConfig, precompute

    out = tmp_path_factory.mktemp("elastic") / "cache"
    precompute(PrecomputeConfig(store=str(store_path), teachers=[str(teacher_path)], output=str(out)), force=True,
               progress=False)  # the default storage: the hybrid
    return out


def test_resume_at_another_world_size_gives_the_uninterrupted_run(tmp_path, store_path, hybrid_cache):
    from cachekd.config import save_yaml
    from cachekd.trainer import run
    from tests.test_trainer import _as_dict, _cfg, _weights

    distill = {"cache": str(hybrid_cache), "objective": "forward_kl", "temperature": 1.0}
    over = {"optim.max_steps": 8}
    ref = run(_cfg(store_path, tmp_path / "ref", distill, **over), progress=False)
    cfg = tmp_path / "elastic.yaml"
    save_yaml(cfg, _as_dict(_cfg(store_path, tmp_path / "elastic", distill, **over)))
    seg = ["-m", "tests.test_elastic_resume", str(cfg)]
    _torchrun(2, seg + ["new", "3"])  # steps 1-3 on 2 processes
    _torchrun(1, seg + ["resume", "6"])  # 4-6 on 1
    _torchrun(2, ["-m", "cachekd_cli", "distill", "-c", str(cfg), "--resume", "--quiet", "--device", "cpu"])  # 7-8 on 2
    summary = json.loads((tmp_path / "elastic" / "summary.json").read_text())
    assert summary["steps"] == ref["steps"] == 8 and summary["processes"] == 2
    want, got = _losses(tmp_path / "ref"), _losses(tmp_path / "elastic")
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in want:
        for k in ("loss", "ce", "kd"):
            assert got[step][k] == pytest.approx(want[step][k], rel=1e-4, abs=1e-5), (step, k)
    wa, wb = _weights(tmp_path / "ref"), _weights(tmp_path / "elastic")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_wml_cohort_resumes_at_another_world_size(tmp_path, store_path):
    import yaml

    from tests.test_cohort import PEERS, _weights, _wml

    d = {"name": "c", "seed": 5, "device": "cpu",
         "data": {"store": str(store_path), "batch_size": 8, "eval_windows": 16, "block_chunks": 1},
         "optim": {"lr": 3e-3, "warmup_steps": 2, "max_steps": 6}, "log_every": 1, "save_every": 0,
         "peers": PEERS, "mutual": _wml(detach=False, update_every=2)}
    from cachekd.cohort.config import load_cohort_config
    from cachekd.cohort.run import run_cohort

    ref = run_cohort(load_cohort_config({**d, "output": str(tmp_path / "ref")}), progress=False)
    cfg = tmp_path / "elastic.yaml"
    cfg.write_text(yaml.safe_dump({**d, "output": str(tmp_path / "elastic")}))
    seg = ["-m", "tests.test_elastic_resume", str(cfg)]
    _torchrun(2, seg + ["new", "2"])
    _torchrun(1, seg + ["resume", "4"])
    _torchrun(2, ["-m", "cachekd_cli", "cohort", "-c", str(cfg), "--resume", "--quiet"])
    got = json.loads((tmp_path / "elastic" / "summary.json").read_text())
    assert got["processes"] == 2 and got["weights"] == pytest.approx(ref["weights"], rel=1e-5)
    for name in ("a", "b"):
        want, have = _losses(tmp_path / "ref" / "peers" / name), _losses(tmp_path / "elastic" / "peers" / name)
        assert sorted(have) == sorted(want) == list(range(1, 7))
        for step in want:
            assert have[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-4, abs=1e-5), (name, step)
        wa, wb = _weights(tmp_path / "ref" / "peers" / name), _weights(tmp_path / "elastic" / "peers" / name)
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_precompute_resumes_with_another_split_into_ranks(tmp_path, store_path, teacher_path):
    import numpy as np

    from cachekd.cache.reader import LogitCache
    from cachekd.precompute import PrecomputeConfig, precompute

    opts = {"store": str(store_path), "teachers": [str(teacher_path)], "top_k": 8, "sample": 4}
    precompute(PrecomputeConfig(**opts, output=str(tmp_path / "ref")), progress=False)
    out = tmp_path / "elastic"
    precompute(PrecomputeConfig(**opts, output=str(out), part="1/3"), progress=False)
    assert not (out / "manifest.json").exists()
    _torchrun(2, ["-m", "cachekd_cli", "precompute", "--store", str(store_path), "--teacher", str(teacher_path),
                  "-o", str(out), "--top-k", "8", "--sample", "4", "--quiet"])
    a, b = LogitCache.open(tmp_path / "ref"), LogitCache.open(out)
    for split in a.splits():
        n = a.num_windows(split)
        sa, sb = a.read_stored(split, 0, n), b.read_stored(split, 0, n)
        for t in sa:
            for name in sa[t]:
                np.testing.assert_array_equal(sa[t][name], sb[t][name], err_msg=f"{split}/{t}/{name}")


if __name__ == "__main__":
    _segment(*sys.argv[1:])
