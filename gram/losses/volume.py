"""Gramian volumes without Gram tensors or determinants.

The reference builds an (N1, N2, k, k) Gram tensor and calls ``det`` on it. We use the factorisation

    Vol(a, x_1, ..., x_m) = Vol(x_1, ..., x_m) * dist(a, span(x_1, ..., x_m)),      m = k - 1,

(base times height, i.e. the QR / Gram-Schmidt form of sqrt(det G)). The first factor depends only on
the data sample j, so it is a per-sample Gram-Schmidt of m vectors. The second needs the projections of
every anchor onto every sample's orthonormal basis, which is m (N1 x d) @ (d x N2) products: the same
work as m pairwise cosine-score matrices. Memory is O(N1 * N2 * m) instead of O(N1 * N2 * k * k).

Numerics (all computed in float32, or float64 for float64 inputs, with autocast disabled):
* square roots and normalisations are guarded so values *and* gradients stay finite when vectors
  coincide, are collinear, or are zero (the reference's ``sqrt(|det|)`` has a NaN gradient there);
* below the resolution of the projection formula (squared distance <= eps * |a|^2) the height's
  gradient is set to 0 (a valid subgradient at a degenerate configuration); the value is kept exact;
* an all-zero row spans nothing, so every volume involving it is exactly 0, with a zero gradient
  through the zero row's direction. Zero rows are therefore not an error. (L2-normalised embeddings
  are only zero if the encoder produced an exact zero vector.)

``volume`` supports first-order gradients (no double backward), which is all training needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["negative_volume", "orthonormal_basis", "simplex_volume", "split_volume", "volume"]


def _compute_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64 (e.g. for gradcheck), else float32 (never a half type)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_inputs(anchor: torch.Tensor, data: Sequence[torch.Tensor], min_data: int = 1) -> None:
    """Raise ValueError unless anchor is (N1, d) and every data tensor is (N2, d) with the same N2, d."""
    if len(data) < min_data:
        raise ValueError(f"need at least {min_data} data tensor(s) besides the anchor, got {len(data)}")
    if anchor.ndim != 2:
        raise ValueError(f"anchor must be (N1, d), got shape {tuple(anchor.shape)}")
    first = data[0]
    for i, x in enumerate(data):
        if x.ndim != 2 or x.shape != first.shape or x.shape[1] != anchor.shape[1]:
            raise ValueError(
                f"data tensor {i} has shape {tuple(x.shape)}; every data tensor must be (N2, d) with the "
                f"same N2 and d = {anchor.shape[1]} (anchor shape {tuple(anchor.shape)})"
            )


def _safe_sqrt(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """sqrt(max(x, 0)) whose gradient is 0 (not inf/NaN) where x <= threshold.

    The inner ``where`` keeps the unused branch's gradient finite (the "double where" trick); the
    detached fallback keeps the value exact below the threshold.
    """
    above = x > threshold
    exact = x.clamp_min(0).sqrt().detach()
    return torch.where(above, torch.where(above, x, torch.ones_like(x)).sqrt(), exact)


class _GramSchmidt(torch.autograd.Function):
    """Per-sample thin QR by Gram-Schmidt: m tensors (N, d) -> basis (m*N, d), p-major, and volumes (N,).

    Forward runs without autograd, so no (N, d) intermediate is kept; backward is the analytic QR
    gradient (for X = QR per sample: dX = [dQ + Q copyltu(R dR^T - dQ^T Q)] R^{-T}), a handful of
    passes where autograd through the loops would make several per projection.
    """

    @staticmethod
    def forward(ctx: Any, *vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, (n, d) = len(vectors), vectors[0].shape
        eps = torch.finfo(vectors[0].dtype).eps
        basis = vectors[0].new_empty(m, n, d)  # (m, N, d)
        r = vectors[0].new_zeros(n, m, m)  # (N, m, m), upper triangular
        for p, x in enumerate(vectors):
            residual = x.clone() if p else x  # (N, d)
            for _ in range(2):  # "twice is enough": the second pass keeps near-collinear inputs accurate
                for q in range(p):
                    coefficient = torch.linalg.vecdot(residual, basis[q])  # (N,)
                    residual.addcmul_(coefficient.unsqueeze(-1), basis[q], value=-1)
                    r[:, q, p] += coefficient
            norm = torch.linalg.vector_norm(residual, dim=-1)  # (N,)
            r[:, p, p] = norm
            torch.div(residual, norm.clamp_min(eps).unsqueeze(-1), out=basis[p])  # 0 for a 0 residual
        ctx.save_for_backward(basis, r)
        return basis.view(m * n, d), r.diagonal(dim1=1, dim2=2).prod(-1)

    @staticmethod
    def backward(ctx: Any, grad_flat: torch.Tensor, grad_volume: torch.Tensor) -> tuple[torch.Tensor, ...]:
        basis, r = ctx.saved_tensors
        m, n, d = basis.shape
        eps = torch.finfo(r.dtype).eps
        grad_basis = grad_flat.view(m, n, d)  # (m, N, d)
        diag = r.diagonal(dim1=1, dim2=2)  # (N, m)
        # d volume / d R_pp = prod of the other diagonal entries (no division by a possibly zero R_pp).
        others = torch.stack([diag[:, [q for q in range(m) if q != p]].prod(-1) for p in range(m)], -1)
        grad_diag = grad_volume.unsqueeze(-1) * others  # (N, m)
        mixed = r * grad_diag.unsqueeze(-2) - torch.einsum("pnd,qnd->npq", grad_basis, basis)  # (N, m, m)
        sym = mixed.tril() + mixed.tril(-1).mT  # (N, m, m)
        b = torch.einsum("qnd,nqp->pnd", basis, sym).add_(grad_basis)  # (m, N, d)
        # Solve X R^T = B in place, row block by row block, last first (R upper triangular, its diagonal
        # guarded as in forward).
        for p in reversed(range(m)):
            for q in range(p + 1, m):
                b[p].addcmul_(b[q], r[:, p, q].unsqueeze(-1), value=-1)
            b[p].div_(diag[:, p].clamp_min(eps).unsqueeze(-1))  # (N, d)
        return tuple(b.unbind(0))


def orthonormal_basis(vectors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Gram-Schmidt of m >= 1 tensors (N, d) -> (basis (m*N, d), volume (N,)).

    Rows ``p*N : (p+1)*N`` of the basis are ``q_p``, the unit component of ``vectors[p]`` orthogonal to
    ``vectors[:p]`` (zero, with a finite gradient, when that component vanishes), and ``volume =
    prod_p |component_p|`` is the m-dimensional volume of each sample's m vectors. Each projection is
    applied twice ("twice is enough" re-orthogonalisation), which keeps near-collinear inputs accurate.
    """
    return _GramSchmidt.apply(*vectors)


