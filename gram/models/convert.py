"""Released GRAM checkpoints (the reference's ``GRAM.state_dict()``) -> our task state dict, through ONE key map.

The reference saves a flat ``{name: tensor}`` dict (optionally nested under ``"model"``, keys optionally prefixed
``module.`` by DDP). Our checkpoints hold the task's state dict: ``model.<GramModel key>`` and
``loss.temperature_param``. :data:`KEY_MAP` says where every reference key goes, :data:`DROPPED` lists the keys
left out on purpose and why; :func:`convert_state_dict` applies them and returns a :class:`ConversionReport` that
is strict: every source key mapped or explicitly dropped, every target key existing with the same shape, and
nothing of our model left unfilled except an explicit allow-list. Any violation raises
:class:`CheckpointConversionError` listing the offending keys.

Depth: the reference encodes depth maps with the vision tower and reuses the *vision* condition projection,
frame embedding and type embedding for them (``condition_feats_d`` is built like ``condition_feats_v``). Our
model gives depth its own copies, so each of those three vision tensors is copied to both ``video`` and
``depth``; ``contra_head_d`` (the depth projection) is its own tensor in both.

Temperature: the reference's ``contra_temp`` is tau itself (logits are scores / tau); our loss learns log(tau)
by default, so the value is converted to the target's parametrisation.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gram.config import ModelConfig
from gram.models.vision import load_eva_visual_state

# Renames the reference applies to old VAST checkpoints before loading (reference §7.2), in this order
# (`evaclip_model` before `clip_model`, which is a substring of it).
LEGACY_RENAMES = (("video", "vision"), ("evaclip_model", "vision_encoder"), ("clip_model", "vision_encoder"))
# Old VAST checkpoints kept the frame embedding inside a perceiver; the reference falls back to it.
LEGACY_FRAME_EMBEDDING = "vision_perceiver.vision_frame_embedding"

# (reference key regex, our task key templates). Every regex is matched against the whole key; `{0}` is the first
# group. One source may fill several targets (the vision tensors that depth reuses, see the module docstring).
KEY_MAP: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"vision_encoder\.visual\.(.+)", ("model.encoders.vision.trunk.{0}",)),
    (r"audio_encoder\.(.+)", ("model.encoders.audio.{0}",)),
    (r"multimodal_encoder\.bert\.(.+)", ("model.encoders.text.{0}",)),
    (r"contra_head_t\.linear\.weight", ("model.projections.text.weight",)),
    (r"contra_head_v\.linear\.weight", ("model.projections.video.weight",)),
    (r"contra_head_a\.linear\.weight", ("model.projections.audio.weight",)),
    (r"contra_head_s\.linear\.weight", ("model.projections.subtitle.weight",)),
    (r"contra_head_d\.linear\.weight", ("model.projections.depth.weight",)),
    (r"hidden_trans_vision_multimodal\.(.+)",
     ("model.condition_projections.video.{0}", "model.condition_projections.depth.{0}")),
    (r"hidden_trans_audio_multimodal\.(.+)", ("model.condition_projections.audio.{0}",)),
    (r"hidden_trans_subtitle_multimodal\.(.+)", ("model.condition_projections.subtitle.{0}",)),
    (r"vision_frame_embedding", ("model.frame_embeddings.video", "model.frame_embeddings.depth")),
    (r"audio_frame_embedding", ("model.frame_embeddings.audio",)),
    (r"vision_type_embeddings", ("model.type_embeddings.video", "model.type_embeddings.depth")),
    (r"audio_type_embeddings", ("model.type_embeddings.audio",)),
    (r"subtitle_type_embeddings", ("model.type_embeddings.subtitle",)),
    (r"itm_head\.(.+)", ("model.match_head.{0}",)),
    (r"contra_temp", ("loss.temperature_param",)),
)

# (reference key regex, why it is not loaded). Checked before KEY_MAP, so e.g. the EVA head is dropped although
# `vision_encoder.visual.*` is mapped.
DROPPED: tuple[tuple[str, str], ...] = (
    (r"vision_encoder\.text\..+", "EVA-CLIP text tower: built and loaded by the reference, never used by GRAM"),
    (r"vision_encoder\.logit_scale", "EVA-CLIP logit scale: unused by GRAM"),
    (r"vision_encoder\.visual\.head\..+", "EVA-CLIP projection head (1408->1024): unused, contra_head_v projects"),
    (r"contra_head_(va|vs|vas)\..+", "fused video-audio(-subtitle) heads: dead code in GRAM retrieval"),
    (r"multimodal_encoder\.cls\..+", "BERT masked-LM head: only the captioning/QA losses use it"),
    (r"multimodal_encoder\.bert\.embeddings\.(position_ids|token_type_ids)",
     "arange/zeros buffers: recomputed by our text encoder"),
)

# Our parts that exist per data modality, and those that exist only with the matching head.
_PER_MODALITY = re.compile(r"model\.(projections|condition_projections|frame_embeddings|type_embeddings)\.(\w+)")
_MATCHING_PARTS = ("model.condition_projections.", "model.frame_embeddings.", "model.type_embeddings.",
                   "model.match_head.")
_VISION_PREFIX = "model.encoders.vision.trunk."


class CheckpointConversionError(KeyError):
    """A reference checkpoint does not fit the model; the message lists every offending key."""

    def __str__(self) -> str:  # KeyError would print the message as a quoted repr
        return str(self.args[0]) if self.args else ""


@dataclass
class ConversionReport:
    """What the conversion did, key by key. ``ok`` is False when anything is unmapped, unexpected, missing or
    mis-shaped; ``skipped`` are keys whose home is a part this model was built without (e.g. depth)."""

    mapped: dict[str, list[str]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    allowed_missing: list[str] = field(default_factory=list)
    shape_mismatches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unmapped or self.unexpected or self.missing or self.shape_mismatches)

    def summary(self) -> str:
        """A human-readable report: counts, drop reasons, and every offending key."""
        lines = [f"mapped {len(self.mapped)} reference keys to {sum(map(len, self.mapped.values()))} of ours; "
                 f"dropped {len(self.dropped)}; skipped {len(self.skipped)}"]
        for reason, count in _count(self.dropped.values()).items():
            lines.append(f"  dropped {count:4d}: {reason}")
        for reason, count in _count(self.skipped.values()).items():
            lines.append(f"  skipped {count:4d}: {reason}")
        lines += [f"  note: {n}" for n in self.notes]
        for name in ("unmapped", "unexpected", "missing", "shape_mismatches", "allowed_missing"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"{name} ({len(keys)}):")
                lines += [f"  {k}" for k in keys]
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)

    def raise_if_failed(self, source: str) -> None:
        if not self.ok:
            raise CheckpointConversionError(f"{source} does not fit the model:\n{self.summary()}\nFix: pass a model "
                                            "config matching the checkpoint, or allow-list keys that may be absent.")


def _count(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


# ------------------------------------------------------------------------------------------------ source side
def unwrap_reference(state: Mapping) -> dict[str, torch.Tensor]:
    """The flat reference state dict: unnest ``"model"`` if present, strip ``module.``, apply the legacy renames."""
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    out = {}
    for key, value in state.items():
        name = key.removeprefix("module.")
        for old, new in LEGACY_RENAMES:
            name = name.replace(old, new)
        out[name] = value
    if "vision_frame_embedding" not in out and LEGACY_FRAME_EMBEDDING in out:
        out["vision_frame_embedding"] = out.pop(LEGACY_FRAME_EMBEDDING)
    return out


def route(key: str) -> tuple[str, tuple[str, ...] | str | None]:
    """Where one (unwrapped) reference key goes: ("map", targets), ("drop", reason) or ("unmapped", None)."""
    for pattern, reason in DROPPED:
        if re.fullmatch(pattern, key):
            return "drop", reason
    for pattern, templates in KEY_MAP:
        match = re.fullmatch(pattern, key)
        if match:
            return "map", tuple(t.format(*match.groups()) for t in templates)
    return "unmapped", None


# ------------------------------------------------------------------------------------------------ value transforms
def resize_frames(embedding: torch.Tensor, length: int) -> torch.Tensor:
    """(1, n, H) -> (1, length, H) by nearest interpolation along frames, as the reference's loader does."""
    if embedding.shape[1] == length:
        return embedding
    return F.interpolate(embedding.transpose(1, 2), size=length, mode="nearest").transpose(1, 2)  # (1, H, n)


