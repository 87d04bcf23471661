"""Batches as the collator makes them: tensors (also one level down, e.g. tokenized text), ids and lists of paths.

Light on purpose (torch only): the trainer moves batches without importing the media decoders.
"""

from __future__ import annotations

from typing import Any

import torch


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors (also one level down, e.g. tokenized text) to `device`; everything else unchanged."""
    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v
    return {k: move(v) for k, v in batch.items()}
