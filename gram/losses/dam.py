"""DAM (Data-Anchor Matching): a binary matching loss on volume-softmax hard negatives.

For each local anchor (text) one negative data item is drawn from the global batch with probability
proportional to softmax(anchor->data logits) + eps, and for each local data item one negative text from
softmax(data->anchor logits) + eps, never the positive (reference §2.8; the reference's logits are
-volume / tau, so harder negatives are the ones with smaller volume). The 3B pairs

    (text_i, data_i) -> 1,   (text_i, data_neg(i)) -> 0,   (text_neg(i), data_i) -> 0

are scored by a matching callable (e.g. BERT cross-attention over the data tokens plus a 2-way head).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from gram.distributed import all_gather, gather_sizes, rank_offset

__all__ = ["MatchFn", "dam_loss", "negative_sampling_probs", "sample_hard_negatives"]

MatchFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_DEFAULT_EPS = 1e-4  # added to the softmax as in the reference, so every negative stays reachable


def _check_offset(logits: torch.Tensor, offset: int) -> None:
    """Raise ValueError unless logits is (B, N), N >= 2 and columns offset..offset+B-1 exist."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, N), got shape {tuple(logits.shape)}")
    batch, total = logits.shape
    if total < 2 or offset < 0 or offset + batch > total:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} with offset {offset}: need a global batch of >= 2 "
            "rows that contains every local positive (offset + B <= N)"
        )


def negative_sampling_probs(logits: torch.Tensor, offset: int, eps: float = _DEFAULT_EPS) -> torch.Tensor:
    """Unnormalised sampling weights (B, N): softmax(logits) + eps, with each row's positive set to 0.

    This is the reference's weight matrix, materialised (for inspection and tests; the sampler
    itself never builds it).

    Args:
        logits: (B, N) scores of B local rows against the N-row global batch (higher = more similar).
        offset: global column of local row 0's positive; row i's positive is column offset + i.
    """
    _check_offset(logits, offset)
    with torch.no_grad():
        probs = torch.softmax(logits.float(), dim=1) + eps  # (B, N)
        rows = torch.arange(logits.shape[0], device=logits.device)
        probs[rows, rows + offset] = 0.0
    return probs


_BLOCK = 32  # columns per block of the two-level inverse-CDF search


