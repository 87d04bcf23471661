"""Geometry diagnostics against known values and independent (numpy/scipy) formulas on constructed inputs."""

from __future__ import annotations

import math
from pathlib import Path

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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------- separation, figures
def brute_force_auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(pos < neg) + P(pos == neg) / 2 by counting every pair."""
    p, n = pos[:, None], neg[None, :]
    return float(((p < n).double() + 0.5 * (p == n).double()).mean())


def test_auc_matches_a_pair_count_and_scipy_with_ties():
    g = torch.Generator().manual_seed(3)
    pos = torch.randint(0, 12, (40,), generator=g).double() / 4  # many ties, within and across the groups
    neg = torch.randint(3, 20, (300,), generator=g).double() / 4
    sep = geo.volume_separation(pos, neg)
    assert sep["auc"] == pytest.approx(brute_force_auc(pos, neg), abs=1e-12)
    u = scipy.stats.mannwhitneyu(neg.numpy(), pos.numpy(), alternative="two-sided").statistic  # pairs neg > pos
    assert sep["auc"] == pytest.approx(u / (pos.numel() * neg.numel()), abs=1e-12)
    d = (neg.mean() - pos.mean()) / np.sqrt((np.var(pos.numpy(), ddof=1) + np.var(neg.numpy(), ddof=1)) / 2)
    assert sep["d_prime"] == pytest.approx(float(d), rel=1e-12)


def test_auc_known_values():
    assert geo.volume_separation(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4]))["auc"] == 1.0
    assert geo.volume_separation(torch.tensor([0.5, 0.6]), torch.tensor([0.3, 0.4]))["auc"] == 0.0
    assert geo.volume_separation(torch.full((3,), 0.5), torch.full((5,), 0.5)) == {"auc": 0.5, "d_prime": 0.0}
    with pytest.raises(ValueError, match="positives and negatives"):
        geo.volume_separation(torch.tensor([0.1]), torch.tensor([]))


def test_report_carries_the_separation():
    x, y = unit_rows(12, 6, 1), unit_rows(12, 6, 2)
    report = geo.geometry_report({"text": x, "video": y})
    positives, negatives = geo.pair_volumes(x, y)
    assert report.volume_separation["auc"] == pytest.approx(brute_force_auc(positives, negatives))
    assert "AUC" in geo.format_report(report) and "d'" in geo.format_report(report)


def test_explained_variance_matches_the_covariance_eigenvalues():
    embeddings = {"text": unit_rows(20, 6, 4), "video": unit_rows(15, 6, 5) + 0.5}
    points, explained = geo.principal_projection(embeddings, 2)
    pooled = np.concatenate([x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True) for x in embeddings.values()])
    eig = np.sort(np.linalg.eigvalsh(np.cov(pooled, rowvar=False)))[::-1]
    assert explained == pytest.approx(list(eig[:2] / eig.sum()), rel=1e-10)
    # the projected coordinates carry exactly that variance
    both = torch.cat(list(points.values()))
    assert float(both[:, 0].var()) == pytest.approx(float(eig[0]), rel=1e-10)


def test_figures_have_titles_data_range_bins_and_labelled_equal_axes(tmp_path, monkeypatch):
    from PIL import Image

    figures = {}
    real_save = geo._save

    def keep(fig, plt, path, title=""):
        figures[Path(path).name] = (fig.axes[0].get_title(), fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel(),
                                    fig.axes[0].get_aspect(), [p.get_x() for p in fig.axes[0].patches],
                                    fig.axes[0].get_legend().get_title().get_text())
        return real_save(fig, plt, path, title)

    monkeypatch.setattr(geo, "_save", keep)
    embeddings = {"text": unit_rows(10, 8, 9), "video": unit_rows(10, 8, 10), "audio": unit_rows(10, 8, 11)}
    title = geo.plot_title("outputs/run (step_00000020)", "sample test", list(embeddings), 10)
    paths = geo.save_plots(embeddings, tmp_path / "plots", title=title)
    assert title == "outputs/run (step_00000020) | sample test | text+video+audio | N=10"
    for path in paths:
        assert Image.open(path).info["Title"] == title  # written into the PNG itself
    hist_title, xlabel, _, _, lefts, legend = figures["volumes.png"]
    assert title in hist_title and "AUC" in legend and "d'" in legend
    positives, negatives = geo.pair_volumes(embeddings["text"], embeddings["video"], embeddings["audio"])
    low = float(torch.cat([positives, negatives]).min())
    assert min(lefts) == pytest.approx(low) and low > 0.05  # bins start at the data, not at 0
    proj_title, xlabel, ylabel, aspect, _, _ = figures["projection.png"]
    _, explained = geo.principal_projection(embeddings)
    assert title in proj_title and aspect == 1.0
    assert xlabel == f"PC 1 ({explained[0]:.1%} of variance)" and ylabel.startswith("PC 2 (")
