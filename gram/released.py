"""Released GRAM checkpoints -> complete gram checkpoints, in one step.

The reference releases a run as a folder::

    <folder>/log/hps.json        the run config: {"run_cfg": {...}, "model_cfg": {...}, "data_cfg": {"train": [...],
                                 "val": [...]}, "local_rank": 0} (the reference's utils/args.py writes it)
    <folder>/ckpt/model_step_<N>.pt, best_<eval name>.pt   flat state dicts (GRAM.state_dict()), optimizer_step_*.pt

:func:`convert_released` reads both: the weights through the one key map of :mod:`gram.models.convert`, the model's
sizes from the weights' shapes, and from ``hps.json`` what shapes cannot tell (the modalities of the evaluation
task, the image size, the test-time frame and clip counts, transform, mel bins, text lengths, the DAM weight). It
returns the config and state dict of a gram checkpoint (model, loss and data sections, ``data.preprocessing:
reference``), which :func:`write_converted` writes as a self-contained folder (with the vocabulary inside) and
:func:`gram.load_model` uses in memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from gram import checkpoint_format as ckpt
from gram.cli import UserError
from gram.config import DataConfig, ModelConfig
from gram.losses import LossConfig
from gram.models.beats import load_beats_checkpoint
from gram.models.convert import (
    CheckpointConversionError,
    ConversionReport,
    alias_groups,
    convert_state_dict,
    infer_model_config,
    unwrap_reference,
)
from gram.models.gram_model import GramModel
from gram.models.hub import model_config_from_dict, model_config_to_dict
from gram.train.task import GramTask

log = logging.getLogger(__name__)

# Where the BERT vocabulary of the released models is expected (pretrained_weights/README.md); the released
# folders do not carry it.
DEFAULT_VOCABULARY = "pretrained_weights/bert/bert-base-uncased"
STEP_FILE = re.compile(r"^model_step_(\d+)\.pt$")
TASK_LETTERS = {"v": "video", "a": "audio", "s": "subtitle", "d": "depth"}

# hps.json model_cfg keys: values gram must honour exactly (anything else cannot be converted) ...
REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "model_type": ("gram", "vast"),
    "vision_encoder_type": ("evaclip01_giant",),
    "audio_encoder_type": ("beats",),
    "frame_embedding_type": ("adaptive",),
    "pool_video": (False,),
}
# ... keys read into the converted config (or checked against the weights) ...
USED_KEYS = ("contra_dim", "vision_resolution", "max_vision_sample_num", "max_audio_sample_num", "audio_melbins",
             "audio_target_length", "max_caption_len", "max_subtitle_len", "itm_ratio", "itm_rerank_num")
# ... and keys without effect on the converted model (training switches, captioning and dead options).
INERT_KEYS = ("default", "inherit_keys", "checkpointing", "frozen_vision", "frozen_audio", "max_omni_caption_len",
              "beam_size", "captioner_mode", "generate_nums", "ret_bidirection_evaluation", "evaluation_type",
              "concatenated_nums")


@dataclass
class HpsSettings:
    """What a released run's ``hps.json`` says about the model, its test-time inputs and its loss."""

    modalities: list[str] | None = None
    image_size: int | None = None
    embed_dim: int | None = None
    max_frames: int | None = None
    max_audio_clips: int | None = None
    dam_weight: float | None = None
    data: dict[str, Any] = field(default_factory=dict)  # DataConfig fields
    rerank_k: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Converted:
    """A converted checkpoint: its config.json (model, loss, data, converted_from), the task state dict
    (``model.*``, ``loss.*``), the conversion report and the vocabulary to copy inside."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    report: ConversionReport
    vocabulary: Path
    source: Path
    notes: list[str] = field(default_factory=list)

    def build_task(self) -> GramTask:
        """The task with these weights, in memory (the report already checked every key and shape)."""
        task = GramTask(GramModel(model_config_from_dict(self.config["model"])), LossConfig(**self.config["loss"]))
        missing, unexpected = task.load_state_dict(self.state, strict=False)
        aliases = alias_groups(task)
        missing = [k for k in missing if aliases.get(k) not in self.state]
        if missing or unexpected:  # the report's checks make this unreachable; never load a half model silently
            raise CheckpointConversionError(f"{self.source}: missing {missing}, unexpected {unexpected}")
        return task


# ------------------------------------------------------------------------------------------------ the folder
def released_files(source: str | Path, hps: str | Path | None = None) -> tuple[Path | None, Path, list[str]]:
    """(hps.json or None, the weights file, notes) of a released folder, or of one of its .pt files."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file or folder (a released GRAM folder with log/hps.json and "
                                "ckpt/*.pt, or one .pt file)")
    notes: list[str] = []
    if path.is_file():
        weights, folder = path, path.parent.parent if path.parent.name == ckpt.RELEASED_CKPT else None
    else:
        folder, weights = path, pick_weights(path, notes)
    if hps is None and folder is not None and (folder / ckpt.RELEASED_HPS).is_file():
        hps = folder / ckpt.RELEASED_HPS
    if hps is None and path.is_dir():
        raise FileNotFoundError(f"{path} has no {ckpt.RELEASED_HPS}: a released GRAM folder holds log/hps.json (the "
                                "run config) beside ckpt/; pass the hps.json with --hps if it lies elsewhere")
    if hps is not None and not Path(hps).is_file():
        raise FileNotFoundError(f"hps.json {hps} not found")
    return (Path(hps) if hps is not None else None), weights, notes


