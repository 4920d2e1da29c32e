"""Cost of the distillation losses, measured side by side in one run.

(a) forward+backward time of the hard-label CE alone against CE + sparse KD (top-k, bucket tail), CE + sampled
    KD (N=50 draws, the unbiased forward-KL estimate; reverse KL on the stored ids + bucket), CE + dense KD and the
    other variants, on the same student logits. Goals: sparse bucket KD ≤ 1.15× CE, sampled KD ≤ 1.0× CE.
(b) peak memory and time of the chunked loss (hidden states + lm_head weight, ``chunked_distill_loss``) against a
    plain PyTorch loss on the unchunked logits (``F.cross_entropy`` + ``F.kl_div``). Goals: peak ≤ 1/3 of the
    plain one, time ≤ 1.2×. On CPU the peak is measured in a fresh subprocess per variant as peak RSS
    (``VmHWM`` after resetting it, else ``ru_maxrss``) minus the RSS once the inputs exist; on CUDA with ``torch.cuda.max_memory_allocated``.
(c) the ChooBaCa step against a CE step, both from hidden states: the output projection, the loss and the
    gradients of the hidden states and the projection (what differs between the two training steps; the model's
    body adds the same time to both, so the whole step's ratio is lower). ChooBaCa: reverse KL at τ=1, logit mixing
    with the student detached, uniform tail of a top-k target, step-wise loss (``chunked_distill_loss``, chunk 32),
    on the fused path and on the general (n, V) path it replaced. Goal: ≤ 1.3× the CE step. Also the ChooBaCa step
    from a factored cache (`precompute --factored`): the teacher's logits rebuilt a chunk of rows at a time from its
    stored output-layer input (d = `teacher_d`, 1024) and output layer (``FactoredTarget``), every logit exact, the
    dense reverse KL with mixing; issue 19's goal ≤ 1.6× the CE step. The rebuild alone is a forward (n, d) × (d, V)
    matmul: 2·n·d·V flops against the CE step's ~6·n·H·V, so ~(d/3H)× the CE step's matmul work by itself.

Prints the tables and writes benchmarks/results/losses_<hardware>_<date>.md (via benchmarks/_common.py;
``--threads N`` runs write losses-Nthread_..., ``--quick`` runs losses-quick_...; ``--parts`` writes only the
parts it ran).

    python benchmarks/bench_losses.py            # default sizes (~4 min on 2 CPU cores)
    python benchmarks/bench_losses.py --quick    # small sizes, a smoke run
    python benchmarks/bench_losses.py --parts ac # only parts a and c
    python benchmarks/bench_losses.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import write_result  # noqa: E402
from cachekd.losses import (  # noqa: E402
    DenseTarget,
    FactoredTarget,
    KDConfig,
    SparseTarget,
    chunked_distill_loss,
    distill_loss,
    total_loss,
)
from cachekd.losses import mixed  # noqa: E402
from cachekd.losses.student import LOG_1M_CHEAP_TAIL_MIN  # noqa: E402



# ------------------------------------------------------------------------------------------------------------
# Inputs


def sparse_from_dense(teacher: torch.Tensor, k: int, tau: float) -> SparseTarget:
    """What the cache holds: top-k ids, τ=1 log-probs there, and the tail log-sum-exp at τ."""
    logp1 = F.log_softmax(teacher.float(), dim=-1)
    vals, ids = logp1.topk(k, dim=-1)
    tail = (logp1 / tau).scatter(-1, ids, -float("inf")).logsumexp(-1)
    return SparseTarget(ids=ids, logits=vals, tail_lse=tail)


def sampled_from_dense(teacher: torch.Tensor, num_draws: int, tau: float):
    """What a sampled cache holds for teacher logits (n, V) at τ (its own draws), as the loss target (1, n, S)."""
    import numpy as np

    from cachekd.teacher_samples import sampled_teacher_targets, target_at

    n = teacher.shape[0]
    arrays, _ = sampled_teacher_targets(teacher.float().view(1, n, -1), teacher.shape[-1], 0, [tau], num_draws, None,
                                        0, np.arange(1))
    return target_at(arrays, [tau], tau, None)


def make_logits(n: int, vocab: int, device: str, seed: int = 0, confident: bool = False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # A student and a correlated teacher with a realistic spread (top-64 of the teacher holds ~30% of its mass).
    base = torch.randn(n, vocab, generator=g) * 2.5
    student = base + torch.randn(n, vocab, generator=g)
    teacher = base + torch.randn(n, vocab, generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    if confident:  # the student puts > 1 − 2^-8 of its mass on the teacher's top token: the exact tail path
        top = teacher.argmax(-1, keepdim=True)
        student.scatter_(-1, top, 40.0)
    return student.to(device), teacher.to(device), labels.to(device)


# ------------------------------------------------------------------------------------------------------------
# Timing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_times(fns: dict, repeats: int, device: str) -> dict[str, list[float]]:
    """Times of each function over ``repeats`` rounds, the variants interleaved within a round so that a
    change in machine load hits all of them alike (this machine is shared). One warm-up call each."""
    for fn in fns.values():
        fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def summarise(times: dict[str, list[float]], base: str) -> dict[str, dict]:
    """Median time per variant and the median over rounds of its time ÷ the base variant's in the same round."""
    out = {}
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[base])]
        out[name] = {"seconds": statistics.median(ts), "ratio": statistics.median(ratios)}
    return out


