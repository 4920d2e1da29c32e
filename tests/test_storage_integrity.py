"""No silent garbage, no state a user cannot get out of (issue 14, storage): token-store chunks are checksummed and
a missing one is damage; `verify` checks the store; cache chunks are bound to the token chunk they were computed
from and to the files written for them; `verify --recompute` fails beyond the storage tolerance; a kill at any
moment of creating a cache resumes; empty done-markers count as missing; damaged manifests and plans are one
sentence."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cachekd.cache.reader import DamagedChunkError, LogitCache
from cachekd.tokens import TokenStore
from tests.conftest import assert_clean_error, invoke

TINY_STUDENT = ["--quiet", "--max-steps", "3", "--set", "model.hidden_size=32", "--set", "model.num_layers=1",
                "--set", "model.num_heads=2", "--set", "model.intermediate_size=32", "--batch-size", "8",
                "--temperature", "1"]
ARRAYS = ("ids", "logprobs", "tail_lse")


def _precompute(runner, store, teacher, out, *extra) -> LogitCache:
    r = invoke(runner, ["precompute", "--store", store, "--teacher", teacher, "-o", out, "--quiet", "--top-k", "4",
                        *extra])
    assert r.exit_code == 0, r.output
    return LogitCache.open(out)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    import zarr

    return {str(p.parent.relative_to(path)): zarr.open_array(str(p.parent), mode="r")[:]
            for p in sorted(path.glob("*/*/*/zarr.json"))}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _chunk_file(cache: Path, name: str, chunk: int, split: str = "train", teacher: str = "teacher_a") -> Path:
    return cache / split / teacher / name / "c" / str(chunk) / "0" / "0"


def _token_chunk(store: Path, chunk: int, split: str = "train") -> Path:
    return store / split / "tokens" / "c" / str(chunk) / "0"


@pytest.fixture(scope="module")
def cache_ref(tmp_path_factory, store_path, teacher_path) -> Path:
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("caches") / "ref"
    _precompute(CliRunner(), store_path, teacher_path, out)
    return out


@pytest.fixture
def store_copy(tmp_path, store_path) -> Path:
    out = tmp_path / "store"
    shutil.copytree(store_path, out)
    return out


def _cache_on(tmp_path: Path, cache_ref: Path, store: Path) -> Path:
    """A copy of the reference cache that records `store` as its token store (same content, same fingerprint)."""
    out = tmp_path / "cache"
    shutil.copytree(cache_ref, out)
    for name in ("plan.json", "manifest.json"):
        meta = json.loads((out / name).read_text())
        meta["token_store"]["path"] = str(store.resolve())
        (out / name).write_text(json.dumps(meta))
    return out


# ------------------------------------------------------------------------------------------ token store


def test_token_chunks_carry_a_checksum(store_path):
    meta = json.loads((store_path / "train" / "tokens" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]][-2:] == ["blosc", "crc32c"]
    assert TokenStore.open(store_path).has_checksums()


@pytest.mark.parametrize("damage", ["delete", "flip", "truncate"])
def test_damaged_token_chunk_is_refused_and_verified(tmp_path, runner, store_copy, cache_ref, damage):
    """The issue's repro: a deleted token chunk read as zeros and distill trained on them with exit 0; a flipped byte
    read silently; a truncated chunk was a blosc traceback; `verify --store` passed all three."""
    f = _token_chunk(store_copy, 1)
    if damage == "delete":
        f.unlink()
        why = "file is missing"
    elif damage == "flip":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
        why = "checksum mismatch"
    else:
        os.truncate(f, f.stat().st_size // 2)
        why = "corrupt or truncated"
    st = TokenStore.open(store_copy)
    cw = st.chunk_windows
    with pytest.raises(Exception, match=f"chunk 1 \\(windows {cw} to {2 * cw - 1}\\).*{why}.*--force"):
        st.read_chunk("train", 1)
    st.read_chunk("train", 0)  # the others read
    r = invoke(runner, ["distill", "--store", store_copy, "--cache", cache_ref, "-o", tmp_path / "d3"] + TINY_STUDENT)
    assert_clean_error(r, "train split's chunk 1", "token store", why, "cachekd prepare")
    # verify, on the store itself and on a cache with the store passed or recorded
    r = invoke(runner, ["verify", store_copy, "--quiet", "--json"])
    rep = json.loads(r.output)
    assert r.exit_code == 1 and rep["kind"] == "token store" and rep["damaged_chunks"] == {"train": [1]}, r.output
    r = invoke(runner, ["verify", cache_ref, "--store", store_copy, "--quiet"])
    assert r.exit_code == 1 and why in r.output and "Traceback" not in r.output, r.output
    r = invoke(runner, ["verify", _cache_on(tmp_path, cache_ref, store_copy), "--quiet", "--repair"])
    assert r.exit_code == 1 and why in r.output, r.output
    assert "Marked" not in r.output  # nothing a precompute could redo from damaged tokens


def test_damaged_store_rebuilt_with_force_keeps_its_caches(tmp_path, runner, store_copy, cache_ref, corpus):
    manifest = json.loads((store_copy / "manifest.json").read_text())
    _token_chunk(store_copy, 2).unlink()
    r = invoke(runner, ["prepare", corpus, "-o", store_copy, "--seq-len", "16", "--vocab-size", "300",
                        "--dev-fraction", "0.1", "--force", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads((store_copy / "manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]
    assert invoke(runner, ["verify", store_copy, "--quiet"]).exit_code == 0
    r = invoke(runner, ["verify", cache_ref, "--store", store_copy, "--quiet"])
    assert r.exit_code == 0, r.output


def test_store_without_checksums_still_reads_and_verify_compares_its_hash(tmp_path, runner, corpus, monkeypatch):
    from cachekd.tokens import PrepareConfig, prepare
    from cachekd.tokens import format as tfmt

    monkeypatch.setattr(tfmt, "compressors", lambda dtype: [tfmt.blosc(dtype.itemsize)])  # as written before
    old, _ = prepare(PrepareConfig(inputs=[str(corpus)], output=str(tmp_path / "old"), seq_len=16, vocab_size=300),
                     progress=False)
    monkeypatch.undo()
    assert not old.has_checksums()
    new, _ = prepare(PrepareConfig(inputs=[str(corpus)], output=str(tmp_path / "new"), seq_len=16, vocab_size=300),
                     progress=False)
    np.testing.assert_array_equal(old.read("train", 0, old.num_windows()), new.read("train", 0, new.num_windows()))
    r = invoke(runner, ["verify", old.path, "--quiet"])
    assert r.exit_code == 0 and "without checksums" in r.output and r.output.strip().endswith("OK"), r.output
    # a change that still decodes is found by the manifest's SHA-256 of the windows
    arr = __import__("zarr").open_array(str(old.path / "train" / "tokens"), mode="r+")
    arr[3, 5] = (int(arr[3, 5]) + 1) % 300
    r = invoke(runner, ["verify", old.path, "--quiet"])
    assert r.exit_code == 1 and "SHA-256 differs" in r.output, r.output


# ------------------------------------------------------------------------------------ chunk binding


def test_misplaced_cache_chunk_is_found_without_a_teacher(tmp_path, runner, store_path, teacher_path, cache_ref):
    """The issue's repro: chunk 1's (valid) files copied over chunk 2's read silently."""
    out = tmp_path / "c"
    shutil.copytree(cache_ref, out)
    for name in ARRAYS:
        shutil.copy(_chunk_file(out, name, 1), _chunk_file(out, name, 2))
    with pytest.raises(DamagedChunkError, match="chunk 2 .*misplaced or stale") as e:
        LogitCache.open(out).read_chunk("train", 2)
    assert e.value.chunk == 2 and e.value.reason == "misplaced or stale"
    r = invoke(runner, ["distill", "--store", store_path, "--cache", out, "-o", tmp_path / "d"] + TINY_STUDENT)
    assert_clean_error(r, "train split's chunk 2", "misplaced or stale", "--repair")
    r = invoke(runner, ["verify", out, "--quiet", "--json"])
    rep = json.loads(r.output)
    assert r.exit_code == 1 and rep["damaged_chunks"] == {"train": [2]}, r.output
    r = invoke(runner, ["verify", out, "--quiet", "--repair"])
    assert r.exit_code == 1 and "Marked 1 chunk(s) for recomputation (train 2)" in r.output, r.output
    _precompute(runner, store_path, teacher_path, out)
    _assert_same(_arrays(cache_ref), _arrays(out))
    assert invoke(runner, ["verify", out, "--quiet"]).exit_code == 0


