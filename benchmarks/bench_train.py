"""Training throughput, cached vs online distillation, memory with a bigger cache, and equal-wall-time quality.

(a) distill-from-cache throughput ÷ plain LM (CE) throughput for the same tiny student and batch, with a top-k
    cache (k=64, bucket tail): forward KL at τ=2 and reverse KL at τ=1. Goal ≥ 0.9.
(b) cached ÷ online distillation throughput with a teacher of ≥ 6× the student's parameters (FLOPs per token);
    ideal = 1 + t(teacher forward) / t(cached student step). Goal: cached/online ≥ 0.9 × ideal.
(c) peak RSS of the same distill job (same steps) against a cache of N windows and of 10·N windows, each in a
    fresh subprocess. Goal: within 10 %.
(d) equal wall-clock: (i) CE only, (ii) distil from the cache (forward KL, τ=2, λ=0.5, top-k), (iii) online
    distillation from the same teacher, each for the same training wall time; dev loss, steps, tokens, and the
    one-off precompute cost beside it, amortised over 1, 4 and 16 students.
(e) distil-from-factored ÷ CE throughput for a Baby-Llama-58M-shaped student (LLaMA hidden 512, 16 layers, 8 heads,
    FFN 1024) with a factored cache (`precompute --factored`, int8) of a d=`--e-teacher-d` (1024: LLaMA-360M's)
    teacher: every teacher logit rebuilt at training time from the stored h and output layer, forward KL at τ=2
    (Baby Llama) and reverse KL with mixing (ChooBaCa, α 0.5). The teacher is random-init with one layer (only its
    d and V matter to the student's step; its body is never run at training time). Goal ≥ 0.85 (issue 19).

Data: a proportional prefix of every text file of `--data` (default ../shared/data/babylm_like), `--text-mb` MB
in all (0.4 MB by default, 10 % of each source's documents held out as dev), so the teacher's cache only covers the
windows that are used (precomputing over all of babylm_like takes far longer than the rest of the benchmark on
2 CPU cores). The BPE tokenizer (`--vocab-size`, at most 8000; a small subset gives fewer) is trained on that
subset's train split. The teacher (LLaMA
hidden 256, 4 layers) is trained on the same train split for `--teacher-budget` seconds. Part (c) uses its own
small BPE (`--c-vocab-size`, 1000) for both of its stores and a random-init teacher: only the cache size matters
there, and precompute's per-position post-processing is O(V), so a 10x cache at V=8000 would take minutes.

Variants are interleaved (A B C, then C B A, ...) and reported as medians and ratios measured side by side in one run: the
machine is shared and absolute wall-clock figures move by tens of percent.

Prints a table per part and writes benchmarks/results/train_<hardware>_<date>.md.

    python benchmarks/bench_train.py                  # full default: ~9-10 min on 2 CPU cores
    python benchmarks/bench_train.py --quick          # small sizes: ~1.5 min quiet, ~3-4 min on a loaded machine
    python benchmarks/bench_train.py --work /tmp/bt   # keep and reuse stores, teacher, caches across runs
    python benchmarks/bench_train.py --parts ab       # only some parts
    python benchmarks/bench_train.py --parts e --vocab-size 16000 --batch-size 2 --threads 1   # (e) alone
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

STUDENT = {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 172}  # tiny preset
TEACHER = {"arch": "llama", "hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 688}
RAND_TEACHER = {"arch": "llama", "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
STUDENT_LR, TEACHER_LR = 3e-3, 2e-3  # tiny-student / tiny-teacher presets
FKL = {"objective": "forward_kl", "temperature": 2.0, "ce_weight": 0.5, "tail_mode": "bucket"}
RKL = {"objective": "reverse_kl", "temperature": 1.0, "ce_weight": 0.5, "tail_mode": "bucket"}

FULL = dict(text_mb=0.4, teacher_budget=150.0, rounds=4, block=3, block_s=4.0, c_mb=0.08, c_steps=20, c_repeats=1,
            budget=75.0, d_probe=6, eval_windows=256, warmup=20)
QUICK = dict(text_mb=0.1, teacher_budget=10.0, rounds=2, block=2, block_s=1.0, c_mb=0.015, c_steps=6, c_repeats=1,
             budget=8.0, d_probe=3, eval_windows=64, warmup=3)
DEV_FRACTION = 0.1  # of the documents of every source (the tail), for a dev split of a usable size


def _dev(summary: dict[str, Any]) -> float:
    """A run's final dev loss: the whole dev split's, or the trainer's fixed dev sample's (every run here scores
    the same sample of `eval_windows` windows, so the numbers compare)."""
    v = summary.get("final_dev_loss")
    return summary["final_dev_loss_sample"] if v is None else v


def _ppl(summary: dict[str, Any]) -> float:
    v = summary.get("final_dev_ppl")
    return summary["final_dev_ppl_sample"] if v is None else v


def log(msg: str) -> None:
    print(f"[bench_train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="directory of text files (default ../shared/data/babylm_like)")
    ap.add_argument("--work", default=None, help="keep stores/teacher/caches here and reuse them on the next run")
    ap.add_argument("--quick", action="store_true", help="small sizes, ≤ 3 minutes")
    ap.add_argument("--parts", default="abcd", help="which parts to run (letters of abcde; e only when named)")
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads for every variant (default: all cores)")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="windows per step (tiny presets: 16)")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--text-mb", type=float, default=None, help="MB of text for the store of parts a, b, d")
    ap.add_argument("--teacher-budget", type=float, default=None, help="teacher training wall time, s")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds in parts a and b")
    ap.add_argument("--block", type=int, default=None, help="least timed steps per variant per round")
    ap.add_argument("--block-s", type=float, default=None, help="least seconds per timed block (more steps when fast)")
    ap.add_argument("--c-mb", type=float, default=None, help="MB of text of the 1x store of part c (10x: ten times it)")
    ap.add_argument("--c-vocab-size", type=int, default=1000,
                    help="BPE vocabulary of the part-c stores (one tokenizer for both; small so the 10x cache is quick to make)")
    ap.add_argument("--c-steps", type=int, default=None, help="steps of the distill job of part c")
    ap.add_argument("--c-repeats", type=int, default=None, help="subprocess runs per cache size in part c")
    ap.add_argument("--budget", type=float, default=None, help="training wall time of each student in part d, s")
    ap.add_argument("--d-probe", type=int, default=None, help="steps timed right before each part-d run to set max_steps")
    ap.add_argument("--steps-margin", type=float, default=1.25,
                    help="part d: max_steps = margin × budget × probed steps/s, so wall time (not steps) ends each run")
    ap.add_argument("--eval-windows", type=int, default=None, help="dev windows scored at the end of each run")
    ap.add_argument("--warmup", type=int, default=None, help="LR warmup steps of every run")
    ap.add_argument("--e-teacher-d", type=int, default=1024, help="part e: the factored teacher's d")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    defaults = QUICK if args.quick else FULL
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    return args


def setup_threads(n: int) -> None:
    """Same thread count everywhere; set before torch is imported (subprocesses inherit the environment)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)