def part_a(n: int, vocab: int, k: int, repeats: int, device: str) -> list[dict]:
    student, teacher, labels = make_logits(n, vocab, device)
    labels3 = labels.view(1, n)
    fns = {}

    def variant(name, teachers, cfg=None, mix_alpha=1.0, z=student, general=False):
        z = z.view(1, n, vocab).clone().requires_grad_(True)

        def step():
            z.grad = None
            if teachers is None:  # plain PyTorch CE
                F.cross_entropy(z.view(n, vocab), labels, reduction="sum").backward()
                return
            with general_path(general):
                parts = distill_loss(z, labels3, teachers, cfg, mix_alpha=mix_alpha)
                (parts.ce_sum + parts.kd_sum).backward()

        fns[name] = step

    tgt1 = sparse_from_dense(teacher, k, 1.0)
    tgt1 = SparseTarget(tgt1.ids.view(1, n, k), tgt1.logits.view(1, n, k), tgt1.tail_lse.view(1, n))
    tgt2 = sparse_from_dense(teacher, k, 2.0)
    tgt2 = SparseTarget(tgt2.ids.view(1, n, k), tgt2.logits.view(1, n, k), tgt2.tail_lse.view(1, n))
    dense = DenseTarget(teacher.view(1, n, vocab))
    variant("CE alone (F.cross_entropy)", None)
    variant("CE alone (distill_loss, no teacher)", [], KDConfig())
    variant(f"CE + sparse k={k} bucket forward KL, τ=1", [tgt1], KDConfig("forward_kl", tail_mode="bucket"))
    variant(f"CE + sparse k={k} bucket reverse KL, τ=1", [tgt1], KDConfig("reverse_kl", tail_mode="bucket"))
    variant(f"CE + sparse k={k} renormalize forward KL, τ=1", [tgt1], KDConfig("forward_kl", tail_mode="renormalize"))
    variant(f"CE + sparse k={k} bucket forward KL, τ=2", [tgt2],
            KDConfig("forward_kl", temperature=2.0, tail_mode="bucket"))
    variant(f"CE + sparse k={k} uniform forward KL, τ=1", [tgt1], KDConfig("forward_kl", tail_mode="uniform"))
    variant(f"CE + sparse k={k} uniform reverse KL, τ=1", [tgt1], KDConfig("reverse_kl", tail_mode="uniform"))
    variant(f"CE + sparse k={k} uniform forward KL + mixing α=0.5", [tgt1], KDConfig("forward_kl", tail_mode="uniform"),
            mix_alpha=0.5)
    choobaca = KDConfig("reverse_kl", tail_mode="uniform", detach_mix=True)
    for alpha in (0.5, 0.7):
        variant(f"CE + sparse k={k} uniform reverse KL + mixing α={alpha} (ChooBaCa loss, fused)", [tgt1], choobaca,
                mix_alpha=alpha)
    variant(f"CE + sparse k={k} uniform reverse KL + mixing α=0.5 (ChooBaCa loss, general (n, V) path)", [tgt1],
            choobaca, mix_alpha=0.5, general=True)
    variant(f"CE + sparse k={k} bucket reverse KL + mixing α=0.5 (ChooBaCa loss, rest shaped like the student)",
            [tgt1], KDConfig("reverse_kl", tail_mode="bucket", detach_mix=True), mix_alpha=0.5)
    # sampled targets (RS-KD, N=50 draws a position, one proposal per τ), built as precompute builds them
    for tau in (1.0, 2.0):
        smp = sampled_from_dense(teacher, 50, tau)
        variant(f"CE + sampled N=50 forward KL (unbiased estimate), τ={tau:g}", [smp],
                KDConfig("forward_kl", temperature=tau))
        if tau == 1.0:
            variant("CE + sampled N=50 reverse KL (bucket), τ=1", [smp], KDConfig("reverse_kl"))
    variant("CE + dense forward KL, τ=1", [dense], KDConfig("forward_kl"))
    variant("CE + dense reverse KL, τ=1", [dense], KDConfig("reverse_kl"))
    # worst case for the tail: every row's student tail mass < 2^-8 takes the exact O(V) path
    confident, _, _ = make_logits(n, vocab, device, confident=True)
    variant(f"CE + sparse k={k} bucket forward KL, τ=1, confident student (all rows: tail < 2^-8)", [tgt1],
            KDConfig("forward_kl", tail_mode="bucket"), z=confident)
    q_topk = F.log_softmax(student.float(), -1).gather(-1, tgt1.ids.view(n, k)).logsumexp(-1)
    exact_share = float((q_topk > LOG_1M_CHEAP_TAIL_MIN).float().mean())
    summary = summarise(interleaved_times(fns, repeats, device), base="CE alone (F.cross_entropy)")
    rows = [{"variant": name, **v} for name, v in summary.items()]
    rows.append({"note": f"share of rows whose student tail mass is < 2^-8 (log-space tail gradient) in the realistic variants: {exact_share:.3f}"})
    return rows


