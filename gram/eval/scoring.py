"""Blockwise text-to-data score matrices and streaming retrieval metrics.

Scores follow the metrics convention (higher = better):

* ``kind="volume"``: score[i, j] = -Vol(text_i, data_1[j], ..., data_{k-1}[j]), the GRAM volume of the
  k-dimensional parallelotope (``gram.losses.volume.negative_volume``, the function training uses); a
  smaller volume ranks first. float32 (float64 if any input is float64), whatever the feature dtype.
* ``kind="cosine"``: score[i, j] = cos(text_i, data[j]) for a single data modality (T-V, T-A). Inputs are
  L2-normalised here, so unnormalised features still give a true cosine.
* a callable ``fn(anchor_block (b1, d), *data_blocks (b2, d)) -> (b1, b2)`` used as is (higher = better).

Everything runs over square tiles of ``chunk_size`` rows and columns, so peak memory is a few tiles no
matter how many texts and candidates there are. ``retrieval_ranks_from_embeddings`` never holds the score
matrix at all: it ranks both directions in two passes over the tiles (see its docstring).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gram.eval.metrics import Targets, metrics_from_ranks, target_lists
from gram.losses.volume import negative_volume

BlockFn = Callable[..., torch.Tensor]
DEFAULT_CHUNK_SIZE = 1024
KINDS = ("volume", "cosine")
# Scored target tiles kept while waiting for their thresholds (see _target_tiles_pass).
MAX_PENDING_TILES = 8


@dataclass(frozen=True)
class _Prepared:
    """Inputs ready for tiling: the anchor, the data tensors and the tile score function."""

    anchor: torch.Tensor  # (Nt, d)
    data: tuple[torch.Tensor, ...]  # each (Nv, d)
    fn: BlockFn


def _dot(anchor: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Dot products of pre-normalised rows: anchor (b1, d) @ data (b2, d).T -> (b1, b2)."""
    return anchor @ data.T  # (b1, d) @ (d, b2) -> (b1, b2)


class _Tiler:
    """Scores of tiles that all have the same shape; ragged last tiles are zero-padded.

    BLAS picks kernels (and so summation orders) by matrix shape: with a ragged last tile the same
    feature pair can score differently by an ulp in different tiles, which breaks exact ties (a collapsed
    model would no longer tie everywhere). With one tile shape every tile computes a pair the same way.
    Only the last tile's inputs are padded (a (size, d) copy), and pad rows are cropped from the output.
    """

    def __init__(self, prepared: _Prepared, chunk_size: int):
        self.fn, self.anchor, self.data = prepared.fn, prepared.anchor, prepared.data
        self.n_rows, self.n_cols = prepared.anchor.shape[0], prepared.data[0].shape[0]
        self.row_size, self.col_size = _tile_side(self.n_rows, chunk_size), _tile_side(self.n_cols, chunk_size)
        self.device = prepared.anchor.device

    def row_spans(self) -> list[slice]:
        """Row slices of the tiles, covering range(Nt)."""
        return [slice(s, min(s + self.row_size, self.n_rows)) for s in range(0, self.n_rows, self.row_size)]

    def col_spans(self) -> list[slice]:
        """Column slices of the tiles, covering range(Nv)."""
        return [slice(s, min(s + self.col_size, self.n_cols)) for s in range(0, self.n_cols, self.col_size)]

    def tile(self, rows: slice, cols: slice) -> torch.Tensor:
        """Scores of anchor[rows] against data[cols]: (len(rows), len(cols))."""
        anchor = _padded_block(self.anchor, rows, self.row_size)  # (row_size, d)
        data = (_padded_block(x, cols, self.col_size) for x in self.data)  # (col_size, d) each
        out = self.fn(anchor, *data)  # (row_size, col_size)
        return out[: rows.stop - rows.start, : cols.stop - cols.start]


def _padded_block(x: torch.Tensor, span: slice, size: int) -> torch.Tensor:
    """x[span] (n, d) with zero rows appended up to ``size`` rows: (size, d)."""
    block = x[span]
    extra = size - block.shape[0]
    return torch.cat([block, block.new_zeros(extra, x.shape[1])]) if extra else block


