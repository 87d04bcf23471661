"""Text-to-video search over a folder of your own clips with a trained GRAM model.

    python scripts/retrieve.py --checkpoint outputs/run --videos my_clips/ --query "a dog barks" --query "rain"
    python scripts/retrieve.py --checkpoint outputs/run --videos my_clips/ --save-index clips.safetensors < queries.txt
    python scripts/retrieve.py --checkpoint outputs/run --index clips.safetensors --query "a dog barks" --json

Each video's audio is the file with the same stem in --audio-dir when there is one, else the video's own
track (silence, with a warning, when it has none). Candidates are ranked by the GRAM volume of (query, video,
audio, ...) (smaller = better) and, for comparison, by the cosine of the query with the video alone.

A clip that cannot be decoded (or is truncated) is left out of the index and listed; the others are indexed.
An index remembers the sha256 of the weights it was built with and is refused with other weights
(--allow-other-weights uses it anyway, with a warning). --json prints the results as one JSON document.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gram.cli import ArgumentParser, UserError, positive_int, run_with_clear_errors

if TYPE_CHECKING:  # torch loads after the arguments are parsed: --help answers at once
    import torch

    from gram.inference import GramPredictor

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
AUDIO_EXTENSIONS = (".mp3", ".wav", ".m4a", ".flac", ".ogg", ".aac")
PATHS_KEY = "paths"
WEIGHTS_KEY = "weights_sha256"
SKIPPED_KEY = "skipped"


class IndexMismatchError(UserError, ValueError):
    """A saved index does not fit the model it is queried with."""


def find_files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    """Files of ``folder`` with one of ``extensions`` (case-insensitive), sorted by name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)


def audio_sources(videos: Sequence[Path], audio_dir: Path | None) -> list[Path]:
    """For each video its same-stem audio file in ``audio_dir``, else the video itself (its own track)."""
    by_stem = {p.stem: p for p in find_files(audio_dir, AUDIO_EXTENSIONS)} if audio_dir else {}
    return [by_stem.get(v.stem, v) for v in videos]


def build_index(predictor: GramPredictor, videos: Sequence[Path], audio_dir: Path | None,
                skipped: dict[str, str] | None = None) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """({data modality: (N, D)}, the N videos indexed), in ``videos`` order.

    A clip whose video or audio cannot be read (undecodable, truncated, empty) or whose embedding is not finite is
    left out; its path and the reason go into ``skipped``. Raises when no clip at all can be indexed.
    """
    import torch

    from gram.data.errors import MediaError

    sources = {"video": list(videos), "audio": audio_sources(videos, audio_dir)}
    unsupported = [m for m in predictor.modalities if m not in sources]
    if unsupported:
        raise UserError(f"this demo indexes video and audio; the model also needs {unsupported}")
    loaders = {"video": predictor.video_input, "audio": predictor.audio_input}
    skipped = {} if skipped is None else skipped
    parts: dict[str, list[torch.Tensor]] = {m: [] for m in predictor.modalities}
    kept: list[Path] = []
    for start in range(0, len(videos), predictor.batch_size):
        inputs: dict[str, list[torch.Tensor]] = {m: [] for m in predictor.modalities}
        chunk: list[Path] = []
        for i in range(start, min(start + predictor.batch_size, len(videos))):
            try:
                loaded = {m: loaders[m](sources[m][i]) for m in predictor.modalities}
            except MediaError as err:
                skipped[str(videos[i])] = str(err)
                continue
            chunk.append(videos[i])
            for m, x in loaded.items():
                inputs[m].append(x)
        if not chunk:
            continue
        rows = {m: predictor.encode(m, inputs[m]) for m in predictor.modalities}
        finite = torch.stack([torch.isfinite(r).all(dim=1) for r in rows.values()]).all(dim=0)
        for i in (~finite).nonzero().flatten().tolist():
            skipped[str(chunk[i])] = "non-finite (NaN/inf) embedding (NaN samples in the file?)"
        for m, r in rows.items():
            parts[m].append(r[finite])
        kept += [v for v, ok in zip(chunk, finite.tolist()) if ok]
    if not kept:
        first = next(iter(skipped.items()), ("", ""))
        raise UserError(f"none of the {len(videos)} videos could be indexed (first: {first[0]}: {first[1]})")
    return {m: torch.cat(p) for m, p in parts.items()}, kept


