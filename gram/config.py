"""Structured configs: one dataclass per component, composed by Hydra from `configs/`.

Every YAML file under `configs/` is merged into these typed nodes, so an unknown key or a value of the wrong
type fails at start-up with a message naming the key. `OmegaConf.to_object` then builds the dataclasses, which
runs each `__post_init__` validation.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from gram.data.preprocessing import DEFAULT_PRESET, PRESETS
from gram.models.configs import BeatsConfig, TextConfig, VisionConfig

MODALITIES = ("text", "video", "audio", "subtitle", "depth")
DATA_MODALITIES = MODALITIES[1:]


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ValueError(f"config key `{key}`: {message}")


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    _require(value in allowed, key, f"got {value!r}, expected one of {', '.join(allowed)}")


def check_range(key: str, value: float | None, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """ValueError naming `key`, the value and the allowed range unless low <= value <= high (strict where open) and
    finite; None passes only when `optional`. Shared by every config dataclass's `__post_init__`."""
    lower = "" if low is None else f"{'>' if low_open else '>='} {low}"
    upper = "" if high is None else f"{'<' if high_open else '<='} {high}"
    allowed = " and ".join(part for part in (lower, upper) if part) or "finite"
    if low is not None and high is not None:
        allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if value is None:
        _require(optional, key, f"got null, must be {allowed}")
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    finite = "" if isinstance(value, (int, float)) and math.isfinite(value) else "a finite number "
    _require(ok, key, f"got {value}, must be {finite}{allowed}" + (" or null" if optional else ""))


# The similarities gram.losses.similarity implements (it checks its table against these names); kept here so that a
# config is checked without importing torch.
SIMILARITY_NAMES = ("cosine", "symile", "triangle", "volume")

_PARAMETRIZATIONS = ("log", "raw")


