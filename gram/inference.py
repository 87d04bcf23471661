"""Using a trained model: load a checkpoint and embed your own sentences, videos and audio.

    predictor = load_model("outputs/my_run")                     # any checkpoint folder, see load_model
    text = predictor.encode_text(["a red circle moves left"])    # (1, D), L2-normalised
    video = predictor.encode_video(["clip.mp4"])                 # (1, D)
    audio = predictor.encode_audio(["clip.mp3"])                 # (1, D); a video's own track also works
    vol = gram.volume(text, video, audio)                        # (1, 1): smaller = better match
    scores = predictor.score(text, video, audio)                 # (1, 1): -volume, higher = better

Every input goes through the preprocessing of the run's *test-time* evaluation (frame count, image size and
transform, audio clips, fbank length and mel bins, text length), read from the checkpoint's config.json, so the
embeddings are the ones the training-time evaluation computes for the same files.

One name, one thing: ``encode_<modality>`` takes raw inputs (strings for text and subtitles, files or tensors
for media) and returns embeddings; :meth:`GramPredictor.tokenize` turns strings into the token dicts that
``GramModel.encode("text", tokens)`` takes, for code that works on model-ready tensors.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from gram import checkpoint_format as ckpt
from gram.checkpoint_format import TokenizerNotFoundError
from gram.config import DataConfig, DatasetConfig, typed_section
from gram.data.audio import (
    NoAudioStreamError,
    load_audio_clips,
    select_clips,
    silent_clips,
    waveform_to_fbank,
)
from gram.data.dataset import Collator, VideoTextDataset
from gram.data.preprocessing import get_preset, preset_origin, recorded_preset
from gram.data.tokenizer import load_tokenizer
from gram.data.video import VideoTransform, load_video_frames, sample_frame_indices
from gram.eval.retrieval import embed_items, usable_items
from gram.eval.scoring import similarity_matrix
from gram.main import check_vocabulary, task_from_checkpoint
from gram.models.gram_model import GramModel
from gram.pretrained import resolve_model_source

MediaInput = str | PathLike | torch.Tensor
log = logging.getLogger(__name__)

__all__ = ["GramPredictor", "SilentAudioWarning", "TokenizerNotFoundError", "load_model"]


class SilentAudioWarning(UserWarning):
    """A file given for audio has no audio stream; it is embedded as silence, as training does."""


class GramPredictor:
    """A trained :class:`GramModel` in eval mode plus the run's test-time preprocessing.

    Every ``encode_*`` method takes a list, works in batches of ``batch_size`` under ``torch.no_grad`` on the
    model's device and returns (N, D) float32 L2-normalised embeddings in input order.
    """

    def __init__(self, model: GramModel, data: DataConfig, tokenizer, device: torch.device, batch_size: int = 32):
        self.model = model.eval().to(device)
        self.data, self.device, self.batch_size = data, device, batch_size
        self.collator = Collator(tokenizer, data.max_text_len, data.max_subtitle_len)
        self.transform = VideoTransform(data.image_size, mode=data.transform, training=False,
                                        preprocessing=data.preprocessing)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Data modalities of the model (besides the text anchor), in the volume's order."""
        return self.model.modalities

    @property
    def embed_dim(self) -> int:
        return self.model.cfg.embed_dim

    # ------------------------------------------------------------------------------------------ text
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions/queries -> (N, D), tokenized to ``data.max_text_len`` as in evaluation."""
        return self._encode_strings("text", texts, self.data.max_text_len)

    def encode_subtitle(self, texts: Sequence[str]) -> torch.Tensor:
        """Subtitles (speech transcripts) -> (N, D), tokenized to ``data.max_subtitle_len``."""
        self._require("subtitle")
        return self._encode_strings("subtitle", texts, self.data.max_subtitle_len)

    def tokenize(self, texts: Sequence[str], modality: str = "text") -> dict[str, torch.Tensor]:
        """Strings -> {"input_ids", "attention_mask"} (N, L) as evaluation tokenizes them (L = data.max_text_len,
        or data.max_subtitle_len for ``modality="subtitle"``): the input of ``GramModel.encode(modality, ...)``."""
        if modality not in ("text", "subtitle"):
            raise ValueError(f"tokenize: modality must be 'text' or 'subtitle', got {modality!r}")
        texts = _as_list(texts, str, modality)
        return self.collator.tokenize(texts, self._max_len(modality))

    def _max_len(self, modality: str) -> int:
        return self.data.max_subtitle_len if modality == "subtitle" else self.data.max_text_len

    def _encode_strings(self, modality: str, texts: Sequence[str], max_len: int) -> torch.Tensor:
        texts = _as_list(texts, str, modality)
        return self._batched(modality, texts, lambda chunk: self.collator.tokenize(chunk, max_len))

    # ------------------------------------------------------------------------------------------ media
    def encode_video(self, items: Sequence[MediaInput]) -> torch.Tensor:
        """Videos -> (N, D). Each item: a file path, raw uint8 frames (T, 3, H, W) sampled and transformed
        like a decoded file, or model-ready float frames (``test_num_frames``, 3, S, S) used as they are."""
        self._require("video")
        return self._encode_media("video", items, self.video_input)

    def encode_depth(self, items: Sequence[MediaInput]) -> torch.Tensor:
        """Depth videos (.mp4 or .npy frames) -> (N, D); items as in :meth:`encode_video`."""
        self._require("depth")
        return self._encode_media("depth", items, self.video_input)

    def encode_audio(self, items: Sequence[MediaInput]) -> torch.Tensor:
        """Audio -> (N, D). Each item: an audio file or a video file (its own track), a (T,) 16 kHz mono waveform
        in [-1, 1], or model-ready clips (num_audio_clips, target_length, mel_bins). A file without an audio
        stream is embedded as silence (what training and evaluation do) with a :class:`SilentAudioWarning`."""
        self._require("audio")
        return self._encode_media("audio", items, self.audio_input)

    def encode(self, modality: str, items: Sequence[Any]) -> torch.Tensor:
        """Dispatch by modality name: ``encode("video", paths)`` == ``encode_video(paths)``."""
        methods = {"text": self.encode_text, "subtitle": self.encode_subtitle, "video": self.encode_video,
                   "audio": self.encode_audio, "depth": self.encode_depth}
        if modality not in methods:
            raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(methods)}")
        return methods[modality](items)

    def _encode_media(self, modality: str, items: Sequence[MediaInput], load: Callable) -> torch.Tensor:
        items = _as_list(items, (str, PathLike, torch.Tensor), modality)
        return self._batched(modality, items, lambda chunk: torch.stack([load(x) for x in chunk]).float())

    def _batched(self, modality: str, items: list, prepare: Callable[[list], Any]) -> torch.Tensor:
        """Embed ``items`` in chunks: prepare(chunk) builds the model input, the model embeds it -> (N, D)."""
        out = [torch.zeros(0, self.embed_dim)]
        with torch.no_grad():
            for start in range(0, len(items), self.batch_size):
                batch = _to_device(prepare(items[start:start + self.batch_size]), self.device)
                out.append(self.model.encode(modality, batch).float().cpu())
        return torch.cat(out).to(self.device)

    def _require(self, modality: str) -> None:
        if modality not in self.modalities:
            raise ValueError(f"this model was trained on {list(self.modalities)} (plus text); it has no "
                             f"{modality!r} encoder")

    # ------------------------------------------------------------------------------------------ preprocessing
    def video_input(self, item: MediaInput) -> torch.Tensor:
        """One video's model input (test_num_frames, 3, S, S), exactly as the evaluation dataset builds it."""
        n = self.data.test_num_frames
        if not isinstance(item, torch.Tensor):
            return load_video_frames(item, n, training=False, transform=self.transform)
        if item.dtype == torch.uint8:
            _check_shape(item, 4, "raw video frames", "(T, 3, H, W) uint8")
            return self.transform(item[sample_frame_indices(item.shape[0], n, training=False)])
        s = self.data.image_size
        _check_shape(item, 4, "video frames", f"({n}, 3, {s}, {s}) float")
        if tuple(item.shape[1:]) != (3, s, s):
            raise ValueError(f"float video frames must be model-ready (n, 3, {s}, {s}), got {tuple(item.shape)}; "
                             f"pass raw uint8 (T, 3, H, W) frames or a file path to have them transformed")
        return item

    def audio_input(self, item: MediaInput) -> torch.Tensor:
        """One audio input (num_audio_clips, target_length, mel_bins) as the evaluation dataset builds it."""
        d = self.data
        if isinstance(item, torch.Tensor):
            if item.dim() == 1:  # a 16 kHz waveform: same fbank and clip rule as a decoded file
                return select_clips(waveform_to_fbank(item, d.audio_mel_bins), d.num_audio_clips,
                                    d.audio_target_length, training=False)
            expected = (d.num_audio_clips, d.audio_target_length, d.audio_mel_bins)
            if tuple(item.shape) != expected:
                raise ValueError(f"audio tensor must be a (T,) 16 kHz waveform or model-ready clips {expected}, "
                                 f"got shape {tuple(item.shape)}")
            return item
        try:
            return load_audio_clips(item, d.num_audio_clips, d.audio_target_length, d.audio_mel_bins, training=False,
                                    preprocessing=d.preprocessing)
        except NoAudioStreamError:
            warnings.warn(f"{item} has no audio stream; embedding silence for it (as training does)",
                          SilentAudioWarning, stacklevel=4)
            return silent_clips(d.num_audio_clips, d.audio_target_length, d.audio_mel_bins)

    # ------------------------------------------------------------------------------------------ datasets
    def embed_split(self, split: DatasetConfig, limit: int | None = None, num_workers: int = 0,
                    allow_missing: bool = False, progress: bool = False) -> dict[str, torch.Tensor]:
        """{"text": (N, D), modality: (N, D), ...} for the first ``limit`` items of an annotated split, row i
        of each belonging to item i (its first caption), through the training-time evaluation path."""
        dataset = VideoTextDataset(split, self.data, self.modalities, training=False, allow_missing=allow_missing)
        n = len(dataset) if limit is None else min(limit, len(dataset))
        subset, failures = Subset(dataset, range(n)), {}
        items = embed_items(self.model, subset, self.collator, self.modalities, self.batch_size, num_workers,
                            self.device, progress, failures=failures)
        keep = usable_items(subset, items, failures)  # one error listing every unusable id, unless allow_missing
        captions = [dataset.records[i].captions[0] for i in keep]
        return {"text": self.encode_text(captions), **{m: e[keep] for m, e in items.items()}}

    # ------------------------------------------------------------------------------------------ scoring
    def score(self, text: torch.Tensor, *data: torch.Tensor, kind: str = "volume") -> torch.Tensor:
        """(N_text, N_items) scores, higher = better.

        ``kind="volume"``: -gram.volume(text, *data), the GRAM score over all given data modalities (pass them in
        any order: the volume does not depend on it). ``kind="cosine"``: cosine with one data modality.
        """
        return similarity_matrix(text, data, kind=kind).to(text.device)


