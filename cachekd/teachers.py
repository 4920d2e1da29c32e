"""Teachers: where they are (resolution), loading them, the one tokenizer/vocabulary check, and the teacher
signal a training step asks for (`TeacherSource`).

* Resolution (`resolve_teachers`): a teacher spec is an HF checkpoint directory, a `cachekd train` run directory
  (its ``model/``), a name from the registry file (``cachekd.yaml``'s ``teachers:`` mapping, or
  ``$CACHEKD_REGISTRY``), or ``NAME=PATH``.
* `TokenStore.check_tokenizer` is the single rule for "does this tokenizer / vocabulary fit that token store": the
  same tokenizer fingerprint, and at least the store's vocabulary. Teachers (`check_teacher`), evaluated models and
  logit caches all go through it; each caller words the refusal for its user.
* `TeacherSource` gives the loss targets of a micro-batch: `CachedTeachers` reads them from a logit cache (the
  loader brings them aligned with the tokens), `OnlineTeachers` runs live teacher models (``--online``). A cohort
  of students shares one source.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from cachekd.errors import CachekdError, ConfigKeysError, KeyedText

if TYPE_CHECKING:
    from cachekd.batch import Batch
    from cachekd.cache.reader import LogitCache
    from cachekd.losses import Target
    from cachekd.tokens import TokenStore
    from cachekd.train_config import DistillConfig


# ------------------------------------------------------------------------------------------ the check


def has_tokenizer(model_dir: Path) -> bool:
    """Whether a checkpoint directory carries its tokenizer."""
    return (model_dir / "tokenizer.json").exists() or (model_dir / "tokenizer_config.json").exists()


def tokenizer_fingerprint_of(model_dir: Path) -> str | None:
    """The fingerprint of the tokenizer saved with a checkpoint, or None when it has none."""
    from cachekd.corpus import load_tokenizer, tokenizer_fingerprint

    return tokenizer_fingerprint(load_tokenizer(model_dir)) if has_tokenizer(model_dir) else None


# ------------------------------------------------------------------------------------------ resolution


def load_registry(path: str | None) -> dict[str, str]:
    """Teacher names → checkpoint paths from a registry YAML (``teachers:``); paths are relative to its folder.
    Without `path`: ``$CACHEKD_REGISTRY`` or ./cachekd.yaml when present, else no names."""
    import yaml

    p = Path(path) if path else Path(os.environ.get("CACHEKD_REGISTRY", "cachekd.yaml"))
    if not p.exists():
        if path:
            raise CachekdError(f"registry {str(p)!r} does not exist.")
        return {}
    data = yaml.safe_load(p.read_text()) or {}
    teachers = data.get("teachers", {}) if isinstance(data, dict) else {}
    if not isinstance(teachers, dict):
        raise CachekdError(f"registry {str(p)!r}: `teachers` must map names to checkpoint paths.")
    base = p.parent
    return {str(k): str(v if Path(v).is_absolute() else base / v) for k, v in teachers.items()}


def _unique_name(name: str, explicit: bool, spec: str, taken: list[str]) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    if explicit and name in taken:
        raise CachekdError(f"the teacher name {name!r} is given twice ({spec!r}); give each teacher its own name.")
    if name in taken:  # two directories with the same folder name: number the second
        i = 2
        while f"{name}-{i}" in taken:
            i += 1
        name = f"{name}-{i}"
    return name


def resolve_teachers(specs: list[str], registry: str | None = None) -> list[tuple[str, Path]]:
    """Teacher specs → unique (name, checkpoint directory) pairs; one checkpoint directory given twice is refused."""
    from cachekd.models import resolve_model_dir

    if not specs:
        raise ConfigKeysError("no teacher given: pass {teachers} PATH (or a name from the registry).")
    reg = None
    out: list[tuple[str, Path]] = []
    given: dict[Path, str] = {}  # resolved checkpoint directory -> the spec that named it
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
        if not Path(path).exists():
            reg = load_registry(registry) if reg is None else reg
            if path in reg:
                name, path = name or path, reg[path]
            else:
                known = f" (registered: {', '.join(sorted(reg))})" if reg else " and no registry (cachekd.yaml) lists it"
                raise CachekdError(f"teacher {spec!r} is neither a checkpoint directory nor a registered name{known}.")
        d = resolve_model_dir(path)
        if d.resolve() in given:
            raise CachekdError(
                f"teacher {spec!r} is the same checkpoint as teacher {given[d.resolve()]!r} ({str(d.resolve())!r}); "
                f"pass each teacher once."
            )
        given[d.resolve()] = spec
        explicit = bool(name)
        if not name:
            name = (d.parent.name if d.name == "model" else d.name) or "teacher"
        out.append((_unique_name(name, explicit, spec, [n for n, _ in out]), d))
    return out


# ---------------------------------------------------------------------------------------------- loading


PADDING_MASS_LIMIT = 1e-3
"""The most probability (mean over the probed positions) a teacher's extra output rows may carry to count as
padding when no tokenizer shows what they are. Dropping rows of mass m and renormalising moves the teacher's
distribution by KL(p_kept ‖ p) = −log(1 − m) ≈ m nats: at 1e-3, about the cache's own storage error of a
log-probability (2⁻¹⁰ ≈ 9.8e-4 nats at the default --logprob-step)."""

PADDING_PROBE_WINDOWS = 8
"""Windows from the start of the store's train split on which the extra rows' mass is measured."""


def padding_mass(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The probability each position puts on the outputs at or beyond `vocab_size`: logits (..., V_model) → (...),
    computed in float32 as exp(logsumexp(z[vocab_size:]) − logsumexp(z))."""
    z = logits.float()
    return torch.exp(torch.logsumexp(z[..., vocab_size:], dim=-1) - torch.logsumexp(z, dim=-1))


