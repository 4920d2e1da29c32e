"""A teacher ensemble cached as one teacher (`cachekd precompute --ensemble logits|probs`).

Baby Llama distils from the combination of two teachers: their raw logits averaged, then the tempered softmax.
Combined at training time from two sparse caches, that target is only approximate (each teacher's tail is known by
its mass alone, so the combined distribution is, beyond the stored ids). Combined at precompute time, while both
teachers' full logits exist, it is exact, and a sampled or hybrid cache of it gives the student the same unbiased
forward-KL target as for a single teacher. The price: the weights and the combination are fixed in the cache.

    logits: log p_ens(v) = Σ_i w_i log p_i(v) − log Z   (= softmax of Σ_i w_i z_i: each log p_i differs from the raw
            logits z_i by a per-position constant, so averaging log-probabilities is averaging raw logits; τ then
            applies to the combined logits, as in Baby Llama)
    probs:  p_ens(v) = Σ_i w_i p_i(v)                    (at τ = 1; other temperatures temper the mixture)

The cache records the ensemble as one teacher whose info names its members (path and fingerprint of each), the
combination and the weights, so that `verify --recompute`, `--repair` and `audit` can rebuild it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from cachekd.errors import CachekdError, ConfigKeysError
from cachekd.kd_options import is_real

COMBINES = ("logits", "probs")
NAME = "ensemble"


def check_options(combine: str | None, weights: list[float] | None, num_teachers: int) -> None:
    """Refuse an ensemble that cannot be formed (one sentence each)."""
    if combine is None:
        if weights is not None:
            raise ConfigKeysError("{ensemble_weights} needs {ensemble} logits or {ensemble} probs.")
        return
    if combine not in COMBINES:
        raise ConfigKeysError("{ensemble} must be one of {combines} (got {got!r}).", combines=", ".join(COMBINES),
                              got=combine)
    if num_teachers < 2:
        raise ConfigKeysError("{ensemble} combines several teachers: pass at least two {teachers} (got {n}).",
                              n=num_teachers)
    if weights is not None:
        if len(weights) != num_teachers:
            raise ConfigKeysError("{ensemble_weights} needs one weight per teacher ({n}); got {got}.", n=num_teachers,
                                  got=len(weights))
        if not all(is_real(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise ConfigKeysError("{ensemble_weights} must be finite numbers ≥ 0 with a positive sum (got {got}).",
                                  got=weights)


def ensemble_info(members: list[dict[str, Any]], combine: str, weights: list[float]) -> dict[str, Any]:
    """The cache plan's record of the ensemble teacher (its identity: members, combination, weights)."""
    weights = [float(w) for w in weights]
    if not math.isfinite(sum(weights)):  # finite weights whose sum overflows (1e308, 1e308): only ratios count
        weights = [w / max(weights) for w in weights]
    total = sum(weights)
    norm = [w / total for w in weights]
    ident = json.dumps({"members": [m["fingerprint"] for m in members], "combine": combine, "weights": norm},
                       sort_keys=True)
    return {
        "name": NAME,
        "path": " + ".join(m["path"] for m in members),
        "fingerprint": hashlib.sha256(ident.encode()).hexdigest(),
        "model_type": f"ensemble of {len(members)} by {combine}",
        "num_params": sum(int(m["num_params"]) for m in members),
        "model_vocab_size": min(int(m["model_vocab_size"]) for m in members),
        "padded_logits_dropped": 0,
        "padding_mass": None,
        "members": [dict(m) for m in members],
        "combine": combine,
        "weights": norm,
    }


def member_infos(info: dict[str, Any]) -> list[dict[str, Any]]:
    """The checkpoints behind a cached teacher: its members for an ensemble, else itself."""
    return list(info["members"]) if info.get("members") else [info]


def teacher_problem(info: dict[str, Any]) -> str | None:
    """Why the teacher a cache was built from cannot be run again (a member missing or changed), or None."""
    from cachekd.models import checkpoint_fingerprint

    for m in member_infos(info):
        p = Path(m["path"])
        which = f"teacher {info['name']!r}" + (f" (member {m['name']!r})" if m is not info else "")
        if not p.exists():
            return f"{which} is no longer at {str(p)!r}"
        if checkpoint_fingerprint(p) != m["fingerprint"]:
            return f"{which} at {str(p)!r} changed since the cache was built"
    return None


def load_cached_teacher(info: dict[str, Any], vocab_size: int):
    """The model a cached teacher's outputs came from (an `EnsembleTeacher` for an ensemble), on the CPU, in eval
    mode. Raises CachekdError when it cannot be run again (`teacher_problem`)."""
    from cachekd.models import load_model
    from cachekd.teachers import EnsembleTeacher

    problem = teacher_problem(info)
    if problem:
        raise CachekdError(problem)
    if not info.get("members"):
        return load_model(Path(info["path"])).eval()
    members = [load_model(Path(m["path"])).eval() for m in info["members"]]
    return EnsembleTeacher(members, info["weights"], info["combine"], vocab_size).eval()


def teacher_args(info: dict[str, Any]) -> list[str]:
    """The `cachekd precompute` arguments that name this cached teacher (unquoted)."""
    if not info.get("members"):
        return ["--teacher", f"{info['name']}={info['path']}"]
    args: list[str] = []
    for m in info["members"]:
        args += ["--teacher", f"{m['name']}={m['path']}"]
    args += ["--ensemble", info["combine"]]
    if len(set(info["weights"])) > 1:
        args += ["--ensemble-weights", ",".join(repr(float(w)) for w in info["weights"])]
    return args
