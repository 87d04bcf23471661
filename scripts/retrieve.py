"""Text-to-video search over a folder of your own clips with a trained GRAM model.

    python scripts/retrieve.py --checkpoint outputs/run --videos my_clips/ --query "a dog barks" --query "rain"
    python scripts/retrieve.py --checkpoint outputs/run --videos my_clips/ --save-index clips.safetensors < queries.txt
    python scripts/retrieve.py --checkpoint outputs/run --index clips.safetensors --query "a dog barks"

Each video's audio is the file with the same stem in --audio-dir when there is one, else the video's own
track (silence, with a warning, when it has none). Candidates are ranked by the GRAM volume of (query, video,
audio, ...) (smaller = better) and, for comparison, by the cosine of the query with the video alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gram.inference import GramPredictor, load_model

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
AUDIO_EXTENSIONS = (".mp3", ".wav", ".m4a", ".flac", ".ogg", ".aac")
PATHS_KEY = "paths"


class IndexMismatchError(ValueError):
    """A saved index does not fit the model it is queried with."""


def find_files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    """Files of ``folder`` with one of ``extensions`` (case-insensitive), sorted by name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--videos {folder}: not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)


def audio_sources(videos: Sequence[Path], audio_dir: Path | None) -> list[Path]:
    """For each video its same-stem audio file in ``audio_dir``, else the video itself (its own track)."""
    by_stem = {p.stem: p for p in find_files(audio_dir, AUDIO_EXTENSIONS)} if audio_dir else {}
    return [by_stem.get(v.stem, v) for v in videos]


def build_index(predictor: GramPredictor, videos: Sequence[Path], audio_dir: Path | None) -> dict[str, torch.Tensor]:
    """{data modality: (N, D)} embeddings of the videos (and their audio) in ``videos`` order."""
    sources = {"video": list(videos), "audio": audio_sources(videos, audio_dir)}
    unsupported = [m for m in predictor.modalities if m not in sources]
    if unsupported:
        raise ValueError(f"this demo indexes video and audio; the model also needs {unsupported}")
    return {m: predictor.encode(m, sources[m]) for m in predictor.modalities}


def save_index(path: Path, embeddings: dict[str, torch.Tensor], videos: Sequence[Path], checkpoint: str) -> None:
    """Embeddings as safetensors; the video paths and the checkpoint go in its string metadata."""
    meta = {PATHS_KEY: json.dumps([str(v) for v in videos]), "checkpoint": str(checkpoint)}
    save_file({m: e.cpu().contiguous() for m, e in embeddings.items()}, str(path), metadata=meta)


def load_index(path: Path, predictor: GramPredictor) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """(embeddings on the model's device, video paths) of a saved index, checked against the model."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if PATHS_KEY not in meta:
        raise IndexMismatchError(f"--index {path}: no video paths in its metadata; it was not written by "
                                 f"--save-index")
    embeddings = load_file(str(path), device=str(predictor.device))
    missing = [m for m in predictor.modalities if m not in embeddings]
    if missing or any(e.shape[1] != predictor.embed_dim for e in embeddings.values()):
        raise IndexMismatchError(f"--index {path} holds {{{', '.join(f'{m}: {tuple(e.shape)}' for m, e in embeddings.items())}}}"
                                 f" but the model needs {list(predictor.modalities)} of width {predictor.embed_dim}; "
                                 f"re-index with this checkpoint")
    return {m: embeddings[m] for m in predictor.modalities}, [Path(p) for p in json.loads(meta[PATHS_KEY])]


def rank(predictor: GramPredictor, queries: torch.Tensor, index: dict[str, torch.Tensor],
         top_k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Top-k (values, indices), each (Q, k), by volume over all data modalities and by cosine with the video."""
    k = min(top_k, next(iter(index.values())).shape[0])
    data = [index[m] for m in predictor.modalities]
    first = predictor.modalities[0]
    out = {"volume": predictor.score(queries, *data, kind="volume").topk(k, dim=1),
           f"cosine_{first}": predictor.score(queries, index[first], kind="cosine").topk(k, dim=1)}
    # Report the volume itself (smaller = better), not the score -volume.
    return {name: (-v if name == "volume" else v, i) for name, (v, i) in out.items()}


def format_results(queries: Sequence[str], ranked: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   videos: Sequence[Path]) -> str:
    """One table per query: rank, then name and value per ranking, side by side."""
    names = list(ranked)
    width = max([len(v.name) for v in videos] + [12])
    blocks = []
    for q, query in enumerate(queries):
        header = "rank | " + " | ".join(f"{name:<{width}} {'value':>8}" for name in names)
        lines = [f"query: {query}", header, "-" * len(header)]
        for r in range(ranked[names[0]][1].shape[1]):
            cells = [f"{videos[int(ranked[n][1][q, r])].name:<{width}} {float(ranked[n][0][q, r]):>8.4f}"
                     for n in names]
            lines.append(f"{r + 1:>4} | " + " | ".join(cells))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def read_queries(args: argparse.Namespace) -> list[str]:
    """--query values, else one query per non-empty stdin line (not read from a terminal)."""
    if args.query:
        return args.query
    return [] if sys.stdin.isatty() else [line.strip() for line in sys.stdin if line.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or training output dir")
    p.add_argument("--videos", type=Path, help="folder of videos to index")
    p.add_argument("--audio-dir", type=Path, help="folder of audio files named like the videos (optional)")
    p.add_argument("--index", type=Path, help="reuse an index written by --save-index (no re-embedding)")
    p.add_argument("--save-index", type=Path, help="write the index (safetensors) to this file")
    p.add_argument("--query", action="append", help="a text query (repeatable); default: one per stdin line")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--tokenizer", help="the run's vocab.txt (or its folder) if its config's path is not found here")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--preprocessing", choices=("reference", "accurate"),
                   help="override the preprocessing preset the checkpoint records (warns; default: the recorded one)")
    args = p.parse_args(argv)
    if (args.videos is None) == (args.index is None):
        p.error("pass exactly one of --videos (index a folder) and --index (reuse a saved index)")
    return args


def main(argv: Sequence[str] | None = None) -> tuple[list[Path], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Index (or load an index), then rank; returns (video paths, {ranking: (values (Q, k), indices (Q, k))})."""
    args = parse_args(argv)
    predictor = load_model(args.checkpoint, device=args.device, tokenizer=args.tokenizer, batch_size=args.batch_size,
                           preprocessing=args.preprocessing)
    print(f"preprocessing preset: {predictor.data.preprocessing}", file=sys.stderr)
    if args.index is not None:
        index, videos = load_index(args.index, predictor)
    else:
        videos = find_files(args.videos, VIDEO_EXTENSIONS)
        if not videos:
            raise SystemExit(f"--videos {args.videos}: no video files ({', '.join(VIDEO_EXTENSIONS)})")
        index = build_index(predictor, videos, args.audio_dir)
        print(f"indexed {len(videos)} videos from {args.videos}", file=sys.stderr)
    if args.save_index is not None:
        save_index(args.save_index, index, videos, args.checkpoint)
        print(f"wrote index {args.save_index}", file=sys.stderr)
    queries = read_queries(args)
    if not queries:
        if args.save_index is not None:
            return videos, {}
        raise SystemExit("no queries: pass --query TEXT (repeatable) or one query per line on stdin")
    ranked = rank(predictor, predictor.encode_text(queries), index, args.top_k)
    print(format_results(queries, ranked, videos))
    return videos, ranked


if __name__ == "__main__":
    main()
