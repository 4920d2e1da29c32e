"""Row blocks and underflow limits for the O(V)-per-position passes (precompute's teacher targets, the fused
sparse loss).

Both walk (n, V) logits a block of rows at a time on CPU so that the float32 temporaries (exponentials, their
square roots, gradients) stay in the CPU cache and are reused by the allocator, instead of a fresh (n, V)
tensor per operation: on 2 cores a 130 MB temporary costs more in page faults than the arithmetic done on it.
On a GPU the whole batch is one block.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# About this many bytes of float32 logits per torch thread in a block. Measured on 2 cores
# (benchmarks/bench_losses.py): 4 MiB a thread keeps the temporaries in cache and in the allocator (no page
# faults); much smaller blocks pay per-op overhead, and when other processes compete for the cores every
# parallel op also waits on preempted threads, which favours fewer, larger blocks.
BLOCK_BYTES = 4 << 20

# Tails are summed in linear space, relative to the row maximum (the fused loss) or to the normaliser
# (precompute's probabilities), where float32 exp() underflows below e^-87.3
# (denormals lose precision from there): at most V such terms are lost, < V·e^-87.3. At τ = 2 the terms are the
# square roots of the τ = 1 exponentials, so the lost ones are < e^-43.6 each. A row whose tail sum is below
# V·e^(floor) with these floors (lost terms above ~1e-7 of the tail) must be redone in log space.
_UNDERFLOW_FLOOR = {"exp": -87.3 + 16.2, "sqrt": -43.6 + 16.2}


def block_rows(z: Tensor) -> int:
    """Rows per block for (n, V) logits ``z``: all of them off the CPU."""
    if z.device.type != "cpu":
        return max(1, z.shape[0])
    return max(1, BLOCK_BYTES * torch.get_num_threads() // (z.shape[-1] * 4))


def row_blocks(z: Tensor) -> list[slice]:
    step = block_rows(z)
    return [slice(s, min(s + step, z.shape[0])) for s in range(0, z.shape[0], step)]


def tail_underflows(log_tail_sum: Tensor, vocab_size: int, sqrt: bool) -> Tensor:
    """Rows whose linear-space tail sum lost too much to underflow. ``log_tail_sum`` is its log on the scale the
    terms were formed on (relative to the row max, or to the normaliser, at that temperature); ``sqrt`` when the
    terms were square roots of τ = 1 exponentials (τ = 2)."""
    return log_tail_sum < math.log(vocab_size) + _UNDERFLOW_FLOOR["sqrt" if sqrt else "exp"]


def _topk_group(vocab_size: int, k: int) -> int:
    """Group size for `topk_rows`' first stage (0: one plain top-k). Measured on 2 cores, k=64: 8 is fastest
    for V ≈ 8k, 16 for V from 32k to 152k; a stage pays off only with at least 2k groups."""
    g = 8 if vocab_size < 16 * 1024 else 16
    return g if vocab_size // g >= 2 * k else 0


def topk_rows(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest values of each row of (r, V) ``z`` and their column ids, in no particular order.

    Exact (the same values as ``torch.topk``; among equal values either id may be taken). On CPU, where
    ``torch.topk`` costs about 1.2 ns an element, in two stages: the columns are cut into G = V // g strided
    groups {c, c + G, c + 2G, ...} whose maxima one elementwise pass finds; every one of the k largest values
    lies in a group whose maximum is among the k largest group maxima (a value outside those groups is below k
    group maxima, i.e. below k values), so the final top-k runs over those k·g candidates plus the V mod g
    leftover columns only. 1.6× (V = 8k) to 2.8× (V = 152k) faster than one top-k.
    """
    r, vocab = z.shape
    g = _topk_group(vocab, k) if z.device.type == "cpu" else 0
    if not g:
        return z.topk(k, dim=-1, sorted=False)
    groups = vocab // g
    group_max = z[:, : groups * g].view(r, g, groups).amax(1)             # (r, G): column c + j·G is in group c
    _, top_groups = group_max.topk(k, dim=-1, sorted=False)
    cand = (top_groups[:, :, None] + groups * torch.arange(g, device=z.device)).view(r, k * g)
    if groups * g < vocab:
        cand = torch.cat([cand, torch.arange(groups * g, vocab, device=z.device).expand(r, -1)], 1)
    vals, pos = z.gather(1, cand).topk(k, dim=-1, sorted=False)
    return vals, cand.gather(1, pos)
