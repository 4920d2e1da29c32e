"""Run directories that other processes, crashes and full disks touch (issue 20, items 3, 4, 5 and 7): a run
another process trains is refused to every command that would train or replace it; a cohort cut off between two
peers' checkpoints resumes from the last common one; a full disk is one sentence, leaves no temporary file and
resumes identically; a checkpoint is loaded without running what it holds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from cachekd.checkpoint import CheckpointManager
from cachekd.errors import CachekdError
from cachekd.rundir import RunDir
from tests.conftest import assert_clean_error, invoke
from tests.test_cohort import PEERS, _cohort, _same, _wml

TINY_CLI = ["--set", "model.hidden_size=32", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
            "--set", "model.intermediate_size=32", "--batch-size", "8", "--quiet", "--temperature", "1"]

# The CLI in a subprocess with a pause after every optimizer step (the weights are unaffected): a run that stays
# live while the test runs other commands on its directory.
SLOW_CLI = ("import sys, time\n"
            "import cachekd.trainer as t\n"
            "after = t.Trainer._after_step\n"
            "def slow(self, m, bar):\n"
            "    time.sleep(0.2)\n"
            "    return after(self, m, bar)\n"
            "t.Trainer._after_step = slow\n"
            "from cachekd_cli.main import main\n"
            "sys.argv[0] = 'cachekd'\n"
            "main()\n")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, store_path, teacher_path):
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("safety_cache") / "cache"
    r = invoke(CliRunner(), ["precompute", "--store", store_path, "--teacher", f"ta={teacher_path}", "-o", out,
                             "--top-k", "8", "--temperatures", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    return out


def _steps(metrics: Path, kind: str = "train") -> list[int]:
    out = []
    for ln in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if rec.get("kind") == kind:
            out.append(rec["step"])
    return out


@contextmanager
def _live(args: list, metrics: Path):
    """A slowed-down `cachekd ARGS` in a subprocess, once it has logged two steps to `metrics`; killed after."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while len(_steps(metrics)) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no training progress"
            time.sleep(0.05)
        yield proc
        assert proc.poll() is None, "the live run ended before the test was done with it"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)


