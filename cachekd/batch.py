"""The batch: what the loader yields and a training step consumes — one type, one ignore index, one ids dtype.

A `Batch` holds the token windows (`input_ids`), their next-token `labels` (`IGNORE_INDEX` where a position has
no next token), and, per cached teacher, what the logit cache stores for those positions: `CachedTopK` (the top-k
token ids, their τ=1 log-probabilities and the log-sum-exp of the rest), `CachedSampled` (drawn ids with their
counts, log-probabilities, normalisers and entropies), `CachedLogits` (full logits) or `CachedFactored` (the input of
the teacher's output layer, which the teacher source multiplies by the cached layer). The
teacher source turns these into the losses' targets.

The loader yields each teacher's arrays as the cache stores them (`EncodedTeacher`: delta-coded ids, fixed-point
values, a few bytes a value) and the training step decodes them on its device (`Batch.decode`, torch ops): what
crosses from the loader thread to the device is the compact form, and the decoding runs where it is cheap.

Dtypes, fixed from the cache reader to the loss: token ids and labels int64, top-k ids `IDS_DTYPE` (int64: the
losses gather and scatter with them, and torch indexes with int64 only, so they are decoded to it once, by
`EncodedTeacher.decode` or the reader, and never converted again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""The label of a position that counts for no loss (the last position of every window). `KDConfig.ignore_index`
defaults to it; the loader writes it and the trainer counts tokens with it."""

IDS_DTYPE = torch.int64
"""The dtype of a top-k cache's token ids from their decode to the loss."""


class FieldView:
    """Read access by field name (``batch["input_ids"]``, ``for name in cached: ...``), as the untyped dicts these
    types replace allowed."""

    def __getitem__(self, name: str):
        if name not in self.keys():
            raise KeyError(name)
        return getattr(self, name)

    def keys(self) -> list[str]:
        """The names of the fields that hold an array (a pure sampled cache has no exact top-k)."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]  # type: ignore[arg-type]

    def __iter__(self):
        return iter(self.keys())

    def __contains__(self, name: object) -> bool:
        return name in self.keys()

    def values(self) -> list:
        return [getattr(self, n) for n in self.keys()]

    def get(self, name: str, default=None):
        value = getattr(self, name, None) if name in self.keys() else None
        return default if value is None else value


@dataclass
class CachedTopK(FieldView):
    """A top-k cache's arrays for the positions of a batch."""

    ids: Tensor
    """(B, T, k) token ids (IDS_DTYPE), distinct within each position."""
    logprobs: Tensor
    """(B, T, k) float32 τ=1 log-probabilities of `ids` (the losses treat them as shift-invariant logits)."""
    tail_lse: Tensor
    """(B, T, n_τ) float32 log-sum-exp of logit/τ over the other ids, for each temperature the cache holds, or (B, T)
    when the loader kept one temperature."""


@dataclass
class CachedLogits(FieldView):
    """A full-logits cache's array for the positions of a batch."""

    logits: Tensor
    """(B, T, V) float16 teacher logits."""


@dataclass
class CachedSampled(FieldView):
    """A sampled (or hybrid) cache's arrays for the positions of a batch (see `cachekd.teacher_samples`)."""

    sample_ids: Tensor
    """(B, T, W) drawn token ids (IDS_DTYPE), sorted; pads repeat the last id and have count 0."""
    sample_logprobs: Tensor
    """(B, T, W) float32 τ=1 log-probabilities of `sample_ids`."""
    sample_counts: Tensor
    """(B, T, W, n_r) int64 draws of each id, per proposal."""
    tail_lse: Tensor
    """(B, T, n_τ) float32 normaliser per cached τ (beyond the exact top-k for a hybrid); every τ is kept."""
    entropy: Tensor
    """(B, T, n_τ) float32 teacher entropy per cached τ."""
    ids: Tensor | None = None
    """Hybrid only: (B, T, k) the exact top-k ids (IDS_DTYPE)."""
    logprobs: Tensor | None = None
    """Hybrid only: (B, T, k) float32 τ=1 log-probabilities of `ids`."""


@dataclass
class CachedFactored(FieldView):
    """A factored cache's arrays for the positions of a batch, as stored (decoded on the training device by the
    teacher source: `cachekd.cache.encoding.decode_hidden`)."""

    hidden: Tensor
    """(B, T, d) the input of the teacher's output layer over the cache's per-dimension scale: int8 codes, int16
    bits of bfloat16, or float16."""
    hidden_scale: Tensor | None = None
    """int8 only: (B, T) float32 scale of each position's codes."""


CachedTeacher = CachedTopK | CachedLogits | CachedSampled | CachedFactored


