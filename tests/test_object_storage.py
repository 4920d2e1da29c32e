"""Token stores and logit caches on an object store, over the real S3 protocol: a moto server that these tests
start on 127.0.0.1 (a separate process), s3fs and zarr's FsspecStore as the client. The whole job on s3:// gives
the same bytes and losses as on disk; a killed remote precompute resumes to the same bytes; writers exclude each
other through lease objects (conditional PUTs); damage is found by verify and refused by distill; bad locations
are one sentence each, with nothing written."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cachekd import storage
from tests.conftest import assert_clean_error, invoke, make_teacher, write_corpus

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

TINY_TRAIN = ["--set", "model.hidden_size=32", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
              "--set", "model.intermediate_size=32", "--batch-size", "8", "--max-steps", "3", "--quiet"]
TINY_STUDENT = TINY_TRAIN + ["--temperature", "1"]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """moto's standalone S3 server on a free port of 127.0.0.1 (skips the test when it does not come up)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, **(env or {})))
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    pytest.skip("moto's S3 server did not start")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def s3_server():
    proc, endpoint = _start_moto()
    yield endpoint
    _stop(proc)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the session's server, with the environment pointing at it (as a user would set it)."""
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    storage.configure()
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True, use_listings_cache=False)
    fs.mkdir(bucket)
    yield SimpleNamespace(endpoint=s3_server, url=f"s3://{bucket}", bucket=bucket, fs=fs)
    storage.configure()


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def _losses(run: Path) -> list[tuple]:
    return [(r["kind"], r["step"], r.get("loss"), r.get("dev_loss"), r.get("kd"))
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def _chunk_objects(root) -> dict[str, bytes]:
    """Every chunk file of every array under a store or cache (local or remote), by relative path."""
    loc = storage.location(str(root))
    return {rel: (loc / rel).read_bytes() for rel in sorted(storage.file_sizes(loc))
            if "/c/" in f"/{rel}" and not rel.startswith(("done/", "tokenizer/"))}


def _pipeline(runner, corpus: Path, root: str, runs: Path) -> dict:
    store, cache = f"{root}/store", f"{root}/cache"
    ok(invoke(runner, ["prepare", corpus, "-o", store, "--seq-len", "16", "--vocab-size", "300",
                       "--dev-fraction", "0.1"]))
    ok(invoke(runner, ["train", "--store", store, "-o", runs / "teacher", *TINY_TRAIN]))
    ok(invoke(runner, ["precompute", "--store", store, "--teacher", runs / "teacher" / "model", "-o", cache,
                       "--top-k", "8", "--quiet"]))
    assert "OK" in ok(invoke(runner, ["verify", cache])).output
    ok(invoke(runner, ["distill", "--store", store, "--cache", cache, "-o", runs / "student", *TINY_STUDENT]))
    return {"teacher": _losses(runs / "teacher"), "student": _losses(runs / "student"),
            "store": _chunk_objects(store), "cache": _chunk_objects(cache)}


def test_whole_job_on_s3_equals_local_disk(tmp_path, runner, corpus, s3):
    """prepare → train → precompute → verify → distill entirely on s3:// (run directories local): the same chunk
    bytes in the store and the cache, and the same losses, as the same commands on local disk."""
    local = _pipeline(runner, corpus, str(tmp_path / "disk"), tmp_path / "runs_disk")
    remote = _pipeline(runner, corpus, f"{s3.url}/job", tmp_path / "runs_s3")
    assert local["store"] and local["store"] == remote["store"]
    assert local["cache"] and local["cache"] == remote["cache"]
    assert local["teacher"] == remote["teacher"] and local["student"] == remote["student"]
    assert s3.fs.exists(f"{s3.bucket}/job/cache/manifest.json") and not (tmp_path / "job").exists()
    assert ok(invoke(runner, ["info", f"{s3.url}/job/cache"])).output.count("s3://") >= 1


def _done(s3, prefix: str) -> list[str]:
    try:
        return s3.fs.ls(f"{s3.bucket}/{prefix}/done/train", detail=False)
    except FileNotFoundError:
        return []


def test_kill9_of_a_remote_precompute_resumes_to_the_same_bytes(tmp_path, runner, s3, monkeypatch):
    """SIGKILL inside a chunk's write on s3://; the same command again first finds the dead process's lease
    fresh (refused), then, once stale, takes it over and finishes with the bytes of an uninterrupted run."""
    from cachekd.cache.reader import LogitCache
    from cachekd.tokens import PrepareConfig, TokenStore, prepare

    monkeypatch.setenv("CACHEKD_LEASE_STALE_S", "2")
    store = f"{s3.url}/bigstore"
    prepare(PrepareConfig(inputs=[str(write_corpus(tmp_path / "big.txt", num_docs=900, seed=3))], output=store,
                          seq_len=128, vocab_size=300, dev_fraction=0.05), progress=False)
    assert TokenStore.open(store).num_chunks("train") >= 6
    teacher = make_teacher(store, tmp_path / "t", hidden=32)
    ok(invoke(runner, ["precompute", "--store", store, "--teacher", teacher, "-o", tmp_path / "ref", "--top-k", "8",
                       "--quiet"]))
    out = f"{s3.url}/killed"
    cmd = [sys.executable, "-m", "cachekd_cli", "precompute", "--store", store, "--teacher", str(teacher), "-o", out,
           "--top-k", "8", "--quiet"]
    p = subprocess.Popen(cmd, env=dict(os.environ, CACHEKD_TEST_WRITE_PAUSE_S="0.3", OMP_NUM_THREADS="1"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(_done(s3, "killed")) < 2:
        time.sleep(0.05)
    time.sleep(0.15)  # land inside the next chunk's write
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not s3.fs.exists(f"{s3.bucket}/killed/manifest.json"), "the run finished before it could be killed"
    assert 2 <= len(_done(s3, "killed")) < TokenStore.open(store).num_chunks("train")
    with pytest.raises(Exception, match="incomplete"):
        LogitCache.open(out)
    resume = cmd[3:]
    assert_clean_error(invoke(runner, resume), "another precompute is already filling the whole cache")
    time.sleep(2.5)  # the killed process's lease is now stale: taken over
    ok(invoke(runner, resume))
    assert _chunk_objects(out) == _chunk_objects(tmp_path / "ref")
    assert not s3.fs.glob(f"{s3.bucket}/killed/.precompute-*.lock")  # released at the end


def test_two_writers_exclude_each_other_through_a_lease(tmp_path, runner, store_path, teacher_path, s3):
    """The second of two conditional creates of one lease fails; a precompute finding the lease of its share held
    stops at once (nothing written); after the release it runs."""
    cache = f"{s3.url}/c"
    held = storage.try_exclusive(storage.location(f"{cache}/.precompute-1-of-1.lock"))
    assert held is not None
    assert storage.try_exclusive(storage.location(f"{cache}/.precompute-1-of-1.lock")) is None
    args = ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", cache, "--top-k", "4", "--quiet"]
    assert_clean_error(invoke(runner, args), "another precompute is already filling the whole cache")
    assert s3.fs.find(f"{s3.bucket}/c") == [f"{s3.bucket}/c/.precompute-1-of-1.lock"]  # nothing else written
    held.close()
    ok(invoke(runner, args))


def test_a_stale_lease_is_taken_over_and_its_holder_stops(tmp_path, runner, store_path, teacher_path, s3,
                                                           monkeypatch):
    """The stated rule: a lease not renewed for CACHEKD_LEASE_STALE_S seconds (by its LastModified) may be taken
    over; the old holder's next renewal fails, and it stops before writing another chunk."""
    monkeypatch.setenv("CACHEKD_LEASE_STALE_S", "60")  # fresh for as long as the refused command takes, however slow
    cache = f"{s3.url}/c"
    lock = storage.location(f"{cache}/.precompute-1-of-1.lock")
    old = storage.try_exclusive(lock)
    old._stop.set()  # the holder hangs: no more renewals
    old._thread.join()
    args = ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", cache, "--top-k", "4", "--quiet"]
    assert_clean_error(invoke(runner, args), "already filling")  # still fresh
    monkeypatch.setenv("CACHEKD_LEASE_STALE_S", "1")  # now the same lease, unrenewed, is stale after a second
    time.sleep(1.5)
    new = storage.try_exclusive(lock)
    assert new is not None
    assert not old.renew()
    with pytest.raises(storage.LeaseLostError, match="took over"):
        old.check()
    new.close()
    old._stop.set()
    time.sleep(0.1)
    ok(invoke(runner, args))


def test_a_flipped_byte_in_a_remote_chunk(tmp_path, runner, store_path, teacher_path, s3):
    """verify finds it, distill refuses it, verify --repair and the same precompute mend it, all remotely."""
    cache = f"{s3.url}/c"
    pre = ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", cache, "--top-k", "4", "--quiet"]
    ok(invoke(runner, pre))
    key = sorted(s3.fs.find(f"{s3.bucket}/c/train/{teacher_path.name}/logprobs/c"))[0]
    data = bytearray(s3.fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    s3.fs.pipe_file(key, bytes(data))
    r = invoke(runner, ["verify", cache])
    assert r.exit_code != 0 and "train chunk 0" in r.output and "checksum" in r.output, r.output
    r = invoke(runner, ["distill", "--store", store_path, "--cache", cache, "-o", tmp_path / "d", *TINY_STUDENT])
    assert_clean_error(r, "cannot be read")
    r = invoke(runner, ["verify", cache, "--repair"])  # (exits non-zero: it found damage)
    assert "Traceback" not in r.output and "precompute" in r.output, r.output
    assert not s3.fs.exists(f"{s3.bucket}/c/manifest.json")
    ok(invoke(runner, pre))
    assert "OK" in ok(invoke(runner, ["verify", cache])).output
    ok(invoke(runner, ["distill", "--store", store_path, "--cache", cache, "-o", tmp_path / "d2", *TINY_STUDENT]))


def test_streaming_from_s3_with_a_bounded_chunk_cache(tmp_path, runner, store_path, teacher_path, s3):
    """Batches read from s3:// (blocks fetched concurrently, the next one ahead) equal those read from disk, over
    two epochs; with a local chunk cache the second epoch's reads are served from it, within its size bound."""
    from cachekd.cache.reader import LogitCache
    from cachekd.loader import CachedBatches, Order
    from cachekd.tokens import TokenStore

    local = tmp_path / "c"
    ok(invoke(runner, ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", local, "--top-k", "4",
                       "--quiet"]))
    s3.fs.put(str(store_path) + "/", f"{s3.bucket}/store/", recursive=True)
    s3.fs.put(str(local) + "/", f"{s3.bucket}/c/", recursive=True)

    def batches(store, cache):
        st, lc = TokenStore.open(store), LogitCache.open(cache)
        order = Order(st.num_windows("train"), st.chunk_windows, 16, seed=3, block_chunks=2)
        t = teacher_path.name
        return [(b["window_ids"].numpy(), b["input_ids"].numpy(), d.teachers[t].ids.numpy(),
                 d.teachers[t].logprobs.numpy())
                for b in CachedBatches(st, "train", order, cache=lc, temperature_index=0, max_epochs=2)
                for d in [b.decode()]]

    ref = batches(store_path, local)
    bound = 1 << 20
    storage.configure(chunk_cache_dir=tmp_path / "chunks", chunk_cache_bytes=bound)
    got = batches(f"{s3.url}/store", f"{s3.url}/c")
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    caches = [s for s in storage._zarr_roots.values() if type(s).__name__ == "CacheStore"]
    assert caches and caches[0]._state.hits > 0 and caches[0]._state.current_size <= bound


# ------------------------------------------------------------------------------------------------ refusals


def test_unknown_protocol_is_one_sentence(tmp_path, runner, corpus):
    r = invoke(runner, ["prepare", corpus, "-o", "nosuch://bucket/store", "--seq-len", "16", "--vocab-size", "300"])
    assert_clean_error(r, "unknown storage protocol 'nosuch'")


def test_missing_bucket_is_one_sentence_nothing_written(tmp_path, runner, corpus, s3):
    r = invoke(runner, ["prepare", corpus, "-o", "s3://no-such-bucket-cachekd/store", "--seq-len", "16"])
    assert_clean_error(r, "bucket 's3://no-such-bucket-cachekd' does not exist")
    assert not s3.fs.exists("no-such-bucket-cachekd")


def test_wrong_credentials_are_one_sentence(tmp_path, runner, corpus, monkeypatch):
    """A server that checks credentials (moto with authentication on) refusing the ones in the environment."""
    proc, endpoint = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "1"})  # (the first request: the bucket)
    try:
        for k, v in CREDENTIALS.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        fs.call_s3("create_bucket", Bucket="some-bucket")  # one request: the only one without authentication
        r = invoke(runner, ["prepare", corpus, "-o", "s3://some-bucket/store", "--seq-len", "16"])
        assert_clean_error(r, "refused the credentials", "AWS_ACCESS_KEY_ID")
    finally:
        _stop(proc)


def test_unreachable_endpoint_is_one_sentence_after_bounded_retries(tmp_path, runner, corpus, monkeypatch):
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    port = _free_port()  # nothing listens there
    t0 = time.time()
    r = invoke(runner, ["--storage-option", f"endpoint_url=http://127.0.0.1:{port}", "prepare", corpus, "-o",
                        "s3://bucket/store", "--seq-len", "16"])
    assert_clean_error(r, "cannot reach the object store", f"after {storage.CONNECT_TRIES} tries")
    assert time.time() - t0 < 60


def test_url_cache_with_a_mismatched_local_store(tmp_path, runner, store_path, teacher_path, corpus, s3):
    """A cache on s3:// made from one local store, given with another local store: refused before training, no
    run directory written."""
    from cachekd.tokens import PrepareConfig, prepare

    cache = f"{s3.url}/c"
    ok(invoke(runner, ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", cache, "--top-k", "4",
                       "--quiet"]))
    other = tmp_path / "other"
    prepare(PrepareConfig(inputs=[str(write_corpus(tmp_path / "o.txt", num_docs=120, seed=9))], output=str(other),
                          seq_len=16, vocab_size=300, dev_fraction=0.1), progress=False)
    r = invoke(runner, ["distill", "--store", other, "--cache", cache, "-o", tmp_path / "run", *TINY_STUDENT])
    assert_clean_error(r, cache)
    assert not (tmp_path / "run").exists()


def test_storage_option_parsing():
    assert storage.parse_option("anon=true") == ("anon", True)
    assert storage.parse_option("endpoint_url=http://x:1") == ("endpoint_url", "http://x:1")
    storage.configure(["config_kwargs.connect_timeout=9"])
    try:
        assert storage._options_for("s3")["config_kwargs"]["connect_timeout"] == 9
        assert storage._options_for("s3")["config_kwargs"]["retries"]["max_attempts"] == storage.CONNECT_TRIES
    finally:
        storage.configure()
    with pytest.raises(Exception, match="KEY=VALUE"):
        storage.parse_option("novalue")
    assert storage.parse_size("4G") == 4 << 30 and storage.parse_size("512k") == 512 << 10
    assert storage.location("file:///tmp/x") == Path("/tmp/x") and storage.location("rel/x") == Path("rel/x")
