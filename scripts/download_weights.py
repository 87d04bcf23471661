#!/usr/bin/env python
"""Fetch released GRAM checkpoints and encoder weights by name into pretrained_weights/ (needs network access).

    python scripts/download_weights.py --list                # every name, its size, use and whether it is here
    python scripts/download_weights.py encoders              # EVA01-CLIP-g/14, BEATs and BERT-base
    python scripts/download_weights.py gram-pretrained-tvas  # a released GRAM model, converted for gram
    python scripts/download_weights.py gram-pretrained-tvas --modalities video audio   # converted for T-VA
    python scripts/download_weights.py --verify              # check sizes and checksums of what is here

Names: `gram.list_pretrained()`; the groups `encoders` and `gram` stand for all of either kind. Files already
in place are kept; a download goes to a temporary name and is renamed only once its size and checksum match,
so an interrupted one never looks complete. GRAM models come as Google Drive folders (gdown: `pip install -e
.[download]`) and are converted into gram's checkpoint format (`pretrained_weights/gram/<name>/`) with
convert_checkpoint.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

GROUPS = ("encoders", "gram")
ENCODER_DEFAULTS = ("eva01-clip-g-14", "beats-iter3-plus-as2m", "bert-base-uncased")

ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help="registry names, or the groups: encoders, gram")
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="weights folder (default: $GRAM_WEIGHTS_DIR, else ./pretrained_weights)")
    parser.add_argument("--modalities", nargs="+", default=None, choices=("video", "audio", "subtitle", "depth"),
                        help="GRAM names: convert for these data modalities (default: the release's own)")
    parser.add_argument("--list", action="store_true", help="list the names and what is present; download nothing")
    parser.add_argument("--verify", action="store_true", help="check sizes and sha256 of the present files")
    return parser


def expand(names: list[str]) -> list[str]:
    from gram.pretrained import get_pretrained, list_pretrained

    out: list[str] = []
    for name in names:
        if name == "encoders":
            out += ENCODER_DEFAULTS
        elif name == "gram":
            out += list_pretrained("gram")
        else:
            out.append(get_pretrained(name).name)  # unknown names fail here, before any download
    return list(dict.fromkeys(out))


def print_list(weights_dir: Path | None) -> None:
    from gram.pretrained import default_weights_dir, describe

    root = weights_dir or default_weights_dir()
    rows = describe(root)
    width = max(len(r.name) for r in rows)
    print(f"weights folder: {root}")
    for r in rows:
        mark = "here   " if r.present else "missing"
        print(f"{mark}  {r.name:<{width}}  {r.kind:<7}  {r.modalities or '-':<24} {r.size}")
        made_by = f"; result of experiment={r.reproduces}" if r.reproduces else ""
        print(f"{'':<9}{'':<{width}}  used as {r.used_as}{made_by}; {r.source}")


def verify(names: list[str], weights_dir: Path | None) -> int:
    from gram.pretrained import check_files, expected_path, get_pretrained

    bad = 0
    for name in names:
        entry = get_pretrained(name)
        path = expected_path(name, weights_dir)
        if not path.exists():
            print(f"missing  {name}: {path}")
            continue
        problems = check_files(path, entry.files, hash_files=True)
        known = [s.name or path.name for s in entry.files if s.sha256]
        state = "; ".join(problems) if problems else (f"ok (sha256 checked: {', '.join(known)})" if known
                                                       else "ok (sizes only; no published checksum)")
        bad += bool(problems)
        print(f"{'BAD     ' if problems else 'ok      '}{name}: {state}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from gram.pretrained import list_pretrained, resolve_pretrained

    if args.list or not (args.names or args.verify):
        print_list(args.weights_dir)
        if not args.list:
            print("\npass names (or the groups encoders, gram) to download them", file=sys.stderr)
        return 0
    names = expand(args.names) if args.names else list_pretrained()
    if args.verify:
        return verify(names, args.weights_dir)
    for name in names:
        modalities = args.modalities if name in list_pretrained("gram") else None
        path = resolve_pretrained(name, args.weights_dir, modalities=modalities)  # GRAM_OFFLINE=1 is honoured
        print(f"ready    {name}: {path}")
    return 0


if __name__ == "__main__":
    parsed = build_parser().parse_args()  # before importing gram (torch): --help and usage errors stay instant
    from gram.cli import run_with_clear_errors

    sys.exit(run_with_clear_errors(lambda: run(parsed)))
