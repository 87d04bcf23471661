"""BERT text encoder whose layers also carry cross-attention (GRAM's text / subtitle / DAM multimodal encoder).

GRAM uses one BERT for two things: the text-only encoder (plain bidirectional BERT) and, with the same weights
plus a cross-attention block per layer, the "multimodal encoder" of the DAM matching head: self-attention stays
**bidirectional** over the text and every layer then attends over condition (video/audio) tokens.
transformers' stock ``BertModel(is_decoder=True, add_cross_attention=True)`` makes the self-attention causal, so
the layer is composed here from the library's own modules (``BertEmbeddings``, ``BertAttention``,
``BertIntermediate``, ``BertOutput``); only the wiring and the masks are written here.

Parameter names equal the reference's with ``multimodal_encoder.bert.`` removed:
``embeddings.*``, ``encoder.layer.{i}.attention.*``, ``.crossattention.*``, ``.intermediate.*``, ``.output.*``.
The reference's ``embeddings.position_ids`` (a persistent buffer in transformers 4.31) has no counterpart: it is
``arange`` and non-persistent here. The MLM head ``cls.*`` is not part of this module.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertAttention, BertEmbeddings, BertIntermediate, BertOutput

from gram.models.configs import TextConfig
from gram.models.vision import load_strict

logger = logging.getLogger(__name__)

WEIGHTS_HELP = "pretrained_weights/README.md, section BERT"
# The reference (transformers 4.31) adds -10000 to masked attention logits; keeping it makes padded positions match.
MASK_VALUE = -10000.0
# Keys of a bert-base-uncased file that this encoder does not have: NSP pooler, MLM/NSP heads, arange buffers.
_DROPPED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids", "embeddings.token_type_ids")
# bert-base-uncased config.json fields that must equal ours for the weights to fit.
_CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
}


def text_tiny_config(vocab_size: int, **overrides) -> TextConfig:
    """A CPU-sized BERT (2 layers, width 64, 4 heads) with the real structure, for tests and the sample run."""
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    fields.update(overrides)
    return TextConfig(**fields)


def bert_config(cfg: TextConfig) -> BertConfig:
    """The transformers ``BertConfig`` the library modules are built from (an encoder: never causal)."""
    config = BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        initializer_range=cfg.initializer_range,
        pad_token_id=cfg.pad_token_id,
        hidden_act="gelu",
        is_decoder=False,
    )
    # The attention modules look the backend up on the config; a bare config leaves it unset.
    config._attn_implementation = cfg.attn_implementation
    return config


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Key-padding mask (B, Lk) of 1 = attend, 0 = ignore -> additive (B, 1, 1, Lk) logits bias, or None."""
    if mask is None:
        return None
    if mask.ndim != 2:
        raise ValueError(f"attention masks must be (batch, length) of 0/1, got shape {tuple(mask.shape)}")
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE  # (B, 1, 1, Lk)


