"""A teacher's logits as the product of two factors: what a factored cache stores, and rebuilding the logits.

A causal LM's logits are linear in one vector, the input h of its output layer (after the final norm):
``z = W·h + b`` with W (V, d) and b (V,) the weight and bias of ``model.get_output_embeddings()``. A factored cache
stores h per position (d numbers) and W, b once; training multiplies them back (`rebuild_logits`) a chunk of rows
at a time, so every objective, temperature, mixing and combination of teachers sees the teacher's full logits
without the teacher model.

* `output_layer` reads W, b (rows beyond the store's vocabulary dropped) and refuses, in one sentence, a teacher
  whose logits are not that product (soft-capping, a logit scale, no linear output layer).
* `capture_hidden` records h with a forward hook on the output layer (Llama, GPT-2 with tied weights, heads with a
  bias alike); `check_linear` compares ``W·h + b`` with the model's own logits on the first windows, which catches
  what the configuration does not say.
* `fit_dim_scale`: a power of two per dimension of h, folded into W (exactly: powers of two), so that outlier
  dimensions do not take the range of the one int8 scale a position (`cachekd.cache.encoding.encode_hidden`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cachekd.errors import ConfigKeysError

NONLINEAR_CONFIG = {
    "final_logit_softcapping": "soft-caps its logits (config final_logit_softcapping)",
    "attn_logit_softcapping": None,  # attention only: harmless
    "logit_scale": "multiplies its logits by a logit_scale",
    "logits_scaling": "divides its logits by logits_scaling",
    "output_multiplier_scale": "multiplies its logits by output_multiplier_scale",
}
"""Configuration entries that make logits other than W·h + b, and how a refusal names them (None: harmless)."""

LINEAR_TOLERANCE = {"float32": 1e-3, "reduced": 3e-2}
"""`check_linear`: the largest |W·h + b − z| allowed, relative to 1 + max |z|, for a teacher run in float32 and in
bf16/fp16 autocast (whose logits are rounded to 8 or 11 significant bits and computed from rounded inputs)."""


@dataclass
class OutputLayer:
    """A teacher's output layer over the store's vocabulary: ``weight`` (V, d) float32, ``bias`` (V,) float32 or
    None."""

    weight: Tensor
    bias: Tensor | None

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def folded(self, dim_scale: Tensor) -> "OutputLayer":
        """The layer that takes h / dim_scale: W·diag(dim_scale) (exact for powers of two), the same bias."""
        return OutputLayer(self.weight * dim_scale.to(self.weight), self.bias)


def nonlinear_reason(model: torch.nn.Module) -> str | None:
    """Why the model's logits are not W·h + b of its output layer, from its configuration (None: nothing says so)."""
    config = getattr(model, "config", None)
    for key, why in NONLINEAR_CONFIG.items():
        value = getattr(config, key, None)
        if why is None or value is None or value is False:
            continue
        if key == "logit_scale" and float(value) == 1.0:
            continue
        if key in ("logits_scaling", "output_multiplier_scale") and float(value) == 1.0:
            continue
        return why
    return None


