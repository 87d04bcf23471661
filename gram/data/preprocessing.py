"""Preprocessing presets (``data.preprocessing``): how frames and audio become model inputs.

``reference`` reproduces the reference implementation's front end (what trained the released GRAM checkpoints),
with our own decoders:

* frames: converted to float in [0, 1] first, then resized without antialiasing (torchvision 0.15 resized
  tensors without it), for every transform, in training and test;
* colour: YUV -> RGB with the BT.601 matrix whatever the stream's colour tag (OpenCV 4.x ignores the tag);
* audio: files libsndfile reads (WAV, FLAC, OGG, MP3, AIFF) stay float; anything else (AAC in .mp3/.m4a files,
  every MP4 track) is rounded to 16-bit PCM and clipped, as librosa's audioread + FFmpeg fallback returns it.

``accurate`` is the signal-faithful front end: antialiased resize (no aliasing on fine detail), the colour
matrix the stream is tagged with, and float audio from every codec. See README "Preprocessing presets".

A checkpoint records its preset in config.json (``data.preprocessing``); one written before the key existed
used the ``accurate`` front end (:data:`LEGACY_PRESET`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    """What a preset does. ``float_resize``: divide by 255, then resize the float frames without antialiasing
    (else antialiased resize of the uint8 frames, then divide). ``bt601``: YUV -> RGB with BT.601 whatever the
    tag (else the tagged matrix). ``int16_fallback``: round audio that libsndfile cannot read to 16-bit PCM."""

    float_resize: bool
    bt601: bool
    int16_fallback: bool


PRESETS: dict[str, Preset] = {
    "reference": Preset(float_resize=True, bt601=True, int16_fallback=True),
    "accurate": Preset(float_resize=False, bt601=False, int16_fallback=False),
}
DEFAULT_PRESET = "reference"
LEGACY_PRESET = "accurate"  # checkpoints whose config.json has no data.preprocessing were made with it
KEY = "data.preprocessing"


def get_preset(name: str, key: str = KEY) -> Preset:
    """The :class:`Preset` called ``name``; a ValueError naming ``key`` and the choices otherwise."""
    if name not in PRESETS:
        raise ValueError(f"config key `{key}`: got {name!r}, expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def recorded_preset(saved_config: Mapping[str, Any]) -> str:
    """The preset a checkpoint's saved run config (config.json as a dict) records; :data:`LEGACY_PRESET` when
    it has none (written before ``data.preprocessing`` existed)."""
    data = saved_config.get("data") or {}
    name = data.get("preprocessing") or LEGACY_PRESET
    get_preset(name, f"{KEY} (in the checkpoint's config.json)")
    return name


def preset_origin(saved_config: Mapping[str, Any], source: object) -> str:
    """Where :func:`recorded_preset` found its answer, for the log: recorded in ``source``, or the legacy rule."""
    if (saved_config.get("data") or {}).get("preprocessing"):
        return f"recorded in {source}"
    return f"{source} records none: a checkpoint from before {KEY} existed, made with {LEGACY_PRESET!r}"