def _probe_padding(model, store: TokenStore) -> tuple[float, int]:
    """(mean padding mass, windows probed) of `model` on the first windows of the store's train split."""
    import numpy as np

    split = "train" if "train" in store.splits() else store.splits()[0]
    n = min(PADDING_PROBE_WINDOWS, store.num_windows(split))
    device = next(model.parameters()).device  # a student's model is already on its device
    x = torch.from_numpy(store.read(split, 0, n).astype(np.int64)).to(device)
    training = model.training
    with torch.inference_mode():
        logits = model.eval()(input_ids=x, use_cache=False).logits  # (n, L, V_model)
    model.train(training)
    return float(padding_mass(logits, store.vocab_size).double().mean()), n


def check_vocabulary(label: str, path: Path, model, store: TokenStore, *, tokenizer_error: Callable[[str], str],
                     vocab_error: Callable[[int], str], advice: str,
                     say: Callable[[str], None] | None = None) -> tuple[int, float | None]:
    """The single check of a checkpoint's tokenizer and output rows against a token store (`label` names it in the
    sentences: "teacher 'a'", "peer 'p' (model.init_from)"): its saved tokenizer, if any, must be the store's and
    it must have at least the store's vocabulary of outputs (`TokenStore.check_tokenizer`, worded by
    `tokenizer_error` / `vocab_error`). Without a tokenizer, what can be checked is said or refused: extra output
    rows are measured on the store's first windows (`padding_mass`) and refused as real tokens above
    `PADDING_MASS_LIMIT` (`advice` says what to do), else `say` is told they are dropped; a vocabulary of exactly
    the store's size is accepted with a note that only its size was checked. Returns (output rows, padding mass
    or None when not measured)."""
    from cachekd.models import output_size

    v_model = output_size(model)
    fingerprint = tokenizer_fingerprint_of(path)
    store.check_tokenizer(fingerprint=fingerprint, vocab_size=v_model, tokenizer_error=tokenizer_error,
                          vocab_error=vocab_error)
    extra = v_model - store.vocab_size
    if fingerprint is not None:
        return v_model, None
    if extra == 0:
        if say is not None:
            say(f"note: {label} has no tokenizer in {str(path)!r}, so only its vocabulary size ({v_model}, the token "
                f"store's) was checked, not that it was trained with the store's tokenizer (save that tokenizer next "
                f"to it to have it checked).")
        return v_model, None
    mass, n = _probe_padding(model, store)
    what = (f"{label} has {v_model} outputs, {extra} more than the token store's vocabulary of "
            f"{store.vocab_size}, and no tokenizer in {str(path)!r} to show they are padding; on the store's "
            f"first {n} windows they carry {mass:.3g} of the probability (mean over positions)")
    if not mass <= PADDING_MASS_LIMIT:
        raise CachekdError(f"{what}, more than the {PADDING_MASS_LIMIT:g} padding may carry, so they are real tokens; "
                           f"{advice}.")
    if say is not None:
        say(f"note: {what} (at most {PADDING_MASS_LIMIT:g} for padding), so they are dropped as padding.")
    return v_model, mass


