"""A generated, learnable sample dataset in the formats real video-text datasets use.

Every clip shows one coloured shape moving across a dark background while a tone plays; its
caption and subtitle say what is seen and heard. Seven attributes (:data:`SAMPLE_ATTRIBUTES`)
tie the three together, so a model can only match a caption to its clip by actually seeing
the colour, shape, size and motion and hearing the pitch, rhythm and timbre.

Layout written under ``root`` (the formats of the real datasets, see ``data/README.md``)::

    videos/<video_id>.mp4        H.264 yuv420p + an AAC audio track (every clip)
    audios/<video_id>.mp3|.wav   a separate audio file (most clips; the others fall back to the
                                 video's own track)
    annotations/{train,test}.json  [{"video_id", "desc", "subtitle", "label", "attributes"}, ...]
    tokenizer/vocab.txt          a small WordPiece vocabulary trained on the train texts
    manifest.json                generator version, seed, counts, file list (the cache key)

Generation is seeded per clip, so the same seed gives byte-identical annotation files and
identical decoded media, and an existing identical manifest makes it a no-op.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np

from gram.data.tokenizer import train_wordpiece_vocab

GENERATOR_VERSION = 2

log = logging.getLogger(__name__)

SAMPLE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "star"),
    "colour": ("red", "orange", "yellow", "green", "blue", "purple"),
    "size": ("small", "large"),
    "motion": ("left", "right", "up", "down"),
    "pitch": ("low", "medium", "high"),
    "rhythm": ("steady", "slow", "fast"),
    "timbre": ("pure", "buzzing"),
}
# The zero-shot class of a clip (its ``label``): the shape, a natural closed label set.
LABEL_ATTRIBUTE = "shape"

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "orange": (250, 135, 10),
    "yellow": (245, 230, 20),
    "green": (30, 200, 40),
    "blue": (30, 70, 245),
    "purple": (165, 40, 225),
}
PITCH_HZ = {"low": 330.0, "medium": 880.0, "high": 2350.0}
BEEPS_PER_SECOND = {"steady": 0.0, "slow": 2.0, "fast": 6.0}
# Shape "radius" as a fraction of the frame side: clearly different after a resize to 64x64.
SIZE_FRACTION = {"small": 0.14, "large": 0.27}
# Unit direction (dx, dy) in image coordinates (y grows downwards).
MOTION_DIRECTION = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


@dataclass(frozen=True)
class MediaSpec:
    """How clips are encoded; part of the cache key."""

    frame_size: int = 96
    fps: int = 12
    duration_s: float = 2.5
    video_sample_rate: int = 16000
    audio_file_sample_rate: int = 22050


@dataclass(frozen=True)
class ClipSpec:
    """One clip to generate: its id, attributes and which separate audio file it gets."""

    video_id: str
    attributes: dict[str, str]
    audio_ext: str | None  # "mp3", "wav", or None (only the video's own track)
    seed: tuple[int, ...]


# ---------------------------------------------------------------------------- attributes


def all_attribute_combinations() -> list[dict[str, str]]:
    """Every combination of :data:`SAMPLE_ATTRIBUTES` values (2880), in a fixed order."""
    names = list(SAMPLE_ATTRIBUTES)
    return [dict(zip(names, values)) for values in itertools.product(*SAMPLE_ATTRIBUTES.values())]


def sample_split_attributes(rng: np.random.Generator, count: int, distinct: bool) -> list[dict[str, str]]:
    """Draw ``count`` attribute dicts uniformly; ``distinct`` draws without replacement.

    The test split is drawn without replacement so that its captions (which name all seven
    attributes) are unique and retrieval on it is well posed; it still follows the same
    (uniform) distribution as the train split.
    """
    combos = all_attribute_combinations()
    if distinct and count > len(combos):
        raise ValueError(f"num_test={count} exceeds the {len(combos)} distinct attribute combinations.")
    picks = rng.choice(len(combos), size=count, replace=not distinct)
    return [combos[i] for i in picks]


def audio_extension(index: int) -> str | None:
    """Separate audio file type for the ``index``-th clip of a split.

    One clip in ten has no separate file (the loader must read the mp4's own track) and one
    in ten is a WAV rather than an MP3, as in real collections of mixed provenance.
    """
    return {0: None, 5: "wav"}.get(index % 10, "mp3")


def build_clip_specs(seed: int, split: str, start: int, count: int, distinct: bool) -> list[ClipSpec]:
    """The clips of one split; ids are ``clip<global index>`` so train and test never collide."""
    split_rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    attributes = sample_split_attributes(split_rng, count, distinct)
    return [
        ClipSpec(f"clip{start + i:05d}", attrs, audio_extension(i), (seed, start + i))
        for i, attrs in enumerate(attributes)
    ]


# ---------------------------------------------------------------------------- text

SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {
        "circle": ("circle", "disc", "round dot"),
        "square": ("square", "box", "block"),
        "triangle": ("triangle",),
        "star": ("star",),
    },
    "size": {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")},
    "motion": {
        "left": ("moves left", "slides to the left", "drifts leftwards", "travels to the left"),
        "right": ("moves right", "slides to the right", "drifts rightwards", "travels to the right"),
        "up": ("moves up", "rises", "floats upwards", "climbs up"),
        "down": ("moves down", "falls", "sinks downwards", "drops down"),
    },
    "pitch": {"low": ("low", "deep"), "medium": ("medium", "mid"), "high": ("high", "shrill")},
    "timbre": {"pure": ("pure", "clean", "soft"), "buzzing": ("buzzing", "buzzy", "harsh")},
}
CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} {motion} while we hear {sound}",
    "{Sound} as a {size} {colour} {shape} {motion}",
    "the {colour} {shape} is {size} and {motion}, with {sound}",
    "one {colour} {size} {shape} {motion} to {sound}",
    "video of a {size} {colour} {shape} that {motion}; {sound} in the background",
    "you can hear {sound} and see a {size} {colour} {shape} that {motion}",
)


def pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    """A seeded choice among strings."""
    return options[int(rng.integers(len(options)))]


def describe_sound(attrs: dict[str, str], rng: np.random.Generator) -> str:
    """A noun phrase for the audio, e.g. "fast buzzing high beeps" or "a steady pure low tone"."""
    pitch = pick(rng, SYNONYMS["pitch"][attrs["pitch"]])
    timbre = pick(rng, SYNONYMS["timbre"][attrs["timbre"]])
    rhythm = attrs["rhythm"]
    if rhythm == "steady":
        return f"a {pick(rng, ('steady', 'continuous', 'constant'))} {timbre} {pitch} tone"
    pace = pick(rng, ("slow", "sparse", "lazy") if rhythm == "slow" else ("fast", "rapid", "quick"))
    return f"{pace} {timbre} {pitch} beeps"


def make_caption(attrs: dict[str, str], rng: np.random.Generator) -> str:
    """A caption naming all seven attributes, in one of several templates and synonyms."""
    sound = describe_sound(attrs, rng)
    fields = {
        "size": pick(rng, SYNONYMS["size"][attrs["size"]]),
        "colour": attrs["colour"],
        "shape": pick(rng, SYNONYMS["shape"][attrs["shape"]]),
        "motion": pick(rng, SYNONYMS["motion"][attrs["motion"]]),
        "sound": sound,
        "Sound": sound[0].upper() + sound[1:],
    }
    return pick(rng, CAPTION_TEMPLATES).format(**fields)


def make_subtitle(attrs: dict[str, str], rng: np.random.Generator) -> str:
    """What a speaker says over the clip: an object word, the beeps, or nothing (about 1 in 4)."""
    beeps = {"steady": "hmmmm", "slow": "beep ... beep ... beep", "fast": "beep beep beep beep beep"}
    options = (
        "",
        f"look at the {attrs['colour']} {attrs['shape']}",
        f"there goes the {attrs['shape']}, it is going {attrs['motion']}",
        f"{beeps[attrs['rhythm']]}, what a {attrs['pitch']} sound",
    )
    return pick(rng, options)


# ---------------------------------------------------------------------------- pixels


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of ``shape`` given pixel offsets from its centre. dx, dy: [H, W]."""
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * radius
    if shape == "triangle":
        # Apex up at -radius, flat base at +0.75 radius; width grows linearly towards the base.
        depth = (dy + radius) / (1.75 * radius)
        return (depth >= 0) & (depth <= 1) & (np.abs(dx) <= 1.05 * radius * depth)
    if shape == "star":
        rho, theta = np.hypot(dx, dy), np.arctan2(dy, dx) + np.pi / 2
        return rho <= radius * (0.7 + 0.3 * np.cos(5 * theta))
    raise ValueError(f"Unknown shape {shape!r}; expected one of {SAMPLE_ATTRIBUTES['shape']}.")


def motion_path(attrs: dict[str, str], rng: np.random.Generator, n_frames: int, side: int) -> np.ndarray:
    """Centre positions [n_frames, 2] (x, y) sweeping across most of the frame, with jitter."""
    margin = SIZE_FRACTION[attrs["size"]] * side
    dir_x, dir_y = MOTION_DIRECTION[attrs["motion"]]
    along = np.linspace(-1.0, 1.0, n_frames) * rng.uniform(0.25, 0.35) * side  # [T]
    across = rng.uniform(-0.2, 0.2) * side
    centre = side / 2 + rng.uniform(-0.05, 0.05, size=2) * side
    x = centre[0] + dir_x * along + (dir_y != 0) * across
    y = centre[1] + dir_y * along + (dir_x != 0) * across
    return np.clip(np.stack([x, y], axis=1), margin, side - margin)  # [T, 2]


def render_frames(attrs: dict[str, str], rng: np.random.Generator, media: MediaSpec) -> np.ndarray:
    """RGB frames uint8 [T, H, W, 3]: a saturated shape moving over a dark, tinted background."""
    n_frames, side = round(media.fps * media.duration_s), media.frame_size
    background = rng.integers(15, 60, size=3).astype(np.uint8)
    colour = np.array(COLOUR_RGB[attrs["colour"]], dtype=np.uint8)
    radius = SIZE_FRACTION[attrs["size"]] * side * rng.uniform(0.9, 1.1)
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5  # [H, W] pixel centres
    frames = np.empty((n_frames, side, side, 3), dtype=np.uint8)
    for t, (cx, cy) in enumerate(motion_path(attrs, rng, n_frames, side)):
        mask = shape_mask(attrs["shape"], xs - cx, ys - cy, radius)  # [H, W]
        frames[t] = np.where(mask[..., None], colour, background)  # [H, W, 3]
    return frames


# ---------------------------------------------------------------------------- sound


def beep_envelope(rhythm: str, rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """Amplitude gate [N] in [0, 1]: constant, or beeps at 50% duty with 5 ms ramps (no clicks)."""
    rate = BEEPS_PER_SECOND[rhythm]
    if rate == 0:
        return np.ones_like(t)
    phase = (t * rate + rng.uniform(0, 1)) % 1.0  # [N] position inside each beep period
    ramp = 0.005 * rate  # 5 ms as a fraction of the period
    return np.clip(np.minimum(phase, 0.5 - phase) / ramp, 0.0, 1.0)


def synthesize_audio(
    attrs: dict[str, str], rng: np.random.Generator, sample_rate: int, duration_s: float
) -> np.ndarray:
    """Mono float32 waveform [N] in [-1, 1]: a tone of the clip's pitch, rhythm and timbre.

    "buzzing" adds odd harmonics (1/k amplitude) below 7 kHz, so it stays inside a 16 kHz
    recording and shows up as extra mel bands rather than aliasing.
    """
    t = np.arange(round(sample_rate * duration_s)) / sample_rate  # [N] seconds
    f0 = PITCH_HZ[attrs["pitch"]] * rng.uniform(0.97, 1.03)
    ks = [1] if attrs["timbre"] == "pure" else [k for k in (1, 3, 5, 7, 9) if k * f0 < 7000]
    tone = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in ks)  # [N]
    tone = tone / np.max(np.abs(tone))
    noise = rng.normal(0.0, 0.01, size=t.shape)
    return (0.5 * tone * beep_envelope(attrs["rhythm"], rng, t) + noise).astype(np.float32)


def resample_linear(wave: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Linear-interpolation resampling [N] -> [N * dst / src]; fine for tones well below Nyquist."""
    n_out = round(len(wave) * dst_rate / src_rate)
    return np.interp(np.arange(n_out) * src_rate / dst_rate, np.arange(len(wave)), wave).astype(np.float32)


# ---------------------------------------------------------------------------- encoding


def encode_audio_stream(
    container: av.container.OutputContainer, stream, wave: np.ndarray, sample_rate: int
) -> None:
    """Encode a mono float waveform [N] into ``stream`` and mux it (the codec buffers frames)."""
    frame = av.AudioFrame.from_ndarray(wave[None, :], format="fltp", layout="mono")  # [1, N]
    frame.sample_rate, frame.pts = sample_rate, 0
    for packet in [*stream.encode(frame), *stream.encode(None)]:
        container.mux(packet)


def write_mp4(path: Path, frames: np.ndarray, wave: np.ndarray, media: MediaSpec) -> None:
    """Write frames [T, H, W, 3] as H.264 yuv420p plus ``wave`` [N] as an AAC track."""
    with av.open(str(path), mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=media.fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        # x264's macroblock-tree rate control is not reproducible run to run (seen on 96x96
        # clips: the same frames gave different bitstreams); without it output is byte-stable.
        video.options = {"preset": "veryfast", "crf": "20", "x264-params": "mbtree=0"}
        video.codec_context.thread_count = 1  # clips are parallelised across processes instead
        audio = container.add_stream("aac", rate=media.video_sample_rate, layout="mono")
        audio.options = {"aac_coder": "fast"}  # 2x faster than the default; tones need no more
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        encode_audio_stream(container, audio, wave, media.video_sample_rate)


def write_audio_file(path: Path, wave: np.ndarray, sample_rate: int) -> None:
    """Write ``wave`` [N] as MP3 (libmp3lame) or 16-bit PCM WAV, chosen by the suffix."""
    codec = {".mp3": "libmp3lame", ".wav": "pcm_s16le"}[path.suffix]
    with av.open(str(path), mode="w", format=path.suffix[1:]) as container:
        stream = container.add_stream(codec, rate=sample_rate, layout="mono")
        if codec == "libmp3lame":
            stream.options = {"compression_level": "9"}  # lame's fastest search: 3x faster encode
        encode_audio_stream(container, stream, wave, sample_rate)


def generate_clip(spec: ClipSpec, root: Path, media: MediaSpec) -> list[str]:
    """Render, synthesise and encode one clip; returns the written paths relative to ``root``."""
    rng = np.random.default_rng(list(spec.seed))
    frames = render_frames(spec.attributes, rng, media)
    wave = synthesize_audio(spec.attributes, rng, media.video_sample_rate, media.duration_s)
    written = [f"videos/{spec.video_id}.mp4"]
    write_mp4(root / written[0], frames, wave, media)
    if spec.audio_ext is not None:
        written.append(f"audios/{spec.video_id}.{spec.audio_ext}")
        file_wave = resample_linear(wave, media.video_sample_rate, media.audio_file_sample_rate)
        write_audio_file(root / written[1], file_wave, media.audio_file_sample_rate)
    return written


def generate_clips(
    specs: list[ClipSpec], root: Path, media: MediaSpec, workers: int, progress: bool = False
) -> list[str]:
    """Encode all clips, in ``workers`` processes when > 1 (each clip is seeded on its own), with a progress bar."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(specs), desc="generate sample clips", unit="clip", disable=not progress)
    with bar, contextlib.ExitStack() as stack:
        if workers <= 1:
            results = (generate_clip(spec, root, media) for spec in specs)
        else:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
            results = pool.map(
                generate_clip, specs, itertools.repeat(root), itertools.repeat(media), chunksize=4
            )
        written = []
        for paths in results:  # in order, as each clip is done
            written += paths
            bar.update(1)
        return written


# ---------------------------------------------------------------------------- annotations & cache


def make_record(spec: ClipSpec, seed: int) -> dict:
    """Annotation record in the real datasets' format plus ``label`` and ``attributes``."""
    rng = np.random.default_rng([seed, 2, *spec.seed[1:]])
    return {
        "video_id": spec.video_id,
        "desc": make_caption(spec.attributes, rng),
        "subtitle": make_subtitle(spec.attributes, rng),
        "label": spec.attributes[LABEL_ATTRIBUTE],
        "attributes": dict(spec.attributes),
    }


def write_json(path: Path, payload) -> None:
    """Write JSON with a fixed layout, so equal content means equal bytes."""
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def manifest_key(seed: int, num_train: int, num_test: int, media: MediaSpec) -> dict:
    """Everything that determines the generated content: an equal key means an equal dataset."""
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_test": num_test,
        "media": asdict(media),
    }


def load_manifest(root: Path) -> dict | None:
    """The existing ``manifest.json``, or None when absent or unreadable (then regenerate)."""
    try:
        return json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_cached(root: Path, manifest: dict | None, key: dict) -> bool:
    """True if ``manifest`` matches ``key`` and every file it lists still exists."""
    if manifest is None or manifest.get("key") != key:
        return False
    return all((root / rel).is_file() for rel in manifest.get("files", []))


def remove_listed_files(root: Path, manifest: dict | None) -> None:
    """Delete the files an earlier generation wrote (only those, never anything else in root)."""
    for rel in (manifest or {}).get("files", []):
        (root / rel).unlink(missing_ok=True)


def summary(root: Path, manifest: dict, generated: bool) -> dict:
    """What callers need: the folders and files, the counts, and whether this call wrote them."""
    return {
        "root": root,
        "videos": root / "videos",
        "audios": root / "audios",
        "annotations": {split: root / "annotations" / f"{split}.json" for split in ("train", "test")},
        "vocab": root / "tokenizer" / "vocab.txt",
        "manifest": root / "manifest.json",
        "generated": generated,
        **manifest["counts"],
    }


def generate_sample_dataset(
    root: str | Path,
    num_train: int = 600,
    num_test: int = 100,
    seed: int = 0,
    force: bool = False,
    workers: int | None = None,
    media: MediaSpec | None = None,
    progress: bool = False,
) -> dict:
    """Generate (or reuse) the sample dataset under ``root``; see the module docstring for the layout.

    Args:
        root: output folder (created).
        num_train, num_test: clips per split; test clips have distinct attribute combinations.
        seed: everything is derived from it; same seed -> identical dataset.
        force: regenerate even if an identical manifest exists.
        workers: encoding processes (default: up to 2, the CPU count); output does not depend on it.
        media: frame size, fps, duration and sample rates.
        progress: show a progress bar while encoding (the default run's data takes a minute or two).

    Returns:
        dict with ``root``, ``videos``, ``audios``, ``annotations`` ({split: path}), ``vocab``,
        ``manifest``, ``generated`` (False when the cache was used) and the counts
        ``num_train``, ``num_test``, ``num_audio_files``, ``num_without_audio_file``.
    """
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train={num_train} and num_test={num_test} must both be >= 1.")
    root, media = Path(root), media or MediaSpec()
    key = manifest_key(seed, num_train, num_test, media)
    previous = load_manifest(root)
    if not force and is_cached(root, previous, key):
        return summary(root, previous, generated=False)
    remove_listed_files(root, previous)
    (root / "manifest.json").unlink(missing_ok=True)  # an interrupted run must not look complete
    log.info("generating the sample dataset (%d train + %d test clips) in %s; later runs reuse it",
             num_train, num_test, root)
    manifest = write_dataset(
        root, seed, num_train, num_test, media, workers or min(2, os.cpu_count() or 1), progress
    )
    write_json(root / "manifest.json", {"key": key, **manifest})
    return summary(root, manifest, generated=True)


def write_dataset(
    root: Path, seed: int, num_train: int, num_test: int, media: MediaSpec, workers: int,
    progress: bool = False,
) -> dict:
    """Write media, annotations and vocabulary; returns the manifest's ``counts`` and ``files``."""
    splits = {
        "train": build_clip_specs(seed, "train", 0, num_train, distinct=False),
        "test": build_clip_specs(seed, "test", num_train, num_test, distinct=True),
    }
    for folder in ("videos", "audios", "annotations"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    all_specs = splits["train"] + splits["test"]
    files = generate_clips(all_specs, root, media, workers, progress)
    records = {split: [make_record(spec, seed) for spec in specs] for split, specs in splits.items()}
    for split, split_records in records.items():
        write_json(root / "annotations" / f"{split}.json", split_records)
        files.append(f"annotations/{split}.json")
    texts = [text for rec in records["train"] for text in (rec["desc"], rec["subtitle"])]
    vocab = train_wordpiece_vocab(texts, root / "tokenizer", vocab_size=1000)
    files.append(vocab.relative_to(root).as_posix())
    n_audio = sum(spec.audio_ext is not None for spec in all_specs)
    counts = {
        "num_train": num_train,
        "num_test": num_test,
        "num_audio_files": n_audio,
        "num_without_audio_file": len(all_specs) - n_audio,
    }
    return {"counts": counts, "files": files}
