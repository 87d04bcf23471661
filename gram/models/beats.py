"""BEATs audio encoder (Chen et al., 2022), compact, reading the official checkpoint format.

The module tree and parameter names are those of the official ``BEATs.py``/``backbone.py``, so the ``model``
state dict of any released checkpoint (``{'cfg': dict, 'model': state_dict}``) loads strictly, key for key:

* ``encoder.pos_conv.0.{weight_g,weight_v,bias}``: the legacy ``weight_norm(dim=2)`` layout, recomputed here as
  ``weight = weight_g * weight_v / ||weight_v||`` (norm over all dims but 2), without the deprecated hook;
* ``encoder.layers.{i}.self_attn.relative_attention_bias.weight``: one table shared by all layers (the module is
  shared, so every layer's key exists in ``state_dict()`` and loading accepts the per-layer copies).

``BEATs.forward`` is GRAM's forward: it takes a precomputed, normalised fbank (see ``gram.data.audio``), not a
waveform, and returns the encoder's token features. Attention uses ``scaled_dot_product_attention`` with the
gated relative-position bias as an additive mask; the official code's max-subtraction and ``alpha=32`` rescaling
of the logits cancel inside the softmax, so the result is the same up to float rounding.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gram.checkpoint_format import load_tensor_file
from gram.models.configs import ACTIVATION_NAMES, BeatsConfig

logger = logging.getLogger(__name__)

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_accurate": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}

assert set(_ACTIVATIONS) == set(ACTIVATION_NAMES)  # the config validates against the names

_README_HINT = 'see pretrained_weights/README.md, section "BEATs"'


def beats_tiny_config(**overrides: Any) -> BeatsConfig:
    """A tiny BEATs with every structural flag of iter3+ (for CPU tests and sample runs)."""
    sizes = dict(encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4,
                 embed_dim=32, conv_pos=16, conv_pos_groups=4)
    return BeatsConfig(**{**sizes, **overrides})


def relative_position_bucket(relative_positions: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5-style bucket of each relative position ``k - q`` (same float ops as the official code).

    Half of the buckets are for positive offsets; within a direction, distances below ``num_buckets // 4`` get
    their own bucket and larger ones share log-spaced buckets up to ``max_distance`` (then clipped).
    """
    half = num_buckets // 2
    max_exact = half // 2
    direction = (relative_positions > 0).to(torch.long) * half
    distance = relative_positions.abs()
    # clamp(min=1) only avoids log(0); those positions take the exact branch anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (half - max_exact)).to(torch.long)).clamp(max=half - 1)
    return direction + torch.where(distance < max_exact, distance, large)


