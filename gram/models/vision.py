"""EVA01-CLIP-g/14 vision tower (timm's ``Eva``) and loaders for the EVA-CLIP visual weights.

GRAM encodes every frame with the EVA-CLIP visual tower and keeps *all* tokens after the final LayerNorm
(``return_all_features=True`` in the reference), CLS first. timm's ``Eva`` built as ``eva_giant_patch14_224`` with
``global_pool='token'`` has exactly the reference architecture (pre-LN blocks, q/v biases without k bias, absolute
position embedding, final ``norm`` on all tokens, linear stochastic depth), so no ViT is written here.

Weights: the state dict is kept in timm's key names. :func:`load_eva_visual_state` accepts the three layouts users
download: the original EVA-CLIP ``.pt`` (``visual.*``), open_clip's ``EVA01-g-14`` (``visual.trunk.*``) and timm's
own (no prefix). EVA-CLIP's projection ``head`` (1408 -> 1024) is unused by GRAM; the encoder is built without it
(``head_dim=0``) and loading then drops ``head.*``. Build with ``head_dim=1024`` to keep and load it strictly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from timm.layers import LayerNorm, resample_abs_pos_embed, resample_patch_embed
from torch import nn

from gram.models.configs import VisionConfig

TIMM_ARCH = "eva_giant_patch14_224"
WEIGHTS_HELP = "pretrained_weights/README.md, section EVA-CLIP"
# Keys that wrap the state dict in the original EVA-CLIP and open_clip checkpoints, tried in this order.
_WRAPPER_KEYS = ("model", "module", "state_dict")
# Layout prefixes, longest first: open_clip wraps timm as `visual.trunk`, EVA-CLIP uses `visual`.
_LAYOUT_PREFIXES = ("visual.trunk.", "visual.", "")


def vision_tiny_config(**overrides) -> VisionConfig:
    """A CPU-sized EVA tower (64 px, 16 px patches -> 17 tokens of width 64) with the real structure."""
    fields = dict(
        image_size=64, patch_size=16, width=64, depth=2, num_heads=4, mlp_hidden=128, drop_path_rate=0.0
    )
    fields.update(overrides)
    return VisionConfig(**fields)


def _timm_kwargs(cfg: VisionConfig) -> dict:
    """Keyword arguments that make timm's EVA-g factory build the tower described by ``cfg``."""
    return dict(
        pretrained=False,
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        # timm computes the MLP width as int(width * ratio); the +0.5 keeps float error from truncating 6144 to 6143.
        mlp_ratio=(cfg.mlp_hidden + 0.5) / cfg.width,
        drop_path_rate=cfg.drop_path_rate,
        # 'token' pooling keeps the final `norm` on all tokens (timm's default 'avg' would swap it for fc_norm).
        global_pool="token",
        num_classes=cfg.head_dim,
        norm_layer=partial(LayerNorm, eps=cfg.layer_norm_eps),
    )


