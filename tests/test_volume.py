"""gram.losses.volume against an independent float64 determinant formula, plus degenerate inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gram.losses
from gram.losses import simplex_volume, volume
from gram.losses.volume import negative_volume, split_volume


def det_volume(anchor: torch.Tensor, *data: torch.Tensor) -> torch.Tensor:
    """Reference: sqrt|det G| of the explicit k x k Gram matrix per (i, j), in float64."""
    a = anchor.double()
    xs = [x.double() for x in data]
    vectors = [a[:, None].expand(-1, xs[0].shape[0], -1)] + [x[None].expand(a.shape[0], -1, -1) for x in xs]
    stacked = torch.stack(vectors, dim=2)  # (N1, N2, k, d)
    return torch.linalg.det(stacked @ stacked.transpose(-1, -2)).abs().sqrt()  # (N1, N2, k, k) -> (N1, N2)


def det_simplex(anchor: torch.Tensor, *data: torch.Tensor) -> torch.Tensor:
    """Reference simplex volume: sqrt|det| of the edge Gram matrix (x_p - a) / m!, float64."""
    a = anchor.double()
    edges = torch.stack([x.double()[None] - a[:, None] for x in data], dim=2)  # (N1, N2, m, d)
    gram = edges @ edges.transpose(-1, -2)  # (N1, N2, m, m)
    return torch.linalg.det(gram).abs().sqrt() / math.factorial(len(data))


def unit(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen, dtype=dtype), dim=-1)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_matches_determinant_float64(k: int) -> None:
    anchor = unit(5, 8, seed=k)
    data = [unit(6, 8, seed=10 * k + p) * (1 + p) for p in range(k - 1)]  # also non-unit norms
    torch.testing.assert_close(volume(anchor, *data), det_volume(anchor, *data), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_matches_determinant_float32(k: int) -> None:
    anchor = unit(7, 32, dtype=torch.float32, seed=k)
    data = [unit(9, 32, dtype=torch.float32, seed=20 + p) for p in range(k - 1)]
    out = volume(anchor, *data)
    assert out.dtype == torch.float32 and out.shape == (7, 9)
    torch.testing.assert_close(out.double(), det_volume(anchor, *data), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [3, 4, 5])
def test_near_degenerate_matches_determinant(k: int) -> None:
    """Data vectors nearly collinear and anchors nearly inside the data span."""
    base = unit(4, 16, seed=1)
    data = [F.normalize(base + 1e-4 * unit(4, 16, seed=2 + p), dim=-1) for p in range(k - 1)]
    anchor = torch.cat([data[0][:2] + 1e-5 * unit(2, 16, seed=9), unit(3, 16, seed=7)])  # (5, 16)
    torch.testing.assert_close(volume(anchor, *data), det_volume(anchor, *data), rtol=1e-6, atol=1e-13)


def test_orthonormal_and_known_values() -> None:
    eye = torch.eye(4)
    assert volume(eye[:1], eye[1:2], eye[2:3], eye[3:4]).item() == pytest.approx(1.0)
    a = F.normalize(torch.tensor([[1.0, 1.0, 0.0]]), dim=-1)
    x = torch.tensor([[1.0, 0.0, 0.0]])
    cos = (a @ x.T).item()
    assert volume(a, x).item() == pytest.approx(math.sqrt(1 - cos**2), abs=1e-7)  # k = 2: |sin|


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_degenerate_inputs_finite_values_and_gradients(dtype: torch.dtype) -> None:
    """Coincident, collinear and in-span configurations: the reference's sqrt gives NaN gradients."""
    x = unit(3, 8, dtype=dtype, seed=3)
    anchor = torch.cat([x, 2 * x[:1], 0.5 * x[1:2] - 0.25 * x[2:3]]).requires_grad_()  # (5, 8)
    data = [x.clone().requires_grad_(), (-3 * x).requires_grad_(), unit(3, 8, dtype=dtype, seed=4)]
    out = volume(anchor, *data)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert out.abs().max() < 1e-3  # data_1 and data_2 are collinear, so every volume is ~0
    for t in (anchor, data[0], data[1]):
        assert torch.isfinite(t.grad).all()
    plane = [x, unit(3, 8, dtype=dtype, seed=5)]
    in_span = (0.3 * plane[0] + 0.7 * plane[1]).requires_grad_()
    vol = volume(in_span, *plane).diagonal()
    vol.sum().backward()
    assert vol.abs().max() < 1e-3 and torch.isfinite(in_span.grad).all()


def test_zero_rows_give_zero_volume_and_zero_gradient() -> None:
    anchor = torch.cat([torch.zeros(1, 6), unit(2, 6, dtype=torch.float32)]).requires_grad_()
    data = [torch.cat([unit(2, 6, dtype=torch.float32, seed=1), torch.zeros(1, 6)]).requires_grad_()]
    data.append(unit(3, 6, dtype=torch.float32, seed=2).requires_grad_())
    out = volume(anchor, *data)
    out.sum().backward()
    assert torch.equal(out[0], torch.zeros(3)) and torch.equal(out[:, 2], torch.zeros(3))
    assert (out[1:, :2] > 0).all()
    assert torch.equal(anchor.grad[0], torch.zeros(6)) and torch.equal(data[0].grad[2], torch.zeros(6))
    assert torch.isfinite(data[1].grad).all()


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_gradcheck_random(k: int) -> None:
    anchor = unit(3, 6, seed=k).requires_grad_()
    data = [unit(4, 6, seed=30 + p).requires_grad_() for p in range(k - 1)]
    assert torch.autograd.gradcheck(volume, (anchor, *data))
    assert torch.autograd.gradcheck(negative_volume, (anchor, *data))
    assert torch.autograd.gradcheck(simplex_volume, (anchor, *data))


