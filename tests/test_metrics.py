"""Retrieval and classification metrics against straightforward loop implementations."""

import random

import numpy as np
import pytest
import torch

from gram.eval.metrics import (
    average_precision,
    classification_metrics,
    retrieval_metrics,
    target_ranks,
)


def loop_rank(row: np.ndarray, targets: list[int]) -> int:
    """Pessimistic 0-based rank by an explicit sort: equal scores put non-targets first."""
    order = sorted(range(len(row)), key=lambda j: (-row[j], j in targets))
    return next(pos for pos, j in enumerate(order) if j in targets)


def loop_metrics(scores: np.ndarray, targets: list[list[int]]) -> dict:
    ranks = np.array([loop_rank(scores[i], t) for i, t in enumerate(targets)])
    return {
        "r1": 100 * np.mean(ranks < 1),
        "r5": 100 * np.mean(ranks < 5),
        "r10": 100 * np.mean(ranks < 10),
        "medr": float(np.median(ranks + 1)),
        "meanr": float(np.mean(ranks + 1)),
    }


def tied_scores(n_q: int, n_c: int, seed: int) -> torch.Tensor:
    """Scores drawn from 4 values, so most rows contain ties with their targets."""
    return torch.randint(0, 4, (n_q, n_c), generator=torch.Generator().manual_seed(seed)).float()


def multi_targets(n_q: int, n_c: int, seed: int) -> list:
    rng = random.Random(seed)
    return [rng.randrange(n_c) if rng.random() < 0.5 else rng.sample(range(n_c), rng.randint(1, 4))
            for _ in range(n_q)]


def as_lists(targets: list) -> list[list[int]]:
    return [[t] if isinstance(t, int) else list(t) for t in targets]


@pytest.mark.parametrize("seed", range(4))
def test_retrieval_metrics_match_loop_with_ties_and_multi_targets(seed):
    scores = tied_scores(23, 17, seed)
    targets = multi_targets(23, 17, seed)
    got = retrieval_metrics(scores, targets)
    want = loop_metrics(scores.numpy(), as_lists(targets))
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert (got["n_queries"], got["n_candidates"]) == (23, 17)


def test_continuous_scores_match_loop():
    scores = torch.randn(40, 31, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    targets = [i % 31 for i in range(40)]
    want = [loop_rank(scores[i].numpy(), [t]) for i, t in enumerate(targets)]
    assert target_ranks(scores, targets).tolist() == want


def test_hand_computed_example():
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.2, 0.3], [0.0, 1.0, 0.5]])
    # query 0: target 0 is first; query 1: target 1 ties with 0 and 2 is higher -> after both;
    # query 2: targets {0, 2}, best is 2 with 1 above it.
    assert target_ranks(scores, [0, 1, [0, 2]]).tolist() == [0, 2, 1]
    m = retrieval_metrics(scores, [0, 1, [0, 2]])
    assert m["r1"] == pytest.approx(100 / 3) and m["medr"] == 2 and m["meanr"] == pytest.approx(2.0)


@pytest.mark.parametrize("n_c", [1, 2, 13])
def test_constant_scores_rank_last(n_c):
    m = retrieval_metrics(torch.zeros(9, n_c), [i % n_c for i in range(9)])
    assert m["r1"] == (100.0 if n_c == 1 else 0.0)
    assert m["medr"] == n_c and m["meanr"] == n_c


def test_constant_scores_multi_target_rank_after_non_targets():
    # Two targets among 6 equal candidates: the best target comes after the 4 non-targets.
    assert target_ranks(torch.ones(1, 6), [[1, 3]]).tolist() == [4]


@pytest.mark.parametrize("chunk", [1, 2, 5, 1000])
def test_chunked_equals_unchunked(chunk):
    scores = tied_scores(31, 11, 7)
    targets = multi_targets(31, 11, 7)
    assert torch.equal(target_ranks(scores, targets, chunk_size=chunk), target_ranks(scores, targets))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_dtypes_give_same_ranks(dtype):
    scores = tied_scores(12, 9, 3)  # small integers: exact in every float dtype
    targets = multi_targets(12, 9, 3)
    assert torch.equal(target_ranks(scores.to(dtype), targets), target_ranks(scores, targets))


