"""Where token stores and logit caches live: a local path, or a URL of an object store (``s3://bucket/prefix``,
``gs://``, ``az://``, any fsspec protocol; ``file://`` is a local path).

Every store or cache path goes through `location` once, at the boundary: a local path stays a `pathlib.Path`
(so everything on disk behaves exactly as before), a URL becomes a `RemotePath`, which answers the few
`pathlib` questions the stores and caches ask (``/``, ``exists``, ``iterdir``, ``glob``, ``read_bytes``,
``unlink``, ``name``, ``parent``) through the fsspec filesystem of its protocol (s3fs for ``s3://``). Callers
never test for "://": they ask this module to open Zarr groups and arrays (`open_group`, `open_array`: a path for
local data, a `zarr.storage.FsspecStore` for remote data), to write small JSON objects (`write_bytes`: a rename on
disk, a single PUT on an object store, both atomic for readers), to remove trees (`remove`), and for a writer's
exclusive lock (`try_exclusive`: `flock` on disk, a lease object on an object store, see `Lease`).

Credentials and endpoint come from the usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, fsspec's config files and ``FSSPEC_<PROTOCOL>_<KEY>`` variables), and
`configure` adds options for every filesystem of the process (the CLI's ``--storage-option KEY=VALUE``). A remote
location is checked once when it is made: an unknown protocol, a missing bucket, refused credentials or an
endpoint that does not answer (after a bounded number of tries) is one sentence, before anything is written.

Run directories (checkpoints, logs, reports) stay local.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Union

from cachekd.errors import CachekdError, ConfigKeysError

CONNECT_TRIES = 3
"""Tries of one request to an object store before a connection error is reported (botocore's retry budget)."""
CONNECT_TIMEOUT_S = 5
"""Seconds to wait for a connection to an object store's endpoint."""
LEASE_STALE_S = 120.0
"""A lease not renewed for this long (by the server's clock, its LastModified) may be taken over; overridden by
the environment variable CACHEKD_LEASE_STALE_S. The holder renews it every fifth of that."""

_S3_DEFAULTS: dict[str, Any] = {
    # other processes write done-markers and leases: a listing must never come from a cache of an earlier one
    "use_listings_cache": False,
    # chunks are small: one GET each (s3fs otherwise HEADs every object first, to split large ones into ranges)
    "max_concurrency": 1,
    "config_kwargs": {"retries": {"max_attempts": CONNECT_TRIES, "mode": "standard"},
                      "connect_timeout": CONNECT_TIMEOUT_S},
}
_DEFAULTS: dict[str, dict[str, Any]] = {"s3": _S3_DEFAULTS, "s3a": _S3_DEFAULTS}

_options: dict[str, Any] = {}
_chunk_cache: dict[str, Any] = {}  # {"dir": Path, "max_bytes": int} when a local chunk cache is configured
_checked: dict[tuple, None] = {}
_zarr_roots: dict[tuple, Any] = {}
_filesystems: dict[tuple, Any] = {}
_lock = threading.Lock()


# ------------------------------------------------------------------------------------------------ options


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` as (key, value): the value as JSON where it parses (true, 3, {"a": 1}), else the string.
    A dotted key (``config_kwargs.connect_timeout=10``) names a key of a nested dict."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise CachekdError(f"a storage option is KEY=VALUE (got {text!r}), e.g. endpoint_url=http://127.0.0.1:9000.")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def parse_size(text: str) -> int:
    """A size in bytes from ``123``, ``64K``, ``512M``, ``4G`` (powers of 1024)."""
    t = text.strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        raise CachekdError(f"a size is a number of bytes with an optional K, M, G or T (got {text!r}).") from None
    if value <= 0:
        raise CachekdError(f"a size must be positive (got {text!r}).")
    return int(value * scale)


def _merge(base: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    d = base
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def configure(options: list[str] | dict[str, Any] | None = None, *, chunk_cache_dir: str | Path | None = None,
              chunk_cache_bytes: int | None = None) -> None:
    """Set the storage options of every remote location this process makes from now on (``KEY=VALUE`` strings or
    a dict), and an optional local cache of remote chunks under `chunk_cache_dir` holding at most
    `chunk_cache_bytes` (least recently used chunks are evicted; the cache lives as long as the process)."""
    _options.clear()
    pairs = options.items() if isinstance(options, dict) else (parse_option(o) for o in options or [])
    for k, v in pairs:
        _merge(_options, k, v)
    _chunk_cache.clear()
    if chunk_cache_dir is not None:
        _chunk_cache.update(dir=Path(chunk_cache_dir), max_bytes=chunk_cache_bytes)
    _checked.clear()
    _zarr_roots.clear()


def _options_for(protocol: str) -> dict[str, Any]:
    out = json.loads(json.dumps(_DEFAULTS.get(protocol, {})))
    for k, v in _options.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


# ------------------------------------------------------------------------------------------------ locations


class RemotePath:
    """A file or "directory" (a key prefix) of an object store, with the `pathlib.Path` questions the stores and
    caches ask. ``str()`` is its URL. It has no ``__fspath__``: handing one to ``open()`` is a TypeError, never a
    silent local file."""

    __slots__ = ("fs", "path", "protocol", "options")

    def __init__(self, fs, path: str, protocol: str, options: dict[str, Any]):
        self.fs, self.path, self.protocol, self.options = fs, path.rstrip("/"), protocol, options

    def _with(self, path: str) -> "RemotePath":
        return RemotePath(self.fs, path, self.protocol, self.options)

    def __str__(self) -> str:
        return f"{self.protocol}://{self.path}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, other: str | Path) -> "RemotePath":
        return self._with(f"{self.path}/{str(other).strip('/')}")

    def __reduce__(self):  # a DataLoader worker or another rank makes it again from the URL and the options
        return (_remote_from_url, (str(self), self.options))

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[0] if "." in self.name[1:] else self.name

    @property
    def parent(self) -> "RemotePath":
        return self._with(self.path.rsplit("/", 1)[0]) if "/" in self.path else self

    def resolve(self) -> "RemotePath":
        return self

    def exists(self) -> bool:
        if _is_chunk_key(self.path):  # a chunk is read right after its presence is checked: fetch it now
            return _fetch_chunk(self)
        return bool(self.fs.exists(self.path))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def iterdir(self) -> Iterator["RemotePath"]:
        try:
            names = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return iter(())
        return iter([self._with(n) for n in names if n.rstrip("/") != self.path])

    def glob(self, pattern: str) -> Iterator["RemotePath"]:
        return iter([self._with(p) for p in self.fs.glob(f"{self.path}/{pattern}")])

    def rglob(self, pattern: str) -> Iterator["RemotePath"]:
        assert pattern == "*", "RemotePath.rglob: only '*'"
        return iter([self._with(p) for p in self.fs.find(self.path)])

    def stat(self) -> SimpleNamespace:
        return SimpleNamespace(st_size=int(self.fs.info(self.path)["size"]))

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_tail(self, num_bytes: int) -> bytes:
        data = _memo_get(self.path)
        return data[-num_bytes:] if data is not None else self.fs.cat_file(self.path, start=-num_bytes)

    def write_bytes(self, data: bytes) -> None:
        _memo_drop(self.path)
        self.fs.pipe_file(self.path, data)

    def unlink(self, missing_ok: bool = False) -> None:
        _memo_drop(self.path)
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: an object store has no directories, a key prefix exists once a key under it does."""


Location = Union[Path, RemotePath]


def location(path: str | Path | RemotePath) -> Location:
    """Where a store or cache is: a `Path` for a local path (or a ``file://`` URL), a `RemotePath` for a URL of
    any other fsspec protocol, checked once (an unknown protocol, a missing bucket, refused credentials or an
    unreachable endpoint is a CachekdError of one sentence)."""
    if isinstance(path, (Path, RemotePath)):
        return path
    text = str(path)
    protocol, sep, rest = text.partition("://")
    if not sep:
        return Path(text)
    if protocol == "file":
        return Path(rest)
    return _remote_from_url(text, _options_for(protocol))


def _remote_from_url(url: str, options: dict[str, Any]) -> RemotePath:
    import fsspec

    protocol = url.partition("://")[0]
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise CachekdError(f"unknown storage protocol {protocol!r} in {url!r}; use a local path, file://, s3://, "
                           f"gs://, az:// or another fsspec protocol.") from None
    except ImportError as e:
        raise CachekdError(f"{protocol}:// URLs need a package that is not installed ({e}); install it with "
                           f"pip (s3:// needs s3fs, gs:// gcsfs, az:// adlfs).") from None
    key = (protocol, json.dumps(options, sort_keys=True, default=str), _env_key())
    try:
        with _lock:
            fs = _filesystems.get(key)
            if fs is None:
                # fsspec's own instance cache ignores the environment (AWS_ENDPOINT_URL, credentials): ours keys on it
                fs = _filesystems[key] = cls(**options, skip_instance_cache=True)
    except TypeError as e:
        raise ConfigKeysError("a storage option does not apply to {protocol}:// ({e}); check {storage_option}.",
                              protocol=protocol, e=e) from None
    loc = RemotePath(fs, cls._strip_protocol(url), protocol, options)
    _check_reachable(loc)
    return loc


def _env_key() -> tuple:
    """The environment variables a filesystem reads its credentials, endpoint and config from."""
    prefixes = ("AWS_", "FSSPEC_", "GOOGLE_", "AZURE_")
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(prefixes)))


def is_local(loc: Location) -> bool:
    return isinstance(loc, Path)


def local_or_none(loc: Location) -> Path | None:
    """The local path of `loc`; None for a remote location."""
    return loc if isinstance(loc, Path) else None


def _endpoint(loc: RemotePath) -> str:
    ep = loc.options.get("endpoint_url") or loc.options.get("client_kwargs", {}).get("endpoint_url")
    return ep or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"


def _check_reachable(loc: RemotePath) -> None:
    """One request to the bucket (the first path component) of a remote location, once per process: its errors
    become one sentence each."""
    bucket = loc.path.split("/", 1)[0]
    key = (loc.protocol, bucket, json.dumps(loc.options, sort_keys=True, default=str), _env_key())
    if key in _checked:
        return
    url = f"{loc.protocol}://{bucket}"
    try:
        if hasattr(loc.fs, "call_s3"):  # (a listing, not HEAD: its errors carry the server's explanation)
            prefix = loc.path.partition("/")[2]
            loc.fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
        elif not loc.fs.exists(bucket):
            raise FileNotFoundError(bucket)
    except FileNotFoundError:
        raise CachekdError(f"the bucket {url!r} does not exist at {_endpoint(loc)}; create it first or check the "
                           f"URL (and AWS_ENDPOINT_URL).") from None
    except PermissionError as e:
        raise _refused_credentials(loc, url, e) from None
    except Exception as e:  # noqa: BLE001 - connection errors come as several botocore/aiohttp types
        if _is_connection_error(e):
            raise ConfigKeysError("cannot reach the object store for {url!r} at {endpoint} after {tries} tries "
                                  "({kind}); check AWS_ENDPOINT_URL or {storage_option} endpoint_url=..., and the "
                                  "network.", url=url, endpoint=_endpoint(loc), tries=CONNECT_TRIES,
                                  kind=type(e).__name__) from None
        if _is_auth_error(e):
            raise _refused_credentials(loc, url, e) from None
        raise
    _checked[key] = None


def _refused_credentials(loc: "RemotePath", url: str, e: BaseException) -> CachekdError:
    return ConfigKeysError("the object store at {endpoint} refused the credentials for {url!r} ({e}); set "
                           "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or {storage_option} key=... secret=...",
                           endpoint=_endpoint(loc), url=url, e=e)


def _is_connection_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionError", "ClientConnectorError",
                         "ConnectionRefusedError", "ConnectionClosedError", "ReadTimeoutError", "TimeoutError"})


def _is_auth_error(e: BaseException) -> bool:
    text = str(e)
    return any(c in text for c in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden",
                                   "403", "NoCredentials", "Unable to locate credentials"))


# ------------------------------------------------------------------------------------------------ files


def read_tail(loc: Location, num_bytes: int) -> bytes:
    """The last `num_bytes` of a file (OSError when it is missing or shorter)."""
    if isinstance(loc, RemotePath):
        data = loc.read_tail(num_bytes)
        if len(data) < num_bytes:
            raise OSError(f"{loc} is shorter than {num_bytes} bytes")
        return data
    with open(loc, "rb") as f:
        f.seek(-num_bytes, 2)
        return f.read(num_bytes)


def write_bytes(loc: Location, data: bytes) -> bool:
    """Write a remote object in one PUT (a reader sees the old object or the whole new one) and return True; a
    local path returns False (the caller writes it through a temporary file and a rename)."""
    if isinstance(loc, RemotePath):
        loc.write_bytes(data)
        return True
    return False


def remove(loc: Location) -> None:
    """Remove a file or a whole tree."""
    if isinstance(loc, RemotePath):
        if loc.exists():
            loc.fs.rm(loc.path, recursive=True)
        return
    shutil.rmtree(loc) if loc.is_dir() else loc.unlink()


def file_sizes(loc: Location) -> dict[str, int]:
    """Every file under `loc` by its path relative to `loc` ("a/b" with slashes), with its size in bytes."""
    if isinstance(loc, RemotePath):
        found = loc.fs.find(loc.path, detail=True)
        return {k[len(loc.path) + 1:]: int(v["size"]) for k, v in found.items() if v.get("type") != "directory"}
    return {f.relative_to(loc).as_posix(): f.stat().st_size for f in Path(loc).rglob("*") if f.is_file()}


def upload_tree(local_dir: Path, dest: RemotePath, *, last: str) -> None:
    """Copy every file under `local_dir` to `dest`, the file named `last` (relative) after all others: its
    presence then means the copy is complete."""
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    final = Path(local_dir) / last
    rest = [p for p in files if p != final]
    if rest:
        dest.fs.put([str(p) for p in rest], [f"{dest.path}/{p.relative_to(local_dir).as_posix()}" for p in rest])
    dest.fs.put_file(str(final), f"{dest.path}/{last}")


_local_copies: dict[str, Path] = {}


def local_copy(loc: Location) -> Path:
    """A local directory with the files under `loc` (downloaded once per process for a remote one; removed when
    the process ends), for libraries that read local files only (a Hugging Face tokenizer)."""
    if isinstance(loc, Path):
        return loc
    with _lock:
        if str(loc) not in _local_copies:
            tmp = Path(tempfile.mkdtemp(prefix="cachekd-remote-"))
            atexit.register(shutil.rmtree, tmp, True)
            loc.fs.get(loc.path + "/", str(tmp) + "/", recursive=True)
            _local_copies[str(loc)] = tmp
        return _local_copies[str(loc)]


# ------------------------------------------------------------------------------------------------ chunk memo

# The readers check that a chunk file is there (zarr would read a missing one as zeros) and, after decoding it,
# compare its last 4 bytes (CRC-32C) with its done-marker. On an object store each of those is a request: instead
# the presence check fetches the whole chunk into this memo, and zarr's read and the CRC check take it from there,
# so a chunk costs one GET instead of a HEAD, a GET and a ranged GET. Entries live MEMO_TTL_S at most, within
# MEMO_BYTES, and any write or delete through this process drops the key.
MEMO_BYTES = 256 << 20
MEMO_TTL_S = 60.0
_memo: "OrderedDict[str, tuple[float, bytes]]" = OrderedDict()
_memo_lock = threading.Lock()


def _is_chunk_key(path: str) -> bool:
    """Whether a path names a Zarr v3 chunk (``.../c/0/0``: the default key encoding)."""
    parts = path.rsplit("/c/", 1)
    return len(parts) == 2 and all(p.isdigit() for p in parts[1].split("/"))


def _memo_put(path: str, data: bytes) -> None:
    with _memo_lock:
        _memo[path] = (time.monotonic(), data)
        _memo.move_to_end(path)
        total = sum(len(d) for _, d in _memo.values())
        while total > MEMO_BYTES and _memo:
            total -= len(_memo.popitem(last=False)[1][1])


def _memo_get(path: str) -> bytes | None:
    with _memo_lock:
        entry = _memo.get(path)
        if entry is None or time.monotonic() - entry[0] > MEMO_TTL_S:
            _memo.pop(path, None)
            return None
        return entry[1]


def _memo_drop(path: str) -> None:
    with _memo_lock:
        _memo.pop(path, None)


def _fetch_chunk(loc: "RemotePath") -> bool:
    """Fetch a chunk file whole through the bucket's Zarr store (so the local chunk cache serves it when it has
    it) into the memo; False when there is no such file."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    store, key = _zarr_root(loc, read_only=True)
    data = sync(store.get(key, default_buffer_prototype()))
    if data is None:
        return False
    _memo_put(loc.path, data.to_bytes())
    return True


def _memo_store(store, root: str):
    """`store` (rooted at `root`, a bucket) with reads of memoised chunks served from the memo, and writes and
    deletes dropping them."""
    from zarr.storage import WrapperStore

    class MemoStore(WrapperStore):
        async def get(self, key, prototype, byte_range=None):
            if byte_range is None and (data := _memo_get(f"{root}/{key}")) is not None:
                return prototype.buffer.from_bytes(data)
            return await super().get(key, prototype, byte_range)

        async def set(self, key, value) -> None:
            _memo_drop(f"{root}/{key}")
            await super().set(key, value)

        async def delete(self, key) -> None:
            _memo_drop(f"{root}/{key}")
            await super().delete(key)

    return MemoStore(store)


# ------------------------------------------------------------------------------------------------ zarr


def _zarr_root(loc: RemotePath, read_only: bool):
    """(store, key): one `FsspecStore` for the bucket of `loc` (wrapped in zarr's `CacheStore` when a local chunk
    cache is configured and the store is read-only), shared by every array of that bucket in the process so the
    chunk cache has one size bound; `key` is the path of `loc` inside the bucket."""
    from zarr.storage import FsspecStore

    bucket, _, key = loc.path.partition("/")
    cached = read_only and bool(_chunk_cache)
    rkey = (loc.protocol, bucket, json.dumps(loc.options, sort_keys=True, default=str), _env_key(), read_only, cached)
    with _lock:
        store = _zarr_roots.get(rkey)
        if store is None:
            options = {**loc.options, "skip_instance_cache": True}
            store = _memo_store(FsspecStore.from_url(f"{loc.protocol}://{bucket}", storage_options=options,
                                                     read_only=read_only), bucket)
            if cached:
                from zarr.experimental.cache_store import CacheStore
                from zarr.storage import LocalStore

                _chunk_cache["dir"].mkdir(parents=True, exist_ok=True)
                d = Path(tempfile.mkdtemp(prefix="cachekd-chunks-", dir=_chunk_cache["dir"]))
                atexit.register(shutil.rmtree, d, True)  # per process: never a chunk of an earlier run
                store = CacheStore(store, cache_store=LocalStore(d), max_size=_chunk_cache.get("max_bytes"),
                                   cache_set_data=False)
            _zarr_roots[rkey] = store
    return store, key


@atexit.register
def _close_sessions() -> None:
    """Close the HTTP sessions of the Zarr stores this process opened (else aiohttp warns about each at exit)."""
    if not _zarr_roots:  # none opened: importing zarr this late fails ("can't register atexit after shutdown")
        return
    from zarr.core.sync import sync

    for store in list(_zarr_roots.values()):
        while hasattr(store, "_store"):  # CacheStore(MemoStore(FsspecStore))
            store = store._store
        client = getattr(getattr(store, "fs", None), "_s3", None)
        if client is not None:
            try:
                sync(client.close())
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
    _zarr_roots.clear()


def open_array(loc: Location, *, mode: str = "r"):
    """The Zarr array at `loc`."""
    import zarr

    if isinstance(loc, Path):
        return zarr.open_array(str(loc), mode=mode)
    store, key = _zarr_root(loc, read_only=mode == "r")
    return zarr.open_array(store=store, path=key, mode=mode)


def open_group(loc: Location, *, mode: str, zarr_format: int | None = 3):
    """The Zarr group at `loc` (``mode`` as `zarr.open_group`'s)."""
    import zarr

    if isinstance(loc, Path):
        return zarr.open_group(str(loc), mode=mode, zarr_format=zarr_format)
    store, key = _zarr_root(loc, read_only=mode == "r")
    return zarr.open_group(store=store, path=key, mode=mode, zarr_format=zarr_format)


# ------------------------------------------------------------------------------------------------ exclusive locks


class _FileLock:
    """An open file holding an exclusive `flock`; the kernel drops it when the holder ends, however it ends."""

    def __init__(self, f):
        self.f = f

    def check(self) -> None:
        """Nothing to check: a flock cannot be taken away."""

    def close(self) -> None:
        self.f.close()


def try_flock(path: Path):
    """The open file `path` (created when missing) with an exclusive lock on it, or None when another open file
    holds it. The kernel drops the lock when the holder ends, however it ends (a kill -9 leaves nothing to clean
    up)."""
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def flock_held(path: Path) -> bool:
    """Whether an open file holds a lock on `path` (False when there is no such file); creates nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (closing drops the probe's own shared lock)
    return False


def _try_flock(path: Path) -> _FileLock | None:
    f = try_flock(path)
    return None if f is None else _FileLock(f)


def lease_stale_s() -> float:
    return float(os.environ.get("CACHEKD_LEASE_STALE_S", LEASE_STALE_S))


class LeaseLostError(CachekdError):
    """Another process took over this process's lease (it was not renewed in time)."""


class Lease:
    """An exclusive lock on an object store: an object created with a conditional PUT (``If-None-Match: *``, so of
    two processes creating it at once exactly one succeeds), renewed every `lease_stale_s`/5 by a heartbeat thread
    with a PUT conditional on its ETag (``If-Match``), and deleted on release (conditional on its ETag too).

    The rule for a stale lease: one whose LastModified (the server's clock) is more than `lease_stale_s` seconds
    old was left by a process that is gone (killed, or cut off); another process may take it over, with a PUT
    conditional on the ETag it saw, so of two processes taking over at once exactly one succeeds. A holder whose
    renewal fails because its lease was taken over raises `LeaseLostError` from `check` (the writer calls it
    before each chunk's done-marker). Conditional PUTs need S3 (AWS since 2024, MinIO, moto, Ceph RGW); on other
    fsspec protocols the lease is created only when no object is there (a check, then a PUT: not atomic)."""

    def __init__(self, loc: RemotePath, etag: str | None):
        self.loc, self.etag = loc, etag
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True, name="cachekd-lease")
        self._thread.start()

    @staticmethod
    def body() -> bytes:
        return json.dumps({"holder": f"{socket.gethostname()}:{os.getpid()}", "time": time.time()}).encode()

    @classmethod
    def try_acquire(cls, loc: RemotePath) -> "Lease | None":
        """The lease at `loc`, or None while another process holds a fresh one."""
        s3 = hasattr(loc.fs, "call_s3")
        bucket, _, key = loc.path.partition("/")
        for _ in range(3):
            try:
                if s3:
                    return cls(loc, loc.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=cls.body(),
                                                   IfNoneMatch="*")["ETag"])
                if loc.exists():
                    raise FileExistsError(str(loc))
                loc.write_bytes(cls.body())
                return cls(loc, None)
            except OSError as e:
                if not _precondition_failed(e):
                    raise
            state = lease_state(loc)
            if state is None:
                continue  # released meanwhile: try again
            etag, age = state
            if age <= lease_stale_s():
                return None
            try:  # stale: take it over, conditional on the ETag seen
                if s3:
                    return cls(loc, loc.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=cls.body(),
                                                   IfMatch=etag)["ETag"])
                loc.write_bytes(cls.body())
                return cls(loc, None)
            except OSError as e:
                if _precondition_failed(e):
                    return None  # another process took it over first
                raise
        return None

    def renew(self) -> bool:
        """Renew the lease (conditional on its ETag); False, and `lost` set, when another process took it over.
        A transient error leaves it to the next beat (the lease goes stale only after five missed beats)."""
        bucket, _, key = self.loc.path.partition("/")
        try:
            if self.etag is not None:
                self.etag = self.loc.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self.body(),
                                                IfMatch=self.etag)["ETag"]
            else:
                self.loc.write_bytes(self.body())
        except OSError as e:
            if _precondition_failed(e):
                self.lost = True
                return False
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(lease_stale_s() / 5):
            if not self.renew():
                return

    def check(self) -> None:
        if self.lost:
            raise LeaseLostError(
                f"another process took over the lease {str(self.loc)!r} (it was not renewed for "
                f"{lease_stale_s():.0f} s); this process stops writing: run the same command again.")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.lost:
            return
        bucket, _, key = self.loc.path.partition("/")
        try:
            if self.etag is not None:
                self.loc.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self.etag)
            else:
                self.loc.unlink(missing_ok=True)
        except OSError:
            pass  # taken over meanwhile: it is the other process's now


def _precondition_failed(e: BaseException) -> bool:
    """Whether a conditional request was refused (HTTP 412, or 409 for two conditional writes at once)."""
    code = getattr(e.__cause__, "response", {}).get("Error", {}).get("Code")
    return isinstance(e, FileExistsError) or code in ("PreconditionFailed", "ConditionalRequestConflict")


def lease_state(loc: RemotePath) -> tuple[str | None, float] | None:
    """(ETag, age in seconds by the server's LastModified) of the lease object at `loc`; None when there is none."""
    try:
        info = loc.fs.info(loc.path)
    except FileNotFoundError:
        return None
    modified = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    if hasattr(modified, "timestamp"):
        modified = modified.timestamp()
    age = time.time() - float(modified) if modified is not None else 0.0
    etag = info.get("ETag") or info.get("etag")
    return etag, age


def try_exclusive(loc: Location):
    """An exclusive lock named `loc` (an object with ``check()`` and ``close()``), or None while another process
    holds it: a `flock` on a local file, a `Lease` on an object store."""
    if isinstance(loc, RemotePath):
        return Lease.try_acquire(loc)
    return _try_flock(loc)


def is_held(loc: Location) -> bool:
    """Whether another process holds the lock named `loc` right now."""
    if isinstance(loc, RemotePath):
        state = lease_state(loc)
        return state is not None and state[1] <= lease_stale_s()
    lock = _try_flock(loc)
    if lock is None:
        return True
    lock.close()
    return False


@contextmanager
def exclusive(loc: Location, poll_s: float = 0.2):
    """Hold the lock named `loc`, waiting while another process holds it (a lease left by a process that is gone
    is taken over once stale)."""
    if isinstance(loc, Path):
        loc.parent.mkdir(parents=True, exist_ok=True)
        with open(loc, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    while (lease := Lease.try_acquire(loc)) is None:
        time.sleep(poll_s)
    try:
        yield
    finally:
        lease.close()
