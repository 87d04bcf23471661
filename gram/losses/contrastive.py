"""Two-way contrastive loss over an anchor-vs-(k-1)-data similarity, with negatives from all ranks.

With local anchors a_i and data tuples x_i (i over this rank's B rows), gathered A, X (all B_global rows)
and this rank's first global row ``offset``:

    M1[i, j] = s(a_i, X_j) / tau        (anchor -> data; B x B_global)
    M2[i, j] = s(A_j, x_i) / tau        (data -> anchor; B x B_global)
    L = 1/2 [CE(M1, y) + CE(M2, y)],   y_i = offset + i,   label smoothing 0.1 by default

where s is the configured similarity (GRAM: s = -volume). For similarities with several score matrices
(pairwise cosine) the two-way terms are summed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gram.config import LossConfig
from gram.distributed import all_gather, gather_sizes, get_world_size, rank_offset
from gram.losses.similarity import SimilarityFn, get_similarity, get_split_similarity

__all__ = ["ContrastiveLoss", "build_loss"]


def _select(
    embeddings: Mapping[str, torch.Tensor], data_modalities: Sequence[str], anchor: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The anchor (B, d) and data [(B, d)] embeddings; raises on missing keys or mismatched shapes."""
    if isinstance(data_modalities, str) or len(data_modalities) == 0:
        raise ValueError(f"data_modalities must be a non-empty sequence of names, got {data_modalities!r}")
    names = [anchor, *data_modalities]
    missing = [n for n in names if n not in embeddings]
    if missing:
        raise KeyError(f"embeddings lack modalities {missing}; available: {sorted(embeddings)}")
    if anchor in data_modalities:
        raise ValueError(f"anchor {anchor!r} must not also be a data modality ({list(data_modalities)})")
    shapes = {n: tuple(embeddings[n].shape) for n in names}
    if len(set(shapes.values())) != 1 or len(shapes[anchor]) != 2:
        raise ValueError(f"every embedding must be (B, d) with the same B and d, got {shapes}")
    return embeddings[anchor], [embeddings[n] for n in data_modalities]


def _terms(logits: torch.Tensor) -> list[torch.Tensor]:
    """The (B, N) matrices of logits (T, B, N).

    squeeze/unbind, not iteration or indexing, which would copy the gradient back once per term.
    """
    return [logits.squeeze(0)] if logits.shape[0] == 1 else list(logits.unbind(0))


def _merge_terms(logits: torch.Tensor) -> torch.Tensor:
    """(T, B, N) -> (B, N): the sum over score matrices (a view, not a copy, when T = 1)."""
    return logits[0] if logits.shape[0] == 1 else logits.sum(0)


class _SquareTwoWayCrossEntropy(torch.autograd.Function):
    """Row-wise and column-wise label-smoothed CE of square logit matrices, positives on the diagonal.

    (B, B), (B, B) -> (2,): [mean_i CE(R[i, :], i), mean_j CE(C[:, j], j)], R and C usually the same
    matrix (or equal ones whose gradients go to different inputs). The fused backward writes
    dR = g_row/B (softmax_rows(R) - t) and dC = g_col/B (softmax_cols(C) - t), t the smoothed one-hot
    targets, into one buffer when R is C, where autograd's two log-softmaxes (one over the strided
    dimension) and the smoothing means would each make several more passes over the B x B matrix.
    """

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, cols: torch.Tensor, smoothing: float) -> torch.Tensor:
        row_lse = torch.logsumexp(rows, dim=1)  # (B,)
        col_lse = torch.logsumexp(cols, dim=0)  # (B,)
        row = row_lse - (1 - smoothing) * rows.diagonal() - smoothing * rows.mean(1)  # (B,)
        col = col_lse - (1 - smoothing) * cols.diagonal() - smoothing * cols.mean(0)  # (B,)
        ctx.save_for_backward(rows, cols, row_lse, col_lse)
        ctx.smoothing, ctx.same = smoothing, rows is cols
        return torch.stack([row.mean(), col.mean()])  # (2,)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, cols, row_lse, col_lse = ctx.saved_tensors
        n, s = rows.shape[0], ctx.smoothing
        g_row, g_col = (grad / n).to(rows.dtype)  # 0-d tensors: reading them on the host would wait for the GPU
        grad_rows = torch.sub(rows, row_lse.unsqueeze(1)).exp_().mul_(g_row)  # (B, B): row softmax term
        col_softmax = torch.sub(cols, col_lse.unsqueeze(0)).exp_().mul_(g_col)  # (B, B)
        grad_cols = grad_rows.add_(col_softmax) if ctx.same else col_softmax
        for out, g in ((grad_rows, g_row), (grad_cols, g_col)):
            out.sub_(s * g / n)
            out.diagonal().sub_((1 - s) * g)
        return grad_rows, (None if ctx.same else grad_cols), None


