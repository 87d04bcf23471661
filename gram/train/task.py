"""The task between model and trainer: owns the model and the loss, returns named losses.

The trainer only sees `{"loss": total, "<name>": part, ...}`; nothing outside this file and the model knows which
modalities a batch carries.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gram.losses import LossConfig, build_loss, dam_loss
from gram.models.gram_model import GramModel


class GramTask(nn.Module):
    def __init__(self, model: GramModel, loss_cfg: LossConfig):
        super().__init__()
        self.model = model
        self.loss = build_loss(loss_cfg)
        self.dam_weight = loss_cfg.dam_weight if model.cfg.matching_head else 0.0

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.model(batch)
        parts = self.loss(out["embeddings"], self.model.modalities)
        losses = {"contrastive": parts["loss"]}
        if self.dam_weight > 0:
            text = out["text"]
            dam = dam_loss(self.model.match, text["input_ids"], text["attention_mask"], out["condition"],
                           parts["logits_anchor_to_data"], parts["logits_data_to_anchor"])
            losses["dam"] = self.dam_weight * dam
        losses["loss"] = sum(losses.values())
        losses["temperature"] = parts["temperature"]
        return losses
