"""Similarities of an anchor against k-1 aligned data tensors, behind one interface.

Every similarity maps ``anchor (N1, d)``, ``data``, a sequence of k-1 tensors ``(N2, d)`` whose row j
belongs to sample j, and a scalar ``scale`` (1/tau in the loss) to scores ``scale * s``, ``(T, N1, N2)``:
higher s means more similar. Each applies the scale to its smallest operand (the anchor or a per-sample
factor), which is free, where multiplying the scores and back-propagating through that would cost
extra passes over every (N1, N2) matrix. T is the number of score matrices that each get their own
two-way contrastive term (1 for the higher-order similarities, k-1 for pairwise cosine, whose terms are
summed as in CLIP/VAST-style multi-pair training). Scores are float32
(float64 for float64 inputs) and computed with autocast disabled, so bf16/fp16 training does not round
the dot products that the loss compares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from gram.config import SIMILARITY_NAMES
from gram.losses.volume import _check_inputs, _compute_dtype, as_scalar, simplex_volume, split_volume, volume

__all__ = ["SimilarityFn", "SplitSimilarityFn", "get_similarity", "get_split_similarity", "list_similarities"]

Scale = torch.Tensor | float
SimilarityFn = Callable[[torch.Tensor, Sequence[torch.Tensor], Scale], torch.Tensor]
SplitSimilarityFn = Callable[[torch.Tensor, Sequence[torch.Tensor], Scale], tuple[torch.Tensor, torch.Tensor]]


def _as_compute_dtype(anchor: torch.Tensor, data: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """[anchor, *data] cast to float32 (float64 if any input is float64)."""
    dtype = _compute_dtype([anchor, *data])
    return [t.to(dtype) for t in (anchor, *data)]


def volume_scores(anchor: torch.Tensor, data: Sequence[torch.Tensor], scale: Scale = 1.0) -> torch.Tensor:
    """GRAM: minus the k-volume of (anchor_i, data_j...), times scale -> (1, N1, N2)."""
    return volume(anchor, *data, scale=-scale).unsqueeze(0)


class _SplitBilinear(torch.autograd.Function):
    """Two equal copies of scale * a @ y.T (N1, N2): the first back-propagates only to ``a``, the second
    only to ``y`` (both to the scale), from one GEMM. ``scale`` must be nonzero (1/tau in the loss)."""

    @staticmethod
    def forward(
        ctx: Any, a: torch.Tensor, y: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.mm(a, y.T).mul_(scale)  # (N1, d) @ (d, N2) -> (N1, N2)
        ctx.save_for_backward(a, y, scale, out)
        return out, out.clone()

    @staticmethod
    def backward(
        ctx: Any, grad_a: torch.Tensor | None, grad_y: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        a, y, scale, out = ctx.saved_tensors
        to_a = None if grad_a is None else torch.mm(grad_a, y).mul_(scale)  # (N1, N2) @ (N2, d)
        to_y = None if grad_y is None else torch.mm(grad_y.T, a).mul_(scale)  # (N2, N1) @ (N1, d)
        to_scale = sum((g * out).sum() for g in (grad_a, grad_y) if g is not None) / scale
        return to_a, to_y, to_scale


def _bilinear_operands(
    anchor: torch.Tensor, data: Sequence[torch.Tensor], multilinear: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The anchor and the (N2, d) factors whose dot products with it are the scores, in the compute dtype:
    each data tensor (cosine, one term each) or their elementwise product (Symile, one term)."""
    _check_inputs(anchor, data)
    a, *xs = _as_compute_dtype(anchor, data)
    return a, [torch.stack(xs).prod(0)] if multilinear else xs  # product: (k-1, N2, d) -> (N2, d)


def _bilinear_scores(
    anchor: torch.Tensor, data: Sequence[torch.Tensor], scale: Scale, multilinear: bool
) -> torch.Tensor:
    """scale * anchor @ factor.T for each factor of ``_bilinear_operands`` -> (T, N1, N2)."""
    with torch.autocast(device_type=anchor.device.type, enabled=False):
        a, ys = _bilinear_operands(anchor, data, multilinear)
        a = a * as_scalar(scale, a)  # (N1, d): the scale on the smallest operand
        return torch.stack([a @ y.T for y in ys])  # T x [(N1, d) @ (d, N2)] -> (T, N1, N2)


