"""Configuration of the contrastive objective (a Hydra structured-config node)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gram.losses.similarity import list_similarities

__all__ = ["LossConfig"]

_PARAMETRIZATIONS = ("log", "raw")


@dataclass
class LossConfig:
    """Options of the GRAM contrastive loss and its baselines.

    Attributes:
        name: similarity, one of ``list_similarities()``: volume (GRAM) | cosine | symile | triangle.
        temperature_init: initial temperature tau (logits are scores / tau).
        temperature_parametrization: "log" (default) learns log(tau) and clamps tau to
            [temperature_min, temperature_max]. tau stays positive whatever the optimiser does, steps are
            relative (a step changes tau by a factor, not by an absolute amount that is huge when tau is
            small), and the clamp stops the logits from blowing up (as CLIP's logit-scale cap does).
            "raw" is the reference: tau is a plain learnable divisor with no constraint, which can
            cross zero and flip the sign of the loss.
        temperature_min, temperature_max: clamp range of the "log" parametrisation (ignored for "raw").
        learnable_temperature: False keeps tau fixed at ``temperature_init``.
        label_smoothing: label smoothing of both cross-entropies (reference: 0.1).
        gather_with_grad: False (reference) detaches the negatives gathered from the other ranks (and,
            in each direction, the other side of the pair even on one rank); True back-propagates
            through the all-gather into every embedding.
        dam_weight: weight of the Data-Anchor Matching loss (reference 0.1); 0 disables DAM.
        chunk_size: > 0 computes the similarity in chunks of that many global-batch rows and
            recomputes each chunk in the backward pass, so memory stays O(B_local x B_global);
            0 computes the whole batch at once (fastest).
    """

    name: str = "volume"
    temperature_init: float = 0.07
    temperature_parametrization: str = "log"
    temperature_min: float = 0.01
    temperature_max: float = 1.0
    learnable_temperature: bool = True
    label_smoothing: float = 0.1
    gather_with_grad: bool = False
    dam_weight: float = 0.1
    chunk_size: int = 0

    def __post_init__(self) -> None:
        if self.name not in list_similarities():
            raise ValueError(f"config key `loss.name`: got {self.name!r}, expected one of {list_similarities()}")
        if self.temperature_parametrization not in _PARAMETRIZATIONS:
            raise ValueError(f"config key `loss.temperature_parametrization`: got "
                             f"{self.temperature_parametrization!r}, expected one of {list(_PARAMETRIZATIONS)}")
        _check("temperature_init", self.temperature_init, 0 < self.temperature_init, "> 0")
        self._check_temperature_range()
        _check("label_smoothing", self.label_smoothing, 0.0 <= self.label_smoothing < 1.0, "in [0, 1)")
        _check("dam_weight", self.dam_weight, self.dam_weight >= 0, ">= 0 (0 disables DAM)")
        _check("chunk_size", self.chunk_size, self.chunk_size >= 0, ">= 0 (0 = no chunking)")

    def _check_temperature_range(self) -> None:
        """The log parametrisation needs 0 < temperature_min <= temperature_init <= temperature_max."""
        if self.temperature_parametrization != "log":
            return
        low, high = self.temperature_min, self.temperature_max
        _check("temperature_min", low, 0 < low <= high, f"in (0, loss.temperature_max={high}]")
        _check("temperature_max", high, math.isfinite(high), "finite")
        _check("temperature_init", self.temperature_init, low <= self.temperature_init <= high,
               f"in [loss.temperature_min, loss.temperature_max] = [{low}, {high}]")


def _check(key: str, value: float, ok: bool, allowed: str) -> None:
    """ValueError naming the key `loss.<key>`, the value and the allowed range unless `ok` and the value is finite
    (a NaN fails every comparison, an infinite temperature or weight makes no loss)."""
    if not (ok and math.isfinite(value)):
        finite = "" if math.isfinite(value) else "a finite number "
        raise ValueError(f"config key `loss.{key}`: got {value}, must be {finite}{allowed}")