@pytest.mark.parametrize("k", [3, 5])
def test_gradcheck_near_degenerate(k: int) -> None:
    base = unit(3, 6, seed=11)
    data = [(base + 1e-3 * unit(3, 6, seed=40 + p)).requires_grad_() for p in range(k - 1)]
    anchor = (base[:2] + 1e-3 * unit(2, 6, seed=50)).requires_grad_()
    assert torch.autograd.gradcheck(volume, (anchor, *data), atol=1e-6)


def test_bf16_autocast_computes_in_float32() -> None:
    anchor = unit(6, 64, dtype=torch.float32, seed=1).requires_grad_()
    data = [unit(6, 64, dtype=torch.float32, seed=2 + p) for p in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = volume(anchor, *data)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), det_volume(anchor, *data), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(anchor.grad).all()
    half_in = volume(anchor.detach().bfloat16(), *[x.bfloat16() for x in data])
    assert half_in.dtype == torch.float32
    ref = det_volume(anchor.detach().bfloat16(), *[x.bfloat16() for x in data])
    torch.testing.assert_close(half_in.double(), ref, rtol=1e-5, atol=1e-6)


def test_never_materialises_a_gram_tensor() -> None:
    """Everything kept for backward is O(N1 * N2 * (k-1)), not O(N1 * N2 * k * k)."""
    n1, n2, k = 12, 10, 5
    anchor = unit(n1, 8, dtype=torch.float32).requires_grad_()  # d small: inputs stay below N1 * N2
    data = [unit(n2, 8, dtype=torch.float32, seed=p).requires_grad_() for p in range(k - 1)]
    sizes: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        volume(anchor, *data).sum().backward()
    assert max(sizes) <= n1 * n2 * (k - 1)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_simplex_volume_matches_determinant(k: int) -> None:
    anchor = unit(4, 7, seed=k)
    data = [unit(5, 7, seed=60 + p) for p in range(k - 1)]
    torch.testing.assert_close(
        simplex_volume(anchor, *data), det_simplex(anchor, *data), rtol=1e-10, atol=1e-12
    )


def test_triangle_area_formula() -> None:
    """k = 3 equals the TRIANGLE paper's 1/2 sqrt(|u|^2 |v|^2 - (u.v)^2) with u = t - v, v = t - a."""
    t, v, a = unit(3, 9, seed=1), unit(4, 9, seed=2), unit(4, 9, seed=3)
    u = t[:, None] - v[None]  # (3, 4, 9)
    w = t[:, None] - a[None]  # (3, 4, 9)
    uu, ww, uw = u.square().sum(-1), w.square().sum(-1), (u * w).sum(-1)
    torch.testing.assert_close(simplex_volume(t, v, a), 0.5 * (uu * ww - uw**2).sqrt())


def test_exported_from_package() -> None:
    assert gram.losses.volume is volume


@pytest.mark.parametrize(
    ("anchor_shape", "data_shapes"),
    [((3, 4), []), ((3,), [(2, 4)]), ((3, 4), [(2, 5)]), ((3, 4), [(2, 4), (3, 4)])],
)
def test_bad_shapes_raise(anchor_shape: tuple[int, ...], data_shapes: list[tuple[int, ...]]) -> None:
    with pytest.raises(ValueError):
        volume(torch.randn(anchor_shape), *[torch.randn(s) for s in data_shapes])


@pytest.mark.parametrize("fn", [volume, simplex_volume])
def test_scale_multiplies_result_with_exact_gradients(fn) -> None:
    anchor, data = unit(4, 6, seed=11), [unit(3, 6, seed=12 + p) for p in range(2)]
    scale = torch.tensor(-2.5, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(fn(anchor, *data, scale=scale), -2.5 * fn(anchor, *data))
    torch.testing.assert_close(fn(anchor, *data, scale=0.5), 0.5 * fn(anchor, *data))
    inputs = (anchor.requires_grad_(), *(x.requires_grad_() for x in data), scale)
    assert torch.autograd.gradcheck(lambda a, x, y, s: fn(a, x, y, scale=s), inputs)
    with pytest.raises(ValueError, match="scalar"):
        fn(anchor, *data, scale=torch.ones(2))


def test_split_volume_sends_each_copy_to_one_side() -> None:
    anchor, data = unit(4, 6, seed=21), [unit(5, 6, seed=22 + p) for p in range(2)]
    weights = [unit(4, 5, seed=30), unit(4, 5, seed=31)]  # arbitrary upstream gradients

    def leaves():
        return anchor.clone().requires_grad_(), [x.clone().requires_grad_() for x in data]

    a, xs = leaves()
    scale = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    first, second = split_volume(a, *xs, scale=scale)
    torch.testing.assert_close(first, -3.0 * det_volume(anchor, *data))
    torch.testing.assert_close(second, first)
    ((first * weights[0]).sum() + (second * weights[1]).sum()).backward()

    ref_a, ref_xs = leaves()
    ref_scale = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    to_anchor = volume(ref_a, *(x.detach() for x in ref_xs), scale=ref_scale)
    to_data = volume(ref_a.detach(), *ref_xs, scale=ref_scale)
    ((to_anchor * weights[0]).sum() + (to_data * weights[1]).sum()).backward()
    torch.testing.assert_close(a.grad, ref_a.grad)
    for x, ref_x in zip(xs, ref_xs):
        torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(scale.grad, ref_scale.grad)