@contextlib.contextmanager
def general_path(on: bool):
    """Within the block, mixing takes the general (n, V) log-softmax path (as before the fused ChooBaCa path)."""
    saved = mixed.FUSED_MIX_OBJECTIVES
    if on:
        mixed.FUSED_MIX_OBJECTIVES = ()
    try:
        yield
    finally:
        mixed.FUSED_MIX_OBJECTIVES = saved


# ------------------------------------------------------------------------------------------------------------
# Part (b): chunked vs plain, each variant in its own process for peak memory


def plain_loss(hidden, weight, labels, teacher, tau):
    logits = F.linear(hidden, weight)  # (B, T, V)
    vocab = logits.shape[-1]
    ce = F.cross_entropy(logits.view(-1, vocab), labels.view(-1), reduction="mean")
    kd = F.kl_div(
        F.log_softmax(logits.view(-1, vocab) / tau, dim=-1),
        F.log_softmax(teacher.view(-1, vocab).float() / tau, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return 0.5 * ce + 0.5 * tau**2 * kd


def _proc_status(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_peak_rss() -> int:
    """Reset the peak-RSS mark (Linux: ``echo 5 > /proc/self/clear_refs``) and return the current RSS.

    Without the reset, memory freed after building the inputs would hide the loss's own peak. Falls back to
    ``ru_maxrss`` where /proc is unavailable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    return _proc_status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def b_step(spec: dict):
    """Inputs and the fwd+bwd step of one part-(b) variant."""
    device = spec["device"]
    torch.manual_seed(0)
    B, T, V, H, k, tau = spec["B"], spec["T"], spec["V"], spec["H"], spec["k"], spec["tau"]
    hidden = (torch.randn(B, T, H, device=device)).requires_grad_(True)
    weight = (torch.randn(V, H, device=device) / H**0.5).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), device=device)
    teacher = torch.randn(B, T, V, device=device, dtype=torch.float16) * 2
    sparse = None
    if spec["variant"] == "chunked_sparse":
        s = sparse_from_dense(teacher.view(B * T, V), k, tau)
        sparse = SparseTarget(s.ids.view(B, T, k), s.logits.view(B, T, k), s.tail_lse.view(B, T))
        del teacher
        teacher = None
    cfg = KDConfig("forward_kl", temperature=tau, tail_mode="bucket")
    chunk = spec["chunk"]

    def step():
        hidden.grad = None
        weight.grad = None
        v = spec["variant"]
        if v == "plain":
            loss = plain_loss(hidden, weight, labels, teacher, tau)
        else:
            if v == "unchunked":
                parts = distill_loss(F.linear(hidden, weight), labels, [DenseTarget(teacher)], cfg)
            elif v == "chunked_dense":
                parts = chunked_distill_loss(hidden, weight, None, labels, [DenseTarget(teacher)], cfg, chunk_size=chunk)
            else:
                parts = chunked_distill_loss(hidden, weight, None, labels, [sparse], cfg, chunk_size=chunk)
            loss = total_loss(parts.ce_sum / parts.ce_count, parts.kd_sum / parts.kd_count, 0.5, tau)
        loss.backward()

    return step, weight


def run_b_variant(spec: dict) -> dict:
    """Child process: build the inputs, then measure the peak memory of one fwd+bwd."""
    device = spec["device"]
    H = spec["H"]
    step, weight = b_step(spec)
    # warm up the kernels on a small problem so that library initialisation is not counted
    small = F.linear(torch.randn(4, H, device=device), weight[:64].detach())
    F.log_softmax(small, -1).sum()
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = reset_peak_rss()
        step()
        peak = peak_rss() - base
    return {"peak_bytes": peak}


def part_b(B, T, V, H, k, chunk, repeats, device) -> list[dict]:
    rows = []
    names = {
        "plain": "plain F.cross_entropy + F.kl_div on unchunked logits (dense teacher)",
        "unchunked": "cachekd distill_loss on unchunked logits (dense teacher)",
        "chunked_dense": f"cachekd chunked_distill_loss, chunk {chunk} (dense teacher)",
        "chunked_sparse": f"cachekd chunked_distill_loss, chunk {chunk} (sparse k={k} bucket teacher)",
    }
    fns = {}
    for variant, label in names.items():
        spec = dict(variant=variant, B=B, T=T, V=V, H=H, k=k, tau=2.0, chunk=chunk, device=device)
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        rows.append({"variant": label, **json.loads(out.stdout.strip().splitlines()[-1])})
        fns[label] = b_step(spec)[0]
    summary = summarise(interleaved_times(fns, repeats, device), base=names["plain"])
    base = rows[0]
    for r in rows:
        r["seconds"] = summary[r["variant"]]["seconds"]
        r["time_ratio"] = summary[r["variant"]]["ratio"]
        r["peak_ratio"] = r["peak_bytes"] / base["peak_bytes"]
    return rows


# ------------------------------------------------------------------------------------------------------------
# Part (c): the ChooBaCa step against a CE step, from hidden states


def part_c(n: int, V: int, H: int, k: int, chunk: int, repeats: int, device: str, teacher_d: int = 1024,
           only_factored: bool = False) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(3)
    hidden = (torch.randn(n, H, generator=g) / 2).to(device).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 2.5 / H**0.5).to(device).requires_grad_(True)
    with torch.no_grad():  # a teacher correlated with the student, as in part (a)
        teacher = F.linear(hidden, weight) + torch.randn(n, V, generator=g).to(device)
    labels = torch.randint(0, V, (n,), generator=g).to(device)
    s = sparse_from_dense(teacher, k, 1.0)
    target = SparseTarget(s.ids.view(1, n, k), s.logits.view(1, n, k), s.tail_lse.view(1, n))
    del teacher
    # a factored teacher of width teacher_d whose logits are correlated with the student's: its first H dimensions
    # are the student's (hidden, weight), the rest independent noise of the same scale
    with torch.no_grad():
        d = teacher_d
        h_t = torch.cat([hidden.detach(), torch.randn(n, max(0, d - H), generator=g).to(device) / 2], -1)[:, :d]
        w_t = torch.cat([weight.detach() * (H / d) ** 0.5,
                         (torch.randn(V, max(0, d - H), generator=g) * 2.5 / d**0.5).to(device)], -1)[:, :d]
    factored_target = FactoredTarget(h_t.view(1, n, d).contiguous(), w_t.contiguous())
    uniform = KDConfig("reverse_kl", tail_mode="uniform", detach_mix=True)
    fns = {}

    def variant(name, alpha=None, general=False, chunk_size=chunk, cfg=uniform, tgt=target, eager=False):
        def step():
            hidden.grad = None
            weight.grad = None
            if alpha is None:  # the CE step: F.linear + F.cross_entropy
                loss = F.cross_entropy(F.linear(hidden, weight), labels, reduction="sum")
                loss.backward()
                return
            with general_path(general):
                # eager: the loss's weights given (as the trainer does), so forward forms the gradients
                parts = chunked_distill_loss(hidden.view(1, n, H), weight, None, labels.view(1, n), [tgt], cfg,
                                             mix_alpha=alpha, chunk_size=chunk_size,
                                             grad_weights=(0.5 / n, 0.5 / n) if eager else None)
                total_loss(parts.ce_sum / parts.ce_count, parts.kd_sum / parts.kd_count, 0.5, 1.0).backward()

        fns[name] = step

    base = "CE step (F.linear + F.cross_entropy)"
    variant(base)
    if not only_factored:
        for alpha in (0.5, 0.7, 0.9):
            variant(f"ChooBaCa step, α={alpha}, fused", alpha)
        variant("ChooBaCa step, α=0.5, general (n, V) path (before)", 0.5, general=True)
        variant(f"ChooBaCa step, α=0.5, fused, chunk {4 * chunk} instead of {chunk}", 0.5, chunk_size=4 * chunk)
        bucket = KDConfig("reverse_kl", tail_mode="bucket", detach_mix=True)
        variant("ChooBaCa step, α=0.5, bucket tail (mixed on the categories)", 0.5, cfg=bucket)
        variant(f"ChooBaCa step, α=0.5, bucket tail, chunk {4 * chunk} instead of {chunk}", 0.5, chunk_size=4 * chunk,
                cfg=bucket)
    dense_cfg = KDConfig("reverse_kl", detach_mix=True)
    how = {False: "recomputing backward", True: "gradients in forward"}
    for c_ in (chunk, 4 * chunk, 16 * chunk):
        for eager in (False, True):
            variant(f"ChooBaCa step from a factored cache (d={teacher_d}), α=0.5, chunk {c_}, {how[eager]}", 0.5,
                    chunk_size=c_, cfg=dense_cfg, tgt=factored_target, eager=eager)
    variant(f"ChooBaCa step from a factored cache (d={teacher_d}), α=0.9, chunk {16 * chunk}, {how[True]}", 0.9,
            chunk_size=16 * chunk, cfg=dense_cfg, tgt=factored_target, eager=True)
    with torch.no_grad():  # the same teacher's logits held dense (a --full cache): the loss without the rebuild
        dense_target = DenseTarget(F.linear(h_t, w_t).view(1, n, V))
    for eager in (False, True):
        variant(f"ChooBaCa step from the same logits held dense (a --full cache, no rebuild), α=0.5, chunk "
                f"{16 * chunk}, {how[eager]}", 0.5, chunk_size=16 * chunk, cfg=dense_cfg, tgt=dense_target,
                eager=eager)
        variant(f"forward KL τ=1 from a factored cache (d={teacher_d}), chunk {16 * chunk}, {how[eager]}", 1.0,
                chunk_size=16 * chunk, cfg=KDConfig("forward_kl"), tgt=factored_target, eager=eager)
    summary = summarise(interleaved_times(fns, repeats, device), base=base)
    return [{"variant": name, **v} for name, v in summary.items()]


# ------------------------------------------------------------------------------------------------------------
# Report


def report(args, sizes: dict, repeats: int, rows: dict, load: tuple) -> tuple:
    """(config dict, Markdown tables, notes) for benchmarks/_common.write_result, for the parts in ``rows``."""
    config = {
        "run": "quick" if args.quick else "default",
        "device": args.device,
        "torch threads": torch.get_num_threads(),
        "parts": "".join(rows),
    }
    lines, notes = [], []
    if "a" in rows:
        a, rows_a = sizes["a"], rows["a"]
        config["(a) positions, V, k"] = f"{a['n']}, {a['vocab']}, {a['k']}"
        config["(a) timing"] = f"median of {repeats} interleaved rounds; × CE = median over rounds of time ÷ F.cross_entropy's"
        lines += _time_table("(a) Forward+backward on the same student logits", "× CE",
                             [r for r in rows_a if "variant" in r])
        sparse_ratios = [r["ratio"] for r in rows_a if "bucket" in r.get("variant", "") and "τ=1" in r["variant"]
                         and "confident" not in r["variant"]]
        notes += [r["note"] for r in rows_a if "note" in r]
        notes.append(f"Goal (a) sparse bucket KD (τ=1, forward and reverse KL) ≤ 1.15× CE alone: "
                     f"{'MET' if max(sparse_ratios) <= 1.15 else 'NOT MET'} (worst {max(sparse_ratios):.2f}×).")
    if "b" in rows:
        b, rows_b = sizes["b"], rows["b"]
        config["(b) B, T, V, H, τ, chunk"] = f"{b['B']}, {b['T']}, {b['V']}, {b['H']}, 2.0, {b['chunk']}"
        config["(b) timing"] = f"median of {max(2, repeats - 2)} interleaved rounds"
        config["(b) peak"] = "extra memory of one forward+backward beyond the inputs: " + (
            "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else
            "peak RSS (VmHWM after a reset) in a fresh process per variant")
        lines += ["### (b) Chunked loss (hidden states + lm_head weight) vs plain PyTorch on unchunked logits", "",
                  "| variant | peak (MiB) | × plain | time (ms) | × plain |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['variant']} | {r['peak_bytes'] / 2**20:.0f} | {r['peak_ratio']:.2f} | "
                  f"{r['seconds'] * 1e3:.0f} | {r['time_ratio']:.2f} |" for r in rows_b]
        lines.append("")
        chunked = rows_b[2]
        notes += [
            f"Goal (b) chunked (dense teacher) peak ≤ 1/3 of plain: "
            f"{'MET' if chunked['peak_ratio'] <= 1 / 3 else 'NOT MET'} ({chunked['peak_ratio']:.2f}×).",
            f"Goal (b) chunked (dense teacher) time ≤ 1.2× plain: "
            f"{'MET' if chunked['time_ratio'] <= 1.2 else 'NOT MET'} ({chunked['time_ratio']:.2f}×).",
        ]
    if "c" in rows:
        c, rows_c = sizes["c"], rows["c"]
        config["(c) positions, V, H, k, chunk, factored teacher d"] = (f"{c['n']}, {c['V']}, {c['H']}, {c['k']}, "
                                                                     f"{c['chunk']}, {c['teacher_d']}")
        config["(c) timing"] = f"median of {repeats} interleaved rounds; × CE step = median over rounds of the ratio"
        lines += _time_table("(c) The ChooBaCa step against a CE step: projection + loss + gradients from hidden "
                             "states", "× CE step", rows_c)
        fused = [r["ratio"] for r in rows_c if r["variant"].endswith("fused")]  # at the preset's chunk
        if fused:
            notes.append(f"Goal (c) ChooBaCa step (reverse KL τ=1, mixing, uniform top-{c['k']} tail, chunk "
                         f"{c['chunk']}) ≤ 1.3× the CE step: {'MET' if max(fused) <= 1.3 else 'NOT MET'} "
                         f"(α=0.5 {fused[0]:.2f}×, worst {max(fused):.2f}×).")
        fac = {r["variant"]: r["ratio"] for r in rows_c if r["variant"].startswith("ChooBaCa step from a factored")}
        if fac:
            best = min(fac, key=fac.get)
            notes.append(f"Goal (c, issue 19) ChooBaCa step from a factored cache (d={c['teacher_d']}, every logit "
                         f"rebuilt, dense reverse KL with mixing) ≤ 1.6× the CE step: "
                         f"{'MET' if fac[best] <= 1.6 else 'NOT MET'} (best {fac[best]:.2f}× at {best.split('), ')[-1]},"
                         f" worst {max(fac.values()):.2f}×). The rebuild alone is 2·n·d·V flops against the CE "
                         f"step's ~6·n·H·V: {2 * c['teacher_d'] / (6 * c['H']):.2f}× the CE step's matmul work.")
    config["1-minute load average at start / end"] = f"{load[0]:.1f} / {load[1]:.1f}"
    if load[0] > (os.cpu_count() or 1) or load[1] > (os.cpu_count() or 1):
        notes.append("The load average exceeded the core count: other processes shared the cores during the run. "
                     "Ratios are measured interleaved and hold up better than absolute times, but many small ops "
                     "(the chunked and blocked code paths) suffer more from preempted OpenMP threads than a few "
                     "large ones; compare with a `--threads 1` run.")
    return config, "\n".join(lines).rstrip(), "\n".join(f"- {n}" for n in notes)


def _time_table(title: str, ratio_label: str, rows: list[dict]) -> list[str]:
    """A Markdown section: one row a variant with its time and its ratio to the baseline."""
    return [f"### {title}", "", f"| variant | time (ms) | {ratio_label} |", "|---|---:|---:|",
            *(f"| {r['variant']} | {r['seconds'] * 1e3:.1f} | {r['ratio']:.2f} |" for r in rows), ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per variant (the median is reported)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not write the results file")
    ap.add_argument("--parts", default="abc", help="which parts to run (letters of abc); the file holds only those")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--only-factored", action="store_true",
                    help="part (c): the CE step and the factored-cache variants only (not the sparse ones)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_b_variant(json.loads(args.child))))
        return
    parts = "".join(p for p in "abc" if p in args.parts)
    if not parts or set(args.parts) - set("abc"):
        ap.error(f"--parts takes letters of abc (got {args.parts!r}).")
    if args.quick:
        sizes = dict(a=dict(n=256, vocab=4000, k=64), b=dict(B=2, T=128, V=4000, H=64, k=64, chunk=128),
                     c=dict(n=256, V=4000, H=64, k=64, chunk=32, teacher_d=256))
        repeats = args.repeats or 3
    else:
        sizes = dict(a=dict(n=2048, vocab=16000, k=64), b=dict(B=8, T=512, V=16000, H=256, k=64, chunk=128),
                     c=dict(n=2048, V=16000, H=256, k=64, chunk=32, teacher_d=1024))
        repeats = args.repeats or 5
    device = args.device
    load_start = os.getloadavg()[0]
    rows = {}
    if "a" in parts:
        rows["a"] = part_a(**sizes["a"], repeats=repeats, device=device)
    if "b" in parts:
        rows["b"] = part_b(**sizes["b"], repeats=max(2, repeats - 2), device=device)
    if "c" in parts:
        rows["c"] = part_c(**sizes["c"], repeats=repeats, device=device, only_factored=args.only_factored)
    config, tables, notes = report(args, sizes, repeats, rows, (load_start, os.getloadavg()[0]))
    print("\n".join(f"{k}: {v}" for k, v in config.items()), tables, notes, sep="\n\n")
    if not args.no_write:
        theme = "losses" + ("-quick" if args.quick else "") + (f"-{args.threads}thread" if args.threads else "")
        path = write_result(theme, "Distillation loss cost: sparse vs dense KD, chunked vs plain, the ChooBaCa step",
                            config, tables, notes)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