def check_teacher(name: str, path: Path, model, store: TokenStore,
                  say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The single check of a teacher against a token store, before it computes anything: its tokenizer, its
    vocabulary (at least the store's; `check_vocabulary`) and its positions (at least the store's window) must
    fit; returns what the cache manifest and run summary record about it.

    Extra output rows beyond the store's vocabulary are dropped as padding. With the store's tokenizer saved next
    to the teacher that is certain; without one, the rows' probability mass is measured on the store's first
    windows (`padding_mass`): above `PADDING_MASS_LIMIT` they are refused as real tokens, below it `say` is told
    that they are dropped."""
    from cachekd.models import check_positions, checkpoint_fingerprint, count_parameters
    from cachekd.tokens.reader import PREPARE_WITH_TOKENIZER

    v_model, mass = check_vocabulary(
        f"teacher {name!r}", path, model, store, say=say,
        tokenizer_error=lambda fp: (f"teacher {name!r} comes with a different tokenizer than the token store "
                                    f"{str(store.path)!r}; prepare the store with its tokenizer "
                                    f"({PREPARE_WITH_TOKENIZER.format(path=path)}) or use a matching teacher."),
        vocab_error=lambda v: (f"teacher {name!r} has a vocabulary of {v} tokens but the token store's tokenizer has "
                               f"{store.vocab_size}; use a teacher trained with this tokenizer."),
        advice="use the teacher trained with this store's tokenizer (and save that tokenizer next to it)")
    check_positions(model, store.seq_len, f"teacher {name!r}")
    extra = v_model - store.vocab_size
    return {
        "name": name,
        "path": str(path.resolve()),
        "fingerprint": checkpoint_fingerprint(path),
        "model_type": getattr(model.config, "model_type", type(model).__name__),
        "num_params": count_parameters(model),
        "model_vocab_size": v_model,
        "padded_logits_dropped": extra,
        "padding_mass": mass,
    }


def load_teachers(specs: list[str], store: TokenStore, registry: str | None = None,
                  say: Callable[[str], None] | None = None) -> list[tuple[Any, Path, dict[str, Any]]]:
    """Resolve, load and check each teacher: [(model on the CPU, checkpoint directory, `check_teacher` info)]. Two
    specs naming the same checkpoint (identical config and weights) are refused; `say` receives notes for the user
    (extra output rows dropped as padding)."""
    from cachekd.models import load_model

    loaded: list[tuple[Any, Path, dict[str, Any]]] = []
    for name, path in resolve_teachers(specs, registry):
        m = load_model(path)
        info = check_teacher(name, path, m, store, say)
        for _, _, prev in loaded:
            if prev["fingerprint"] == info["fingerprint"]:
                raise CachekdError(
                    f"teachers {prev['name']!r} ({prev['path']!r}) and {name!r} ({info['path']!r}) are the same "
                    f"checkpoint (identical config and weights); pass each teacher once."
                )
        loaded.append((m, path, info))
    return loaded


class EnsembleTeacher(torch.nn.Module):
    """Member models → one model whose ``logits`` (B, T, V) are the combined log-probabilities over the store's
    vocabulary (members' extra output rows, already checked to be padding, are dropped first): the teacher of a
    `precompute --ensemble` cache (`cachekd.ensemble`)."""

    def __init__(self, members: list[torch.nn.Module], weights: list[float], combine: str, vocab_size: int) -> None:
        """`weights`: normalised, one per member (`ensemble.ensemble_info` records them so)."""
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.weights = list(weights)
        self.combine = combine
        self.vocab_size = vocab_size

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> SimpleNamespace:
        logps = [torch.log_softmax(m(input_ids=input_ids, **kwargs).logits[..., : self.vocab_size].float(), dim=-1)
                 for m in self.members]
        if self.combine == "logits":
            out = sum(w * lp for w, lp in zip(self.weights, logps) if w > 0)
        else:
            out = torch.logsumexp(torch.stack([lp + math.log(w) for w, lp in zip(self.weights, logps) if w > 0]),
                                  dim=0)
        return SimpleNamespace(logits=out)


# -------------------------------------------------------------------------------------------- sources


class TeacherSource(ABC):
    """The teachers' side of distillation: their names and the loss targets of a micro-batch."""

    names: list[str]
    """One name a teacher, in the order of the targets (and of distill.teacher_weights)."""
    notes: tuple[str, ...] = ()
    """Sentences the user should read before the run starts (e.g. a top-k cache that holds little of the teachers'
    mass at the run's τ); the trainer shows them."""

    @property
    def num_teachers(self) -> int:
        return len(self.names)

    @abstractmethod
    def targets(self, batch: Batch, input_ids: torch.Tensor) -> list[Target]:
        """One target a teacher for the micro-batch `input_ids` (B, T); `batch.teachers` holds what the loader
        read from a cache for these rows."""

    @abstractmethod
    def summary(self) -> dict[str, Any]:
        """What the run summary records: ``cache``, ``teachers`` and (online) ``online_teachers``."""


class CachedTeachers(TeacherSource):
    """Targets read from a logit cache: sparse (top-k + tail_lse), sampled or hybrid (drawn ids with their weights),
    full logits, or factored (the output layer's input, and the layer held on the training device once)."""

    def __init__(self, cache: LogitCache, names: list[str], cache_spec: str, temperature: float = 1.0,
                 captured_mass: dict[str, float] | None = None, notes: tuple[str, ...] = (),
                 tail_index: int | None = None):
        self.cache, self.names, self.cache_spec = cache, names, cache_spec
        self.temperature = temperature  # the loss τ (sampled caches build their targets at it)
        self.captured_mass = captured_mass or {}
        """Per teacher, the mean share of its probability at the run's τ that the cached top-k holds (top-k caches)."""
        self.notes = notes
        self.tail_index = tail_index
        """Which stored tail_lse (temperature) the targets use: top-k caches; None for full logits and for sampled caches
        (their targets pick the loss τ's and the proposal's normalisers themselves)."""
        self._layers: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]] = {}
        """A factored cache's output layers on the training device, by (teacher, device): moved there once."""

    def output_layer(self, teacher: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (V, d), bias (V,) or None), float32 on `device`: a factored cache's layer of `teacher`, with its
        per-dimension scale folded in (it multiplies the stored h / dim_scale)."""
        key = (teacher, str(device))
        if key not in self._layers:
            f = self.cache.factors(teacher)
            self._layers[key] = (torch.from_numpy(f["weight"]).to(device),
                                 None if f.get("bias") is None else torch.from_numpy(f["bias"]).to(device))
        return self._layers[key]

    @classmethod
    def open(cls, d: DistillConfig, store: TokenStore) -> CachedTeachers:
        """The cache of distill config `d` for `store`, refusing settings it cannot serve (a temperature it has no
        tail_lse for, a schedule of τ with a top-k cache, mixing or combining top-k teachers with the renormalize
        tail)."""
        from cachekd.cache.reader import LogitCache

        if not d.cache:
            raise ConfigKeysError("distillation needs {distill.cache} (or {distill.online} with {distill.teachers} "
                                  "checkpoints).")
        cache = LogitCache.open(d.cache)
        cache.check_store(store)
        names = cache.select_teachers(d.teachers)
        check_teacher_count(d, names)
        if "train" not in cache.splits():
            raise CachekdError(f"cache {d.cache!r} has no train split.")
        tau = float(d.schedules()[0].start)
        if cache.mode == "sampled":
            _check_sampled_settings(cache, d)
        if cache.mode != "topk":
            return cls(cache, names, d.cache, tau)
        _check_topk_settings(cache, d, len(names))  # a top-k cache takes a constant τ only
        mass = {t: cache.captured_topk_mass(t, tau) for t in names}
        notes = tuple(low_topk_mass_note(cache, t, tau, m, where, d.tail_mode) for t, (m, where) in mass.items()
                      if m < LOW_TOPK_MASS and d.tail_mode != "renormalize")
        return cls(cache, names, d.cache, tau, {t: m for t, (m, _) in mass.items()}, notes,
                   tail_index=cache.temperature_index(tau))

    def temperature_index(self, tau: float) -> int | None:
        """Which stored tail_lse the loader reads (top-k caches), None for full logits and sampled caches (their
        targets need the normalisers of the loss τ and of the proposal: `targets` picks them)."""
        return self.cache.temperature_index(tau) if self.cache.mode == "topk" else None

    def targets(self, batch: Batch, input_ids: torch.Tensor) -> list[Target]:
        from cachekd.batch import CachedFactored, CachedLogits, CachedSampled
        from cachekd.cache.encoding import decode_hidden
        from cachekd.losses import DenseTarget, FactoredTarget, SparseTarget

        out: list[Target] = []
        for t in self.names:
            cached = batch.teachers[t]
            if isinstance(cached, CachedLogits):
                out.append(DenseTarget(cached.logits))
                continue
            if isinstance(cached, CachedFactored):  # the loss forms the logits a chunk of rows at a time
                weight, bias = self.output_layer(t, cached.hidden.device)
                hidden = decode_hidden(cached.hidden, cached.hidden_scale, self.cache.plan.factored_dtype)
                out.append(FactoredTarget(hidden, weight, bias))
                continue
            if isinstance(cached, CachedSampled):
                from cachekd.teacher_samples import target_at

                spec = self.cache.plan.sample_spec
                out.append(target_at(cached, self.cache.temperatures, self.temperature, spec.proposal_temperature,
                                     rounding=self.cache.plan.rounding, vocab_size=self.cache.vocab_size))
                continue
            tail = cached.tail_lse
            if tail.dim() == cached.ids.dim():  # (B, T, n_τ): the loader kept every temperature (a cohort's stream)
                tail = tail[..., self.tail_index]
            # The cache's τ=1 log-probabilities serve as the target's logits: a softmax is shift-invariant, so
            # log-probabilities are logits (up to a constant per position that cancels).
            out.append(SparseTarget(ids=cached.ids, logits=cached.logprobs, tail_lse=tail))
        return out

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cache": self.cache_spec, "teachers": self.names}
        if self.captured_mass:
            out["captured_topk_mass"] = {t: round(m, 5) for t, m in self.captured_mass.items()}
        if self.cache.mode == "sampled":
            out["storage_kind"] = self.cache.plan.storage_kind
            out["note"] = SAMPLED_TAIL_NOTE
        if self.cache.mode == "factored":
            out["storage_kind"] = self.cache.plan.storage_kind
        return out


LOW_TOPK_MASS = 0.5
"""Below this mean captured top-k mass at the run's τ, `distill` says at start that the target passes on little
(with the bucket or uniform tail). Why half: measured on real text (DESIGN, "Fidelity"), top-64 students with the
bucket tail kept 33% of the full-teacher gain over CE where the top-k held 53% of the mass (τ=1) and 5% where it
held 12% (τ=2): below half, most of what the teacher knows is in the tail the cache does not store."""


def low_topk_mass_note(cache: LogitCache, teacher: str, tau: float, mass: float, where: str,
                       tail_mode: str) -> KeyedText:
    """The sentence `distill` shows at start when a teacher's cached top-k holds less than `LOW_TOPK_MASS` of its
    probability at τ (`where`: how the mass was found)."""
    what = ("one tail category" if tail_mode == "bucket" else
            "the rest spread evenly over the other tokens" if tail_mode == "uniform" else f"the {tail_mode} tail")
    source = "from the cache manifest" if where == "manifest" else f"from a {where}"
    return KeyedText(
        "note: the cached top-{k} holds {mass:.2f} of the probability of teacher {teacher!r} at τ={tau:g} (mean over "
        "the train split, {source}), below {limit:g}: with tail_mode {tail_mode} the target is mostly {what}, so it "
        "passes on little of the teacher and the student may do no better than cross-entropy. Options: a larger k "
        "(`cachekd precompute` with a larger {precompute.top_k}), another tail mode ({distill.tail_mode} renormalize "
        "keeps the shape of the top-k, biased), a lower τ (the captured mass falls as τ grows), or a hybrid or "
        "sampled cache (what `cachekd precompute` makes without {precompute.top_k}: unbiased forward-KL targets that "
        "kept about the whole full-teacher gain in the fidelity figures of docs/sampled-caches.md).", k=cache.k,
        mass=mass, teacher=teacher, tau=tau, source=source, limit=LOW_TOPK_MASS, tail_mode=tail_mode, what=what)


SAMPLED_TAIL_NOTE = ("with a sampled cache forward KL uses the unbiased estimate over the drawn ids, every other "
                     "objective the stored ids plus one bucket of the exact remaining mass; mixing and combining "
                     "teachers by logits or probabilities shape that mass like the student (tail_mode bucket or "
                     "renormalize) or spread it evenly over the other tokens (tail_mode uniform)")


def _check_constant_temperature(cache: LogitCache, d: DistillConfig, what: str) -> None:
    """Refuse a τ schedule, or a τ the cache holds no normaliser for (`what`: "top-k" or "sampled")."""
    temperature = d.schedules()[0]
    if temperature.kind != "constant":
        raise ConfigKeysError("a temperature schedule needs a {precompute.full} cache: a {what} cache only has its "
                              "normalisers for temperatures {temperatures}.", what=what,
                              temperatures=cache.temperatures)
    cache.temperature_index(temperature.start)


def _check_sampled_settings(cache: LogitCache, d: DistillConfig) -> None:
    """Refuse what a sampled cache cannot serve: a τ schedule, a τ it has no normaliser for. (Mixing and combining
    teachers by logits or probabilities take a dense form of the sampled target: `cachekd.losses.api`.)"""
    _check_constant_temperature(cache, d, "sampled")


def _check_topk_settings(cache: LogitCache, d: DistillConfig, num_teachers: int) -> None:
    _check_constant_temperature(cache, d, "top-k")
    if d.mixing() and d.tail_mode == "renormalize":
        raise ConfigKeysError(
            "mixing teacher and student logits (distill.alpha below 1) needs a dense target, which the renormalize "
            "tail cannot give: pass {distill.tail_mode} bucket (the rest shaped like the student) or uniform "
            "(distill.tail_mode).")
    if num_teachers > 1 and d.teacher_combine != "losses" and d.tail_mode == "renormalize":
        raise ConfigKeysError(
            "combining several top-k teachers by {combine} needs a dense target, which the renormalize tail cannot "
            "give: pass {distill.tail_mode} bucket or uniform, or {distill.teacher_combine} losses (distill.tail_mode, "
            "distill.teacher_combine).",
            combine=d.teacher_combine)


class OnlineTeachers(TeacherSource):
    """Live teacher models run on each micro-batch (``--online``): dense targets over the store's vocabulary."""

    def __init__(self, models: list[torch.nn.Module], infos: list[dict[str, str]], vocab_size: int,
                 autocast: Callable[[], AbstractContextManager], cache_spec: str | None = None,
                 notes: tuple[str, ...] = ()):
        self.models, self.infos, self.vocab_size = models, infos, vocab_size
        self.names = [i["name"] for i in infos]
        self._autocast, self.cache_spec, self.notes = autocast, cache_spec, notes

    @classmethod
    def open(cls, d: DistillConfig, store: TokenStore, device: torch.device,
             autocast: Callable[[], AbstractContextManager]) -> OnlineTeachers:
        """The teachers of distill config `d` (its `teachers`, else those its cache was computed from), loaded,
        checked against `store` (`check_teacher`, whose notes on dropped padding become `notes`) and frozen on
        `device`."""
        specs = list(d.teachers)
        if not specs and d.cache:
            from cachekd.cache.reader import LogitCache

            cached = LogitCache.open(d.cache).meta["teachers"]
            if any(t.get("members") for t in cached):
                raise ConfigKeysError(
                    "cache {cache!r} holds an ensemble of teachers (cached as one); to run them live pass each member "
                    "with {distill.teachers} and {distill.teacher_combine} {combine}.", cache=d.cache,
                    combine=cached[0].get("combine", "logits"))
            specs = [t["path"] for t in cached]
        models, infos, notes = [], [], []
        for m, path, info in load_teachers(specs, store, say=notes.append):
            infos.append({"name": info["name"], "path": str(path), "fingerprint": info["fingerprint"]})
            models.append(m.to(device).eval().requires_grad_(False))
        return cls(models, infos, store.vocab_size, autocast, d.cache, tuple(notes))

    def targets(self, batch: Batch, input_ids: torch.Tensor) -> list[Target]:
        from cachekd.losses import DenseTarget

        with torch.inference_mode(), self._autocast():
            outs = [m(input_ids=input_ids).logits[..., :self.vocab_size] for m in self.models]
        return [DenseTarget(o.float().clone()) for o in outs]

    def summary(self) -> dict[str, Any]:
        return {"cache": self.cache_spec, "teachers": self.names or None, "online_teachers": self.infos}


