"""The cohort YAML (`cachekd cohort -c cohort.yaml`) as typed dataclasses, and the per-peer run configs it implies.

A cohort lists its peers; each becomes an ordinary run (`TrainConfig`) in ``<output>/peers/<name>``, whose data
section, window order, length and runtime settings are the cohort's, so all peers see the same batches. With a
``mutual:`` section the peers learn from each other (weighted mutual learning); without one the cohort is a
variant grid of independent students (each with its own ``distill:`` settings or plain cross-entropy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cachekd.rundir import PEERS_DIR, cohort_peer_dirs  # noqa: F401  (the cohort's layout: one home, in rundir)
from cachekd.schedules import Schedule
from cachekd.train_config import CADENCE_KEYS, RunPlacement

DEFAULT_ETA = Schedule(kind="cosine", start=0.25, end=0.0025)
"""The seed code's step size of the ω update: cosine from 0.25 to 0.0025."""


@dataclass
class PeerConfig:
    """One student of the cohort."""

    name: str = ""
    """Its run directory's name under <output>/peers/ (default: peer<i>)."""
    config: str | None = None
    """A preset or YAML file to start from; its model, optim and distill sections are used, the rest is the
    cohort's."""
    seed: int | None = None
    """Initialisation seed (default: the cohort's seed + the peer's index)."""
    model: dict[str, Any] = field(default_factory=dict)
    """Overrides of the model section (shape: hidden_size, num_layers, num_heads, ...)."""
    optim: dict[str, Any] = field(default_factory=dict)
    """Overrides of the optimizer settings (lr, weight_decay, warmup_steps, ...); the run length is the cohort's."""
    distill: dict[str, Any] | None = None
    """Variant grid only: this student's distillation from the cohort's cache (objective, temperature, ce_weight,
    alpha schedule, tail_mode, teachers, ...), over its `config`'s distill section; {} for the defaults; null
    (default): its `config`'s distill section, or cross-entropy only without one."""