class CrossAttentionBertLayer(nn.Module):
    """A BERT layer: bidirectional self-attention, optional cross-attention over a condition, feed-forward."""

    def __init__(self, config: BertConfig, cross_attention: bool) -> None:
        super().__init__()
        self.attention = BertAttention(config, is_causal=False)
        if cross_attention:
            self.crossattention = BertAttention(config, is_causal=False, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self,
        hidden: torch.Tensor,
        self_mask: torch.Tensor | None,
        condition: torch.Tensor | None = None,
        condition_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden (B, L, H), self_mask (B, 1, 1, L) additive, condition (B, Lc, H), condition_mask (B, 1, 1, Lc)
        -> (B, L, H)."""
        hidden, _ = self.attention(hidden, attention_mask=self_mask)
        if condition is not None:
            hidden, _ = self.crossattention(
                hidden, encoder_hidden_states=condition, encoder_attention_mask=condition_mask
            )
        return self.output(self.intermediate(hidden), hidden)


class _LayerStack(nn.Module):
    """Holds the layers under ``encoder.layer.{i}``, the name the reference and HF files use."""

    def __init__(self, config: BertConfig, cross_attention: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            CrossAttentionBertLayer(config, cross_attention) for _ in range(config.num_hidden_layers)
        )


@dataclass(frozen=True)
class TextLoadReport:
    """What :meth:`TextEncoder.load_pretrained` did besides loading: keys left at init, keys dropped."""

    initialised: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


class TextEncoder(nn.Module):
    """BERT with optional per-layer cross-attention.

    ``forward(input_ids (B, L), attention_mask (B, L), condition (B, Lc, H) | None, condition_mask (B, Lc) | None)
    -> (B, L, H)`` last hidden states. Without ``condition`` it is plain bidirectional BERT.
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.width = cfg.hidden_size
        self.grad_checkpointing = cfg.grad_checkpointing
        config = bert_config(cfg)
        self.embeddings = BertEmbeddings(config)
        self.encoder = _LayerStack(config, cfg.cross_attention)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialisation: N(0, initializer_range) weights, zero biases and padding row, unit LayerNorm."""
        std = self.cfg.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer in the backward pass (non-reentrant, so it works under DDP)."""
        self.grad_checkpointing = enable

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        condition: torch.Tensor | None = None,
        condition_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, L), attention_mask (B, L) 1 = token, condition (B, Lc, H), condition_mask (B, Lc)
        1 = attend (None = attend all, as the reference) -> last hidden states (B, L, H)."""
        self._check_inputs(input_ids, condition)
        hidden = self.embeddings(input_ids=input_ids)  # (B, L, H); token type 0, positions 0..L-1
        self_mask = additive_mask(attention_mask, hidden.dtype)
        cond_mask = additive_mask(condition_mask, hidden.dtype) if condition is not None else None
        for layer in self.encoder.layer:
            if self.grad_checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, self_mask, condition, cond_mask, use_reentrant=False)
            else:
                hidden = layer(hidden, self_mask, condition, cond_mask)
        return hidden

    def _check_inputs(self, input_ids: torch.Tensor, condition: torch.Tensor | None) -> None:
        """Fail early with the offending shape instead of deep inside an attention kernel."""
        if input_ids.ndim != 2 or input_ids.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids must be (batch, length <= {self.cfg.max_position_embeddings}), got {tuple(input_ids.shape)}"
            )
        if condition is None:
            return
        if not self.cfg.cross_attention:
            raise ValueError("a condition was passed but TextConfig.cross_attention is False")
        if (
            condition.ndim != 3
            or condition.shape[0] != input_ids.shape[0]
            or condition.shape[2] != self.width
        ):
            raise ValueError(
                f"condition must be (batch={input_ids.shape[0]}, Lc, {self.width}), got {tuple(condition.shape)}"
            )

    def load_pretrained(self, folder: str | os.PathLike) -> TextLoadReport:
        """Load a Hugging Face bert-base-uncased folder strictly; cross-attention stays at its N(0, 0.02) init.

        Legacy ``gamma``/``beta`` LayerNorm names are renamed; ``pooler.*``, ``cls.*`` and the arange buffers are
        dropped. Every other key must match (KeyError listing them otherwise).
        """
        folder = Path(folder)
        self._check_hf_config(folder)
        state, dropped = hf_bert_to_encoder_state(read_hf_weights(folder))
        initialised = [k for k in self.state_dict() if ".crossattention." in k]
        own = self.state_dict()
        load_strict(self, {**{k: own[k] for k in initialised}, **state}, source=str(folder))
        logger.info(
            "loaded %s; left at init: %d cross-attention tensors; dropped: %s",
            folder,
            len(initialised),
            dropped,
        )
        return TextLoadReport(initialised=initialised, dropped=dropped)

    def _check_hf_config(self, folder: Path) -> None:
        """Compare the folder's config.json sizes with ours (ValueError naming each differing field)."""
        path = folder / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"BERT config not found at {path}. See {WEIGHTS_HELP}.")
        hf = json.loads(path.read_text())
        wrong = [
            f"{hf_name}={hf[hf_name]} (TextConfig.{ours}={getattr(self.cfg, ours)})"
            for hf_name, ours in _CONFIG_FIELDS.items()
            if hf_name in hf and hf[hf_name] != getattr(self.cfg, ours)
        ]
        if wrong:
            raise ValueError(f"{path} does not fit this TextConfig: {', '.join(wrong)}")


def read_hf_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The raw state dict of a HF folder: ``model.safetensors`` if present, else ``pytorch_model.bin``."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"no model.safetensors or pytorch_model.bin in {folder}. See {WEIGHTS_HELP} for the files and where to get them."
    )


def hf_bert_to_encoder_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF BERT keys (``bert.``-prefixed or bare, legacy gamma/beta) -> this module's keys, plus dropped keys."""
    prefixed = any(k.startswith("bert.") for k in state)
    out, dropped = {}, []
    for key, value in state.items():
        name = key.removeprefix("bert.") if prefixed else key
        if (prefixed and not key.startswith("bert.")) or name.startswith(_DROPPED_PREFIXES):
            dropped.append(key)
            continue
        if name.endswith(".gamma"):
            name = name[: -len("gamma")] + "weight"
        elif name.endswith(".beta"):
            name = name[: -len("beta")] + "bias"
        out[name] = value
    return out, sorted(dropped)


def reference_bert_state(state: Mapping[str, torch.Tensor], prefix: str = "bert.") -> dict[str, torch.Tensor]:
    """Reference BERT weights under ``prefix`` (e.g. ``multimodal_encoder.bert.``) -> this module's keys.

    Drops the reference's persistent ``embeddings.position_ids`` buffer (an ``arange``, non-persistent here) and
    every key outside ``prefix`` (the MLM head ``cls.*``).
    """
    return {
        k[len(prefix) :]: v
        for k, v in state.items()
        if k.startswith(prefix) and k[len(prefix) :] != "embeddings.position_ids"
    }


def build_text_encoder(cfg: TextConfig, device: str | torch.device | None = None) -> TextEncoder:
    """Build the encoder (``device='meta'`` for a weightless full-size model) and load ``cfg.weights`` if set."""
    if device is not None:
        with torch.device(device):
            encoder = TextEncoder(cfg)
    else:
        encoder = TextEncoder(cfg)
    if cfg.weights and str(device) != "meta":
        encoder.load_pretrained(cfg.weights)
    return encoder
