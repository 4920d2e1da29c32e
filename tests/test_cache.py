"""The logit cache: contents against the teacher, float64 tail_lse, full mode, resume after kill -9, several
teachers, --part and torchrun equal to one process, and every refusal through the CLI."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cachekd.cache.reader import LogitCache
from cachekd.tokens import TokenStore
from tests.conftest import assert_clean_error, invoke, make_teacher, write_corpus


def _precompute(runner, store, teachers, out, *extra):
    args = ["precompute", "--store", store, "-o", out, "--quiet"]
    for t in teachers:
        args += ["--teacher", t]
    r = invoke(runner, args + list(extra))
    assert r.exit_code == 0, r.output
    return LogitCache.open(out)


def _teacher_logits(teacher: Path, tokens: np.ndarray) -> torch.Tensor:
    from cachekd.models import load_model

    m = load_model(teacher).eval()
    with torch.inference_mode():
        return m(input_ids=torch.from_numpy(tokens.astype(np.int64))).logits.double()


def _all_arrays(cache: LogitCache) -> dict[str, np.ndarray]:
    import zarr

    out = {}
    for split in cache.splits():
        for t in cache.teachers:
            for name in ("ids", "logprobs", "tail_lse", "logits"):
                p = cache.path / split / t / name
                if p.exists():
                    out[f"{split}/{t}/{name}"] = zarr.open_array(str(p), mode="r")[:]
    return out


def test_topk_matches_teacher_and_tail_lse_float64(tmp_path, runner, store_path, teacher_path):
    cache = _precompute(runner, store_path, [teacher_path], tmp_path / "c", "--top-k", "8", "--temperatures", "0.5,1,2")
    store = TokenStore.open(store_path)
    n = store.num_windows("train")
    tokens = store.read("train", 0, n)
    z = _teacher_logits(teacher_path, tokens)                      # (n, L, V) float64
    block = cache.read("train", 0, n)[cache.teachers[0]]
    # ids: the same set as torch.topk (up to ties within fp rounding), sorted in the cache
    ref_ids = torch.topk(z, 8, dim=-1).indices.sort(-1).values.numpy()
    assert (block.ids == ref_ids).mean() > 0.999
    # stored τ=1 log-probabilities within 2^-10 of the float64 truth
    logp = torch.log_softmax(z, -1).numpy()
    lp_at = np.take_along_axis(logp, block.ids, -1)
    assert np.abs(block.logprobs - lp_at).max() <= 2**-10 + 1e-6
    # tail_lse: independent float64 reference, logsumexp over non-top-k of log p / τ
    for ti, tau in enumerate((0.5, 1.0, 2.0)):
        masked = logp.copy()
        np.put_along_axis(masked, block.ids, -np.inf, -1)
        m = masked / tau
        mx = m.max(-1, keepdims=True)
        ref = (mx + np.log(np.exp(m - mx).sum(-1, keepdims=True)))[..., 0]
        assert np.abs(block.tail_lse[..., ti] - ref).max() <= 2**-10 + 1e-5, tau
    # manifest stats are consistent: captured mass at τ=1 from the reference
    head = np.logaddexp.reduce(lp_at, axis=-1)
    mf = json.loads((tmp_path / "c" / "manifest.json").read_text())
    mass = mf["stats"]["train"][cache.teachers[0]]["mean_topk_mass"]["1.0"]
    assert abs(mass - np.exp(head).mean()) < 1e-3
    assert mf["complete"] is True and mf["bytes_per_position"] > 0


def test_full_mode_round_trip(tmp_path, runner, store_path, teacher_path):
    cache = _precompute(runner, store_path, [teacher_path], tmp_path / "c", "--full")
    store = TokenStore.open(store_path)
    tokens = store.read("dev", 0, store.num_windows("dev"))
    z = _teacher_logits(teacher_path, tokens).float()
    got = cache.read("dev", 0, len(tokens))[cache.teachers[0]].logits
    np.testing.assert_array_equal(got, z.half().numpy())
    text = invoke(runner, ["info", tmp_path / "c"]).output
    assert "full logits" in text and "None" not in text, text
    info = json.loads(invoke(runner, ["info", tmp_path / "c", "--json"]).output)
    assert info["mode"] == "full" and info["k"] is None and info["temperatures"] == []
    # verify --recompute measures the fp16 storage error against the fp32 logits: above 0, within fp16 rounding
    r = invoke(runner, ["verify", tmp_path / "c", "--recompute", "4", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    diff = json.loads(r.output)["recompute"][cache.teachers[0]]["max_abs_logit_diff"]
    assert 0 < diff <= float(z.abs().max()) * 2 ** -11 * 1.01


def test_two_teachers_and_info(tmp_path, runner, store_path, teacher_path, teacher_b_path):
    cache = _precompute(runner, store_path, [teacher_path, f"coach={teacher_b_path}"], tmp_path / "c", "--top-k", "4")
    assert cache.teachers == ["teacher_a", "coach"]
    blocks = cache.read("train", 0, 3)
    assert not np.array_equal(blocks["teacher_a"].ids, blocks["coach"].ids)
    info = json.loads(invoke(runner, ["info", tmp_path / "c", "--json"]).output)
    assert info["kind"] == "logit cache" and [t["name"] for t in info["teachers"]] == ["teacher_a", "coach"]
    assert "train/coach" in info["teacher_stats"]
    # structured values, not the text table's strings
    assert info["complete"] is True and info["k"] == 4 and info["temperatures"] == [1.0, 2.0]
    st = TokenStore.open(store_path)
    assert info["chunks"] == {s: {"done": st.num_chunks(s), "total": st.num_chunks(s)} for s in ("train", "dev")}
    coach = info["teachers"][1]
    assert coach["model_type"] == "gpt2" and isinstance(coach["num_params"], int) and coach["num_params"] > 0
    assert coach["path"] == str(Path(teacher_b_path).resolve()) and coach["fingerprint"] == cache.meta["teachers"][1]["fingerprint"]
    assert info["checksums"] is True and isinstance(info["bytes_on_disk"], int) and info["bytes_per_position"] > 0
    text = invoke(runner, ["info", tmp_path / "c"]).output
    assert re.search(r"temperatures +1, 2\n", text) and re.search(r"train +\d+/\d+ chunks\n", text), text
    assert re.search(r"coach +gpt2, [\d.]+M params, ", text) and re.search(r"complete +True\n", text), text
    r = invoke(runner, ["verify", tmp_path / "c", "--recompute", "3"])
    assert r.exit_code == 0 and "OK" in r.output, r.output
    assert cache.select_teachers(["coach"]) == ["coach"] and cache.select_teachers(None) == ["teacher_a", "coach"]
    with pytest.raises(Exception, match="teacher 'coach' is named twice"):
        cache.select_teachers(["coach", "teacher_a", "coach"])


def test_registry_name_and_padded_vocab(tmp_path, runner, store_path):
    padded = make_teacher(store_path, tmp_path / "padded", extra_vocab=7)
    (tmp_path / "reg.yaml").write_text(f"teachers:\n  llama: {padded}\n")
    cache = _precompute(runner, store_path, ["llama"], tmp_path / "c", "--registry", tmp_path / "reg.yaml", "--top-k", "4")
    assert cache.teachers == ["llama"]
    assert cache.meta["teachers"][0]["padded_logits_dropped"] == 7
    assert cache.read("train", 0, 2)["llama"].ids.max() < TokenStore.open(store_path).vocab_size


def _big_store(tmp_path: Path) -> Path:
    from cachekd.tokens import PrepareConfig, prepare

    c = write_corpus(tmp_path / "big.txt", num_docs=1500, seed=3)
    out = tmp_path / "bigstore"
    prepare(PrepareConfig(inputs=[str(c)], output=str(out), seq_len=128, vocab_size=300, dev_fraction=0.05),
            progress=False)
    return out


def precompute_killed_mid_run(store, teacher, out, flags) -> tuple[Path, list[str]]:
    """Start `cachekd precompute` in a subprocess (each chunk write slowed by 0.3 s), SIGKILL it inside a chunk's write
    once two chunks are done, and check it left an incomplete cache; returns the output and the command to resume."""
    env = dict(os.environ, CACHEKD_TEST_WRITE_PAUSE_S="0.3", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "cachekd_cli", "precompute", "--store", str(store), "--teacher", str(teacher),
           "-o", str(out), *flags, "--quiet"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        done = list((out / "done" / "train").glob("*.json")) if (out / "done" / "train").exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.05)
    time.sleep(0.15)  # land inside the next chunk's write
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    assert 2 <= len(list((out / "done" / "train").glob("*.json"))) < TokenStore.open(store).num_chunks("train")
    return out, cmd


def test_resume_after_kill_gives_identical_arrays(tmp_path, runner):
    store = _big_store(tmp_path)
    teacher = make_teacher(store, tmp_path / "t", hidden=32)
    st = TokenStore.open(store)
    assert st.num_chunks("train") >= 8
    ref = _precompute(runner, store, [teacher], tmp_path / "ref", "--top-k", "8")
    out, cmd = precompute_killed_mid_run(store, teacher, tmp_path / "killed", ["--top-k", "8"])
    with pytest.raises(Exception, match="incomplete"):
        LogitCache.open(out)
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = _all_arrays(ref), _all_arrays(LogitCache.open(out))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_parts_and_torchrun_equal_one_process(tmp_path, runner, store_path, teacher_path):
    ref = _precompute(runner, store_path, [teacher_path], tmp_path / "ref", "--top-k", "8")
    parts = tmp_path / "parts"
    r1 = invoke(runner, ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", parts, "--top-k", "8",
                         "--part", "1/2", "--quiet"])
    assert r1.exit_code == 0 and "remain" in r1.output, r1.output
    assert not (parts / "manifest.json").exists()
    _precompute(runner, store_path, [teacher_path], parts, "--top-k", "8", "--part", "2/2")
    assert (parts / "manifest.json").exists()
    tr = tmp_path / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "cachekd_cli", "precompute", "--store", str(store_path), "--teacher", str(teacher_path),
                        "-o", str(tr), "--top-k", "8", "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    a = _all_arrays(ref)
    for other in (LogitCache.open(parts), LogitCache.open(tr)):
        b = _all_arrays(other)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------------------------------- refusals


def test_refusals(tmp_path, runner, store_path, teacher_path, corpus):
    base = ["precompute", "--store", store_path, "--quiet"]
    assert_clean_error(invoke(runner, base + ["--teacher", tmp_path / "nope", "-o", tmp_path / "o1"]),
                       "neither a checkpoint directory nor a registered name")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(teacher_path, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    assert_clean_error(invoke(runner, base + ["--teacher", corrupt, "-o", tmp_path / "o2"]), "cannot load the checkpoint")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(teacher_path / "config.json", noweights / "config.json")
    assert_clean_error(invoke(runner, base + ["--teacher", noweights, "-o", tmp_path / "o3"]), "no weights")
    # a teacher with a smaller vocabulary than the store's tokenizer
    small = tmp_path / "small"
    from cachekd.models import ModelConfig, build_model

    build_model(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), 100, 16).save_pretrained(small)
    r = invoke(runner, base + ["--teacher", small, "-o", tmp_path / "o4"])
    assert_clean_error(r, "vocabulary of 100", str(TokenStore.open(store_path).vocab_size))
    # a teacher with another tokenizer
    from cachekd.tokens import PrepareConfig, prepare

    other_store, _ = prepare(PrepareConfig(inputs=[str(corpus)], output=str(tmp_path / "other_store"), seq_len=16,
                                           vocab_size=290), progress=False)
    other_teacher = make_teacher(other_store.path, tmp_path / "other_teacher", extra_vocab=10)
    assert_clean_error(invoke(runner, base + ["--teacher", other_teacher, "-o", tmp_path / "o5"]), "different tokenizer")
    assert_clean_error(invoke(runner, base + ["--teacher", teacher_path, "-o", tmp_path / "o6", "--top-k", "100000"]),
                       "larger than the vocabulary")
    assert_clean_error(invoke(runner, base + ["--teacher", teacher_path, "-o", tmp_path / "o7", "--temperatures", "0"]),
                       "positive")
    assert_clean_error(invoke(runner, base + ["--teacher", teacher_path, "-o", tmp_path / "o8", "--part", "3/2"]),
                       "--part")
    # a cache started with other settings is not overwritten
    _precompute(runner, store_path, [teacher_path], tmp_path / "c", "--top-k", "4")
    before = _all_arrays(LogitCache.open(tmp_path / "c"))
    assert_clean_error(invoke(runner, base + ["--teacher", teacher_path, "-o", tmp_path / "c", "--top-k", "8"]),
                       "different settings", "k 4 vs 8")
    after = _all_arrays(LogitCache.open(tmp_path / "c"))
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # a cache built from another token store is refused by verify (and by distill, see test_trainer)
    r = invoke(runner, ["verify", tmp_path / "c", "--store", other_store.path])
    assert r.exit_code == 1 and "another tokenizer" in r.output


def test_nan_teacher_names_the_window(tmp_path, runner, store_path, teacher_path):
    from cachekd.models import load_model

    store = TokenStore.open(store_path)
    tokens = store.read("train", 0, store.num_windows("train"))
    bad_token = int(tokens[5, 3])
    first = int(np.nonzero((tokens == bad_token).any(-1))[0][0])
    m = load_model(teacher_path)
    with torch.no_grad():
        m.get_input_embeddings().weight[bad_token] = float("nan")
    nan_dir = tmp_path / "nan_teacher"
    m.save_pretrained(nan_dir)
    store.load_tokenizer().save_pretrained(nan_dir)
    r = invoke(runner, ["precompute", "--store", store_path, "--teacher", nan_dir, "-o", tmp_path / "c", "--quiet",
                        "--splits", "train"])
    assert_clean_error(r, "NaN or inf", f"train window {first}")


def test_disk_full_marks_nothing_done_and_resumes(tmp_path, runner, store_path, teacher_path, monkeypatch):
    from cachekd.cache import writer as cw

    real_write = cw.ChunkWriter.write
    calls = {"n": 0}

    def failing_write(self, split, chunk, results, stats):
        calls["n"] += 1
        if calls["n"] == 2:  # the second chunk: write part of it, then the disk is full
            arr = self._arr(split, next(iter(results)), "ids")
            arr[self.plan.chunk_range(split, chunk)[0]] = 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, split, chunk, results, stats)

    monkeypatch.setattr(cw.ChunkWriter, "write", failing_write)
    out = tmp_path / "c"
    r = invoke(runner, ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", out, "--quiet",
                        "--top-k", "4", "--batch-size", "64"])
    assert_clean_error(r, "disk is full")
    done = sorted(p.name for p in (out / "done").rglob("*.json"))
    assert len(done) == 1  # only the first chunk, which was fully written
    monkeypatch.setattr(cw.ChunkWriter, "write", real_write)
    cache = _precompute(runner, store_path, [teacher_path], out, "--top-k", "4")
    ref = _precompute(runner, store_path, [teacher_path], tmp_path / "ref", "--top-k", "4")
    a, b = _all_arrays(ref), _all_arrays(cache)
    assert all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ damage and repair

TINY_STUDENT = ["--quiet", "--max-steps", "3", "--set", "model.hidden_size=32", "--set", "model.num_layers=1",
                "--set", "model.num_heads=2", "--set", "model.intermediate_size=32", "--batch-size", "8",
                "--temperature", "1"]


def _chunk_file(cache_dir: Path, split: str, teacher: str, name: str, chunk: int) -> Path:
    return cache_dir / split / teacher / name / "c" / str(chunk) / "0" / "0"


def _chunk_mtimes(cache_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(cache_dir)): p.stat().st_mtime_ns for p in cache_dir.glob("*/*/*/c/*/0/0")}


def test_truncated_chunk_clean_error_then_repair_recomputes_only_it(tmp_path, runner, store_path, teacher_path):
    from cachekd.cache.reader import DamagedChunkError

    out = tmp_path / "c"
    ref = _all_arrays(_precompute(runner, store_path, [teacher_path], out, "--top-k", "8"))
    st = TokenStore.open(store_path)
    assert st.num_chunks("train") >= 4
    bad = _chunk_file(out, "train", "teacher_a", "logprobs", 3)
    os.truncate(bad, 1000)
    cache = LogitCache.open(out)
    with pytest.raises(DamagedChunkError) as e:
        cache.read_chunk("train", 3)
    assert (e.value.split, e.value.teacher, e.value.array, e.value.chunk) == ("train", "teacher_a", "logprobs", 3)
    with pytest.raises(DamagedChunkError, match="chunk 3"):
        cache.read("train", 0, st.num_windows("train"))  # a range over several chunks still names the bad one
    cache.read_chunk("train", 2)  # the others read as before
    # distill (loader thread, and DataLoader worker processes) stops with one sentence that says what to do
    w0, w1 = 3 * st.chunk_windows, min(4 * st.chunk_windows, st.num_windows("train")) - 1
    for i, extra in enumerate(([], ["--set", "data.num_workers=1"])):
        r = invoke(runner, ["distill", "--store", store_path, "--cache", out, "-o", tmp_path / f"run{i}"]
                   + TINY_STUDENT + extra)
        assert_clean_error(r, "train split's chunk 3", f"windows {w0} to {w1}", "teacher 'teacher_a'", "logprobs",
                           "checksum mismatch", f"cachekd verify {out} --repair", "re-run `cachekd precompute`")
        # one line of error (beside distill's note that these tiny teachers' top-8 holds little of their mass)
        assert len([ln for ln in r.output.strip().splitlines() if not ln.startswith("note:")]) == 1, r.output
    # verify names it and ends the line with the way out, changing nothing
    markers = sorted(p.name for p in (out / "done" / "train").iterdir())
    r = invoke(runner, ["verify", out, "--quiet"])
    assert r.exit_code == 1, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("problem:"))
    assert "train chunk 3, teacher 'teacher_a': the logprobs data cannot be read (checksum mismatch)" in line, line
    assert line.endswith("re-run `cachekd precompute` with the same arguments to recompute the damaged chunks"), line
    assert sorted(p.name for p in (out / "done" / "train").iterdir()) == markers and (out / "manifest.json").exists()
    # --repair: the chunk's done-marker and the manifest go, the cache reads as incomplete
    r = invoke(runner, ["verify", out, "--quiet", "--repair"])
    assert r.exit_code == 1 and "Marked 1 chunk(s) for recomputation (train 3)" in r.output, r.output
    assert f"cachekd precompute --store {Path(store_path).resolve()} --teacher teacher_a=" in r.output, r.output
    assert not (out / "manifest.json").exists() and not (out / "done" / "train" / "0000003.json").exists()
    assert len(list((out / "done" / "train").iterdir())) == len(markers) - 1
    info = json.loads(invoke(runner, ["info", out, "--json"]).output)
    assert info["complete"] is False and info["missing"] == {"manifest": True, "chunks_not_done": {"train": [3]}}
    assert info["chunks"]["train"] == {"done": len(markers) - 1, "total": len(markers)}
    assert_clean_error(invoke(runner, ["distill", "--store", store_path, "--cache", out, "-o", tmp_path / "run9"]
                              + TINY_STUDENT), "incomplete", "precompute")
    # the same precompute command recomputes exactly that chunk; every other chunk file is left alone
    before = _chunk_mtimes(out)
    r = invoke(runner, ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", out, "--top-k", "8",
                        "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["complete"] is True and res["positions_computed"] == (w1 - w0 + 1) * st.seq_len
    after = _chunk_mtimes(out)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {f"train/teacher_a/{n}/c/3/0/0" for n in ("ids", "logprobs", "tail_lse")}, changed
    got = _all_arrays(LogitCache.open(out))
    for k in ref:
        np.testing.assert_array_equal(ref[k], got[k], err_msg=k)
    r = invoke(runner, ["verify", out, "--quiet"])
    assert r.exit_code == 0 and r.output.strip().endswith("OK"), r.output


def test_overwritten_bytes_fail_the_checksum(tmp_path, runner, store_path, teacher_path):
    out = tmp_path / "c"
    _precompute(runner, store_path, [teacher_path], out, "--top-k", "8")
    meta = json.loads((out / "train" / "teacher_a" / "logprobs" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]][-2:] == ["blosc", "crc32c"]
    bad = _chunk_file(out, "train", "teacher_a", "logprobs", 1)
    size = bad.stat().st_size
    with open(bad, "r+b") as f:  # 64 bytes in the middle of the chunk, same file size
        f.seek(size // 2)
        f.write(bytes(64))
    assert bad.stat().st_size == size
    with pytest.raises(Exception, match="checksum mismatch.*cachekd verify"):
        LogitCache.open(out).read_chunk("train", 1)
    c = LogitCache.open(out)
    cw = c.chunk_windows
    with pytest.raises(Exception, match=rf"chunk 1 \(windows {cw} to {2 * cw - 1}\)"):  # the chunk, not the read
        c.read("train", cw + 1, cw + 2)
    r = invoke(runner, ["verify", out, "--quiet", "--json"])
    rep = json.loads(r.output)
    assert r.exit_code == 1 and rep["damaged_chunks"] == {"train": [1]} and rep["checksums"] is True
    assert any("teacher 'teacher_a': the logprobs data cannot be read (checksum mismatch)" in p for p in rep["problems"])


@pytest.mark.parametrize("name", ["logprobs", "tail_lse"])
def test_deleted_chunk_file_is_reported_not_read_as_zeros(tmp_path, runner, store_path, teacher_path, name):
    """zarr reads a missing chunk file as zeros; a deleted top-k chunk file is a damaged chunk instead (reads,
    verify and --repair), not silently zero log-probabilities or tails."""
    out = tmp_path / "c"
    _precompute(runner, store_path, [teacher_path], out, "--top-k", "8")
    _chunk_file(out, "train", "teacher_a", name, 1).unlink()
    with pytest.raises(Exception, match=f"chunk 1 .*{name} file is missing.*cachekd verify"):
        LogitCache.open(out).read_chunk("train", 1)
    LogitCache.open(out).read_chunk("train", 0)  # the others read
    r = invoke(runner, ["verify", out, "--quiet", "--json"])
    rep = json.loads(r.output)
    assert r.exit_code == 1 and rep["damaged_chunks"] == {"train": [1]}


def test_cache_without_checksums_still_reads(tmp_path, runner, store_path, teacher_path, monkeypatch):
    from cachekd.cache import format as fmt
    from cachekd.cache.reader import DamagedChunkError

    new = _precompute(runner, store_path, [teacher_path], tmp_path / "new", "--top-k", "8")
    monkeypatch.setattr(fmt, "CHECKSUM", False)  # arrays as written before the checksum existed
    old_dir = tmp_path / "old"
    old = _precompute(runner, store_path, [teacher_path], old_dir, "--top-k", "8")
    monkeypatch.undo()
    for name in ("ids", "logprobs", "tail_lse"):
        meta = json.loads((old_dir / "train" / "teacher_a" / name / "zarr.json").read_text())
        assert "crc32c" not in [c["name"] for c in meta["codecs"]]
    a, b = _all_arrays(new), _all_arrays(LogitCache.open(old_dir))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert old.has_checksums() is False and new.has_checksums() is True
    r = invoke(runner, ["verify", old_dir, "--quiet"])
    assert r.exit_code == 0 and "without checksums" in r.output and r.output.strip().endswith("OK"), r.output
    assert json.loads(invoke(runner, ["info", old_dir, "--json"]).output)["checksums"] is False
    # a truncated chunk of such a cache fails Blosc instead: the same clean error
    os.truncate(_chunk_file(old_dir, "train", "teacher_a", "ids", 0), 100)
    with pytest.raises(DamagedChunkError, match="ids data is corrupt or truncated"):
        LogitCache.open(old_dir).read_chunk("train", 0)


def test_verify_recompute_without_teacher_and_bad_counts(tmp_path, runner, store_path, teacher_path):
    teacher = tmp_path / "t"
    shutil.copytree(teacher_path, teacher)
    out = tmp_path / "c"
    _precompute(runner, store_path, [teacher], out, "--top-k", "8")
    assert_clean_error(invoke(runner, ["verify", out, "--recompute", "-3"]), "--recompute", "-3")
    shutil.rmtree(teacher)
    r = invoke(runner, ["verify", out, "--quiet", "--recompute", "2"])
    # a requested check that did not run is not a pass (issue 20): exit 1, naming the teacher
    assert r.exit_code == 1 and "--recompute could not check teacher 't'" in r.output, r.output
    assert "skipped" in r.output and "no longer at" in r.output and "Traceback" not in r.output, r.output
    # --repair refuses when precompute could not recompute the chunk: nothing is removed
    os.truncate(_chunk_file(out, "train", "t", "tail_lse", 0), 10)
    r = invoke(runner, ["verify", out, "--quiet", "--repair"])
    assert r.exit_code == 1 and "repair refused" in r.output and "no longer at" in r.output, r.output
    assert (out / "manifest.json").exists() and (out / "done" / "train" / "0000000.json").exists()


def test_missing_done_marker_means_incomplete(tmp_path, runner, store_path, teacher_path):
    out = tmp_path / "c"
    _precompute(runner, store_path, [teacher_path], out, "--top-k", "4")
    bytes_before = json.loads(invoke(runner, ["info", out, "--json"]).output)["bytes_on_disk"]
    (out / "done" / "train" / "0000001.json").unlink()  # manifest still there
    os.truncate(_chunk_file(out, "train", "teacher_a", "ids", 1), 50)
    info = json.loads(invoke(runner, ["info", out, "--json"]).output)
    assert info["complete"] is False and info["missing"] == {"manifest": False, "chunks_not_done": {"train": [1]}}
    assert info["bytes_on_disk"] < bytes_before  # measured now, not copied from the manifest
    text = invoke(runner, ["info", out]).output
    assert re.search(r"complete +False\n", text) and "1 of " in text and "train chunks not done (1)" in text, text
    with pytest.raises(Exception, match="incomplete"):
        LogitCache.open(out)
    # a part that does not hold the chunk leaves the cache incomplete (the old manifest does not count) ...
    r = invoke(runner, ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", out, "--top-k", "4",
                        "--part", "1/2", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["complete"] is False, r.output
    # ... and the part that does completes it again
    _precompute(runner, store_path, [teacher_path], out, "--top-k", "4", "--part", "2/2")
    r = invoke(runner, ["verify", out, "--quiet"])
    assert r.exit_code == 0, r.output


def test_same_teacher_twice_is_refused(tmp_path, runner, store_path, teacher_path, teacher_b_path):
    base = ["precompute", "--store", store_path, "--quiet", "--top-k", "4"]
    r = invoke(runner, base + ["--teacher", teacher_path, "--teacher", f"other={teacher_path}", "-o", tmp_path / "o1"])
    assert_clean_error(r, f"teacher 'other={teacher_path}' is the same checkpoint as teacher '{teacher_path}'",
                       str(Path(teacher_path).resolve()), "pass each teacher once")
    copy = tmp_path / "copy_of_a"
    shutil.copytree(teacher_path, copy)
    r = invoke(runner, base + ["--teacher", teacher_path, "--teacher", copy, "-o", tmp_path / "o2"])
    assert_clean_error(r, "teacher_a", "copy_of_a", "same checkpoint", "identical")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # one explicit name for two different checkpoints
    r = invoke(runner, base + ["--teacher", f"a={teacher_path}", "--teacher", f"a={teacher_b_path}", "-o", tmp_path / "o3"])
    assert_clean_error(r, "the teacher name 'a' is given twice", "its own name")
    assert not (tmp_path / "o3").exists()


def test_a_second_precompute_on_the_same_output_stops_at_once(tmp_path, runner, store_path, teacher_path):
    """While a precompute fills a cache (it holds the lock of its share of the chunks), the same command on the
    same output is refused instead of recomputing the same chunks, and so is --force with other settings; another
    --part runs beside it; once the first process is gone (however it ended) the lock is free again."""
    import fcntl

    out = tmp_path / "c"
    base = ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", out, "--quiet", "--top-k", "4"]
    assert invoke(runner, base + ["--part", "1/2"]).exit_code == 0
    assert (out / ".lock").exists() and (out / ".precompute-1-of-2.lock").exists()  # creating the group kept them
    with open(out / ".precompute-1-of-1.lock", "w") as held:  # "another process" filling the whole cache
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = sorted(p.name for p in (out / "done" / "train").iterdir())
        assert_clean_error(invoke(runner, base), "another precompute is already filling the whole cache", "--part i/n")
        assert sorted(p.name for p in (out / "done" / "train").iterdir()) == before
        # a share of another split of the chunks overlaps the whole-cache run: refused too
        assert_clean_error(invoke(runner, base + ["--part", "2/2"]), "already filling the whole cache")
    with open(out / ".precompute-1-of-2.lock", "w") as held:  # "another process" running --part 1/2
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_clean_error(invoke(runner, base), "already filling share 1 of 2")
        # --force with other settings from the other share (the quick check before loading passes): the cache is
        # not cleared under the running process
        assert_clean_error(invoke(runner, base[:-1] + ["8", "--force", "--part", "2/2"]),
                           "another precompute is filling the cache", "stop it before")
        assert (out / "plan.json").exists() and sorted(p.name for p in (out / "done" / "train").iterdir()) == before
        r = invoke(runner, base + ["--part", "2/2"])  # the other share of the same split runs beside it
        assert r.exit_code == 0, r.output
    r = invoke(runner, base)  # the holder is gone: the same command runs (and has nothing left to do)
    assert r.exit_code == 0, r.output
    assert LogitCache.open(out).meta["complete"]


def test_topk_mass_against_a_dense_float64_reference():
    """topk_mass from stored quantities (τ=1 top-k log-probabilities, tail_lse at τ) equals the top-k share of the
    dense softmax at τ."""
    from cachekd.cache.reader import topk_mass

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 40, generator=g, dtype=torch.float64) * 3  # (B, T, V)
    k = 6
    logp = torch.log_softmax(z, -1)
    top = logp.topk(k, -1)
    rest = torch.ones_like(z, dtype=torch.bool).scatter(-1, top.indices, False)
    for tau in (0.5, 1.0, 2.0, 4.0):
        tail = torch.logsumexp((logp / tau).masked_fill(~rest, float("-inf")), -1)  # log Σ_{v∉top-k} p_v^{1/τ}
        want = torch.softmax(z / tau, -1).gather(-1, top.indices).sum(-1)
        got = topk_mass(top.values.numpy(), tail.numpy(), tau)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-12)


def test_captured_topk_mass_from_the_manifest_or_a_sample(tmp_path, runner, store_path, teacher_path):
    """The manifest's statistic, and for a cache whose manifest lacks it, the same quantity computed from a sample
    of chunks (here every chunk: the store has fewer than 4), equal within the storage rounding."""
    cache = _precompute(runner, store_path, [teacher_path], tmp_path / "c", "--top-k", "8")
    t = cache.teachers[0]
    recorded = {}
    for tau in (1.0, 2.0):
        recorded[tau], where = cache.captured_topk_mass(t, tau)
        assert where == "manifest" and 0 < recorded[tau] < 1
    assert recorded[2.0] < recorded[1.0]  # the top-k holds less of a flatter distribution
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    for split_stats in manifest["stats"].values():
        for per in split_stats.values():
            per.pop("mean_topk_mass", None)  # what a cache without the statistic looks like
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    old = LogitCache.open(tmp_path / "c")
    for tau in (1.0, 2.0):
        sampled, where = old.captured_topk_mass(t, tau)
        assert where.startswith("sample of ") and sampled == pytest.approx(recorded[tau], abs=2e-3)
    with pytest.raises(Exception, match="temperatures"):
        cache.captured_topk_mass(t, 3.0)