def _files(d: Path) -> dict[str, bytes]:
    """Every file under `d` but those the live run keeps appending to or rotating."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
            and p.name not in ("metrics.jsonl",) and "checkpoints" not in p.parts}


def _assert_no_duplicate_steps(metrics: Path) -> None:
    steps = _steps(metrics)
    assert steps == sorted(set(steps)), steps


# ---------------------------------------------------------------------------------------------- live runs


def test_a_live_distill_is_refused_to_every_training_command(tmp_path, runner, store_path, cache):
    """`distill --force` replaced the run under a live process, `--resume` trained it twice at once, and a plain
    `distill` (and `eval`) advised --resume; all are refused while it runs, naming the process, and write nothing."""
    out = tmp_path / "run"
    base = ["distill", "--store", store_path, "--cache", cache, "-o", out, *TINY_CLI, "--max-steps", "400",
            "--set", "log_every=1", "--set", "save_every=2"]
    with _live(base, out / "metrics.jsonl") as proc:
        before = _files(out)
        for extra in ([], ["--force"], ["--resume"]):
            r = invoke(runner, base + extra)
            assert_clean_error(r, "is being trained right now", f"pid {proc.pid}")
            assert "--resume" not in r.output, r.output
        r = invoke(runner, ["eval", out, "--dev", store_path])  # advised `distill --resume` too
        assert_clean_error(r, "being trained right now", "once it has finished")
        assert "--resume" not in r.output, r.output
        assert _files(out) == before
        _assert_no_duplicate_steps(out / "metrics.jsonl")
    assert RunDir(out).state == "unfinished"  # killed: the lock went with the process


def test_a_live_cohort_is_refused_to_every_training_command(tmp_path, runner, store_path):
    """`cohort --force` wrote into a live cohort and `cohort --resume` called a checkpoint the live run had just
    rotated away "corrupt"; every command on it is refused while it runs."""
    d = {"name": "live", "seed": 0, "device": "cpu", "output": str(tmp_path / "c"),
         "data": {"store": str(store_path), "batch_size": 8, "eval_windows": 16},
         "optim": {"max_steps": 400, "warmup_steps": 1}, "log_every": 1, "save_every": 1, "keep_checkpoints": 1,
         "peers": PEERS, "mutual": _wml(update_every=0)}
    cfg = tmp_path / "cohort.yaml"
    cfg.write_text(yaml.safe_dump(d))
    with _live(["cohort", "-c", cfg, "--quiet"], tmp_path / "c" / "peers" / "a" / "metrics.jsonl") as proc:
        before = _files(tmp_path / "c")
        for extra in ([], ["--force"], ["--resume"]):
            r = invoke(runner, ["cohort", "-c", cfg, "--quiet", *extra])
            assert_clean_error(r, "is being trained right now", f"pid {proc.pid}")
            assert "--resume" not in r.output and "corrupt" not in r.output, r.output
        assert _files(tmp_path / "c") == before
        for name in ("a", "b"):
            _assert_no_duplicate_steps(tmp_path / "c" / "peers" / name / "metrics.jsonl")


def test_a_checkpoint_removed_while_read_is_not_called_corrupt(tmp_path, monkeypatch):
    """What a reader saw when a live run rotated the checkpoint it had chosen (library)."""
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    (run.path / "config.yaml").write_text("name: r\n")
    m = CheckpointManager(run, {"name": "r"}, keep=1, identity_of_saved=lambda data: data)
    path = m.save(1, {})
    path.unlink()
    with pytest.raises(CachekdError, match="was removed while it was being read") as e:
        m.load(path)
    assert "corrupt" not in str(e.value)


def test_a_claim_is_one_process_at_a_time_and_leaves_with_it(tmp_path):
    """The lock on running.json: another process cannot claim a claimed run; a claim counts within a process;
    a killed holder leaves a stale file that no longer counts."""
    run = RunDir(tmp_path / "r")
    code = ("import sys, time\nfrom cachekd.rundir import RunDir\nRunDir(sys.argv[1]).claim()\n"
            "print('claimed', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "claimed"
        assert run.is_running() and run.running_elsewhere() and run.state == "empty"  # (no run written yet)
        with pytest.raises(CachekdError, match=f"pid {proc.pid}"):
            run.claim()
        with pytest.raises(CachekdError, match="is being trained right now"):
            run.plan_start(resume=False, force=True)
    finally:
        proc.kill()
        proc.wait()
    assert (run.path / "running.json").exists() and not run.is_running()
    run.claim()
    run.claim()
    assert run.is_running() and not run.running_elsewhere()
    run.release()
    assert (run.path / "running.json").exists()
    run.release()
    assert not (run.path / "running.json").exists() and not run.is_running()


# ---------------------------------------------------------------------------------- cohort common checkpoint


class _Crash(Exception):
    pass


def test_a_cohort_cut_off_between_two_peers_checkpoints_resumes_from_the_last_common_one(tmp_path, store_path,
                                                                                         monkeypatch):
    """A crash after peer a wrote its checkpoint of step 4 and before peer b did: the cohort was refused for ever
    ("not at the same step"); it resumes from step 2, the last step every peer and the cohort directory hold, and
    ends as an uninterrupted cohort does, even keeping one checkpoint (the old one goes only once all have the new)."""
    over = {"save_every": 2, "keep_checkpoints": 1}
    full = run_cohort_quiet(_cohort(store_path, tmp_path / "full", PEERS, _wml(update_every=3), steps=6, **over))
    real = CheckpointManager.save

    def crash(self, step, state, **kw):
        if step == 4 and self.run.path.name == "b":
            raise _Crash
        return real(self, step, state, **kw)

    monkeypatch.setattr(CheckpointManager, "save", crash)
    cut = _cohort(store_path, tmp_path / "cut", PEERS, _wml(update_every=3), steps=6, **over)
    with pytest.raises(_Crash):
        run_cohort_quiet(cut)
    monkeypatch.setattr(CheckpointManager, "save", real)
    peers = tmp_path / "cut" / "peers"
    assert [p.name for p in RunDir(peers / "a").checkpoints()] == ["step_00000002.pt", "step_00000004.pt"]
    assert [p.name for p in RunDir(peers / "b").checkpoints()] == ["step_00000002.pt"]
    notes = []
    s = run_cohort_quiet(cut, resume=True, say=notes.append)
    assert any("resuming every one from step 2" in n for n in notes), notes
    assert s["weights"] == full["weights"]
    for name in ("a", "b"):
        _same(tmp_path / "full" / "peers" / name, peers / name)
        assert _steps(peers / name / "metrics.jsonl") == list(range(1, 7))
    assert _steps(tmp_path / "cut" / "metrics.jsonl", "weights") == [0, 3]


def run_cohort_quiet(cohort, **kw):
    from cachekd.cohort.run import run_cohort

    return run_cohort(cohort, progress=False, **kw)


# -------------------------------------------------------------------------------------------- full disks


@contextmanager
def _small_disk(path: Path, size: int):
    """A tmpfs of `size` bytes at `path`; yields a function that resizes it. Skips where mounting is not allowed."""
    path.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not allowed here ({r.stderr.decode().strip()})")

    def resize(new: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new}", str(path)], check=True, capture_output=True)

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _temp_files(d: Path) -> list[str]:
    return [str(p.relative_to(d)) for p in d.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


@pytest.mark.parametrize("command", ["distill", "train"])
def test_a_full_disk_during_distill_is_one_sentence_and_resumes_identically(tmp_path, runner, store_path, cache,
                                                                            command):
    """torch's `inline_container.cc ... unexpected pos` traceback and a `.step_*.pt.tmp` left behind; now one
    sentence, no temporary file, and `--resume` after space is freed gives the uninterrupted run's weights."""
    source = ["--cache", cache, "--temperature", "1"] if command == "distill" else []
    base = [command, "--store", store_path, *source, *TINY_CLI[:-2], "--max-steps", "12",
            "--set", "save_every=2", "--set", "log_every=1"]
    r = invoke(runner, [*base, "-o", tmp_path / "ref"])
    assert r.exit_code == 0, r.output
    ckpt = RunDir(tmp_path / "ref").last_checkpoint.stat().st_size
    # room for two checkpoints and the run's small files: the third checkpoint (step 6) fills the disk
    with _small_disk(tmp_path / "disk", int(2.5 * ckpt)) as resize:
        out = tmp_path / "disk" / "run"
        r = invoke(runner, [*base, "-o", out])
        assert_clean_error(r, "the disk is full", "--resume", "step 4")
        assert _temp_files(out) == [] and not (out / "model").exists()
        assert [p.name for p in RunDir(out).checkpoints()] == ["step_00000002.pt", "step_00000004.pt"]
        resize(40 * ckpt)
        r = invoke(runner, [*base, "-o", out, "--resume"])
        assert r.exit_code == 0, r.output
        assert _temp_files(out) == []
        assert _steps(out / "metrics.jsonl") == list(range(1, 13))
        a = (tmp_path / "ref" / "model" / "model.safetensors").read_bytes()
        assert (out / "model" / "model.safetensors").read_bytes() == a