@dataclass
class MutualConfig:
    """Weighted mutual learning: (1−α)·Σ_i ω_i·CE_i + α·τ²·Σ_i Σ_{j≠i} ω_j·D(p_j, p_i)."""

    alpha: float = 0.5
    """α in [0, 1]: the share of the mutual term (the seed paper: 0.5; 0: each peer trains on CE alone)."""
    temperature: float = 1.0
    """τ > 0 of the peers' distributions in the divergence (the seed code: 1)."""
    objective: str = "forward_kl"
    """forward_kl: KL(p_j ‖ p_i), as the seed code; reverse_kl: KL(p_i ‖ p_j)."""
    detach: bool = True
    """Whether peer j's distribution is a constant in peer i's term (deep mutual learning, and how the project
    treats every target). false reproduces the seed code, where each term also trains peer j."""
    update_every: int = 100
    """Update ω every this many optimizer steps from the peers' dev losses (0: ω stays at its initial value)."""
    eta: Schedule | float = DEFAULT_ETA
    """Step size η > 0 of the ω update, a schedule over the training steps (the seed code: cosine 0.25 → 0.0025)."""
    grad_clip: float = 1.0
    """Each validation batch's ω gradient CE_b / num_batches is clamped to [0, grad_clip] (the seed code: 1, with
    60 batches, so it bites only above 60 nats); 0: no upper clamp."""
    num_batches: int = 60
    """ω takes this many mirror-descent steps per update, one per group of the scored dev windows, each with the
    gradient (group CE) / num_batches (the seed code: one step per validation batch, 60 batches; fewer when fewer
    windows are scored): one update moves ω by about exp(−η·mean dev CE)."""
    eval_windows: int = 0
    """Dev windows scored for the ω update (0: the whole dev split)."""
    initial_weights: list[float] | None = None
    """ω at step 0, one per member (trained peers, then fixed peers), normalised to sum 1; default: the fixed peers'
    `fixed_weights`, the rest shared equally."""
    fixed_peers: list[str] = field(default_factory=list)
    """Teachers of the cohort's cache that join as fixed peers: never trained, no forward pass, their cached
    targets enter the divergence terms."""
    fixed_weights: list[float] | None = None
    """ω of each fixed peer (kept constant by the update); default: 1 / (number of members) each."""
    tail_mode: str = "bucket"
    """How a fixed peer's top-k target treats its tail (bucket | uniform | renormalize)."""

    def __post_init__(self) -> None:
        from cachekd.cohort.wml import MUTUAL_OBJECTIVES
        from cachekd.kd_options import OBJECTIVE_ALIASES, in_unit_interval, is_temperature

        self.objective = OBJECTIVE_ALIASES.get(self.objective, self.objective)
        _require(in_unit_interval(self.alpha), "mutual.alpha", "in [0, 1]", self.alpha,
                 "it is the mutual term's share of the loss")
        _require(is_temperature(self.temperature), "mutual.temperature", "a positive number", self.temperature)
        _require(self.objective in MUTUAL_OBJECTIVES, "mutual.objective", "forward_kl or reverse_kl", self.objective)
        _require(self.update_every >= 0, "mutual.update_every", "a whole number >= 0", self.update_every)
        eta = self.eta_schedule
        for part, v in (("start", eta.start), ("end", eta.end)):
            _require(v > 0, "mutual.eta" if eta.kind == "constant" else f"mutual.eta.{part}", "> 0", v,
                     "it is the step size of the peer-weight update")
        _require(self.grad_clip >= 0, "mutual.grad_clip", ">= 0", self.grad_clip)
        _require(isinstance(self.num_batches, int) and not isinstance(self.num_batches, bool)
                 and self.num_batches >= 1, "mutual.num_batches", "a whole number >= 1", self.num_batches)
        _require(self.eval_windows >= 0, "mutual.eval_windows", "a whole number >= 0", self.eval_windows)
        for key in ("initial_weights", "fixed_weights"):
            w = getattr(self, key)
            _require(w is None or (bool(w) and all(0 <= x < math.inf for x in w) and 0 < sum(w) < math.inf),
                     f"mutual.{key}", "non-negative numbers, not all 0, with a finite sum", w)
        if self.fixed_weights is not None:
            _require(len(self.fixed_weights) == len(self.fixed_peers), "mutual.fixed_weights",
                     f"one weight for each of the {len(self.fixed_peers)} fixed peers", self.fixed_weights)
            _require(sum(self.fixed_weights) < 1, "mutual.fixed_weights", "a list summing to less than 1",
                     self.fixed_weights, "the trained peers share the rest of ω")
        _require(len(set(self.fixed_peers)) == len(self.fixed_peers), "mutual.fixed_peers",
                 "a list of distinct teacher names", self.fixed_peers)
        _require(self.tail_mode in ("bucket", "uniform", "renormalize"), "mutual.tail_mode",
                 "bucket, uniform or renormalize", self.tail_mode)

    @property
    def eta_schedule(self) -> Schedule:
        return self.eta if isinstance(self.eta, Schedule) else Schedule(kind="constant", start=float(self.eta),
                                                                       end=float(self.eta))


@dataclass
class SearchConfig:
    """Peer search: successive halving over a seeded random pool of LLaMA shapes (`cachekd cohort search`)."""

    keep: int = 3
    """Shapes to keep: the cohort's peers."""
    pool: int = 12
    """Candidates sampled for the first rung."""
    rung_steps: int = 200
    """Steps each candidate trains in the first rung; each later rung trains its survivors twice as long."""
    budget_steps: int | None = None
    """Stop starting rungs once the steps spent would exceed this (None: run the rungs to the end)."""
    min_params: int = 0
    max_params: int = 10**12
    """The parameter range of a candidate (the seed paper: 1/5 to 1/2 of a base model's size)."""
    layers: list[int] = field(default_factory=lambda: [2, 8])
    """Smallest and largest number of layers."""
    heads: list[int] = field(default_factory=lambda: [2, 4, 8])
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 96, 128, 192, 256])

    def __post_init__(self) -> None:
        _require(self.keep >= 1, "search.keep", "at least 1", self.keep)
        _require(self.pool >= self.keep, "search.pool", f"at least search.keep ({self.keep})", self.pool)
        _require(self.rung_steps >= 1, "search.rung_steps", "at least 1", self.rung_steps)
        _require(len(self.layers) == 2 and 1 <= self.layers[0] <= self.layers[1], "search.layers",
                 "[smallest, largest] with 1 <= smallest <= largest", self.layers)
        _require(self.min_params <= self.max_params, "search.min_params", f"at most max_params ({self.max_params})",
                 self.min_params)