def temperature_value(tau: torch.Tensor, parametrization: str) -> torch.Tensor:
    """The reference's raw tau -> our ``temperature_param`` (log tau for the "log" parametrisation)."""
    if parametrization == "raw":
        return tau
    if tau.device.type != "meta" and not float(tau) > 0:
        raise ValueError(f"contra_temp={float(tau)} is not a positive temperature; it cannot be converted to "
                         "log(tau). Convert with loss.temperature_parametrization=raw instead.")
    return tau.log()


# A GRAM checkpoint converted for another image size gets its position grid resized as the reference's
# `modify_checkpoint` does: bilinear, no antialiasing, class token kept (raw EVA-CLIP weights use bicubic).
GRAM_POS_INTERPOLATION = "bilinear"


def _vision_state(pairs: Mapping[str, torch.Tensor], trunk: nn.Module | None) -> dict[str, torch.Tensor]:
    """Our vision keys -> tensors through the vision module's own layout conversion (resizes pos_embed bilinearly
    and the patch kernel when the model's image or patch size differs)."""
    eva = {"visual." + k[len(_VISION_PREFIX):]: v for k, v in pairs.items()}  # the EVA-CLIP layout
    if "visual.pos_embed" not in eva:  # nothing to resize against; the missing key is reported by the caller
        return dict(pairs)
    timm_state = load_eva_visual_state(eva, trunk, pos_interpolation=GRAM_POS_INTERPOLATION)
    return {_VISION_PREFIX + k: v for k, v in timm_state.items()}