def test_chunk_moved_with_its_marker_is_found_by_its_tokens(tmp_path, runner, store_path, cache_ref):
    """A chunk copied together with its done-marker is consistent in itself; its token digest gives it away."""
    out = tmp_path / "c"
    shutil.copytree(cache_ref, out)
    for name in ARRAYS:
        shutil.copy(_chunk_file(out, name, 1), _chunk_file(out, name, 2))
    shutil.copy(out / "done" / "train" / "0000001.json", out / "done" / "train" / "0000002.json")
    LogitCache.open(out).read_chunk("train", 2)  # decodes, and is what its marker says was written
    st = TokenStore.open(store_path)
    with pytest.raises(DamagedChunkError, match="other token ids"):
        LogitCache.open(out).read_chunk("train", 2, tokens=st.read_chunk("train", 2))
    r = invoke(runner, ["distill", "--store", store_path, "--cache", out, "-o", tmp_path / "d"] + TINY_STUDENT)
    assert_clean_error(r, "chunk 2", "other token ids", "cachekd verify")
    r = invoke(runner, ["verify", out, "--quiet", "--json"])
    rep = json.loads(r.output)
    assert r.exit_code == 1 and rep["damaged_chunks"] == {"train": [2]}, r.output
    assert any("computed from other token ids" in p for p in rep["problems"]), rep["problems"]


