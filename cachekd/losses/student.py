"""The student's side through the (n, V) log-softmax: log-probabilities at τ = 1 and at τ, and its tail mass."""

from __future__ import annotations

import math
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

# The student's mass outside the k teacher ids, 1 − Σ_topk q, loses about 4e-7 absolute to float32 rounding
# (Σ_topk q ≈ 1), i.e. a relative error of ~4e-7/q_tail. Where the (n, V) log-softmax exists anyway
# (Student.log_tail_mass), rows whose tail mass is below this threshold (relative error above ~1e-4) are
# recomputed exactly as a masked log-sum-exp over the tail, an O(V) pass for those rows only. The fused sparse
# path (sparse.SparseStudent) sums each row's tail directly instead and uses the threshold only to pick a
# cancellation-free form of the gradient.
CHEAP_TAIL_MIN = 2.0**-8
LOG_1M_CHEAP_TAIL_MIN = math.log1p(-CHEAP_TAIL_MIN)


class Student:
    """Student quantities for n rows, computed on first use and shared by the CE and every teacher."""

    def __init__(self, z: Tensor, temperature: float) -> None:
        self.z = z  # (n, V) logits in the compute dtype
        self.temperature = temperature

    @cached_property
    def logq1(self) -> Tensor:  # (n, V) log-softmax at τ = 1, for the cross-entropy
        return F.log_softmax(self.z, dim=-1)

    @cached_property
    def logq(self) -> Tensor:  # (n, V) log-softmax at τ
        if self.temperature == 1.0:
            return self.logq1
        return F.log_softmax(self.z / self.temperature, dim=-1)

    def log_tail_mass(self, ids: Tensor, logq_ids: Tensor) -> Tensor:
        """(n,) log of the student's mass at τ outside ``ids`` (n, k < V); see CHEAP_TAIL_MIN."""
        log_topk = torch.logsumexp(logq_ids, dim=-1)  # (n,)
        hard = log_topk > LOG_1M_CHEAP_TAIL_MIN  # tail mass below the threshold
        # The clamp keeps log1mexp and its gradient finite on the rows that are overwritten below.
        log_tail = torch.log(-torch.expm1(log_topk.clamp(max=LOG_1M_CHEAP_TAIL_MIN)))
        hard_rows = hard.nonzero().squeeze(1)
        if hard_rows.numel():
            tail_logq = self.logq.index_select(0, hard_rows).scatter(1, ids.index_select(0, hard_rows), -math.inf)
            log_tail = log_tail.index_put((hard_rows,), torch.logsumexp(tail_logq, dim=-1))
        return log_tail
