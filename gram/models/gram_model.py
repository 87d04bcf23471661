"""The GRAM model: per-modality encoders and projections into one shared, L2-normalised space.

Modality is a key, not a branch: `text` and `subtitle` share the BERT encoder, `video` and `depth` share the
vision encoder, `audio` has BEATs; each modality has its own projection. The matching head (DAM) reads the text
through the same BERT with cross-attention over the data modalities' tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gram.config import ModelConfig
from gram.models.beats import build_beats
from gram.models.text import build_text_encoder
from gram.models.vision import build_vision_encoder

# Which encoder family reads each modality.
ENCODER_OF = {"text": "text", "subtitle": "text", "video": "vision", "depth": "vision", "audio": "audio"}
FRAMED = ("video", "depth", "audio")  # modalities with several frames/clips per sample


def building_on_meta() -> bool:
    """True inside ``with torch.device("meta")``: only shapes are built, so no encoder weight file is read."""
    return torch.get_default_device().type == "meta"


class MatchHead(nn.Module):
    """Two-way match/no-match classifier on the cross-encoder's [CLS] state (reference `Match_head`)."""

    def __init__(self, width: int):
        super().__init__()
        self.linear1 = nn.Linear(width, width)
        self.layernorm = nn.LayerNorm(width, eps=1e-12)
        self.linear2 = nn.Linear(width, 2)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.layernorm(F.gelu(self.linear1(cls))))


class GramModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.modalities = tuple(cfg.modalities)
        families = {ENCODER_OF[m] for m in ("text", *self.modalities)}
        # Each builder also loads the encoder's pretrained weights when its config names a file, except on the
        # meta device (a weightless build; BEATs then takes its architecture from cfg.audio, not the file's cfg).
        meta = "meta" if building_on_meta() else None
        audio_cfg = dataclasses.replace(cfg.audio, weights=None) if meta else cfg.audio
        # Without the matching head nothing reads the cross-attention blocks (and DDP rejects unused parameters).
        text_cfg = cfg.text if cfg.matching_head else dataclasses.replace(cfg.text, cross_attention=False)
        builders = {"text": lambda: build_text_encoder(text_cfg, device=meta),
                    "vision": lambda: build_vision_encoder(cfg.vision, device=meta),
                    "audio": lambda: build_beats(audio_cfg)}
        self.encoders = nn.ModuleDict({name: builders[name]() for name in sorted(families)})
        self.projections = nn.ModuleDict({
            m: nn.Linear(self.encoders[ENCODER_OF[m]].width, cfg.embed_dim, bias=False)
            for m in ("text", *self.modalities)})
        if cfg.matching_head:
            self._build_matching(cfg)

    def _build_matching(self, cfg: ModelConfig) -> None:
        hidden = self.encoders["text"].width
        self.condition_projections = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(self.encoders[ENCODER_OF[m]].width, hidden), nn.LayerNorm(hidden, eps=1e-12))
            for m in self.modalities})
        lengths = {"video": cfg.max_frames, "depth": cfg.max_frames, "audio": cfg.max_audio_clips}
        self.frame_embeddings = nn.ParameterDict({
            m: nn.Parameter(0.02 * torch.randn(1, lengths[m], hidden)) for m in self.modalities if m in FRAMED})
        self.type_embeddings = nn.ParameterDict({
            m: nn.Parameter(0.02 * torch.randn(1, 1, hidden)) for m in self.modalities})
        self.match_head = MatchHead(hidden)

    # ----------------------------------------------------------------------------------------- encoders
    def encode_tokens(self, modality: str, x: Any) -> torch.Tensor:
        """Encoder tokens of one modality.

        text/subtitle: dict of (B, L) ids and mask -> (B, L, W); video/depth: (B, n, 3, S, S) -> (B, n, 1+P, W);
        audio: (B, n, T, F) -> (B, n, N, W).
        """
        family = ENCODER_OF[modality]
        encoder = self.encoders[family]
        if family == "text":
            return encoder(x["input_ids"], x["attention_mask"])
        b, n = x.shape[:2]
        tokens = encoder(x.flatten(0, 1))  # (B*n, tokens, W)
        return tokens.unflatten(0, (b, n))  # (B, n, tokens, W)

    def pool(self, modality: str, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """One vector per sample (B, W), by `model.text_pooling` / `model.vision_pooling`; audio: token+clip mean.

        text: (B, L, W) with its (B, L) mask; vision: (B, n, 1+P, W), per-frame [CLS] or token mean, then the
        frame mean; audio: (B, n, N, W).
        """
        family = ENCODER_OF[modality]
        if family == "text":
            if self.cfg.text_pooling == "cls":
                return tokens[:, 0]
            weights = mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
            return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        if family == "vision":
            frames = tokens[:, :, 0] if self.cfg.vision_pooling == "cls" else tokens.mean(dim=2)  # (B, n, W)
            return frames.mean(dim=1)
        return tokens.mean(dim=(1, 2))

    def embed_tokens(self, modality: str, tokens: torch.Tensor, x: Any = None) -> torch.Tensor:
        """(B, ..., W) encoder tokens -> (B, D) L2-normalised embedding (`x`: the input, for the text mask)."""
        mask = x["attention_mask"] if isinstance(x, dict) else None
        return F.normalize(self.projections[modality](self.pool(modality, tokens, mask)), dim=-1)

    def encode(self, modality: str, x: Any) -> torch.Tensor:
        """(B, D) normalised embedding of one modality's model-ready batch (text: token dicts). Strings and files
        are :class:`gram.GramPredictor`'s (``gram.load_model``): its ``encode_text`` takes strings,
        its ``tokenize`` gives the token dicts this method takes."""
        return self.embed_tokens(modality, self.encode_tokens(modality, x), x)

    # ----------------------------------------------------------------------------------------- matching
    def condition_tokens(self, tokens: dict[str, torch.Tensor],
                         modalities: Sequence[str] | None = None) -> torch.Tensor:
        """Concatenated data tokens in the text encoder's width for cross-attention: (B, sum of lengths, H)."""
        parts = []
        for m in modalities or self.modalities:
            x = self.condition_projections[m](tokens[m])  # (B, n, P, H) or (B, L, H)
            if m in self.frame_embeddings:
                x = x + self._frame_embedding(m, x.shape[1])  # (1, n, 1, H) broadcast over each frame's tokens
                x = x.flatten(1, 2)  # (B, n*P, H)
            parts.append(x + self.type_embeddings[m])
        return torch.cat(parts, dim=1)

    def _frame_embedding(self, modality: str, n: int) -> torch.Tensor:
        emb = self.frame_embeddings[modality]  # (1, n_max, H)
        if emb.shape[1] != n:  # more/fewer frames than trained with: nearest resampling, as the reference
            emb = F.interpolate(emb.transpose(1, 2), size=n, mode="nearest").transpose(1, 2)
        return emb.unsqueeze(2)  # (1, n, 1, H)

    def match(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Match logits (N, 2) of texts (N, L) against condition tokens (N, Lc, H)."""
        states = self.encoders["text"](input_ids, attention_mask, condition=condition)  # (N, L, H)
        return self.match_head(states[:, 0])

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Embeddings of every modality in the batch, plus what the matching loss needs.

        Returns {"embeddings": {modality: (B, D)}, "condition": (B, Lc, H) or None, "text": the text input}.
        """
        present = [m for m in ("text", *self.modalities) if m in batch]
        tokens = {m: self.encode_tokens(m, batch[m]) for m in present}
        embeddings = {m: self.embed_tokens(m, t, batch[m]) for m, t in tokens.items()}
        condition = self.condition_tokens(tokens) if self.cfg.matching_head else None
        return {"embeddings": embeddings, "condition": condition, "text": batch["text"]}

    def set_frozen(self) -> None:
        """Freeze encoders as configured (their params get no grads and are left out of the optimizer)."""
        for family, frozen in (("vision", self.cfg.freeze_vision), ("audio", self.cfg.freeze_audio),
                               ("text", self.cfg.freeze_text)):
            if frozen and family in self.encoders:
                self.encoders[family].requires_grad_(False)