def open_teacher_source(d: DistillConfig, store: TokenStore, *, device: torch.device,
                        autocast: Callable[[], AbstractContextManager]) -> TeacherSource:
    """Cached or online teachers for distill config `d`, with the number of teacher weights checked; what the user
    should read before the run starts is in the source's `notes`."""
    source: TeacherSource
    if d.online:
        source = OnlineTeachers.open(d, store, device, autocast)
    else:
        source = CachedTeachers.open(d, store)
    if d.online:
        check_teacher_count(d, source.names)
    if d.teacher_weights and len(d.teacher_weights) != source.num_teachers:
        raise CachekdError(f"distill.teacher_weights has {len(d.teacher_weights)} weights for "
                           f"{source.num_teachers} teachers.")
    return source


def check_teacher_count(d: DistillConfig, names: list[str]) -> None:
    """Refuse teachers (`names`, as selected from the cache or given) of another number than the config declares
    (`distill.num_teachers`, e.g. a ChooBaCa "one coach" preset on a two-teacher cache), naming the teachers there
    are to choose from."""
    want, have = d.num_teachers, len(names)
    if want is None or have == want:
        return
    where = f"cache {d.cache!r}" if d.cache else "the teacher list"
    given = "{distill.teachers} selects" if d.teachers else "{where} holds"
    choose = ("choose {some} with {distill.teachers} {first} (distill.teachers)" if have > want
              else "use a cache (or {distill.teachers}) with {want}")
    raise ConfigKeysError(
        "this config is written for {want} teacher{s} (distill.num_teachers: {want}) but " + given + " {have}: "
        "{names}; " + choose + ", or set distill.num_teachers=null to use them all (what runs started before "
        "this check did).", want=want, s="s" if want != 1 else "", where=where, have=have, names=", ".join(names),
        some="one" if want == 1 else want, first=",".join(names[:want]))
