"""`cachekd demo`: the whole job on a built-in corpus, on CPU, in minutes.

prepare → train a teacher → precompute its outputs twice, once each (the default storage: the exact top-16 and 50
draws beyond them; and the factored cache: the input of its output layer in int8, every logit) → distil a forward-KL
student from the default cache and a reverse-KL student with logit mixing and progressive α from the factored one
(reverse KL from a sparse cache keeps only part of the teacher's gain), beside a cross-entropy baseline of the same
shape and steps → a weighted-mutual-learning cohort of two peers of that shape with the cached teacher as a fixed peer
(ω moves a few times) → evaluate all (dev perplexity, minimal pairs) → compare (table + plots). Every number comes
from the runs.
Re-running skips the stages that finished and resumes the one that was interrupted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cachekd.errors import CachekdError, ConfigKeysError


@dataclass
class DemoSize:
    num_documents: int
    num_pairs: int
    vocab_size: int
    seq_len: int
    teacher_steps: int
    student_steps: int
    batch_size: int
    eval_windows: int
    cohort_steps: int
    """Steps of the mutual-learning cohort (both peers take each one); ω updates every quarter of them."""


FULL = DemoSize(num_documents=8000, num_pairs=200, vocab_size=2000, seq_len=64, teacher_steps=400, student_steps=250,
                batch_size=32, eval_windows=256, cohort_steps=250)
SMALL = DemoSize(num_documents=600, num_pairs=20, vocab_size=400, seq_len=64, teacher_steps=30, student_steps=20,
                 batch_size=8, eval_windows=32, cohort_steps=12)

TEACHER_MODEL = {"arch": "llama", "hidden_size": 192, "num_layers": 4, "num_heads": 4, "intermediate_size": 512}
STUDENT_MODEL = {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 172}


def _train_cfg(name: str, out: Path, store: Path, model: dict, steps: int, size: DemoSize, lr: float, seed: int,
               distill: dict | None, device: str) -> dict[str, Any]:
    return {
        "name": name, "output": str(out), "seed": seed, "device": device, "precision": "fp32",
        "model": dict(model),
        "data": {"store": str(store), "batch_size": size.batch_size, "eval_windows": size.eval_windows},
        "optim": {"lr": lr, "warmup_steps": max(1, steps // 20), "max_steps": steps, "weight_decay": 0.1},
        "log_every": max(1, steps // 40), "eval_every": max(1, steps // 8), "save_every": max(1, steps // 4),
        "distill": distill,
    }


class _Stages:
    """The demo's record of finished stages (demo.json): a stage that finished earlier is skipped on a re-run."""

    def __init__(self, out: Path, options: dict[str, Any], say: Callable[[str], None]):
        if out.exists() and any(out.iterdir()) and not (out / "demo.json").exists():
            raise ConfigKeysError("{path!r} is not empty and is not a demo directory; choose another {out}.",
                                  path=str(out))
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "demo.json"
        self.state: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        if self.state.get("options", options) != options:
            raise ConfigKeysError("{path!r} holds a demo run with other options ({options}); use another {out}.",
                                  path=str(out), options=self.state["options"])
        self.state["options"] = options
        self.timings: dict[str, float] = self.state.setdefault("timings", {})
        self.say = say

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        if name in self.timings:
            self.say(f"[demo] {name}: done earlier ({self.timings[name]:.1f} s), skipping")
            return None
        self.say(f"[demo] {name} ...")
        t0 = time.perf_counter()
        result = fn()
        self.timings[name] = time.perf_counter() - t0
        self.save()
        return result

    def save(self) -> None:
        self.path.write_text(json.dumps(self.state, indent=2))