@dataclass
class LossConfig:
    """Options of the GRAM contrastive loss and its baselines.

    Attributes:
        name: similarity, one of ``SIMILARITY_NAMES``: volume (GRAM) | cosine | symile | triangle.
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
        _one_of(self.name, SIMILARITY_NAMES, "loss.name")
        _one_of(self.temperature_parametrization, _PARAMETRIZATIONS, "loss.temperature_parametrization")
        check_range("loss.temperature_init", self.temperature_init, 0, low_open=True)
        self._check_temperature_range()
        check_range("loss.label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        check_range("loss.dam_weight", self.dam_weight, 0)  # 0 disables DAM
        check_range("loss.chunk_size", self.chunk_size, 0)  # 0: no chunking

    def _check_temperature_range(self) -> None:
        """The log parametrisation needs 0 < temperature_min <= temperature_init <= temperature_max."""
        if self.temperature_parametrization != "log":
            return
        low, high = self.temperature_min, self.temperature_max
        check_range("loss.temperature_max", high, 0, low_open=True)
        check_range("loss.temperature_min", low, 0, high, low_open=True)
        _require(low <= self.temperature_init <= high, "loss.temperature_init", f"got {self.temperature_init}, must "
                 f"be in [loss.temperature_min, loss.temperature_max] = [{low}, {high}]")


@dataclass
class PathsConfig:
    """Where data and weights live. Relative paths are relative to the directory `run.py` is started from."""

    data_dir: str = "data"
    weights_dir: str = "pretrained_weights"


@dataclass
class DatasetConfig:
    """One split of one dataset: an annotation file and the media folders its ids point into."""

    annotations: str = ""
    video_dir: str | None = None
    audio_dir: str | None = None
    depth_dir: str | None = None
    video_extensions: list[str] = field(default_factory=lambda: ["mp4", "mkv", "webm", "avi", "mov"])
    audio_extensions: list[str] = field(default_factory=lambda: ["mp3", "wav", "m4a", "flac", "ogg", "aac"])
    depth_extensions: list[str] = field(default_factory=lambda: ["mp4", "npy"])
    # DiDeMo ships a list of ids whose videos are broken; those records are dropped (and counted).
    corrupted: str | None = None
    # Size of the standard split (e.g. 1000 for MSRVTT 1k-A); the evaluation reports it beside what was evaluated.
    canonical_size: int | None = None

    def __post_init__(self) -> None:
        check_range("data.*.canonical_size", self.canonical_size, 1, optional=True)
        for key in ("video_extensions", "audio_extensions", "depth_extensions"):
            _require(len(getattr(self, key)) > 0, f"data.*.{key}", "needs at least one file extension")


@dataclass
class ShardsConfig:
    """Pretraining from shards: a weighted mixture of shard sets (``data.shards`` in the config).

    ``sources``: ``index.json`` paths (or folders holding one) written by ``scripts/make_shards.py``, or
    brace patterns of tar files. ``weights``: relative sampling weights, one per source (empty: equal).
    ``shuffle_buffer``: samples shuffled together (whole shards are grouped until they hold this many);
    memory per loader worker is about (shuffle_buffer + samples per shard) x the mean encoded clip size;
    0 or 1 keeps each shard's order (shard order is still shuffled). ``samples_per_epoch``: samples per
    epoch over all ranks (None: the sources' total).
    """

    sources: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    shuffle_buffer: int = 1000
    samples_per_epoch: int | None = None

    def __post_init__(self) -> None:
        check_range("data.shards.samples_per_epoch", self.samples_per_epoch, 1, optional=True)
        check_range("data.shards.shuffle_buffer", self.shuffle_buffer, 0)
        if not self.sources:
            raise ValueError("data.shards.sources is empty: list index.json files written by scripts/make_shards.py")
        if self.weights and len(self.weights) != len(self.sources):
            raise ValueError(f"data.shards.weights has {len(self.weights)} entries for {len(self.sources)} sources")
        if any(w <= 0 for w in self.weights):
            raise ValueError(f"data.shards.weights must all be positive, got {list(self.weights)}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"data.shards.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(f"data.shards.samples_per_epoch must be positive or null, got {self.samples_per_epoch}")

    def source_weights(self) -> list[float]:
        return list(self.weights) if self.weights else [1.0] * len(self.sources)



@dataclass
class DataConfig:
    name: str = "sample"
    train: DatasetConfig | None = None
    test: DatasetConfig | None = None
    # Pretraining at scale: stream webdataset shards (scripts/make_shards.py) instead of the `train` split.
    shards: ShardsConfig | None = None
    # Generate the sample dataset into `sample_dir` when it is missing (the embedded default run).
    generate_sample: bool = False
    sample_dir: str = "data/sample"
    sample_train_size: int = 600
    sample_test_size: int = 100
    tokenizer: str = "pretrained_weights/bert-base-uncased"
    num_frames: int = 8
    test_num_frames: int = 8
    image_size: int = 224
    transform: str = "none"
    # The front end (frames and audio -> model inputs): "reference" reproduces the reference code that trained the
    # released checkpoints; "accurate" resizes with antialiasing, honours colour tags and keeps audio float.
    # See gram/data/preprocessing.py and README "Preprocessing presets". Checkpoints record it.
    preprocessing: str = DEFAULT_PRESET
    num_audio_clips: int = 1
    audio_target_length: int = 1024
    audio_mel_bins: int = 64
    max_text_len: int = 40
    max_subtitle_len: int = 70
    batch_size: int = 64  # global, over all ranks and accumulation steps
    test_batch_size: int = 64
    num_workers: int = 2
    # Training skips a missing/undecodable clip (logged once, counted); above this fraction the run stops.
    max_failed_fraction: float = 0.05
    # Video decoder: "pyav" (default, no system libraries), "decord" (pip install gram[decord]) or "torchcodec"
    # (gram[torchcodec] + the system FFmpeg libraries). Same frames and pixels; bench/data.py compares their speed.
    video_backend: str = "pyav"

    def __post_init__(self) -> None:
        _one_of(self.transform, ("none", "crop_flip"), "data.transform")
        _one_of(self.preprocessing, tuple(PRESETS), "data.preprocessing")
        for key in ("sample_train_size", "sample_test_size", "num_frames", "test_num_frames", "image_size",
                    "num_audio_clips", "audio_target_length", "audio_mel_bins", "max_text_len", "max_subtitle_len",
                    "batch_size", "test_batch_size"):
            check_range(f"data.{key}", getattr(self, key), 1)
        check_range("data.num_workers", self.num_workers, 0)
        check_range("data.max_failed_fraction", self.max_failed_fraction, 0.0, 1.0)
        _one_of(self.video_backend, ("pyav", "decord", "torchcodec"), "data.video_backend")


@dataclass
class ModelConfig:
    """The GRAM model: one encoder per modality family, projections into a shared `embed_dim` space."""

    name: str = "gram_base"
    # Data modalities besides the text anchor; their order is the order of the volume's data vectors.
    modalities: list[str] = field(default_factory=lambda: ["video", "audio"])
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    audio: BeatsConfig = field(default_factory=BeatsConfig)
    text: TextConfig = field(default_factory=TextConfig)
    max_frames: int = 8
    max_audio_clips: int = 1
    # How one vector is pooled from the text and vision tokens: "cls" (the paper: BERT's [CLS], the frame mean of
    # EVA's per-frame [CLS]) or "mean" (mean over valid tokens). A randomly initialised transformer's [CLS]
    # output barely depends on its input, so small models trained from scratch learn much faster with "mean".
    text_pooling: str = "cls"
    vision_pooling: str = "cls"
    matching_head: bool = True
    freeze_vision: bool = False
    freeze_audio: bool = False
    freeze_text: bool = False

    def __post_init__(self) -> None:
        _require(len(self.modalities) > 0, "model.modalities", "at least one data modality is needed")
        for m in self.modalities:
            _one_of(m, DATA_MODALITIES, "model.modalities")
        _require(len(set(self.modalities)) == len(self.modalities), "model.modalities", "duplicates")
        for key in ("embed_dim", "max_frames", "max_audio_clips"):
            check_range(f"model.{key}", getattr(self, key), 1)
        _one_of(self.text_pooling, ("cls", "mean"), "model.text_pooling")
        _one_of(self.vision_pooling, ("cls", "mean"), "model.vision_pooling")


@dataclass
class TrainerConfig:
    backend: str = "ddp"  # ddp | deepspeed
    device: str = "auto"  # auto | cpu | cuda
    max_steps: int = 1000
    # End the run early (with a checkpoint) without changing the schedule, which still spans max_steps.
    stop_after_steps: int | None = None
    lr: float = 2e-5
    vision_lr: float = 5e-7
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_ratio: float = 0.1
    schedule: str = "warmup_linear"  # warmup_linear | warmup_cosine | constant
    grad_clip: float = 0.0  # 0 disables clipping (the reference never clipped)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    grad_accum_steps: int = 1
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    save_every: int = 0  # 0: save only at the end (and on stop/preemption)
    keep_last: int = 2
    best_metric: str = "t2v_r1"
    resume: bool = False
    max_bad_steps: int = 5  # steps in a row with a non-finite loss or gradient (each skipped) before the run stops
    zero_stage: int = 2
    detect_anomaly: bool = False
    # Bitwise run-to-run reproducibility guaranteed: one intra-op CPU thread and PyTorch's deterministic
    # algorithms (GPU kernels with atomics among them). Slower. Default CPU runs are reproducible too in our
    # tests (no atomic-add kernel is left in the training step), but nothing enforces it there.
    deterministic: bool = False

    def __post_init__(self) -> None:
        _one_of(self.backend, ("ddp", "deepspeed"), "trainer.backend")
        _one_of(self.precision, ("fp32", "bf16", "fp16"), "trainer.precision")
        _one_of(self.schedule, ("warmup_linear", "warmup_cosine", "constant"), "trainer.schedule")
        check_range("trainer.max_steps", self.max_steps, 1)
        check_range("trainer.stop_after_steps", self.stop_after_steps, 1, optional=True)
        check_range("trainer.lr", self.lr, 0.0, low_open=True)
        check_range("trainer.vision_lr", self.vision_lr, 0.0)  # 0: the vision encoder is not updated
        check_range("trainer.weight_decay", self.weight_decay, 0.0)
        _require(len(self.betas) == 2, "trainer.betas", "needs two values")
        for i, beta in enumerate(self.betas):
            check_range(f"trainer.betas[{i}]", beta, 0.0, 1.0, high_open=True)
        check_range("trainer.eps", self.eps, 0.0, low_open=True)
        check_range("trainer.warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        check_range("trainer.grad_clip", self.grad_clip, 0.0)  # 0 disables clipping
        check_range("trainer.grad_accum_steps", self.grad_accum_steps, 1)
        check_range("trainer.log_every", self.log_every, 1)
        check_range("trainer.eval_every", self.eval_every, 0)  # 0: at the end only
        check_range("trainer.save_every", self.save_every, 0)  # 0: at the end only
        check_range("trainer.keep_last", self.keep_last, 0)  # 0: keep every checkpoint
        check_range("trainer.max_bad_steps", self.max_bad_steps, 1)
        _require(self.zero_stage in (1, 2), "trainer.zero_stage", "DeepSpeed ZeRO stage 1 or 2")


@dataclass
class EvalConfig:
    # retrieval: text <-> video ranking; classification: zero-shot, a prompt per class name against each clip.
    task: str = "retrieval"
    # Which data modalities enter the score: T-V = [video], T-VA = [video, audio], ... (defaults to model's).
    modalities: list[str] | None = None
    # "first": one caption per video, as the reference; "all": every caption is a query.
    caption_protocol: str = "first"
    rerank_k: int = 0  # DAM re-ranking of the top-k (the paper's setting is 50); 0 disables it
    chunk_size: int = 1024
    # Evaluation never skips a test item silently; set this to evaluate what exists and report the count.
    allow_missing: bool = False
    # Zero-shot classification: class names, the prompt template and the annotation field holding the label.
    classes: list[str] | None = None
    prompt: str = "{label}"
    label_field: str = "label"

    def __post_init__(self) -> None:
        _one_of(self.task, ("retrieval", "classification"), "eval.task")
        _one_of(self.caption_protocol, ("first", "all"), "eval.caption_protocol")
        check_range("eval.rerank_k", self.rerank_k, 0)
        check_range("eval.chunk_size", self.chunk_size, 1)


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "gram"
    entity: str | None = None
    name: str | None = None  # the run's display name (default: wandb's generated one)
    group: str | None = None  # e.g. one sweep, or the runs of one experiment
    tags: list[str] = field(default_factory=list)
    notes: str | None = None

    def __post_init__(self) -> None:
        _one_of(self.mode, ("offline", "online", "disabled"), "logger.wandb.mode")


@dataclass
class LoggerConfig:
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class GramConfig:
    mode: str = "train"  # train | test
    checkpoint: str | None = None  # a checkpoint file or an output dir (its latest checkpoint)
    # outputs/<date>/<HH-MM-SS> of the launch, with a suffix (_1, _2, ...) when another job took it (gram/train/rundir.py);
    # under `-m` each job gets a subfolder named by its job number.
    output_dir: str = "${unique_run_dir:outputs}"
    seed: int = 42
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # Finetuning: start from this checkpoint's weights (a gram checkpoint folder or run dir; convert released
    # GRAM checkpoints first with scripts/convert_checkpoint.py). Unlike trainer.resume, the step restarts at 0.
    init_from: str | None = None
    # What a reproduction needs (base checkpoint, protocol, ...) and the paper's metrics ("expected"), set by
    # experiment files; the results are reported beside them.
    reproduction: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _one_of(self.mode, ("train", "test"), "mode")
        _require(self.mode != "test" or bool(self.checkpoint), "checkpoint",
                 "mode=test needs checkpoint=PATH (a checkpoint file or a training output dir)")
        needed = ("train", "shards", "test") if self.mode == "train" else ("test",)
        _require(any(getattr(self.data, s) is not None for s in needed), "data",
                 f"the dataset config {self.data.name!r} has no {' or '.join(needed)} split for mode={self.mode}")
        for split in (self.data.train, self.data.test):
            _require(split is None or bool(split.annotations), "data.*.annotations",
                     "each split needs an annotation JSON file")
        if self.mode == "train" and self.data.test is not None:  # checked now, not after hours of training
            from gram.eval.metrics import best_metric_names

            _one_of(self.trainer.best_metric, best_metric_names(self.eval.task), "trainer.best_metric")


def typed_section(schema: type, section: dict[str, Any] | None, source: str) -> Any:
    """A section of a saved run config (a checkpoint's config.json) as its validated dataclass; unknown keys raise,
    naming the key."""
    if section is None:
        raise KeyError(f"{source} has no section for {schema.__name__}; it is not a gram run config")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), section))


def without_pretrained(model_cfg: ModelConfig) -> ModelConfig:
    """A checkpoint holds every weight: do not also read the encoders' original weight files."""
    for encoder in (model_cfg.vision, model_cfg.audio, model_cfg.text):
        encoder.weights = None
    return model_cfg


def register_configs() -> None:
    """Register the schema so `configs/config.yaml` can extend it, and the `unique_run_dir` resolver (idempotent)."""
    from gram.train.rundir import unique_run_dir

    ConfigStore.instance().store(name="gram_schema", node=GramConfig)
    # Cached: every use of output_dir in one process (Hydra's job dir, the run, each -m job) names the same folder.
    OmegaConf.register_new_resolver("unique_run_dir", unique_run_dir, use_cache=True, replace=True)


# ---------------------------------------------------------------------------------------------- unknown keys
def _unwrap_optional(tp: Any) -> Any:
    """X for `X | None` / Optional[X]; otherwise tp."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _is_open(tp: Any) -> bool:
    """A node under which any key is allowed (dict[str, Any], Any)."""
    return tp is Any or tp is dict or typing.get_origin(tp) is dict


def schema_keys(schema: type = None, prefix: str = "") -> list[str]:
    """Every dotted key the structured config declares (sections and leaves), e.g. "trainer.max_steps"."""
    schema = schema or GramConfig
    keys = []
    for name, tp in typing.get_type_hints(schema).items():
        key, tp = f"{prefix}{name}", _unwrap_optional(tp)
        keys.append(key)
        if dataclasses.is_dataclass(tp):
            keys += schema_keys(tp, key + ".")
    return keys


def _declared(key: str, schema: type) -> bool:
    """Whether the dotted ``key`` exists in the schema (anything below an open dict is allowed, and list indices)."""
    tp: Any = schema
    for part in key.split("."):
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                return False
            tp = _unwrap_optional(hints[part])
        elif _is_open(tp):
            return True
        elif typing.get_origin(tp) is list and part.isdigit():
            tp = _unwrap_optional((typing.get_args(tp) or (Any,))[0])
        else:
            return False
    return True


def unknown_key_message(key: str, added: bool = False) -> str:
    """One line for a key the schema does not declare: what to do instead, and the closest valid keys."""
    known = [k for k in schema_keys() if not key.startswith(k + ".")]  # not the sections the key is in
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
    close += [k for k in known if k not in close and difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]],
                                                                               cutoff=0.8)]
    section = key.split(".")[0]
    hint = f"did you mean {', '.join(f'`{k}`' for k in close[:3])}? " if close else ""
    how = ("`+` cannot add keys: " if added else "") + "every key is declared in gram/config.py"
    listing = (f"`python run.py --cfg job --package {section}` prints that section"
               if section in {f.name for f in dataclasses.fields(GramConfig)} and "." in key
               else "`python run.py --cfg job` prints every key")
    return f"unknown config key `{key}`: {hint}({how}; {listing})"


def check_overrides(overrides: Sequence[str], config_dir: str | Path | None = None) -> None:
    """Reject command-line overrides of keys the schema does not declare, before Hydra composes the config.

    Hydra's own message for such a key advises `+key=value`, which under this schema either fails too or adds an
    attribute that nothing reads; this raises a ValueError naming the key and the closest valid ones instead.
    Config group choices (`data=msrvtt_ret`, `+experiment=...`), `hydra.*` keys, deletions and arguments Hydra
    cannot parse are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    groups = Path(config_dir) if config_dir else None
    args = [a for a in overrides if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException:
        return
    for override in parsed:
        key = override.key_or_group
        if override.type == OverrideType.DEL or override.package or key.split(".")[0] == "hydra" or "/" in key:
            continue
        if groups is not None and (groups / key).is_dir():
            continue
        if not _declared(key, GramConfig):
            raise ValueError(unknown_key_message(key, added=override.type != OverrideType.CHANGE))


def check_no_extra_keys(node: Any, schema: type = None, prefix: str = "") -> None:
    """Reject keys of a composed config that the schema does not declare (added with `+key=` or `++key=`)."""
    schema = schema or GramConfig
    hints = typing.get_type_hints(schema)
    for name in node:
        key = f"{prefix}{name}"
        if name not in hints:
            raise ValueError(unknown_key_message(key, added=True))
        tp = _unwrap_optional(hints[name])
        if dataclasses.is_dataclass(tp) and hasattr(node[name], "keys"):  # a section (None when optional and unset)
            check_no_extra_keys(node[name], tp, key + ".")


def to_dataclass(cfg: Any) -> GramConfig:
    """Typed, validated config (runs every `__post_init__`); a key added with `+key=` that the schema does not
    declare is an error naming it, not an attribute nothing reads."""
    check_no_extra_keys(cfg)
    return OmegaConf.to_object(cfg)
