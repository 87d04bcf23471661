"""Re-ranking of each query's top-k candidates with a pairwise scorer (GRAM's DAM / ITM head).

Difference from the reference (``refine_score_matrix``): the reference sets every candidate outside the
top-k to 0, so they tie with each other (and with any re-ranked pair scoring 0) and their order is lost.
Here a candidate outside the top-k keeps its embedding score shifted below the query's lowest re-ranked
score, so it still ranks after every re-ranked candidate but the non-top-k candidates keep their
original relative order (ties included), and R@k for k above the re-rank depth stays meaningful.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PairScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _pair_scores(query_idx: torch.Tensor, cand_idx: torch.Tensor, fn: PairScoreFn, batch_size: int,
                 progress: str | None = None) -> torch.Tensor:
    """Score P (query, candidate) pairs in batches: (P,), (P,) -> (P,) float64; a progress bar titled ``progress``
    unless it is None."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    starts = range(0, query_idx.numel(), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc=progress, unit="batch", leave=False, disable=progress is None):
            q, c = query_idx[start : start + batch_size], cand_idx[start : start + batch_size]
            scores = fn(q, c)
            if scores.shape != q.shape:
                raise ValueError(f"pair_score_fn returned shape {tuple(scores.shape)} for {q.numel()} pairs; "
                                 "it must return one score per pair")
            out.append(scores.detach().to("cpu", torch.float64))
    return torch.cat(out)


def rerank_topk(scores: torch.Tensor, k: int, pair_score_fn: PairScoreFn, batch_size: int = 25,
                progress: str | None = None) -> torch.Tensor:
    """Replace each query's top-k scores by pairwise re-ranking scores.

    Args:
        scores: (Nq, Nc) embedding scores, higher = better (e.g. -volume).
        k: re-rank depth per query (the reference uses 50); clipped to Nc.
        pair_score_fn: ``fn(query_idx (P,), cand_idx (P,)) -> (P,)`` higher = better, e.g. the matching
            head's "match" probability. For the other direction call ``rerank_topk(scores.T, k, fn_swapped)``
            where ``fn_swapped(v, t) = fn(t, v)``.
        batch_size: pairs per ``pair_score_fn`` call.
        progress: the title of a progress bar over the pair batches (None: no bar).
    Returns:
        (Nq, Nc) float64 scores: the top-k entries of each row hold the pair scores; every other entry is
        ``original - row_max + (row_min_pair_score - 1)``, i.e. strictly below all of the row's re-ranked
        scores with the original order (and ties) preserved. Top-k ties at the k-th place are cut as
        ``torch.topk`` cuts them.
    """
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a 2-D float tensor, got shape {tuple(scores.shape)} dtype {scores.dtype}")
    if k < 1:
        raise ValueError(f"re-rank depth k must be >= 1, got {k}")
    n_q, n_c = scores.shape
    k = min(k, n_c)
    base = scores.detach().to("cpu", torch.float64)  # (Nq, Nc)
    top = base.topk(k, dim=1).indices  # (Nq, k)
    query_idx = torch.arange(n_q).unsqueeze(1).expand(n_q, k)  # (Nq, k)
    pair = _pair_scores(query_idx.reshape(-1), top.reshape(-1), pair_score_fn, batch_size, progress).view(n_q, k)
    if torch.isnan(pair).any():
        raise ValueError("pair_score_fn returned NaN; cannot rank those pairs")
    # Shift the whole row so its best non-re-ranked score sits 1 below its worst re-ranked score.
    shift = pair.amin(dim=1, keepdim=True) - 1.0 - base.amax(dim=1, keepdim=True)  # (Nq, 1)
    out = base + shift  # (Nq, Nc)
    out.scatter_(1, top, pair)
    return out