def output_layer(model: torch.nn.Module, vocab_size: int, name: str) -> OutputLayer:
    """Teacher `name`'s output layer over the first `vocab_size` outputs, float32 on the model's device; a teacher
    whose logits are not linear in its output layer's input is refused in one sentence.

    An ensemble by logits (`teachers.EnsembleTeacher`, combine "logits") is linear in its members' inputs side by side:
    Σ w_i (W_i h_i + b_i) = [w_1 W_1, w_2 W_2, ...]·[h_1; h_2; ...] + Σ w_i b_i (its log-probabilities differ from that
    by a constant a position, which the softmax removes), so its layer is the members' layers concatenated."""
    members = _members(model)
    if members is not None:
        if getattr(model, "combine", None) != "logits":
            raise ConfigKeysError("teacher {name!r} mixes its members' probabilities, which is not linear in their "
                                  "output layers' inputs, so it cannot be cached factored; use {ensemble} logits, or "
                                  "cache the members factored and combine them at training time "
                                  "({distill.teacher_combine} probs).", name=name)
        layers = [output_layer(m, vocab_size, name) for m in members]
        weights = [float(w) for w in model.weights]
        biases = [w * layer.bias for w, layer in zip(weights, layers) if layer.bias is not None]
        return OutputLayer(torch.cat([w * layer.weight for w, layer in zip(weights, layers)], dim=1),
                           sum(biases) if biases else None)
    why = nonlinear_reason(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if why is None and (not isinstance(weight, Tensor) or weight.dim() != 2 or not isinstance(head, torch.nn.Linear)):
        why = "has no linear output layer (get_output_embeddings)"
    if why is not None:
        raise ConfigKeysError("teacher {name!r} {why}, so its logits are not a linear map of one vector a position "
                              "and cannot be cached factored; use another storage option (e.g. {full} or the "
                              "default).", name=name, why=why)
    bias = getattr(head, "bias", None)
    return OutputLayer(weight.detach()[:vocab_size].float(),
                       None if bias is None else bias.detach()[:vocab_size].float())


def _members(model: torch.nn.Module) -> list[torch.nn.Module] | None:
    """The member models of an ensemble teacher, None for a single model."""
    members = getattr(model, "members", None)
    return list(members) if isinstance(members, torch.nn.ModuleList) else None


class _Capture:
    """The inputs of the output layers captured in the last forward: `hidden` (B, T, d), the members' side by side
    for an ensemble."""

    def __init__(self, num: int) -> None:
        self.parts: list[Tensor | None] = [None] * num

    @property
    def hidden(self) -> Tensor | None:
        if any(p is None for p in self.parts):
            return None
        return self.parts[0] if len(self.parts) == 1 else torch.cat([p.float() for p in self.parts], dim=-1)


@contextmanager
def capture_hidden(model: torch.nn.Module) -> Iterator[_Capture]:
    """Within the block, ``.hidden`` is the input of the model's output layer in its last forward (B, T, d) (an
    ensemble's: its members' concatenated, the order of `output_layer`'s columns)."""
    models = _members(model) or [model]
    got = _Capture(len(models))

    def hook_for(i: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            got.parts[i] = x.detach()
        return hook

    handles = [m.get_output_embeddings().register_forward_pre_hook(hook_for(i), with_kwargs=True)
               for i, m in enumerate(models)]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def logit_error(rebuilt: Tensor, logits: Tensor) -> Tensor:
    """(...,) max over the vocabulary of |rebuilt − logits| after removing their mean difference a position: a
    constant a position changes no softmax (an ensemble's logits are log-probabilities)."""
    diff = rebuilt.float() - logits.float()
    return (diff - diff.mean(-1, keepdim=True)).abs().amax(-1)


def rebuild_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``hidden @ weight.T + bias`` in the dtype of `hidden` (float32, or float64 for references):
    (..., d) → (..., V)."""
    return F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))


def fit_dim_scale(hidden: Tensor) -> Tensor:
    """(d,) float32 powers of two near each dimension's root mean square over the positions of `hidden` (..., d);
    1 for a dimension that is zero everywhere. Dividing h by it (exact) puts every dimension in about the same
    range."""
    h = hidden.detach().float().reshape(-1, hidden.shape[-1])
    rms = h.pow(2).mean(0).sqrt()
    exponent = torch.where(rms > 0, torch.round(torch.log2(rms.clamp_min(1e-30))), torch.zeros_like(rms))
    return torch.exp2(exponent.clamp(-60, 60)).float()


ROUNDING_DAMPING = 1e-2
"""`rounding_matrix` adds this share of H's mean diagonal to its diagonal before inverting (GPTQ's damping; the
measured KL moved by < 2% between 1e-3 and 1e-1)."""


def rounding_matrix(weight: Tensor, probs: Tensor) -> Tensor:
    """(w, w) float32: the upper Cholesky factor of H⁻¹ that int8 rounding with feedback takes
    (`cachekd.cache.encoding.encode_hidden`), for the stored output layer `weight` (V, w) and `probs` (V,) the
    teacher's mean probabilities on a sample. H = Wᵀ(diag(p̄) − p̄p̄ᵀ)W is the curvature of the KL in h at p̄: a
    logit error δz costs about ½·Var_p(δz), and a constant added to every logit nothing."""
    w = weight.double()
    p = probs.double().to(w.device)
    centred = w - p @ w
    h = centred.T @ (p.unsqueeze(1) * centred)
    h = h + ROUNDING_DAMPING * h.diagonal().mean().clamp_min(1e-30) * torch.eye(h.shape[0], dtype=h.dtype,
                                                                                    device=h.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()


DIM_SCALE_EXPONENTS = (0.0, 0.5, 1.0)
"""`choose_dim_scale` tries dim_scale = rms^a (rounded to powers of two) for each a: 0 (no scale) rounds every
dimension with the same step, which was best on a trained LLaMA without outliers (KL 2.3e-6 against 3.3e-6 for
a = 1, with feedback); a = 1 equalises the dimensions, which an outlier dimension needs."""


CHOICE_POSITIONS = 4096
"""`choose_dim_scale` compares the candidates on at most this many positions of its sample (the first ones)."""


def mean_probs(logits: Tensor) -> Tensor:
    """(V,) float64 sum over the positions of softmax(logits) (..., V), to be divided by their number: p̄."""
    return torch.softmax(logits.float().reshape(-1, logits.shape[-1]), -1).double().sum(0)


def choose_dim_scale(hidden: Tensor, layer: "OutputLayer", probs: Tensor, dtype: str, feedback: bool = True
                     ) -> tuple[Tensor, Tensor | None]:
    """(dim_scale (w,), rounding matrix (w, w) or None) for storing `hidden` (..., w) through `layer`: for int8,
    of the candidates rms^a (`DIM_SCALE_EXPONENTS`, powers of two) the one whose stored sample (its first
    `CHOICE_POSITIONS`) rebuilds the logits closest (mean KL to the unrounded W·h + b), with its `rounding_matrix`
    for `probs` (V,) the teacher's mean probabilities; for bf16/fp16 (relative rounding: the scale only keeps fp16
    in range) a = 1 and no matrix; without `feedback` (nearest rounding) no matrix either."""
    from cachekd.cache.encoding import decode_hidden, encode_hidden

    h = hidden.detach().float().reshape(-1, hidden.shape[-1])
    rms_scale = fit_dim_scale(h)
    if dtype != "int8":
        return rms_scale, None
    h = h[:CHOICE_POSITIONS]
    exact = rebuild_logits(h.double(), layer.weight.double(), layer.bias)
    best = None
    for a in DIM_SCALE_EXPONENTS:
        scale = torch.exp2(torch.round(torch.log2(rms_scale) * a))
        folded = layer.folded(scale)
        u = rounding_matrix(folded.weight, probs) if feedback else None
        e = encode_hidden(h / scale, "int8", u)
        got = rebuild_logits(decode_hidden(e["hidden"], e["hidden_scale"], "int8", torch.float64),
                             folded.weight.double(), layer.bias)
        kl = float(kl_rows(exact, got).mean())
        if best is None or kl < best[0]:
            best = (kl, scale, u)
    return best[1], best[2]


def fit_basis(hidden: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(mean (d,), basis (d, rank)) float32: the mean of the sample `hidden` (n, d) and its `rank` principal
    directions (eigenvectors of the covariance with the largest eigenvalues, in float64, each signed so that its
    largest component is positive: the same sample gives the same basis)."""
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    mean = h.mean(0)
    x = h - mean
    cov = x.T @ x / max(h.shape[0] - 1, 1)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    basis = vectors[:, -rank:].flip(-1)
    sign = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    return mean.float(), (basis * sign).float()