def test_even_median_is_mean_of_middle_ranks():
    scores = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2 + [[0.0, 0.5, 0.0, 1.0]] * 2)
    # ranks (1-based): query 0 -> 1, query 1 -> 4 (pessimistic tie), query 2 -> 2, query 3 -> 1
    m = retrieval_metrics(scores, [0, 1, 1, 3])
    assert m["medr"] == pytest.approx(1.5) and m["meanr"] == pytest.approx(2.0)


def test_tensor_and_numpy_targets_accepted():
    scores = tied_scores(5, 6, 1)
    by_list = target_ranks(scores, [0, 1, 2, 3, 4])
    assert torch.equal(target_ranks(scores, torch.arange(5)), by_list)
    assert torch.equal(target_ranks(scores, list(np.arange(5))), by_list)


def test_invalid_inputs_raise():
    with pytest.raises(IndexError, match="target index 7"):
        target_ranks(torch.zeros(2, 3), [0, 7])
    with pytest.raises(ValueError, match="empty target list"):
        target_ranks(torch.zeros(2, 3), [0, []])
    with pytest.raises(ValueError, match="2 targets for 3 queries"):
        target_ranks(torch.zeros(3, 3), [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(torch.tensor([[0.0, float("nan")]]), [0])
    with pytest.raises(ValueError, match="2-D float"):
        target_ranks(torch.zeros(3, dtype=torch.long), [0])


def loop_average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP over distinct thresholds: sum of recall increments times precision at each threshold."""
    ap, prev_recall = 0.0, 0.0
    for thr in sorted(set(scores.tolist()), reverse=True):
        selected = scores >= thr
        recall = positives[selected].sum() / positives.sum()
        ap += (recall - prev_recall) * positives[selected].sum() / selected.sum()
        prev_recall = recall
    return ap


def test_average_precision_hand_example():
    scores = torch.tensor([[0.9], [0.8], [0.7]])
    ap = average_precision(scores, torch.tensor([[True], [False], [True]]))
    assert ap.item() == pytest.approx((1 + 2 / 3) / 2)


def test_classification_single_label_matches_loops():
    gen = torch.Generator().manual_seed(11)
    scores = torch.randint(0, 5, (40, 8), generator=gen).float()
    labels = torch.randint(0, 8, (40,), generator=gen)
    m = classification_metrics(scores, labels)
    ranks = np.array([loop_rank(scores[i].numpy(), [int(labels[i])]) for i in range(40)])
    onehot = np.eye(8, dtype=bool)[labels.numpy()]
    aps = [loop_average_precision(scores[:, c].numpy(), onehot[:, c]) for c in range(8) if onehot[:, c].any()]
    assert m["top1"] == pytest.approx(100 * np.mean(ranks < 1))
    assert m["top5"] == pytest.approx(100 * np.mean(ranks < 5))
    assert m["map"] == pytest.approx(100 * np.mean(aps))
    assert (m["n_samples"], m["n_classes"]) == (40, 8)


def test_classification_multi_label_list_and_matrix_agree_with_loops():
    gen = torch.Generator().manual_seed(12)
    scores = torch.randn(30, 6, generator=gen)
    scores[::3, 2] = scores[::3, 4]  # some exact ties across classes
    matrix = torch.rand(30, 6, generator=gen) < 0.3
    matrix[torch.arange(30), torch.randint(0, 6, (30,), generator=gen)] = True  # >= 1 positive each
    lists = [row.nonzero().flatten().tolist() for row in matrix]
    from_lists, from_matrix = classification_metrics(scores, lists), classification_metrics(scores, matrix.int())
    assert from_lists == from_matrix
    pos = matrix.numpy()
    aps = [loop_average_precision(scores[:, c].numpy(), pos[:, c]) for c in range(6) if pos[:, c].any()]
    assert from_lists["map"] == pytest.approx(100 * np.mean(aps))
    ranks = np.array([loop_rank(scores[i].numpy(), lists[i]) for i in range(30)])
    assert from_lists["top1"] == pytest.approx(100 * np.mean(ranks < 1))


def test_classification_sample_without_label_raises():
    with pytest.raises(ValueError, match="sample 1 has no positive"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]))