# ---------------------------------------------------------------------------------------------- loading
def load_model(path_or_name: str | PathLike, device: str | torch.device = "cpu",
               tokenizer: str | PathLike | None = None, batch_size: int = 32,
               preprocessing: str | None = None,
               model_config: str | PathLike | None = None) -> GramPredictor:
    """A ready :class:`GramPredictor` from any of gram's folders, from any working directory:

    - a checkpoint folder (``.../checkpoints/step_N``, a converted checkpoint), its ``model.safetensors``, or a
      training output dir (its latest checkpoint);
    - a released model's name (``gram.list_pretrained("gram")``: found under pretrained_weights/, else downloaded
      and converted);
    - a hub folder (``GramPretrained.save_pretrained``, ``gram.models.hub.checkpoint_to_hub``);
    - a released GRAM folder in the reference's layout (``log/hps.json`` + ``ckpt/*.pt``), converted in memory
      (``tokenizer``: bert-base-uncased's vocabulary, default ``pretrained_weights/bert/bert-base-uncased``).

    The model, its preprocessing and its vocabulary come from the folder itself; ``tokenizer`` (a folder with
    vocab.txt, or the file) overrides the vocabulary. ``model_config`` (released folders only): a model yaml for
    what the weights' shapes cannot tell (head counts; default gram_base). The preprocessing preset is the one the
    folder records (``data.preprocessing``; "accurate" for checkpoints written before the key existed, "reference"
    for released GRAM folders); ``preprocessing`` overrides it, with a warning. Weights are loaded strictly.
    ``device``: "cpu", "cuda", "cuda:1", or "auto" (CUDA when available).
    """
    path_or_name = resolve_model_source(path_or_name)  # a registry name -> its local folder (gram.pretrained)
    path = Path(path_or_name).expanduser()
    if not path.exists():
        raise ckpt.CheckpointNotFoundError(
            f"load_model({str(path_or_name)!r}): no such file or folder. Pass a checkpoint folder "
            f"(.../checkpoints/step_N), its {ckpt.WEIGHTS}, a training output_dir, a hub folder or a released GRAM "
            "folder (log/hps.json + ckpt/).")
    if ckpt.is_released_folder(path) or path.suffix == ".pt":
        model, data_cfg, vocab = _open_released(path, tokenizer, model_config)
        saved, folder = {"data": {"preprocessing": data_cfg.preprocessing}}, path
    elif _is_hub_folder(path):
        model, data_cfg, vocab = _open_hub(path, tokenizer)
        saved, folder = {"data": model.preprocessing}, path
    else:
        model, data_cfg, vocab = _open_checkpoint(path, tokenizer)
        folder = ckpt.resolve_checkpoint(path)
        saved = ckpt.read_config(folder)
    data_cfg.preprocessing = chosen_preset(saved, folder, preprocessing, "load_model(preprocessing=...)")
    return GramPredictor(model, data_cfg, vocab, _device(device), batch_size)