def weights_sha256(checkpoint: str, predictor: GramPredictor) -> str:
    """sha256 of the checkpoint's weights file (as results.json reports it); for a checkpoint that is not a local
    folder or file, of the loaded weights' bytes in name order."""
    import torch

    from gram import checkpoint_format as ckpt
    from gram.provenance import file_sha256

    try:
        weights = ckpt.resolve_checkpoint(checkpoint) / ckpt.WEIGHTS
    except FileNotFoundError:
        weights = None
    if weights is not None and weights.is_file():
        return file_sha256(weights)
    digest = hashlib.sha256()
    for name, tensor in sorted(predictor.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_index(path: Path, embeddings: dict[str, torch.Tensor], videos: Sequence[Path], checkpoint: str,
               weights: str, skipped: dict[str, str] | None = None) -> None:
    """Embeddings as safetensors; the video paths, the checkpoint, the weights' sha256 and the clips left out go in
    its string metadata."""
    from safetensors.torch import save_file

    meta = {PATHS_KEY: json.dumps([str(v) for v in videos]), "checkpoint": str(checkpoint), WEIGHTS_KEY: weights,
            SKIPPED_KEY: json.dumps(skipped or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({m: e.cpu().contiguous() for m, e in embeddings.items()}, str(path), metadata=meta)


def load_index(path: Path, predictor: GramPredictor, weights: str | None = None, checkpoint: str | None = None,
               allow_other_weights: bool = False) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """(embeddings on the model's device, video paths) of a saved index, checked against the model: its
    modalities and width, and (given ``weights``) the sha256 of the weights it was built with."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"--index {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        embeddings = load_file(str(path), device=str(predictor.device))
    except (SafetensorError, OSError) as err:
        raise IndexMismatchError(f"--index {path}: not a readable safetensors index ({err})") from err
    if PATHS_KEY not in meta:
        raise IndexMismatchError(f"--index {path}: no video paths in its metadata; it was not written by "
                                 f"--save-index")
    missing = [m for m in predictor.modalities if m not in embeddings]
    if missing or any(e.shape[1] != predictor.embed_dim for e in embeddings.values()):
        raise IndexMismatchError(f"--index {path} holds {{{', '.join(f'{m}: {tuple(e.shape)}' for m, e in embeddings.items())}}}"
                                 f" but the model needs {list(predictor.modalities)} of width {predictor.embed_dim}; "
                                 f"re-index with this checkpoint")
    built_with = meta.get(WEIGHTS_KEY)
    if weights is not None and built_with != weights:
        said = (f"was built with weights sha256 {built_with[:16]} ({meta.get('checkpoint', '?')})" if built_with
                else "records no weights hash (written by an older version)")
        message = (f"--index {path} {said} but --checkpoint {checkpoint} has weights sha256 {weights[:16]}: its "
                   f"embeddings do not match this model's queries")
        if not allow_other_weights:
            raise IndexMismatchError(f"{message}; re-index with --videos, or pass --allow-other-weights")
        print(f"warning: {message} (used anyway: --allow-other-weights)", file=sys.stderr)
    return {m: embeddings[m] for m in predictor.modalities}, [Path(p) for p in json.loads(meta[PATHS_KEY])]


def rank(predictor: GramPredictor, queries: torch.Tensor, index: dict[str, torch.Tensor],
         top_k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Top-k (values, indices), each (Q, k), by volume over all data modalities and by cosine with the video."""
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
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


def results_json(queries: Sequence[str], ranked: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 videos: Sequence[Path], info: dict[str, Any]) -> dict[str, Any]:
    """The --json document: ``info`` (checkpoint, weights hash, index, skipped clips) and, per query and ranking,
    the top-k as ``{"rank", "video", "path", "value"}`` (volume: smaller is better; cosine: larger)."""
    out = []
    for q, query in enumerate(queries):
        rankings = {name: [{"rank": r + 1, "video": videos[int(i)].stem, "path": str(videos[int(i)]),
                            "value": round(float(values[q, r]), 6)} for r, i in enumerate(indices[q].tolist())]
                    for name, (values, indices) in ranked.items()}
        out.append({"query": query, "rankings": rankings})
    return {**info, "queries": out}


def read_queries(args: argparse.Namespace) -> list[str]:
    """--query values, else one query per non-empty stdin line (not read from a terminal)."""
    if args.query:
        return args.query
    return [] if sys.stdin.isatty() else [line.strip() for line in sys.stdin if line.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or training output dir")
    p.add_argument("--videos", type=Path, help="folder of videos to index")
    p.add_argument("--audio-dir", type=Path, help="folder of audio files named like the videos (optional)")
    p.add_argument("--index", type=Path, help="reuse an index written by --save-index (no re-embedding)")
    p.add_argument("--save-index", type=Path, help="write the index (safetensors) to this file")
    p.add_argument("--query", action="append", help="a text query (repeatable); default: one per stdin line")
    p.add_argument("--top-k", type=positive_int, default=5, help="results per query and ranking (>= 1)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON document on stdout")
    p.add_argument("--allow-other-weights", action="store_true",
                   help="use an --index built with other weights than --checkpoint's (warns)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--tokenizer", help="the run's vocab.txt (or its folder) if its config's path is not found here")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--preprocessing", choices=("reference", "accurate"),
                   help="override the preprocessing preset the checkpoint records (warns; default: the recorded one)")
    args = p.parse_args(argv)
    if (args.videos is None) == (args.index is None):
        p.error("pass exactly one of --videos (index a folder) and --index (reuse a saved index)")
    if args.videos is not None and not args.videos.is_dir():
        p.error(f"--videos {args.videos}: not a folder")
    if args.audio_dir is not None and not args.audio_dir.is_dir():
        p.error(f"--audio-dir {args.audio_dir}: not a folder")
    if args.index is not None and not args.index.is_file():
        p.error(f"--index {args.index}: no such file")
    return args


def main(argv: Sequence[str] | None = None) -> tuple[list[Path], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Index (or load an index), then rank; returns (video paths, {ranking: (values (Q, k), indices (Q, k))})."""
    args = parse_args(argv)
    from gram.inference import load_model

    predictor = load_model(args.checkpoint, device=args.device, tokenizer=args.tokenizer, batch_size=args.batch_size,
                           preprocessing=args.preprocessing)
    print(f"preprocessing preset: {predictor.data.preprocessing}", file=sys.stderr)
    weights = weights_sha256(args.checkpoint, predictor)
    skipped: dict[str, str] = {}
    if args.index is not None:
        index, videos = load_index(args.index, predictor, weights, args.checkpoint, args.allow_other_weights)
    else:
        found = find_files(args.videos, VIDEO_EXTENSIONS)
        if not found:
            raise UserError(f"--videos {args.videos}: no video files ({', '.join(VIDEO_EXTENSIONS)})")
        index, videos = build_index(predictor, found, args.audio_dir, skipped)
        for path, reason in skipped.items():
            print(f"skipped {path}: {' '.join(reason.split())}", file=sys.stderr)
        print(f"indexed {len(videos)} of {len(found)} videos from {args.videos}"
              + (f" ({len(skipped)} skipped, listed above)" if skipped else ""), file=sys.stderr)
    if args.save_index is not None:
        save_index(args.save_index, index, videos, args.checkpoint, weights, skipped)
        print(f"wrote index {args.save_index}", file=sys.stderr)
    queries = read_queries(args)
    if not queries:
        if args.save_index is not None:
            return videos, {}
        raise UserError("no queries: pass --query TEXT (repeatable) or one query per line on stdin")
    ranked = rank(predictor, predictor.encode_text(queries), index, args.top_k)
    if args.json:
        info = {"checkpoint": str(args.checkpoint), "weights_sha256": weights,
                "index": str(args.index) if args.index else None, "n_videos": len(videos), "skipped": skipped}
        print(json.dumps(results_json(queries, ranked, videos, info), indent=2))
    else:
        print(format_results(queries, ranked, videos))
    return videos, ranked


if __name__ == "__main__":
    run_with_clear_errors(main)
