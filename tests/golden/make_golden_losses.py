"""Write tests/golden/losses.json: golden KD/CE sums from the float64 reference on fixed seeded inputs.

Run from the repository root:  python tests/golden/make_golden_losses.py
The inputs (float32 values, stored exactly) go into the file too, so the test does not depend on any random
generator; re-running the script must give the same file.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.reference_losses import ref_distill  # noqa: E402

OUT = Path(__file__).with_name("losses.json")
OBJECTIVES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv")
B, T, V = 2, 4, 11
TAU = 2.0


def sparse_from(logits: np.ndarray, ids: np.ndarray, shift: np.ndarray, tau: float) -> dict:
    """Cache-like sparse target: logits at ids minus a per-position shift, tail log-sum-exp at tau."""
    vals = np.take_along_axis(logits, ids, -1) - shift[..., None]
    mask = np.ones_like(logits, dtype=bool)
    np.put_along_axis(mask, ids, False, -1)
    scaled = np.where(mask, (logits - shift[..., None]) / tau, -np.inf)
    tail = np.logaddexp.reduce(scaled, axis=-1)
    return {"kind": "sparse", "ids": ids, "logits": vals.astype(np.float32), "tail_lse": tail.astype(np.float32)}


def main() -> None:
    rng = np.random.default_rng(20240601)
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    student = f32(rng.normal(size=(B, T, V)) * 2.0)
    t0 = f32(rng.normal(size=(B, T, V)) * 2.0)
    t1 = f32(rng.normal(size=(B, T, V)) * 3.0)
    labels = rng.integers(0, V, size=(B, T))
    labels[0, 2] = -100
    labels[1, 0] = -100
    top_ids = np.argsort(-t0, -1)[..., :4]
    top_ids = np.take_along_axis(top_ids, rng.permuted(np.tile(np.arange(4), (B, T, 1)), axis=-1), -1)
    rand_ids = np.argsort(rng.random((B, T, V)), -1)[..., :3]
    teachers = {
        "dense0": {"kind": "dense", "logits": t0},
        "dense1": {"kind": "dense", "logits": t1},
        "top4": sparse_from(t0.astype(np.float64), top_ids, rng.normal(size=(B, T)) * 3, TAU),
        "rand3": sparse_from(t1.astype(np.float64), rand_ids, rng.normal(size=(B, T)), TAU),
    }

    def as_ref(name):
        t = teachers[name]
        if t["kind"] == "dense":
            return ("dense", torch.tensor(t["logits"]))
        return ("sparse", torch.tensor(t["ids"]), torch.tensor(t["logits"]), torch.tensor(t["tail_lse"]))

    cases = []

    def add(names, mix_alpha=1.0, **config):
        config.setdefault("temperature", TAU)
        ref = ref_distill(torch.tensor(student), torch.tensor(labels), [as_ref(n) for n in names], mix_alpha=mix_alpha,
                          **config)
        cases.append({"teachers": list(names), "mix_alpha": mix_alpha, "config": config,
                      "kd_sum": float(ref["kd_sum"]), "ce_sum": float(ref["ce_sum"]), "kd_count": ref["kd_count"]})

    for objective in OBJECTIVES:
        add(["dense0"], objective=objective)
        for mode in ("bucket", "uniform", "renormalize"):
            add(["top4"], objective=objective, tail_mode=mode)
        add(["dense0"], mix_alpha=0.7, objective=objective)
        add(["top4"], mix_alpha=0.7, objective=objective, tail_mode="uniform")
        add(["dense0", "dense1"], objective=objective, teacher_combine="logits", teacher_weights=[0.6, 0.4])
    for combine in ("logits", "probs", "losses"):
        add(["top4", "rand3"], objective="forward_kl", tail_mode="uniform", teacher_combine=combine)
        add(["dense0", "rand3"], objective="reverse_kl", tail_mode="uniform", teacher_combine=combine,
            teacher_weights=[1.0, 3.0])
    add(["top4", "rand3"], objective="jsd", tail_mode="bucket", teacher_combine="losses", beta=0.2)
    add(["dense0"], objective="forward_kl", temperature=1.0, reduction="batchmean")
    add(["top4"], objective="reverse_kl", temperature=1.0, tail_mode="bucket")
    add(["rand3"], objective="skew_forward_kl", temperature=0.5, tail_mode="bucket", skew_lambda=0.3)
    add([], objective="forward_kl")

    def plain(x):
        if isinstance(x, np.ndarray):
            return x.tolist()
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, float) and math.isinf(x):
            return "-inf"
        return x

    data = {
        "about": "Golden values of cachekd.losses from tests/reference_losses.py (float64); "
                 "written by tests/golden/make_golden_losses.py.",
        "inputs": {"student_logits": plain(student), "labels": plain(labels), "teachers": plain(teachers)},
        "cases": cases,
    }
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