# ------------------------------------------------------------------------------------------------ conversion
def _skip_reason(target: str, modalities: Sequence[str], matching_head: bool) -> str | None:
    """Why a target of the key map legitimately has no home in this model, or None."""
    if not matching_head and target.startswith(_MATCHING_PARTS):
        return "matching head not built (model.matching_head=false)"
    match = _PER_MODALITY.match(target)
    if match and match.group(2) not in ("text", *modalities):
        return f"modality {match.group(2)!r} not in model.modalities"
    return None


def alias_groups(module: nn.Module) -> dict[str, str]:
    """State-dict keys that are aliases of another key's tensor (shared modules) -> the first key of the group."""
    first: dict[int, str] = {}
    aliases = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        owner = first.setdefault(id(tensor), key)
        if owner != key:
            aliases[key] = owner
    return aliases


def _transform(target: str, value: torch.Tensor, shape: torch.Size, parametrization: str) -> torch.Tensor:
    if target.startswith("model.frame_embeddings."):
        return resize_frames(value, shape[1])
    if target == "loss.temperature_param":
        return temperature_value(value, parametrization)
    return value


def convert_state_dict(reference: Mapping, target: nn.Module, temperature_parametrization: str = "log",
                       allow_missing: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map a reference state dict onto ``target`` (a ``GramTask``: ``.model`` and ``.loss``; meta is fine).

    Returns (our state dict, report); raises :class:`CheckpointConversionError` unless the report is ok.
    ``allow_missing`` holds fnmatch patterns of our keys that may stay unfilled. Values are cast to the target's
    dtype; aliases of a shared tensor (BEATs' relative-position table) need only one of their keys filled.
    """
    own = target.state_dict(keep_vars=True)
    model = target.model
    report = ConversionReport()
    produced: dict[str, torch.Tensor] = {}
    for key, value in unwrap_reference(reference).items():
        _route_one(key, value, own, model, report, produced)
    vision = {k: v for k, v in produced.items() if k.startswith(_VISION_PREFIX)}
    if vision:
        trunk = model.encoders["vision"].trunk if "vision" in model.encoders else None
        produced.update(_vision_state(vision, trunk))
    out = {}
    for key, value in produced.items():
        shape = own[key].shape
        value = _transform(key, value, shape, temperature_parametrization)
        if tuple(value.shape) != tuple(shape):
            report.shape_mismatches.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(shape)}")
        out[key] = value.to(own[key].dtype)
    _fill_missing_report(report, own, out, alias_groups(target), allow_missing)
    return out, report


def _route_one(key: str, value: torch.Tensor, own: Mapping[str, torch.Tensor], model: nn.Module,
               report: ConversionReport, produced: dict[str, torch.Tensor]) -> None:
    kind, where = route(key)
    if kind == "drop":
        report.dropped[key] = where
        return
    if kind == "unmapped":
        report.unmapped.append(key)
        return
    homes = []
    for target in where:
        if target in own:
            homes.append(target)
            produced[target] = value
            continue
        reason = _skip_reason(target, model.modalities, model.cfg.matching_head)
        if reason is None:
            report.unexpected.append(f"{target} (from {key})")
        elif len(where) == 1:
            report.skipped[key] = reason
    if homes:
        report.mapped[key] = homes


def _fill_missing_report(report: ConversionReport, own: Mapping[str, torch.Tensor], out: Mapping[str, torch.Tensor],
                         aliases: Mapping[str, str], allow_missing: Sequence[str]) -> None:
    filled = set(out) | {k for k, owner in aliases.items() if owner in out}
    filled |= {owner for k, owner in aliases.items() if k in out}
    for key in sorted(set(own) - filled):
        allowed = any(fnmatch.fnmatchcase(key, p) for p in allow_missing)
        (report.allowed_missing if allowed else report.missing).append(key)
    report.unmapped.sort()
    report.unexpected.sort()


def convert_checked(reference: Mapping, target: nn.Module, source: str, temperature_parametrization: str = "log",
                    allow_missing: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """:func:`convert_state_dict`, raising :class:`CheckpointConversionError` (naming ``source``) on failure."""
    out, report = convert_state_dict(reference, target, temperature_parametrization, allow_missing)
    report.raise_if_failed(source)
    return out, report


# ------------------------------------------------------------------------------------------------ key lists
def read_key_list(path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """A ``name<TAB>shape<TAB>dtype`` file (``#`` comments) -> {name: (shape, dtype)}."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                raise ValueError(f"{path}:{number}: expected name<TAB>shape<TAB>dtype, got {line.strip()!r}")
            out[parts[0]] = (_parse_shape(parts[1], path, number), _parse_dtype(parts[2], path, number))
    return out


def _parse_shape(text: str, path, number: int) -> tuple[int, ...]:
    inner = text.strip().removeprefix("(").removesuffix(")")
    try:
        return tuple(int(x) for x in inner.split(",") if x.strip())
    except ValueError as err:
        raise ValueError(f"{path}:{number}: shape {text!r} is not a tuple of integers like (1, 8, 768)") from err


def _parse_dtype(text: str, path, number: int) -> torch.dtype:
    dtype = getattr(torch, text.strip().removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{path}:{number}: unknown dtype {text!r} (expected e.g. torch.float32)")
    return dtype


def meta_state(keys: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """Weightless tensors of the listed shapes and dtypes (no memory), standing in for a real checkpoint."""
    return {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in keys.items()}




# ------------------------------------------------------------------------------------------------ config from shapes
def _count_indexed(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    """Number of distinct block indices i in keys ``<prefix><i>.*``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in shapes if (m := pattern.match(k))})


def _require_keys(shapes: Mapping[str, tuple[int, ...]], keys: Iterable[str]) -> None:
    absent = [k for k in keys if k not in shapes]
    if absent:
        raise CheckpointConversionError(f"cannot infer the model config: the checkpoint lacks {absent}; is it a "
                                        "GRAM checkpoint (reference key names)?")


def infer_vision(shapes: Mapping[str, tuple[int, ...]], base):
    """EVA tower sizes from the checkpoint (heads are not recoverable from shapes: taken from ``base``)."""
    p = "vision_encoder.visual."
    _require_keys(shapes, [p + "cls_token", p + "pos_embed", p + "patch_embed.proj.weight", p + "blocks.0.mlp.fc1.weight"])
    patch = shapes[p + "patch_embed.proj.weight"][-1]
    grid = math.isqrt(shapes[p + "pos_embed"][1] - 1)  # (1, 1 + grid^2, width)
    return dataclasses.replace(base, width=shapes[p + "cls_token"][-1], depth=_count_indexed(shapes, p + "blocks."),
                               patch_size=patch, image_size=grid * patch,
                               mlp_hidden=shapes[p + "blocks.0.mlp.fc1.weight"][0], weights=None)


def infer_text(shapes: Mapping[str, tuple[int, ...]], base):
    """BERT sizes from the checkpoint (heads from ``base``)."""
    p = "multimodal_encoder.bert."
    words, positions = p + "embeddings.word_embeddings.weight", p + "embeddings.position_embeddings.weight"
    ffn, types = p + "encoder.layer.0.intermediate.dense.weight", p + "embeddings.token_type_embeddings.weight"
    _require_keys(shapes, [words, positions, ffn, types])
    return dataclasses.replace(
        base, vocab_size=shapes[words][0], hidden_size=shapes[words][1], max_position_embeddings=shapes[positions][0],
        type_vocab_size=shapes[types][0], intermediate_size=shapes[ffn][0],
        num_layers=_count_indexed(shapes, p + "encoder.layer."),
        cross_attention=any(".crossattention." in k for k in shapes), weights=None)


def infer_beats(shapes: Mapping[str, tuple[int, ...]], base):
    """BEATs sizes and structural flags visible in the keys; ``deep_norm``, ``layer_norm_first`` and
    ``max_distance`` leave no trace in the weights and come from ``base`` (pass the BEATs file's cfg to be sure)."""
    p = "audio_encoder."
    layer = p + "encoder.layers.0."
    _require_keys(shapes, [p + "patch_embedding.weight", p + "encoder.pos_conv.0.weight_v", layer + "fc1.weight"])
    patch = shapes[p + "patch_embedding.weight"]  # (embed_dim, 1, p, p)
    conv = shapes[p + "encoder.pos_conv.0.weight_v"]  # (D, D / groups, kernel)
    bias_table = shapes.get(layer + "self_attn.relative_attention_bias.weight")  # (buckets, heads)
    proj = shapes.get(p + "post_extract_proj.weight")  # (D, embed_dim), absent when the widths are equal
    width = proj[0] if proj else patch[0]
    fields = dict(input_patch_size=patch[-1], embed_dim=patch[0], conv_bias=p + "patch_embedding.bias" in shapes,
                  encoder_layers=_count_indexed(shapes, p + "encoder.layers."), encoder_embed_dim=width,
                  encoder_ffn_embed_dim=shapes[layer + "fc1.weight"][0], conv_pos=conv[-1],
                  conv_pos_groups=width // conv[1], relative_position_embedding=bias_table is not None,
                  gru_rel_pos=layer + "self_attn.grep_a" in shapes, weights=None)
    if bias_table is not None:
        fields.update(num_buckets=bias_table[0], encoder_attention_heads=bias_table[1])
    return dataclasses.replace(base, **fields)


def infer_model_config(shapes: Mapping[str, tuple[int, ...]], base: ModelConfig,
                       modalities: Sequence[str] | None = None) -> ModelConfig:
    """The ``ModelConfig`` a reference checkpoint (unwrapped key -> shape) was trained with, on top of ``base``.

    Frame/clip counts, the shared width and every encoder size are read from the shapes; what shapes cannot tell
    (head counts, BEATs' normalisation flags) comes from ``base``. Encoder weight paths are cleared: the
    checkpoint holds every weight.
    """
    _require_keys(shapes, ["vision_frame_embedding", "audio_frame_embedding", "contra_head_t.linear.weight"])
    return dataclasses.replace(
        base, modalities=list(modalities or base.modalities), embed_dim=shapes["contra_head_t.linear.weight"][0],
        max_frames=shapes["vision_frame_embedding"][1], max_audio_clips=shapes["audio_frame_embedding"][1],
        matching_head=any(k.startswith("itm_head.") for k in shapes), vision=infer_vision(shapes, base.vision),
        audio=infer_beats(shapes, base.audio), text=infer_text(shapes, base.text))
