"""Distillation losses: divergences, sparse (top-k) teacher targets, several teachers, mixing, chunking.

One job a module:

* ``api`` — the public types (``DenseTarget``, ``FactoredTarget``, ``SparseTarget``, ``KDConfig``, ``LossParts``) and entry points
  (``distill_loss``, ``chunked_distill_loss``, ``total_loss``); validates and flattens the inputs;
* ``plan`` — the flattened batch (``Prepared``) and ``LossPlan``, the one decision of which path computes it
  (``F.cross_entropy``, a fused student or the (n, V) log-softmax, per-teacher or combined, chunked);
* ``rowloss`` — the CE and KD sums on a set of rows, following the plan; dense targets, mixing, combining;
* ``sparse`` — sparse targets on rows, the fused student side (``SparseStudent``) and the three tail modes;
* ``mixed`` — the fused ChooBaCa path: CE + forward/reverse KL against one sparse uniform-tail teacher mixed
  with the student (τ = 1), one pass over the logits each way (``MixedSparseStudent``);
* ``sampled`` — sampled and hybrid targets (``SampledTarget``, ``sampled_target``): the unbiased forward-KL
  estimator over drawn ids and the bucket form of the other objectives, on the same fused student side; their
  uniform-tail form (``uniform_tail_form``) for mixing and combining teachers into a dense target;
* ``student`` — the student's (n, V) log-softmax quantities, shared by the CE and every teacher;
* ``divergences`` — one small pointwise function per objective, in a registry;
* ``chunked`` — the step-wise loss: chunks of rows, recomputed in backward.
"""

from cachekd.losses.api import (
    OBJECTIVES,
    REDUCTIONS,
    TAIL_MODES,
    TEACHER_COMBINES,
    DenseTarget,
    FactoredTarget,
    KDConfig,
    LossParts,
    SparseTarget,
    Target,
    chunked_distill_loss,
    distill_loss,
    total_loss,
    total_loss_weights,
)
from cachekd.losses.sampled import SampledTarget, sampled_target

__all__ = [
    "OBJECTIVES",
    "REDUCTIONS",
    "TAIL_MODES",
    "TEACHER_COMBINES",
    "DenseTarget",
    "FactoredTarget",
    "KDConfig",
    "LossParts",
    "SampledTarget",
    "SparseTarget",
    "Target",
    "chunked_distill_loss",
    "distill_loss",
    "sampled_target",
    "total_loss",
    "total_loss_weights",
]
