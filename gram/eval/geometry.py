"""Geometry of the shared embedding space: the quantities the GRAM paper argues volume alignment improves.

All functions take (N, D) embeddings and L2-normalise them first (the model's embeddings already are), so the
numbers live on the unit sphere:

* modality gap (Liang et al. 2022): ||mean(x) - mean(y)||, the distance between two modalities' centroids;
* alignment (Wang & Isola 2020): E ||x_i - y_i||^alpha over positive pairs (row i of x with row i of y), alpha = 2;
* uniformity (Wang & Isola 2020): log E_{i != j} exp(-t ||x_i - x_j||^2) over distinct pairs of one modality, t = 2
  (lower = more uniform; 0 when all points coincide);
* effective rank (Roy & Vetterli 2007): exp(H(p)) with p_k = s_k / sum(s) the normalised singular values of the
  (uncentred) embedding matrix; a narrow cone has one dominant singular value and so a low effective rank;
* volumes: gram.volume(text_i, data_1[j], ...) of positives (i = j) against negatives (i != j), and how well they
  separate: AUC = P(a positive's volume < a negative's), ties counting 1/2 (the Mann-Whitney U statistic over all
  pairs; 0.5 = no separation, 1 = every positive smaller than every negative), and d' = (mean_neg - mean_pos) /
  sqrt((var_pos + var_neg) / 2) (the gap between the means in pooled standard deviations).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from gram.losses import volume

ANCHOR = "text"


def _unit(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, D) float64 rows of unit length (float64: these are statistics, not a training path)."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (N, D) matrix, got shape {tuple(x.shape)}")
    return F.normalize(x.detach().double(), dim=-1)


def _paired(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape:
        raise ValueError(f"paired embeddings must have the same shape (row i of each is one sample), "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    return _unit(x), _unit(y)


def modality_gap(x: torch.Tensor, y: torch.Tensor) -> float:
    """Euclidean distance between the centroids of two modalities' normalised embeddings (N, D), (M, D)."""
    return float(torch.linalg.vector_norm(_unit(x).mean(0) - _unit(y).mean(0)))


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """Mean ||x_i - y_i||^alpha over positive pairs; x, y (N, D) with row i of each one sample. Lower = better."""
    a, b = _paired(x, y)
    return float(torch.linalg.vector_norm(a - b, dim=-1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """log of the mean Gaussian potential exp(-t ||x_i - x_j||^2) over distinct pairs i < j of (N, D) rows."""
    u = _unit(x)
    if u.shape[0] < 2:
        raise ValueError(f"uniformity needs at least 2 embeddings, got {u.shape[0]}")
    sq = torch.pdist(u).square()  # (N(N-1)/2,) squared distances of the pairs i < j
    # log-mean-exp, stable when every pair is far apart (exp underflows).
    return float(torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel()))


def effective_rank(x: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values of the (N, D) normalised embedding matrix."""
    s = torch.linalg.svdvals(_unit(x))  # (min(N, D),)
    p = s / s.sum()
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum()  # 0 log 0 = 0
    return float(torch.exp(entropy))


def pair_volumes(anchor: torch.Tensor, *data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives (N,), negatives (N*(N-1),)) GRAM volumes: vol(anchor_i, data[i]) vs vol(anchor_i, data[j != i])."""
    unit = [_unit(anchor), *(_unit(d) for d in data)]
    if len({u.shape for u in unit}) != 1:
        raise ValueError(f"volumes need paired (N, D) embeddings, got shapes {[tuple(u.shape) for u in unit]}")
    vol = volume(*unit)  # (N, N)
    off_diagonal = ~torch.eye(vol.shape[0], dtype=torch.bool)
    return vol.diagonal().clone(), vol[off_diagonal]


def volume_separation(positives: torch.Tensor, negatives: torch.Tensor) -> dict[str, float]:
    """{"auc", "d_prime"} of positive (P,) against negative (M,) volumes; smaller volume = better match.

    AUC = P(pos < neg) + P(pos = neg) / 2 over all P x M pairs, computed from mid-ranks in O((P + M) log(P + M)).
    """
    pos, neg = positives.detach().double().flatten(), negatives.detach().double().flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError(f"separation needs positives and negatives, got {pos.numel()} and {neg.numel()}")
    values = torch.cat([pos, neg])
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)  # sorted distinct values
    ends = counts.cumsum(0).double()
    mid_rank = (ends - (counts - 1) / 2)[inverse]  # 1-based rank of each value, ties sharing their mean rank
    n_pos, n_neg = pos.numel(), neg.numel()
    # Pairs where the positive is the larger (ties 1/2): the Mann-Whitney U of the positives.
    u_larger = mid_rank[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    auc = 1.0 - float(u_larger) / (n_pos * n_neg)
    pooled_sd = math.sqrt((_var(pos) + _var(neg)) / 2)
    gap = float(neg.mean() - pos.mean())
    d_prime = gap / pooled_sd if pooled_sd > 0 else (math.copysign(math.inf, gap) if gap else 0.0)
    return {"auc": auc, "d_prime": d_prime}


def _var(x: torch.Tensor) -> float:
    """Unbiased variance (0 for a single value)."""
    return float(x.var()) if x.numel() > 1 else 0.0


def principal_projection(embeddings: Mapping[str, torch.Tensor], k: int = 2
                         ) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Every modality's normalised embeddings projected on the top-k principal axes of all of them pooled.

    Returns ({modality: (N_m, k)}, the fraction of the pooled variance each axis explains). Pooled, so the
    modality gap shows as separated clouds.
    """
    units = {m: _unit(x) for m, x in embeddings.items()}
    pooled = torch.cat(list(units.values()))  # (sum N_m, D)
    mean = pooled.mean(0)
    _, s, vh = torch.linalg.svd(pooled - mean, full_matrices=False)  # vh: (r, D), principal axes as rows
    axes = vh[:k].T  # (D, k)
    variance = s.square()
    explained = (variance[:k] / variance.sum()).tolist() if variance.sum() > 0 else [0.0] * min(k, len(s))
    return {m: (u - mean) @ axes for m, u in units.items()}, explained  # (N_m, D) @ (D, k) -> (N_m, k)


def pca_2d(embeddings: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{modality: (N_m, 2)}: :func:`principal_projection` on the top-2 axes."""
    return principal_projection(embeddings, 2)[0]


def _summary(values: torch.Tensor) -> dict[str, float]:
    return {"mean": float(values.mean()), "std": float(values.std()) if values.numel() > 1 else 0.0,
            "median": float(values.median()), "min": float(values.min()), "max": float(values.max())}


@dataclass
class GeometryReport:
    """Every diagnostic of one set of paired embeddings (row i of each modality = sample i)."""

    n: int
    modalities: list[str]
    gap: dict[str, float] = field(default_factory=dict)  # "text-video" -> modality gap
    alignment: dict[str, float] = field(default_factory=dict)  # "text-video" -> alignment (alpha = 2)
    uniformity: dict[str, float] = field(default_factory=dict)  # "text" -> uniformity of one modality (t = 2)
    pair_uniformity: dict[str, float] = field(default_factory=dict)  # "text-video" -> mean of both (W&I's loss)
    effective_rank: dict[str, float] = field(default_factory=dict)  # "text" -> effective rank
    volume_positive: dict[str, float] = field(default_factory=dict)  # summary of positive volumes
    volume_negative: dict[str, float] = field(default_factory=dict)  # summary of negative volumes
    volume_separation: dict[str, float] = field(default_factory=dict)  # {"auc", "d_prime"} positives vs negatives

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def modality_pairs(modalities: Sequence[str]) -> list[tuple[str, str]]:
    return list(itertools.combinations(modalities, 2))


def geometry_report(embeddings: Mapping[str, torch.Tensor], anchor: str = ANCHOR) -> GeometryReport:
    """All diagnostics of {modality: (N, D)} paired embeddings; volumes use ``anchor`` plus every other modality."""
    mods = list(embeddings)
    if anchor not in embeddings or len(mods) < 2:
        raise ValueError(f"need the {anchor!r} anchor and at least one data modality, got {mods}")
    x = embeddings
    report = GeometryReport(n=int(x[anchor].shape[0]), modalities=mods)
    for a, b in modality_pairs(mods):
        key = f"{a}-{b}"
        report.gap[key] = modality_gap(x[a], x[b])
        report.alignment[key] = alignment(x[a], x[b])
    for m in mods:
        report.uniformity[m] = uniformity(x[m])
        report.effective_rank[m] = effective_rank(x[m])
    for a, b in modality_pairs(mods):
        report.pair_uniformity[f"{a}-{b}"] = (report.uniformity[a] + report.uniformity[b]) / 2
    positives, negatives = pair_volumes(x[anchor], *(x[m] for m in mods if m != anchor))
    report.volume_positive, report.volume_negative = _summary(positives), _summary(negatives)
    report.volume_separation = volume_separation(positives, negatives)
    return report


def format_report(report: GeometryReport) -> str:
    """A plain-text summary, one block per quantity."""
    lines = [f"geometry of {report.n} paired samples, modalities {', '.join(report.modalities)}",
             f"{'pair':<18} {'gap':>8} {'align':>8} {'unif':>8}"]
    for key in report.gap:
        lines.append(f"{key:<18} {report.gap[key]:>8.4f} {report.alignment[key]:>8.4f} "
                     f"{report.pair_uniformity[key]:>8.4f}")
    lines.append(f"{'modality':<18} {'unif':>8} {'erank':>8}")
    for m in report.modalities:
        lines.append(f"{m:<18} {report.uniformity[m]:>8.4f} {report.effective_rank[m]:>8.2f}")
    for name, s in (("positive", report.volume_positive), ("negative", report.volume_negative)):
        lines.append(f"volume {name:<10} mean {s['mean']:.4f}  std {s['std']:.4f}  median {s['median']:.4f}  "
                     f"[{s['min']:.4f}, {s['max']:.4f}]")
    sep = report.volume_separation
    lines.append(f"volume separation  AUC {sep['auc']:.4f} (P(positive < negative); 0.5 = chance)  "
                 f"d' {sep['d_prime']:.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots
def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed; safe in workers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_volume_histogram(positives: torch.Tensor, negatives: torch.Tensor, path: str | Path,
                          title: str = "") -> Path:
    """Density histograms of positive vs negative volumes over the data's range, with AUC and d', as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    both = torch.cat([positives, negatives]).double()
    lo, hi = float(both.min()), float(both.max())
    pad = max(hi - lo, abs(hi), 1e-6) * 0.02 if hi - lo < 1e-9 else 0.0  # one value: a narrow visible bin
    bins = torch.linspace(lo - pad, hi + pad, 41).tolist()
    ax.hist(negatives.numpy(), bins=bins, density=True, alpha=0.6, label=f"negatives (n={negatives.numel()})")
    ax.hist(positives.numpy(), bins=bins, density=True, alpha=0.6, label=f"positives (n={positives.numel()})")
    sep = volume_separation(positives, negatives)
    ax.set_xlabel("GRAM volume, text anchor (smaller = closer)")
    ax.set_ylabel("density")
    ax.legend(title=f"AUC {sep['auc']:.3f}   d' {sep['d_prime']:.2f}")
    _title(ax, "positive vs negative volumes", title)
    return _save(fig, plt, path, title)


def plot_projection(points: Mapping[str, torch.Tensor], path: str | Path, explained: Sequence[float] = (),
                    title: str = "") -> Path:
    """Scatter of {modality: (N, 2)} projected embeddings, one colour per modality, equal axis scales, as a PNG.

    ``explained``: the fraction of variance of each axis, shown in the axis labels.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    for modality, xy in points.items():
        ax.scatter(xy[:, 0].numpy(), xy[:, 1].numpy(), s=12, alpha=0.7, label=f"{modality} (n={len(xy)})")
    for i, set_label in enumerate((ax.set_xlabel, ax.set_ylabel)):
        share = f" ({explained[i]:.1%} of variance)" if i < len(explained) else ""
        set_label(f"PC {i + 1}{share}")
    ax.set_aspect("equal", adjustable="datalim")  # distances on the page are distances in the space
    ax.legend()
    _title(ax, "normalised embeddings, 2-D PCA of all modalities pooled", title)
    return _save(fig, plt, path, title)


def _title(ax, what: str, context: str) -> None:
    ax.set_title(f"{what}\n{context}" if context else what, fontsize=10)


def _save(fig, plt, path: str | Path, title: str = "") -> Path:
    """Write the figure; ``title`` also goes into the PNG's Title text chunk (readable by tools and tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100, metadata={"Title": title} if title else None)
    plt.close(fig)
    return path


def plot_title(checkpoint: str, split: str, modalities: Sequence[str], n: int) -> str:
    """The context line every figure carries: which checkpoint, on which split, which modalities, how many."""
    return f"{checkpoint} | {split} | {'+'.join(modalities)} | N={n}"


def save_plots(embeddings: Mapping[str, torch.Tensor], output_dir: str | Path, anchor: str = ANCHOR,
               title: str = "") -> list[Path]:
    """volumes.png (positives vs negatives) and projection.png (2-D PCA by modality) in ``output_dir``; ``title``
    (e.g. :func:`plot_title`) is printed under each figure's own title."""
    out = Path(output_dir)
    data = [embeddings[m] for m in embeddings if m != anchor]
    positives, negatives = pair_volumes(embeddings[anchor], *data)
    points, explained = principal_projection(embeddings, 2)
    return [plot_volume_histogram(positives, negatives, out / "volumes.png", title),
            plot_projection(points, out / "projection.png", explained, title)]
