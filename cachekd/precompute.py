"""Run frozen teacher(s) once over a token store and write their outputs into a logit cache.

The teacher's forward runs in inference mode (autocast on GPU), top-k and `tail_lse` are computed on the device,
and only the small result is copied back; encoding, compression and disk writes happen in a background thread so
the teacher never waits on them. Work is split into the token store's chunks; each chunk is marked done only
after its data is written, so a killed run restarts where it stopped, and `--part i/n` jobs or torchrun ranks take
disjoint chunks.
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

from cachekd import distributed, ensemble
from cachekd.cache import encoding as enc
from cachekd.cache import format as fmt
from cachekd.cache import writer as cw
from cachekd.errors import CachekdError, ConfigFieldError, ConfigKeysError
from cachekd.teacher_rows import teacher_targets
from cachekd.teacher_samples import sampled_teacher_targets
from cachekd.tokens import TokenStore


DEFAULT_STORAGE = (16, 50)
"""(K, N) of the cache `precompute` makes when no storage option is given: the hybrid of the exact top-K and N draws
from the teacher beyond it. Chosen from `benchmarks/bench_fidelity.py` (README, "Which option for which
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

    default_storage: bool = field(default=False, init=False)
    """Set when neither top_k nor sample nor full was given: the cache takes `DEFAULT_STORAGE`."""

    def __post_init__(self) -> None:
        if self.proposal_temperature is not None and self.sample is None:  # before the default storage sets it
            raise ConfigKeysError("{proposal_temperature} needs {sample} N.")
        if self.top_k is None and self.sample is None and not self.full:
            self.top_k, self.sample = DEFAULT_STORAGE
            self.default_storage = True
        elif self.top_k is None:
            self.top_k = 0 if self.sample is not None else 64
        if not self.full and self.sample is None and self.top_k < 1:
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
            if self.sample is None:
                raise ConfigKeysError("{proposal_temperature} needs {sample} N.")
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
        mode="full" if cfg.full else "topk" if cfg.sample is None else "sampled",
        k=None if cfg.full else cfg.top_k,
        temperatures=[] if cfg.full else [float(t) for t in cfg.temperatures],
        splits=splits,
        encoding=enc.encoding_descriptors(1.0 / cfg.logprob_step),
        sample=None if cfg.sample is None else fmt.SampleSpec(
            cfg.sample, None if cfg.proposal_temperature is None else float(cfg.proposal_temperature),
            cfg.sample_seed).to_dict(),
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


def _chunk_targets(models: list, infos: list[dict[str, Any]], tokens: np.ndarray, split: str, chunk: int,
                   plan: fmt.CachePlan, cfg: PrecomputeConfig, device: torch.device, amp: torch.dtype | None
                   ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Every teacher's cache arrays for one chunk of token windows, and the chunk's statistics (its done-marker)."""
    temps, vocab = plan.temperatures, plan.token_store.vocab_size
    k = None if plan.mode == "full" else plan.k
    results: dict[str, dict[str, np.ndarray]] = {}
    # the marker binds the chunk to its tokens, and records the precision the teachers ran in (verify's tolerance)
    stats: dict[str, Any] = {"teachers": {}, fmt.TOKENS_DIGEST: fmt.tokens_digest(tokens),
                             fmt.COMPUTE_DTYPE: str(amp or torch.float32).removeprefix("torch.")}
    for info, model in zip(infos, models):
        parts: dict[str, list[torch.Tensor]] = {}
        ent, mass, distinct = [], [], []
        for b in range(0, len(tokens), cfg.batch_size):
            x = torch.from_numpy(tokens[b:b + cfg.batch_size].astype(np.int64)).to(device)
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(input_ids=x).logits
            if plan.mode == "sampled":
                spec = plan.sample_spec
                first = plan.chunk_range(split, chunk)[0] + b
                arrays, st = sampled_teacher_targets(logits, vocab, int(plan.k), temps, spec.num_draws,
                                                     spec.proposal_temperature, spec.seed,
                                                     np.arange(first, first + len(x)))
                distinct.append(st["distinct_ids"].cpu())
            else:
                arrays, st = teacher_targets(logits, vocab, k, temps)
            bad = ~torch.isfinite(st["lse"]).all(dim=-1)
            if bool(bad.any()):
                w = plan.chunk_range(split, chunk)[0] + b + int(bad.nonzero()[0])
                raise ConfigKeysError("teacher {name!r} produced NaN or inf logits on {split} window {w}; check the "
                                      "checkpoint (or try {dtype} fp32).", name=info["name"], split=split, w=w)
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
        stats["teachers"][info["name"]] = s
    return results, stats


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
    if not cfg.full and cfg.top_k >= vocab and cfg.sample is not None:
        raise ConfigKeysError("{top_k} {k} with {sample} leaves no tokens to draw from (the vocabulary has {vocab}); "
                              "use a top-k cache, or a smaller {top_k}.", k=cfg.top_k, vocab=vocab)
    if not cfg.full and cfg.top_k > vocab:
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
    root = Path(cfg.output)
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
    plan = build_plan(cfg, store, infos, vocab)
    plan, lock = _open_cache(root, plan, force and (world == 1 or rank == 0), slot, slots, rank, world)
    try:
        todo = [(split, c) for split in plan.splits
                for c in fmt.pending_chunks(root, split, plan.num_chunks(split)) if c % slots == slot]
        positions = sum(stop - start for start, stop in (plan.chunk_range(s, c) for s, c in todo)) * store.seq_len
        bg = _BackgroundWriter(cw.ChunkWriter(root, plan), cfg.queue_size)
        t0 = time.perf_counter()
        done_positions = 0
        try:
            with tqdm(total=positions, desc="precompute", unit="pos", unit_scale=True, disable=not progress) as bar:
                for split, chunk in todo:
                    tokens = store.read_chunk(split, chunk)
                    results, stats = _chunk_targets(models, infos, tokens, split, chunk, plan, cfg, device, amp)
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
