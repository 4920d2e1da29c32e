"""RunDir (layout, the one state rule, starting a run), CheckpointManager and the teachers' shared check."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from cachekd.checkpoint import CheckpointManager, first_difference
from cachekd.errors import CachekdError
from cachekd.rundir import RunDir, checkpoint_name, run_state
from cachekd.teachers import resolve_teachers
from cachekd.tokens import TokenStore


def _run(tmp_path, name="r", *, config="name: r\n", summary=False, checkpoints=(), running_pid=None):
    d = tmp_path / name
    d.mkdir()
    if config is not None:
        (d / "config.yaml").write_text(config)
        (d / "metrics.jsonl").write_text("")
    if summary:
        (d / "summary.json").write_text("{}")
    for step in checkpoints:
        (d / "checkpoints").mkdir(exist_ok=True)
        (d / "checkpoints" / checkpoint_name(step)).write_bytes(b"")
    if running_pid is not None:
        (d / "running.json").write_text(json.dumps({"pid": running_pid, "host": socket.gethostname()}))
    return RunDir(d)


def _dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


# ------------------------------------------------------------------------------------------------ state


def test_state_is_one_rule(tmp_path):
    assert RunDir(tmp_path / "none").state == "empty"
    (tmp_path / "blank").mkdir()
    assert RunDir(tmp_path / "blank").state == "empty"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    assert RunDir(tmp_path / "other").state == "foreign"
    assert _run(tmp_path, "u", checkpoints=[3, 12]).state == "unfinished"
    assert _run(tmp_path, "f", summary=True).state == "finished"
    assert _run(tmp_path, "live", running_pid=os.getpid()).state == "running"
    assert _run(tmp_path, "stale", running_pid=_dead_pid()).state == "unfinished"
    # a finished run is finished even with a stale marker
    assert _run(tmp_path, "f2", summary=True, running_pid=os.getpid()).state == "finished"


def test_last_checkpoint_and_run_state(tmp_path):
    run = _run(tmp_path, checkpoints=[3, 12, 7])
    assert run.last_checkpoint_step == 12 and run.last_checkpoint.name == "step_00000012.pt"
    assert run_state(run.path) == {"exists": True, "is_run": True, "finished": False, "last_checkpoint_step": 12}


def test_of_model_path(tmp_path):
    run = _run(tmp_path, summary=True)
    (run.model_dir).mkdir()
    (run.model_dir / "config.json").write_text("{}")
    assert RunDir.of_model_path(run.path).path == run.path
    assert RunDir.of_model_path(run.model_dir).path == run.path
    bare = tmp_path / "model"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    assert RunDir.of_model_path(bare) is None


def test_unfinished_message_names_the_command_and_checkpoint(tmp_path):
    run = _run(tmp_path, config="name: r\ndistill: {cache: c}\n", checkpoints=[40])
    msg = run.unfinished_message()
    assert "cachekd distill -c" in msg and "step 40" in msg and "--resume" in msg
    done = _run(tmp_path, "done", summary=True)
    assert "model/ is missing" in done.unfinished_message() and "--force" in done.unfinished_message()


# ------------------------------------------------------------------------------------------- starting


def test_plan_start(tmp_path):
    assert RunDir(tmp_path / "new").plan_start(resume=False, force=False).action == "new"
    with pytest.raises(CachekdError, match="nothing to resume .* no such directory"):
        RunDir(tmp_path / "new").plan_start(resume=True, force=False)
    unfinished = _run(tmp_path, "u")
    with pytest.raises(CachekdError, match="holds an unfinished run; pass resume") as info:
        unfinished.plan_start(resume=False, force=False)
    from cachekd_cli.config_options import error_message
    assert "holds an unfinished run; pass --resume" in error_message(info.value, "distill")
    assert unfinished.plan_start(resume=True, force=False).action == "restart"
    plan = unfinished.plan_start(resume=False, force=True)
    assert plan.action == "new" and plan.replace
    with_ckpt = _run(tmp_path, "c", checkpoints=[5])
    plan = with_ckpt.plan_start(resume=True, force=False)
    assert plan.action == "resume" and plan.checkpoint.name == "step_00000005.pt"
    with pytest.raises(CachekdError, match="already finished"):
        _run(tmp_path, "f", summary=True).plan_start(resume=True, force=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    with pytest.raises(CachekdError, match="not empty and is not a cachekd run"):
        RunDir(other).plan_start(resume=False, force=True)
    with pytest.raises(CachekdError, match="nothing to resume"):
        RunDir(other).plan_start(resume=True, force=False)


def test_remove_run_files_keeps_foreign_entries(tmp_path):
    run = _run(tmp_path, summary=True, checkpoints=[1], running_pid=1)
    (run.path / ".summary.json.abc123.tmp").write_text("")
    (run.path / "mine.txt").write_text("keep me")
    assert run.remove_run_files() == ["mine.txt"]
    assert sorted(p.name for p in run.path.iterdir()) == ["mine.txt"]


def test_metrics_truncation_and_running_marker(tmp_path):
    run = _run(tmp_path)
    for step in (1, 2, 3, 4):
        run.append_metrics({"kind": "train", "step": step})
    run.truncate_metrics(2)
    assert [m["step"] for m in run.read_metrics()] == [1, 2]
    run.mark_running(True)
    assert json.loads(run.running_path.read_text())["pid"] == os.getpid() and run.is_running()
    run.mark_running(False)
    assert not run.running_path.exists() and not run.is_running()


# ---------------------------------------------------------------------------------------- checkpoints


def _manager(run, identity, keep=2):
    return CheckpointManager(run, identity, keep=keep, identity_of_saved=lambda data: {"name": data.get("name")})


def test_checkpoints_keep_n_and_restore_rng(tmp_path):
    run = _run(tmp_path)
    ckpt = _manager(run, {"name": "r"}, keep=2)
    paths = [ckpt.save(step, {"value": step}) for step in (1, 2, 3)]
    assert [p.name for p in run.checkpoints()] == [p.name for p in paths[1:]]
    assert not any(p.name.endswith(".tmp") for p in run.checkpoint_dir.iterdir())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = ckpt.save(4, {"value": 4})
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    state = ckpt.load(path)
    assert state["step"] == 4 and state["value"] == 4
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


def test_checkpoint_identity_checks(tmp_path):
    run = _run(tmp_path, config="name: r\noptim: {max_steps: 20}\n")
    path = _manager(run, {"name": "r", "lr": 1}).save(1, {})
    with pytest.raises(CachekdError, match=r"different config \(lr: 1 then, 2 now\)"):
        _manager(run, {"name": "r", "lr": 2}).load(path)
    _manager(run, {"name": "r"}).check_saved_config()
    with pytest.raises(CachekdError, match="started with a different config"):
        _manager(run, {"name": "other"}).check_saved_config()
    _manager(run, {}).check_same_length(20)
    with pytest.raises(CachekdError, match="planned for max_steps 20"):
        _manager(run, {}).check_same_length(40)
    assert first_difference({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == "a.c: 2 then, 3 now"


# --------------------------------------------------------------------------------------------- teachers


def test_check_tokenizer_is_the_one_rule(store_path):
    store = TokenStore.open(store_path)

    def err(kind):
        return lambda x: f"{kind} {x}"

    store.check_tokenizer(fingerprint=store.tokenizer_fingerprint, vocab_size=store.vocab_size + 8,
                    tokenizer_error=err("tok"), vocab_error=err("vocab"))  # padded outputs are fine
    store.check_tokenizer(fingerprint=None, vocab_size=None, tokenizer_error=err("tok"))
    with pytest.raises(CachekdError, match="^tok other$"):
        store.check_tokenizer(fingerprint="other", vocab_size=1, tokenizer_error=err("tok"), vocab_error=err("vocab"))
    with pytest.raises(CachekdError, match="^vocab 10$"):
        store.check_tokenizer(fingerprint=None, vocab_size=10, tokenizer_error=err("tok"), vocab_error=err("vocab"))


def test_resolve_teachers_names(tmp_path, teacher_path, teacher_b_path):
    reg = tmp_path / "reg.yaml"
    reg.write_text(f"teachers:\n  big: {teacher_b_path}\n")
    got = resolve_teachers([f"coach={teacher_path}", "big"], str(reg))
    assert [n for n, _ in got] == ["coach", "big"]
    with pytest.raises(CachekdError, match="same checkpoint"):
        resolve_teachers([str(teacher_path), f"again={teacher_path}"])
    with pytest.raises(CachekdError, match="neither a checkpoint directory nor a registered name"):
        resolve_teachers(["nobody"], str(reg))
