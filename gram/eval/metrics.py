"""Retrieval and classification metrics computed from a score matrix.

Conventions shared by every function here:

* ``scores`` is (N_queries, N_candidates); a higher score ranks a candidate earlier.
* ``targets[i]`` is the index (int) or the indices (list of ints) of the correct candidates of query i.
  The rank of a query is the rank of its best-ranked correct candidate.
* Ties are broken pessimistically: a correct candidate ranks after every non-target candidate with an
  equal score. A collapsed model (constant scores) therefore gets rank N_candidates - n_targets + 1, i.e.
  R@1 = 0, instead of the optimistic rank 1 that an argsort may hand it.
* Nothing materialises an (N_queries, N_candidates) argsort: a rank is a count of the non-target
  candidates scoring at least as high as the best target, computed over chunks of queries.

The reference evaluator rounds R@k to one decimal and uses torch's lower median; here nothing is rounded
and MedR is the usual median (the mean of the two middle ranks for an even number of queries).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Targets = Sequence[int | Sequence[int]] | torch.Tensor

# Elements of one query chunk: (chunk_rows, N_candidates) scores plus a bool mask of the same shape.
# 2**22 keeps a chunk near 16 MiB of float32 whatever N_candidates is.
DEFAULT_CHUNK_ELEMENTS = 2**22
RECALL_AT = (1, 5, 10)


def best_metric_names(task: str) -> tuple[str, ...]:
    """The results of an evaluation `task` that can choose the best checkpoint (`trainer.best_metric`): those where
    higher is better (ranks such as medr are not)."""
    if task == "classification":
        return ("top1", "top5", "map")
    return tuple(f"{direction}_r{k}" for direction in ("t2v", "v2t") for k in RECALL_AT)


def target_lists(targets: Targets, n_queries: int, n_candidates: int) -> list[list[int]]:
    """Normalise ``targets`` to one non-empty list of candidate indices per query.

    Accepts a 1-D integer tensor (one target per query), a sequence of ints, or a sequence of
    sequences of ints (several correct candidates per query). Raises ``ValueError`` for a length
    mismatch or an empty target list and ``IndexError`` for an index outside [0, n_candidates).
    """
    if isinstance(targets, torch.Tensor):
        if targets.dim() != 1 or targets.is_floating_point():
            raise ValueError(f"targets tensor must be 1-D integer, got shape {tuple(targets.shape)} "
                             f"dtype {targets.dtype}; pass a list of lists for several targets per query")
        targets = targets.tolist()
    if len(targets) != n_queries:
        raise ValueError(f"got {len(targets)} targets for {n_queries} queries; need one entry per score row")
    lists = [[int(t)] if isinstance(t, int) or _is_int_scalar(t) else [int(x) for x in t] for t in targets]
    for i, lst in enumerate(lists):
        if not lst:
            raise ValueError(f"query {i} has an empty target list; every query needs a correct candidate")
        bad = [t for t in lst if not 0 <= t < n_candidates]
        if bad:
            raise IndexError(f"query {i} has target index {bad[0]} outside [0, {n_candidates})")
    return lists


def _is_int_scalar(value: object) -> bool:
    """True for numpy/torch integer scalars (0-d), which are not ``int`` instances."""
    return hasattr(value, "__index__") and getattr(value, "ndim", 0) == 0


def _padded_targets(lists: list[list[int]], pad: int) -> torch.Tensor:
    """(N_queries, max_targets) long tensor; short rows are filled with ``pad``."""
    width = max(len(lst) for lst in lists)
    out = torch.full((len(lists), width), pad, dtype=torch.long)
    for i, lst in enumerate(lists):
        out[i, : len(lst)] = torch.tensor(lst, dtype=torch.long)
    return out


def _chunk_rows(n_candidates: int, chunk_size: int | None) -> int:
    """Queries per chunk: ``chunk_size`` if given, else as many as fit DEFAULT_CHUNK_ELEMENTS."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(n_candidates, 1))