def _below(value: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """min(value, the largest float below limit), so a right-sided search stays inside the CDF."""
    return torch.minimum(value, torch.nextafter(limit, torch.zeros_like(limit)))


def _sample_one_per_row(
    logits: Sequence[torch.Tensor], offset: int, eps: float, generator: torch.Generator | None
) -> list[torch.Tensor]:
    """Draw one column per row from ``negative_sampling_probs`` of each (B, N) matrix -> [(B,), ...].

    Only B uniforms are drawn per matrix (multinomial draws B x N exponentials, which dominates its
    cost). The weights exp(l - max) + eps * sum exp(l - max) are proportional to softmax + eps. The
    search is two-level: running sums over blocks of 32 columns pick a block, then one block's running
    sum picks the column, so no full-width cumulative sum is needed. The positive's weight is exactly 0
    and every search returns the first column whose running sum exceeds a target in [0, total), i.e. a
    column with positive weight: the positive (and the zero padding) can never be drawn, whatever the
    rounding. The matrices are written into one buffer so every step runs once for all of them. A row
    holding a NaN or infinite logit is drawn uniformly (never the positive), so non-finite scores never
    produce an out-of-range index.
    """
    sizes, total, device = [m.shape[0] for m in logits], logits[0].shape[1], logits[0].device
    batch, blocks = sum(sizes), -(-total // _BLOCK)
    rows = torch.arange(batch, device=device)
    positives = torch.cat([torch.arange(n, device=device) + offset for n in sizes])  # (B_all,)
    padded = torch.empty(batch, blocks * _BLOCK, device=device)  # (B_all, N_pad)
    padded[:, total:].zero_()  # only the padding: the weights overwrite the rest
    weights = padded[:, :total]  # (B_all, N) view
    for part, matrix in zip(weights.split(sizes), logits):
        torch.sub(matrix.float(), matrix.float().amax(dim=1, keepdim=True), out=part)
    weights.exp_()
    row_sums = weights.sum(dim=1, keepdim=True)  # (B_all, 1); each weight is <= 1, so only NaN/inf make it non-finite
    # A row with a non-finite score (a NaN input clip, a diverged step) has no distribution: draw it uniformly so
    # the indices stay valid; its loss is non-finite anyway and the trainer skips the step.
    weights.masked_fill_(~torch.isfinite(row_sums), 1.0)
    weights.add_(row_sums.nan_to_num(nan=0.0, posinf=0.0) * eps)
    weights[rows, positives] = 0.0
    tiles = padded.view(batch, blocks, _BLOCK)  # (B_all, N_pad / 32, 32)
    block_cdf = tiles.sum(-1).cumsum_(dim=1)  # (B_all, blocks)
    target = torch.rand(batch, 1, device=device, generator=generator) * block_cdf[:, -1:]  # (B_all, 1)
    target = _below(target, block_cdf[:, -1:])
    block = torch.searchsorted(block_cdf, target, right=True)  # (B_all, 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp_min(0)), 0.0)  # (B_all, 1)
    inner_cdf = tiles[rows, block.squeeze(1)].cumsum(dim=1)  # (B_all, 32)
    inner_target = _below((target - before).clamp_min(0), inner_cdf[:, -1:])  # (B_all, 1)
    column = torch.searchsorted(inner_cdf, inner_target, right=True)  # (B_all, 1)
    return list((block * _BLOCK + column).squeeze(1).split(sizes))


def sample_hard_negatives(
    logits_anchor_to_data: torch.Tensor,
    logits_data_to_anchor: torch.Tensor,
    offset: int,
    generator: torch.Generator | None = None,
    eps: float = _DEFAULT_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative per local row in each direction, without a loop over samples.

    Column j of row i is drawn with probability proportional to softmax(logits[i])_j + eps, and
    never the positive j = offset + i (reference §2.8).

    Args:
        logits_anchor_to_data, logits_data_to_anchor: (B, N) logits, higher = more similar (no
            gradient flows through the sampling).
        offset: global index of this rank's first sample (positives are columns offset + i).
        generator: optional RNG on the logits' device, for reproducible draws.

    Returns:
        neg_data_idx (B,): a global data index per local anchor; neg_anchor_idx (B,): a global
        anchor index per local data item.
    """
    both = (logits_anchor_to_data.detach(), logits_data_to_anchor.detach())
    for logits in both:
        _check_offset(logits, offset)
    if both[0].shape[1] != both[1].shape[1]:
        raise ValueError(
            f"both logit matrices need the same global batch, got {both[0].shape} and {both[1].shape}"
        )
    with torch.no_grad():
        neg_data, neg_anchor = _sample_one_per_row(both, offset, eps, generator)
    return neg_data, neg_anchor


def _check_dam_inputs(
    text_ids: torch.Tensor, text_mask: torch.Tensor, condition: torch.Tensor, logits: torch.Tensor
) -> None:
    """Raise ValueError unless ids/mask are (B, L), condition is (B, Lc, H) and logits (B, N)."""
    batch = text_ids.shape[0]
    if text_ids.ndim != 2 or text_mask.shape != text_ids.shape:
        raise ValueError(
            f"text_ids {tuple(text_ids.shape)} and text_mask {tuple(text_mask.shape)} must both be (B, L)"
        )
    if condition.ndim != 3 or condition.shape[0] != batch or logits.ndim != 2 or logits.shape[0] != batch:
        raise ValueError(
            f"condition {tuple(condition.shape)} must be (B, Lc, H) and logits {tuple(logits.shape)} "
            f"(B, N) with B = {batch}"
        )


def dam_loss(
    match_fn: MatchFn,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    condition: torch.Tensor,
    logits_anchor_to_data: torch.Tensor,
    logits_data_to_anchor: torch.Tensor,
    generator: torch.Generator | None = None,
    eps: float = _DEFAULT_EPS,
) -> torch.Tensor:
    """Unweighted DAM cross-entropy on this rank's 3B pairs (the caller multiplies by dam_weight).

    Args:
        match_fn: ``(ids (3B, L), mask (3B, L), condition (3B, Lc, H)) -> logits (3B, 2)``, class 1 =
            match.
        text_ids, text_mask: local (B, L) token ids and attention mask (gathered without gradient;
            every rank must pad to the same L).
        condition: local (B, Lc, H) data tokens the text cross-attends to (gathered with gradient).
        logits_anchor_to_data, logits_data_to_anchor: (B, B_global) from ``ContrastiveLoss``.
        generator: optional RNG for the negative draws.
    """
    _check_dam_inputs(text_ids, text_mask, condition, logits_anchor_to_data)
    batch = text_ids.shape[0]
    sizes = gather_sizes(batch, text_ids.device)
    ids_all = all_gather(text_ids, with_grad=False)  # (B_global, L)
    mask_all = all_gather(text_mask, with_grad=False)  # (B_global, L)
    condition_all = all_gather(condition, with_grad=True)  # (B_global, Lc, H)
    neg_data, neg_text = sample_hard_negatives(
        logits_anchor_to_data, logits_data_to_anchor, rank_offset(sizes), generator, eps
    )
    ids = torch.cat([text_ids, text_ids, ids_all[neg_text]])  # (3B, L)
    mask = torch.cat([text_mask, text_mask, mask_all[neg_text]])  # (3B, L)
    # index_select, not condition_all[neg_data]: a data item drawn twice gets its gradients summed by index_add
    # in a fixed order, where advanced indexing's backward adds them atomically on CPU (run-to-run noise).
    cond = torch.cat([condition, condition_all.index_select(0, neg_data), condition])  # (3B, Lc, H)
    labels = torch.cat([text_ids.new_ones(batch), text_ids.new_zeros(2 * batch)]).long()  # (3B,)
    logits = match_fn(ids, mask, cond)
    if logits.shape != (3 * batch, 2):
        raise ValueError(
            f"match_fn returned logits of shape {tuple(logits.shape)}, expected ({3 * batch}, 2)"
        )
    return F.cross_entropy(logits.float(), labels)
