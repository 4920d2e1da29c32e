"""One-command check of the GPU paths: the whole job on one CUDA device, with the figures that matter there.

Builds a token store from the shipped demo corpus (`cachekd.demo.data.write_demo_data`, the grammar corpus of
`cachekd demo`), trains a ~100M-parameter LLaMA teacher for a few hundred steps (bf16 autocast), precomputes its
top-k logits (CUDA top-k and tail sums), then trains the same small student three ways: cross-entropy only, distilled
from the cache, and distilled online from the live teacher. Everything runs through the `cachekd` command line
(in this process, so that CUDA memory can be read), the way a user runs it. Prints and writes
benchmarks/results/gpu_check_<hardware>_<date>.md:

* precompute positions/s, and ÷ a bare bf16 forward of the teacher over the same windows (the cost of top-k,
  tail sums and writing the cache);
* teacher training MFU: (6·N + 12·L·d·T) FLOPs a token (N: weights in matrix products) × tokens/s ÷ the GPU's
  dense bf16 peak (`--peak-tflops` for a GPU not in PEAK_BF16_TFLOPS);
* student step time cached vs online vs CE, from each run's metrics.jsonl after a warm-up (step times include
  waiting for data);
* the share of step time the training loop waits for data: the student runs use the DataLoader path
  (`data.num_workers`, pinned memory on CUDA), whose waits torch's profiler records as
  ``enumerate(DataLoader)...__next__``; a second, shorter, profiled run of each student measures it, and the share
  of its step window in which no CUDA kernel runs (GPU idle: data waits, host overhead, launches);
* peak GPU memory of each stage (`torch.cuda.max_memory_allocated`).

Installs nothing. Any failure is loud: a CUDA error, a failed command, a non-finite loss or a teacher that did not
learn exits non-zero with the reason. Without a CUDA device it refuses with one sentence, unless `--cpu-smoke`: tiny
sizes and a few steps through the same code path on the CPU (bf16 autocast there too), so the script itself is
tested without a GPU (tests/test_gpu_check.py).

    python benchmarks/gpu_check.py                    # ≤ 8 minutes on one H100/H200
    python benchmarks/gpu_check.py --work /tmp/gc     # keep the store, runs and cache there
    python benchmarks/gpu_check.py --cpu-smoke        # seconds, on CPU: checks the script, measures nothing useful
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU check and the CPU smoke run."""

    num_documents: int
    vocab_size: int
    seq_len: int
    teacher: dict[str, Any]
    teacher_steps: int
    teacher_lr: float
    batch_size: int
    top_k: int
    precompute_batch: int
    student: dict[str, Any]
    student_steps: int
    student_lr: float
    profiled_steps: int
    num_workers: int
    log_every: int
    eval_windows: int