class _ProjectedVolume(torch.autograd.Function):
    """Scaled volumes from the factorisation: (N1, d), (m*N2, d), (N2,), scalar -> (N1, N2).

    out_ij = scale * data_volume_j * dist_ij with dist_ij^2 = |a_i|^2 - sum_p (a_i . q_jp)^2 from one
    GEMM. The scale (the loss's sign and 1/temperature) rides on the per-sample factor, so neither it nor
    its gradient costs a pass over the (N1, N2) matrix: a separate ``scores / tau`` and its backward
    cost about as much as the GEMMs on a CPU.
    Hand-written so that only the projections (N1, m, N2) and the heights (N1, N2) are kept for
    backward and every large elementwise pass is fused: plain autograd keeps and revisits several such
    tensors. The height's gradient is cut to 0 where dist^2 <= eps * |a|^2, the noise floor of this
    formula.

    With ``split`` the function returns two equal matrices: the first back-propagates only to the
    anchor, the second only to the data side (both to the scale). That is the reference's loss on one
    rank, M1 = f(a, x.detach()) and M2 = f(a.detach(), x), for the price of one forward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        anchor: torch.Tensor,
        flat_basis: torch.Tensor,
        data_volume: torch.Tensor,
        scale: torch.Tensor,
        m: int,
        split: bool,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        n1, n2 = anchor.shape[0], flat_basis.shape[0] // m
        anchor_sq = anchor.square().sum(-1, keepdim=True)  # (N1, 1)
        proj = (anchor @ flat_basis.T).view(n1, m, n2)  # (N1, d) @ (d, m*N2) -> (N1, m, N2)
        height = anchor_sq.expand(n1, n2).clone()  # (N1, N2), becomes dist^2 then dist in place
        for p in range(m):
            height.addcmul_(proj[:, p], proj[:, p], value=-1.0)
        height.clamp_min_(0).sqrt_()
        ctx.save_for_backward(anchor, flat_basis, data_volume, scale, proj, height, anchor_sq)
        ctx.split = split
        out = height * (data_volume * scale)  # (N1, N2) * (N2,)
        return (out, out.clone()) if split else out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        anchor, flat_basis, data_volume, scale, proj, height, anchor_sq = ctx.saved_tensors
        n1, m, n2 = proj.shape
        grad_a, grad_x = grads if ctx.split else (grads[0], grads[0])  # (N1, N2) each, or None
        grad_anchor = grad_basis = grad_volume = grad_scale = None
        factor = scale * data_volume  # (N2,)
        # d out / d dist^2 = factor / (2 dist); d dist^2 / d a = 2 (a - sum_p proj_p q_p).
        below = height <= anchor_sq.sqrt() * math.sqrt(torch.finfo(height.dtype).eps)  # (N1, N2)

        def weighted_proj(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            weight = (grad * factor).div_(height).masked_fill_(below, 0.0)  # (N1, N2)
            return weight, (proj * weight.unsqueeze(1)).view(n1, m * n2)  # (N1, m*N2); sign applied below

        # The small per-sample gradients first, while no (N, d)-sized gradient buffer is alive yet.
        grad_x_factor = (grad_x * height).sum(0) if grad_x is not None else None  # (N2,): d / d factor
        if grad_x_factor is not None and ctx.needs_input_grad[2]:
            grad_volume = grad_x_factor * scale
        if ctx.needs_input_grad[3]:
            parts = [] if grad_x_factor is None else [grad_x_factor]
            if ctx.split and grad_a is not None:
                parts.append((grad_a * height).sum(0))
            grad_scale = (sum(parts) * data_volume).sum() if parts else None
        proj_a = None
        if grad_a is not None and ctx.needs_input_grad[0]:  # a * sum_j w_ij - (N1, m*N2) @ (m*N2, d)
            weight, proj_a = weighted_proj(grad_a)
            grad_anchor = torch.mm(proj_a, flat_basis).neg_().addcmul_(anchor, weight.sum(1, keepdim=True))
            del weight
        if grad_x is not None and ctx.needs_input_grad[1]:
            if proj_a is None or ctx.split:
                proj_a = None  # freed before the data side's own buffer is allocated
                proj_x = weighted_proj(grad_x)[1]
            else:
                proj_x = proj_a
            grad_basis = torch.mm(proj_x.T, anchor).neg_()  # (m*N2, N1) @ (N1, d) -> (m*N2, d)
        return grad_anchor, grad_basis, grad_volume, grad_scale, None, None


def _affine_height(anchor: torch.Tensor, flat_basis: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """Distance of every a_i - o_j from span(basis_j) -> (N1, N2).

    anchor (N1, d); flat_basis (m*N2, d), m >= 0 blocks of rows orthonormal per sample; origin (N2, d):
        |a - o|^2 - sum_p ((a - o) . q_p)^2 = |a|^2 - 2 a.o + |o|^2 - sum_p (a.q_p - o.q_p)^2,
    with every anchor-dependent dot product from GEMMs (plain autograd: used by the baselines only).
    """
    n1, (n2, d) = anchor.shape[0], origin.shape
    m = flat_basis.shape[0] // n2
    anchor_sq = anchor.square().sum(-1, keepdim=True)  # (N1, 1)
    origin_sq = origin.square().sum(-1).unsqueeze(0)  # (1, N2)
    dist_sq = anchor_sq - 2 * (anchor @ origin.T) + origin_sq  # (N1, d) @ (d, N2) -> (N1, N2)
    if m > 0:
        proj = (anchor @ flat_basis.T).view(n1, m, n2)  # (N1, d) @ (d, m*N2) -> (N1, m, N2)
        shift = torch.linalg.vecdot(flat_basis.view(m, n2, d), origin)  # (m, N2): o_j . q_jp
        dist_sq = dist_sq - (proj - shift.unsqueeze(0)).square().sum(1)  # (N1, N2)
    # Below eps * (|a|^2 + |o|^2) the cancellation noise dominates, so only the gradient is cut there.
    return _safe_sqrt(dist_sq, torch.finfo(anchor.dtype).eps * (anchor_sq + origin_sq))


def as_scalar(scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``scale`` as a 0-d tensor of ``like``'s dtype and device (still differentiable if a tensor)."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a scalar, got shape {tuple(scale.shape)}")
        return scale.reshape(()).to(like)
    return like.new_tensor(float(scale))


def volume(anchor: torch.Tensor, *data: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """k-volume of the parallelotope spanned by anchor[i] and data_1[j], ..., data_{k-1}[j].

    Args:
        anchor: (N1, d).
        *data: k - 1 >= 1 tensors of shape (N2, d); row j of every data tensor belongs to sample j.
        scale: a scalar (float, or 0-d tensor that may require grad) multiplying the result, e.g.
            -1/tau in the loss. It is applied to a per-sample factor, so it costs nothing, unlike
            multiplying the (N1, N2) result.

    Returns:
        (N1, N2) ``scale *`` the volumes sqrt(|det G|) of the k x k Gram matrices, in float32 (float64
        for float64 inputs), also under autocast. Equal to the reference's determinant formulation; see
        the module docstring for degenerate inputs (finite values and gradients; zero rows give 0).
    """
    return _scaled_volume(anchor, data, scale, split=False)


def split_volume(
    anchor: torch.Tensor, *data: torch.Tensor, scale: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two equal (N1, N2) ``volume(anchor, *data, scale=scale)`` matrices with split gradients.

    The first back-propagates only to ``anchor``, the second only to ``data`` (both to ``scale``):
    ``volume(anchor, *(x.detach() for x in data))`` and ``volume(anchor.detach(), *data)`` for the
    cost of one of them, i.e. the reference's two loss matrices on one rank.
    """
    return _scaled_volume(anchor, data, scale, split=True)