def test_a_full_disk_during_a_cohort_is_one_sentence_and_resumes_identically(tmp_path, runner, store_path):
    """The disk fills while the second peer writes its checkpoint: one sentence, no temporary file, and the cohort
    resumes from the last checkpoint every peer holds to the uninterrupted cohort's weights and ω."""
    d = {"name": "disk", "seed": 0, "device": "cpu", "data": {"store": str(store_path), "batch_size": 8,
                                                              "eval_windows": 16},
         "optim": {"max_steps": 6, "warmup_steps": 1}, "log_every": 1, "save_every": 2, "keep_checkpoints": 1,
         "peers": PEERS, "mutual": _wml(update_every=3)}
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump({**d, "output": str(tmp_path / "ref")}))
    r = invoke(runner, ["cohort", "-c", tmp_path / "ref.yaml", "--quiet"])
    assert r.exit_code == 0, r.output
    size = {name: RunDir(tmp_path / "ref" / "peers" / name).last_checkpoint.stat().st_size for name in ("a", "b")}
    own = RunDir(tmp_path / "ref").last_checkpoint.stat().st_size
    # step 2's checkpoints, then peer a's of step 4 fit; peer b's does not
    with _small_disk(tmp_path / "disk", size["a"] * 2 + size["b"] + own + size["b"] // 2) as resize:
        out = tmp_path / "disk" / "c"
        (tmp_path / "cut.yaml").write_text(yaml.safe_dump({**d, "output": str(out)}))
        r = invoke(runner, ["cohort", "-c", tmp_path / "cut.yaml", "--quiet"])
        assert_clean_error(r, "the disk is full", "--resume", "step 2")
        assert _temp_files(out) == []
        resize(40 * (size["a"] + size["b"]))
        r = invoke(runner, ["cohort", "-c", tmp_path / "cut.yaml", "--quiet", "--resume"])
        assert r.exit_code == 0, r.output
        assert _temp_files(out) == []
        ref, got = (json.loads((p / "summary.json").read_text()) for p in (tmp_path / "ref", out))
        assert got["weights"] == ref["weights"]
        for name in ("a", "b"):
            _same(tmp_path / "ref" / "peers" / name, out / "peers" / name)


# ------------------------------------------------------------------------------------ unsafe checkpoints


class _Marker:
    """Unpickling this writes a file: what a hostile checkpoint would run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran')",))


def test_a_checkpoint_holding_a_pickled_callable_is_refused_without_running_it(tmp_path, runner, store_path, cache):
    """`--resume` loaded checkpoints with weights_only=False: a run directory from someone else ran its pickles."""
    out = tmp_path / "run"
    base = ["distill", "--store", store_path, "--cache", cache, "-o", out, *TINY_CLI, "--max-steps", "4",
            "--set", "save_every=2"]
    r = invoke(runner, base)
    assert r.exit_code == 0, r.output
    (out / "summary.json").unlink()
    shutil.rmtree(out / "model")
    marker = tmp_path / "marker"
    ckpt = RunDir(out).last_checkpoint
    state = torch.load(ckpt, weights_only=False)  # (our own file)
    torch.save({**state, "extra": _Marker(str(marker))}, ckpt)
    r = invoke(runner, [*base, "--resume"])
    assert_clean_error(r, str(ckpt), "other than tensors and plain values", "exec", "not loaded")
    assert not marker.exists()


def test_a_checkpoint_written_before_keeps_loading(tmp_path):
    """Checkpoints written before held the NumPy random state as an array: they load, and restore it."""
    import numpy as np

    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    m = CheckpointManager(run, {"name": "r"}, keep=1, identity_of_saved=lambda data: data)
    path = m.save(1, {"w": torch.ones(2)})
    state = torch.load(path, weights_only=False)  # (our own file)
    np.random.seed(3)
    old = np.random.get_state()
    expect = np.random.rand()
    torch.save({**state, "rng": {**state["rng"], "numpy": old}}, path)
    np.random.seed(4)
    got = m.load(path)
    assert torch.equal(got["w"], torch.ones(2)) and np.random.rand() == expect