def project(hidden: Tensor, mean: Tensor, basis: Tensor) -> Tensor:
    """(..., d) → (..., r) the coefficients Uᵀ(h − μ) of h on the basis, in h's dtype (float32 at least)."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    return (hidden.to(dtype) - mean.to(dtype)) @ basis.to(dtype)


def check_linear(name: str, logits: Tensor, rebuilt: Tensor, reduced: bool) -> None:
    """Refuse teacher `name` when the logits rebuilt from h (float32) differ from its own `logits` by more than
    `LINEAR_TOLERANCE` (`reduced`: it ran in bf16/fp16 autocast): something between its output layer and its
    logits (a scale, a cap, another head) that a factored cache cannot reproduce."""
    z = logits.float()
    err = float(logit_error(rebuilt, z).max())
    bound = LINEAR_TOLERANCE["reduced" if reduced else "float32"] * (1.0 + float(z.abs().max()))
    if not err <= bound:
        raise ConfigKeysError(
            "teacher {name!r} computes logits that differ from its output layer's W·h + b by up to {err:.3g} (more "
            "than {bound:.3g}) on the first windows, so they cannot be cached factored; use another storage option "
            "(e.g. {full} or the default).", name=name, err=err, bound=bound)


def kl_rows(z_ref: Tensor, z: Tensor, tau: float = 1.0) -> Tensor:
    """(...,) KL(softmax(z_ref/τ) ‖ softmax(z/τ)) per position, in the dtype of the inputs (float64 for reports)."""
    lp = torch.log_softmax(z_ref / tau, dim=-1)
    lq = torch.log_softmax(z / tau, dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def entropy_rows(z: Tensor) -> Tensor:
    """(...,) the entropy of softmax(z) per position (float32)."""
    lp = torch.log_softmax(z.float(), dim=-1)
    return -(lp.exp() * lp).sum(-1)


def bytes_per_position(hidden_size: int, dtype: str) -> int:
    """Stored bytes of h a position before compression: d + 4 for int8 (codes and one float32 scale), 2d else."""
    return hidden_size + 4 if dtype == "int8" else 2 * hidden_size



def block_logits(cache, teacher: str, block, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Tensor:
    """(n, L, V) the logits a factored cache holds for a decoded block of its windows (`LogitCache.read`'s
    `TeacherBlock`), rebuilt from the stored h and the cached output layer in `dtype` on `device`: what verify,
    audit and eval compare with a live teacher or a student."""
    from cachekd.cache.encoding import decode_hidden

    f = cache.factors(teacher)
    scale = None if block.hidden_scale is None else torch.from_numpy(block.hidden_scale).to(device)
    h = decode_hidden(torch.from_numpy(block.hidden).to(device), scale, cache.plan.factored_dtype, dtype)
    bias = torch.from_numpy(f["bias"]).to(device) if "bias" in f else None
    return rebuild_logits(h, torch.from_numpy(f["weight"]).to(device), bias)


def rounding_bound(cache, teacher: str, block) -> np.ndarray:
    """(n, L, V) float64: how far a rebuilt logit can be from W·h + b through the storage of h alone: Σ_d |W'_vd|·e_d
    with e_d `INT8_FEEDBACK_STEPS` int8 steps of the position (int8 rounded with feedback; half a step without), or
    the relative rounding of bf16 (2⁻⁸) or fp16 (2⁻¹¹) of the stored value."""
    from cachekd.cache.encoding import INT8_FEEDBACK_STEPS, decode_hidden

    factors = cache.factors(teacher)
    w = np.abs(factors["weight"].astype(np.float64))  # (V, d)
    dtype = cache.plan.factored_dtype
    if dtype == "int8":
        steps = INT8_FEEDBACK_STEPS if "rounding" in factors else 0.5
        return (block.hidden_scale.astype(np.float64) * steps)[..., None] * w.sum(-1)
    h = decode_hidden(torch.from_numpy(block.hidden), None, dtype, torch.float64).numpy()
    return np.abs(h) @ w.T * (2.0 ** -8 if dtype == "bf16" else 2.0 ** -11)