def _scaled_volume(
    anchor: torch.Tensor, data: Sequence[torch.Tensor], scale: torch.Tensor | float, split: bool
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(anchor, data)
    dtype = _compute_dtype([anchor, *data])
    with torch.autocast(device_type=anchor.device.type, enabled=False):
        a = anchor.to(dtype)
        # p-major rows, so each per-p slice of the projections is a contiguous (N1, N2) block row.
        flat, data_volume = orthonormal_basis([t.to(dtype) for t in data])  # (m*N2, d), (N2,)
        return _ProjectedVolume.apply(a, flat, data_volume, as_scalar(scale, a), len(data), split)


def negative_volume(anchor: torch.Tensor, *data: torch.Tensor) -> torch.Tensor:
    """-volume(anchor, *data) (N1, N2): GRAM's similarity score, without an extra negation pass."""
    return volume(anchor, *data, scale=-1.0)


def simplex_volume(
    anchor: torch.Tensor, *data: torch.Tensor, scale: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """``scale *`` the volume of the simplex with vertices anchor[i], data_1[j], ..., data_m[j] -> (N1, N2).

    For m = 2 (three modalities) this is the TRIANGLE area (Cicchetti et al. 2025),
    1/2 * |x_2 - x_1| * dist(a, line through x_1 and x_2). Like ``volume`` it is computed as the
    (m-1)-volume of the per-sample edges x_p - x_1 times the distance of a - x_1 from their span,
    divided by m!, so it costs m GEMMs. For m = 1 it is the Euclidean distance |a - x_1|.
    """
    _check_inputs(anchor, data)
    dtype = _compute_dtype([anchor, *data])
    with torch.autocast(device_type=anchor.device.type, enabled=False):
        a = anchor.to(dtype)
        base = data[0].to(dtype)  # (N2, d)
        edges = [t.to(dtype) - base for t in data[1:]]  # m-1 x (N2, d)
        if edges:
            flat, base_volume = orthonormal_basis(edges)  # (m-1)*N2 x d, (N2,)
        else:
            flat, base_volume = base.new_empty(0, base.shape[1]), base.new_ones(base.shape[0])
        height = _affine_height(a, flat, base)  # (N1, N2)
        factor = base_volume * (as_scalar(scale, a) / math.factorial(len(data)))  # (N2,)
        return height * factor  # (N1, N2)
