"""Trainer: CE and distillation runs, HF output, exact resume, accumulation and torchrun equivalence, online =
offline with a full cache, no teacher needed, presets, refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cachekd.config import PRESET_DIR, list_presets, load_yaml
from cachekd.train_config import load_train_config
from cachekd.trainer import run
from tests.conftest import assert_clean_error, invoke

TINY_MODEL = {"arch": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}


def _cfg(store, out, distill=None, **over):
    d = {"name": Path(out).name, "output": str(out), "seed": 0, "model": dict(TINY_MODEL),
         "data": {"store": str(store), "batch_size": 8, "eval_windows": 16, "block_chunks": 1},
         "optim": {"lr": 3e-3, "warmup_steps": 2, "max_steps": 6}, "log_every": 1, "save_every": 0,
         "distill": distill}
    for k, v in over.items():
        node = d
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return load_train_config(d)


def _stopped_run(cfg, steps: int) -> None:
    """A run that stopped after `steps` optimizer steps with a checkpoint there (what a crash after a save leaves)."""
    from cachekd.trainer import Trainer

    t = Trainer(cfg, progress=False)
    it = t.batches()
    for _ in range(steps):
        t.train_step(next(it))
        t.step += 1
    t._save_checkpoint()
    it.close()


def _weights(run_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(Path(run_dir) / "model")).state_dict()


@pytest.fixture(scope="module")
def caches(tmp_path_factory, store_path, teacher_path, teacher_b_path):
    from click.testing import CliRunner

    d = tmp_path_factory.mktemp("trainer_caches")
    runner = CliRunner()
    for name, extra in (("topk", ["--top-k", "8"]), ("full", ["--full"])):
        r = invoke(runner, ["precompute", "--store", store_path, "--teacher", teacher_path, "--teacher", teacher_b_path,
                            "-o", d / name, "--quiet"] + extra)
        assert r.exit_code == 0, r.output
    return d


def test_train_writes_hf_model_metrics_and_config(tmp_path, store_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = run(_cfg(store_path, tmp_path / "ce"), progress=False)
    out = tmp_path / "ce"
    m = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    assert type(m).__name__ == "LlamaForCausalLM" and len(tok) == m.config.vocab_size
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in train] == list(range(1, 7))
    assert all(k in train[0] for k in ("loss", "ce", "lr", "tokens_per_s", "wall_s"))
    # 16 of the store's dev windows: a sample, labelled so in metrics.jsonl and summary.json
    assert lines[-1]["kind"] == "dev" and s["final_dev_loss_sample"] == lines[-1]["dev_loss_sample"]
    assert lines[-1]["dev_sample_windows"] == s["dev_sample_windows"] == 16 and "dev_loss" not in lines[-1]
    assert load_yaml(out / "config.yaml")["optim"]["max_steps"] == 6
    assert s["steps"] == 6 and s["mode"] == "train"
    assert train[-1]["loss"] < train[0]["loss"]


@pytest.mark.parametrize("budget,steps", [(3.5, 3), (4.0, 4), (0.0, 0)])
def test_max_time_never_overruns_the_budget(tmp_path, store_path, monkeypatch, budget, steps):
    """optim.max_time_s stops before a step that would end past the budget (here every step takes exactly 1 s
    of a fake clock): a 3.5 s budget gives 3 steps (3.0 s), not 4 (4.0 s)."""
    import cachekd.trainer as tr

    clock = [0.0]
    monkeypatch.setattr(tr.time, "perf_counter", lambda: clock[0])
    real_step = tr.Trainer.train_step

    def one_second_step(self, batch):
        clock[0] += 1.0
        return real_step(self, batch)

    monkeypatch.setattr(tr.Trainer, "train_step", one_second_step)
    s = run(_cfg(store_path, tmp_path / "t", **{"optim.max_steps": 6, "optim.max_time_s": budget}), progress=False)
    assert s["steps"] == steps and s["wall_s"] <= budget


def test_resume_gives_identical_weights(tmp_path, store_path, caches):
    distill = {"cache": str(caches / "topk"), "objective": "reverse_kl", "temperature": 1.0, "tail_mode": "uniform",
               "alpha": {"kind": "linear", "start": 0.9, "end": 0.5}, "teacher_combine": "losses"}
    full = run(_cfg(store_path, tmp_path / "a", distill, **{"optim.max_steps": 8}), progress=False)
    # interrupted: stop after 3 steps (a checkpoint each step), then resume to 8
    cfg_b = _cfg(store_path, tmp_path / "b", distill, **{"optim.max_steps": 8, "save_every": 1})
    _stopped_run(cfg_b, 3)
    resumed = run(cfg_b, resume=True, progress=False)
    assert resumed["steps"] == full["steps"] == 8
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == list(range(4, 9)) or steps == list(range(1, 9))


def _as_dict(cfg):
    from cachekd.config import to_dict

    return to_dict(cfg)


def test_gradient_accumulation_equals_big_batch(tmp_path, store_path, caches):
    distill = {"cache": str(caches / "topk"), "objective": "forward_kl", "temperature": 2.0, "teachers": ["teacher_a"]}
    a = run(_cfg(store_path, tmp_path / "a", distill), progress=False)
    b = run(_cfg(store_path, tmp_path / "b", distill, **{"data.micro_batch_size": 2}), progress=False)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    assert a["tokens"] == b["tokens"]


def test_distill_needs_no_teacher_checkpoint(tmp_path, store_path, teacher_path, caches):
    cache = tmp_path / "cache_copy"
    shutil.copytree(caches / "topk", cache)
    gone = tmp_path / "moved_teachers"
    gone.mkdir()
    manifest = json.loads((cache / "manifest.json").read_text())
    for t in manifest["teachers"]:
        assert Path(t["path"]).exists()
    # point the cache at teachers that no longer exist anywhere
    for t in manifest["teachers"]:
        t["path"] = str(gone / t["name"])
    (cache / "manifest.json").write_text(json.dumps(manifest))
    s = run(_cfg(store_path, tmp_path / "s", {"cache": str(cache), "objective": "forward_kl", "temperature": 1.0,
                                                "teacher_combine": "losses"}), progress=False)
    assert s["steps"] == 6 and s["teachers"] == ["teacher_a", "teacher_b"]


def test_online_equals_offline_with_full_cache(tmp_path, store_path, teacher_path, caches):
    base = {"objective": "forward_kl", "temperature": 2.0, "teachers": ["teacher_a"]}
    off = run(_cfg(store_path, tmp_path / "off", {**base, "cache": str(caches / "full")}), progress=False)
    on = run(_cfg(store_path, tmp_path / "on", {**base, "online": True, "teachers": [str(teacher_path)]}), progress=False)
    la = [json.loads(x) for x in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    lb = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert len(la) == len(lb) == 6
    for x, y in zip(la, lb):
        assert abs(x["kd"] - y["kd"]) <= 2e-3 * max(1.0, abs(y["kd"])), (x["kd"], y["kd"])
        assert abs(x["ce"] - y["ce"]) <= 1e-3, (x["ce"], y["ce"])
    assert on["online"] and not off["online"]
    assert on["teachers"] == [Path(teacher_path).name] and on["online_teachers"][0]["path"] == str(teacher_path)


def test_torchrun_two_processes_equal_one(tmp_path, store_path, caches):
    distill = {"cache": str(caches / "topk"), "objective": "reverse_kl", "temperature": 1.0, "teacher_combine": "losses"}
    run(_cfg(store_path, tmp_path / "one", distill), progress=False)
    cfg = _as_dict(_cfg(store_path, tmp_path / "two", distill))
    from cachekd.config import save_yaml

    save_yaml(tmp_path / "two.yaml", cfg)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "cachekd_cli", "distill", "-c", str(tmp_path / "two.yaml"), "--quiet", "--device", "cpu"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2
    wa, wb = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_and_validates(name, tmp_path):
    data = load_yaml(name)
    data.setdefault("data", {})["store"] = "x"
    data["output"] = str(tmp_path)
    cfg = load_train_config(data)
    assert cfg.model.hidden_size % cfg.model.num_heads == 0
    if "choobaca" in name:
        assert cfg.distill.chunk_size and cfg.distill.objective in ("forward_kl", "reverse_kl")
        if "-mix" in name:
            assert cfg.distill.alpha.kind == "epoch_linear" and cfg.distill.tail_mode == "bucket"
    text = (PRESET_DIR / f"{name}.yaml").read_text()
    assert text.startswith("#")  # every preset says what it is


def test_presets_cover_the_papers():
    names = set(list_presets())
    assert {"babyllama-teacher-llama-360m", "babyllama-teacher-gpt2-705m", "babyllama-student-58m",
            "babyllama2-345m"} <= names
    assert {f"choobaca-{o}-{t}-{m}" for o in ("fkl", "rkl") for t in ("1t", "2t") for m in ("mix", "nomix")} <= names
    s = load_train_config({**load_yaml("babyllama-student-58m"), "output": "x"})
    assert (s.model.hidden_size, s.model.num_layers, s.model.num_heads, s.model.intermediate_size) == (512, 16, 8, 1024)
    assert s.distill.temperature == 2.0 and s.distill.ce_weight == 0.5
    b2 = load_train_config({**load_yaml("babyllama2-345m"), "output": "x"})
    assert (b2.model.hidden_size, b2.model.num_layers, b2.model.num_heads, b2.model.num_kv_heads,
            b2.model.intermediate_size) == (960, 32, 15, 5, 2560)


# ---------------------------------------------------------------------------------------------- refusals


def test_refusals_via_cli(tmp_path, runner, store_path, caches, corpus):
    from cachekd.tokens import PrepareConfig, prepare

    base = ["distill", "--store", store_path, "--quiet", "--max-steps", "2", "--set", "model.hidden_size=32",
            "--set", "model.num_layers=1", "--set", "model.num_heads=2", "--set", "model.intermediate_size=32",
            "--batch-size", "4"]
    r = invoke(runner, base + ["--cache", caches / "topk", "-o", tmp_path / "r1", "--temperature", "3"])
    assert_clean_error(r, "temperatures 1, 2 only", "not 3")
    r = invoke(runner, base + ["--cache", caches / "topk", "-o", tmp_path / "r2", "--temperature", "1",
                               "--alpha", "0.5", "--tail-mode", "renormalize", "--teacher-combine", "losses"])
    assert_clean_error(r, "tail_mode", "--tail-mode bucket", "renormalize")
    r = invoke(runner, base + ["--cache", caches / "topk", "-o", tmp_path / "r2", "--temperature", "1",
                               "--tail-mode", "renormalize"])
    assert_clean_error(r, "--tail-mode bucket or uniform", "--teacher-combine losses")  # two top-k teachers, logits
    r = invoke(runner, base + ["--cache", caches / "topk", "-o", tmp_path / "r3", "--objective", "nonsense"])
    assert_clean_error(r, "objective")
    tok = str(Path(store_path) / "tokenizer")
    other, _ = prepare(PrepareConfig(inputs=[str(corpus)], output=str(tmp_path / "other"), seq_len=32, tokenizer=tok),
                       progress=False)
    r = invoke(runner, ["distill", "--store", other.path, "--cache", caches / "topk", "-o", tmp_path / "r4", "--quiet"])
    assert_clean_error(r, "windows of 16", "32")
    other2, _ = prepare(PrepareConfig(inputs=[str(corpus)], output=str(tmp_path / "other2"), seq_len=16, tokenizer=tok,
                                      dev_fraction=0.3), progress=False)
    r = invoke(runner, ["distill", "--store", other2.path, "--cache", caches / "topk", "-o", tmp_path / "r4", "--quiet"])
    assert_clean_error(r, "another token store")
    other3, _ = prepare(PrepareConfig(inputs=[str(corpus)], output=str(tmp_path / "other3"), seq_len=16, vocab_size=290),
                        progress=False)
    r = invoke(runner, ["distill", "--store", other3.path, "--cache", caches / "topk", "-o", tmp_path / "r4", "--quiet"])
    assert_clean_error(r, "another tokenizer")
    r = invoke(runner, base + ["--cache", tmp_path / "missing", "-o", tmp_path / "r5"])
    assert_clean_error(r, "does not exist")
    # resume with another config
    ok = invoke(runner, base + ["--cache", caches / "topk", "-o", tmp_path / "r6", "--temperature", "1",
                                "--teacher-combine", "losses", "--set", "save_every=1"])
    assert ok.exit_code == 0, ok.output
    (tmp_path / "r6" / "summary.json").unlink()
    r = invoke(runner, base + ["--cache", caches / "topk", "-o", tmp_path / "r6", "--temperature", "2",
                               "--teacher-combine", "losses", "--resume"])
    assert_clean_error(r, "different config", "temperature")
    # an existing run is never overwritten silently
    r = invoke(runner, base + ["--cache", caches / "topk", "-o", tmp_path / "r6", "--temperature", "1",
                               "--teacher-combine", "losses"])
    assert_clean_error(r, "--force")
    r = invoke(runner, ["train", "--store", store_path, "-o", tmp_path / "r7", "--set", "nonsense.key=1"])
    assert_clean_error(r, "unknown option 'nonsense'")


# ---------------------------------------------------------------------------------------------- config checks


TINY_CLI = ["--set", "model.hidden_size=32", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
            "--set", "model.intermediate_size=32", "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, store_path, caches):
    """A finished distillation run, made through the CLI (its files are checked, never changed, by the tests)."""
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("finished") / "run"
    r = invoke(CliRunner(), ["distill", "--store", store_path, "--cache", caches / "topk", "-o", out, "--max-steps",
                             "2", "--temperature", "1", "--teacher-combine", "losses", *TINY_CLI])
    assert r.exit_code == 0, r.output
    return out


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args,fragments", [
    (["--alpha", "2", "--tail-mode", "uniform"], ["distill.alpha", "--alpha", "[0, 1]", "got 2.0"]),
    (["--alpha", "-0.5", "--tail-mode", "uniform"], ["--alpha", "[0, 1]"]),
    (["--ce-weight", "1.5"], ["distill.ce_weight", "--ce-weight", "[0, 1]"]),
    (["--ce-weight", "-0.1"], ["--ce-weight", "[0, 1]"]),
    (["--temperature", "0"], ["--temperature", "positive"]),
    (["--temperature", "-2"], ["--temperature", "positive"]),
    (["--device", "banana"], ["--device", "banana", "cpu", "cuda:N", "mps"]),
    (["--max-steps", "0"], ["--max-steps", "at least 1"]),
    (["--max-steps", "-5"], ["--max-steps", "at least 1"]),
    (["--max-time", "-1"], ["optim.max_time_s (--max-time)", ">= 0", "got -1.0"]),  # 0 is allowed: no step
    (["--epochs", "0", "--set", "optim.max_steps=null"], ["optim.epochs", "at least 1"]),
    (["--chunk-size", "0"], ["--chunk-size", "at least 1"]),
    (["--set", "distill.alpha={kind: linear, start: 0.9, end: 1.5}", "--tail-mode", "uniform"],
     ["distill.alpha.end", "[0, 1]"]),
    (["--set", "distill.beta=3"], ["distill.beta", "[0, 1]"]),
    (["--set", "log_every=0"], ["log_every", "at least 1"]),
    (["--set", "keep_checkpoints=0"], ["keep_checkpoints", "at least 1"]),
    (["--set", "data.prefetch=0"], ["data.prefetch", "at least 1"]),
    (["--set", "optim.beta2=1.5"], ["optim.beta2", "[0, 1)"]),
    (["--set", "model.num_heads=0"], ["model.num_heads", "at least 1"]),
])
def test_bad_values_refused_before_the_run_directory_is_touched(tmp_path, runner, store_path, caches, finished_run,
                                                                 args, fragments):
    """Every bad value is one clean sentence naming the key/option and the range; a new output directory is not
    created, and --force over a finished run leaves every file of it as it was."""
    base = ["distill", "--store", store_path, "--cache", caches / "topk", "--teacher-combine", "losses", *TINY_CLI]
    for option, value in (("--temperature", "1"), ("--max-steps", "2")):  # an option is given once
        if option not in args:
            base += [option, value]
    r = invoke(runner, base + ["-o", tmp_path / "new", *args])
    assert_clean_error(r, *fragments)
    assert not (tmp_path / "new").exists()
    before = _snapshot(finished_run)
    r = invoke(runner, base + ["-o", finished_run, "--force", *args])
    assert_clean_error(r, *fragments)
    assert _snapshot(finished_run) == before


def test_config_checks_in_the_library():
    from cachekd.errors import CachekdError, ConfigFieldError

    # the library names the key; the CLI adds the option ("optim.max_steps (--max-steps) must be ...")
    with pytest.raises(ConfigFieldError, match=r"^optim.max_steps must be a whole number of at least 1") as e:
        load_train_config({"output": "x", "optim": {"max_steps": 0}})
    assert (e.value.key, e.value.value) == ("optim.max_steps", 0)
    with pytest.raises(CachekdError, match="distill.temperature.end"):
        load_train_config({"output": "x", "distill": {"temperature": {"kind": "linear", "start": 2, "end": 0}}})
    # an epoch_linear floor of 0 never reaches 0: allowed; a constant schedule's unused end is not checked
    load_train_config({"output": "x", "distill": {"temperature": {"kind": "epoch_linear", "start": 2, "end": 0},
                                                  "alpha": {"kind": "constant", "start": 0.5, "end": 7}}})
    load_train_config({"output": "x", "optim": {"max_steps": None, "max_time_s": 0.0}})


def test_resolve_device_names_the_valid_forms():
    from cachekd.distributed import resolve_device
    from cachekd.errors import CachekdError

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    for bad in ("banana", "meta", "CPU", ""):
        with pytest.raises(CachekdError, match="cpu, cuda, cuda:N"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(CachekdError, match="no CUDA GPU"):
            resolve_device("cuda:0")


def test_train_with_a_distill_preset_suggests_distill_null(tmp_path, runner, store_path):
    r = invoke(runner, ["train", "-c", "babyllama-student-58m", "--store", store_path, "-o", tmp_path / "x"])
    assert r.exit_code != 0 and "cachekd distill" in r.output and "--set distill=null" in r.output, r.output
    assert not (tmp_path / "x").exists()


def test_stopped_by_says_epochs_or_steps(tmp_path, store_path):
    s = run(_cfg(store_path, tmp_path / "e", **{"optim.max_steps": None, "optim.epochs": 1, "data.batch_size": 64}),
            progress=False)
    assert s["stopped_by"] == "epochs" and s["steps"] >= 1
    s = run(_cfg(store_path, tmp_path / "s", **{"optim.max_steps": 2}), progress=False)
    assert s["stopped_by"] == "steps" and s["steps"] == 2


def test_human_summary_is_rounded_and_json_exact(tmp_path, runner, store_path, caches):
    base = ["distill", "--store", store_path, "--cache", caches / "topk", "--temperature", "1", "--teacher-combine",
            "losses", "--max-steps", "2", *TINY_CLI]
    r = invoke(runner, base + ["-o", tmp_path / "h"])
    assert r.exit_code == 0, r.output
    lines = {ln.split()[0]: ln.split(None, 1)[1] for ln in r.output.splitlines()[1:] if ln.strip()}
    assert lines["teachers"] == "teacher_a, teacher_b"
    tps = lines["tokens_per_s"].replace(",", "")
    assert len(tps.replace(".", "").lstrip("0")) <= 5, lines["tokens_per_s"]  # 4-5 significant digits, not 16
    r = invoke(runner, base + ["-o", tmp_path / "j", "--json"])
    out = json.loads(r.stdout)
    assert out["teachers"] == ["teacher_a", "teacher_b"] and isinstance(out["tokens_per_s"], float)


# ---------------------------------------------------------------------------------------------- --force, --resume


def test_force_removes_only_what_cachekd_wrote(tmp_path, runner, store_path):
    out = tmp_path / "run"
    base = ["train", "--store", store_path, "-o", out, "--max-steps", "2", *TINY_CLI]
    r = invoke(runner, base)
    assert r.exit_code == 0, r.output
    (out / "mynotes.txt").write_text("my notes")
    (out / "plots").mkdir()
    (out / "plots" / "a.png").write_bytes(b"png")
    (out / "eval.json").write_text("{}")
    (out / ".summary.json.x1y2.tmp").write_text("{")  # left by a crash in the middle of an atomic write
    old_model = (out / "model" / "model.safetensors").read_bytes()
    r = invoke(runner, base + ["--force", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "kept what cachekd did not write there: mynotes.txt, plots" in r.output
    assert (out / "mynotes.txt").read_text() == "my notes" and (out / "plots" / "a.png").read_bytes() == b"png"
    assert not (out / "eval.json").exists()  # it described the replaced model
    assert not (out / ".summary.json.x1y2.tmp").exists()
    assert (out / "model" / "model.safetensors").read_bytes() != old_model
    assert load_yaml(out / "config.yaml")["seed"] == 1
    # a directory that is not a cachekd run is never touched, --force or not
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("x")
    r = invoke(runner, ["train", "--store", store_path, "-o", other, "--max-steps", "2", "--force", *TINY_CLI])
    assert_clean_error(r, "not a cachekd run")
    assert (other / "data.txt").read_text() == "x"


def test_resume_before_the_first_checkpoint_starts_from_step_zero(tmp_path, store_path):
    from cachekd.errors import CachekdError
    from cachekd.trainer import Trainer

    cfg = _cfg(store_path, tmp_path / "r", **{"optim.max_steps": 4})
    Trainer(cfg, progress=False)  # the run directory is made; then the process "dies" before any checkpoint
    assert (tmp_path / "r" / "config.yaml").exists() and not (tmp_path / "r" / "checkpoints").exists()
    with pytest.raises(CachekdError, match="different config"):
        run(_cfg(store_path, tmp_path / "r", **{"optim.max_steps": 4, "optim.lr": 1e-3}), resume=True, progress=False)
    s = run(cfg, resume=True, progress=False)
    assert s["steps"] == 4
    ref = run(_cfg(store_path, tmp_path / "ref", **{"optim.max_steps": 4}), progress=False)
    wa, wb = _weights(tmp_path / "r"), _weights(tmp_path / "ref")
    assert ref["steps"] == 4 and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_null_list_option_means_none_and_objective_aliases_in_yaml():
    from cachekd.config import from_dict
    from cachekd.train_config import DistillConfig

    assert from_dict(DistillConfig, {"teachers": None}, "distill").teachers == []
    # the short objective names the CLI accepts work in YAML and --set too, stored by the full name
    assert from_dict(DistillConfig, {"objective": "reverse"}, "distill").objective == "reverse_kl"
    assert from_dict(DistillConfig, {"objective": "fkl"}, "distill").objective == "forward_kl"


def test_yaml_config_mistakes_are_named(tmp_path):
    """A key given twice, a YAML syntax error (with its line) and a wrong type, each shown as YAML, not Python."""
    from cachekd.config import from_dict
    from cachekd.errors import CachekdError
    from cachekd.models import ModelConfig

    dup = tmp_path / "dup.yaml"
    dup.write_text("name: x\noptim:\n  lr: 1e-3\n  lr: 0.5\n")
    with pytest.raises(CachekdError, match=r"\(line 4, column 3\): the key 'lr' is given twice"):
        load_yaml(dup)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noptim:\n  lr: 1e-3\n warmup: 3\n")
    with pytest.raises(CachekdError, match=r"not valid YAML \(line 4"):
        load_yaml(bad)
    with pytest.raises(CachekdError, match=r"model.num_layers must be a number \(got true\)"):
        from_dict(ModelConfig, {"num_layers": True}, "model")
    for name in list_presets():  # the shipped presets pass the strict loader
        load_yaml(name)


def test_resume_refuses_another_length_and_finished_runs(tmp_path, store_path):
    """A resumed run keeps its planned max_steps (its cosine schedule ends there); a finished run has nothing to
    resume."""
    from cachekd.errors import CachekdError

    cfg = _cfg(store_path, tmp_path / "r", **{"optim.max_steps": 6})
    _stopped_run(cfg, 2)
    with pytest.raises(CachekdError, match="planned for max_steps 6 and this command asks for 12.*max_steps 6") as info:
        run(_cfg(store_path, tmp_path / "r", **{"optim.max_steps": 12}), resume=True, progress=False)
    from cachekd_cli.config_options import error_message
    assert "resume with --max-steps 6, or start a new run (another --output, or --force)" in error_message(
        info.value, "distill")
    assert run(cfg, resume=True, progress=False)["steps"] == 6
    with pytest.raises(CachekdError, match="already finished; nothing to resume"):
        run(cfg, resume=True, progress=False)


# ---------------------------------------------------------------------------------------------- interrupts

# The CLI in a subprocess with every optimizer step slowed by 50 ms (the weights are unaffected), so that the
# signal reliably arrives mid-run.
SLOW_CLI = ("import sys, time\n"
            "import cachekd.trainer as t\n"
            "step = t.Trainer.train_step\n"
            "def slow(self, batch):\n"
            "    time.sleep(0.05)\n"
            "    return step(self, batch)\n"
            "t.Trainer.train_step = slow\n"
            "from cachekd_cli.main import main\n"
            "sys.argv[0] = 'cachekd'\n"
            "main()\n")


def _train_lines(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for ln in p.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if rec.get("kind") == "train":
            out.append(rec)
    return out


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupt_saves_a_checkpoint_at_the_step_and_resume_is_exact(tmp_path, store_path, caches, sig):
    import signal
    import time

    distill = {"cache": str(caches / "topk"), "objective": "forward_kl", "temperature": 1.0,
               "teacher_combine": "losses"}
    cfg = _cfg(store_path, tmp_path / "run", distill, **{"optim.max_steps": 60, "save_every": 1000})
    from cachekd.config import save_yaml

    save_yaml(tmp_path / "cfg.yaml", cfg)
    args = ["distill", "-c", str(tmp_path / "cfg.yaml"), "--quiet", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_train_lines(tmp_path / "run")) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no training progress"
            time.sleep(0.02)
        proc.send_signal(getattr(signal, sig))
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + getattr(signal, sig), stdout + stderr
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    step = _train_lines(tmp_path / "run")[-1]["step"]
    assert 3 <= step < 60
    ckpt = tmp_path / "run" / "checkpoints" / f"step_{step:08d}.pt"
    assert ckpt.exists(), list((tmp_path / "run").rglob("*"))
    assert f"at step {step} of 60" in stderr and str(ckpt) in stderr, stderr
    cont = stderr.split("Continue with: ", 1)[1].strip()
    assert cont.startswith("cachekd distill") and cont.endswith("--resume") and "--force" not in cont, cont
    assert not (tmp_path / "run" / "running.json").exists()
    assert not (tmp_path / "run" / "summary.json").exists()
    # the printed command continues the run (here in-process, without the slow-down)
    import shlex

    from click.testing import CliRunner

    r = invoke(CliRunner(), shlex.split(cont)[1:])
    assert r.exit_code == 0, r.output
    steps = [x["step"] for x in _train_lines(tmp_path / "run")]
    assert steps == list(range(1, 61))
    ref = run(_cfg(store_path, tmp_path / "ref", distill, **{"optim.max_steps": 60, "save_every": 1000}),
              progress=False)
    wa, wb = _weights(tmp_path / "run"), _weights(tmp_path / "ref")
    assert ref["steps"] == 60 and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_interrupt_handler_is_restored_and_second_signal_aborts(tmp_path, store_path, monkeypatch):
    """In-process: the first SIGINT asks for a stop at the next step boundary; a second one raises
    KeyboardInterrupt at once; the previous handler is back afterwards, whatever happened."""
    import signal

    from cachekd.trainer import Trainer, TrainingInterrupted

    before = signal.getsignal(signal.SIGINT)
    t = Trainer(_cfg(store_path, tmp_path / "a", **{"optim.max_steps": 20}), progress=False)
    real = Trainer.train_step
    calls = []

    def step_then_signal(self, batch):
        out = real(self, batch)
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    with pytest.raises(TrainingInterrupted) as e:
        t.train()
    assert e.value.step == 2 and e.value.checkpoint.exists() and signal.getsignal(signal.SIGINT) == before

    t = Trainer(_cfg(store_path, tmp_path / "b", **{"optim.max_steps": 20}), progress=False)
    calls.clear()

    def two_signals(self, batch):
        out = real(self, batch)
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", two_signals)
    with pytest.raises(KeyboardInterrupt) as e:
        t.train()
    assert type(e.value) is KeyboardInterrupt  # aborted at once, not stopped at a step boundary
    assert signal.getsignal(signal.SIGINT) == before
    assert not (tmp_path / "b" / "running.json").exists()


def test_interrupt_message_from_the_run_directory(tmp_path, store_path):
    from cachekd.rundir import run_state

    assert run_state(tmp_path / "none") == {"exists": False, "is_run": False, "finished": False,
                                            "last_checkpoint_step": None}
    d = tmp_path / "r"
    (d / "checkpoints").mkdir(parents=True)
    (d / "config.yaml").write_text("name: r\n")
    (d / "checkpoints" / "step_00000042.pt").write_bytes(b"")
    assert run_state(d)["last_checkpoint_step"] == 42 and not run_state(d)["finished"]


# ---------------------------------------------------------------------------------------------- presets


def test_presets_list_json_and_complete_descriptions(runner):
    r = invoke(runner, ["presets", "--json"])
    assert r.exit_code == 0, r.output
    items = json.loads(r.stdout)
    assert [x["name"] for x in items] == list_presets()
    for x in items:
        assert x["description"] and x["description"].endswith((".", ")")), x  # a whole sentence, not cut off
    r = invoke(runner, ["presets"])
    assert "babyllama2-345m" in r.output and "α = 0.5." in r.output
    assert "Example" in invoke(runner, ["presets", "--help"]).output


def test_presets_show_a_name_or_a_yaml_file(runner, tmp_path):
    r = invoke(runner, ["presets", "--show", "tiny-student"])
    assert r.exit_code == 0 and (PRESET_DIR / "tiny-student.yaml").read_text() in r.output
    f = tmp_path / "config.yaml"
    f.write_text("name: mine\noptim:\n  lr: 0.001\n")
    r = invoke(runner, ["presets", "--show", f, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"name": str(f), "description": None, "yaml": f.read_text()}
    assert_clean_error(invoke(runner, ["presets", "--show", "no-such-preset"]), "not found", "tiny-student")


@pytest.mark.parametrize("name,count", [("tiny-teacher", 1_303_680), ("tiny-student", 355_136)])
def test_preset_parameter_counts_are_right(name, count):
    from cachekd.config import from_dict, preset_description
    from cachekd.models import ModelConfig, build_model, count_parameters

    m = build_model(from_dict(ModelConfig, load_yaml(name)["model"], "model"), 2000, 64)
    assert count_parameters(m) == count
    assert f"{count / 1e6:.2f}M parameters at vocab 2000" in preset_description(name)


def test_one_coach_preset_refuses_a_two_teacher_cache(tmp_path, runner, store_path, caches):
    """choobaca-*-1t-* declares one teacher (distill.num_teachers: 1): on a two-teacher cache it names them and the
    way out instead of silently averaging both; naming one runs, and a 2t preset refuses a single teacher."""
    base = ["distill", "--store", store_path, "--cache", caches / "topk", "--max-steps", "1",
            "--precision", "fp32"] + TINY_CLI
    r = invoke(runner, base + ["-c", "choobaca-rkl-1t-nomix", "-o", tmp_path / "one"])
    assert_clean_error(r, "written for 1 teacher", "holds 2: teacher_a, teacher_b", "--teachers teacher_a",
                       "distill.num_teachers=null")
    assert not (tmp_path / "one").exists()
    ok = invoke(runner, base + ["-c", "choobaca-rkl-1t-nomix", "-o", tmp_path / "one", "--teachers", "teacher_b"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["teachers"] == ["teacher_b"]
    r = invoke(runner, base + ["-c", "choobaca-fkl-2t-nomix", "-o", tmp_path / "two", "--teachers", "teacher_a"])
    assert_clean_error(r, "written for 2 teachers", "selects 1: teacher_a")
    # what runs did before the check: every teacher of the cache, asked for explicitly
    ok = invoke(runner, base + ["-c", "choobaca-rkl-1t-mix", "-o", tmp_path / "all", "--set",
                                "distill.num_teachers=null"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "all" / "summary.json").read_text())["teachers"] == ["teacher_a", "teacher_b"]


def test_teacher_count_is_not_part_of_the_checkpoint_identity():
    """Checkpoints saved before distill.num_teachers existed (their config.yaml lacks it) still resume: the count
    is a check on the teachers (checked again when they are opened), not a training value."""
    from cachekd.train_config import config_identity

    base = {"output": "x", "distill": {"cache": "c", "teachers": ["a"]}}
    old = load_train_config(base)
    new = load_train_config({**base, "distill": {**base["distill"], "num_teachers": 1}})
    assert new.distill.num_teachers == 1 and old.distill.num_teachers is None
    assert config_identity(old) == config_identity(new)
    with pytest.raises(Exception, match="num_teachers"):
        load_train_config({**base, "distill": {**base["distill"], "num_teachers": 0}})


def test_distill_says_when_the_top_k_holds_little_of_the_teachers_mass(tmp_path, runner, store_path, caches):
    """The tiny teachers' top-8 holds a few percent of their mass: distill says so at start with the number from
    the manifest and the options, records the mass in summary.json, and says nothing with tail_mode renormalize."""
    from cachekd.cache.reader import LogitCache
    from cachekd.teachers import LOW_TOPK_MASS

    cache = LogitCache.open(caches / "topk")
    mass = cache.captured_topk_mass("teacher_a", 2.0)[0]
    assert mass < LOW_TOPK_MASS
    base = ["distill", "--store", store_path, "--cache", caches / "topk", "--max-steps", "1", "--teachers",
            "teacher_a", "--temperature", "2"] + TINY_CLI
    r = invoke(runner, base + ["-o", tmp_path / "bucket", "--tail-mode", "bucket"])
    assert r.exit_code == 0, r.output
    assert f"top-8 holds {mass:.2f} of the probability of teacher 'teacher_a' at τ=2" in r.stderr, r.stderr
    for fragment in ("from the cache manifest", "below 0.5", "--top-k", "--tail-mode renormalize", "without --top-k"):
        assert fragment in r.stderr, (fragment, r.stderr)
    s = json.loads((tmp_path / "bucket" / "summary.json").read_text())
    assert s["captured_topk_mass"] == {"teacher_a": pytest.approx(mass, abs=1e-5)}
    r = invoke(runner, base + ["-o", tmp_path / "renorm", "--tail-mode", "renormalize"])
    assert r.exit_code == 0, r.output
    assert "probability at τ" not in r.stderr


def test_periodic_dev_loss_is_a_labelled_sample_from_every_source(tmp_path):
    """data.eval_windows < the dev split: the trainer scores the fixed per-source sample (`dev_sample`), not the
    first windows (all from the first source), and labels it; eval_windows 0 scores the whole split as dev_loss."""
    from transformers import AutoModelForCausalLM

    from cachekd.dev_loss import dev_loss
    from cachekd.tokens import PrepareConfig, TokenStore, prepare
    from cachekd.tokens.reader import dev_sample
    from tests.test_prepare import _one_document_corpus

    store, _ = prepare(PrepareConfig(inputs=[str(_one_document_corpus(tmp_path / "corpus"))],
                                     output=str(tmp_path / "store"), seq_len=16, vocab_size=300, dev_fraction=0.1),
                       progress=False)
    n_dev = store.num_windows("dev")
    k = n_dev // 2
    s = run(_cfg(store.path, tmp_path / "sample", **{"data.eval_windows": k, "optim.max_steps": 2}), progress=False)
    sample = dev_sample(TokenStore.open(store.path), k)
    assert min(sample.per_source.values()) >= 1  # b.txt (a one-document source) is in it
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sample" / "model"))
    want = dev_loss(model, store, windows=sample.windows, progress=False)["loss"]
    first = dev_loss(model, store, max_windows=k, progress=False)["loss"]
    assert s["final_dev_loss_sample"] == pytest.approx(want, rel=1e-5) and s["dev_sample_windows"] == k
    assert "final_dev_loss" not in s and want != pytest.approx(first, rel=1e-6)
    whole = run(_cfg(store.path, tmp_path / "whole", **{"data.eval_windows": 0, "optim.max_steps": 2}),
                progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "whole" / "model"))
    assert whole["final_dev_loss"] == pytest.approx(dev_loss(model, store, progress=False)["loss"], rel=1e-5)
    assert "final_dev_loss_sample" not in whole and "dev_sample_windows" not in whole


def test_a_temperature_schedule_needs_a_full_cache(tmp_path, runner, store_path, caches):
    """A top-k cache holds its normalisers for the temperatures it was built with only: a τ schedule is refused in
    one sentence naming them, before the run directory is made; a full cache takes it."""
    base = ["distill", "--store", store_path, "--max-steps", "1", "--teacher-combine", "losses", "--set",
            "distill.temperature={kind: linear, start: 2, end: 1}", *TINY_CLI]
    r = invoke(runner, base + ["--cache", caches / "topk", "-o", tmp_path / "topk"])
    assert_clean_error(r, "a temperature schedule needs a --full cache", "top-k cache")
    assert not (tmp_path / "topk").exists()
    r = invoke(runner, base + ["--cache", caches / "full", "-o", tmp_path / "full", "--quiet"])
    assert r.exit_code == 0, r.output