class ContrastiveLoss(nn.Module):
    """The GRAM contrastive objective (and its baselines); owns the learnable temperature.

    Args:
        cfg: the loss options.
        similarity: overrides the registered similarity ``cfg.name`` (any function with the
            ``gram.losses.similarity`` signature, e.g. for benchmarking another formulation).
    """

    def __init__(self, cfg: LossConfig, similarity: SimilarityFn | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.similarity = similarity if similarity is not None else get_similarity(cfg.name)
        self.split_similarity = None if similarity is not None else get_split_similarity(cfg.name)
        log_param = cfg.temperature_parametrization == "log"
        init = torch.tensor(math.log(cfg.temperature_init) if log_param else cfg.temperature_init)
        if cfg.learnable_temperature:
            self.temperature_param = nn.Parameter(init)
        else:
            self.register_buffer("temperature_param", init)

    def temperature(self) -> torch.Tensor:
        """Current tau as a differentiable scalar tensor.

        For the log parametrisation the parameter is also clamped in place while training (as CLIP
        clamps its logit scale after each step), so it cannot drift beyond the range where the clamp
        would silence its gradient.
        """
        if self.cfg.temperature_parametrization == "raw":
            return self.temperature_param
        low, high = math.log(self.cfg.temperature_min), math.log(self.cfg.temperature_max)
        if self.training and self.temperature_param.requires_grad:
            with torch.no_grad():
                self.temperature_param.clamp_(low, high)
        return self.temperature_param.clamp(low, high).exp()

    def _chunk_scores(
        self, anchor: torch.Tensor, data: Sequence[torch.Tensor], scale: torch.Tensor
    ) -> torch.Tensor:
        """Scaled similarity of one chunk (T, n1, n2), recomputed in backward when it needs gradients."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in (anchor, scale, *data)):
            return checkpoint(
                lambda a, s, *xs: self.similarity(a, xs, s), anchor, scale, *data, use_reentrant=False
            )
        return self.similarity(anchor, data, scale)

    def scores(
        self, anchor: torch.Tensor, data: Sequence[torch.Tensor], scale: torch.Tensor, chunk_anchor: bool
    ) -> torch.Tensor:
        """``scale *`` similarity (T, N1, N2), chunked along the anchor (N1) or data (N2) rows if
        ``cfg.chunk_size``."""
        size = self.cfg.chunk_size
        rows = anchor.shape[0] if chunk_anchor else data[0].shape[0]
        if size == 0 or rows <= size:
            return self.similarity(anchor, data, scale)
        parts = []
        for start in range(0, rows, size):
            if chunk_anchor:
                parts.append(self._chunk_scores(anchor[start : start + size], data, scale))
            else:
                parts.append(self._chunk_scores(anchor, [x[start : start + size] for x in data], scale))
        return torch.cat(parts, dim=1 if chunk_anchor else 2)  # (T, N1, N2)

    def _score_pair(
        self, anchor: torch.Tensor, data: Sequence[torch.Tensor], scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Logits of local anchors vs all data (T, B, B_global), of local data vs all anchors, and
        whether the second is given as a square (T, B, B) anchor-by-data matrix (one rank) rather
        than data-by-anchor (T, B, B_global).

        On one rank both directions are the same function of the same tensors, so it is computed once:
        shared with full gradients, or split so that each direction's gradient reaches only its own
        side (the reference's detached gathering) where the similarity supports that.
        """
        with_grad = self.cfg.gather_with_grad
        one_rank = get_world_size() == 1
        if one_rank and with_grad:
            logits = self.scores(anchor, data, scale, chunk_anchor=False)  # (T, B, B)
            return logits, logits, True
        unchunked = self.cfg.chunk_size == 0 or anchor.shape[0] <= self.cfg.chunk_size
        if one_rank and unchunked and self.split_similarity is not None:
            return (*self.split_similarity(anchor, data, scale), True)
        anchor_all = all_gather(anchor, with_grad)  # (B_global, d)
        data_all = [all_gather(x, with_grad) for x in data]  # [(B_global, d)]
        a2d = self.scores(anchor, data_all, scale, chunk_anchor=False)  # (T, B, B_global)
        d2a = self.scores(anchor_all, data, scale, chunk_anchor=True)  # (T, B_global, B)
        return a2d, d2a.transpose(1, 2), False  # (T, B, B_global) each

    def _ce_over_terms(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum over the T score matrices of the label-smoothed CE of logits (T, B, N) vs targets (B,)."""
        smoothing = self.cfg.label_smoothing
        return sum(F.cross_entropy(term, targets, label_smoothing=smoothing) for term in logits)

    def forward(
        self,
        embeddings: Mapping[str, torch.Tensor],
        data_modalities: Sequence[str],
        anchor: str = "text",
    ) -> dict[str, torch.Tensor]:
        """Loss of this rank's samples against the global batch.

        Args:
            embeddings: LOCAL L2-normalised embeddings per modality, each (B, d).
            data_modalities: the k-1 non-anchor modalities, in order (e.g. ["vision", "audio"]).
            anchor: the anchor modality (the reference uses text).

        Returns:
            "loss" (scalar), "loss_anchor_to_data" and "loss_data_to_anchor" (their mean is the loss;
            detached, for logging), "logits_anchor_to_data" and "logits_data_to_anchor" (B, B_global)
            detached, higher = more similar (for GRAM -volume / tau; summed over the terms of
            multi-term similarities), "temperature" (detached scalar) and "targets" (B,) the global
            column of each row's positive.
        """
        anchor_local, data_local = _select(embeddings, data_modalities, anchor)
        batch = anchor_local.shape[0]
        offset = rank_offset(gather_sizes(batch, anchor_local.device))
        targets = torch.arange(offset, offset + batch, device=anchor_local.device)  # (B,)
        tau = self.temperature()
        logits_a2d, logits_d2a, square = self._score_pair(anchor_local, data_local, 1.0 / tau)
        if square:  # one rank: data -> anchor is the column-wise CE of an anchor-by-data matrix
            smoothing = self.cfg.label_smoothing
            rows = _terms(logits_a2d)
            cols = rows if logits_d2a is logits_a2d else _terms(logits_d2a)  # same views: one fused buffer
            loss_a2d, loss_d2a = sum(
                _SquareTwoWayCrossEntropy.apply(r, c, smoothing) for r, c in zip(rows, cols)
            )
            logits_d2a = logits_d2a.transpose(1, 2)
        else:
            loss_a2d = self._ce_over_terms(logits_a2d, targets)
            loss_d2a = self._ce_over_terms(logits_d2a, targets)
        return {
            "loss": 0.5 * (loss_a2d + loss_d2a),
            "loss_anchor_to_data": loss_a2d.detach(),
            "loss_data_to_anchor": loss_d2a.detach(),
            "logits_anchor_to_data": _merge_terms(logits_a2d.detach()),
            "logits_data_to_anchor": _merge_terms(logits_d2a.detach()),
            "temperature": tau.detach(),
            "targets": targets,
        }


def build_loss(cfg: LossConfig) -> ContrastiveLoss:
    """The contrastive loss module described by ``cfg`` (it owns the temperature parameter)."""
    return ContrastiveLoss(cfg)
