"""Decoding a cache's stored values with torch ops (the loader ships them as stored, the training device decodes
them): bit-identical to the numpy decode it replaced, for every value a cache can hold and for every cache kind
through the loader (pads, clipped log-probabilities, −inf tails, a sharp teacher)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cachekd.batch import Batch, EncodedTeacher
from cachekd.cache import format as fmt
from cachekd.cache.encoding import decode_stored, stored_tensor
from cachekd.cache.reader import LogitCache
from cachekd.loader import CachedBatches, Order
from cachekd.tokens import TokenStore
from tests.conftest import make_teacher


def old_decode(name: str, a: np.ndarray, scale: float) -> np.ndarray:
    """The numpy decode of `cachekd.cache.encoding` and the reader before decoding moved to torch (commit 29017ab),
    formula for formula: the reference the new decode must equal bit for bit."""
    if name in ("ids", "sample_ids"):
        return np.cumsum(a.astype(np.int64), axis=-1)
    if name in ("logprobs", "sample_logprobs"):
        return a.astype(np.float32) * np.float32(-1.0 / scale)
    if name in ("tail_lse", "entropy"):
        out = a.astype(np.float32) * np.float32(1.0 / fmt.TAIL_SCALE)
        out[a == fmt.TAIL_NEG_INF] = -np.inf
        return out
    if name == "sample_counts":
        return a.astype(np.int64)
    assert name == "logits"
    return a


def assert_same_bits(got: np.ndarray, want: np.ndarray) -> None:
    """Equal dtype, shape and bytes (so −0.0 ≠ 0.0 and every NaN payload counts)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes()


def _both_decodes(name: str, stored: np.ndarray, scale: float) -> list[np.ndarray]:
    """The torch decode of a stored array, through the tensor path the loader takes and the reader's numpy path."""
    out = [decode_stored(name, stored_tensor(stored), scale).numpy()]
    numpy_api = {"ids": fmt.decode_ids, "logprobs": lambda q: fmt.decode_logprobs(q, scale),
                 "tail_lse": fmt.decode_tail}
    if name in numpy_api:
        out.append(numpy_api[name](stored))
    return out


@pytest.mark.parametrize("scale", [fmt.LOGPROB_SCALE, 256.0, 1000.0])
@pytest.mark.parametrize("name", ["logprobs", "sample_logprobs"])
def test_every_fixed_point_log_probability(name, scale):
    q = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)  # 0 (log p = 0) … 65535 (the clip at ≈ −128)
    for got in _both_decodes(name, q, scale):
        assert_same_bits(got, old_decode(name, q, scale))


@pytest.mark.parametrize("name", ["tail_lse", "entropy"])
def test_every_fixed_point_tail_and_entropy(name):
    q = np.arange(-(1 << 15), 1 << 15, dtype=np.int32).astype(np.int16).reshape(256, 256)  # TAIL_NEG_INF → −inf
    for got in _both_decodes(name, q, 0.0):
        assert_same_bits(got, old_decode(name, q, 0.0))
    assert np.isneginf(got[0, 0]) and np.isfinite(got.ravel()[1:]).all()


