"""Geometry diagnostics against known values and independent (numpy/scipy) formulas on constructed inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from gram.eval import geometry as geo


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def two_clusters(theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x: cos(theta) e0 +- sin(theta) e2; y: cos(theta) e1 +- sin(theta) e3 (unit rows; centroids cos(theta) e_k)."""
    eye = torch.eye(6, dtype=torch.float64)
    c, s = math.cos(theta), math.sin(theta)
    x = torch.stack([c * eye[0] + s * eye[2], c * eye[0] - s * eye[2]] * 3)  # (6, 6)
    y = torch.stack([c * eye[1] + s * eye[3], c * eye[1] - s * eye[3]] * 3)
    return x, y


def test_identical_embeddings_have_zero_gap_and_alignment():
    x = unit_rows(10, 8, 0)
    assert geo.modality_gap(x, x.clone()) == 0.0
    assert geo.alignment(x, x.clone()) == 0.0


def test_two_separated_clusters_give_the_exact_gap():
    for theta in (0.0, 0.3, 1.1):
        x, y = two_clusters(theta)
        # centroids cos(theta) e0 and cos(theta) e1 are sqrt(2) cos(theta) apart
        assert geo.modality_gap(x, y) == pytest.approx(math.sqrt(2) * math.cos(theta), abs=1e-12)


def test_gap_uses_normalised_embeddings():
    x, y = two_clusters(0.0)
    assert geo.modality_gap(3.0 * x, 0.5 * y) == pytest.approx(math.sqrt(2), abs=1e-12)


def test_alignment_matches_independent_formulas():
    x, y = unit_rows(12, 5, 1), unit_rows(12, 5, 2)
    a, b = x.numpy(), y.numpy()
    loop = np.mean([np.sum((a[i] - b[i]) ** 2) for i in range(len(a))])
    assert geo.alignment(x, y) == pytest.approx(loop, rel=1e-12)
    # on the unit sphere ||x - y||^2 = 2 - 2 cos(x, y)
    assert geo.alignment(x, y) == pytest.approx(float(np.mean(2 - 2 * np.sum(a * b, axis=1))), rel=1e-12)
    loop1 = np.mean([np.linalg.norm(a[i] - b[i]) for i in range(len(a))])
    assert geo.alignment(x, y, alpha=1.0) == pytest.approx(loop1, rel=1e-12)


def test_uniformity_matches_an_independent_double_loop():
    x = unit_rows(9, 4, 3).numpy()
    pairs = [np.exp(-2.0 * np.sum((x[i] - x[j]) ** 2)) for i in range(9) for j in range(i + 1, 9)]
    assert geo.uniformity(torch.from_numpy(x)) == pytest.approx(math.log(np.mean(pairs)), rel=1e-12)


def test_uniformity_known_values():
    # orthonormal points are all sqrt(2) apart: log exp(-t * 2) = -2t
    assert geo.uniformity(torch.eye(5)) == pytest.approx(-4.0, abs=1e-6)
    assert geo.uniformity(torch.eye(5), t=0.5) == pytest.approx(-1.0, abs=1e-6)
    # coincident points: every potential is exp(0) = 1
    assert geo.uniformity(torch.ones(4, 3)) == pytest.approx(0.0, abs=1e-12)


def test_effective_rank_known_values():
    assert geo.effective_rank(torch.eye(7)[:4]) == pytest.approx(4.0, rel=1e-12)  # four equal singular values
    assert geo.effective_rank(torch.ones(6, 3)) == pytest.approx(1.0, rel=1e-9)  # rank one
    a = 0.4  # rows (cos a, +-sin a) have singular values sqrt(2) cos a and sqrt(2) sin a
    x = torch.tensor([[math.cos(a), math.sin(a)], [math.cos(a), -math.sin(a)]], dtype=torch.float64)
    p = np.array([math.cos(a), math.sin(a)]) / (math.cos(a) + math.sin(a))
    assert geo.effective_rank(x) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)


def test_effective_rank_matches_numpy_and_scipy():
    x = unit_rows(20, 6, 4).numpy() * np.linspace(0.5, 2.0, 20)[:, None]  # row scale must not matter
    s = np.linalg.svd(x / np.linalg.norm(x, axis=1, keepdims=True), compute_uv=False)
    assert geo.effective_rank(torch.from_numpy(x)) == pytest.approx(math.exp(scipy.stats.entropy(s / s.sum())),
                                                                     rel=1e-10)


def test_pair_volumes_match_gram_determinants():
    t, v, a = unit_rows(5, 6, 5), unit_rows(5, 6, 6), unit_rows(5, 6, 7)
    positives, negatives = geo.pair_volumes(t, v, a)
    assert positives.shape == (5,) and negatives.shape == (20,)

    def det_volume(i: int, j: int) -> float:
        m = np.stack([t[i].numpy(), v[j].numpy(), a[j].numpy()])  # (3, 6)
        return math.sqrt(abs(np.linalg.det(m @ m.T)))

    assert positives.tolist() == pytest.approx([det_volume(i, i) for i in range(5)], abs=1e-6)
    expected = [det_volume(i, j) for i in range(5) for j in range(5) if i != j]  # row-major off-diagonal order
    assert negatives.tolist() == pytest.approx(expected, abs=1e-6)


def test_pca_keeps_planar_geometry_and_centres_the_pool():
    angles = torch.linspace(0, 2.5, 8, dtype=torch.float64)
    plane = torch.zeros(8, 5, dtype=torch.float64)
    plane[:, 0], plane[:, 1] = angles.cos(), angles.sin()
    single = geo.pca_2d({"text": plane})["text"]  # (8, 2)
    # points in a 2-D plane: the projection on their top-2 axes is an isometry
    assert torch.allclose(torch.cdist(single, single), torch.cdist(plane, plane), atol=1e-10)
    pooled = geo.pca_2d({"text": plane, "video": unit_rows(5, 5, 12)})
    assert pooled["text"].shape == (8, 2) and pooled["video"].shape == (5, 2)
    assert torch.allclose(torch.cat([pooled["text"], pooled["video"]]).mean(0), torch.zeros(2, dtype=torch.float64),
                          atol=1e-12)


def test_report_and_format():
    x, y = two_clusters(0.5)
    z = unit_rows(6, 6, 8)
    report = geo.geometry_report({"text": x, "video": y, "audio": z})
    assert set(report.gap) == {"text-video", "text-audio", "video-audio"}
    assert report.gap["text-video"] == pytest.approx(math.sqrt(2) * math.cos(0.5), abs=1e-12)
    assert report.alignment["video-audio"] == pytest.approx(geo.alignment(y, z))
    assert report.pair_uniformity["text-audio"] == pytest.approx((geo.uniformity(x) + geo.uniformity(z)) / 2)
    assert report.volume_positive["mean"] == pytest.approx(float(geo.pair_volumes(x, y, z)[0].mean()))
    text = geo.format_report(report)
    assert "text-video" in text and "volume positive" in text and f"{report.gap['text-video']:.4f}" in text


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        geo.alignment(torch.ones(3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="at least 2"):
        geo.uniformity(torch.ones(1, 4))
    with pytest.raises(ValueError, match="anchor"):
        geo.geometry_report({"video": torch.ones(3, 4), "audio": torch.ones(3, 4)})


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plots_are_valid_pngs(tmp_path):
    import matplotlib.image

    embeddings = {"text": unit_rows(10, 8, 9), "video": unit_rows(10, 8, 10), "audio": unit_rows(10, 8, 11)}
    paths = geo.save_plots(embeddings, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["projection.png", "volumes.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0  # something was drawn
