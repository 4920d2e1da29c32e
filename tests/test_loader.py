"""Loader: deterministic order, no gap or duplicate over ranks x workers, aligned teacher outputs, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cachekd.cache.reader import LogitCache
from cachekd.loader import CachedBatches, Order
from cachekd.tokens import TokenStore
from tests.conftest import invoke


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, store_path, teacher_path):
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("loader") / "cache"
    r = invoke(CliRunner(), ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", out, "--top-k", "4",
                             "--quiet"])
    assert r.exit_code == 0, r.output
    return out


def _order(store, G=6, block=2, seed=3):
    # small chunks so blocks and batch boundaries interleave: re-chunk the order itself (the store's chunk is large)
    return Order(store.num_windows("train"), store.chunk_windows, G, seed=seed, block_chunks=block)


def test_order_is_pure_and_a_permutation(store_path):
    store = TokenStore.open(store_path)
    o = Order(1000, 64, 8, seed=5, block_chunks=3)
    e0, e0b, e1 = o.epoch_windows(0), o.epoch_windows(0), o.epoch_windows(1)
    assert np.array_equal(e0, e0b) and not np.array_equal(e0, e1)
    assert sorted(e0.tolist()) == list(range(1000))
    # windows of a block come from its chunks only (the shuffle buffer holds whole chunks)
    for i, chunks in enumerate(o.blocks(0)):
        w = o.block_windows(0, i, chunks)
        assert set((w // 64).tolist()) == set(chunks.tolist())
    assert Order(1000, 64, 8, shuffle=False).epoch_windows(0).tolist() == list(range(1000))
    assert store.num_windows("train") > 0


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (1, 2), (2, 2), (3, 1)])
def test_ranks_and_workers_no_gap_no_duplicate(store_path, world, workers):
    store = TokenStore.open(store_path)
    G = 6
    order = _order(store, G=G)
    ref = [b["window_ids"].tolist() for b in CachedBatches(store, "train", order, max_epochs=1)]
    per_rank = []
    for r in range(world):
        ds = CachedBatches(store, "train", order, rank=r, world=world, max_epochs=1)
        if workers > 1:
            dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
            per_rank.append([b["window_ids"].tolist() for b in dl])
        else:
            per_rank.append([b["window_ids"].tolist() for b in ds])
    merged = [sum((per_rank[r][s] for r in range(world)), []) for s in range(len(ref))]
    assert merged == ref  # the same global batches, whatever the number of ranks and workers
    flat = sum(ref, [])
    assert len(flat) == len(set(flat)) == order.steps_per_epoch() * G
    assert len(flat) > order.num_windows - G  # only the last incomplete global batch is dropped


def test_teacher_outputs_are_aligned(store_path, cache_path):
    store, cache = TokenStore.open(store_path), LogitCache.open(cache_path)
    order = _order(store)
    batch = next(iter(CachedBatches(store, "train", order, cache=cache, temperature_index=1, max_epochs=1))).decode()
    t = cache.teachers[0]
    for i, w in enumerate(batch["window_ids"].tolist()):
        assert np.array_equal(batch["input_ids"][i].numpy(), store.read("train", w, w + 1)[0].astype(np.int64))
        blk = cache.read("train", w, w + 1)[t]
        assert np.array_equal(batch["teachers"][t]["ids"][i].numpy(), blk.ids[0])
        assert np.array_equal(batch["teachers"][t]["tail_lse"][i].numpy(), blk.tail_lse[0][..., 1])
    # labels are the next token, the last position ignored
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    assert (batch["labels"][:, -1] == -100).all()


def test_resume_next_batches_equal(store_path, cache_path):
    store, cache = TokenStore.open(store_path), LogitCache.open(cache_path)
    order = _order(store)
    spe = order.steps_per_epoch()
    full = list(CachedBatches(store, "train", order, cache=cache, temperature_index=0, max_epochs=2))
    k = spe + 3  # resume in the second epoch, mid-epoch
    resumed = CachedBatches(store, "train", order, cache=cache, temperature_index=0, start_epoch=k // spe,
                            start_step=k % spe, max_epochs=2)
    nxt = [b for _, b in zip(range(8), resumed)]
    assert len(nxt) == 8
    for a, b in zip(full[k:k + 8], nxt):
        assert torch.equal(a["input_ids"], b["input_ids"])
        for t in a["teachers"]:
            for n in a["teachers"][t]:
                assert torch.equal(a["teachers"][t][n], b["teachers"][t][n])