def test_ids_counts_and_logits_at_their_extremes():
    rng = np.random.default_rng(0)
    d16 = rng.integers(0, 1 << 16, (7, 5, 40), dtype=np.uint16)
    d16[0] = 0
    d16[1] = 65535  # the largest delta in every slot: the sums pass 2^16 and 2^21
    d32 = rng.integers(0, 1 << 32, (3, 4, 9), dtype=np.uint32)  # ids of a vocabulary past 2^16
    d32[0] = np.uint32(0xFFFFFFFF)
    for name in ("ids", "sample_ids"):
        for d in (d16, d32):
            for got in _both_decodes(name, d, 0.0):
                assert_same_bits(got, old_decode(name, d, 0.0))
    for counts in (np.arange(256, dtype=np.uint8).reshape(2, 4, 16, 2),
                   np.arange(1 << 16, dtype=np.uint16).reshape(8, 16, 256, 2)):  # N > 255: uint16 counts
        assert_same_bits(decode_stored("sample_counts", stored_tensor(counts)).numpy(),
                         old_decode("sample_counts", counts, 0.0))
    logits = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(16, 4096)  # ±0, subnormals, ±inf, NaNs
    assert_same_bits(decode_stored("logits", stored_tensor(logits)).numpy(), logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_on_the_gpu_equals_the_cpu():
    arrays = {"logprobs": np.arange(1 << 16, dtype=np.uint16), "sample_ids": np.full((4, 70), 65535, np.uint16),
              "tail_lse": np.arange(-(1 << 15), 1 << 15, dtype=np.int32).astype(np.int16),
              "sample_counts": np.arange(256, dtype=np.uint8).reshape(8, 16, 2)}
    for name, a in arrays.items():
        cpu = decode_stored(name, stored_tensor(a))
        gpu = decode_stored(name, stored_tensor(a).pin_memory().to("cuda", non_blocking=True))
        assert_same_bits(gpu.cpu().numpy(), cpu.numpy())


# ------------------------------------------------------------------------------------ through the loader


def _sharp_teacher(store_path, out):
    """A teacher whose distributions are nearly one-hot: log-probabilities far below the fixed point's −128 clip,
    sampled rows of one distinct id (the rest pads)."""
    from cachekd.models import load_model

    make_teacher(store_path, out, seed=3)
    m = load_model(out)
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(2000.0)
    m.save_pretrained(out)
    return out


KINDS = {  # name: (teacher, precompute options)
    "topk": ("soft", {"top_k": 4}),
    "topk_k_is_V": ("soft", {"top_k": -1}),  # an empty tail: TAIL_NEG_INF
    "hybrid": ("soft", {}),  # the default storage
    "sampled": ("soft", {"sample": 8}),
    "full": ("soft", {"full": True}),
    "sharp_hybrid": ("sharp", {"top_k": 3, "sample": 8}),
    "sharp_sampled": ("sharp", {"sample": 8, "temperatures": [1.0]}),
}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, store_path, teacher_path):
    from cachekd.precompute import PrecomputeConfig, precompute

    root = tmp_path_factory.mktemp("decode")
    teachers = {"soft": teacher_path, "sharp": _sharp_teacher(store_path, root / "sharp")}
    vocab = TokenStore.open(store_path).vocab_size
    out = {}
    for kind, (teacher, opts) in KINDS.items():
        opts = {**opts, "top_k": vocab} if opts.get("top_k") == -1 else opts
        precompute(PrecomputeConfig(store=str(store_path), teachers=[str(teachers[teacher])], output=str(root / kind),
                                    splits=["train"], **opts), force=True, progress=False)
        out[kind] = root / kind
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_loader_batches_decode_as_before(kind, caches, store_path):
    store, cache = TokenStore.open(store_path), LogitCache.open(caches[kind])
    n, scale, t = cache.num_windows("train"), cache.plan.logprob_scale, cache.teachers[0]
    stored = cache.read_stored("train", 0, n)[t]
    want = {name: old_decode(name, a, scale) for name, a in stored.items()}
    # the reader's decoded blocks (verify, eval, audit) are the same code
    block = cache.read("train", 0, n)[t]
    for name in want:
        assert_same_bits(getattr(block, name), want[name])
    # the edge values are in these caches
    if kind == "topk_k_is_V":
        assert (stored["tail_lse"] == fmt.TAIL_NEG_INF).all()
    if kind.startswith("sharp"):
        assert (stored["sample_counts"].sum(-1) == 0).mean() > 0.5  # mostly pads
    if kind == "sharp_hybrid":
        assert (stored["logprobs"] == 65535).any()  # top-k log-probabilities clipped at the fixed point's −128
    order = Order(n, store.chunk_windows, 6, seed=1, block_chunks=2)
    topk = cache.mode == "topk"
    for tail_index in ([None, 1] if topk else [None]):
        seen = 0
        for batch in CachedBatches(store, "train", order, cache=cache, temperature_index=tail_index, max_epochs=1):
            assert isinstance(batch.teachers[t], EncodedTeacher)
            w = batch.window_ids.numpy()
            got = batch.decode().teachers[t]
            assert set(got.keys()) == set(want)
            for name, ref in want.items():
                ref = ref[w]
                if name == "tail_lse" and topk and tail_index is not None:
                    ref = ref[..., tail_index]
                assert_same_bits(getattr(got, name).numpy(), ref)
            seen += len(w)
        assert seen == order.steps_per_epoch() * 6


def test_encoded_batches_slice_and_concatenate_as_decoded_ones(caches, store_path):
    store, cache = TokenStore.open(store_path), LogitCache.open(caches["hybrid"])
    order = Order(cache.num_windows("train"), store.chunk_windows, 6, seed=2)
    a, b = [x for _, x in zip(range(2), CachedBatches(store, "train", order, cache=cache, max_epochs=1))]
    t = cache.teachers[0]

    def same(x: Batch, y: Batch) -> None:
        assert torch.equal(x.input_ids, y.input_ids)
        for name in y.teachers[t].keys():
            assert torch.equal(x.teachers[t][name], y.teachers[t][name])

    same(a.rows(slice(1, 4)).decode(), a.decode().rows(slice(1, 4)))  # micro-batches
    same(Batch.concat([a, b]).decode(), Batch.concat([a.decode(), b.decode()]))  # a batch across two blocks
    assert a.decode().decode() is not None  # decoding a decoded batch keeps it