def test_verify_recompute_fails_beyond_the_storage_tolerance(tmp_path, runner, store_path, cache_ref):
    r = invoke(runner, ["verify", cache_ref, "--quiet", "--recompute", "64", "--json"])
    rep = json.loads(r.output)
    got = rep["recompute"]["teacher_a"]
    assert r.exit_code == 0 and got["within_tolerance"], r.output
    assert got["max_abs_logprob_diff"] <= 0.5 / 512 + 1e-4 and got["tolerance"]["max_abs_logprob_diff"] < 0.03
    # a cache written before chunks were bound (markers without the binding) with a misplaced chunk: only the
    # teacher can tell, and verify must fail
    out = tmp_path / "c"
    shutil.copytree(cache_ref, out)
    for m in (out / "done" / "train").glob("*.json"):
        marker = json.loads(m.read_text())
        marker.pop("tokens_sha256"), marker.pop("chunk_crc32c")
        m.write_text(json.dumps(marker))
    for name in ARRAYS:
        shutil.copy(_chunk_file(out, name, 1), _chunk_file(out, name, 2))
    assert invoke(runner, ["verify", out, "--quiet"]).exit_code == 0  # undetectable without the teacher
    r = invoke(runner, ["verify", out, "--quiet", "--recompute", "64"])
    assert r.exit_code == 1 and "beyond the tolerance" in r.output and "Traceback" not in r.output, r.output
    rep = json.loads(invoke(runner, ["verify", out, "--quiet", "--recompute", "64", "--json"]).output)
    worst = rep["recompute"]["teacher_a"]["worst_window"]
    cw = TokenStore.open(store_path).chunk_windows
    assert 2 * cw <= worst < 3 * cw and not rep["ok"]


# ------------------------------------------------------------------------------------- done-markers


