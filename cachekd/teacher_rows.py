"""What a logit cache stores for each position, computed from a teacher's logits: the top-k ids and τ=1
log-probabilities, the tail's log-sum-exp per temperature, and the chunk statistics (normaliser, entropy, top-k
mass). Used by precompute to fill the cache and by `cachekd verify --recompute` to check it."""

from __future__ import annotations

import torch

from cachekd.rows import row_blocks, tail_underflows, topk_rows

ENTROPY_STRIDE = 8  # the entropy statistic is taken on every 8th position: it is a summary, not training data


@torch.no_grad()
def teacher_targets(logits: torch.Tensor, vocab_size: int, k: int | None, temperatures: list[float]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What the cache stores for a batch of teacher logits (b, L, V_model), computed on their device in float32.

    Returns (arrays, stats). top-k mode: `ids` (b,L,k), `logprobs` (b,L,k) τ=1 log-probabilities,
    `tail_lse` (b,L,n_τ) = logsumexp over non-top-k v of log p_v/τ. Full mode (k None): `logits` (b,L,V) fp16.
    Stats: `lse` (b,L) the τ=1 log-normaliser (non-finite when the teacher produced NaN/inf), `entropy` (b, L/8)
    at τ=1 on every 8th position, and `topk_mass` (b,L,n_τ). Padded logits beyond `vocab_size` are dropped.

    Cost: the positions are taken a block of rows at a time (``cachekd.rows``: on CPU the temporaries stay in
    cache; on GPU the batch is one block), and one fused softmax serves the normaliser, the entropy and every
    tail. The tail is summed directly over the non-top-k probabilities (zeroed in place), never as 1 − Σ top-k,
    so a tiny tail keeps its relative precision; τ = 2 reuses them through a square root. Rows whose tail lost
    terms to float32 underflow, and other temperatures, take an exact masked log-sum-exp.
    """
    z = logits[..., :vocab_size]
    b, L = z.shape[:2]
    flat = z.reshape(b * L, vocab_size)
    n, dev = flat.shape[0], flat.device
    lse = torch.empty(n, device=dev)
    per_window = -(-L // ENTROPY_STRIDE)
    entropy = torch.empty(b * per_window, device=dev)
    if k is not None:
        ids = torch.empty(n, k, dtype=torch.int64, device=dev)
        logprobs = torch.empty(n, k, device=dev)
        tails = torch.empty(n, len(temperatures), device=dev)
    buf = None
    for rows in row_blocks(flat):
        zb = flat[rows].float()
        if buf is None:
            buf = torch.empty_like(zb)
        p = torch.softmax(zb, dim=-1, out=buf[: zb.shape[0]])        # (r, V), one fused pass into a reused buffer
        if k is None:
            m, top = zb.max(dim=-1)
            lse_b = m - p.gather(1, top[:, None]).squeeze(1).log()
        else:
            vals, idx = topk_rows(zb, k)                              # unsorted
            top = vals.argmax(-1, keepdim=True)
            # log p at the max is −log Σ exp(z − max) ∈ [−log V, 0]: the normaliser to float32 precision.
            lse_b = (vals.gather(1, top) - p.gather(1, idx.gather(1, top)).log()).squeeze(1)
        lse[rows] = lse_b
        r = torch.arange(rows.start, rows.stop, device=dev)
        sel = ((r % L) % ENTROPY_STRIDE == 0).nonzero().squeeze(1)
        if sel.numel():
            j = (r[sel] // L) * per_window + (r[sel] % L) // ENTROPY_STRIDE
            # (−inf logits, e.g. masked tokens, have p = 0: clamped so 0·z stays 0 instead of NaN)
            entropy[j] = lse_b[sel] - (p[sel] * zb[sel].clamp_min(torch.finfo(zb.dtype).min)).sum(-1)
        if k is None:
            continue
        ids[rows] = idx
        logprobs[rows] = vals - lse_b[:, None]
        p.scatter_(-1, idx, 0.0)                                      # the tail terms only
        sums = {}
        if 1.0 in temperatures:
            sums[1.0] = p.sum(-1)
        if 2.0 in temperatures:
            sums[2.0] = p.sqrt_().sum(-1)                             # p^(1/2) = exp((z − lse)/2)
        for t, tau in enumerate(temperatures):
            if tau in sums:
                tail = sums[tau].log()  # log Σ_tail exp((z − lse)/τ), what the cache stores
                # terms are lost where p = exp(z − lse) < e^-87.3 (the softmax's exp(z − max) underflows there
                # or earlier), so the check is on the sum of p^(1/τ) itself
                redo = tail_underflows(tail, vocab_size, sqrt=tau == 2.0) if k < vocab_size else None
            else:
                tail, redo = None, torch.ones(zb.shape[0], dtype=torch.bool, device=dev)
            if redo is not None and bool(redo.any()):
                exact = torch.logsumexp(zb[redo].scatter(-1, idx[redo], float("-inf")) / tau, dim=-1)
                exact -= lse_b[redo] / tau
                tail = exact if tail is None else tail.index_put((redo,), exact)
            tails[rows, t] = tail
    stats = {"lse": lse.view(b, L), "entropy": entropy.view(b, per_window)}
    if k is None:
        return {"logits": z.half()}, stats
    masses = []
    for t, tau in enumerate(temperatures):
        head = torch.logsumexp(logprobs / tau, dim=-1)
        masses.append(torch.exp(head - torch.logaddexp(head, tails[:, t])))
    stats["topk_mass"] = torch.stack(masses, -1).view(b, L, -1)
    return ({"ids": ids.view(b, L, k), "logprobs": logprobs.view(b, L, k), "tail_lse": tails.view(b, L, -1)}, stats)