class _GradMultiply(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` (layer-wise gradient decay)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d whose weight is ``weight_g * weight_v / ||weight_v||``, normalised over dims (0, 1).

    Holds the parameters under the legacy ``torch.nn.utils.weight_norm(conv, dim=2)`` names so official
    checkpoints load as they are. Padding is ``kernel // 2`` on both sides, as in the official pos_conv.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.padding = kernel_size // 2
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel_size))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels))

    def weight(self) -> torch.Tensor:
        """The effective conv weight (channels, channels // groups, kernel)."""
        norm = self.weight_v.norm(dim=(0, 1), keepdim=True)  # (1, 1, kernel)
        return self.weight_v * (self.weight_g / norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, N) -> (B, C, N + 1 - kernel % 2)."""
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, groups=self.groups)


class _TrimLast(nn.Module):
    """Drops the last time step (what the official SamePad does after an even-kernel conv)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :-1]


class BeatsSelfAttention(nn.Module):
    """Multi-head self-attention with an optional GRU-gated relative position bias (official key names)."""

    def __init__(self, cfg: BeatsConfig) -> None:
        super().__init__()
        dim, heads = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.num_heads, self.head_dim = heads, cfg.head_dim
        self.dropout = cfg.attention_dropout
        if cfg.relative_position_embedding:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, heads)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.gru_rel_pos = cfg.gru_rel_pos
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)

    def _gate(self, q: torch.Tensor) -> torch.Tensor:
        """Per-query gate of the relative bias, from the unscaled queries (B, H, N, hd) -> (B, H, N, 1)."""
        batch, heads, length, _ = q.shape
        logits = self.grep_linear(q).view(batch, heads, length, 2, 4).sum(-1)  # (B, H, N, 2)
        gate_a, gate_b = torch.sigmoid(logits).chunk(2, dim=-1)  # each (B, H, N, 1)
        return gate_a * (gate_b * self.grep_a - 1.0) + 2.0

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None) -> torch.Tensor:
        """(B, N, D), bias (H, N, N) or None -> (B, N, D)."""
        batch, length, dim = x.shape
        q = self._split_heads(self.q_proj(x))
        k = self._split_heads(self.k_proj(x))
        v = self._split_heads(self.v_proj(x))
        mask = None
        if position_bias is not None:
            mask = position_bias.unsqueeze(0)  # (1, H, N, N)
            if self.gru_rel_pos:
                mask = self._gate(q) * mask  # (B, H, N, 1) * (1, H, N, N) -> (B, H, N, N)
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, N, hd)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class BeatsLayer(nn.Module):
    """One transformer layer: post-LN with DeepNorm residual scaling, or pre-LN (``layer_norm_first``)."""

    def __init__(self, cfg: BeatsConfig) -> None:
        super().__init__()
        self.self_attn = BeatsSelfAttention(cfg)
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.dropout2 = nn.Dropout(cfg.activation_dropout)
        self.dropout3 = nn.Dropout(cfg.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.encoder_embed_dim)
        self.fc1 = nn.Linear(cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, cfg.encoder_embed_dim)
        self.final_layer_norm = nn.LayerNorm(cfg.encoder_embed_dim)
        self.activation = _ACTIVATIONS[cfg.activation_fn]
        self.layer_norm_first = cfg.layer_norm_first
        # DeepNorm (Wang et al., 2022) up-weights the residual by (2N)^(1/4) in post-LN layers.
        self.residual_scale = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout3(self.fc2(self.dropout2(self.activation(self.fc1(x)))))

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None) -> torch.Tensor:
        """(B, N, D), bias (H, N, N) or None -> (B, N, D)."""
        if self.layer_norm_first:
            x = x + self.dropout1(self.self_attn(self.self_attn_layer_norm(x), position_bias))
            return x + self._ffn(self.final_layer_norm(x))
        attn = self.dropout1(self.self_attn(x, position_bias))
        x = self.self_attn_layer_norm(x * self.residual_scale + attn)
        return self.final_layer_norm(x * self.residual_scale + self._ffn(x))


class BeatsEncoder(nn.Module):
    """Conv positional embedding, then the layers; the relative-position table is shared by all layers."""

    def __init__(self, cfg: BeatsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.encoder_embed_dim
        trim = _TrimLast() if cfg.conv_pos % 2 == 0 else nn.Identity()
        self.pos_conv = nn.Sequential(WeightNormConv1d(dim, cfg.conv_pos, cfg.conv_pos_groups), trim, nn.GELU())
        self.layers = nn.ModuleList(BeatsLayer(cfg) for _ in range(cfg.encoder_layers))
        if cfg.relative_position_embedding:
            # Sharing the module (as the official code does) keeps one trainable table while state_dict()
            # still lists it under every layer, like the official checkpoints.
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = self.layers[0].self_attn.relative_attention_bias
        self.layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.grad_checkpointing = cfg.grad_checkpointing

    def relative_position_bias(self, length: int) -> torch.Tensor | None:
        """Ungated bias (H, N, N) for N = ``length`` tokens, or None without relative positions."""
        if not self.cfg.relative_position_embedding:
            return None
        table = self.layers[0].self_attn.relative_attention_bias
        positions = torch.arange(length, device=table.weight.device)
        relative = positions[None, :] - positions[:, None]  # (N, N): k - q
        buckets = relative_position_bucket(relative, self.cfg.num_buckets, self.cfg.max_distance)
        return table(buckets).permute(2, 0, 1)  # (N, N, H) -> (H, N, N)

    def embed_positions(self, x: torch.Tensor) -> torch.Tensor:
        """Add the conv positional embedding and (post-LN) normalise: (B, N, D) -> the input of layer 0."""
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)  # conv over time: (B, D, N)
        if not self.cfg.layer_norm_first:
            x = self.layer_norm(x)
        return self.dropout(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D)."""
        x = self.embed_positions(x)
        bias = self.relative_position_bias(x.shape[1])
        for layer in self.layers:
            if self.cfg.layer_wise_gradient_decay_ratio != 1.0:
                x = _GradMultiply.apply(x, self.cfg.layer_wise_gradient_decay_ratio)
            if self.training and self.cfg.encoder_layerdrop > 0 and torch.rand(()) <= self.cfg.encoder_layerdrop:
                continue  # LayerDrop: the official code keeps a layer when its draw exceeds the rate
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, bias, use_reentrant=False)
            else:
                x = layer(x, bias)
        if self.cfg.layer_norm_first:
            x = self.layer_norm(x)
        return x

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initialisation (BERT-style normal(0.02), DeepNorm gains, weight-normed pos conv)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        conv = self.pos_conv[0]
        nn.init.normal_(conv.weight_v, std=math.sqrt(4.0 / (self.cfg.conv_pos * self.cfg.encoder_embed_dim)))
        conv.weight_g.copy_(conv.weight_v.norm(dim=(0, 1), keepdim=True))  # weight_norm's init: weight == v
        nn.init.zeros_(conv.bias)
        if self.cfg.deep_norm:
            self._deep_norm_init()

    def _deep_norm_init(self) -> None:
        beta = math.pow(8 * self.cfg.encoder_layers, -0.25)
        for layer in self.layers:
            attn = layer.self_attn
            for weight, gain in ((attn.k_proj.weight, 1.0), (attn.q_proj.weight, 1.0), (attn.v_proj.weight, beta),
                                 (attn.out_proj.weight, beta), (layer.fc1.weight, beta), (layer.fc2.weight, beta)):
                nn.init.xavier_normal_(weight, gain=gain)


class BEATs(nn.Module):
    """BEATs encoder on precomputed normalised fbanks (GRAM's forward): (B', T, F) -> (B', N, D).

    N = (T // p) * (F // p) tokens in time-major order (p = ``input_patch_size``), D = ``width``.
    """

    def __init__(self, cfg: BeatsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.width = cfg.encoder_embed_dim
        has_proj = cfg.embed_dim != cfg.encoder_embed_dim
        self.post_extract_proj = nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim) if has_proj else None
        patch = cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=patch, stride=patch, bias=cfg.conv_bias)
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.encoder = BeatsEncoder(cfg)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.encoder.reset_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn per-layer activation checkpointing on or off (it only acts in training mode)."""
        self.encoder.grad_checkpointing = enable
        self.cfg = dataclasses.replace(self.cfg, grad_checkpointing=enable)

    def embed_patches(self, fbank: torch.Tensor) -> torch.Tensor:
        """Patch conv, time-major flatten, LayerNorm, projection: (B', T, F) -> (B', N, D)."""
        if fbank.dim() != 3:
            raise ValueError(f"BEATs expects a (batch, frames, mel_bins) fbank, got shape {tuple(fbank.shape)}")
        patches = self.patch_embedding(fbank.unsqueeze(1))  # (B', C, T/p, F/p)
        tokens = patches.flatten(2).transpose(1, 2)  # (B', N, C), time-major: n = t * (F/p) + f
        tokens = self.layer_norm(tokens)
        if self.post_extract_proj is not None:
            tokens = self.post_extract_proj(tokens)  # (B', N, D)
        return self.dropout_input(tokens)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """(B', T, F) normalised fbank -> (B', N, D) token features (no final LayerNorm in post-LN models)."""
        return self.encoder(self.embed_patches(fbank))

    @classmethod
    def from_pretrained(cls, path: str | Path, grad_checkpointing: bool = False) -> BEATs:
        """Build from an official checkpoint's embedded cfg and load its weights strictly."""
        cfg, state_dict = load_beats_checkpoint(path)
        cfg = dataclasses.replace(cfg, grad_checkpointing=grad_checkpointing, weights=str(path))
        model = cls(cfg)
        model.load_state_dict(state_dict, strict=True)
        return model


def load_beats_checkpoint(path: str | Path) -> tuple[BeatsConfig, dict[str, torch.Tensor]]:
    """Read an official BEATs ``.pt`` (``{'cfg': dict, 'model': state_dict}``) -> (config, encoder state dict).

    The fine-tuned checkpoints' ``predictor.*`` classifier weights are dropped (GRAM uses the features only); the
    per-layer copies of the shared relative-position table must be identical.
    """
    path = Path(path)
    checkpoint_dict = load_tensor_file(path, "official BEATs checkpoint", _README_HINT)
    if not isinstance(checkpoint_dict, dict) or not {"cfg", "model"} <= set(checkpoint_dict):
        found = sorted(checkpoint_dict) if isinstance(checkpoint_dict, dict) else type(checkpoint_dict).__name__
        raise ValueError(f"{path} is not an official BEATs checkpoint (a dict with 'cfg' and 'model'); "
                         f"found {found}; {_README_HINT}")
    cfg = BeatsConfig.from_dict(checkpoint_dict["cfg"])
    state_dict = {k: v for k, v in checkpoint_dict["model"].items() if not k.startswith("predictor.")}
    _check_shared_bias(state_dict, path)
    return cfg, state_dict


def _check_shared_bias(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Raise if the per-layer copies of the (single, shared) relative-position table differ."""
    tables = {k: v for k, v in state_dict.items() if k.endswith("self_attn.relative_attention_bias.weight")}
    first = next(iter(tables.values()), None)
    differing = sorted(k for k, v in tables.items() if v.shape != first.shape or not torch.equal(v, first))
    if differing:
        raise ValueError(f"{path}: the relative_attention_bias table is shared by all layers, but {differing} "
                         "differ from the first layer's copy")


def build_beats(cfg: BeatsConfig) -> BEATs:
    """The encoder for ``cfg``: random init, or the official checkpoint at ``cfg.weights``.

    With ``weights`` set, the checkpoint's embedded cfg defines the network (as in the reference); only
    ``grad_checkpointing`` is taken from ``cfg``, and fields that differ from the checkpoint are logged.
    """
    if cfg.weights is None:
        return BEATs(cfg)
    model = BEATs.from_pretrained(cfg.weights, grad_checkpointing=cfg.grad_checkpointing)
    differing = {f.name: (getattr(cfg, f.name), getattr(model.cfg, f.name)) for f in dataclasses.fields(cfg)
                 if getattr(cfg, f.name) != getattr(model.cfg, f.name)}
    if differing:
        logger.info("BEATs: the checkpoint %s overrides config fields (config, checkpoint): %s", cfg.weights, differing)
    return model