def _tile_side(n: int, chunk_size: int) -> int:
    """Tile side <= chunk_size that splits n into equal tiles up to < 8 padding rows per tile.

    Multiples of 8 keep the GEMM kernels on their fast paths; n itself when it is below that.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_tiles = -(-n // chunk_size)
    side = max(1, -(-n // max(n_tiles, 1)))
    rounded = -(-side // 8) * 8
    return side if rounded > chunk_size or n <= 8 else rounded


def _prepare(anchor: torch.Tensor, data: Sequence[torch.Tensor], kind: str | BlockFn) -> _Prepared:
    """Validate shapes and pick the tile function; cosine inputs are normalised once here."""
    data = tuple(data)
    if anchor.dim() != 2 or not data:
        raise ValueError(f"need anchor (N, d) and at least one data tensor, got anchor {tuple(anchor.shape)} "
                         f"and {len(data)} data tensors")
    for m, x in enumerate(data):
        if x.dim() != 2 or x.shape[1] != anchor.shape[1] or x.shape[0] != data[0].shape[0]:
            raise ValueError(f"data[{m}] has shape {tuple(x.shape)}; every data tensor must be "
                             f"({data[0].shape[0]}, {anchor.shape[1]}) with row j = sample j")
    if callable(kind):
        return _Prepared(anchor, data, kind)
    if kind == "volume":
        return _Prepared(anchor, data, negative_volume)
    if kind == "cosine":
        if len(data) != 1:
            raise ValueError(f"kind='cosine' scores one data modality, got {len(data)}; use kind='volume'")
        return _Prepared(F.normalize(anchor, dim=-1), (F.normalize(data[0], dim=-1),), _dot)
    raise ValueError(f"unknown score kind {kind!r}; expected one of {KINDS} or a callable")


def score_blocks(
    anchor: torch.Tensor,
    data: Sequence[torch.Tensor],
    kind: str | BlockFn = "volume",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """Yield ``(rows, cols, tile)`` with tile = scores[rows, cols] of shape (len(rows), len(cols)).

    Args:
        anchor: (Nt, d) text features.
        data: k-1 tensors (Nv, d); row j of each belongs to candidate j.
        kind: "volume", "cosine" or a tile callable (see the module docstring).
        chunk_size: tile side; peak memory is O(chunk_size**2 + chunk_size * d) per tile.
    """
    tiler = _Tiler(_prepare(anchor, data, kind), chunk_size)
    with torch.no_grad():
        for rows in tiler.row_spans():
            for cols in tiler.col_spans():
                yield rows, cols, tiler.tile(rows, cols)


def similarity_matrix(
    anchor: torch.Tensor,
    data: Sequence[torch.Tensor],
    kind: str | BlockFn = "volume",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Full (Nt, Nv) score matrix (higher = better), assembled tile by tile.

    Only the output is O(Nt * Nv); intermediate memory is that of one tile. For volume scores this is
    -Vol, so it can be passed straight to ``retrieval_metrics`` and ``rerank_topk``.
    """
    out = None
    for rows, cols, tile in score_blocks(anchor, data, kind, chunk_size):
        if out is None:  # dtype and device of the score function's output, e.g. float32 for bf16 features
            out = tile.new_empty(anchor.shape[0], data[0].shape[0])  # (Nt, Nv)
        out[rows, cols] = tile
    return out if out is not None else anchor.new_zeros(anchor.shape[0], data[0].shape[0])  # an empty side


@dataclass(frozen=True)
class _Pairs:
    """Correct (text, candidate) pairs with texts renumbered in processing order."""

    rows: torch.Tensor  # (P,) text index in processing order
    cols: torch.Tensor  # (P,) candidate index
    order: torch.Tensor  # (Nt,) original text index of processing position p


def _target_pairs(text_to_video: Targets, n_text: int, n_video: int) -> _Pairs:
    """Flatten the targets into pairs; texts are reordered by their first candidate.

    The reordering puts the correct pairs near the tile diagonal, so a tile holding correct pairs is
    final (all thresholds of its rows and columns known) soon after it is scored; see _target_tiles_pass.
    """
    lists = target_lists(text_to_video, n_text, n_video)
    order = torch.tensor([min(lst) for lst in lists], dtype=torch.long).argsort(stable=True)  # (Nt,)
    position = torch.empty_like(order)
    position[order] = torch.arange(n_text)
    rows = torch.tensor([i for i, lst in enumerate(lists) for _ in set(lst)], dtype=torch.long)
    cols = torch.tensor([c for lst in lists for c in set(lst)], dtype=torch.long)
    missing = torch.ones(n_video, dtype=torch.bool).index_fill_(0, cols, False).nonzero().flatten()
    if missing.numel():
        raise ValueError(f"candidate {int(missing[0])} is no text's target ({missing.numel()} such), so it "
                         "has no correct text for video-to-text ranking; drop it or add its captions")
    return _Pairs(position[rows], cols, order)


