"""benchmarks/gpu_check.py: its CPU smoke run goes through the whole job (the same code path as on a GPU), and
without a CUDA device and without --cpu-smoke it refuses with one sentence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the script would run the real check")
def test_gpu_check_refuses_without_cuda():
    r = _run()
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--cpu-smoke" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_gpu_check_cpu_smoke(tmp_path):
    r = _run("--cpu-smoke", "--results-dir", str(tmp_path / "results"), "--work", str(tmp_path / "work"))
    assert r.returncode == 0, r.stdout + r.stderr
    (result,) = (tmp_path / "results").glob("gpu_check_*.md")
    text = result.read_text()
    for figure in ("precompute positions/s", "precompute ÷ bare teacher forward", "teacher MFU",
                   "student step, CE", "student step, cached", "student step, online", "data wait share, cached",
                   "peak GPU memory, precompute"):
        assert figure in text and figure in r.stdout, figure
    assert "CPU smoke run" in text and "## Machine" in text
    # every student ran and was profiled; the cache was written by precompute
    work = tmp_path / "work"
    for label in ("CE", "cached", "online"):
        for run in ("timed", "profiled"):
            assert (work / f"student-{label}-{run}" / "summary.json").exists(), (label, run)
    assert (work / "cache").is_dir() and (work / "teacher" / "model").is_dir()


def _module():
    import importlib.util

    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_matches_the_llama_closed_form(tied):
    """6 · (L · (4d² + 3·d·I) + V·d) + 12·L·d·T for a LLaMA with full attention heads, tied output or not."""
    from cachekd.models import ModelConfig, build_model

    gc = _module()
    L, d, inter, V, T = 3, 64, 160, 300, 48
    model = build_model(ModelConfig(arch="llama", hidden_size=d, num_layers=L, num_heads=4, intermediate_size=inter),
                        vocab_size=V, max_positions=64, special={"pad": 0, "bos": 1, "eos": 2})
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    expected = 6.0 * (L * (4 * d * d + 3 * d * inter) + V * d) + 12.0 * L * d * T
    assert gc.flops_per_token(model, T) == expected


def test_gpu_check_fails_loudly(tmp_path):
    gc = _module()
    with pytest.raises(gc.CheckFailed, match="does not exist|not found|no such"):
        gc.cachekd("prepare", tmp_path / "missing.txt", "-o", tmp_path / "tok", "--quiet")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0, "ce": 2.0}\n'
                                       '{"kind": "train", "step": 2, "loss": NaN, "ce": 2.0}\n')
    with pytest.raises(gc.CheckFailed, match="loss is nan at step 2"):
        gc.read_train_lines(run)