@pytest.mark.parametrize("content", [b"", b'{"teachers": {', b"[1, 2]"])
def test_empty_or_unparsable_done_marker_counts_as_missing(tmp_path, runner, store_path, teacher_path, cache_ref,
                                                           content):
    out = tmp_path / "c"
    shutil.copytree(cache_ref, out)
    (out / "manifest.json").unlink()
    (out / "done" / "train" / "0000001.json").write_bytes(content)
    info = json.loads(invoke(runner, ["info", out, "--json"]).output)
    assert info["missing"]["chunks_not_done"] == {"train": [1]}
    r = invoke(runner, ["verify", out, "--quiet"])
    assert r.exit_code == 1 and "train chunk 1 is not done" in r.output, r.output
    r = invoke(runner, ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", out, "--quiet",
                        "--top-k", "4", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["complete"], r.output
    st = TokenStore.open(store_path)
    assert json.loads(r.output)["positions_computed"] == st.chunk_windows * st.seq_len  # that chunk only
    _assert_same(_arrays(cache_ref), _arrays(out))
    assert invoke(runner, ["verify", out, "--quiet"]).exit_code == 0


# ------------------------------------------------------------------------- damaged manifests and plans


GARBAGE = [b"", b"{not json", b"\x00\xff\xfe", b"[]", b'{"format": "cachekd-logit-cache", "format_version": 1}']


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_cache_manifest_is_one_sentence_and_repairable(tmp_path, runner, store_path, teacher_path,
                                                               cache_ref, garbage):
    out = tmp_path / "c"
    shutil.copytree(cache_ref, out)
    (out / "manifest.json").write_bytes(garbage)
    assert_clean_error(invoke(runner, ["distill", "--store", store_path, "--cache", out, "-o", tmp_path / "d"]
                              + TINY_STUDENT), "manifest.json", "damaged", "--repair")
    r = invoke(runner, ["verify", out, "--quiet"])
    assert r.exit_code == 1 and "manifest.json is damaged" in r.output and "Traceback" not in r.output, r.output
    r = invoke(runner, ["verify", out, "--quiet", "--repair"])
    assert r.exit_code == 1 and "Removed the damaged manifest.json" in r.output, r.output
    r = invoke(runner, ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", out, "--quiet",
                        "--top-k", "4", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["positions_computed"] == 0, r.output
    assert invoke(runner, ["verify", out, "--quiet"]).exit_code == 0
    _assert_same(_arrays(cache_ref), _arrays(out))


@pytest.mark.parametrize("garbage", GARBAGE[:4])
def test_garbage_store_manifest_is_one_sentence(tmp_path, runner, store_copy, cache_ref, garbage):
    (store_copy / "manifest.json").write_bytes(garbage)
    for args in (["verify", store_copy], ["verify", cache_ref, "--store", store_copy],
                 ["verify", cache_ref, "--store", store_copy, "--repair"],
                 ["distill", "--store", store_copy, "--cache", cache_ref, "-o", tmp_path / "d"] + TINY_STUDENT,
                 ["info", store_copy]):
        r = invoke(runner, args)
        assert r.exit_code != 0 and "Traceback" not in r.output, (args, r.output)
        assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception))
        assert "manifest" in r.output, (args, r.output)
    r = invoke(runner, ["verify", _cache_on(tmp_path, cache_ref, store_copy), "--quiet"])  # the recorded store
    assert r.exit_code == 1 and "manifest.json" in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_plan_on_resume_is_one_sentence_and_force_restarts(tmp_path, runner, store_path, teacher_path,
                                                                   cache_ref, garbage):
    out = tmp_path / "c"
    shutil.copytree(cache_ref, out)
    (out / "manifest.json").unlink()
    (out / "done" / "train" / "0000001.json").unlink()
    (out / "plan.json").write_bytes(garbage)
    base = ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", out, "--quiet", "--top-k", "4"]
    assert_clean_error(invoke(runner, base), "plan.json", "damaged", "--force")
    for args in (["verify", out], ["verify", out, "--repair"], ["info", out]):
        r = invoke(runner, args)
        assert r.exit_code != 0 and "Traceback" not in r.output and "plan.json" in r.output, (args, r.output)
        assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception))
    assert invoke(runner, base + ["--force"]).exit_code == 0
    _assert_same(_arrays(cache_ref), _arrays(out))


# ------------------------------------------------------------------------------ creating a cache