def pick_weights(folder: Path, notes: list[str]) -> Path:
    """The newest ``model_step_<N>.pt`` of ``folder/ckpt`` (or its only ``best_*.pt``), saying so when there was a
    choice; optimizer states are never candidates."""
    directory = folder / ckpt.RELEASED_CKPT
    files = sorted(p for p in directory.glob("*.pt") if not p.name.startswith("optimizer")) \
        if directory.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{folder} has no {ckpt.RELEASED_CKPT}/*.pt: a released GRAM folder holds its weights "
                                f"as {ckpt.RELEASED_CKPT}/model_step_<N>.pt or best_*.pt")
    steps = sorted((int(m.group(1)), p) for p in files if (m := STEP_FILE.match(p.name)))
    if steps:
        chosen = steps[-1][1]
    elif len(files) == 1:
        chosen = files[0]
    else:
        raise UserError(f"{directory} holds {len(files)} weight files and none is model_step_<N>.pt "
                        f"({', '.join(p.name for p in files)}): pass the one you want instead of the folder")
    if len(files) > 1:
        notes.append(f"{directory} holds {len(files)} weight files ({', '.join(p.name for p in files)}); using "
                     f"{chosen.name}, the newest step. Pass another file instead of the folder to use it.")
    return chosen


# ------------------------------------------------------------------------------------------------ hps.json
def read_hps(path: str | Path) -> HpsSettings:
    """Parse a released run's ``hps.json``; unknown values that change the model raise, naming the key."""
    try:
        hps = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); is it the run's log/hps.json?") from err
    if not isinstance(hps, Mapping) or not isinstance(hps.get("model_cfg"), Mapping):
        raise UserError(f"{path} has no model_cfg section; a reference hps.json holds run_cfg, model_cfg and data_cfg")
    model = hps["model_cfg"]
    out = HpsSettings()
    for key, allowed in REQUIRED_VALUES.items():
        if key in model and model[key] not in allowed:
            raise UserError(f"{path}: model_cfg.{key}={model[key]!r} is not supported (gram implements "
                            f"{' or '.join(map(repr, allowed))}); this checkpoint cannot be converted")
    unknown = sorted(k for k in model if k not in (*REQUIRED_VALUES, *USED_KEYS, *INERT_KEYS))
    if unknown:
        out.notes.append(f"{path}: ignored model_cfg keys unknown to gram: {', '.join(unknown)}")
    number = _reader(path, model, "model_cfg")
    out.embed_dim, out.image_size = number("contra_dim"), number("vision_resolution")
    out.max_frames, out.max_audio_clips = number("max_vision_sample_num"), number("max_audio_sample_num")
    out.dam_weight, out.rerank_k = number("itm_ratio", float), number("itm_rerank_num")
    for ours, theirs in (("audio_mel_bins", "audio_melbins"), ("audio_target_length", "audio_target_length"),
                         ("max_text_len", "max_caption_len"), ("max_subtitle_len", "max_subtitle_len")):
        if (value := number(theirs)) is not None:
            out.data[ours] = value
    if out.image_size is not None:
        out.data["image_size"] = out.image_size
    _read_data_cfg(path, hps.get("data_cfg") or {}, out)
    return out


def _reader(path, section: Mapping[str, Any], name: str):
    def number(key: str, kind: type = int):
        if key not in section or section[key] is None:
            return None
        value = section[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise UserError(f"{path}: {name}.{key}={value!r} is not {'an integer' if kind is int else 'a number'}")
        return kind(value)
    return number


def _read_data_cfg(path, data_cfg: Mapping[str, Any], out: HpsSettings) -> None:
    """Test-time inputs from the first val set, training frames from the first train set, modalities from the
    val task (``ret%tvas`` -> video, audio, subtitle)."""
    val, train = list(data_cfg.get("val") or []), list(data_cfg.get("train") or [])
    if train and (frames := _reader(path, train[0], "data_cfg.train[0]")("vision_sample_num")) is not None:
        out.data["num_frames"] = frames
    if not val:
        out.notes.append(f"{path}: no data_cfg.val set; test-time frame and clip counts are gram's defaults")
        return
    first, number = val[0], _reader(path, val[0], "data_cfg.val[0]")
    if len(val) > 1:
        out.notes.append(f"{path}: {len(val)} val sets; test-time settings from the first ({first.get('name')})")
    for ours, theirs in (("test_num_frames", "vision_sample_num"), ("num_audio_clips", "audio_sample_num")):
        if (value := number(theirs)) is not None:
            out.data[ours] = value
    transform = first.get("vision_transforms", "none")
    if transform not in ("none", "crop_flip"):
        raise UserError(f"{path}: data_cfg.val[0].vision_transforms={transform!r} is not supported (none, crop_flip)")
    out.data["transform"] = transform
    if first.get("name"):
        out.data["name"] = str(first["name"])
    if first.get("task"):
        out.modalities = task_modalities(str(first["task"]), path)


def task_modalities(task: str, source: Any = "hps.json") -> list[str]:
    """The data modalities of a reference task string's widest retrieval subtask: ``ret%tvas`` -> video, audio,
    subtitle; ``ret%tv%ta%tva`` -> video, audio."""
    parts = task.split("%")
    if parts[0] != "ret" or len(parts) < 2:
        raise UserError(f"{source}: task {task!r} is not a retrieval task (ret%t...)")
    widest = max(parts[1:], key=len)
    letters = widest.removeprefix("t")
    bad = [c for c in letters if c not in TASK_LETTERS]
    if not widest.startswith("t") or bad or not letters:
        raise UserError(f"{source}: task {task!r}: subtask {widest!r} is not t followed by v/a/s/d")
    return [TASK_LETTERS[c] for c in letters]


# ------------------------------------------------------------------------------------------------ configs
def base_model_config(path: str | None = None, beats_cfg: str | None = None) -> ModelConfig:
    """gram_base (the schema defaults) or a model yaml, without weight paths; BEATs cfg from a file if given."""
    cfg = ModelConfig()
    if path:
        node = OmegaConf.load(path)
        for encoder in ("vision", "audio", "text"):  # their ${paths.*} interpolations are not needed here
            if encoder in node and "weights" in node[encoder]:
                node[encoder].pop("weights")
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))
    if beats_cfg:
        audio, _ = load_beats_checkpoint(beats_cfg)
        cfg = dataclasses.replace(cfg, audio=audio)
    return cfg


def loss_config_for(tau: float, dam_weight: float | None = None) -> LossConfig:
    """The default (GRAM) loss config holding the checkpoint's temperature, its clamp range widened if needed."""
    base = LossConfig()
    return dataclasses.replace(base, temperature_init=tau, temperature_min=min(base.temperature_min, tau),
                               temperature_max=max(base.temperature_max, tau),
                               dam_weight=base.dam_weight if dam_weight is None else dam_weight)


def build_meta_task(model_cfg: ModelConfig, loss_cfg: LossConfig) -> GramTask:
    """The full task on the meta device: shapes only, no memory, no weight file read."""
    with torch.device("meta"):
        return GramTask(GramModel(model_cfg), loss_cfg)


def data_section(settings: HpsSettings, model_cfg: ModelConfig, vocabulary: str) -> dict[str, Any]:
    """A complete DataConfig section: hps.json's test-time settings, the reference's preprocessing."""
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    values = {"name": "released", "tokenizer": vocabulary, "image_size": model_cfg.vision.image_size,
              **settings.data}
    if "preprocessing" in fields:  # data.preprocessing (engineer front's key): what the reference fed its model
        values["preprocessing"] = "reference"
    return dataclasses.asdict(DataConfig(**{k: v for k, v in values.items() if k in fields}))


# ------------------------------------------------------------------------------------------------ conversion
def load_reference(path: str | Path) -> dict[str, torch.Tensor]:
    """The unwrapped reference state dict of a .pt file (tensors only: nothing else is unpickled)."""
    state = ckpt.load_tensor_file(path, "reference GRAM checkpoint")
    if not isinstance(state, Mapping):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict")
    return unwrap_reference(state)


def storable(state: Mapping[str, torch.Tensor], task: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Keep one name per shared tensor of our model and give every other key its own storage (safetensors
    refuses aliased tensors; video and depth copies of one reference tensor must be separate)."""
    aliases = alias_groups(task)
    out, seen = {}, set()
    for key, value in state.items():
        if aliases.get(key) in state:
            continue
        pointer = value.untyped_storage().data_ptr()
        out[key] = value.clone() if pointer in seen else value.contiguous()
        seen.add(pointer)
    return out


def vocabulary_size(vocabulary: str | Path) -> tuple[Path, int]:
    path = Path(vocabulary).expanduser()
    path = path / ckpt.VOCAB if path.is_dir() else path
    if not path.is_file():
        raise ckpt.TokenizerNotFoundError(
            f"vocabulary {vocabulary} not found: a released GRAM folder carries no tokenizer, so pass "
            f"tokenizer=/--tokenizer with bert-base-uncased's vocab.txt (or its folder; see "
            "pretrained_weights/README.md)")
    with path.open(encoding="utf-8") as handle:
        return path, sum(1 for _ in handle)


def convert_released(source: str | Path, tokenizer: str | Path | None = None, *, hps: str | Path | None = None,
                     modalities: Sequence[str] | None = None, image_size: int | None = None,
                     model_config: str | None = None, beats_cfg: str | None = None,
                     allow_missing: Sequence[str] = ()) -> Converted:
    """A released folder (or one of its .pt files) -> :class:`Converted`.

    ``modalities`` overrides those of hps.json's evaluation task (default: video, audio when there is no hps.json);
    ``image_size`` converts for another resolution (the position grid is resized bilinearly, as the reference).
    Raises with one line naming the file and key for a missing hps.json or weights, an unsupported hps value, a
    vocabulary that does not fit the text encoder, or any key that does not map (the report lists them).
    """
    hps_path, weights, notes = released_files(source, hps)
    settings = read_hps(hps_path) if hps_path is not None else HpsSettings(
        notes=[f"{weights}: no log/hps.json beside it; data settings are gram's defaults (pass --hps to read them)"])
    notes += settings.notes
    vocab_file, vocab_lines = vocabulary_size(tokenizer or DEFAULT_VOCABULARY)
    reference = load_reference(weights)
    if "contra_temp" not in reference:
        raise CheckpointConversionError(f"{weights} has no contra_temp; is it a GRAM checkpoint?")
    shapes = {k: tuple(v.shape) for k, v in reference.items()}
    model_cfg = infer_model_config(shapes, base_model_config(model_config, beats_cfg),
                                   modalities or settings.modalities or ["video", "audio"])
    notes += _check_against_weights(settings, model_cfg, weights)
    size = image_size or settings.image_size
    if size and size != model_cfg.vision.image_size:
        notes.append(f"position embedding resized bilinearly from {model_cfg.vision.image_size} to {size} pixels")
        model_cfg = dataclasses.replace(model_cfg, vision=dataclasses.replace(model_cfg.vision, image_size=size))
    if vocab_lines > model_cfg.text.vocab_size:
        raise UserError(f"vocabulary {vocab_file} has {vocab_lines} entries but the checkpoint's text encoder has "
                        f"{model_cfg.text.vocab_size} word embeddings; pass the vocabulary it was trained with")
    loss_cfg = loss_config_for(float(reference["contra_temp"]), settings.dam_weight)
    task = build_meta_task(model_cfg, loss_cfg)
    state, report = convert_state_dict(reference, task, loss_cfg.temperature_parametrization, allow_missing)
    report.raise_if_failed(str(weights))
    report.notes += notes
    config = {"model": model_config_to_dict(model_cfg), "loss": dataclasses.asdict(loss_cfg),
              "data": data_section(settings, model_cfg, str(vocab_file)),
              "converted_from": {"file": str(weights.resolve()), "hps": str(hps_path.resolve()) if hps_path else None,
                                 "dropped": len(report.dropped), "skipped": sorted(report.skipped),
                                 "rerank_k": settings.rerank_k}}
    return Converted(config, storable(state, task), report, vocab_file, weights, notes)


def _check_against_weights(settings: HpsSettings, model_cfg: ModelConfig, weights: Path) -> list[str]:
    """hps.json and the weights must agree on the shared width; frame/clip counts may differ (noted)."""
    if settings.embed_dim is not None and settings.embed_dim != model_cfg.embed_dim:
        raise UserError(f"hps.json says model_cfg.contra_dim={settings.embed_dim} but {weights} projects to "
                        f"{model_cfg.embed_dim}: the hps.json belongs to another run")
    notes = []
    for key, ours, theirs in (("max_vision_sample_num", model_cfg.max_frames, settings.max_frames),
                              ("max_audio_sample_num", model_cfg.max_audio_clips, settings.max_audio_clips)):
        if theirs is not None and theirs != ours:
            notes.append(f"hps.json model_cfg.{key}={theirs} but the weights' frame embedding has {ours}: kept "
                         f"{ours} (the reference resizes it by nearest interpolation at load, as gram does)")
    return notes


def write_converted(converted: Converted, output: str | Path) -> Path:
    """Write a converted checkpoint as a self-contained gram checkpoint folder (weights, config.json, vocabulary)."""
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(converted.state, str(folder / ckpt.WEIGHTS), metadata={"format": "pt"})
    ckpt.write_config(folder, converted.config)
    return folder
