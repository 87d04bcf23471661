"""Download the encoder weights GRAM starts from into pretrained_weights/ (needs network access).

    python scripts/download_weights.py                 # everything
    python scripts/download_weights.py --only bert     # one encoder (eva, beats, bert)

Files that already exist are kept. BEATs is not on the Hugging Face hub under an official name: pass the link
from Microsoft's unilm BEATs README with --beats-url (or put the file in place by hand).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gram.cli import run_with_clear_errors

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class HubFile:
    repo: str
    filename: str
    target: str  # relative to the weights folder


HUB_FILES = {
    "eva": [HubFile("QuanSun/EVA-CLIP", "EVA01_CLIP_g_14_psz14_s11B.pt", "clip/EVA01_CLIP_g_14_psz14_s11B.pt")],
    "bert": [HubFile("google-bert/bert-base-uncased", name, f"bert/bert-base-uncased/{name}")
             for name in ("config.json", "vocab.txt", "model.safetensors")],
}
BEATS_TARGET = "beats/BEATs_iter3_plus_AS2M.pt"


def fetch_hub(item: HubFile, weights_dir: Path) -> Path:
    from huggingface_hub import hf_hub_download

    target = weights_dir / item.target
    if target.exists():
        print(f"keep     {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    cached = hf_hub_download(repo_id=item.repo, filename=item.filename)
    shutil.copyfile(cached, target)
    print(f"download {item.repo}/{item.filename} -> {target}")
    return target


def fetch_url(url: str, target: Path) -> Path:
    if target.exists():
        print(f"keep     {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")  # a broken download never looks complete
    urllib.request.urlretrieve(url, partial)
    partial.replace(target)
    print(f"download {url} -> {target}")
    return target


def download(weights_dir: Path, only: list[str], beats_url: str | None) -> list[Path]:
    done = [fetch_hub(item, weights_dir) for name in only if name in HUB_FILES for item in HUB_FILES[name]]
    if "beats" in only:
        target = weights_dir / BEATS_TARGET
        if beats_url:
            done.append(fetch_url(beats_url, target))
        elif target.exists():
            done.append(target)
        else:
            print(f"skip     BEATs: pass --beats-url (see pretrained_weights/README.md, section BEATs) or put the "
                  f"file at {target}", file=sys.stderr)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights-dir", type=Path, default=ROOT / "pretrained_weights")
    parser.add_argument("--only", nargs="+", choices=["eva", "beats", "bert"], default=["eva", "beats", "bert"])
    parser.add_argument("--beats-url", default=None, help="download link of BEATs_iter3_plus_AS2M.pt")
    args = parser.parse_args(argv)
    download(args.weights_dir, args.only, args.beats_url)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_with_clear_errors(main))
