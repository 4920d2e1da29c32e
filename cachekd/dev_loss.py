"""The dev loss: a model's mean next-token cross-entropy over the windows of a token-store split.

Used by `cachekd eval` (`cachekd.evaluate`) and by the trainer's periodic evaluation (`cachekd.student`), so it
lives below both.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cachekd.errors import CachekdError, ConfigFieldError
from cachekd.models import check_positions, output_size
from cachekd.tokens import TokenStore


def open_store(store: TokenStore | str | Path) -> TokenStore:
    return store if isinstance(store, TokenStore) else TokenStore.open(store)


@torch.no_grad()
def dev_loss(
    model,
    store: TokenStore | str | Path,
    split: str = "dev",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    max_windows: int | None = None,
    progress: bool = True,
    windows: np.ndarray | None = None,
) -> dict[str, Any]:
    """Mean per-token next-token loss of `model` over the windows of a token-store split.

    Returns ``{"loss": nats a prediction, "ppl": exp(loss), "num_tokens": predictions scored,
    "num_windows": windows read, "window_losses": each window's mean loss, in order}`` (the cohort's ω update
    groups the windows into the seed code's validation batches). Each (L,) window gives L−1 predictions; log-probabilities are taken in
    float32 whatever the model's dtype, and summed in float64. `max_windows` evaluates the first windows only;
    `windows` (sorted indices, e.g. `cachekd.tokens.reader.dev_sample`) evaluates those windows only.
    """
    from tqdm.auto import tqdm

    store = open_store(store)
    if split not in store.splits():
        raise CachekdError(
            f"token store {str(store.path)!r} has no {split!r} split (it has {', '.join(store.splits())})."
        )
    if batch_size < 1:
        raise CachekdError(f"batch size must be at least 1 (got {batch_size}).")
    n = store.num_windows(split)
    if windows is not None:
        windows = np.asarray(windows, dtype=np.int64)
        if len(windows) and (windows.min() < 0 or windows.max() >= n):
            raise CachekdError(f"window indices must lie in [0, {n}) for the {split!r} split.")
        n = len(windows)
    if max_windows is not None:
        if max_windows < 1:
            raise ConfigFieldError("max_windows", "at least 1", max_windows)
        n = min(n, max_windows)
        if windows is not None:
            windows = windows[:n]  # score what is counted
    if n == 0:
        raise CachekdError(f"the {split!r} split of {str(store.path)!r} holds no windows.")
    check_positions(model, store.seq_len, "the model")
    vocab = output_size(model)
    model.eval()
    model.to(device)
    total = 0.0  # python float: float64 accumulation
    num_tokens = 0
    window_losses: list[float] = []
    with tqdm(total=n, desc=f"dev loss ({split})", unit="win", disable=not progress) as bar:
        for block in _window_batches(store, split, n, batch_size, windows):
            ids = torch.from_numpy(block.astype(np.int64)).to(device)  # (B, L)
            if vocab is not None and int(ids.max()) >= vocab:
                raise CachekdError(
                    f"the token store holds token id {int(ids.max())} but the model has only {vocab} outputs; "
                    f"it was built with another tokenizer."
                )
            logits = model(input_ids=ids, use_cache=False).logits  # (B, L, V)
            per_window = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none"
            ).double().sum(-1)  # (B,)
            total += float(per_window.sum())
            num_tokens += ids[:, 1:].numel()
            window_losses += (per_window / (ids.shape[1] - 1)).tolist()
            bar.update(len(block))
    mean = total / num_tokens
    return {"loss": mean, "ppl": math.exp(mean) if mean < 700 else float("inf"), "num_tokens": num_tokens,
            "num_windows": n, "window_losses": window_losses}


def _window_batches(store: TokenStore, split: str, n: int, batch_size: int, windows: np.ndarray | None):
    """(B, L) arrays of token windows: the first `n` windows of the split, or the given `windows` (sorted), read a
    whole chunk at a time (one read a chunk, not one a window)."""
    if windows is None:
        for start in range(0, n, batch_size):
            yield store.read(split, start, min(n, start + batch_size))
        return
    cw = store.chunk_windows
    pending: list[np.ndarray] = []
    buffered = 0
    for c in np.unique(windows // cw):
        rows = windows[(windows // cw) == c] - c * cw
        pending.append(store.read_chunk(split, int(c))[rows])
        buffered += len(rows)
        while buffered >= batch_size:
            flat = np.concatenate(pending)
            yield flat[:batch_size]
            pending, buffered = [flat[batch_size:]], len(flat) - batch_size
    if buffered:
        yield np.concatenate(pending)