GPU = Sizes(num_documents=15_000, vocab_size=4096, seq_len=256,
            teacher={"arch": "llama", "hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 2560},
            teacher_steps=300, teacher_lr=6e-4, batch_size=32, top_k=64, precompute_batch=64,
            student={"arch": "llama", "hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 688},
            student_steps=200, student_lr=2e-3, profiled_steps=60, num_workers=2, log_every=5, eval_windows=64)
CPU_SMOKE = Sizes(num_documents=100, vocab_size=300, seq_len=32,
                  teacher={"arch": "llama", "hidden_size": 48, "num_layers": 2, "num_heads": 2,
                           "intermediate_size": 96},
                  teacher_steps=6, teacher_lr=3e-3, batch_size=4, top_k=8, precompute_batch=8,
                  student={"arch": "llama", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                           "intermediate_size": 64},
                  student_steps=6, student_lr=3e-3, profiled_steps=4, num_workers=1, log_every=1, eval_windows=8)

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}
"""Dense bf16 tensor-core peak (TFLOP/s, SXM parts) by a name fragment of `torch.cuda.get_device_name()`."""
DATA_WAIT_EVENT = "enumerate(DataLoader)"
"""Prefix of the profiler range torch's DataLoader records around each `next()`: the loop waiting for a batch."""
STEP_EVENT = "Optimizer.step#"
"""Prefix of the profiler range torch's optimizers record around each `step()`: one per training step."""


class CheckFailed(RuntimeError):
    """A stage did not do what it must; the message says which and why."""


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ running cachekd


def cachekd(*args: Any) -> str:
    """Run one `cachekd` command in this process and return what it printed; a failure raises CheckFailed."""
    import click

    from cachekd_cli.main import cli

    words = [str(a) for a in args]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            cli.main(args=words, prog_name="cachekd", standalone_mode=False)
    except click.ClickException as e:
        raise CheckFailed(f"`cachekd {' '.join(words)}` failed: {e.format_message()}") from e
    except SystemExit as e:
        if e.code:
            raise CheckFailed(f"`cachekd {' '.join(words)}` exited with {e.code}.") from e
    synchronize()
    return out.getvalue()


def synchronize() -> None:
    """Wait for the GPU, so that an asynchronous CUDA error surfaces at the stage that caused it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def json_output(text: str) -> Any:
    """The JSON a `--json` command printed (after any note lines)."""
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise CheckFailed(f"expected JSON from cachekd, got: {text[:300]!r}")
    return json.loads(text[start:])


def read_train_lines(run: Path) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [m for m in lines if m.get("kind") == "train"]
    if not train:
        raise CheckFailed(f"{run} logged no training step.")
    for m in train:
        for key in ("loss", "ce", "kd"):
            v = m.get(key)
            if v is not None and not math.isfinite(float(v)):
                raise CheckFailed(f"{run.name}: {key} is {v} at step {m['step']} (bf16 overflow or a broken kernel).")
    return train


def steady_step_time(train: list[dict[str, Any]], warmup_steps: int) -> tuple[float, float, int]:
    """(seconds a step, tokens a second, steps timed) over the logged steps after `warmup_steps` (from the first
    log at or after it to the last); over all logged steps when too few come after the warm-up."""
    after = [m for m in train if m["step"] >= warmup_steps]
    a, b = (after[0], after[-1]) if len(after) >= 2 else (train[0], train[-1])
    if b["step"] == a["step"]:
        return b["wall_s"] / max(b["step"], 1), b["tokens"] / b["wall_s"], b["step"]
    dt = b["wall_s"] - a["wall_s"]
    return dt / (b["step"] - a["step"]), (b["tokens"] - a["tokens"]) / dt, b["step"] - a["step"]


class PeakMemory:
    """Peak CUDA memory allocated inside a `with` block (None on CPU)."""

    def __enter__(self) -> "PeakMemory":
        import torch

        self.value: int | None = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if exc[0] is None and torch.cuda.is_available():
            torch.cuda.synchronize()
            self.value = torch.cuda.max_memory_allocated()


# ------------------------------------------------------------------------------------------------ measurements


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs a token of an HF causal LM: 6 × the weights of its matrix products (every Linear / GPT-2
    Conv1D layer, the output layer included even when it shares the input embedding; the embedding lookup and the
    norms are no products) plus 12 · layers · hidden · seq_len for attention scores and values (PaLM's MFU
    convention, causal mask ignored)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    cfg = model.config
    return 6.0 * matmul_weights + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for fragment, tflops in PEAK_BF16_TFLOPS.items():
        if fragment.lower() in device_name.lower():
            return tflops
    return None


def bare_forward_positions_per_s(teacher_dir: Path, vocab_size: int, batch: int, seq_len: int, device: str,
                                 repeats: int) -> float:
    """Positions a second of the teacher's forward alone (inference mode, bf16 autocast), on random windows of
    the precompute batch size: what precompute would reach if top-k, tail sums and writing cost nothing."""
    import torch

    from cachekd.models import load_model

    model = load_model(teacher_dir).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=gen).to(device)
    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        for _ in range(2):  # warm-up: kernels chosen, memory pooled
            model(input_ids=ids).logits.float().sum().item()
        synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids).logits.float().sum().item()
        synchronize()
        elapsed = time.perf_counter() - t0
    del model
    return repeats * batch * seq_len / elapsed


def profiled_shares(run_cli: Callable[[], Any], warmup_steps: int) -> dict[str, Any]:
    """Run a training command under torch's profiler; over the steps after `warmup_steps` (from the end of the
    warm-up's last optimizer step to the end of the last one): the share of wall time spent waiting for a batch
    (DataLoader `next()` ranges), and the share in which no CUDA kernel ran (None without CUDA kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        run_cli()
    events = prof.events()
    steps = sorted(e.time_range.end for e in events if e.name.startswith(STEP_EVENT))
    if len(steps) <= warmup_steps + 1:
        raise CheckFailed(f"the profiler saw {len(steps)} optimizer steps; expected more than {warmup_steps + 1}.")
    lo, hi = steps[warmup_steps], steps[-1]
    window = hi - lo

    def clipped(e) -> float:
        return max(0.0, min(e.time_range.end, hi) - max(e.time_range.start, lo))

    waits = [e for e in events if e.name.startswith(DATA_WAIT_EVENT)]
    if not waits:
        raise CheckFailed("the profiler recorded no DataLoader waits; the run did not use data.num_workers.")
    wait = sum(clipped(e) for e in waits)
    kernels = sorted((max(e.time_range.start, lo), min(e.time_range.end, hi)) for e in events
                     if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA and clipped(e) > 0)
    busy, end = 0.0, lo
    for s, e in kernels:  # the union of kernel intervals (streams may overlap)
        if e > end:
            busy += e - max(s, end)
            end = e
    return {"steps": len(steps) - 1 - warmup_steps, "window_s": window / 1e6, "data_wait_share": wait / window,
            "gpu_idle_share": 1.0 - busy / window if kernels else None}


# ------------------------------------------------------------------------------------------------ the check


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def train_config(name: str, out: Path, store: Path, model: dict[str, Any], steps: int, lr: float, sizes: Sizes,
                 device: str, num_workers: int) -> dict[str, Any]:
    return {
        "name": name, "output": str(out), "seed": 0, "device": device, "precision": "bf16", "model": dict(model),
        "data": {"store": str(store), "batch_size": sizes.batch_size, "eval_windows": sizes.eval_windows,
                 "num_workers": num_workers},
        "optim": {"lr": lr, "warmup_steps": max(1, steps // 10), "max_steps": steps},
        "log_every": sizes.log_every, "eval_every": 0, "save_every": 0,
    }


def run_check(args: argparse.Namespace, sizes: Sizes, device: str, work: Path) -> dict[str, Any]:
    import torch

    from cachekd.demo.data import write_demo_data

    res: dict[str, Any] = {"peak_mem": {}}
    t_start = time.perf_counter()

    log(f"demo corpus: {sizes.num_documents} documents")
    data = write_demo_data(work / "demo", num_documents=sizes.num_documents, num_pairs=10, seed=0)
    store = work / "tokens"
    prep = json_output(cachekd("prepare", data["corpus"], "-o", store, "--seq-len", sizes.seq_len, "--vocab-size",
                               sizes.vocab_size, "--dev-fraction", 0.05, "--force", "--quiet", "--json"))
    res["store"] = prep
    vocab = int(prep["vocab_size"])  # the BPE may learn fewer tokens than asked

    # --- teacher
    teacher = work / "teacher"
    log(f"teacher: {sizes.teacher} for {sizes.teacher_steps} steps, bf16")
    cfg = write_yaml(work / "teacher.yaml", train_config("teacher", teacher, store, sizes.teacher, sizes.teacher_steps,
                                                         sizes.teacher_lr, sizes, device, 0))
    with PeakMemory() as mem:
        summary = json_output(cachekd("train", "-c", cfg, "--force", "--quiet", "--json"))
    res["peak_mem"]["teacher training"] = mem.value
    if device.startswith("cuda") and not mem.value:
        raise CheckFailed("the teacher's training allocated no CUDA memory: it did not run on the GPU.")
    train = read_train_lines(teacher)
    if not train[-1]["ce"] < train[0]["ce"]:
        raise CheckFailed(f"the teacher did not learn: cross-entropy {train[0]['ce']:.3f} at step {train[0]['step']}, "
                          f"{train[-1]['ce']:.3f} at step {train[-1]['step']}.")
    step_s, tokens_per_s, n = steady_step_time(train, max(2, sizes.teacher_steps // 5))
    from cachekd.models import load_model

    fpt = flops_per_token(load_model(teacher), sizes.seq_len)
    gpu_name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    peak = peak_tflops(gpu_name, args.peak_tflops) if gpu_name else None
    res["teacher"] = {"num_params": summary["num_params"], "steps": summary["steps"], "step_s": step_s,
                      "tokens_per_s": tokens_per_s, "tflops": fpt * tokens_per_s / 1e12,
                      "mfu": fpt * tokens_per_s / (peak * 1e12) if peak else None, "peak_tflops": peak,
                      "ce_first": train[0]["ce"], "ce_last": train[-1]["ce"],
                      "final_dev_loss": summary.get("final_dev_loss", summary.get("final_dev_loss_sample")),
                      "timed_steps": n}

    # --- precompute
    cache = work / "cache"
    log(f"precompute: top-{sizes.top_k}, batch {sizes.precompute_batch}, bf16")
    with PeakMemory() as mem:
        pre = json_output(cachekd("precompute", "--store", store, "--teacher", teacher, "-o", cache, "--top-k",
                                  sizes.top_k, "--temperatures", "1,2", "--splits", "train", "--batch-size",
                                  sizes.precompute_batch, "--device", device, "--dtype", "bf16", "--force", "--quiet",
                                  "--json"))
    res["peak_mem"]["precompute"] = mem.value
    if not pre.get("complete") or not pre.get("positions_per_s"):
        raise CheckFailed(f"precompute did not complete the cache: {pre}")
    bare = bare_forward_positions_per_s(teacher, vocab, sizes.precompute_batch, sizes.seq_len, device,
                                        repeats=max(3, min(50, int(pre["positions_computed"]
                                                                   // (sizes.precompute_batch * sizes.seq_len)))))
    res["precompute"] = {"positions": pre["positions_computed"], "seconds": pre["seconds"],
                         "positions_per_s": pre["positions_per_s"], "bare_forward_positions_per_s": bare,
                         "ratio_to_bare_forward": pre["positions_per_s"] / bare}

    # --- students
    distill = ["--objective", "forward_kl", "--temperature", 2, "--ce-weight", 0.5, "--tail-mode", "bucket"]
    variants = {"CE": ("train", []), "cached": ("distill", ["--cache", cache, *distill]),
                "online": ("distill", ["--cache", cache, "--online", *distill])}
    res["students"] = {}
    for pass_name, steps in (("timed", sizes.student_steps), ("profiled", sizes.profiled_steps)):
        for label, (command, extra) in variants.items():
            out = work / f"student-{label}-{pass_name}"
            cfg = write_yaml(work / f"student-{label}-{pass_name}.yaml",
                             train_config(f"student-{label}", out, store, sizes.student, steps, sizes.student_lr, sizes,
                                          device, sizes.num_workers))
            argv = [command, "-c", cfg, *extra, "--force", "--quiet", "--json"]
            r = res["students"].setdefault(label, {})
            if pass_name == "timed":
                log(f"student {label}: {steps} steps")
                with PeakMemory() as mem:
                    s = json_output(cachekd(*argv))
                res["peak_mem"][f"student {label}"] = mem.value
                train = read_train_lines(out)
                r["step_s"], _, r["timed_steps"] = steady_step_time(train, max(2, steps // 5))
                r["num_params"] = s["num_params"]
                r["final_dev_loss"] = s.get("final_dev_loss", s.get("final_dev_loss_sample"))
            else:
                log(f"student {label}: {steps} steps under the profiler")
                r |= profiled_shares(lambda: cachekd(*argv), warmup_steps=max(1, steps // 4))
    ce = res["students"]["CE"]["step_s"]
    for r in res["students"].values():
        r["vs_ce"] = r["step_s"] / ce
    res["total_s"] = time.perf_counter() - t_start
    return res


# ------------------------------------------------------------------------------------------------ report


def _fmt(v: Any, spec: str = ".3g") -> str:
    return "n/a" if v is None else format(v, spec)


def _mib(v: int | None) -> str:
    return "n/a (CPU)" if v is None else f"{v / 2**20:,.0f} MiB"


def report(res: dict[str, Any], sizes: Sizes) -> str:
    """The figures as a Markdown table."""
    t, p = res["teacher"], res["precompute"]
    rows = [
        ("precompute positions/s", f"{p['positions_per_s']:,.0f}",
         f"{p['positions']:,} positions in {p['seconds']:.1f} s (top-{sizes.top_k}, bf16)"),
        ("precompute ÷ bare teacher forward", f"{p['ratio_to_bare_forward']:.2f}",
         f"bare forward {p['bare_forward_positions_per_s']:,.0f} positions/s"),
        ("teacher MFU", _fmt(t["mfu"], ".1%"),
         f"{t['num_params'] / 1e6:.1f}M params, {t['tokens_per_s']:,.0f} tokens/s, {t['tflops']:.1f} TFLOP/s "
         f"(peak {_fmt(t['peak_tflops'], '.0f')} TFLOP/s), {t['step_s'] * 1e3:.1f} ms/step"),
        ("teacher cross-entropy", f"{t['ce_first']:.3f} → {t['ce_last']:.3f}",
         f"dev loss {_fmt(t['final_dev_loss'], '.3f')} after {t['steps']} steps"),
    ]
    for label, r in res["students"].items():
        rows.append((f"student step, {label}", f"{r['step_s'] * 1e3:.1f} ms",
                     f"× {r['vs_ce']:.2f} CE; over {r['timed_steps']} steps after warm-up"))
    for label, r in res["students"].items():
        rows.append((f"data wait share, {label}", f"{r['data_wait_share']:.1%}",
                     f"GPU idle share {_fmt(r['gpu_idle_share'], '.1%')}; profiled window {r['window_s']:.2f} s, "
                     f"{r['steps']} steps"))
    for stage, v in res["peak_mem"].items():
        rows.append((f"peak GPU memory, {stage}", _mib(v), ""))
    lines = ["| figure | value | detail |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny sizes and a few steps on the CPU: checks this script, measures nothing useful")
    ap.add_argument("--device", default="cuda", help="CUDA device to check (default cuda)")
    ap.add_argument("--work", default=None, help="keep the store, runs and cache here (default: a temporary directory)")
    ap.add_argument("--results-dir", default=None, help="where the results file goes (default benchmarks/results)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense bf16 peak of the GPU in TFLOP/s, for the MFU of a GPU not in PEAK_BF16_TFLOPS")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.cpu_smoke:
        sizes, device = CPU_SMOKE, "cpu"
    else:
        if not torch.cuda.is_available():
            print(f"gpu_check: no CUDA device is visible to torch {torch.__version__}; run it on a GPU machine, or "
                  f"pass --cpu-smoke to check the script on the CPU.", file=sys.stderr)
            return 2
        sizes, device = GPU, args.device
    from _common import machine, write_result

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        try:
            res = run_check(args, sizes, device, work)
        except CheckFailed as e:
            print(f"gpu_check FAILED: {e}", file=sys.stderr)
            return 1
        except BaseException as e:  # a CUDA error, or anything else: say so, then the traceback
            print(f"gpu_check FAILED with {type(e).__name__}: {e}", file=sys.stderr)
            raise
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    table = report(res, sizes)
    print(table)
    info = machine()
    config = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "device": device,
              "gpu": info.get("gpu", "none"), "sizes": json.dumps(asdict(sizes)),
              "precision": "bf16 autocast (train, distill, precompute); students read data with "
                           f"data.num_workers={sizes.num_workers} (DataLoader, pinned memory on CUDA)",
              "distillation": "forward KL, τ=2, λ=0.5, bucket tail, top-k cache; online: the same teacher live",
              "total_s": f"{res['total_s']:.0f}"}
    notes = ("Step times come from each run's metrics.jsonl (wall time a step, loading included) after the first "
             "fifth of the steps. The data wait share is the time the training loop spent in DataLoader next() "
             "over the profiled steps after the first quarter, in a second, shorter run of each student; the GPU "
             "idle share is the part of that window without a CUDA kernel running (n/a on CPU). MFU counts "
             "6·N + 12·L·d·T FLOPs a token with N the parameters in matrix products.")
    if args.cpu_smoke:
        notes = "CPU smoke run: tiny sizes; these numbers only show that the script works. " + notes
    path = write_result("gpu_check", "GPU check: precompute, teacher MFU, student step times, data wait, memory",
                        config, table, notes, results_dir=args.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