def _require(ok: bool, key: str, rule: str, value: Any, reason: str = "") -> None:
    from cachekd.errors import ConfigFieldError

    if not ok:
        raise ConfigFieldError(key, rule, value, reason)


@dataclass
class CohortConfig(RunPlacement):
    """Everything `cachekd cohort` needs; saved as <output>/config.yaml. Its precision applies to every peer (fp16:
    variant grids only; mutual learning forms one loss over several gradient scalers)."""

    name: str = "cohort"
    output: str = ""
    """Cohort directory: config.yaml, metrics.jsonl (ω), checkpoints/ (ω), summary.json, and peers/<name>/ runs."""
    seed: int = 0
    """Seed of the window order all peers share (and of each peer's initialisation unless it gives its own)."""
    data: dict[str, Any] = field(default_factory=dict)
    """The data section every peer uses (store, batch_size, micro_batch_size, block_chunks, ...)."""
    optim: dict[str, Any] = field(default_factory=dict)
    """Optimizer settings of every peer (a peer's own `optim` overrides them) and the run length (epochs,
    max_steps, max_time_s), which only the cohort sets."""
    cache: str | None = None
    """Logit cache of the distilling peers of a grid and of the fixed peers."""
    peers: list[PeerConfig] = field(default_factory=list)
    mutual: MutualConfig | None = None
    """Weighted mutual learning; null (default): a variant grid of independent students."""
    search: SearchConfig | None = None
    """Settings of `cachekd cohort search` (which writes the peers it finds)."""

    key_order: ClassVar[tuple[str, ...]] = ("name", "output", "seed", "device", "precision", "data", "optim", "cache",
                                            "peers", "mutual", "search", *CADENCE_KEYS)

    def __post_init__(self) -> None:
        names = [p.name or f"peer{i}" for i, p in enumerate(self.peers)]
        from cachekd.errors import CachekdError, ConfigKeysError

        for p, n in zip(self.peers, names):
            p.name = n
            _require(n.replace("-", "").replace("_", "").replace(".", "").isalnum() and not n.startswith("."),
                     "peers.name", "letters, digits, '-', '_' or '.'", n, "it names the peer's run directory")
        if len(set(names)) != len(names):
            raise CachekdError(f"two peers are named {next(n for n in names if names.count(n) > 1)!r}; name each once.")
        for key in LENGTH_KEYS:
            for p in self.peers:
                if key in p.optim:
                    raise CachekdError(f"peer {p.name!r} sets optim.{key}; the run length is the cohort's "
                                       f"(optim.{key}).")
        m = self.mutual
        if m is not None:
            if self.peers and m.alpha > 0 and len(self.peers) + len(m.fixed_peers) < 2:
                raise CachekdError("mutual learning needs at least two members (peers or fixed_peers); a single peer "
                                 "has no one to learn from (set mutual.alpha: 0, or drop the mutual section).")
            for p in self.peers:
                if p.distill is not None:
                    raise CachekdError(f"peer {p.name!r} has a distill section, but with mutual learning the mutual "
                                     f"section sets the loss; drop one of them.")
            clash = next((n for n in names if n in m.fixed_peers), None)
            if clash is not None:  # ω, the metrics and the summary key members by name
                raise CachekdError(f"peer {clash!r} has the name of a fixed peer (a teacher of the cache); name the "
                                   f"trained peer otherwise.")
            if m.fixed_peers and not self.cache:
                raise ConfigKeysError(
                    "mutual.fixed_peers {peers} are teachers of a logit cache, but the cohort has no cache: add the "
                    "line `cache: PATH` at the top level of the cohort config (the cache precompute wrote for that "
                    "token store), or pass {cache} PATH.", peers=m.fixed_peers)
            if m.initial_weights is not None and len(m.initial_weights) != len(self.peers) + len(m.fixed_peers):
                raise CachekdError(f"mutual.initial_weights has {len(m.initial_weights)} values for "
                                 f"{len(self.peers) + len(m.fixed_peers)} members (peers, then fixed peers).")
            if self.precision == "fp16":
                raise CachekdError("mutual learning runs in fp32 or bf16 (precision fp16 needs one gradient scaler a "
                                 "model and the cohort's loss is one).")

    @property
    def member_names(self) -> list[str]:
        """The peers, then the fixed peers: the order of ω."""
        return [p.name for p in self.peers] + (list(self.mutual.fixed_peers) if self.mutual else [])

    def start_weights(self) -> list[float]:
        """ω at step 0 (mutual learning)."""
        from cachekd.cohort.weights import initial_weights

        m = self.mutual
        assert m is not None
        n, f = len(self.peers), len(m.fixed_peers)
        fixed = m.fixed_weights if m.fixed_weights is not None else [1.0 / (n + f)] * f
        return initial_weights(n, fixed, m.initial_weights)


