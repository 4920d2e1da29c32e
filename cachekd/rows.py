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
