"""Run frozen teacher(s) once over a token store and write their outputs into a logit cache.

The teacher's forward runs in inference mode (autocast on GPU), top-k and `tail_lse` are computed on the device,
and only the small result is copied back; encoding, compression and disk writes happen in a background thread so
the teacher never waits on them. Work is split into the token store's chunks; each chunk is marked done only
after its data is written, so a killed run restarts where it stopped, and `--part i/n` jobs or torchrun ranks take
disjoint chunks.

A factored cache (`factored`) takes the input of each teacher's output layer from a forward hook instead, quantised
on the device (`cachekd.cache.encoding.encode_hidden`); its output layers, per-dimension scales and (compressed
form) basis are written once, before the first chunk, by the first process to get there (`writer.write_factors`),
and every later run or share takes them from the cache.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cachekd import distributed, ensemble, factored
from cachekd.cache import encoding as enc
from cachekd.cache import format as fmt
from cachekd.cache import writer as cw
from cachekd.errors import CachekdError, ConfigFieldError, ConfigKeysError
from cachekd.storage import location
from cachekd.teacher_rows import ENTROPY_STRIDE, teacher_targets
from cachekd.teacher_samples import sampled_teacher_targets
from cachekd.tokens import TokenStore


DEFAULT_STORAGE = (16, 50)
"""(K, N) of the cache `precompute` makes when no storage option is given: the hybrid of the exact top-K and N draws
from the teacher beyond it. Chosen from `benchmarks/bench_fidelity.py` (docs/sampled-caches.md, "Which option for which
objective"): the sampled caches kept the full-teacher gain for forward KL where top-64 kept a fraction, and no
option was resolved better for the other objectives."""


@dataclass
class PrecomputeConfig:
    """Options of ``cachekd precompute``."""

    store: str = ""
    """Token store to run the teachers over."""
    teachers: list[str] = field(default_factory=list)
    """Teacher checkpoints: an HF directory, a `cachekd train` run directory, a registry name, or NAME=PATH."""
    output: str = ""
    """Directory of the logit cache."""
    top_k: int | None = None
    """Logits kept exactly per position (ignored with `full`). None: the default storage (`DEFAULT_STORAGE`) when
    `sample` is None too, 0 with `sample` (a pure sampled cache). An explicit top_k without `sample` gives a
    top-k cache."""
    full: bool = False
    """Store all logits in fp16 instead of the top-k (small vocabularies, exactness tests)."""
    temperatures: list[float] = field(default_factory=lambda: [1.0, 2.0])
    """Temperatures for which `tail_lse` is stored; distillation can use exactly these."""
    splits: list[str] = field(default_factory=lambda: ["train", "dev"])
    batch_size: int = 32
    """Windows per teacher forward."""
    device: str = "auto"
    dtype: str = "auto"
    """Autocast dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32."""
    registry: str | None = None
    """YAML file with a `teachers:` mapping of names to checkpoint paths (default: ./cachekd.yaml if present)."""
    part: str | None = None
    """`i/n`: this job takes every n-th chunk starting at the i-th (1-based), for independent parallel jobs."""
    queue_size: int = 4
    logprob_step: float = 1 / 512
    """Fixed-point step of the stored log-probabilities: the largest error is half of it (default 2⁻¹⁰ ≈ 9.8e-4
    nats). 1/256 saves ~8 bytes a position at k=64 for twice the error."""
    sample: int | None = None
    """N: store N ids drawn from the teacher per position (a sampled cache; with an explicit top_k a hybrid of the
    exact top-k and N draws from the rest). None: the default storage, or a top-k cache with an explicit top_k."""
    proposal_temperature: float | None = None
    """The temperature the draws are made at, one of `temperatures`; None: each cached τ gets its own N draws."""
    sample_seed: int = 0
    """Seed of the draws (each window's draws are a function of the seed and the window)."""
    ensemble: str | None = None
    """logits or probs: cache the teachers' combination as one teacher, `ensemble` (`cachekd.ensemble`): exact,
    where combining sparse caches at training time is not. None: each teacher on its own."""
    ensemble_weights: list[float] | None = None
    """One weight per teacher for `ensemble` (normalised); None: equal weights."""
    factored: bool = False
    """Store per position the input h of each teacher's output layer, and that layer once (`cachekd.factored`):
    every logit, exact up to the rounding of h, in about d bytes a position (int8); training rebuilds the logits
    with one matmul and never loads the teacher."""
    factored_dtype: str = "int8"
    """How `factored` stores h: int8 (one scale a position, d + 4 bytes), bf16 or fp16 (2·d bytes)."""
    factored_rounding: str = "feedback"
    """int8 only: feedback (each dimension's rounding error passed on through the output layer's curvature: 3-4x lower
    KL measured, one sequential pass over the d dimensions a batch) or nearest (each value to its nearest step)."""
    factored_rank: int | None = None
    """r < d: the compressed form, r coefficients a position on the mean and r principal directions of h, fitted
    once on `factored_fit_windows` train windows drawn with `factored_fit_seed` (recorded in the plan). None: h."""
    factored_fit_windows: int = 256
    factored_fit_seed: int = 0

    default_storage: bool = field(default=False, init=False)
    """Set when neither top_k nor sample nor full was given: the cache takes `DEFAULT_STORAGE`."""

    def __post_init__(self) -> None:
        if self.proposal_temperature is not None and self.sample is None:  # before the default storage sets it
            raise ConfigKeysError("{proposal_temperature} needs {sample} N.")
        if self.factored:
            given = [key for key, on in (("full", self.full), ("top_k", self.top_k is not None),
                                         ("sample", self.sample is not None)) if on]
            if given:
                raise ConfigKeysError("{factored} and {%s} exclude each other: a factored cache holds every logit."
                                      % given[0])
            if self.factored_dtype not in fmt.FACTORED_DTYPES:
                raise ConfigFieldError("factored_dtype", f"one of {', '.join(fmt.FACTORED_DTYPES)}",
                                       self.factored_dtype)
            if self.factored_rounding not in ("feedback", "nearest"):
                raise ConfigFieldError("factored_rounding", "feedback or nearest", self.factored_rounding)
            if self.factored_rank is not None and self.factored_rank < 1:
                raise ConfigFieldError("factored_rank", "at least 1", self.factored_rank)
            if self.factored_fit_windows < 1:
                raise ConfigFieldError("factored_fit_windows", "at least 1", self.factored_fit_windows)
            if self.ensemble == "probs":
                raise ConfigKeysError("{ensemble} probs cannot be cached factored (a mixture of probabilities is not "
                                      "linear in the teachers' output-layer inputs); use {ensemble} logits, or cache "
                                      "the teachers factored on their own and combine them at training time "
                                      "({distill.teacher_combine} probs).")
        elif self.factored_rank is not None:
            raise ConfigKeysError("{factored_rank} needs {factored}.")
        if self.top_k is None and self.sample is None and not self.full and not self.factored:
            self.top_k, self.sample = DEFAULT_STORAGE
            self.default_storage = True
        elif self.top_k is None and not self.factored:
            self.top_k = 0 if self.sample is not None else 64
        if not self.full and not self.factored and self.sample is None and self.top_k < 1:
            raise ConfigFieldError("top_k", "at least 1", self.top_k)
        for t in self.temperatures:
            if not t > 0 or not math.isfinite(t):
                raise CachekdError(f"temperatures must be positive numbers (got {t}).")
        if len(set(self.temperatures)) != len(self.temperatures):
            raise ConfigKeysError("{temperatures} lists a value twice.")
        if not self.splits or not all(self.splits):
            raise ConfigKeysError("{splits} must name at least one split of the token store (got {got}).", got=self.splits)
        if not isinstance(self.sample_seed, int) or self.sample_seed < 0:
            raise ConfigFieldError("sample_seed", "an integer ≥ 0", self.sample_seed)
        if self.batch_size < 1:
            raise ConfigFieldError("batch_size", "at least 1", self.batch_size)
        if not 1 / 65536 <= self.logprob_step <= 1:
            raise ConfigFieldError("logprob_step", "between 1/65536 and 1", self.logprob_step)
        ensemble.check_options(self.ensemble, self.ensemble_weights, len(self.teachers))
        if self.sample is not None:
            if self.full:
                raise ConfigKeysError("{sample} and {full} exclude each other: full logits need no samples.")
            if not 1 <= self.sample <= 65535:
                raise ConfigFieldError("sample", "a number of draws between 1 and 65535", self.sample)
            if self.top_k < 0:
                raise ConfigKeysError("{top_k} must be at least 0 with {sample} (got {got}).", got=self.top_k)
        if self.proposal_temperature is not None:
            t = self.proposal_temperature
            if not t > 0 or not math.isfinite(t):
                raise ConfigFieldError("proposal_temperature", "a positive number", t)
            if not any(math.isclose(t, x) for x in self.temperatures):
                raise ConfigKeysError("{proposal_temperature} {t:g} must be one of {temperatures} ({have}): the "
                                      "weights need its normaliser.", t=t,
                                      have=", ".join(f"{x:g}" for x in self.temperatures))
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigFieldError("dtype", "auto, bf16, fp16 or fp32", self.dtype)
        parse_part(self.part)


def parse_part(part: str | None) -> tuple[int, int]:
    """'i/n' (1-based) → (i-1, n); None → (0, 1)."""
    if not part:
        return 0, 1
    try:
        i, n = (int(x) for x in part.split("/"))
    except ValueError:
        raise ConfigKeysError("{part} must look like i/n, for example 1/4 (got {got!r}).", got=part) from None
    if not 1 <= i <= n:
        raise ConfigKeysError("{part} {got}: in i/n, n must be at least 1 and i between 1 and n (e.g. 1/4 to 4/4).",
                              got=part)
    return i - 1, n




# ------------------------------------------------------------------------------------------ running


def autocast_dtype(spec: str, device: torch.device) -> torch.dtype | None:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[spec]


class _BackgroundWriter:
    """Encodes, compresses and writes finished chunks while the teacher computes the next ones. `close` writes what
    is queued and joins the thread; precompute calls it on every way out (an error or Ctrl-C included), so the
    process never exits while the thread is inside the compressor."""

    def __init__(self, writer: cw.ChunkWriter, maxsize: int):
        self.writer = writer
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.thread = threading.Thread(target=self._run, daemon=True, name="cachekd-writer")
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                self.writer.write(*item)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e

    def put(self, item) -> None:
        while True:
            self._raise()
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


def _busy_error(root: Path, what: str) -> CachekdError:
    return ConfigKeysError(
        "another precompute is already filling {what} of {root!r}; wait for it to finish (a stopped one resumes "
        "from the done chunks), or stop it first. To share the work between processes, start them all with {part} "
        "i/n (the same n) or under torchrun.", what=what, root=str(root))


def build_plan(cfg: PrecomputeConfig, store: TokenStore, teachers: list[dict[str, Any]], vocab: int) -> fmt.CachePlan:
    splits = {}
    for s in cfg.splits:
        if s not in store.splits():
            raise CachekdError(f"the token store has no {s!r} split (it has {', '.join(store.splits())}).")
        splits[s] = store.num_windows(s)
    return fmt.CachePlan(
        token_store=fmt.TokenStoreRef(
            path=str(store.path.resolve()), fingerprint=store.fingerprint,
            tokenizer_fingerprint=store.tokenizer_fingerprint, seq_len=store.seq_len, vocab_size=vocab,
            chunk_windows=store.chunk_windows,
        ),
        teachers=teachers,
        mode="factored" if cfg.factored else "full" if cfg.full else "topk" if cfg.sample is None else "sampled",
        k=None if cfg.full or cfg.factored else cfg.top_k,
        temperatures=[] if cfg.full or cfg.factored else [float(t) for t in cfg.temperatures],
        splits=splits,
        encoding=enc.encoding_descriptors(1.0 / cfg.logprob_step),
        sample=None if cfg.sample is None else fmt.SampleSpec(
            cfg.sample, None if cfg.proposal_temperature is None else float(cfg.proposal_temperature),
            cfg.sample_seed).to_dict(),
        factored=None if not cfg.factored else {"dtype": cfg.factored_dtype, "weight_dtype": "float32"} | (
            {"rounding": cfg.factored_rounding} if cfg.factored_dtype == "int8" else {}) | (
            {} if cfg.factored_rank is None else {"rank": cfg.factored_rank, "fit": {
                "windows": cfg.factored_fit_windows, "seed": cfg.factored_fit_seed}}),
    )


def _open_cache(root: Path, plan: fmt.CachePlan, force: bool, slot: int, slots: int, rank: int, world: int):
    """(plan, share lock) of the cache: created or resumed. Each process holds the lock of its share of the
    chunks for the whole run, taken in the same critical section as the plan, so a second identical precompute
    stops and --force elsewhere cannot clear it meanwhile. Under torchrun only rank 0 may clear or create."""
    if world > 1:
        import torch.distributed as dist

        if rank == 0:
            plan, lock = cw.open_or_create(root, plan, force=force, share=(slot, slots))
        dist.barrier()
        if rank != 0:
            plan, lock = cw.open_or_create(root, plan, share=(slot, slots))
    else:
        plan, lock = cw.open_or_create(root, plan, force=force, share=(slot, slots))
    if lock is None:
        raise _busy_error(root, cw.busy_share(root, slot, slots) or "an overlapping share")
    return plan, lock


def _forward(model, x: torch.Tensor, device: torch.device, amp: torch.dtype | None) -> torch.Tensor:
    """The teacher's logits (B, T, V_model) for windows x, in inference mode and the run's autocast."""
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return model(input_ids=x).logits


def _first_row(mask: torch.Tensor) -> int:
    """The first window (row) of a batch's (B, ...) mask where it holds anywhere."""
    return int(mask.reshape(mask.shape[0], -1).any(1).nonzero()[0, 0])


def _check_finite(name: str, values: torch.Tensor, split: str, windows) -> None:
    """Refuse a teacher whose logits (or output layer's input) `values` (B, ...) are not finite: `windows` (B,)
    are the batch's window indices in `split`."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        raise ConfigKeysError("teacher {name!r} produced NaN or inf logits on {split} window {w}; check the "
                              "checkpoint (or try {dtype} fp32).", name=name, split=split,
                              w=int(windows[_first_row(bad)]))


REBUILD_STAT_EVERY = 8
"""A factored cache records its rebuilt logits' KL to the teacher's own (`info`, the done-markers) on every
this-many-th batch of a split, its batches counted over the chunks in order (`_stat_batch`; the first included): the
statistic costs a second (B·T, d) × (d, V) matmul and an O(V) pass a position, ~as much as the teacher's output
layer again, and a sample of the positions estimates the mean well (`verify --recompute` checks values on its own
windows, whatever this is). Counted within each chunk instead, it ran on every batch at the default sizes (a chunk
of 4,096 positions is one batch of 32 × 128 windows)."""


def _stat_batch(plan: fmt.CachePlan, chunk: int, b: int, batch_size: int) -> bool:
    """Whether the batch of a chunk's windows starting at `b` measures the rebuild statistic: every
    `REBUILD_STAT_EVERY`-th batch of the split, numbered over its chunks in order (the same batches whatever part,
    rank or resume computes the chunk)."""
    per_chunk = -(-plan.chunk_windows // batch_size)
    return (chunk * per_chunk + b // batch_size) % REBUILD_STAT_EVERY == 0


def _chunk_targets(models: list, infos: list[dict[str, Any]], tokens: np.ndarray, split: str, chunk: int,
                   plan: fmt.CachePlan, cfg: PrecomputeConfig, device: torch.device, amp: torch.dtype | None,
                   layers: dict[str, _Factored] | None = None
                   ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Every teacher's cache arrays for one chunk of token windows, and the chunk's statistics (its done-marker)."""
    temps, vocab = plan.temperatures, plan.token_store.vocab_size
    k = None if plan.mode == "full" else plan.k
    results: dict[str, dict[str, np.ndarray]] = {}
    # the marker binds the chunk to its tokens, and records the precision the teachers ran in (verify's tolerance)
    stats: dict[str, Any] = {"teachers": {}, fmt.TOKENS_DIGEST: fmt.tokens_digest(tokens),
                             fmt.COMPUTE_DTYPE: str(amp or torch.float32).removeprefix("torch.")}
    chunk_start = plan.chunk_range(split, chunk)[0]
    for info, model in zip(infos, models):
        parts: dict[str, list[torch.Tensor]] = {}
        ent, mass, distinct, rebuild_kl, rebuild_err = [], [], [], [], []
        for b in range(0, len(tokens), cfg.batch_size):
            x = torch.from_numpy(tokens[b:b + cfg.batch_size].astype(np.int64)).to(device)
            first = chunk_start + b  # the batch's first window in the split
            if plan.mode == "factored":
                with_stat = _stat_batch(plan, chunk, b, cfg.batch_size)
                arrays, st = _factored_targets(model, x, layers[info["name"]], plan.factored_dtype, vocab, amp, device,
                                               with_stat)
                if with_stat:
                    rebuild_kl.append(st["rebuild_kl"].cpu())
                    rebuild_err.append(st["rebuild_err"].cpu())
            elif plan.mode == "sampled":
                logits = _forward(model, x, device, amp)
                spec = plan.sample_spec
                arrays, st = sampled_teacher_targets(logits, vocab, int(plan.k), temps, spec.num_draws,
                                                     spec.proposal_temperature, spec.seed,
                                                     np.arange(first, first + len(x)))
                distinct.append(st["distinct_ids"].cpu())
            else:
                arrays, st = teacher_targets(_forward(model, x, device, amp), vocab, k, temps)
            finite = st["lse"] if "lse" in st else st["finite"]  # the normaliser, or a factored cache's h
            _check_finite(info["name"], finite, split, range(first, first + len(x)))
            if "stored_finite" in st and not bool(st["stored_finite"].all()):
                w = first + _first_row(~st["stored_finite"])
                raise ConfigKeysError("teacher {name!r}: the input of its output layer on {split} window {w} is beyond "
                                      "fp16's range (±65504) even after its per-dimension scale; cache it with "
                                      "{factored_dtype} int8 or bf16.", name=info["name"], split=split, w=w)
            for key, v in arrays.items():
                parts.setdefault(key, []).append(v.to("cpu", non_blocking=True))
            ent.append(st["entropy"].cpu())
            if "topk_mass" in st:
                mass.append(st["topk_mass"].cpu())
        results[info["name"]] = {key: torch.cat(v).numpy() for key, v in parts.items()}
        e = torch.cat(ent).double()
        s: dict[str, Any] = {"positions": int(tokens.size), "entropy_positions": int(e.numel()),
                             "entropy_sum": float(e.sum()),
                             "entropy_min": float(e.min()), "entropy_max": float(e.max())}
        if mass:
            msum = torch.cat(mass).double().flatten(0, -2).sum(0)
            s["topk_mass_sum"] = {str(t): float(v) for t, v in zip(temps, msum)}
        if distinct:
            s["distinct_ids_sum"] = float(torch.cat(distinct).double().sum())
        if rebuild_kl:
            s["rebuild_kl_sum"] = float(torch.cat(rebuild_kl).double().sum())
            s["rebuild_positions"] = int(sum(k.numel() for k in rebuild_kl))
            s["rebuild_max_abs_logit_diff"] = float(torch.cat(rebuild_err).max())
        stats["teachers"][info["name"]] = s
    return results, stats


@dataclass
class _Factored:
    """A factored cache's teacher on the device: its output layer (float32, dim_scale folded in) and the scale."""

    weight: torch.Tensor  # (V, w): w = d, or r for the compressed form
    bias: torch.Tensor | None  # (V,)
    dim_scale: torch.Tensor  # (w,)
    rounding: torch.Tensor | None = None  # (w, w) int8 only: encode_hidden's feedback
    mean: torch.Tensor | None = None  # (d,) compressed form only
    basis: torch.Tensor | None = None  # (d, r) compressed form only


PROBE_WINDOWS = 8
"""Windows at the start of the first split on which a factored cache's teachers are checked to be linear in their
output layer's input (`factored.check_linear`) and its per-dimension scales are fitted."""


def _probe_factored(models: list, infos: list[dict[str, Any]], store: TokenStore, split: str, vocab: int,
                    device: torch.device, amp: torch.dtype | None, rank: int | None = None, dtype: str = "int8",
                    feedback: bool = True) -> dict[str, tuple[factored.OutputLayer, torch.Tensor, torch.Tensor | None]]:
    """Per teacher, its output layer, the per-dimension scale and the int8 rounding matrix chosen on the first
    windows (`factored.choose_dim_scale`); a teacher whose logits are not W·h + b is refused here, before anything
    is written. Records each teacher's `output_layer` facts in its info."""
    x = torch.from_numpy(store.read(split, 0, min(PROBE_WINDOWS, store.num_windows(split))).astype(np.int64)).to(device)
    out = {}
    for info, model in zip(infos, models):
        layer = factored.output_layer(model, vocab, info["name"])
        with factored.capture_hidden(model) as got, torch.inference_mode(), \
                torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(input_ids=x).logits[..., :vocab]
        _check_finite(info["name"], logits, split, range(len(x)))
        if got.hidden is None or got.hidden.shape[-1] != layer.hidden_size:
            raise ConfigKeysError("teacher {name!r} did not pass its logits through its output layer "
                                  "(get_output_embeddings), so it cannot be cached factored; use another storage "
                                  "option (e.g. {full} or the default).", name=info["name"])
        h = got.hidden.float()
        if rank is not None and rank >= layer.hidden_size:
            raise ConfigKeysError("{factored_rank} {rank} is not below teacher {name!r}'s d = {d}; leave it out for "
                                  "the exact form.", rank=rank, name=info["name"], d=layer.hidden_size)
        rebuilt = factored.rebuild_logits(h, layer.weight, layer.bias)
        factored.check_linear(info["name"], logits, rebuilt, amp is not None)
        info["output_layer"] = {"hidden_size": layer.hidden_size, "bias": layer.bias is not None}
        probs = factored.mean_probs(logits) / logits[..., 0].numel()
        out[info["name"]] = (layer, *factored.choose_dim_scale(h, layer, probs, dtype, feedback))
    return out


def _fit_factored(models: list, infos: list[dict[str, Any]], store: TokenStore, plan: fmt.CachePlan,
                  probed: dict[str, tuple[factored.OutputLayer, torch.Tensor]], batch_size: int, device: torch.device,
                  amp: torch.dtype | None) -> tuple[dict, dict, dict]:
    """The compressed form's fit: each teacher's h on the plan's sample of train windows (drawn with its seed), its
    mean and principal directions (`factored.fit_basis`), the layer that takes the coefficients (W·U, b + W·μ)
    and their per-dimension scales. Returns (layers, dim_scales, extra) for `writer.write_factors`."""
    fit, rank = plan.factored["fit"], int(plan.factored_rank)
    split = "train" if "train" in plan.splits else next(iter(plan.splits))
    n = store.num_windows(split)
    rows = np.sort(np.random.default_rng(int(fit["seed"])).choice(n, size=min(int(fit["windows"]), n), replace=False))
    tokens = np.stack([store.read(split, int(r), int(r) + 1)[0] for r in rows]).astype(np.int64)
    layers, scales, extra = {}, {}, {}
    for info, model in zip(infos, models):
        layer = probed[info["name"]][0]
        parts, probs = [], 0.0
        for b in range(0, len(tokens), batch_size):
            x = torch.from_numpy(tokens[b:b + batch_size]).to(device)
            with factored.capture_hidden(model) as got, torch.inference_mode(), \
                    torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                z = model(input_ids=x).logits[..., :plan.token_store.vocab_size]
            _check_finite(info["name"], z, split, rows[b:b + batch_size])
            parts.append(got.hidden.float())
            probs = probs + factored.mean_probs(z)
        h = torch.cat(parts)
        mean, basis = factored.fit_basis(h, rank)
        reduced = factored.OutputLayer(layer.weight @ basis,
                                       layer.weight @ mean + (0.0 if layer.bias is None else layer.bias))
        coefficients = factored.project(h, mean, basis)
        scale, rounding = factored.choose_dim_scale(coefficients, reduced, probs / h[..., 0].numel(),
                                                    plan.factored_dtype, plan.factored_rounding == "feedback")
        layers[info["name"]] = (reduced.weight.cpu().numpy(), reduced.bias.cpu().numpy())
        scales[info["name"]] = scale.cpu().numpy()
        extra[info["name"]] = {"mean": mean.cpu().numpy(), "basis": basis.cpu().numpy(),
                               **({} if rounding is None else {"rounding": rounding.cpu().numpy()})}
    return layers, scales, extra


def _factored_targets(model, x: torch.Tensor, layer: _Factored, dtype: str, vocab: int, amp: torch.dtype | None,
                      device: torch.device, with_stat: bool = True
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One batch of windows x (B, T) → a factored cache's arrays (on the device) and per-position statistics:
    the teacher's entropy, lse (finite check), and (`with_stat`) KL(teacher ‖ rebuilt) and |rebuilt − z| of the
    stored h."""
    with factored.capture_hidden(model) as got, torch.inference_mode(), \
            torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        z = model(input_ids=x).logits[..., :vocab]
    with torch.inference_mode():
        z = z.float()
        h = got.hidden.float()
        if layer.basis is not None:
            h = factored.project(h, layer.mean, layer.basis)
        arrays = enc.encode_hidden(h / layer.dim_scale, dtype, layer.rounding)
        # in float32 and bfloat16 z = W·h + b is finite where h is (checked on d numbers a position, not V); an
        # fp16 forward can overflow the output layer's matmul (|z| > 65504) with h finite, so there z is checked.
        # The entropy is a summary taken on every ENTROPY_STRIDE-th position, as the other kinds take it
        stats = {"finite": z if amp == torch.float16 else got.hidden,
                 "entropy": factored.entropy_rows(z[:, ::ENTROPY_STRIDE])}
        if dtype == "fp16":  # beyond ±65504 after the per-dimension scale: stored as inf
            stats["stored_finite"] = torch.isfinite(arrays["hidden"]).all(-1)
        if with_stat:
            h = enc.decode_hidden(arrays.get("hidden"), arrays.get("hidden_scale"), dtype)
            rebuilt = factored.rebuild_logits(h, layer.weight, layer.bias)
            stats |= {"rebuild_kl": factored.kl_rows(z, rebuilt), "rebuild_err": factored.logit_error(rebuilt, z)}
    return arrays, stats


def precompute(cfg: PrecomputeConfig, *, force: bool = False, progress: bool = True,
               say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fill the cache. Returns a summary (and the manifest once the cache is complete). `say` receives notes for
    the user (a teacher's extra output rows dropped as padding)."""
    from tqdm.auto import tqdm

    from cachekd.teachers import EnsembleTeacher, load_teachers

    if not cfg.output:
        raise ConfigKeysError("no output path given: pass {output} DIR for the cache.")
    store = TokenStore.open(cfg.store)
    vocab = store.vocab_size
    if cfg.default_storage and cfg.top_k >= vocab:
        raise ConfigKeysError("the default storage (the exact top-{k} and {n} draws beyond it) needs a vocabulary of "
                              "more than {k} tokens (this one has {vocab}): pass {full} for a vocabulary this small, "
                              "or {top_k} K for a top-k cache.", k=cfg.top_k, n=cfg.sample, vocab=vocab)
    if cfg.sample is not None and cfg.top_k >= vocab:
        raise ConfigKeysError("{top_k} {k} with {sample} leaves no tokens to draw from (the vocabulary has {vocab}); "
                              "use a top-k cache, or a smaller {top_k}.", k=cfg.top_k, vocab=vocab)
    if not cfg.full and not cfg.factored and cfg.top_k > vocab:
        raise ConfigKeysError("{top_k} {k} is larger than the vocabulary ({vocab} tokens).", k=cfg.top_k, vocab=vocab)
    low = [t for t in ([] if cfg.full else cfg.temperatures) if t < enc.min_temperature(vocab)]
    if low:
        raise ConfigKeysError(
            "{temperatures} {low} is below {tau_min:.3g}, the smallest τ the cache can store for a vocabulary of "
            "{vocab} tokens (ln V / 47.36: the tail's log-sum-exp is stored down to {tail_min:.0f} nats, and below "
            "that τ a clipped tail could count for more than 2⁻²⁴ of the tempered mass); cache τ ≥ {tau_min:.3g}, "
            "or {full}.", low=", ".join(f"{t:g}" for t in low), tau_min=enc.min_temperature(vocab), vocab=vocab,
            tail_min=enc.TAIL_MIN)
    rank, world, local_rank = distributed.setup()
    device = distributed.resolve_device(cfg.device, local_rank)
    amp = autocast_dtype(cfg.dtype, device)
    root = location(cfg.output)
    part_i, part_n = parse_part(cfg.part)
    slot, slots = part_i * world + rank, part_n * world
    busy = cw.busy_share(root, slot, slots)
    if busy:  # stop at once, before loading any teacher
        raise _busy_error(root, busy)
    loaded = load_teachers(cfg.teachers, store, cfg.registry, say=say)
    models = [m.to(device).eval() for m, _, _ in loaded]
    infos = [info for _, _, info in loaded]
    if cfg.ensemble:  # the model takes the weights as recorded, as verify and audit rebuild it
        infos = [ensemble.ensemble_info(infos, cfg.ensemble, cfg.ensemble_weights or [1.0] * len(models))]
        models = [EnsembleTeacher(models, infos[0]["weights"], cfg.ensemble, vocab).eval()]
    probed = None
    if cfg.factored:  # refuse a teacher that is not linear in its output layer before anything is written
        probed = _probe_factored(models, infos, store, cfg.splits[0], vocab, device, amp, cfg.factored_rank,
                                 cfg.factored_dtype, cfg.factored_rounding == "feedback")
    plan = build_plan(cfg, store, infos, vocab)
    plan, lock = _open_cache(root, plan, force and (world == 1 or rank == 0), slot, slots, rank, world)
    try:
        layers = None
        if probed is not None:  # the first writer's factors, as stored (a resume or another part reads them)
            stored = cw.stored_factors(root, plan)
            if stored is None and plan.factored_rank is not None:
                stored = cw.write_factors(root, plan, *_fit_factored(models, infos, store, plan, probed,
                                                                     cfg.batch_size, device, amp))
            elif stored is None:
                stored = cw.write_factors(
                    root, plan, {t: (l.weight.cpu().numpy(), None if l.bias is None else l.bias.cpu().numpy())
                                 for t, (l, _, _) in probed.items()},
                    {t: s.cpu().numpy() for t, (_, s, _) in probed.items()},
                    {t: {} if u is None else {"rounding": u.cpu().numpy()} for t, (_, _, u) in probed.items()})
            layers = {t: _Factored(*(None if f.get(n) is None else torch.from_numpy(f[n]).to(device)
                                     for n in ("weight", "bias", "dim_scale", "rounding", "mean", "basis")))
                      for t, f in stored.items()}
        todo = [(split, c) for split in plan.splits
                for c in fmt.pending_chunks(root, split, plan.num_chunks(split)) if c % slots == slot]
        positions = sum(stop - start for start, stop in (plan.chunk_range(s, c) for s, c in todo)) * store.seq_len
        bg = _BackgroundWriter(cw.ChunkWriter(root, plan), cfg.queue_size)
        t0 = time.perf_counter()
        done_positions = 0
        try:
            with tqdm(total=positions, desc="precompute", unit="pos", unit_scale=True, disable=not progress) as bar:
                for split, chunk in todo:
                    lock.check()  # (a lease on an object store: stop once another process took it over)
                    tokens = store.read_chunk(split, chunk)
                    results, stats = _chunk_targets(models, infos, tokens, split, chunk, plan, cfg, device, amp, layers)
                    bg.put((split, chunk, results, stats))
                    done_positions += tokens.size
                    bar.update(tokens.size)
            bg.close()
        except BaseException:
            try:
                bg.close()
            except BaseException:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        elapsed = time.perf_counter() - t0
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        manifest = cw.finalize(root, plan) if rank == 0 or world == 1 else None
        remaining = 0
        if manifest is None:
            remaining = sum(len(fmt.pending_chunks(root, s, plan.num_chunks(s))) for s in plan.splits)
        return {
            "output": str(root),
            "positions_computed": done_positions,
            "seconds": elapsed,
            "positions_per_s": done_positions / elapsed if elapsed > 0 else None,
            "complete": manifest is not None,
            "chunks_remaining": remaining,
            "manifest": None if manifest is None else manifest.to_dict(),
        }
    finally:
        lock.close()