LENGTH_KEYS = ("epochs", "max_steps", "max_time_s")
"""optim keys that only the cohort sets: every peer runs the same steps on the same batches."""

PEER_SECTIONS = ("model", "optim", "distill")
"""What a peer takes from its `config` (a preset or YAML file): the rest is the cohort's."""


def load_cohort_config(data: dict[str, Any]) -> CohortConfig:
    """CohortConfig from a YAML mapping; refuses unknown keys and bad values with one sentence."""
    from cachekd.config import from_dict

    return from_dict(CohortConfig, data, "cohort")


def peer_mapping(cohort: CohortConfig, index: int) -> dict[str, Any]:
    """The run config (as a YAML mapping) of peer `index`: its preset's model/optim/distill, the cohort's optim
    and the peer's own settings over it, and the cohort's data, order seed, length and runtime options."""
    from pathlib import Path

    from cachekd.config import deep_merge, load_yaml
    from cachekd.errors import CachekdError

    peer = cohort.peers[index]
    base = load_yaml(peer.config) if peer.config else {}
    optim = {k: v for k, v in dict(base.get("optim") or {}).items() if k not in LENGTH_KEYS}
    optim = deep_merge(deep_merge(optim, cohort.optim), peer.optim)
    distill = None
    if cohort.mutual is None:
        if peer.distill is not None or base.get("distill") is not None:
            distill = deep_merge(dict(base.get("distill") or {}), peer.distill or {})
            if distill.get("cache") not in (None, cohort.cache):
                raise CachekdError(f"peer {peer.name!r} names its own cache; a cohort reads one (set the cohort's cache).")
            distill["cache"] = cohort.cache
    return {
        "name": peer.name, "output": str(Path(cohort.output) / PEERS_DIR / peer.name),
        "seed": peer.seed if peer.seed is not None else cohort.seed + index,
        "device": cohort.device, "precision": cohort.precision,
        "model": deep_merge(dict(base.get("model") or {}), peer.model),
        "data": {**cohort.data, "order_seed": cohort.seed}, "optim": optim, "distill": distill,
        "log_every": cohort.log_every, "eval_every": cohort.eval_every, "save_every": cohort.save_every,
        "keep_checkpoints": cohort.keep_checkpoints, "tensorboard": cohort.tensorboard,
    }


def peer_configs(cohort: CohortConfig) -> list[Any]:
    """Every peer's `TrainConfig` (checked like any run's config: a bad value names the peer)."""
    from cachekd.errors import CachekdError
    from cachekd.train_config import load_train_config

    out = []
    for i, p in enumerate(cohort.peers):
        try:
            out.append(load_train_config(peer_mapping(cohort, i)))
        except (CachekdError, ValueError) as e:
            raise CachekdError(f"peer {p.name!r}: {e}") from None
    return out
