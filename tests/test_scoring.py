"""Blockwise scores, streaming two-way retrieval metrics and top-k re-ranking."""

import random

import pytest
import torch
import torch.nn.functional as F

from gram.eval import scoring
from gram.eval.metrics import retrieval_metrics, target_ranks
from gram.eval.rerank import rerank_topk
from gram.eval.scoring import (
    retrieval_metrics_from_embeddings,
    retrieval_ranks_from_embeddings,
    score_blocks,
    similarity_matrix,
)
from gram.losses import volume


def det_volume(anchor: torch.Tensor, *data: torch.Tensor) -> torch.Tensor:
    """Reference volume: sqrt|det| of the explicit (N1, N2, k, k) Gram tensor in float64."""
    n1, n2 = anchor.shape[0], data[0].shape[0]
    rows = [anchor.double().unsqueeze(1).expand(n1, n2, -1)]  # (N1, N2, d)
    rows += [x.double().unsqueeze(0).expand(n1, n2, -1) for x in data]  # (N1, N2, d) each
    vectors = torch.stack(rows, dim=2)  # (N1, N2, k, d)
    gram = vectors @ vectors.transpose(-1, -2)  # (N1, N2, k, k)
    return torch.det(gram).abs().sqrt()  # (N1, N2)


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def caption_targets(n_video: int, n_text: int, seed: int) -> list:
    """Every video gets >= 1 caption; some captions name two videos; caption order is shuffled."""
    rng = random.Random(seed)
    firsts = list(range(n_video)) + [rng.randrange(n_video) for _ in range(n_text - n_video)]
    rng.shuffle(firsts)
    return [f if rng.random() < 0.8 else [f, rng.randrange(n_video)] for f in firsts]


def video_targets(text_to_video: list, n_video: int) -> list[list[int]]:
    """Transpose of the caption targets: all captions naming video j."""
    sets = [[t] if isinstance(t, int) else t for t in text_to_video]
    return [[i for i, s in enumerate(sets) if j in s] for j in range(n_video)]


def test_volume_scores_are_negative_det_volume():
    t, v, a = unit(9, 6, 0), unit(7, 6, 1), unit(7, 6, 2)
    got = similarity_matrix(t, [v, a], "volume", chunk_size=4)
    torch.testing.assert_close(got.double(), -det_volume(t, v, a), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, -volume(t, v, a), atol=1e-6, rtol=0)  # the training function


def test_four_modality_volume_and_cosine():
    t, v, a, s = unit(5, 8, 3), unit(6, 8, 4), unit(6, 8, 5), unit(6, 8, 6)
    got = similarity_matrix(t, [v, a, s], "volume", chunk_size=3)
    torch.testing.assert_close(got.double(), -det_volume(t, v, a, s), atol=1e-5, rtol=0)
    raw_t, raw_v = 3 * t, torch.randn(6, 8)  # unnormalised inputs still give true cosines
    cos = similarity_matrix(raw_t, [raw_v], "cosine", chunk_size=4)
    torch.testing.assert_close(cos, F.cosine_similarity(raw_t.unsqueeze(1), raw_v.unsqueeze(0), dim=-1))


def test_score_blocks_cover_matrix_once():
    t, v = unit(10, 4, 7), unit(7, 4, 8)
    seen = torch.zeros(10, 7, dtype=torch.long)
    for rows, cols, tile in score_blocks(t, [v], "cosine", chunk_size=3):
        assert tile.shape == (rows.stop - rows.start, cols.stop - cols.start)
        assert tile.shape[0] <= 3 and tile.shape[1] <= 3
        seen[rows, cols] += 1
    assert (seen == 1).all()


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_chunked_matrix_equals_unchunked(chunk):
    t, v, a = unit(13, 5, 9), unit(11, 5, 10), unit(11, 5, 11)
    torch.testing.assert_close(similarity_matrix(t, [v, a], chunk_size=chunk),
                               similarity_matrix(t, [v, a], chunk_size=1000), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("kind", "n_data", "chunk"), [("volume", 2, 5), ("volume", 3, 8), ("cosine", 1, 3)])
def test_streaming_equals_full_matrix_metrics(kind, n_data, chunk):
    n_video, n_text = 19, 41
    t2v = caption_targets(n_video, n_text, seed=chunk)
    text = unit(n_text, 6, 20)
    data = [unit(n_video, 6, 21 + m) for m in range(n_data)]
    text[3] = text[4]  # duplicated rows and columns create exact score ties
    for x in data:
        x[5] = x[6]
    streamed_t2v, streamed_v2t = retrieval_ranks_from_embeddings(text, data, t2v, kind, chunk_size=chunk)
    full = similarity_matrix(text, data, kind, chunk_size=chunk)
    assert torch.equal(streamed_t2v, target_ranks(full, t2v))
    assert torch.equal(streamed_v2t, target_ranks(full.T, video_targets(t2v, n_video)))
    metrics = retrieval_metrics_from_embeddings(text, data, t2v, kind, chunk_size=chunk)
    for key, value in retrieval_metrics(full, t2v).items():
        assert metrics[f"t2v_{key}"] == pytest.approx(value)
    for key, value in retrieval_metrics(full.T, video_targets(t2v, n_video)).items():
        assert metrics[f"v2t_{key}"] == pytest.approx(value)