class _Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, nothing after it runs."""


def _creation_steps(monkeypatch, kill_at: int | None) -> list[str]:
    """Count (and at step `kill_at`, interrupt) every file-system step of creating a cache: the atomic JSON
    writes, opening the Zarr group, setting its attribute, creating each array."""
    import zarr
    from zarr.core.group import Group

    from cachekd.cache import writer as cw

    steps: list[str] = []

    def step(name, fn):
        def wrapped(*a, **k):
            steps.append(name)
            if kill_at is not None and len(steps) == kill_at:
                raise _Killed(name)
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(cw, "atomic_write_json", step("atomic_write_json", cw.atomic_write_json))
    monkeypatch.setattr(zarr, "open_group", step("open_group", zarr.open_group))
    monkeypatch.setattr(Group, "create_array", step("create_array", Group.create_array))
    return steps


def test_a_kill_at_each_step_of_creation_resumes(tmp_path, store_path, teacher_path, cache_ref, monkeypatch):
    from cachekd.precompute import PrecomputeConfig, precompute

    def cfg(out):
        return PrecomputeConfig(store=str(store_path), teachers=[str(teacher_path)], output=str(out), top_k=4)

    steps = _creation_steps(monkeypatch, None)
    precompute(cfg(tmp_path / "count"), progress=False)
    monkeypatch.undo()
    creation = steps[:steps.index("atomic_write_json", 1) if steps.count("atomic_write_json") > 1 else len(steps)]
    assert creation[0] == "atomic_write_json" and creation.count("create_array") == 6  # plan first; 2 splits x 3
    for i in range(1, len(creation) + 1):
        out = tmp_path / f"k{i}"
        _creation_steps(monkeypatch, i)
        with pytest.raises(_Killed):
            precompute(cfg(out), progress=False)
        monkeypatch.undo()
        assert not (out / "manifest.json").exists()
        precompute(cfg(out), progress=False)  # the same command resumes
        _assert_same(_arrays(cache_ref), _arrays(out))


def test_states_left_by_older_or_killed_writers_are_resumed(tmp_path, runner, store_path, teacher_path, cache_ref):
    # a half-created cache as versions that wrote the plan last left it: group and arrays, no plan, nothing done
    out = tmp_path / "old_half"
    shutil.copytree(cache_ref, out)
    for p in ("plan.json", "manifest.json", "done"):
        shutil.rmtree(out / p) if (out / p).is_dir() else (out / p).unlink()
    _precompute(runner, store_path, teacher_path, out)
    _assert_same(_arrays(cache_ref), _arrays(out))
    # only the temporary file of a killed plan write
    out = tmp_path / "tmp_only"
    out.mkdir()
    (out / ".plan.json.abc123.tmp").write_text('{"form')
    _precompute(runner, store_path, teacher_path, out)
    _assert_same(_arrays(cache_ref), _arrays(out))
    # an array whose zarr.json a kill left empty, before any chunk was written
    out = tmp_path / "empty_meta"
    shutil.copytree(cache_ref, out)
    for p in ("manifest.json", "done"):
        shutil.rmtree(out / p) if (out / p).is_dir() else (out / p).unlink()
    shutil.rmtree(out / "dev" / "teacher_a" / "tail_lse")
    (out / "dev" / "teacher_a" / "tail_lse").mkdir()
    (out / "dev" / "teacher_a" / "tail_lse" / "zarr.json").write_bytes(b"")
    (out / "zarr.json").write_bytes(b"")
    _precompute(runner, store_path, teacher_path, out)
    _assert_same(_arrays(cache_ref), _arrays(out))


def test_real_kill_during_creation_resumes(tmp_path, store_path, teacher_path, cache_ref):
    """SIGKILL as soon as a file of the cache appears (the issue's repro killed when OUT/zarr.json appeared)."""
    cmd = [sys.executable, "-m", "cachekd_cli", "precompute", "--store", str(store_path), "--teacher",
           str(teacher_path), "--top-k", "4", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for i, trigger in enumerate(["plan.json", "zarr.json", "train/teacher_a/ids/zarr.json"]):
        out = tmp_path / f"killed{i}"
        p = subprocess.Popen(cmd + ["-o", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None and not (out / trigger).exists():
            time.sleep(0.001)
        p.send_signal(signal.SIGKILL)
        p.wait()
        r = subprocess.run(cmd + ["-o", str(out)], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        _assert_same(_arrays(cache_ref), _arrays(out))


@pytest.mark.parametrize("kind", ["cache", "store"])
@pytest.mark.parametrize("field,value,expect", [("format", "something-else", "is not a"),
                                                ("format_version", 99, "has format version 99; this cachekd reads")])
def test_foreign_format_or_version_is_one_sentence(kind, field, value, expect, store_path, tmp_path):
    """A manifest of another format, or of a format version this cachekd does not read, is refused by name."""
    import json
    import shutil

    from cachekd.errors import CachekdError
    from cachekd.tokens import TokenStore

    if kind == "store":
        d = tmp_path / "store"
        shutil.copytree(store_path, d)
        mf = d / "manifest.json"
        m = json.loads(mf.read_text())
        m[field] = value
        mf.write_text(json.dumps(m))
        with pytest.raises(CachekdError, match=expect):
            TokenStore.open(d)
    else:
        from cachekd.cache.reader import _read_meta
        from cachekd.cache import format as fmt

        d = tmp_path / "cache"
        d.mkdir()
        mf = d / "manifest.json"
        mf.write_text(json.dumps({"format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION} | {field: value}))
        with pytest.raises(CachekdError, match=expect):
            _read_meta(mf, fmt.CacheManifest)


def test_a_missing_array_zarr_json_is_one_sentence(tmp_path, store_copy, cache_ref):
    """An array whose zarr.json is gone (token store or cache) is refused naming what cannot be opened and the
    remedy, not with zarr's own error."""
    from cachekd.cache.reader import LogitCache
    from cachekd.errors import CachekdError
    from cachekd.tokens import TokenStore

    (store_copy / "train" / "tokens" / "zarr.json").unlink()
    with pytest.raises(CachekdError, match=r"the train split of token store .* cannot be opened .*zarr\.json is "
                                           r"missing or damaged\); rebuild it with the same `cachekd prepare`"):
        TokenStore.open(store_copy).array("train")
    cache = tmp_path / "cache"
    shutil.copytree(cache_ref, cache)
    c = LogitCache.open(cache)
    teacher = c.teachers[0]
    (cache / "train" / teacher / "ids" / "zarr.json").unlink()
    with pytest.raises(CachekdError, match=r"the ids array of teacher .* cannot be opened .*rebuild the cache with the "
                                           r"same `cachekd precompute` command plus --force\.$"):
        c._array("train", teacher, "ids")