def _pairs_by_tile(pairs: _Pairs, tiler: _Tiler) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """Tile (row block, col block) -> local (row, col) offsets of the correct pairs inside it."""
    row_block, col_block = pairs.rows // tiler.row_size, pairs.cols // tiler.col_size  # (P,) each
    out = {}
    for key in torch.stack([row_block, col_block], dim=1).unique(dim=0).tolist():  # (n_tiles, 2)
        sel = (row_block == key[0]) & (col_block == key[1])  # (P,)
        local_rows = pairs.rows[sel] - key[0] * tiler.row_size
        local_cols = pairs.cols[sel] - key[1] * tiler.col_size
        out[tuple(key)] = (local_rows.to(tiler.device), local_cols.to(tiler.device))
    return out


def _check_finite(values: torch.Tensor) -> None:
    """NaN scores cannot be ranked; fail instead of letting comparisons silently rank them first.

    One reduction is the cheap screen (a NaN makes the sum NaN); only a NaN sum, which +inf and -inf
    together can also give, pays for the exact elementwise test.
    """
    if values.sum().isnan() and torch.isnan(values).any():
        raise ValueError("score function returned NaN; check the features (zero vectors?) and the volume fn")


class _TwoWayRanker:
    """Pessimistic ranks of both directions, accumulated tile by tile.

    ``best_t[i]`` / ``best_v[j]`` are the best correct-pair scores of text i / candidate j (float64 copies
    of tile values, so casting back is exact); ``count_t`` / ``count_v`` count the non-target scores
    >= them. A tile can only be counted once the thresholds of all its rows and columns are final.
    """

    def __init__(self, tiler: _Tiler, by_tile: dict):
        self.tiler, self.by_tile = tiler, by_tile
        self.spans_t, self.spans_v = tiler.row_spans(), tiler.col_spans()
        kw = {"device": tiler.device}
        self.best_t = torch.full((tiler.n_rows,), float("-inf"), dtype=torch.float64, **kw)
        self.best_v = torch.full((tiler.n_cols,), float("-inf"), dtype=torch.float64, **kw)
        self.count_t = torch.zeros(tiler.n_rows, dtype=torch.long, **kw)
        self.count_v = torch.zeros(tiler.n_cols, dtype=torch.long, **kw)

    def tile(self, key: tuple[int, int]) -> torch.Tensor:
        """Scores of tile (row block, col block); always the same slices, hence bit-identical values."""
        tile = self.tiler.tile(self.spans_t[key[0]], self.spans_v[key[1]])  # (br, bc)
        _check_finite(tile)
        return tile

    def update_best(self, key: tuple[int, int], tile: torch.Tensor) -> None:
        """Raise the thresholds with the correct pairs inside this tile."""
        lr, lc = self.by_tile[key]
        vals = tile[lr, lc].double()  # (p,)
        self.best_t.scatter_reduce_(0, lr + self.spans_t[key[0]].start, vals, reduce="amax")
        self.best_v.scatter_reduce_(0, lc + self.spans_v[key[1]].start, vals, reduce="amax")

    def count(self, key: tuple[int, int], tile: torch.Tensor) -> None:
        """Add this tile's non-target scores >= the (final) thresholds to both directions' counts."""
        rows, cols = self.spans_t[key[0]], self.spans_v[key[1]]
        ge_t = tile >= self.best_t[rows].to(tile.dtype).unsqueeze(1)  # (br, bc) vs (br, 1)
        ge_v = tile >= self.best_v[cols].to(tile.dtype).unsqueeze(0)  # (br, bc) vs (1, bc)
        if key in self.by_tile:
            lr, lc = self.by_tile[key]
            ge_t[lr, lc] = False  # a correct pair never counts against its own text or candidate
            ge_v[lr, lc] = False
        self.count_t[rows] += ge_t.sum(dim=1)
        self.count_v[cols] += ge_v.sum(dim=0)