@pytest.mark.parametrize("max_pending", [0, 1])
def test_streaming_recomputes_evicted_tiles_exactly(monkeypatch, max_pending):
    # Targets scattered over every tile and a tiny pending budget force the recompute path of pass 2.
    monkeypatch.setattr(scoring, "MAX_PENDING_TILES", max_pending)
    rng = random.Random(70)
    t2v = [[rng.randrange(15) for _ in range(3)] for _ in range(30)] + list(range(15))
    text, video = unit(45, 5, 71), unit(15, 5, 72)
    got_t2v, got_v2t = retrieval_ranks_from_embeddings(text, [video], t2v, "cosine", chunk_size=4)
    full = similarity_matrix(text, [video], "cosine", chunk_size=4)
    assert torch.equal(got_t2v, target_ranks(full, t2v))
    assert torch.equal(got_v2t, target_ranks(full.T, video_targets(t2v, 15)))


def test_streaming_with_callable_score_and_integer_ties():
    # Small-integer features give exact dot products, so ties are exact in every tile.
    gen = torch.Generator().manual_seed(30)
    text, video = torch.randint(-1, 2, (25, 3), generator=gen).float(), torch.randint(-1, 2, (12, 3), generator=gen).float()
    t2v = caption_targets(12, 25, seed=31)
    dot = lambda a, b: a @ b.T  # noqa: E731  (b1, d) @ (d, b2) -> (b1, b2)
    t2v_ranks, v2t_ranks = retrieval_ranks_from_embeddings(text, [video], t2v, dot, chunk_size=4)
    full = text @ video.T  # (25, 12)
    assert torch.equal(t2v_ranks, target_ranks(full, t2v))
    assert torch.equal(v2t_ranks, target_ranks(full.T, video_targets(t2v, 12)))


def test_collapsed_embeddings_rank_last_both_ways():
    n_video, caps = 8, 3
    t2v = [j for j in range(n_video) for _ in range(caps)]
    text = unit(1, 4, 40).expand(n_video * caps, 4).contiguous()
    video = unit(1, 4, 41).expand(n_video, 4).contiguous()
    m = retrieval_metrics_from_embeddings(text, [video], t2v, "cosine", chunk_size=5)
    assert m["t2v_r1"] == 0.0 and m["t2v_medr"] == n_video
    assert m["v2t_r1"] == 0.0 and m["v2t_medr"] == n_video * caps - caps + 1
    assert (m["t2v_n_queries"], m["v2t_n_queries"]) == (n_video * caps, n_video)


def test_streaming_input_errors():
    text, video = unit(4, 3, 50), unit(3, 3, 51)
    with pytest.raises(ValueError, match="candidate 2 is no text's target"):
        retrieval_metrics_from_embeddings(text, [video], [0, 1, 1, 0], "cosine")
    with pytest.raises(ValueError, match="one data modality"):
        retrieval_metrics_from_embeddings(text, [video, video], [0, 1, 2, 0], "cosine")
    with pytest.raises(ValueError, match=r"data\[1\] has shape"):
        similarity_matrix(text, [video, unit(2, 3, 52)])
    with pytest.raises(ValueError, match="unknown score kind"):
        similarity_matrix(text, [video], "euclid")


def test_rerank_changes_only_the_topk_block():
    gen = torch.Generator().manual_seed(60)
    scores = torch.randint(0, 6, (7, 12), generator=gen).float()  # many ties outside the top-k
    pair_table = torch.rand(7, 12, generator=gen, dtype=torch.float64)
    calls = []

    def pair_fn(q, c):
        calls.append(q.numel())
        return pair_table[q, c]

    k = 4
    out = rerank_topk(scores, k, pair_fn, batch_size=5)
    top = scores.topk(k, dim=1).indices
    assert sum(calls) == 7 * k and max(calls) <= 5
    for i in range(7):
        in_top = torch.zeros(12, dtype=torch.bool)
        in_top[top[i]] = True
        torch.testing.assert_close(out[i, in_top], pair_table[i, in_top])
        assert out[i, ~in_top].max() < out[i, in_top].min()
        rest_new, rest_old = out[i, ~in_top], scores[i, ~in_top].double()
        # Same relative order and the same ties among the candidates that were not re-ranked.
        assert torch.equal(rest_new.unsqueeze(0) > rest_new.unsqueeze(1), rest_old.unsqueeze(0) > rest_old.unsqueeze(1))
        assert torch.equal(rest_new.unsqueeze(0) == rest_new.unsqueeze(1), rest_old.unsqueeze(0) == rest_old.unsqueeze(1))


def test_rerank_both_directions_and_full_depth():
    gen = torch.Generator().manual_seed(61)
    scores = torch.randn(5, 6, generator=gen)
    pair_table = torch.rand(5, 6, generator=gen)
    backward = rerank_topk(scores.T, 2, lambda v, t: pair_table[t, v])
    top = scores.T.topk(2, dim=1).indices  # (6, 2) texts re-ranked per video
    assert backward.shape == (6, 5)
    torch.testing.assert_close(backward.gather(1, top), pair_table.T.gather(1, top).double())
    assert torch.equal(backward.argmax(1), top.gather(1, pair_table.T.gather(1, top).argmax(1, keepdim=True)).squeeze(1))
    full = rerank_topk(scores, 100, lambda q, c: pair_table[q, c])
    torch.testing.assert_close(full, pair_table.double())


def test_rerank_errors():
    with pytest.raises(ValueError, match="k must be >= 1"):
        rerank_topk(torch.zeros(2, 2), 0, lambda q, c: q.float())
    with pytest.raises(ValueError, match="one score per pair"):
        rerank_topk(torch.zeros(2, 2), 1, lambda q, c: torch.zeros(1))