class VisionEncoder(nn.Module):
    """EVA vision tower returning all post-norm tokens.

    ``forward(pixels (N, 3, H, W)) -> (N, 1 + P, width)``: CLS first, P = (H / patch)^2 patch tokens.
    """

    def __init__(self, cfg: VisionConfig, device: str | torch.device | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.width = cfg.width
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.trunk = timm.create_model(TIMM_ARCH, **_timm_kwargs(cfg))
        # timm checkpoints each block with use_reentrant=False (its default), which is what DDP needs.
        self.trunk.set_grad_checkpointing(cfg.grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, H, W), CLIP-normalised -> tokens (N, 1 + P, width) after the final LayerNorm."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"VisionEncoder expects pixels of shape (N, 3, H, W), got {tuple(pixels.shape)}")
        return self.trunk.forward_features(pixels)

    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Load EVA-CLIP visual weights from ``path`` (any layout, see module docstring), strictly.

        Raises FileNotFoundError if the file is missing and KeyError listing missing/unexpected keys.
        """
        state = load_eva_visual_state(path, self.trunk)
        if not self.cfg.head_dim:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        load_strict(self.trunk, state, source=str(path))


def build_vision_encoder(cfg: VisionConfig, device: str | torch.device | None = None) -> VisionEncoder:
    """Build the encoder (``device='meta'`` for a weightless full-size model) and load ``cfg.weights`` if set."""
    encoder = VisionEncoder(cfg, device=device)
    if cfg.weights and str(device) != "meta":
        encoder.load_pretrained(cfg.weights)
    return encoder


def _read_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or torch-pickled checkpoint; raise FileNotFoundError naming the README section."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"EVA-CLIP visual weights not found at {path}. See {WEIGHTS_HELP} for the file and where to get it."
        )
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap(state: Mapping) -> dict[str, torch.Tensor]:
    """Take the first of ``model|module|state_dict`` if present and strip a DDP ``module.`` prefix."""
    for key in _WRAPPER_KEYS:
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    return {k.removeprefix("module."): v for k, v in state.items()}


def _detect_prefix(state: Mapping[str, torch.Tensor]) -> str:
    """The layout prefix under which ``pos_embed`` sits (open_clip, EVA-CLIP or timm)."""
    for prefix in _LAYOUT_PREFIXES:
        if prefix + "pos_embed" in state:
            return prefix
    raise KeyError(
        "no EVA visual weights found: expected 'visual.trunk.pos_embed' (open_clip), 'visual.pos_embed' "
        f"(EVA-CLIP) or 'pos_embed' (timm); first keys are {sorted(state)[:8]}"
    )


def _resize_to_model(state: dict[str, torch.Tensor], model: nn.Module,
                     pos_interpolation: str = "bicubic") -> dict[str, torch.Tensor]:
    """Resample ``pos_embed`` and the patch kernel when the model's image or patch size differs.

    Without antialiasing; the kernel bicubic as EVA-CLIP's own loader does (``factory.py``), the position grid by
    ``pos_interpolation`` (the class token is kept as it is).
    """
    kernel = model.patch_embed.proj.weight  # (width, 3, p, p)
    if (
        "patch_embed.proj.weight" in state
        and state["patch_embed.proj.weight"].shape[-2:] != kernel.shape[-2:]
    ):
        state["patch_embed.proj.weight"] = resample_patch_embed(
            state["patch_embed.proj.weight"],
            list(kernel.shape[-2:]),
            interpolation="bicubic",
            antialias=False,
        )
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        state["pos_embed"] = resample_abs_pos_embed(  # (1, 1 + h*w, width) -> (1, 1 + H*W, width)
            state["pos_embed"],
            new_size=list(model.patch_embed.grid_size),
            num_prefix_tokens=1,
            interpolation=pos_interpolation,
            antialias=False,
        )
    return state


def load_eva_visual_state(
    source: str | os.PathLike | Mapping[str, torch.Tensor], model: nn.Module | None = None,
    pos_interpolation: str = "bicubic",
) -> dict[str, torch.Tensor]:
    """EVA visual weights in timm key names, from a file path or an already loaded state dict.

    Accepts the original EVA-CLIP layout (``visual.*``, optionally under ``model|module|state_dict`` and with a
    ``module.`` prefix), open_clip's (``visual.trunk.*``) and timm's (no prefix). Non-visual keys (text tower,
    ``logit_scale``) are dropped. With ``model`` (a timm ``Eva``), ``pos_embed`` and the patch kernel are resized
    to the model's image and patch size; ``pos_interpolation`` is how ``pos_embed`` is resampled: "bicubic" for raw
    EVA-CLIP weights (EVA-CLIP's own loader), "bilinear" for a trained GRAM checkpoint (the reference's
    ``modify_checkpoint``).
    """
    state = _read_state_file(source) if isinstance(source, (str, os.PathLike)) else source
    state = _unwrap(state)
    prefix = _detect_prefix(state)
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if prefix == "":
        # A timm file has no prefix, so a stray text tower would pass through; keep only visual-looking keys.
        out = {k: v for k, v in out.items() if not k.startswith(("text.", "logit_scale"))}
    return _resize_to_model(out, model, pos_interpolation) if model is not None else out


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one error that lists every missing, unexpected or mis-shaped key."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        raise KeyError(
            f"weights from {source} do not match {type(module).__name__}: missing={missing}, "
            f"unexpected={unexpected}, shape mismatches={shapes}"
        )
    module.load_state_dict(state, strict=True)
