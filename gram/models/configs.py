"""The encoders' structured configs (EVA vision tower, BEATs, BERT text encoder): plain dataclasses, kept apart from
the modules that build the networks so that composing or checking a config (`run.py --help`, a mistyped key)
imports neither torch nor transformers. The model modules re-export them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

# The activations gram.models.beats implements (it checks its table against these names).
ACTIVATION_NAMES = ("gelu", "gelu_accurate", "relu", "tanh", "linear")

# Fields the official BEATsConfig knows whose values do not change the feature encoder: the classification head of
# fine-tuned checkpoints, which GRAM never uses (its ``predictor.*`` weights are dropped when loading).
IGNORED_OFFICIAL_FIELDS = frozenset({"finetuned_model", "predictor_dropout", "predictor_class"})

# Official BEATsConfig defaults that differ from ours (ours are the iter3+ values). A checkpoint cfg that omits a
# field gets the official default, exactly as the official code would build it.
_OFFICIAL_DEFAULTS_DIFFERING = {
    "input_patch_size": -1,
    "deep_norm": False,
    "relative_position_embedding": False,
    "max_distance": 1280,
    "gru_rel_pos": False,
}

@dataclass
class VisionConfig:
    """Structured config of the EVA vision tower (defaults: EVA01-CLIP-g/14 at 224 px).

    ``mlp_hidden`` is the MLP width itself (6144 for EVA-g, i.e. ``int(1408 * 4.3637)``).
    ``head_dim`` is the size of EVA-CLIP's projection head; 0 builds the tower without it (GRAM never uses it).
    ``weights`` is an optional path to EVA-CLIP visual weights in any supported layout.
    """

    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 40
    num_heads: int = 16
    mlp_hidden: int = 6144
    drop_path_rate: float = 0.4
    layer_norm_eps: float = 1e-6
    head_dim: int = 0
    grad_checkpointing: bool = False
    weights: str | None = None

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_hidden"):
            if getattr(self, name) <= 0:
                raise ValueError(f"VisionConfig.{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"VisionConfig.image_size={self.image_size} must be a multiple of patch_size={self.patch_size}"
            )
        if self.width % self.num_heads:
            raise ValueError(
                f"VisionConfig.width={self.width} must be divisible by num_heads={self.num_heads}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"VisionConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.head_dim < 0:
            raise ValueError(f"VisionConfig.head_dim must be >= 0 (0 = no head), got {self.head_dim}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"VisionConfig.layer_norm_eps must be positive, got {self.layer_norm_eps}")

    @property
    def num_tokens(self) -> int:
        """Tokens per image: CLS plus (image_size / patch_size)^2 patches."""
        return 1 + (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    """Structured config of the BERT text encoder (defaults: bert-base-uncased with cross-attention).

    ``weights`` is an optional bert-base-uncased folder (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``). ``attn_implementation`` is transformers' attention backend ("sdpa" or "eager").
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    cross_attention: bool = True
    grad_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    weights: str | None = None

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
        for name in (*sizes, "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TextConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"TextConfig.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TextConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"TextConfig.attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}"
            )
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"TextConfig.pad_token_id={self.pad_token_id} is outside the vocabulary")


@dataclass
class BeatsConfig:
    """BEATs hyper-parameters, named as the official ``BEATsConfig``; defaults are the iter3+ base model.

    ``grad_checkpointing`` recomputes each layer in the backward pass (training only); ``weights`` is an optional
    path to an official ``.pt`` checkpoint whose embedded cfg then defines the network (see :func:`build_beats`).
    With ``encoder_layerdrop > 0`` ranks skip different layers, so DDP needs ``find_unused_parameters=True``.
    """

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 1.0
    layer_norm_first: bool = False
    deep_norm: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    grad_checkpointing: bool = False
    weights: Optional[str] = None  # noqa: UP045 (Hydra structured configs need typing.Optional)

    def __post_init__(self) -> None:
        for name in ("input_patch_size", "embed_dim", "encoder_layers", "encoder_embed_dim",
                     "encoder_ffn_embed_dim", "encoder_attention_heads", "conv_pos", "conv_pos_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"BeatsConfig.{name} must be >= 1, got {getattr(self, name)}")
        self._check_divisible("encoder_embed_dim", "encoder_attention_heads")
        self._check_divisible("encoder_embed_dim", "conv_pos_groups")
        if self.activation_fn not in ACTIVATION_NAMES:
            raise ValueError(f"BeatsConfig.activation_fn={self.activation_fn!r} is not supported; "
                             f"use one of {sorted(ACTIVATION_NAMES)}")
        if self.deep_norm and self.layer_norm_first:
            raise ValueError("BeatsConfig: deep_norm requires post-LN; set layer_norm_first=False")
        for name in ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "dropout_input"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"BeatsConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.layer_wise_gradient_decay_ratio <= 0:
            raise ValueError("BeatsConfig.layer_wise_gradient_decay_ratio must be > 0, "
                             f"got {self.layer_wise_gradient_decay_ratio}")
        if self.relative_position_embedding:
            self._check_buckets()

    def _check_divisible(self, dim_name: str, by_name: str) -> None:
        dim, by = getattr(self, dim_name), getattr(self, by_name)
        if dim % by:
            raise ValueError(f"BeatsConfig.{dim_name}={dim} must be divisible by {by_name}={by}")

    def _check_buckets(self) -> None:
        # Bidirectional buckets: half per direction, and half of those are exact distances (max_exact).
        max_exact = self.num_buckets // 4
        if max_exact < 1 or self.max_distance <= max_exact:
            raise ValueError(f"BeatsConfig needs num_buckets >= 4 and max_distance > num_buckets // 4, got "
                             f"num_buckets={self.num_buckets}, max_distance={self.max_distance}")

    @property
    def head_dim(self) -> int:
        return self.encoder_embed_dim // self.encoder_attention_heads

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> BeatsConfig:
        """Build from an official checkpoint's ``cfg`` dict (or from ``dataclasses.asdict`` of a BeatsConfig).

        Missing fields take the official BEATsConfig defaults. Unknown fields raise ``ValueError``, except the
        documented :data:`IGNORED_OFFICIAL_FIELDS`, which do not change the encoder.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names - IGNORED_OFFICIAL_FIELDS)
        if unknown:
            raise ValueError(f"unknown BEATs cfg fields {unknown}; known: {sorted(names)} "
                             f"(ignored: {sorted(IGNORED_OFFICIAL_FIELDS)})")
        values = {**_OFFICIAL_DEFAULTS_DIFFERING, **{k: v for k, v in cfg.items() if k in names}}
        return cls(**values)

    def to_official_dict(self) -> dict[str, Any]:
        """The cfg dict in the official checkpoint layout (without our run-time fields)."""
        out = dataclasses.asdict(self)
        del out["grad_checkpointing"], out["weights"]
        return {**out, "finetuned_model": False, "predictor_dropout": 0.1, "predictor_class": 527}