def _split_bilinear_scores(
    anchor: torch.Tensor, data: Sequence[torch.Tensor], scale: Scale, multilinear: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_bilinear_scores`` twice, with split gradients -> two (T, N1, N2) tensors."""
    with torch.autocast(device_type=anchor.device.type, enabled=False):
        a, ys = _bilinear_operands(anchor, data, multilinear)
        pairs = [_SplitBilinear.apply(a, y, as_scalar(scale, a)) for y in ys]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def split_cosine_scores(
    anchor: torch.Tensor, data: Sequence[torch.Tensor], scale: Scale = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cosine_scores`` twice from one set of GEMMs, split like ``split_volume_scores``."""
    return _split_bilinear_scores(anchor, data, scale, multilinear=False)


def split_symile_scores(
    anchor: torch.Tensor, data: Sequence[torch.Tensor], scale: Scale = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``symile_scores`` twice from one GEMM, split like ``split_volume_scores``."""
    return _split_bilinear_scores(anchor, data, scale, multilinear=True)


def split_volume_scores(
    anchor: torch.Tensor, data: Sequence[torch.Tensor], scale: Scale = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``volume_scores`` twice from one computation, (1, N1, N2) each: the first back-propagates only to
    the anchor, the second only to the data (the reference's detached gathering, on one rank)."""
    first, second = split_volume(anchor, *data, scale=-scale)
    return first.unsqueeze(0), second.unsqueeze(0)


def cosine_scores(anchor: torch.Tensor, data: Sequence[torch.Tensor], scale: Scale = 1.0) -> torch.Tensor:
    """Pairwise dot products anchor . data_p (cosines for unit vectors), times scale -> (k-1, N1, N2)."""
    return _bilinear_scores(anchor, data, scale, multilinear=False)


def symile_scores(anchor: torch.Tensor, data: Sequence[torch.Tensor], scale: Scale = 1.0) -> torch.Tensor:
    """Symile's multilinear inner product sum_d a_d * x1_d * ... * x_{k-1,d}, times scale -> (1, N1, N2).

    Saporta et al. 2024. The data factors of sample j multiply elementwise first, so the whole score
    matrix is a single GEMM. For k = 2 it reduces to the dot product.
    """
    return _bilinear_scores(anchor, data, scale, multilinear=True)


def triangle_scores(anchor: torch.Tensor, data: Sequence[torch.Tensor], scale: Scale = 1.0) -> torch.Tensor:
    """TRIANGLE: minus the area of the triangle (anchor_i, data1_j, data2_j), times scale -> (1, N1, N2).

    Cicchetti et al. 2025. With more than three modalities this is the volume of the simplex on all
    k points (its natural generalisation); with two it is their Euclidean distance.
    """
    return simplex_volume(anchor, *data, scale=-scale).unsqueeze(0)


_SIMILARITIES: dict[str, SimilarityFn] = {
    "volume": volume_scores,
    "cosine": cosine_scores,
    "symile": symile_scores,
    "triangle": triangle_scores,
}
assert set(_SIMILARITIES) == set(SIMILARITY_NAMES)  # the config validates names without importing this module


# Similarities that can give both loss directions from one computation with split gradients.
_SPLIT_SIMILARITIES: dict[str, SplitSimilarityFn] = {
    "volume": split_volume_scores,
    "cosine": split_cosine_scores,
    "symile": split_symile_scores,
}


def get_split_similarity(name: str) -> SplitSimilarityFn | None:
    """The split-gradient form of similarity ``name``, or None (then each direction is computed)."""
    get_similarity(name)  # validates the name
    return _SPLIT_SIMILARITIES.get(name)


def list_similarities() -> list[str]:
    """Names accepted by ``LossConfig.name``."""
    return sorted(_SIMILARITIES)


def get_similarity(name: str) -> SimilarityFn:
    """The similarity function registered under ``name``; ValueError listing the choices otherwise."""
    if name not in _SIMILARITIES:
        raise ValueError(f"unknown similarity {name!r}; choose one of {list_similarities()}")
    return _SIMILARITIES[name]
