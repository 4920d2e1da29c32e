"""Resumable checkpoints of one run: save (atomic, keep the last N), load, and the identity check against the config.

A checkpoint (``RUN/checkpoints/step_00000042.pt``) holds the training state the caller gives (model, optimizer,
scheduler, scaler, counters) plus what this module adds: the cachekd version, the config identity (the config
without runtime options) and its sha256, and the Python / NumPy / torch / CUDA random states. A resume is refused
when the identity differs, saying which value; so is one whose planned length (``optim.max_steps``) changed.

Checkpoints hold tensors and plain values only (the NumPy random state as a tensor) and are loaded with
``weights_only=True``: a file holding anything else (a pickled callable) is refused without running it. Checkpoints
written before held the NumPy state as an array: NumPy arrays (numeric, no objects) are allowed too, so they load.

One manager per run directory: a cohort of students trained in one loop has one manager per student.
"""

from __future__ import annotations

import errno
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cachekd import __version__
from cachekd.errors import CachekdError, ConfigKeysError
from cachekd.io import sha256_json
from cachekd.rundir import RunDir, checkpoint_name


def capture_rng_state() -> dict[str, Any]:
    """The Python, NumPy, torch and (when present) CUDA random states, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(s: dict[str, Any]) -> None:
    """Put back what `capture_rng_state` returned (or the NumPy array of a checkpoint written before)."""
    random.setstate(s["python"])
    kind, keys, *rest = s["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((kind, keys, *rest))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _allowed_globals() -> list[Any]:
    """What a checkpoint may hold beyond tensors and plain values: NumPy arrays (the NumPy random state of
    checkpoints written before it was stored as a tensor; an array's items go through the same restricted loader,
    so no callable is run)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct

    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_state(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, loaded with ``weights_only=True`` (tensors and plain values only); anything else,
    a file that cannot be read, or one that vanished meanwhile is one sentence (CachekdError), and nothing it
    holds is run."""
    import pickle

    where = str(path)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CachekdError(f"checkpoint {where!r} was removed while it was being read (does another process write "
                           f"this run?); run the command again.") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CachekdError(f"checkpoint {where!r} holds Python objects other than tensors and plain values{what}, "
                           f"which cachekd never writes; it was not loaded, since loading it could run code.") from None
    except Exception as e:  # noqa: BLE001
        raise CachekdError(f"checkpoint {where!r} cannot be read ({type(e).__name__}); it may be corrupt.") from None
    if not isinstance(state, dict) or "config_identity" not in state:
        raise CachekdError(f"checkpoint {where!r} is not a cachekd checkpoint.")
    return state


def first_difference(a: Any, b: Any, prefix: str = "") -> str:
    """The first key (dotted path) where two nested mappings differ, as ``key: old then, new now``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: {a!r} then, {b!r} now"


class CheckpointManager:
    """Saves and loads the checkpoints of one run directory for a config whose identity is `identity`.

    `identity_of_saved` turns the run's saved config.yaml (a mapping) into the same identity form, raising
    CachekdError (or yaml.YAMLError / OSError) when it cannot; `keep` is how many checkpoints stay on disk."""

    def __init__(self, run: RunDir, identity: dict[str, Any], *, keep: int,
                 identity_of_saved: Callable[[dict[str, Any]], dict[str, Any]]):
        self.run, self.identity, self.keep = run, identity, keep
        self.identity_hash = sha256_json(identity)
        self._identity_of_saved = identity_of_saved

    @property
    def directory(self) -> Path:
        return self.run.checkpoint_dir

    def path_for(self, step: int) -> Path:
        return self.directory / checkpoint_name(step)

    def save(self, step: int, state: dict[str, Any], *, rotate: bool = True) -> Path:
        """Write `state` (with the step, identity and random states added) as the checkpoint of `step`, atomically,
        then (with `rotate`) delete all but the newest `keep`; returns its path. A write that fails (a full disk)
        leaves no temporary file, and raises OSError(ENOSPC) when the disk is full whatever torch reports."""
        from cachekd.io import is_disk_full

        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        full = {"cachekd_version": __version__, "config_identity": self.identity_hash, "config": self.identity,
                "step": step, **state, "rng": capture_rng_state()}
        path = self.path_for(step)
        tmp = d / f".{path.name}.tmp"
        try:
            with open(tmp, "wb") as f:  # (a file object: torch's RuntimeError then keeps the OSError as context)
                torch.save(full, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if is_disk_full(e):
                raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
            raise
        if rotate:
            self.rotate()
        return path

    def rotate(self) -> None:
        """Delete all but the newest `keep` checkpoints."""
        for old in self.run.checkpoints()[: -self.keep]:
            old.unlink()

    def load(self, path: Path, *, restore_rng: bool = True) -> dict[str, Any]:
        """The state saved in `path` (`load_state`), after checking it was written with this config; restores the
        random states."""
        state = load_state(path)
        if state["config_identity"] != self.identity_hash:
            diff = first_difference(state.get("config", {}), self.identity)
            raise ConfigKeysError("the checkpoint in {path!r} was written with a different config ({diff}); resume "
                                  "with the same config, or pass {force} to start over.", path=str(self.run.path),
                                  diff=diff)
        if restore_rng:
            restore_rng_state(state["rng"])
        return state

    def check_saved_config(self) -> None:
        """Refuse to go on in a run directory whose config.yaml differs from this config (beyond runtime options)."""
        import yaml

        out = str(self.run.path)
        try:
            saved = self._identity_of_saved(self.run.read_config_mapping())
        except (CachekdError, yaml.YAMLError, OSError):
            raise ConfigKeysError("the config.yaml in {out!r} cannot be read; pass {force} to start over.",
                                  out=out) from None
        if saved != self.identity:
            diff = first_difference(saved, self.identity)
            raise ConfigKeysError("the run in {out!r} was started with a different config ({diff}); resume with the "
                                  "same config, or pass {force} to start over.", out=out, diff=diff)

    def check_same_length(self, max_steps: int | None) -> None:
        """Refuse to resume with another optim.max_steps: the learning-rate (and α, τ) schedules run over the run's
        planned length, so changing it midway would jump them (a cosine ending at 20 steps restarted high for 40)."""
        import yaml

        try:
            saved = self.run.read_config_mapping().get("optim", {}).get("max_steps")
        except (CachekdError, yaml.YAMLError, OSError, AttributeError):
            return  # an unreadable config.yaml is reported by the checkpoint's own config check
        if saved != max_steps:
            def show(v):
                return "unset (the epochs decide)" if v is None else str(v)
            how = "with {max_steps} {saved}" if saved is not None else "without {max_steps}"
            raise ConfigKeysError(
                "the run in {path!r} was planned for max_steps {planned} and this command asks for {asked}; its "
                "schedules run over the planned length, so resume " + how + ", or start a new run (another "
                "{output}, or {force}).", path=str(self.run.path), planned=show(saved), asked=show(max_steps),
                saved=saved)
