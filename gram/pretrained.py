"""Weights by name: the released GRAM checkpoints and the encoder weights GRAM starts from.

    gram.list_pretrained()                           # ['gram-pretrained-tvas', ..., 'bert-base-uncased']
    gram.load_model("gram-finetuned-msrvtt")         # a released model, converted on first use
    python run.py experiment=finetune_msrvtt_tvas init_from=gram-pretrained-tvas
    python scripts/download_weights.py gram-pretrained-tvas eva01-clip-g-14

A name resolves, in this order, to
1. the path in its environment variable (``GRAM_WEIGHTS_<NAME>``, upper case, ``-`` as ``_``), if set;
2. its file or folder under the weights folder (``weights_dir`` argument / ``paths.weights_dir``, else
   ``$GRAM_WEIGHTS_DIR``, else ``./pretrained_weights``, else the source checkout's ``pretrained_weights/``),
   checked for completeness (every file present, sizes as published); a released GRAM folder found there
   but not yet converted is converted into gram's checkpoint format first;
3. a download, unless ``download=False`` or ``GRAM_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``: into a temporary name
   beside the target, size- and checksum-verified, then renamed, so an interrupted download never looks complete;
4. otherwise :class:`PretrainedNotFoundError`: one message naming the name, the expected path and the download
   command.

Sizes and checksums are the published ones where known, ``None`` where not (never guessed). This module
imports neither torch nor open_clip, so listing names and ``--help`` stay instant.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gram.provenance import file_sha256

REPO_ROOT = Path(__file__).resolve().parents[1]
DOWNLOAD_COMMAND = "python scripts/download_weights.py"
PARTIAL = ".partial"
GRAM_KIND, ENCODER_KIND = "gram", "encoder"


class PretrainedError(ValueError):
    """A pretrained name that cannot be used (unknown, missing, incomplete or failing its checksum)."""


class UnknownPretrainedError(PretrainedError):
    pass


class PretrainedNotFoundError(PretrainedError, FileNotFoundError):
    pass


class ChecksumError(PretrainedError):
    pass


class DownloadUnavailableError(PretrainedError):
    """No network, a missing optional downloader (gdown), or a failed transfer."""


@dataclass(frozen=True)
class FileSpec:
    """One file of a release, relative to its folder (or the file itself: ``name=""``).

    ``alternatives``: other names that stand in for it (e.g. ``pytorch_model.bin`` for ``model.safetensors``); a
    glob ``name`` (``ckpt/*.pt``) needs at least one match. ``size`` in bytes and ``sha256`` as published, or None.
    """

    name: str
    size: int | None = None
    sha256: str | None = None
    alternatives: tuple[str, ...] = ()


@dataclass(frozen=True)
class Source:
    """Where a release comes from. ``kind``: ``url`` (a direct link), ``hf`` (Hugging Face hub files),
    ``open_clip`` (open_clip's pretrained registry, ``repo`` = model name, ``tag`` = pretrained tag) or
    ``gdrive_folder`` (a public Google Drive folder, needs gdown: the ``download`` extra)."""

    kind: str
    url: str
    repo: str = ""
    tag: str = ""
    files: tuple[str, ...] = ()  # hf: the files to fetch into the folder
    page: str = ""  # where a person finds the link (when ``url`` itself is not for reading, e.g. a signed link)

    @property
    def where(self) -> str:
        return self.page or self.url


@dataclass(frozen=True)
class Pretrained:
    """A registry entry.

    ``path``: where gram looks for it under the weights folder: a file, or a folder. For GRAM entries it is the
    converted gram checkpoint folder (``model.safetensors`` + ``config.json``) and ``download_path`` the released
    folder (``ckpt/model_step_*.pt`` + ``log/hps.json``) that is converted into it.
    """

    name: str
    kind: str
    description: str
    path: str
    files: tuple[FileSpec, ...]
    source: Source
    modalities: tuple[str, ...] = ()
    experiments: tuple[str, ...] = ()  # configs/experiment files that start from it (init_from) or need it
    reproduces: str = ""  # GRAM entries: the configs/experiment file whose result it is
    used_as: str = ""
    download_path: str = ""
    reference_name: str = ""
    paper_r1: str = ""
    size_note: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def env_var(self) -> str:
        return "GRAM_WEIGHTS_" + re.sub(r"[^A-Z0-9]", "_", self.name.upper())

    @property
    def is_folder(self) -> bool:
        return any(spec.name for spec in self.files)

    @property
    def total_size(self) -> int | None:
        sizes = [spec.size for spec in self.files]
        return None if any(s is None for s in sizes) else sum(sizes)


# ------------------------------------------------------------------------------------------ the registry
# Model zoo of the reference (ispamm/GRAM README, "MODEL ZOO"): one public Google Drive folder per model, each
# holding ckpt/model_step_*.pt (flat reference state dicts) and log/hps.json. No sizes or checksums are
# published. The README names the first two "5modalities" / "4modalities" while their data columns say TVAS /
# TVASD; the data column and the R@1 (54.8 = the paper's zero-shot T-VAS) agree, so they are mapped by it.
_GDRIVE = "https://drive.google.com/drive/folders/"
_RELEASED_FILES = (FileSpec("ckpt/*.pt"), FileSpec("log/hps.json"))
# Estimated from ../shared/reference/gram-checkpoint-keys.tsv: 1,397,371,752 float32 values = 5.59 GB as stored.
_GRAM_SIZE_NOTE = "about 5.6 GB (estimate from the reference's key list, float32; not measured)"
_FINETUNE_EXPERIMENTS = ("finetune_msrvtt_tvas", "finetune_vatex_tvas", "finetune_didemo_tva",
                         "finetune_activitynet_tva")


def _gram(name: str, reference_name: str, folder_id: str, modalities: tuple[str, ...], description: str,
          reproduces: str, experiments: tuple[str, ...], used_as: str, paper_r1: str) -> Pretrained:
    short = name.removeprefix("gram-").replace("-", "_")
    return Pretrained(
        name=name, kind=GRAM_KIND, description=description, path=f"gram/{short}",
        files=(FileSpec("model.safetensors"), FileSpec("config.json")),
        source=Source("gdrive_folder", _GDRIVE + folder_id), modalities=modalities, experiments=experiments,
        reproduces=reproduces,
        used_as=used_as, download_path=f"gram/released/{reference_name}", reference_name=reference_name,
        paper_r1=paper_r1, size_note=_GRAM_SIZE_NOTE, aliases=(reference_name,))


_ENTRIES = (
    _gram("gram-pretrained-tvas", "GRAM_pretrained_5modalities", "1T6IFymtJ8mKeO_amz9Kz1OFgHZEK6huz",
          ("video", "audio", "subtitle"), "GRAM after VAST-27M 150k-subset training with the T-VAS volume",
          "pretrain_vast150k_tvas", _FINETUNE_EXPERIMENTS,
          "init_from (finetuning); mode=test checkpoint= (zero-shot)", "MSR-VTT zero-shot t2v 54.8"),
    _gram("gram-pretrained-tvasd", "GRAM_pretrained_4modalities", "1mD9PDvugLx3t1KtTCwJtYO8VZDFKfMgs",
          ("video", "audio", "subtitle", "depth"),
          "GRAM after VAST-27M 150k-subset training with the T-VASD volume (with depth)",
          "pretrain_vast150k_tvasd", (), "init_from; mode=test checkpoint= (zero-shot)",
          "MSR-VTT zero-shot t2v 55.3"),
    _gram("gram-finetuned-msrvtt", "GRAM_finetuned_MSRVTT", "1CEpdfL2xAm15FlYbmNd4r5c8fqTKDy16",
          ("video", "audio", "subtitle"), "GRAM finetuned on MSR-VTT (T-VAS)", "finetune_msrvtt_tvas", (),
          "mode=test checkpoint= data=msrvtt_ret", "MSR-VTT t2v 64.0"),
    _gram("gram-finetuned-didemo", "GRAM_finetuned_DIDEMO", "1tdiknBL-8yL06blKuLCn0uuxRe_Jpnee",
          ("video", "audio"), "GRAM finetuned on DiDeMo (T-VA)", "finetune_didemo_tva", (),
          "mode=test checkpoint= data=didemo_ret", "DiDeMo t2v 67.3"),
    _gram("gram-finetuned-activitynet", "GRAM_finetuned_ANET", "1q4Q_qXb0IA0cmb-TO0WA6_89JiJf_apM",
          ("video", "audio"), "GRAM finetuned on ActivityNet Captions (T-VA)", "finetune_activitynet_tva", (),
          "mode=test checkpoint= data=activitynet_ret", "ActivityNet t2v 69.9"),
    _gram("gram-finetuned-vatex", "GRAM_finetuned_VATEX", "1klv4o7OSSPc1urGgdp3tRxgfU_XYKneW",
          ("video", "audio", "subtitle"), "GRAM finetuned on VATEX (T-VAS)", "finetune_vatex_tvas", (),
          "mode=test checkpoint= data=vatex_ret", "VATEX t2v 87.7"),
    Pretrained(
        name="eva01-clip-g-14", kind=ENCODER_KIND,
        description="EVA01-CLIP-g/14 (LAION-400M, 11B samples), the reference's file; only its visual tower is "
                    "used",
        path="clip/EVA01_CLIP_g_14_psz14_s11B.pt", files=(FileSpec(""),),
        source=Source("hf", "https://huggingface.co/QuanSun/EVA-CLIP/resolve/main/EVA01_CLIP_g_14_psz14_s11B.pt",
                      repo="QuanSun/EVA-CLIP", files=("EVA01_CLIP_g_14_psz14_s11B.pt",)),
        modalities=("video", "depth"), experiments=("model=gram_base (every paper experiment)",),
        used_as="model.vision.weights", aliases=("EVA01_CLIP_g_14_psz14_s11B",)),
    Pretrained(
        name="eva01-g-14-open-clip", kind=ENCODER_KIND,
        description="the same EVA01-g/14 weights from open_clip's registry (EVA01-g-14, laion400m_s11b_b41k); "
                    "address and file chosen by open_clip at download time",
        path="clip/open_clip/EVA01-g-14_laion400m_s11b_b41k",
        files=(FileSpec("open_clip_model.safetensors", alternatives=("open_clip_pytorch_model.bin",)),),
        source=Source("open_clip", "https://huggingface.co/timm/eva_giant_patch14_clip_224.laion400m_s11b_b41k",
                      repo="EVA01-g-14", tag="laion400m_s11b_b41k"),
        modalities=("video", "depth"), experiments=("model=gram_base, as an alternative to eva01-clip-g-14",),
        used_as="model.vision.weights (the file inside the folder)"),
    Pretrained(
        name="beats-iter3-plus-as2m", kind=ENCODER_KIND,
        description="BEATs iter3+ pretrained on AudioSet-2M (Microsoft unilm), the reference's audio encoder",
        path="beats/BEATs_iter3_plus_AS2M.pt", files=(FileSpec(""),),
        # The link published in microsoft/unilm beats/README.md (a read-only container token valid to 2033).
        source=Source("url", "https://valle.blob.core.windows.net/share/BEATs/BEATs_iter3_plus_AS2M.pt"
                      "?sv=2020-08-04&st=2023-03-01T07%3A51%3A05Z&se=2033-03-02T07%3A51%3A00Z&sr=c&sp=rl"
                      "&sig=QJXmSJG9DbMKf48UDIU1MfzIro8HQOf3sqlNXiflY1I%3D",
                      page="https://github.com/microsoft/unilm/tree/master/beats (BEATs_iter3+ AS2M link)"),
        modalities=("audio",), experiments=("model=gram_base (every paper experiment)",),
        used_as="model.audio.weights; --beats-cfg of convert_checkpoint.py", aliases=("BEATs_iter3_plus_AS2M",)),
    Pretrained(
        name="bert-base-uncased", kind=ENCODER_KIND,
        description="BERT-base uncased (Google), text encoder and the cross-attention matching encoder",
        path="bert/bert-base-uncased",
        files=(FileSpec("config.json"),
               # size and sha256 of the standard 30522-entry vocabulary (as in ../shared/data/bert-base-uncased)
               FileSpec("vocab.txt", 231508, "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
               FileSpec("model.safetensors", alternatives=("pytorch_model.bin",))),
        source=Source("hf", "https://huggingface.co/google-bert/bert-base-uncased",
                      repo="google-bert/bert-base-uncased", files=("config.json", "vocab.txt", "model.safetensors")),
        modalities=("text", "subtitle"), experiments=("model=gram_base (every paper experiment)",),
        used_as="model.text.weights, data.tokenizer", aliases=("google-bert/bert-base-uncased",)),
)
REGISTRY: dict[str, Pretrained] = {entry.name: entry for entry in _ENTRIES}
_ALIASES = {alias.lower(): entry.name for entry in _ENTRIES for alias in (entry.name, *entry.aliases)}


# ------------------------------------------------------------------------------------------------ lookup
def list_pretrained(kind: str | None = None) -> list[str]:
    """Registry names, GRAM checkpoints first; ``kind``: ``"gram"``, ``"encoder"`` or None for all."""
    if kind not in (None, GRAM_KIND, ENCODER_KIND):
        raise ValueError(f"kind={kind!r}; use 'gram', 'encoder' or None")
    return [e.name for e in _ENTRIES if kind is None or e.kind == kind]


def is_pretrained_name(value: object) -> bool:
    return isinstance(value, str) and value.lower() in _ALIASES


def close_names(value: str, n: int = 3) -> list[str]:
    """Registry names that look like ``value`` (typos, another case, a missing prefix)."""
    lowered = value.lower()
    found = difflib.get_close_matches(lowered, list(_ALIASES), n=n, cutoff=0.6)
    found += [alias for alias in _ALIASES if lowered and (lowered in alias or alias in lowered)]
    return list(dict.fromkeys(_ALIASES[a] for a in found))[:n]


def get_pretrained(name: str) -> Pretrained:
    """The entry for ``name`` (or one of its aliases, case-insensitive); unknown names list close ones."""
    key = name.lower() if isinstance(name, str) else None
    if key in _ALIASES:
        return REGISTRY[_ALIASES[key]]
    close = close_names(str(name))
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UnknownPretrainedError(f"unknown pretrained name {name!r}: {hint}known names: {', '.join(REGISTRY)} "
                                 f"(gram.list_pretrained())")


def default_weights_dir() -> Path:
    """``$GRAM_WEIGHTS_DIR``, else ``./pretrained_weights`` if it exists, else the source checkout's, else
    ``./pretrained_weights`` (where a download goes)."""
    if os.environ.get("GRAM_WEIGHTS_DIR"):
        return Path(os.environ["GRAM_WEIGHTS_DIR"]).expanduser()
    for candidate in (Path("pretrained_weights"), REPO_ROOT / "pretrained_weights"):
        if candidate.is_dir() and any(p.name != "README.md" for p in candidate.iterdir()):
            return candidate
    return Path("pretrained_weights")


def _weights_dir(weights_dir: str | os.PathLike | None) -> Path:
    return Path(weights_dir).expanduser() if weights_dir not in (None, "") else default_weights_dir()


def gram_checkpoint_path(entry: Pretrained, modalities: Sequence[str] | None = None) -> str:
    """The converted folder of a GRAM entry, relative to the weights folder. Converted for other data modalities
    than the release's (e.g. a T-VAS release to initialise a T-VA finetuning), it gets its own folder."""
    if modalities is None or tuple(modalities) == entry.modalities:
        return entry.path
    return entry.path + "-t" + "".join(m[0] for m in modalities)


def expected_path(name: str, weights_dir: str | os.PathLike | None = None,
                  modalities: Sequence[str] | None = None) -> Path:
    """Where ``name`` is looked for (its environment variable's path when set)."""
    entry = get_pretrained(name)
    if os.environ.get(entry.env_var):
        return Path(os.environ[entry.env_var]).expanduser()
    rel = gram_checkpoint_path(entry, modalities) if entry.kind == GRAM_KIND else entry.path
    return _weights_dir(weights_dir) / rel


# -------------------------------------------------------------------------------------------- checking
def _matches(folder: Path, spec: FileSpec) -> list[Path]:
    paths = []
    for name in (spec.name, *spec.alternatives):
        paths += [p for p in sorted(folder.glob(name)) if p.is_file() and PARTIAL not in p.name]
    return paths


def check_files(path: Path, files: Sequence[FileSpec], hash_files: bool = False) -> list[str]:
    """Problems of the release at ``path`` (empty: complete). Sizes are always checked, sha256 if asked."""
    if not path.exists():
        return [f"{path} does not exist"]
    problems = []
    for spec in files:
        if not spec.name:
            found = [path] if path.is_file() else []
        else:
            found = _matches(path, spec) if path.is_dir() else []
        if not found:
            names = " or ".join((spec.name or path.name, *spec.alternatives))
            problems.append(f"{path / spec.name if spec.name else path} missing ({names})")
            continue
        primary = found[0]
        is_primary_name = not spec.name or primary.name == Path(spec.name).name
        if spec.size is not None and is_primary_name and primary.stat().st_size != spec.size:
            problems.append(f"{primary} has {primary.stat().st_size} bytes, expected {spec.size} (incomplete or "
                            f"another file)")
        elif hash_files and spec.sha256 and is_primary_name and file_sha256(primary) != spec.sha256:
            problems.append(f"{primary} fails its sha256 check (expected {spec.sha256})")
    return problems


def _pick_file(path: Path, entry: Pretrained) -> Path:
    """The path handed to the loader: the folder, or for a single-file-in-folder release that file."""
    if entry.is_folder and len(entry.files) == 1:
        return _matches(path, entry.files[0])[0]
    return path


# ------------------------------------------------------------------------------------------- downloading
def offline() -> bool:
    return any(os.environ.get(var, "").lower() in ("1", "true", "yes")
               for var in ("GRAM_OFFLINE", "HF_HUB_OFFLINE"))


def _fetch_url(source: Source, dest: Path, progress: bool) -> None:
    """One file from a direct link into ``dest``, streamed, with a progress bar."""
    from tqdm.auto import tqdm

    try:
        with urllib.request.urlopen(source.url, timeout=60) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as err:  # URLError, timeouts, refused connections
        raise DownloadUnavailableError(f"download from {source.where} failed: {err}") from err


def _fetch_hf(source: Source, dest: Path, progress: bool) -> None:
    """Hugging Face hub files: one file into ``dest``, or several into the folder ``dest``."""
    from huggingface_hub import hf_hub_download

    single = not dest.is_dir()  # the caller creates the folder of a folder release
    folder = dest.parent if single else dest
    for filename in source.files:
        try:
            got = Path(hf_hub_download(repo_id=source.repo, filename=filename, local_dir=str(folder / ".hf")))
        except Exception as err:  # the hub client raises its own error types for network and 404s
            raise DownloadUnavailableError(f"download of {source.repo}/{filename} from the Hugging Face hub "
                                           f"failed: {err}") from err
        shutil.move(str(got), str(dest if single else folder / filename))
    shutil.rmtree(folder / ".hf", ignore_errors=True)


def _fetch_open_clip(source: Source, dest: Path, progress: bool) -> None:
    """open_clip's registry names the hub repo and file (safetensors preferred) for ``model``/``tag``."""
    import open_clip
    from open_clip.pretrained import download_pretrained

    cfg = open_clip.get_pretrained_cfg(source.repo, source.tag)
    if not cfg:
        raise DownloadUnavailableError(f"open_clip {open_clip.__version__} has no pretrained "
                                       f"{source.repo}:{source.tag}; see open_clip.list_pretrained()")
    try:
        got = Path(download_pretrained(cfg, cache_dir=str(dest / ".cache")))
    except Exception as err:
        raise DownloadUnavailableError(f"open_clip download of {source.repo}:{source.tag} ({cfg.get('hf_hub')}) "
                                       f"failed: {err}") from err
    shutil.move(str(got.resolve()), str(dest / got.name))
    shutil.rmtree(dest / ".cache", ignore_errors=True)


def _fetch_gdrive_folder(source: Source, dest: Path, progress: bool) -> None:
    """A public Google Drive folder, with gdown (an optional dependency: ``pip install gdown``)."""
    try:
        import gdown
    except ImportError as err:
        raise DownloadUnavailableError("Google Drive folders need gdown: pip install -e .[download] in gram's "
                                       "checkout (or pip install gdown==6.5.1)") from err
    try:
        got = gdown.download_folder(url=source.url, output=str(dest), quiet=not progress)
    except Exception as err:  # gdown raises its own types for quota, permission and network failures
        raise DownloadUnavailableError(f"download of {source.url} failed: {err}") from err
    if not got:
        raise DownloadUnavailableError(f"download of {source.url} returned no files")


FETCHERS: dict[str, Callable[[Source, Path, bool], None]] = {
    "url": _fetch_url, "hf": _fetch_hf, "open_clip": _fetch_open_clip, "gdrive_folder": _fetch_gdrive_folder}


def _install(tmp: Path, target: Path) -> None:
    """Move a verified download into place: a file by one rename; a folder file by file, keeping files the user
    already has (a folder is only complete once every file is there, so a crash midway never looks complete)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if tmp.is_file():
        os.replace(tmp, target)
        return
    for src in sorted(p for p in tmp.rglob("*") if p.is_file()):
        dst = target / src.relative_to(tmp)
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    shutil.rmtree(tmp, ignore_errors=True)


def _download(entry: Pretrained, target: Path, files: Sequence[FileSpec], progress: bool) -> Path:
    """Fetch ``entry`` into a temporary name beside ``target``, verify sizes and checksums, then move it in."""
    tmp = target.with_name(f"{target.name}{PARTIAL}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"download {entry.name} from {entry.source.where} -> {target}", file=sys.stderr)
    if entry.is_folder or entry.kind == GRAM_KIND:  # fetchers tell a folder release by the folder made here
        tmp.mkdir()
    try:
        FETCHERS[entry.source.kind](entry.source, tmp, progress)
        problems = check_files(tmp, files, hash_files=True)
        nested = [p for p in tmp.iterdir()] if tmp.is_dir() else []
        if problems and len(nested) == 1 and nested[0].is_dir() and not check_files(nested[0], files):
            os.replace(nested[0], tmp.with_name(tmp.name + "-inner"))  # a folder that holds the release's folder
            tmp.rmdir()
            os.replace(tmp.with_name(tmp.name + "-inner"), tmp)
            problems = []
        if problems:
            raise ChecksumError(f"downloaded {entry.name} is not what was published: {'; '.join(problems)}. "
                                f"Nothing was installed; retry, or report the changed release.")
        _install(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
    return target


def download_command(entry: Pretrained, weights_dir: Path | None = None) -> str:
    where = f" --weights-dir {weights_dir}" if weights_dir is not None else ""
    return f"{DOWNLOAD_COMMAND} {entry.name}{where}"


def _not_found(entry: Pretrained, path: Path, weights_dir: Path, reason: str) -> PretrainedNotFoundError:
    what = "the folder" if entry.kind == GRAM_KIND or entry.is_folder else "the file"
    into = weights_dir / entry.download_path if entry.kind == GRAM_KIND else path
    return PretrainedNotFoundError(
        f"pretrained {entry.name!r} not found at {path} ({reason}). Get it with "
        f"`{download_command(entry, weights_dir)}`, or download {what} from {entry.source.where} by hand into "
        f"{into}, or point {entry.env_var} (or paths.weights_dir) at a copy.")


# ------------------------------------------------------------------------------------------- conversion
def _released_checkpoint(folder: Path) -> Path:
    """The reference's file in a released folder: the latest ``model_step_N.pt``, else a ``best_*.pt``, else the
    only ``.pt`` (the reference's --pretrain_dir reads the latest model_step)."""
    ckpts = sorted(folder.glob("ckpt/*.pt")) or sorted(folder.glob("*.pt"))
    steps = [(int(m.group(1)), p) for p in ckpts if (m := re.fullmatch(r"model_step_(\d+)\.pt", p.name))]
    if steps:
        return max(steps)[1]
    best = [p for p in ckpts if p.name.startswith("best")]
    if best or len(ckpts) == 1:
        return (best or ckpts)[0]
    raise PretrainedNotFoundError(f"{folder}: no ckpt/model_step_N.pt (or a single .pt) in the released folder")


def _run_converter(argv: list[str]) -> None:
    """Run scripts/convert_checkpoint.py in its own process (it loads the whole reference checkpoint)."""
    result = subprocess.run(argv, check=False)
    if result.returncode != 0:
        raise PretrainedError(f"converting failed (exit status {result.returncode}): {' '.join(argv)}")


def convert_command(entry: Pretrained, released: Path, out: Path, modalities: Sequence[str],
                    weights_dir: Path) -> list[str]:
    script = REPO_ROOT / "scripts" / "convert_checkpoint.py"
    argv = [sys.executable, str(script), str(_released_checkpoint(released)), str(out), "--modalities", *modalities]
    beats = weights_dir / REGISTRY["beats-iter3-plus-as2m"].path
    if beats.is_file():
        argv += ["--beats-cfg", str(beats)]
    # the released models' vocabulary (bert-base-uncased's), copied inside the converted folder
    return [*argv, "--tokenizer", str(weights_dir / REGISTRY["bert-base-uncased"].path)]


def _convert(entry: Pretrained, released: Path, out: Path, modalities: Sequence[str], weights_dir: Path) -> Path:
    argv = convert_command(entry, released, out.with_name(out.name + PARTIAL), modalities, weights_dir)
    if not Path(argv[1]).is_file():
        raise PretrainedNotFoundError(f"{entry.name}: the released folder {released} needs converting, but "
                                      f"{argv[1]} is not here (run it from a source checkout of gram)")
    partial = out.with_name(out.name + PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    print(f"convert  {entry.name}: {released} -> {out}", file=sys.stderr)
    _run_converter(argv)
    problems = check_files(partial, entry.files)
    if problems:
        raise PretrainedError(f"converting {entry.name} wrote an incomplete folder: {'; '.join(problems)}")
    os.replace(partial, out)
    return out


# ---------------------------------------------------------------------------------------------- resolve
def resolve_pretrained(name: str, weights_dir: str | os.PathLike | None = None,
                       modalities: Sequence[str] | None = None, download: bool | None = None,
                       progress: bool = True) -> Path:
    """The local path of ``name``: found, converted or downloaded as the module docstring says.

    Args:
        weights_dir: the weights folder (default :func:`default_weights_dir`).
        modalities: GRAM entries only: the data modalities the caller's model has; a release is converted for
            them (e.g. T-VAS weights to start a T-VA finetuning). None: the release's own.
        download: False never touches the network; None downloads unless GRAM_OFFLINE/HF_HUB_OFFLINE is set.

    Raises:
        UnknownPretrainedError (close names listed), PretrainedNotFoundError (name, path, download command),
        ChecksumError (a download that is not what was published).
    """
    entry = get_pretrained(name)
    root = _weights_dir(weights_dir)
    if os.environ.get(entry.env_var):
        path = Path(os.environ[entry.env_var]).expanduser()
        if not path.exists():
            raise PretrainedNotFoundError(f"{entry.env_var}={path} (pretrained {entry.name!r}): no such file or "
                                          f"folder; unset it to use {root / entry.path}")
        return path
    target = expected_path(entry.name, root, modalities)
    problems = check_files(target, entry.files)
    if not problems:
        return _pick_file(target, entry)
    may_download = not offline() if download is None else download
    if target.exists():  # present but incomplete or wrong: say so rather than overwrite what the user put there
        raise PretrainedNotFoundError(f"pretrained {entry.name!r} at {target} is incomplete: "
                                      f"{'; '.join(problems)}. Remove it and run {download_command(entry, root)}")
    if entry.kind == GRAM_KIND:
        released = root / entry.download_path
        if check_files(released, _RELEASED_FILES):
            if not may_download:
                raise _not_found(entry, target, root, f"no converted checkpoint, nor the released folder at "
                                 f"{released}; downloads are off (GRAM_OFFLINE/HF_HUB_OFFLINE or download=False)")
            try:
                _download(entry, released, _RELEASED_FILES, progress)
            except DownloadUnavailableError as err:
                raise _not_found(entry, target, root, f"no converted checkpoint, nor the released folder at "
                                 f"{released}; {err}") from err
        return _convert(entry, released, target, modalities or entry.modalities, root)
    if not may_download:
        raise _not_found(entry, target, root, "downloads are off: GRAM_OFFLINE/HF_HUB_OFFLINE or download=False")
    try:
        _download(entry, target, entry.files, progress)
    except DownloadUnavailableError as err:
        raise _not_found(entry, target, root, str(err)) from err
    return _pick_file(target, entry)


def resolve_model_source(value: str | os.PathLike, weights_dir: str | os.PathLike | None = None,
                         modalities: Sequence[str] | None = None, download: bool | None = None) -> str | Path:
    """For ``load_model``, ``init_from=`` and ``checkpoint=``: a path is returned unchanged; a GRAM name becomes
    its converted checkpoint folder; an encoder name, or a missing path that looks like a misspelt name, is an
    error naming the close names."""
    text = os.fspath(value)
    if Path(text).expanduser().exists():
        return value
    if is_pretrained_name(text):
        entry = get_pretrained(text)
        if entry.kind != GRAM_KIND:
            raise PretrainedError(f"{entry.name!r} is an encoder's weights ({entry.used_as}), not a GRAM model; "
                                  f"GRAM names: {', '.join(list_pretrained(GRAM_KIND))}")
        return resolve_pretrained(entry.name, weights_dir, modalities, download)
    if os.sep not in text and "/" not in text and close_names(text):
        get_pretrained(text)  # raises, listing the close names
    return value


@dataclass
class Row:
    """One line of ``describe()``: what a user needs to pick a release."""

    name: str
    kind: str
    modalities: str
    size: str
    used_as: str
    experiments: str
    reproduces: str
    source: str
    present: bool = False


def describe(weights_dir: str | os.PathLike | None = None) -> list[Row]:
    """Every entry with its size, use and whether it is present under ``weights_dir`` (no network, no hashing)."""
    rows = []
    for entry in _ENTRIES:
        known = [f"{spec.name} {spec.size:,} B" for spec in entry.files if spec.size is not None]
        size = (f"{entry.total_size:,} B" if entry.total_size is not None else entry.size_note
                or ("unknown except " + ", ".join(known) if known else "not published"))
        present = not check_files(expected_path(entry.name, weights_dir), entry.files)
        rows.append(Row(entry.name, entry.kind, ",".join(entry.modalities), size, entry.used_as,
                        ", ".join(entry.experiments), entry.reproduces, entry.source.where, present))
    return rows