@dataclass
class EncodedTeacher:
    """A teacher's cache arrays for the positions of a batch as stored (`cachekd.cache.encoding.stored_tensor`):
    what the loader yields; `decode` gives the `CachedTeacher` the losses take, with torch ops on the tensors'
    device, bit-identical to the reader's decode."""

    arrays: dict[str, Tensor]
    """By cache array name (`cachekd.cache.format.ARRAY_NAMES`): (B, T, ...) stored values."""
    logprob_scale: float
    """Fixed-point steps per nat of the stored log-probabilities (the cache plan's)."""

    def decode(self) -> CachedTeacher:
        from cachekd.cache.encoding import decode_stored

        rows = {name: decode_stored(name, x, self.logprob_scale) for name, x in self.arrays.items()}
        kind = (CachedLogits if "logits" in rows else CachedSampled if "sample_ids" in rows
                else CachedFactored if "hidden" in rows else CachedTopK)
        return kind(**rows)

    def map(self, fn: Callable[[Tensor], Tensor]) -> EncodedTeacher:
        return EncodedTeacher({name: fn(x) for name, x in self.arrays.items()}, self.logprob_scale)

    def __getitem__(self, name: str) -> Tensor:
        return self.arrays[name]

    def __iter__(self):
        return iter(self.arrays)

    def keys(self) -> list[str]:
        return list(self.arrays)

    def values(self) -> list[Tensor]:
        return list(self.arrays.values())


def _map_teacher(t: CachedTeacher | EncodedTeacher, fn: Callable[[Tensor], Tensor]) -> CachedTeacher | EncodedTeacher:
    if isinstance(t, EncodedTeacher):
        return t.map(fn)
    return replace(t, **{f.name: fn(getattr(t, f.name)) for f in fields(t) if getattr(t, f.name) is not None})


def _concat_teachers(parts: list) -> CachedTeacher | EncodedTeacher:
    """One teacher's arrays of several batches, concatenated along the windows."""
    first = parts[0]
    if isinstance(first, EncodedTeacher):
        return EncodedTeacher({n: torch.cat([p.arrays[n] for p in parts]) for n in first.arrays}, first.logprob_scale)
    return replace(first, **{f.name: torch.cat([getattr(p, f.name) for p in parts])
                             for f in fields(first) if getattr(first, f.name) is not None})


@dataclass
class Batch(FieldView):
    """Token windows with their labels and cached teacher outputs, on one device."""

    input_ids: Tensor
    """(B, T) int64 token ids."""
    labels: Tensor
    """(B, T) int64 next-token labels; `IGNORE_INDEX` at positions without one."""
    window_ids: Tensor
    """(B,) int64 global window ids (which windows of the split these are)."""
    teachers: dict[str, CachedTeacher | EncodedTeacher] = field(default_factory=dict)
    """Per cached teacher, by name: its arrays for these positions (empty without a cache); as stored
    (`EncodedTeacher`) until `decode`."""
    epoch: int = 0
    step: int = 0
    """The epoch and the optimizer step (within the epoch) this batch belongs to."""

    def num_tokens(self, ignore_index: int = IGNORE_INDEX) -> int:
        """Positions that count for the loss."""
        return int((self.labels != ignore_index).sum().item())

    def map(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        """A batch with `fn` applied to every tensor (device moves, slicing, pinning)."""
        teachers = {name: _map_teacher(t, fn) for name, t in self.teachers.items()}
        return Batch(fn(self.input_ids), fn(self.labels), fn(self.window_ids), teachers, self.epoch, self.step)

    def decode(self) -> Batch:
        """This batch with every teacher's stored arrays decoded (`EncodedTeacher.decode`) on the device they are
        on; teachers already decoded are kept."""
        teachers = {name: t.decode() if isinstance(t, EncodedTeacher) else t for name, t in self.teachers.items()}
        return Batch(self.input_ids, self.labels, self.window_ids, teachers, self.epoch, self.step)

    def to(self, device: torch.device) -> Batch:
        return self.map(lambda x: x.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        return self.map(lambda x: x.pin_memory())

    def rows(self, rows: slice) -> Batch:
        """The windows `rows` of this batch (a micro-batch)."""
        return self.map(lambda x: x[rows])

    @staticmethod
    def concat(pieces: list[Batch]) -> Batch:
        """The windows of several batches in order (their epoch and step are the first's)."""
        first = pieces[0]
        teachers = {name: _concat_teachers([p.teachers[name] for p in pieces]) for name in first.teachers}
        return Batch(torch.cat([p.input_ids for p in pieces]), torch.cat([p.labels for p in pieces]),
                     torch.cat([p.window_ids for p in pieces]), teachers, first.epoch, first.step)