def chosen_preset(saved: dict[str, Any], folder: Path, requested: str | None, source: str) -> str:
    """The preprocessing preset to evaluate a checkpoint with: ``requested`` when given (warning when it is not
    the recorded one), else the one its config.json records. Logs the choice."""
    recorded = recorded_preset(saved)
    if requested is None or requested == recorded:
        log.info("preprocessing preset %r (%s)", recorded, preset_origin(saved, folder / ckpt.CONFIG))
        return recorded
    get_preset(requested, source)
    warnings.warn(f"{source}: preprocessing preset {requested!r} overrides {recorded!r}, recorded in "
                  f"{folder / ckpt.CONFIG}; the model was trained with {recorded!r}", stacklevel=3)
    return requested


def _open_checkpoint(path: Path, tokenizer: str | PathLike | None) -> tuple[GramModel, DataConfig, Any]:
    folder = ckpt.resolve_checkpoint(path)
    if not (folder / ckpt.CONFIG).is_file():
        raise ckpt.CheckpointNotFoundError(f"{folder} has no {ckpt.CONFIG}; it is needed to rebuild the model "
                                           f"and its preprocessing (checkpoints written by gram have one)")
    saved = ckpt.read_config(folder)
    data_cfg = typed_section(DataConfig, saved.get("data"), str(folder / ckpt.CONFIG))
    text_tokenizer = _load_vocabulary(tokenizer, lambda: ckpt.tokenizer_location(folder, saved))
    return task_from_checkpoint(folder, text_tokenizer).model, data_cfg, text_tokenizer