def _target_tiles_pass(ranker: _TwoWayRanker, max_pending: int) -> set[tuple[int, int]]:
    """Pass 1: score the tiles holding correct pairs and count each one as soon as it is final.

    A tile is final when every target tile of its row block and of its column block has been scored.
    With texts sorted by candidate that happens after at most a few tiles, so they are counted straight
    from memory; tiles evicted beyond ``max_pending`` are left to pass 2, which recomputes them.
    Returns the tiles already counted.
    """
    keys = sorted(ranker.by_tile)
    left_in_row = Counter(bi for bi, _ in keys)
    left_in_col = Counter(bj for _, bj in keys)
    pending: dict[tuple[int, int], torch.Tensor] = {}
    counted = set()
    for key in keys:
        tile = ranker.tile(key)
        ranker.update_best(key, tile)
        left_in_row[key[0]] -= 1
        left_in_col[key[1]] -= 1
        pending[key] = tile
        for done in [k for k in pending if left_in_row[k[0]] == 0 and left_in_col[k[1]] == 0]:
            ranker.count(done, pending.pop(done))
            counted.add(done)
        while len(pending) > max_pending:
            pending.pop(next(iter(pending)))  # oldest first; pass 2 recomputes it
    return counted


def _remaining_tiles_pass(ranker: _TwoWayRanker, counted: set[tuple[int, int]]) -> None:
    """Pass 2: every tile not counted yet; all thresholds are final by now."""
    for bi in range(len(ranker.spans_t)):
        for bj in range(len(ranker.spans_v)):
            if (bi, bj) not in counted:
                ranker.count((bi, bj), ranker.tile((bi, bj)))


def retrieval_ranks_from_embeddings(
    text: torch.Tensor,
    data: Sequence[torch.Tensor],
    text_to_video: Targets,
    kind: str | BlockFn = "volume",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based pessimistic ranks in both directions without materialising the score matrix.

    Pass 1 scores the tiles holding a correct pair, which fixes each text's and each candidate's best
    correct score; pass 2 scores the other tiles. Every tile adds, per text (row) and per candidate
    (column), the number of non-target scores >= that best score. Texts are processed sorted by their
    first candidate so the correct pairs lie near the tile diagonal; then each tile is scored once.
    Memory: O(MAX_PENDING_TILES * chunk_size**2 + Nt + Nv), plus one (Nt, d) copy of the texts when
    they are not already sorted by candidate.

    Args:
        text: (Nt, d) text features (the anchor).
        data: k-1 tensors (Nv, d), row j = candidate j (e.g. [video, audio] for T-VA).
        text_to_video: per text, the index or list of indices of its correct candidates. Several texts
            may share a candidate (multi-caption); candidate j's correct texts are all texts naming it.
        kind, chunk_size: as in ``score_blocks``.
    Returns:
        (t2v (Nt,), v2t (Nv,)) long ranks in the original text/candidate order.
    """
    prepared = _prepare(text, data, kind)
    pairs = _target_pairs(text_to_video, text.shape[0], prepared.data[0].shape[0])
    in_order = torch.equal(pairs.order, torch.arange(text.shape[0]))
    anchor = prepared.anchor if in_order else prepared.anchor[pairs.order]  # (Nt, d), copy only if reordered
    tiler = _Tiler(_Prepared(anchor, prepared.data, prepared.fn), chunk_size)
    ranker = _TwoWayRanker(tiler, _pairs_by_tile(pairs, tiler))
    with torch.no_grad():
        counted = _target_tiles_pass(ranker, MAX_PENDING_TILES)
        _remaining_tiles_pass(ranker, counted)
    t2v = torch.empty(text.shape[0], dtype=torch.long)
    t2v[pairs.order] = ranker.count_t.cpu()  # back to the caller's text order
    return t2v, ranker.count_v.cpu()


def retrieval_metrics_from_embeddings(
    text: torch.Tensor,
    data: Sequence[torch.Tensor],
    text_to_video: Targets,
    kind: str | BlockFn = "volume",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict:
    """Text-to-candidate and candidate-to-text metrics, streamed over score tiles.

    Equal to ``retrieval_metrics(similarity_matrix(...), text_to_video)`` for t2v and to the same on the
    transposed matrix (targets = every text of the candidate) for v2t, but never holds more than a tile.

    Returns:
        dict with ``t2v_{r1,r5,r10,medr,meanr,n_queries,n_candidates}`` and the same ``v2t_*`` keys.
    """
    t2v, v2t = retrieval_ranks_from_embeddings(text, data, text_to_video, kind, chunk_size)
    out = {f"t2v_{k}": v for k, v in metrics_from_ranks(t2v, v2t.numel()).items()}
    out.update({f"v2t_{k}": v for k, v in metrics_from_ranks(v2t, t2v.numel()).items()})
    return out