def _h(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------- work dir


class Work:
    """Stage outputs and their timings; with --work they are reused when the stage's parameters match."""

    def __init__(self, root: Path, reuse: bool):
        self.root, self.reuse = root, reuse
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_path = root / "bench_state.json"
        self.state = json.loads(self.state_path.read_text()) if reuse and self.state_path.exists() else {}

    def stage(self, key: str, params: Any, out: Path, fn: Callable[[], Any]) -> tuple[Any, float, bool]:
        """(result, seconds, reused)."""
        h = _h(params)
        rec = self.state.get(key)
        if self.reuse and rec and rec["hash"] == h and out.exists():
            log(f"{key}: reusing {out} (took {rec['seconds']:.1f} s when made)")
            return rec["result"], rec["seconds"], True
        if out.exists():
            shutil.rmtree(out)
        log(f"{key} ...")
        t0 = time.perf_counter()
        res = fn()
        dt = time.perf_counter() - t0
        self.state[key] = {"hash": h, "seconds": dt, "result": res}
        self.state_path.write_text(json.dumps(self.state, indent=1, default=str))
        log(f"{key}: {dt:.1f} s")
        return res, dt, False


def write_text_subset(data: Path, out: Path, target_bytes: float) -> dict[str, Any]:
    """A prefix of every text file, proportional to its size, cut at a line end: all sources keep their share."""
    files = sorted(p for p in data.rglob("*") if p.is_file() and not p.name.startswith("."))
    bad = [p.name for p in files if p.suffix not in (".txt", "")]
    if bad:
        sys.exit(f"--data must hold plain text files to take a subset of; found {', '.join(bad[:3])}")
    total = sum(p.stat().st_size for p in files)
    frac = min(1.0, target_bytes / total)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for p in files:
        raw = p.read_bytes()
        n = int(len(raw) * frac)
        if n < len(raw):
            n = raw.rfind(b"\n", 0, n) + 1
        (out / p.name).write_bytes(raw[:n])
        written += n
    return {"bytes": written, "fraction": frac, "files": len(files)}


def train_cfg(name: str, out: Path, store: str, model: dict, *, lr: float, max_steps: int, warmup: int,
              batch: int, eval_windows: int, distill: dict | None = None, max_time_s: float | None = None):
    from cachekd.train_config import load_train_config

    return load_train_config({
        "name": name, "output": str(out), "seed": 0, "device": "cpu", "precision": "fp32", "model": dict(model),
        "data": {"store": store, "batch_size": batch, "eval_windows": eval_windows},
        "optim": {"lr": lr, "weight_decay": 0.1, "warmup_steps": warmup, "max_steps": max_steps,
                  "max_time_s": max_time_s},
        "distill": distill, "log_every": 10, "save_every": 0,
    })


# ---------------------------------------------------------------------------------------- interleaving


class Runner:
    """A Trainer with its batch iterator: times n optimizer steps (batch fetch + train_step, as Trainer.train)."""

    def __init__(self, trainer):
        self.tr = trainer
        self.it = trainer.batches()

    def steps(self, n: int, min_s: float = 0.0) -> tuple[float, int, int]:
        """At least n steps and at least min_s seconds: (seconds, tokens, steps)."""
        tok = done = 0
        t0 = time.perf_counter()
        while done < n or time.perf_counter() - t0 < min_s:
            m = self.tr.train_step(next(self.it))
            self.tr.step += 1
            tok += m["tokens"]
            done += 1
        return time.perf_counter() - t0, tok, done

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until the background loader has refilled its queue, so its catch-up work does not land in another
        variant's timed block."""
        q = getattr(self.it, "q", None)
        t0 = time.perf_counter()
        while q is not None and not q.full() and time.perf_counter() - t0 < timeout:
            time.sleep(0.01)

    def close(self) -> None:
        if hasattr(self.it, "close"):
            self.it.close()


def interleave(variants: dict[str, Callable[..., tuple[float, int, int]]], settle: Callable[[], None], rounds: int,
               block: int, block_s: float, warmup: int = 2) -> dict[str, list[tuple[float, int, int]]]:
    """Blocks of ≥ `block` steps and ≥ `block_s` seconds per variant, A B C then C B A (cancels linear drift);
    returns (seconds, tokens, steps) per block."""
    for name, fn in variants.items():
        fn(warmup)
    res: dict[str, list[tuple[float, int, int]]] = {n: [] for n in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            settle()
            res[name].append(variants[name](block, block_s))
    return res


def per_step(blocks: list[tuple[float, int, int]]) -> list[float]:
    return [s / n for s, _, n in blocks]


def tps(blocks: list[tuple[float, int, int]]) -> list[float]:
    return [t / s for s, t, _ in blocks]


def med(x: list[float]) -> float:
    return statistics.median(x)


# ------------------------------------------------------------------------------------------------ parts


def part_a(args, store: str, cache: str, tmp: Path) -> tuple[str, dict[str, Any]]:
    from cachekd.trainer import Trainer

    log("part a: CE vs distil-from-cache throughput")
    mk = lambda name, distill: Runner(Trainer(train_cfg(  # noqa: E731
        name, tmp / name, store, STUDENT, lr=STUDENT_LR, max_steps=100000, warmup=args.warmup, batch=args.batch_size,
        eval_windows=args.eval_windows, distill=distill), force=True, progress=False))
    runners = {"ce": mk("a-ce", None), "cached fkl τ=2": mk("a-fkl", {"cache": cache, **FKL}),
               "cached rkl τ=1": mk("a-rkl", {"cache": cache, **RKL})}
    try:
        res = interleave({n: r.steps for n, r in runners.items()}, lambda: [r.settle() for r in runners.values()],
                         args.rounds, args.block, args.block_s)
        loss_md, loss_t = loss_only(args, runners["cached fkl τ=2"], runners["cached rkl τ=1"])
    finally:
        for r in runners.values():
            r.close()
    ce = tps(res["ce"])
    rows = ["| variant | timed steps | median s/step | median tokens/s | ÷ CE (median of per-round ratios) | "
            "min–max per round | goal ≥ 0.9 |",
            "|---|---|---|---|---|---|---|"]
    out: dict[str, Any] = {"sps": {}, "ratios": {}, "loss_only": loss_t,
                           "step_s": {n: med(per_step(b)) for n, b in res.items()},
                           "steps": {n: sum(x[2] for x in b) for n, b in res.items()}}
    for name, blocks in res.items():
        t = tps(blocks)
        ratios = [a / b for a, b in zip(t, ce)]
        r = med(ratios)
        out["sps"][name] = 1 / med(per_step(blocks))
        out["ratios"][name] = r
        goal = "" if name == "ce" else ("met" if r >= 0.9 else "**not met**")
        rows.append(f"| {name} | {sum(x[2] for x in blocks)} | {med(per_step(blocks)):.3f} | {med(t):,.0f} | {r:.3f} | "
                    f"{min(ratios):.3f}–{max(ratios):.3f} | {goal} |")
    return "\n".join(rows) + "\n\n" + loss_md, out


def loss_only(args, fkl: Runner, rkl: Runner) -> tuple[str, dict[str, float]]:
    """Where the extra time goes: the loss alone (forward + backward) on one batch's real cached targets and
    random student logits of the real shape, interleaved; against PyTorch's own cross-entropy."""
    import torch
    import torch.nn.functional as F

    from cachekd.losses import KDConfig, distill_loss

    b_f, b_r = next(fkl.it), next(rkl.it)
    labels = b_f["labels"]
    V = fkl.tr.store.vocab_size
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(*labels.shape, V, generator=g) * 2).requires_grad_()
    t_f = fkl.tr.targets(b_f, b_f["input_ids"], 2.0)
    t_r = rkl.tr.targets(b_r, b_r["input_ids"], 1.0)
    lab_r = b_r["labels"]

    def kd(targets, lab, cfg):
        def f():
            p = distill_loss(z, lab, targets, cfg)
            (p.ce_sum + p.kd_sum if targets else p.ce_sum).backward()
            z.grad = None
        return f

    def torch_ce():
        F.cross_entropy(z.view(-1, V), labels.view(-1), ignore_index=-100, reduction="sum").backward()
        z.grad = None

    fns = {"torch F.cross_entropy (reference)": torch_ce,
           "cachekd CE only (what `train` runs)": kd([], labels, KDConfig()),
           "cachekd CE + forward KL τ=2, top-k bucket": kd(t_f, labels, fkl.tr.cfg.kd_config(2.0)),
           "cachekd CE + reverse KL τ=1, top-k bucket": kd(t_r, lab_r, rkl.tr.cfg.kd_config(1.0))}
    times: dict[str, list[float]] = {n: [] for n in fns}
    for f in fns.values():
        f()
    for r in range(max(3, args.rounds)):
        for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    base = med(times["cachekd CE only (what `train` runs)"])
    rows = [f"Loss alone, forward + backward on ({labels.shape[0]}×{labels.shape[1]}, V={V}) student logits "
            f"(median of {len(times['cachekd CE only (what `train` runs)'])} interleaved runs):", "",
            "| loss | median s | ÷ cachekd CE only |", "|---|---|---|"]
    rows += [f"| {n} | {med(t):.3f} | {med(t) / base:.2f} |" for n, t in times.items()]
    return "\n".join(rows), {n: med(t) for n, t in times.items()}


def count_matmul_params(model) -> int:
    """Parameters that multiply activations (all but the input embedding)."""
    emb = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return total if tied else total - emb


def part_b(args, store: str, cache: str, teacher_dir: str, tmp: Path) -> tuple[str, dict[str, Any]]:
    from cachekd.models import count_parameters
    from cachekd.trainer import Trainer

    log("part b: cached vs online distillation throughput")
    mk = lambda name, distill: Runner(Trainer(train_cfg(  # noqa: E731
        name, tmp / name, store, STUDENT, lr=STUDENT_LR, max_steps=100000, warmup=args.warmup, batch=args.batch_size,
        eval_windows=args.eval_windows, distill=distill), force=True, progress=False))
    cached = mk("b-cached", {"cache": cache, **FKL})
    online = mk("b-online", {"online": True, "teachers": [teacher_dir], **FKL})
    teacher = online.tr.teacher_source.models[0]
    fixed = next(online.it)  # one batch for the teacher-forward-only timing

    def teacher_fwd(n: int, min_s: float = 0.0) -> tuple[float, int, int]:
        x = fixed["input_ids"]
        done = 0
        t0 = time.perf_counter()
        while done < n or time.perf_counter() - t0 < min_s:
            online.tr.targets(fixed, x, 2.0)
            done += 1
        return time.perf_counter() - t0, done * int((fixed["labels"] != -100).sum()), done

    try:
        res = interleave({"cached": cached.steps, "online": online.steps, "teacher forward": teacher_fwd},
                         lambda: (cached.settle(), online.settle()), args.rounds, args.block, args.block_s)
    finally:
        cached.close()
        online.close()
    s_c, s_o, s_t = (per_step(res[k]) for k in ("cached", "online", "teacher forward"))
    speed = [o / c for o, c in zip(s_o, s_c)]         # cached/online throughput = online time / cached time
    ideal = [1 + t / c for t, c in zip(s_t, s_c)]
    frac = [s / i for s, i in zip(speed, ideal)]
    student = cached.tr.model
    nS, nT = count_parameters(student), count_parameters(teacher)
    mS, mT = count_matmul_params(student), count_matmul_params(teacher)
    flop_ratio = 2 * mT / (6 * mS)
    L = args.seq_len

    def attn(m):
        c = m.config
        return 2 * c.num_hidden_layers * L * c.hidden_size  # Kaplan et al.: forward attention FLOPs per token

    flop_ratio_attn = (2 * mT + attn(teacher)) / (3 * (2 * mS + attn(student)))
    rows = ["| model | params | params except input embedding (N) | forward FLOPs/token ≈ 2N | ",
            "|---|---|---|---|",
            f"| student {STUDENT['hidden_size']}×{STUDENT['num_layers']} | {nS / 1e6:.3f}M | {mS / 1e6:.3f}M | {2 * mS / 1e6:.2f}M |",
            f"| teacher {TEACHER['hidden_size']}×{TEACHER['num_layers']} | {nT / 1e6:.3f}M | {mT / 1e6:.3f}M | {2 * mT / 1e6:.2f}M |",
            "",
            f"Teacher ÷ student: {nT / nS:.2f}× parameters, {mT / mS:.2f}× non-embedding parameters (forward FLOPs a token). "
            f"Teacher forward ÷ student training step ≈ 2·N_T / 6·N_S = {flop_ratio:.2f} "
            f"({flop_ratio_attn:.2f} with attention FLOPs at L={L}).",
            "",
            "| per step (batch %d×%d) | median s | median tokens/s |" % (args.batch_size, L),
            "|---|---|---|",
            f"| cached distillation step (student fwd+bwd, sparse loss, optimizer, loader) | {med(s_c):.3f} | {med(tps(res['cached'])):,.0f} |",
            f"| online distillation step (teacher fwd + student step, dense loss) | {med(s_o):.3f} | {med(tps(res['online'])):,.0f} |",
            f"| teacher forward only (inference mode, as the online trainer runs it) | {med(s_t):.3f} | {med(tps(res['teacher forward'])):,.0f} |",
            "",
            f"- measured teacher-forward ÷ student-step time: **{med(s_t) / med(s_c):.3f}** (FLOP estimate {flop_ratio:.2f})",
            f"- ideal cached/online = 1 + that = **{med(ideal):.3f}** (median of per-round values)",
            f"- measured cached/online throughput = **{med(speed):.3f}** (per round {', '.join(f'{v:.2f}' for v in speed)})",
            f"- measured ÷ ideal = **{med(frac):.3f}** (goal ≥ 0.9: {'met' if med(frac) >= 0.9 else '**not met**'})"]
    out = {"sps_cached": 1 / med(s_c), "sps_online": 1 / med(s_o), "ideal": med(ideal), "speedup": med(speed),
           "frac": med(frac), "param_ratio": nT / nS, "matmul_ratio": mT / mS, "flop_ratio": flop_ratio,
           "teacher_fwd_over_student": med(s_t) / med(s_c), "n_student": nS, "n_teacher": nT}
    return "\n".join(rows), out


def rss_child(spec_path: str) -> None:
    """Runs inside a fresh subprocess: one distill job, then prints its own peak RSS."""
    spec = json.loads(Path(spec_path).read_text())
    setup_threads(spec["threads"])
    from cachekd.train_config import load_train_config
    from cachekd.trainer import run

    rss0 = proc_status_kb("VmRSS")
    t0 = time.perf_counter()
    s = run(load_train_config(spec["cfg"]), force=True, progress=False)
    # VmHWM is this process's own peak. ru_maxrss is not: Linux carries the parent's peak RSS across fork + exec
    # into the child's ru_maxrss (measured: a 225 MB child reported the 1.5 GB of the benchmark process).
    print("RSS_JSON " + json.dumps({
        "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "vmhwm_kb": proc_status_kb("VmHWM"),
        "rss_after_import_kb": rss0, "steps": s["steps"], "seconds": time.perf_counter() - t0}), flush=True)


def part_c(args, caches: dict[str, dict[str, Any]], tmp: Path) -> tuple[str, dict[str, Any]]:
    from cachekd.cache.reader import LogitCache

    log("part c: peak RSS, 1x vs 10x cache (fresh subprocess each)")
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in caches}
    for r in range(args.c_repeats):
        for name in (list(caches) if r % 2 == 0 else list(caches)[::-1]):
            c = caches[name]
            cfg = train_cfg(f"c-{name}", tmp / f"c-{name}", c["store"], STUDENT, lr=STUDENT_LR, max_steps=args.c_steps,
                            warmup=args.warmup, batch=args.batch_size, eval_windows=16,
                            distill={"cache": c["cache"], **FKL})
            from cachekd.config import to_dict

            spec = tmp / f"c-{name}.json"
            spec.write_text(json.dumps({"threads": args.threads, "cfg": to_dict(cfg)}))
            p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--rss-child", str(spec)],
                               capture_output=True, text=True)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RSS_JSON ")]
            if p.returncode or not line:
                sys.exit(f"part c child failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
            rec = json.loads(line[-1][len("RSS_JSON "):])
            runs[name].append(rec)
            log(f"  {name}: peak RSS {rec['vmhwm_kb'] / 1024:.1f} MiB (VmHWM), {rec['steps']} steps, {rec['seconds']:.1f} s")
    rows = ["| cache | train windows (positions) | cache bytes on disk | steps | RSS after imports MiB | "
            "peak RSS MiB (VmHWM) | ratio to 1× | ru_maxrss MiB (inherits the parent's peak) |",
            "|---|---|---|---|---|---|---|---|"]
    base = med([x["vmhwm_kb"] for x in runs["1x"]])
    out: dict[str, Any] = {}
    for name, recs in runs.items():
        c = LogitCache.open(caches[name]["cache"])
        peak = med([x["vmhwm_kb"] for x in recs])
        out[name] = {"peak_mib": peak / 1024, "windows": c.num_windows("train"), "bytes": c.meta["bytes_on_disk"]}
        rows.append(f"| {name} | {c.num_windows('train'):,} ({c.num_windows('train') * c.seq_len:,}) | "
                    f"{c.meta['bytes_on_disk'] / 1e6:.1f} MB | {recs[0]['steps']} | "
                    f"{med([x['rss_after_import_kb'] for x in recs]) / 1024:.0f} | {peak / 1024:.1f} | {peak / base:.3f} | "
                    f"{med([x['ru_maxrss_kb'] for x in recs]) / 1024:.0f} |")
    ratio = out["10x"]["peak_mib"] / out["1x"]["peak_mib"]
    out["ratio"] = ratio
    rows += ["", f"**peak RSS 10× ÷ 1× = {ratio:.3f}** (goal within 10 %: {'met' if abs(ratio - 1) <= 0.10 else '**not met**'})"]
    return "\n".join(rows), out


def part_d(args, store: str, cache: str, teacher_dir: str, precompute_s: float, teacher_info: dict[str, Any],
           tmp: Path) -> tuple[str, dict[str, Any]]:
    from cachekd.trainer import Trainer, run

    log(f"part d: equal wall time ({args.budget:.0f} s each)")
    modes = [("ce", "(i) CE only", None),
             ("cached", "(ii) distil from cache (fkl τ=2, λ=0.5, top-k bucket)", {"cache": cache, **FKL}),
             ("online", "(iii) online distillation (fkl τ=2, λ=0.5, dense)",
              {"online": True, "teachers": [teacher_dir], **FKL})]
    results = {}
    for k, label, distill in modes:
        mk = lambda name, steps, max_time=None: train_cfg(  # noqa: E731
            name, tmp / name, store, STUDENT, lr=STUDENT_LR, max_steps=steps, warmup=args.warmup,
            batch=args.batch_size, eval_windows=args.eval_windows, distill=distill, max_time_s=max_time)
        # Steps/s of this mode measured right before its run (the machine's load drifts within minutes).
        probe = Runner(Trainer(mk(f"d-probe-{k}", 100000), force=True, progress=False))
        probe.steps(2)
        sec, _, _ = probe.steps(args.d_probe)
        probe.close()
        del probe
        sps = args.d_probe / sec
        planned = max(args.warmup + 1, math.ceil(args.steps_margin * args.budget * sps))
        s = run(mk(f"d-{k}", planned, args.budget), force=True, progress=False)
        retried = ""
        if s["stopped_by"] == "steps" and s["wall_s"] < 0.9 * args.budget:
            # The machine sped up after the probe: run again with the rate this run actually had.
            sps2 = s["steps"] / s["wall_s"]
            log(f"  {k}: ended by steps after {s['wall_s']:.1f} s of {args.budget:.0f}; again at {sps2:.2f} steps/s")
            retried = f"{s['steps']} steps in {s['wall_s']:.1f} s at first"
            planned = max(args.warmup + 1, math.ceil(args.steps_margin * args.budget * sps2))
            s = run(mk(f"d-{k}", planned, args.budget), force=True, progress=False)
        s.update(planned=planned, probe_sps=sps, label=label, retried=retried)
        results[k] = s
        log(f"  {k}: probe {sps:.2f} steps/s, {s['steps']}/{planned} steps, {s['wall_s']:.1f} s, "
            f"dev loss {_dev(s):.4f}")
    ce_loss = _dev(results['ce'])
    from cachekd.tokens import TokenStore

    n_train = TokenStore.open(store).num_windows("train")
    rows = ["| student | probed steps/s | max_steps | steps done | epochs | stopped by | train wall s | tokens | tokens/s | "
            "dev loss (nats/token, trainer's dev sample) | dev ppl | Δ vs CE | one-off precompute s | "
            "cost per student s, amortised over 1 / 4 / 16 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    short = []
    for k, s in results.items():
        pc = precompute_s if k == "cached" else 0.0
        amort = " / ".join(f"{s['wall_s'] + pc / n:.0f}" for n in (1, 4, 16))
        stop = s["stopped_by"]
        if stop == "steps" and s["wall_s"] < 0.9 * args.budget:
            stop = f"steps, **early** ({s['wall_s'] / args.budget:.0%} of budget)"
            short.append(k)
        if s["retried"]:
            stop += f" (second run; {s['retried']})"
        rows.append(f"| {s['label']} | {s['probe_sps']:.2f} | {s['planned']} | {s['steps']} | "
                    f"{s['steps'] * args.batch_size / n_train:.1f} | {stop} | {s['wall_s']:.1f} | "
                    f"{s['tokens']:,} | {s['tokens_per_s']:,.0f} | {_dev(s):.4f} | {_ppl(s):.1f} | "
                    f"{_dev(s) - ce_loss:+.4f} | {pc:.0f} | {amort} |")
    t = teacher_info
    rows.append(f"| teacher {TEACHER['hidden_size']}×{TEACHER['num_layers']} (trained once on the same split; needed by "
                f"ii and iii) | | {t['planned']} | {t['steps']} | {t['steps'] * args.batch_size / n_train:.1f} | "
                f"{t['stopped_by']} | {t['wall_s']:.1f} | {t['tokens']:,} | "
                f"{t['tokens_per_s']:,.0f} | {_dev(t):.4f} | {_ppl(t):.1f} | "
                f"{_dev(t) - ce_loss:+.4f} | | |")
    cached_loss, online_loss = _dev(results['cached']), _dev(results['online'])
    verdict = "beats" if cached_loss < ce_loss else "does not beat"
    rows += ["", f"**At equal training wall time, distil-from-cache {verdict} CE** "
                 f"(dev loss {cached_loss:.4f} vs {ce_loss:.4f}; online {online_loss:.4f})."]
    rows.append(f"Epochs over the {n_train} train windows: a small split seen many times favours whatever "
                f"regularises (a teacher target does); CE's dev loss may already be rising by the end.")
    if short:
        rows.append(f"Runs that ended by steps well before the budget (the machine sped up after the probe): "
                    f"{', '.join(short)}; their comparison is not at equal wall time.")
    return "\n".join(rows), {"results": results, "cached_beats_ce": cached_loss < ce_loss, "short": short}


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    setup_threads(args.threads)
    from _common import DEFAULT_DATA, write_result

    data = Path(args.data) if args.data else DEFAULT_DATA
    if not data.is_dir() or not any(data.iterdir()):
        sys.exit(f"no data at {data}; pass --data DIR with text files (babylm_like is expected at ../shared/data)")
    parts = set(args.parts)
    if not parts <= set("abcde"):
        sys.exit("--parts takes letters of abcde")
    import torch

    from cachekd.models import build_model, quiet_transformers
    from cachekd.precompute import PrecomputeConfig, precompute
    from cachekd.tokens import PrepareConfig, TokenStore, prepare
    from cachekd.trainer import Trainer, run

    quiet_transformers()
    t_start = time.perf_counter()
    tmp_root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_train_"))
    work = Work(tmp_root, reuse=bool(args.work))
    runs_dir = tmp_root / "runs"
    mode = "quick" if args.quick else "full"
    try:
        # ---- stores
        text_bytes = args.text_mb * 1e6
        sub = tmp_root / f"text-{_h([str(data), text_bytes])}"
        subset, _, _ = work.stage("text subset", [str(data), text_bytes], sub,
                                  lambda: write_text_subset(data, sub, text_bytes))
        store_dir = tmp_root / f"store-{_h([subset, args.vocab_size, args.seq_len, DEV_FRACTION])}"
        _, prep_s, _ = work.stage("prepare store (tokenizer trained on it)",
                                  [subset, args.vocab_size, args.seq_len, DEV_FRACTION],
                                  store_dir, lambda: prepare(PrepareConfig(
                                      inputs=[str(sub)], output=str(store_dir), seq_len=args.seq_len,
                                      vocab_size=args.vocab_size, dev_fraction=DEV_FRACTION), progress=False)[0].summary()["splits"])
        store = TokenStore.open(store_dir)
        n_train, n_dev = store.num_windows("train"), store.num_windows("dev")
        log(f"store: {n_train} train windows, {n_dev} dev windows, vocab {store.vocab_size}")

        need_teacher = bool(parts & set("abd"))
        teacher_dir = tmp_root / f"teacher-{_h([store.fingerprint, TEACHER, args.teacher_budget, args.batch_size])}"
        cache_dir = tmp_root / f"cache-{teacher_dir.name}-k{args.top_k}"
        teacher_info: dict[str, Any] = {}
        precompute_s = 0.0
        cache_info: dict[str, Any] = {}
        if need_teacher:
            def train_teacher() -> dict[str, Any]:
                # Probe the step time so the cosine schedule ends at the budget (max_time_s is the guard).
                probe = Runner(Trainer(train_cfg("probe", runs_dir / "probe", str(store_dir), TEACHER, lr=TEACHER_LR,
                                                 max_steps=1000, warmup=args.warmup, batch=args.batch_size,
                                                 eval_windows=args.eval_windows), force=True, progress=False))
                probe.steps(1)
                sec, _, _ = probe.steps(3)
                probe.close()
                planned = max(args.warmup + 1, math.ceil(args.steps_margin * args.teacher_budget * 3 / sec))
                s = run(train_cfg("teacher", teacher_dir, str(store_dir), TEACHER, lr=TEACHER_LR, max_steps=planned,
                                  warmup=args.warmup, batch=args.batch_size, eval_windows=args.eval_windows,
                                  max_time_s=args.teacher_budget), force=True, progress=False)
                s["planned"] = planned
                return s

            teacher_info, _, _ = work.stage("train teacher", [store.fingerprint, TEACHER, args.teacher_budget,
                                                              args.batch_size, args.warmup], teacher_dir, train_teacher)
            log(f"teacher: {teacher_info['steps']} steps in {teacher_info['wall_s']:.1f} s, "
                f"dev loss {_dev(teacher_info):.4f}")
            cache_info, precompute_s, _ = work.stage(
                "precompute teacher cache (train split)", [teacher_info, args.top_k], cache_dir,
                lambda: {k: v for k, v in precompute(PrecomputeConfig(
                    store=str(store_dir), teachers=[str(teacher_dir)], output=str(cache_dir), top_k=args.top_k,
                    temperatures=[1.0, 2.0], splits=["train"], device="cpu"), progress=False).items()
                    if k != "manifest"})
            log(f"precompute: {cache_info['positions_computed']:,} positions in {precompute_s:.1f} s "
                f"({cache_info['positions_per_s']:,.0f} positions/s inside precompute)")

        c_caches: dict[str, dict[str, Any]] = {}
        c_setup: dict[str, Any] = {}
        if "c" in parts:
            # One tokenizer for both stores: trained with the 1x store, passed to the 10x one.
            c_tok: TokenStore | None = None
            for name, mult in (("1x", 1), ("10x", 10)):
                tb = args.c_mb * 1e6 * mult
                tdir = tmp_root / f"c-text-{_h([str(data), tb])}"
                info, _, _ = work.stage(f"part c text {name}", [str(data), tb], tdir,
                                        lambda tdir=tdir, tb=tb: write_text_subset(data, tdir, tb))
                tok_fp = c_tok.tokenizer_fingerprint if c_tok else None
                sdir = tmp_root / f"c-store-{name}-{_h([info, args.c_vocab_size, tok_fp, args.seq_len])}"
                work.stage(f"part c store {name}", [info, args.c_vocab_size, tok_fp, args.seq_len], sdir,
                           lambda sdir=sdir, tdir=tdir, c_tok=c_tok: prepare(PrepareConfig(
                               inputs=[str(tdir)], output=str(sdir), seq_len=args.seq_len, vocab_size=args.c_vocab_size,
                               tokenizer=str(c_tok.tokenizer_dir) if c_tok else None, dev_fraction=0.0),
                               progress=False)[0].summary()["splits"])
                if c_tok is None:
                    c_tok = TokenStore.open(sdir)
                    rt_dir = tmp_root / f"rand-teacher-{c_tok.tokenizer_fingerprint[:10]}"

                    def save_rand_teacher() -> dict[str, Any]:
                        from cachekd.models import ModelConfig

                        torch.manual_seed(0)
                        m = build_model(ModelConfig(**RAND_TEACHER), c_tok.vocab_size, c_tok.seq_len)
                        m.save_pretrained(str(rt_dir))
                        return {"params": sum(p.numel() for p in m.parameters())}

                    work.stage("random-init teacher for part c", [c_tok.tokenizer_fingerprint, RAND_TEACHER], rt_dir,
                               save_rand_teacher)
                    c_setup["vocab"] = c_tok.vocab_size
                cdir = tmp_root / f"c-cache-{sdir.name}-k{args.top_k}"
                res, sec, _ = work.stage(f"part c cache {name}", [sdir.name, RAND_TEACHER, args.top_k], cdir,
                                         lambda sdir=sdir, cdir=cdir: {k: v for k, v in precompute(PrecomputeConfig(
                                             store=str(sdir), teachers=[str(rt_dir)], output=str(cdir),
                                             top_k=args.top_k, temperatures=[1.0, 2.0], splits=["train"], device="cpu"),
                                             progress=False).items() if k != "manifest"})
                c_caches[name] = {"store": str(sdir), "cache": str(cdir)}
                c_setup[f"{name}_text_bytes"] = info["bytes"]
                c_setup[f"{name}_precompute_s"] = round(sec, 1)

        # ---- parts
        sections: list[str] = []
        found: dict[str, Any] = {}
        loads = {"at start": os.getloadavg()[0]}
        if "a" in parts:
            md, found["a"] = part_a(args, str(store_dir), str(cache_dir), runs_dir)
            loads["after a"] = os.getloadavg()[0]
            sec = "### (a) distil-from-cache ÷ plain LM training throughput\n\n" + md
            print("\n" + sec + "\n", flush=True)
            sections.append(sec)
        if "b" in parts:
            md, found["b"] = part_b(args, str(store_dir), str(cache_dir), str(teacher_dir), runs_dir)
            loads["after b"] = os.getloadavg()[0]
            sec = "### (b) cached ÷ online distillation throughput\n\n" + md
            print("\n" + sec + "\n", flush=True)
            sections.append(sec)
        if "c" in parts:
            md, found["c"] = part_c(args, c_caches, runs_dir)
            loads["after c"] = os.getloadavg()[0]
            sec = "### (c) peak RSS with a 10× larger cache\n\n" + md
            print("\n" + sec + "\n", flush=True)
            sections.append(sec)
        if "d" in parts:
            md, found["d"] = part_d(args, str(store_dir), str(cache_dir), str(teacher_dir), precompute_s,
                                    teacher_info, runs_dir)
            md = (f"Schedule: right before each run, {args.d_probe} steps of that mode are timed (after 2 warmup "
                  f"steps); max_steps = {args.steps_margin} × budget × steps/s and optim.max_time_s = budget (a run "
                  f"that still ends by steps before 90 % of the budget is run once more with its observed rate), so the "
                  f"wall time ends each run while its cosine (warmup {args.warmup}, to 0.1·lr) is at about "
                  f"1/{args.steps_margin:g} of its length, i.e. nearly decayed; the same for every mode. Training wall "
                  f"time counts batch loading and steps (Trainer.wall_s), not start-up or the final evaluation.\n\n"
                  + md)
            loads["after d"] = os.getloadavg()[0]
            sec = f"### (d) equal wall time: {args.budget:.0f} s of training per student\n\n" + md
            print("\n" + sec + "\n", flush=True)
            sections.append(sec)

        if "e" in parts:
            md, found["e"] = part_e(args, str(store_dir), tmp_root, runs_dir)
            loads["after e"] = os.getloadavg()[0]
            sec = "### (e) distil-from-factored ÷ plain LM throughput, Baby-Llama-58M-shaped student\n\n" + md
            print("\n" + sec + "\n", flush=True)
            sections.append(sec)

        total_s = time.perf_counter() - t_start
        notes = build_notes(args, found, teacher_info, precompute_s, total_s, mode, loads)
        print(notes)
        config = {
            "mode": mode, "parts": "".join(sorted(parts)), "threads (torch, OMP_NUM_THREADS)": args.threads,
            "data": str(data), "text subset": f"{subset['bytes']:,} bytes ({subset['fraction']:.1%} prefix of each of {subset['files']} files)",
            "store": f"seq_len {args.seq_len}, vocab {store.vocab_size} (BPE trained on the subset's train split), "
                     f"{n_train} train / {n_dev} dev windows (dev: the last {DEV_FRACTION:.0%} of each source's documents); "
                     f"prepare {prep_s:.1f} s",
            "student": f"{STUDENT} fp32, lr {STUDENT_LR}, warmup {args.warmup}, weight decay 0.1, cosine to 0.1·lr",
            "teacher": f"{TEACHER} fp32, lr {TEACHER_LR}, budget {args.teacher_budget:.0f} s" + (
                f": {teacher_info['steps']} steps, {teacher_info['wall_s']:.1f} s, dev loss {_dev(teacher_info):.4f}"
                if teacher_info else ""),
            "batch": f"{args.batch_size} windows × {args.seq_len} = {args.batch_size * args.seq_len} positions a step",
            "cache": f"top-k {args.top_k}, temperatures 1, 2, train split only; precompute {precompute_s:.1f} s" + (
                f" for {cache_info['positions_computed']:,} positions" if cache_info else ""),
            "distill objectives": f"fkl {FKL}; rkl {RKL}",
            "parts a/b": f"{args.rounds} rounds; per variant and round a block of ≥ {args.block} steps and ≥ {args.block_s} s "
                         f"(after 2 warmup steps), A B C / C B A order",
            "part c": f"1× text {args.c_mb} MB, 10× text {10 * args.c_mb} MB, one BPE tokenizer for both (asked "
                      f"{args.c_vocab_size} tokens, trained on the 1× text); random-init teacher "
                      f"{RAND_TEACHER}; {args.c_steps} steps, {args.c_repeats} subprocess run(s) each; {c_setup}",
            "part d": f"budget {args.budget:.0f} s per student, eval on the first {min(args.eval_windows, n_dev)} dev windows",
            "total bench time": f"{total_s:.0f} s",
            "1-minute load average": ", ".join(f"{k} {v:.1f}" for k, v in loads.items()),
        }
        path = write_result("train", f"training throughput and equal-wall-time distillation ({mode})", config,
                            "\n\n".join(sections), notes)
        log(f"wrote {path}")
    finally:
        if not args.work:
            shutil.rmtree(tmp_root, ignore_errors=True)


BABYLLAMA_58M = {"arch": "llama", "hidden_size": 512, "num_layers": 16, "num_heads": 8, "intermediate_size": 1024}
BABYLLAMA_LR = 2.5e-4


def part_e(args, store: str, root: Path, tmp: Path) -> tuple[str, dict[str, Any]]:
    """CE vs distil-from-factored steps of a Baby-Llama-58M-shaped student, interleaved; the factored cache of a
    random-init one-layer teacher of width d (the training step sees only d and V)."""
    from cachekd.models import ModelConfig, build_model
    from cachekd.precompute import PrecomputeConfig, precompute
    from cachekd.tokens import TokenStore
    from cachekd.trainer import Trainer

    d = args.e_teacher_d
    st = TokenStore.open(store)
    tdir = root / f"e-teacher-d{d}-{_h([st.fingerprint])}"
    if not tdir.exists():
        import torch

        torch.manual_seed(0)
        build_model(ModelConfig(hidden_size=d, num_layers=1, num_heads=8, intermediate_size=256), st.vocab_size,
                    args.seq_len).save_pretrained(tdir)
    cache = root / f"e-cache-{tdir.name}"
    t0 = time.perf_counter()
    if not (cache / "manifest.json").exists():
        precompute(PrecomputeConfig(store=store, teachers=[str(tdir)], output=str(cache), factored=True,
                                    splits=["train"], device="cpu"), force=True, progress=False)
    pre_s = time.perf_counter() - t0
    log(f"part e: factored cache of a d={d} teacher ({pre_s:.0f} s); CE vs distil-from-factored throughput")
    fkl = {"cache": str(cache), "objective": "forward_kl", "temperature": 2.0, "ce_weight": 0.5}
    rkl = {"cache": str(cache), "objective": "reverse_kl", "temperature": 1.0, "ce_weight": 0.5, "alpha": 0.5}
    mk = lambda name, distill: Runner(Trainer(train_cfg(  # noqa: E731
        name, tmp / name, store, BABYLLAMA_58M, lr=BABYLLAMA_LR, max_steps=100000, warmup=args.warmup,
        batch=args.batch_size, eval_windows=args.eval_windows, distill=distill), force=True, progress=False))
    runners = {"ce": mk("e-ce", None), "factored fkl τ=2 (Baby Llama)": mk("e-fkl", fkl),
               "factored rkl τ=1 + mixing α=0.5 (ChooBaCa)": mk("e-rkl", rkl)}
    try:
        res = interleave({n: r.steps for n, r in runners.items()}, lambda: [r.settle() for r in runners.values()],
                         args.rounds, args.block, args.block_s)
    finally:
        for r in runners.values():
            r.close()
    ce = tps(res["ce"])
    nparams = sum(p.numel() for p in runners["ce"].tr.students[0].model.parameters()) \
        if hasattr(runners["ce"].tr, "students") else None
    rows = ["| variant | timed steps | median s/step | median tokens/s | ÷ CE (median of per-round ratios) | "
            "min–max per round | goal ≥ 0.85 |", "|---|---|---|---|---|---|---|"]
    out: dict[str, Any] = {"ratios": {}, "precompute_s": pre_s, "d": d, "vocab": st.vocab_size, "params": nparams}
    for name, blocks in res.items():
        ratios = [a / b for a, b in zip(tps(blocks), ce)]
        r = med(ratios)
        out["ratios"][name] = r
        goal = "" if name == "ce" else ("met" if r >= 0.85 else "**not met**")
        rows.append(f"| {name} | {sum(x[2] for x in blocks)} | {med(per_step(blocks)):.3f} | {med(tps(blocks)):,.0f} | "
                    f"{r:.3f} | {min(ratios):.3f}–{max(ratios):.3f} | {goal} |")
    head = (f"Student {BABYLLAMA_58M} fp32"
            + (f" ({nparams / 1e6:.1f}M parameters at V={st.vocab_size})" if nparams else "")
            + f"; {args.batch_size} windows × {args.seq_len} positions a step; factored int8 cache of a random-init "
            f"LLaMA teacher with d={d} (one layer), V={st.vocab_size}, train split, precompute {pre_s:.0f} s.\n\n")
    return head + "\n".join(rows), out


def build_notes(args, found, teacher_info, precompute_s, total_s, mode, loads) -> str:
    lines = []
    if "e" in found:
        for k, r in found["e"]["ratios"].items():
            if k != "ce":
                lines.append(f"- (e) {k} ÷ CE throughput {r:.3f} (Baby-Llama-58M shape, d={found['e']['d']} "
                             f"factored teacher): goal ≥ 0.85 {'met' if r >= 0.85 else 'NOT met'}.")
    if "a" in found:
        a = found["a"]
        for k, r in a["ratios"].items():
            if k != "ce":
                lines.append(f"- (a) {k} ÷ CE throughput {r:.3f}: goal ≥ 0.9 {'met' if r >= 0.9 else 'NOT met'}.")
        lt = a["loss_only"]
        ce_k, ce_t = lt["cachekd CE only (what `train` runs)"], lt["torch F.cross_entropy (reference)"]
        fk = lt["cachekd CE + forward KL τ=2, top-k bucket"]
        lines.append(f"- (a) loss alone (forward+backward, same logits): cachekd's CE-only loss {ce_k:.3f} s, "
                     f"{ce_k / ce_t:.1f}× PyTorch's F.cross_entropy ({ce_t:.3f} s); CE + forward KL at τ=2 {fk:.3f} s "
                     f"({fk / ce_k:.2f}× CE only: a τ≠1 loss needs a second O(V) softmax); a whole CE step "
                     f"{a['step_s']['ce']:.3f} s.")
    if "b" in found:
        b = found["b"]
        lines.append(f"- (b) teacher has {b['param_ratio']:.1f}× the student's parameters ({b['matmul_ratio']:.1f}× "
                     f"without the input embedding; 2·N_T/6·N_S = {b['flop_ratio']:.2f}); measured teacher-forward ÷ "
                     f"student-step {b['teacher_fwd_over_student']:.2f}; cached/online {b['speedup']:.2f} vs ideal "
                     f"{b['ideal']:.2f} → {b['frac']:.2f} of ideal: goal ≥ 0.9 {'met' if b['frac'] >= 0.9 else 'NOT met'}. "
                     f"The online step also pays a dense loss, so cached/online can exceed the ideal.")
    if "c" in found:
        r = found["c"]["ratio"]
        lines.append(f"- (c) peak RSS (VmHWM) 10× ÷ 1× cache = {r:.3f}: goal within 10 % "
                     f"{'met' if abs(r - 1) <= 0.1 else 'NOT met'}. ru_maxrss is not usable here: Linux carries the "
                     f"parent's peak RSS into a child's ru_maxrss across fork + exec, so both children report the "
                     f"benchmark process's own peak.")
    if "d" in found:
        d = found["d"]
        lines.append(f"- (d) distil-from-cache {'beats' if d['cached_beats_ce'] else 'does NOT beat'} CE at equal "
                     f"training wall time ({args.budget:.0f} s); the one-off precompute cost ({precompute_s:.0f} s) is "
                     f"shown beside it, not included in the budget." + (
                         f" Runs {', '.join(d['short'])} ended early by steps: not an equal-wall-time comparison."
                         if d["short"] else ""))
    lines += [
        f"- Mode {mode}; total bench time {total_s:.0f} s; {args.threads} torch/OpenMP threads for every variant.",
        f"- Limits: a shared 2-core CPU VM (other jobs may run at the same time; 1-minute load average "
        f"{', '.join(f'{k} {v:.1f}' for k, v in loads.items())}; on this VM a step took 10× longer under load with 2 "
        f"threads), so a and b report only side-by-side medians and ratios; tiny fp32 models whose parameters are mostly the embedding and head at this vocabulary; a "
        "cache over a text subset only; a teacher trained for minutes. Part (d) runs are sequential (a run cannot be "
        "interleaved), so load during one run and not another shifts its steps and dev loss; one seed per mode and "
        "a small dev set.",
    ]
    if mode == "quick":
        lines.append("- Quick mode: tiny budgets (a few steps); the (d) dev losses are barely past initialisation and "
                     "say nothing about quality, and the a/b medians rest on two short blocks per variant.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
