"""The step-wise (chunked) loss: the rows a chunk at a time, recomputed in backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cachekd.losses.plan import Prepared, Rows, take
from cachekd.losses.rowloss import MixedChunks, loss_on_rows


class ChunkedLoss(torch.autograd.Function):
    """(ce_sum, kd_sum) over ``prep.chunks``; backward recomputes each chunk's logits (and, but for the fused
    ChooBaCa plan, its loss).

    ``source`` is (N, V) student logits when ``weight`` is None, else (N, H) hidden states projected by
    ``weight`` (V, H) and ``bias``. Forward keeps its inputs (and, where the plan says ``chunk_state``, O(k)
    statistics a row: ``rowloss.MixedChunks``); backward takes, chunk by chunk, the gradient G (n, V) of
    ``g_ce·ce + g_kd·kd`` with respect to the chunk's recomputed logits (by autograd through the chunk's
    recomputed loss, or from the saved statistics) and writes ``G`` (logits) or ``G @ weight``, ``Gᵀ @ hidden``,
    ``ΣG`` (projection) into full-size gradient buffers.
    """

    @staticmethod
    def _logits(source: Tensor, weight: Tensor | None, bias: Tensor | None, rows: Rows, dtype: torch.dtype) -> Tensor:
        x = take(source, rows)
        if weight is not None:
            x = F.linear(x, weight, bias)
        return x.to(dtype)

    @staticmethod
    def forward(ctx, source: Tensor, weight: Tensor | None, bias: Tensor | None, prep: Prepared):
        device_type = source.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ce_total = torch.zeros((), dtype=prep.compute_dtype, device=source.device)
        kd_total = torch.zeros((), dtype=prep.compute_dtype, device=source.device)
        mixed = MixedChunks(prep, prep.compute_dtype, source.device) if prep.plan.chunk_state else None
        for rows in prep.chunks:
            z = ChunkedLoss._logits(source, weight, bias, rows, prep.compute_dtype)
            if mixed is not None:
                mixed.add(z)
                continue
            ce, kd = loss_on_rows(z, rows, prep)
            ce_total += ce
            kd_total += kd
        if mixed is not None:
            ce_total, kd_total = mixed.finish()
        ctx.save_for_backward(source, weight, bias)
        ctx.prep = prep
        ctx.mixed = mixed
        return ce_total, kd_total

    @staticmethod
    def backward(ctx, g_ce: Tensor, g_kd: Tensor):
        source, weight, bias = ctx.saved_tensors
        prep: Prepared = ctx.prep
        need_source, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_source = torch.zeros_like(source) if need_source else None
        # Weight and bias gradients accumulate over chunks in at least float32.
        acc_dtype = torch.promote_types(weight.dtype, torch.float32) if weight is not None else None
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=acc_dtype) if need_bias else None
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
            if weight is None:
                if need_source:
                    grad_source[rows] = grad_z.to(source.dtype)
                continue
            grad_z_w = grad_z.to(weight.dtype)
            if need_source:
                grad_source[rows] = (grad_z_w @ weight).to(source.dtype)
            if need_weight:
                grad_weight.addmm_(grad_z.to(acc_dtype).t(), take(source, rows).to(acc_dtype))
            if need_bias:
                grad_bias += grad_z.sum(0).to(acc_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_source, grad_weight, grad_bias, None