def run_demo(out_dir: str | Path = "demo_out", *, corpus: str | None = None, small: bool = False, seed: int = 0,
             device: str = "cpu", progress: bool = True, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; returns the comparison (rows, files) plus per-stage timings."""
    from cachekd.cohort.config import PEERS_DIR
    from cachekd.compare import compare_runs
    from cachekd.demo.data import write_demo_data
    from cachekd.evaluate import evaluate
    from cachekd.rundir import save_eval
    from cachekd.precompute import PrecomputeConfig, precompute
    from cachekd.tokens import PrepareConfig, prepare
    from cachekd.train_config import load_train_config
    from cachekd.trainer import run

    size = SMALL if small else FULL
    out = Path(out_dir)
    stage = _Stages(out, {"corpus": corpus, "small": small, "seed": seed}, say)
    timings, state = stage.timings, stage.state

    # 1. data
    data = out / "data"
    if corpus is None:
        stage("generate corpus", lambda: write_demo_data(data, num_documents=size.num_documents,
                                                         num_pairs=size.num_pairs, seed=seed))
        inputs, pairs = [str(data / "corpus" / "demo.txt")], data / "minimal_pairs"
    else:
        if not Path(corpus).exists():
            raise CachekdError(f"corpus {corpus!r} does not exist.")
        stage("generate minimal pairs", lambda: write_demo_data(data, num_documents=50, num_pairs=size.num_pairs,
                                                                seed=seed))
        inputs, pairs = [corpus], data / "minimal_pairs"
    store = out / "tokens"
    stage("prepare", lambda: prepare(PrepareConfig(inputs=inputs, output=str(store), seq_len=size.seq_len,
                                                   vocab_size=size.vocab_size, dev_fraction=0.05, seed=seed),
                                     progress=progress))

    def train(name: str, model: dict, steps: int, lr: float, distill: dict | None) -> None:
        run_dir = out / "runs" / name
        cfg = load_train_config(_train_cfg(name, run_dir, store, model, steps, size, lr, seed, distill, device))
        resume = (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir())
        run(cfg, resume=resume, force=not resume and run_dir.exists(), progress=progress)

    # 2. teacher, 3. cache
    stage("train teacher", lambda: train("teacher", TEACHER_MODEL, size.teacher_steps, 2e-3, None))
    cache = out / "cache"
    stage("precompute", lambda: precompute(PrecomputeConfig(
        store=str(store), teachers=[str(out / "runs" / "teacher")], output=str(cache), temperatures=[1.0, 2.0],
        device=device), progress=progress))
    factored = out / "cache-factored"
    stage("precompute factored", lambda: precompute(PrecomputeConfig(
        store=str(store), teachers=[str(out / "runs" / "teacher")], output=str(factored), factored=True,
        device=device), progress=progress))

    # 4. students of one shape and step count: forward KL from the default cache, reverse KL from the factored one
    students = {
        "student-ce": None,
        "student-forward-kl": {"cache": str(cache), "objective": "forward_kl", "temperature": 2.0, "ce_weight": 0.5,
                               "tail_mode": "bucket"},
        "student-reverse-kl-mix": {"cache": str(factored), "objective": "reverse_kl", "temperature": 1.0,
                                   "ce_weight": 0.5, "tail_mode": "bucket", "chunk_size": 512,
                                   "alpha": {"kind": "epoch_linear", "start": 0.9, "end": 0.5}},
    }
    for name, distill in students.items():
        stage(f"train {name}", lambda n=name, d=distill: train(n, STUDENT_MODEL, size.student_steps, 3e-3, d))

    # 5. a weighted-mutual-learning cohort: two peers of the student shape, the cached teacher a fixed peer
    cohort_dir = out / "cohort"
    stage("train cohort", lambda: _train_cohort(cohort_dir, store, factored, size, seed, device, progress))

    # 6. evaluation, 7. comparison
    run_dirs = [out / "runs" / n for n in ["teacher", *students]]
    for rd in [*run_dirs, *(cohort_dir / PEERS_DIR / p for p in COHORT_PEERS)]:
        def _eval(rd=rd):
            res = evaluate(rd, dev_store=store, minimal_pairs=pairs, device=device, progress=False,
                           max_windows=None if not small else 64)
            save_eval(res, rd)
        stage(f"evaluate {rd.name}", _eval)
    comparison = compare_runs([*run_dirs, cohort_dir], out / "compare")
    state["precompute_s"] = timings.get("precompute")
    state["precompute_factored_s"] = timings.get("precompute factored")
    state["cohort_weights"] = _cohort_weights(cohort_dir)
    stage.save()
    return {"comparison": comparison, "timings": timings, "out": str(out), "cache": str(cache),
            "factored_cache": str(factored), "cohort": str(cohort_dir), "cohort_weights": state["cohort_weights"]}


COHORT_PEERS = ("peer-a", "peer-b")
"""The cohort's trained peers (run directories under <out>/cohort/peers/)."""


def _train_cohort(cohort_dir: Path, store: Path, cache: Path, size: DemoSize, seed: int, device: str,
                  progress: bool) -> None:
    """Weighted mutual learning (forward KL, α = 0.5) of two peers of the student shape with the cache's teacher as
    a fixed peer of weight 1/3; the peers' ω moves on their dev losses four times over the run."""
    from cachekd.cohort.config import load_cohort_config
    from cachekd.cohort.run import run_cohort

    steps = size.cohort_steps
    cohort = load_cohort_config({
        "name": "cohort", "output": str(cohort_dir), "seed": seed, "device": device, "precision": "fp32",
        "data": {"store": str(store), "batch_size": size.batch_size, "eval_windows": size.eval_windows},
        "optim": {"lr": 3e-3, "warmup_steps": max(1, steps // 20), "max_steps": steps, "weight_decay": 0.1},
        "cache": str(cache),
        "peers": [{"name": n, "seed": seed + 1 + i, "model": dict(STUDENT_MODEL)} for i, n in enumerate(COHORT_PEERS)],
        "mutual": {"alpha": 0.5, "temperature": 1.0, "objective": "forward_kl", "update_every": max(1, steps // 4),
                   "eval_windows": max(8, size.eval_windows // 4), "fixed_peers": ["teacher"]},
        "log_every": max(1, steps // 40), "eval_every": max(1, steps // 8), "save_every": max(1, steps // 4),
    })
    resume = cohort_dir.exists() and (cohort_dir / "checkpoints").exists() and any((cohort_dir / "checkpoints").iterdir())
    run_cohort(cohort, resume=resume, force=not resume and cohort_dir.exists(), progress=progress)


def _cohort_weights(cohort_dir: Path) -> list[dict[str, Any]]:
    """ω of the cohort's members at the start and after each update (its metrics.jsonl)."""
    path = cohort_dir / "metrics.jsonl"
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "members": r["members"], "weights": r["weights"]} for r in recs
            if r.get("kind") == "weights"]