def _chunk_ranks(chunk: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    """0-based pessimistic ranks of one chunk.

    chunk: (b, Nc) scores; padded: (b, T) target indices padded with Nc. Returns (b,) long.
    """
    b, n_cand = chunk.shape
    if torch.isnan(chunk).any():
        raise ValueError("scores contain NaN; a NaN cannot be ranked, fix the model or the score function")
    # The extra column absorbs the padding index so scatter needs no per-row lengths.
    is_target = torch.zeros(b, n_cand + 1, dtype=torch.bool)  # (b, Nc + 1)
    is_target.scatter_(1, padded, True)
    is_target = is_target[:, :n_cand]  # (b, Nc)
    best = chunk.masked_fill(~is_target, float("-inf")).amax(dim=1, keepdim=True)  # (b, 1)
    return ((chunk >= best) & ~is_target).sum(dim=1)  # (b,)


def target_ranks(scores: torch.Tensor, targets: Targets, chunk_size: int | None = None) -> torch.Tensor:
    """0-based rank of the best-ranked correct candidate of every query, ties broken pessimistically.

    rank_i = #{non-target candidates j : scores[i, j] >= max over targets t of scores[i, t]}.

    Args:
        scores: (Nq, Nc) float tensor (any float dtype, CPU or not), higher = better.
        targets: length-Nq int tensor, list of ints, or list of lists of ints.
        chunk_size: queries per chunk; by default about 2**22 / Nc so memory stays bounded.
    Returns:
        (Nq,) long tensor of ranks in [0, Nc - 1].
    """
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a 2-D float tensor, got shape {tuple(scores.shape)} dtype {scores.dtype}")
    n_q, n_c = scores.shape
    padded = _padded_targets(target_lists(targets, n_q, n_c), pad=n_c)  # (Nq, T)
    rows = _chunk_rows(n_c, chunk_size)
    ranks = [
        _chunk_ranks(scores[start : start + rows].cpu(), padded[start : start + rows])
        for start in range(0, n_q, rows)
    ]
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def metrics_from_ranks(ranks: torch.Tensor, n_candidates: int) -> dict[str, float]:
    """R@1/5/10 (percent), MedR and MeanR (1-based) from (Nq,) 0-based ranks."""
    if ranks.numel() == 0:
        raise ValueError("no queries: cannot compute retrieval metrics from an empty rank vector")
    ranks = ranks.to(torch.float64)
    out: dict[str, float] = {f"r{k}": 100.0 * (ranks < k).double().mean().item() for k in RECALL_AT}
    out["medr"] = ranks.quantile(0.5).item() + 1.0  # linear interpolation: numpy's median
    out["meanr"] = ranks.mean().item() + 1.0
    out["n_queries"] = int(ranks.numel())
    out["n_candidates"] = int(n_candidates)
    return out


def retrieval_metrics(scores: torch.Tensor, targets: Targets, chunk_size: int | None = None) -> dict:
    """Retrieval metrics of a score matrix.

    Args:
        scores: (Nq, Nc) float tensor, higher = better.
        targets: per query, the index or list of indices of its correct candidates.
        chunk_size: queries per chunk (memory bound), see ``target_ranks``.
    Returns:
        dict with ``r1``, ``r5``, ``r10`` (percent of queries whose best correct candidate ranks in the
        top k), ``medr`` and ``meanr`` (1-based ranks), ``n_queries`` and ``n_candidates``.
    """
    return metrics_from_ranks(target_ranks(scores, targets, chunk_size), scores.shape[1])


def _label_matrix(labels: Targets | torch.Tensor, n: int, n_classes: int) -> torch.Tensor:
    """(N, C) bool matrix of positives from single labels, lists of labels or an (N, C) 0/1 matrix."""
    if isinstance(labels, torch.Tensor) and labels.dim() == 2:
        if tuple(labels.shape) != (n, n_classes):
            raise ValueError(f"label matrix has shape {tuple(labels.shape)}, scores have ({n}, {n_classes})")
        return labels != 0
    lists = target_lists(labels, n, n_classes)
    out = torch.zeros(n, n_classes, dtype=torch.bool)
    out[_pair_rows(lists), _pair_cols(lists)] = True
    return out


def _pair_rows(lists: list[list[int]]) -> torch.Tensor:
    """Row index of every (row, label) pair, flattened."""
    return torch.tensor([i for i, lst in enumerate(lists) for _ in lst], dtype=torch.long)


def _pair_cols(lists: list[list[int]]) -> torch.Tensor:
    """Label index of every (row, label) pair, flattened."""
    return torch.tensor([c for lst in lists for c in lst], dtype=torch.long)


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Tie-aware average precision of every column.

    AP_c = mean over positives i of #{positives j : s_j >= s_i} / #{all j : s_j >= s_i}, which is the
    step-wise AP over distinct thresholds (the definition scikit-learn uses).

    Args:
        scores: (N, C) float; positives: (N, C) bool.
    Returns:
        (C,) float64 AP per class, NaN for a class without positives.
    """
    s = scores.double().T.contiguous()  # (C, N)
    pos = positives.T  # (C, N)
    n = s.shape[1]
    sorted_all = s.sort(dim=1).values  # (C, N) ascending
    # Negatives become -inf so they sit below every finite score and never count as positives.
    sorted_pos = s.masked_fill(~pos, float("-inf")).sort(dim=1).values  # (C, N)
    n_ge_all = n - torch.searchsorted(sorted_all, s, side="left")  # (C, N)
    n_ge_pos = n - torch.searchsorted(sorted_pos, s, side="left")  # (C, N)
    precision = (n_ge_pos / n_ge_all).masked_fill(~pos, 0.0)  # (C, N)
    n_pos = pos.sum(dim=1)  # (C,)
    ap = precision.sum(dim=1) / n_pos.clamp(min=1)  # (C,)
    return ap.masked_fill(n_pos == 0, float("nan"))


def classification_metrics(scores: torch.Tensor, labels: Targets | torch.Tensor) -> dict:
    """Zero-shot classification metrics.

    Args:
        scores: (N, C) float, higher = more likely; column c scores class c.
        labels: single-label: length-N ints (tensor or list); multi-label: list of lists of ints or an
            (N, C) 0/1 matrix.
    Returns:
        dict with ``top1`` and ``top5`` (percent of samples whose best-ranked positive class is in the
        top k, ties pessimistic; top5 is top-C when C < 5), ``map`` (mean over classes with at least one
        positive of the tie-aware average precision, percent), ``n_samples``, ``n_classes``.
    """
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a 2-D float tensor, got shape {tuple(scores.shape)} dtype {scores.dtype}")
    n, n_classes = scores.shape
    positives = _label_matrix(labels, n, n_classes)  # (N, C)
    if not positives.any(dim=1).all():
        first = int((~positives.any(dim=1)).nonzero()[0])
        raise ValueError(f"sample {first} has no positive label; every sample needs at least one class")
    ranks = target_ranks(scores, [row.nonzero().flatten().tolist() for row in positives])  # (N,)
    ap = average_precision(scores, positives)  # (C,)
    return {
        "top1": 100.0 * (ranks < 1).double().mean().item(),
        "top5": 100.0 * (ranks < 5).double().mean().item(),
        "map": 100.0 * ap[~ap.isnan()].mean().item(),
        "n_samples": n,
        "n_classes": n_classes,
    }
