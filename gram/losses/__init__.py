"""GRAM objectives: Gramian volume, two-way contrastive loss, DAM, and baseline similarities."""

from gram.config import LossConfig
from gram.losses.contrastive import ContrastiveLoss, build_loss
from gram.losses.dam import dam_loss, negative_sampling_probs, sample_hard_negatives
from gram.losses.similarity import get_similarity, list_similarities
from gram.losses.volume import simplex_volume, volume

__all__ = [
    "ContrastiveLoss",
    "LossConfig",
    "build_loss",
    "dam_loss",
    "get_similarity",
    "list_similarities",
    "negative_sampling_probs",
    "sample_hard_negatives",
    "simplex_volume",
    "volume",
]