def _is_hub_folder(path: Path) -> bool:
    from gram.models.hub import is_hub_config

    config = path / ckpt.CONFIG if path.is_dir() else None
    return config is not None and config.is_file() and is_hub_config(json.loads(config.read_text()))


def _open_hub(path: Path, tokenizer: str | PathLike | None) -> tuple[GramModel, DataConfig, Any]:
    from gram.models.hub import GramPretrained

    model = GramPretrained.from_pretrained(path)
    if model.preprocessing is None:
        raise ckpt.CheckpointNotFoundError(
            f"{path / ckpt.CONFIG} has no data section: this hub folder was exported without its preprocessing and "
            "vocabulary (format_version 1). Re-export it with gram.models.hub.checkpoint_to_hub(CHECKPOINT, DIR), "
            "or load the bare model with GramPretrained.from_pretrained.")
    data_cfg = typed_section(DataConfig, model.preprocessing, str(path / ckpt.CONFIG))
    text_tokenizer = _load_vocabulary(tokenizer, lambda: model.vocabulary)
    check_vocabulary(model.cfg, text_tokenizer)
    return model, data_cfg, text_tokenizer


def _open_released(path: Path, tokenizer: str | PathLike | None,
                   model_config: str | PathLike | None) -> tuple[GramModel, DataConfig, Any]:
    from gram.released import convert_released

    converted = convert_released(path, tokenizer, model_config=str(model_config) if model_config else None)
    for note in converted.notes:
        warnings.warn(note, stacklevel=3)
    data = {**converted.config["data"], "tokenizer": str(converted.vocabulary)}
    data_cfg = typed_section(DataConfig, data, str(converted.source))
    text_tokenizer = load_tokenizer(converted.vocabulary)
    return converted.build_task().model, data_cfg, text_tokenizer


def _load_vocabulary(override: str | PathLike | None, inside: Callable[[], Path]):
    """The override when given (a clear error when it is not there), else the folder's own vocabulary."""
    if override is None:
        return load_tokenizer(inside())
    path = Path(override).expanduser()
    if not path.exists():
        raise TokenizerNotFoundError(f"tokenizer {str(override)!r} (the tokenizer argument) not found; pass a folder "
                                     "holding vocab.txt, or the file")
    return load_tokenizer(path)


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device} but no CUDA device is visible; use device='cpu' or 'auto'")
    return device


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, dict):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


def _as_list(items: Any, kinds: type | tuple, modality: str) -> list:
    """A list of inputs; a lone string/path/tensor is a common slip, so it is refused with a hint."""
    if isinstance(items, (str, PathLike, torch.Tensor)):
        raise TypeError(f"encode_{modality} takes a list of inputs, got a single {type(items).__name__}; "
                        f"wrap it in a list: [{items!r}]" if not isinstance(items, torch.Tensor) else
                        f"encode_{modality} takes a list of per-item tensors, got one tensor; pass list(tensor) "
                        f"for a batch or [tensor] for one item")
    items = list(items)
    bad = [type(x).__name__ for x in items if not isinstance(x, kinds)]
    if bad:
        raise TypeError(f"encode_{modality}: unsupported input type(s) {sorted(set(bad))}")
    return items


def _check_shape(x: torch.Tensor, dims: int, what: str, expected: str) -> None:
    if x.dim() != dims:
        raise ValueError(f"{what} must be {expected}, got shape {tuple(x.shape)}")
