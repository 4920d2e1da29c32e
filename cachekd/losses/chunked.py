"""The step-wise (chunked) loss: the rows a chunk at a time, recomputed in backward — or, given the weights the
caller combines the two sums with, their gradients formed in forward in the same pass."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cachekd.losses.plan import Prepared, Rows, take
from cachekd.losses.rowloss import MixedChunks, loss_on_rows


class _Grads:
    """Gradient buffers of (source, weight, bias), filled a chunk at a time from each chunk's gradient G (n, V)
    with respect to its logits: ``G`` (logits source) or ``G @ weight``, ``Gᵀ @ hidden``, ``ΣG`` (projection)."""

    def __init__(self, source: Tensor, weight: Tensor | None, bias: Tensor | None, need: tuple[bool, bool, bool],
                 source_dtype: torch.dtype):
        self.source, self.weight = source, weight
        # Weight and bias gradients accumulate over chunks in at least float32.
        acc = torch.promote_types(weight.dtype, torch.float32) if weight is not None else None
        self.acc = acc
        self.grad_source = torch.zeros_like(source, dtype=source_dtype) if need[0] else None
        self.grad_weight = torch.zeros_like(weight, dtype=acc) if need[1] else None
        self.grad_bias = torch.zeros_like(bias, dtype=acc) if need[2] else None

    def add(self, rows: Rows, grad_z: Tensor) -> None:
        if self.weight is None:
            if self.grad_source is not None:
                self.grad_source[rows] = grad_z.to(self.grad_source.dtype)
            return
        if self.grad_source is not None:
            self.grad_source[rows] = (grad_z.to(self.weight.dtype) @ self.weight).to(self.grad_source.dtype)
        if self.grad_weight is not None:
            self.grad_weight.addmm_(grad_z.to(self.acc).t(), take(self.source, rows).to(self.acc))
        if self.grad_bias is not None:
            self.grad_bias += grad_z.sum(0).to(self.acc)

    def result(self, bias: Tensor | None, scale: float = 1.0) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The gradients times `scale`, each in its input's dtype."""
        def out(g: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
            if g is None:
                return None
            return (g if scale == 1.0 else g * scale).to(dtype)

        return (out(self.grad_source, self.source.dtype),
                out(self.grad_weight, None if self.weight is None else self.weight.dtype),
                out(self.grad_bias, None if bias is None else bias.dtype))


class ChunkedLoss(torch.autograd.Function):
    """(ce_sum, kd_sum) over ``prep.chunks``; backward recomputes each chunk's logits (and, but for the fused
    ChooBaCa plan, its loss).

    ``source`` is (N, V) student logits when ``weight`` is None, else (N, H) hidden states projected by
    ``weight`` (V, H) and ``bias``. Forward keeps its inputs (and, where the plan says ``chunk_state``, O(k)
    statistics a row: ``rowloss.MixedChunks``); backward takes, chunk by chunk, the gradient G (n, V) of
    ``g_ce·ce + g_kd·kd`` with respect to the chunk's recomputed logits (by autograd through the chunk's
    recomputed loss, or from the saved statistics) and writes ``G`` (logits) or ``G @ weight``, ``Gᵀ @ hidden``,
    ``ΣG`` (projection) into full-size gradient buffers.

    With ``grad_weights`` (w_ce, w_kd), the weights the caller will combine the two sums with (their ratio is what
    counts), forward also forms the gradients of ``w_ce·ce + w_kd·kd`` while each chunk's logits and loss are at
    hand (outside the fused ChooBaCa plan, whose gradient needs every chunk's statistics first): the student's
    projection and a factored teacher's rebuild then run once, not again in backward. Backward uses them when the
    incoming (g_ce, g_kd) are in that ratio, and recomputes otherwise. The price is the gradient buffers held from
    forward to backward (N×H and V×H in float32).
    """

    @staticmethod
    def _logits(source: Tensor, weight: Tensor | None, bias: Tensor | None, rows: Rows, dtype: torch.dtype) -> Tensor:
        x = take(source, rows)
        if weight is not None:
            x = F.linear(x, weight, bias)
        return x.to(dtype)

    @staticmethod
    def forward(ctx, source: Tensor, weight: Tensor | None, bias: Tensor | None, prep: Prepared,
                grad_weights: tuple[float, float] | None = None):
        device_type = source.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ce_total = torch.zeros((), dtype=prep.compute_dtype, device=source.device)
        kd_total = torch.zeros((), dtype=prep.compute_dtype, device=source.device)
        mixed = MixedChunks(prep, prep.compute_dtype, source.device) if prep.plan.chunk_state else None
        need = tuple(ctx.needs_input_grad[:3])
        eager = None
        if grad_weights is not None and mixed is None and any(need):
            eager = _Grads(source, weight, bias, need, torch.promote_types(source.dtype, torch.float32))
        for rows in prep.chunks:
            z = ChunkedLoss._logits(source, weight, bias, rows, prep.compute_dtype)
            if mixed is not None:
                mixed.add(z)
                continue
            if eager is None:
                ce, kd = loss_on_rows(z, rows, prep)
            else:
                z = z.detach().requires_grad_(True)
                with torch.enable_grad():
                    ce, kd = loss_on_rows(z, rows, prep)
                    (grad_z,) = torch.autograd.grad(grad_weights[0] * ce + grad_weights[1] * kd, z)
                with torch.autocast(device_type, enabled=False):  # as backward: the gradients in full precision
                    eager.add(rows, grad_z)
                ce, kd = ce.detach(), kd.detach()
            ce_total += ce
            kd_total += kd
        if mixed is not None:
            ce_total, kd_total = mixed.finish()
        ctx.save_for_backward(source, weight, bias)
        ctx.prep = prep
        ctx.mixed = mixed
        ctx.eager = (eager, grad_weights) if eager is not None else None
        return ce_total, kd_total

    @staticmethod
    def backward(ctx, g_ce: Tensor, g_kd: Tensor):
        source, weight, bias = ctx.saved_tensors
        if ctx.eager is not None:
            eager, grad_weights = ctx.eager
            ctx.eager = None
            scale = _ratio(g_ce, g_kd, grad_weights)
            if scale is not None:
                return (*eager.result(bias, scale), None, None)
        prep: Prepared = ctx.prep
        grads = _Grads(source, weight, bias, tuple(ctx.needs_input_grad[:3]), source.dtype)
        autocast_enabled, autocast_dtype = ctx.autocast
        device_type = source.device.type
        mixed: MixedChunks | None = ctx.mixed
        if mixed is not None:
            mixed.start_backward(g_ce, g_kd)
        for rows in prep.chunks:
            with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled):
                z = ChunkedLoss._logits(source, weight, bias, rows, prep.compute_dtype)
            if mixed is not None:
                grad_z = mixed.grad(z)  # (n, V)
            else:
                z.requires_grad_(True)
                with torch.enable_grad():
                    ce, kd = loss_on_rows(z, rows, prep)
                    (grad_z,) = torch.autograd.grad(g_ce * ce + g_kd * kd, z)  # (n, V)
            grads.add(rows, grad_z)
        return (*grads.result(bias), None, None)


def _ratio(g_ce: Tensor, g_kd: Tensor, grad_weights: tuple[float, float]) -> float | None:
    """s with (g_ce, g_kd) = s·(w_ce, w_kd), or None when the incoming gradients are not in that ratio."""
    w_ce, w_kd = grad_weights
    a, b = float(g_ce), float(g_kd)
    s = a / w_ce if w_ce else (b / w_kd if w_kd else 0.0)
    if not math.isfinite(s):
        return None
    tol = 1e-6 * max(abs(a), abs(b)) + 1e-30
    return s if abs(a - s * w_ce) <= tol and abs(b - s * w_kd) <= tol else None
