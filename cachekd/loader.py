"""Aligned streaming of token windows and their cached teacher outputs, in a deterministic, resumable order.

The order of an epoch is a pure function of (seed, epoch, number of chunks, block size):

1. permute the token-store chunks;
2. take the permuted chunks `block_chunks` at a time and permute the windows inside each block (a shuffle buffer
   of whole chunks, so every read is a whole chunk of tokens and of each cached array);
3. concatenate: that is the epoch's global window sequence; global step s takes windows [s·G, (s+1)·G) with G the
   global batch (the last incomplete global batch is dropped so every rank runs the same number of steps);
4. rank r of a data-parallel job takes the r-th slice of each global batch, and DataLoader worker w of W produces
   the steps s ≡ w (mod W), which the DataLoader's round-robin returns in step order.

So the state to resume from is two integers (epoch, step), one process and N processes see the same global
batches, and no window is repeated or skipped within an epoch.

The price of that equivalence: every rank (and every DataLoader worker) decodes the whole blocks its batches come
from, so reading work grows with the number of readers. At ~100 bytes a position and ~370k decoded positions/s
per reader thread (benchmarks/bench_loader.py) this stays far from a GPU step's cost; one background thread per
process is the default.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from cachekd.batch import IGNORE_INDEX, Batch, CachedFactored, CachedLogits, CachedSampled, CachedTeacher, CachedTopK
from cachekd.errors import CachekdError


@dataclass(frozen=True)
class Order:
    """The deterministic window order of one split."""

    num_windows: int
    chunk_windows: int
    global_batch: int
    seed: int = 0
    block_chunks: int = 8
    shuffle: bool = True

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_windows / self.chunk_windows)

    def steps_per_epoch(self) -> int:
        return self.num_windows // self.global_batch

    def blocks(self, epoch: int) -> list[np.ndarray]:
        """Chunk ids of each block, in epoch order."""
        chunks = np.arange(self.num_chunks)
        if self.shuffle:
            chunks = np.random.default_rng([self.seed, epoch, 0]).permutation(self.num_chunks)
        return [chunks[i:i + self.block_chunks] for i in range(0, len(chunks), self.block_chunks)]

    def block_windows(self, epoch: int, block_index: int, chunk_ids: np.ndarray) -> np.ndarray:
        """Global window ids of a block in their shuffled order."""
        ids = np.concatenate([
            np.arange(c * self.chunk_windows, min((c + 1) * self.chunk_windows, self.num_windows)) for c in chunk_ids
        ])
        if self.shuffle:
            ids = ids[np.random.default_rng([self.seed, epoch, 1, block_index]).permutation(len(ids))]
        return ids

    def epoch_windows(self, epoch: int) -> np.ndarray:
        return np.concatenate([self.block_windows(epoch, i, b) for i, b in enumerate(self.blocks(epoch))])


class WindowSource:
    """Reads whole chunks of tokens (and cached teacher outputs) for a split, keeping one block in memory."""

    def __init__(self, store, split: str, cache=None, teachers: Sequence[str] | None = None,
                 temperature_index: int | None = None, ignore_index: int = IGNORE_INDEX):
        self.store, self.split, self.cache, self.ignore_index = store, split, cache, ignore_index
        self.teachers = cache.select_teachers(teachers) if cache is not None else []
        self.temperature_index = temperature_index
        self._block_key: tuple | None = None
        self._block: dict[str, Any] = {}

    def load_block(self, key: tuple, chunk_ids: np.ndarray) -> None:
        if key == self._block_key:
            return
        parts_tok, pos = [], {}
        parts_t: dict[str, list] = {t: [] for t in self.teachers}
        offset = 0
        for c in chunk_ids:
            tok = self.store.read_chunk(self.split, int(c))
            start = int(c) * self.store.chunk_windows
            pos[int(c)] = (offset, start)
            offset += len(tok)
            parts_tok.append(tok)
            if self.cache is not None:
                for t, blk in self.cache.read_chunk(self.split, int(c), self.teachers, tokens=tok).items():
                    parts_t[t].append(blk)
        self._block = {"tokens": np.concatenate(parts_tok), "pos": pos, "teachers": {}}
        for t, blks in parts_t.items():
            merged = {}
            b0 = blks[0]
            for name in b0.NAMES:
                if getattr(b0, name) is not None:
                    arr = np.concatenate([getattr(b, name) for b in blks])  # ids: IDS_DTYPE from the reader's decode
                    # a sampled cache keeps every τ: its target at τ also needs the proposal's normaliser
                    if name == "tail_lse" and self.temperature_index is not None and b0.sample_ids is None:
                        arr = arr[..., self.temperature_index]
                    merged[name] = arr
            self._block["teachers"][t] = merged
        self._block_key = key

    def rows(self, window_ids: np.ndarray) -> np.ndarray:
        cw = self.store.chunk_windows
        pos = self._block["pos"]
        return np.array([pos[int(w) // cw][0] + int(w) - pos[int(w) // cw][1] for w in window_ids], dtype=np.int64)

    def batch(self, window_ids: np.ndarray) -> Batch:
        r = self.rows(window_ids)
        tokens = torch.from_numpy(self._block["tokens"][r].astype(np.int64))
        labels = torch.full_like(tokens, self.ignore_index)
        labels[:, :-1] = tokens[:, 1:]
        teachers: dict[str, CachedTeacher] = {}
        for t, arrays in self._block["teachers"].items():
            rows = {name: torch.from_numpy(np.ascontiguousarray(arr[r])) for name, arr in arrays.items()}
            kind = (CachedLogits if "logits" in rows else CachedSampled if "sample_ids" in rows
                    else CachedFactored if "hidden" in rows else CachedTopK)
            teachers[t] = kind(**rows)
        return Batch(tokens, labels, torch.from_numpy(window_ids.copy()), teachers)


class CachedBatches(torch.utils.data.IterableDataset):
    """Local batches of one rank, from (epoch, step) on. Works in the main process or in DataLoader workers."""

    def __init__(self, store, split: str, order: Order, *, rank: int = 0, world: int = 1, cache=None,
                 teachers: Sequence[str] | None = None, temperature_index: int | None = None,
                 start_epoch: int = 0, start_step: int = 0, max_epochs: int | None = None,
                 ignore_index: int = IGNORE_INDEX):
        if order.global_batch % world:
            raise CachekdError(f"the global batch ({order.global_batch}) must be divisible by the number of processes ({world}).")
        if order.steps_per_epoch() < 1:
            raise CachekdError(
                f"the {split} split has {order.num_windows} windows, fewer than one global batch of {order.global_batch}; "
                f"lower the batch size or add data."
            )
        self.store, self.split, self.order = store, split, order
        self.rank, self.world = rank, world
        self.cache, self.teachers, self.temperature_index = cache, teachers, temperature_index
        self.start_epoch, self.start_step, self.max_epochs = start_epoch, start_step, max_epochs
        self.ignore_index = ignore_index

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        src = WindowSource(self.store, self.split, self.cache, self.teachers, self.temperature_index,
                           self.ignore_index)
        order, G = self.order, self.order.global_batch
        local = G // self.world
        epoch, step = self.start_epoch, self.start_step
        while self.max_epochs is None or epoch < self.max_epochs:
            blocks = order.blocks(epoch)
            sizes = [sum(min((c + 1) * order.chunk_windows, order.num_windows) - c * order.chunk_windows for c in b)
                     for b in blocks]
            bounds = np.concatenate([[0], np.cumsum(sizes)])
            cache_win: dict[int, np.ndarray] = {}
            for s in range(step, order.steps_per_epoch()):
                if s % nw != wid:
                    continue
                lo, hi = s * G + self.rank * local, s * G + (self.rank + 1) * local
                b_first = int(np.searchsorted(bounds, lo, side="right") - 1)
                b_last = int(np.searchsorted(bounds, hi - 1, side="right") - 1)
                pieces = []
                for bi in range(b_first, b_last + 1):
                    if bi not in cache_win:
                        cache_win = {bi: order.block_windows(epoch, bi, blocks[bi])} | {
                            k: v for k, v in cache_win.items() if k >= b_first}
                    w = cache_win[bi][max(lo, bounds[bi]) - bounds[bi]: min(hi, bounds[bi + 1]) - bounds[bi]]
                    src.load_block((epoch, bi), blocks[bi])
                    pieces.append(src.batch(w))
                batch = pieces[0] if len(pieces) == 1 else Batch.concat(pieces)
                batch.epoch, batch.step = epoch, s
                yield batch
            epoch, step = epoch + 1, 0


class Prefetcher:
    """Runs an iterator in a background thread, `depth` items ahead (reading and decoding overlap training).

    `close` stops the thread and waits for it: a thread still decoding (inside torch or blosc) when the interpreter
    exits is torn down in C++ code, which aborts the process ("terminate called without an active exception",
    exit 134 instead of the signal's 143)."""

    def __init__(self, it: Iterator[Any], depth: int = 4, pin: bool = False):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.pin = pin
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(it,), daemon=True, name="cachekd-loader")
        self.thread.start()

    def _put(self, entry: tuple[str, Any]) -> bool:
        """Queue `entry` unless the consumer closed us first; returns whether it was queued."""
        while not self._stop.is_set():
            try:
                self.q.put(entry, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it) -> None:
        try:
            for item in it:
                if self.pin:
                    item = item.pin_memory()
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._put(("error", e))

    def __iter__(self):
        return self

    def __next__(self):
        kind, item = self.q.get()
        if kind == "end":
            raise StopIteration
        if kind == "error":
            raise item
        return item

    def close(self) -> None:
        """Stop the background thread and wait until it has finished the item it was reading."""
        self._stop.set()
        if self.thread is not threading.current_thread():
            self.thread.join()
