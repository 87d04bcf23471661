"""gram.pretrained: names resolve offline to local files, downloads (network replaced) are verified and atomic,
and every failure names the name, the expected path and the command that fixes it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import gram
from gram import pretrained as P
from tests.conftest import ROOT, shared_path

EVA = "clip/EVA01_CLIP_g_14_psz14_s11B.pt"
BEATS = "beats/BEATs_iter3_plus_AS2M.pt"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every fetcher fails unless a test replaces it; overrides from the environment are cleared."""
    def refuse(source, dest, progress):
        raise AssertionError(f"unexpected download of {source.url}")

    for kind in P.FETCHERS:
        monkeypatch.setitem(P.FETCHERS, kind, refuse)
    for var in [v for v in os.environ if v.startswith("GRAM_WEIGHTS") or v in ("GRAM_OFFLINE", "HF_HUB_OFFLINE")]:
        monkeypatch.delenv(var)


def leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if P.PARTIAL in p.name]


# ------------------------------------------------------------------------------------------------ names
def test_names_are_listed_by_kind_and_exported():
    assert gram.list_pretrained is P.list_pretrained
    gram_names, encoders = P.list_pretrained("gram"), P.list_pretrained("encoder")
    assert {"gram-pretrained-tvas", "gram-pretrained-tvasd", "gram-finetuned-msrvtt", "gram-finetuned-didemo",
            "gram-finetuned-activitynet", "gram-finetuned-vatex"} == set(gram_names)
    assert {"eva01-clip-g-14", "beats-iter3-plus-as2m", "bert-base-uncased"} <= set(encoders)
    assert P.list_pretrained() == gram_names + encoders
    with pytest.raises(ValueError, match="kind"):
        P.list_pretrained("weights")


def test_reference_names_are_aliases():
    assert P.get_pretrained("GRAM_finetuned_MSRVTT").name == "gram-finetuned-msrvtt"
    assert P.get_pretrained("gram_pretrained_5modalities").name == "gram-pretrained-tvas"
    assert P.get_pretrained("BERT-BASE-UNCASED").name == "bert-base-uncased"


@pytest.mark.parametrize("typo, close", [("gram-pretraind-tvas", "gram-pretrained-tvas"),
                                         ("finetuned-msrvtt", "gram-finetuned-msrvtt"),
                                         ("beats", "beats-iter3-plus-as2m")])
def test_unknown_name_lists_close_names(typo, close):
    with pytest.raises(P.UnknownPretrainedError) as err:
        P.get_pretrained(typo)
    message = str(err.value)
    assert repr(typo) in message and f"did you mean {close}" in message
    assert "gram.list_pretrained()" in message


def test_every_entry_is_described_consistently():
    for name in P.list_pretrained():
        entry = P.get_pretrained(name)
        assert entry.source.url.startswith("https://"), name
        assert entry.modalities and entry.used_as, name
        for spec in entry.files:  # a checksum is only given with the size it belongs to
            assert spec.sha256 is None or (len(spec.sha256) == 64 and spec.size is not None), name
        if entry.kind == "gram":
            assert entry.download_path.startswith("gram/released/") and entry.path.startswith("gram/")
            for experiment in (entry.reproduces, *entry.experiments):
                assert (ROOT / "configs" / "experiment" / f"{experiment}.yaml").is_file(), experiment
            reproduced = (ROOT / "configs" / "experiment" / f"{entry.reproduces}.yaml").read_text()
            # the volume of the experiment that produced it is the release's
            assert f"model:\n  modalities: [{', '.join(entry.modalities)}]" in reproduced, name
        else:
            assert entry.experiments, name


def test_published_vocab_checksum_is_the_standard_vocabulary():
    vocab = shared_path("data", "bert-base-uncased", "vocab.txt")
    if not vocab.is_file():
        pytest.skip("../shared is absent")
    spec = next(s for s in P.get_pretrained("bert-base-uncased").files if s.name == "vocab.txt")
    data = vocab.read_bytes()
    assert (len(data), hashlib.sha256(data).hexdigest()) == (spec.size, spec.sha256)
    assert hashlib.md5(data).hexdigest() == "64800d5d8528ce344256daf115d4965e"  # the md5 ../shared/README gives


def test_open_clip_entry_agrees_with_open_clip_registry():
    open_clip = pytest.importorskip("open_clip")
    entry = P.get_pretrained("eva01-g-14-open-clip")
    assert (entry.source.repo, entry.source.tag) in open_clip.list_pretrained()
    hf_hub = open_clip.get_pretrained_cfg(entry.source.repo, entry.source.tag)["hf_hub"]
    assert entry.source.url == "https://huggingface.co/" + hf_hub.rstrip("/")


# ---------------------------------------------------------------------------------------- offline resolution
def test_local_file_resolves_without_network(tmp_path):
    (tmp_path / "clip").mkdir()
    (tmp_path / EVA).write_bytes(b"eva")
    assert P.resolve_pretrained("eva01-clip-g-14", tmp_path) == tmp_path / EVA
    assert P.resolve_pretrained("EVA01_CLIP_g_14_psz14_s11B", tmp_path, download=False) == tmp_path / EVA


def test_weights_dir_comes_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "beats").mkdir()
    (tmp_path / BEATS).write_bytes(b"beats")
    monkeypatch.setenv("GRAM_WEIGHTS_DIR", str(tmp_path))
    assert P.default_weights_dir() == tmp_path
    assert P.resolve_pretrained("beats-iter3-plus-as2m") == tmp_path / BEATS


def test_per_name_environment_override(tmp_path, monkeypatch):
    mine = tmp_path / "elsewhere.pt"
    mine.write_bytes(b"x")
    monkeypatch.setenv("GRAM_WEIGHTS_EVA01_CLIP_G_14", str(mine))
    assert P.resolve_pretrained("eva01-clip-g-14", tmp_path / "weights") == mine
    monkeypatch.setenv("GRAM_WEIGHTS_EVA01_CLIP_G_14", str(tmp_path / "gone.pt"))
    with pytest.raises(P.PretrainedNotFoundError, match="GRAM_WEIGHTS_EVA01_CLIP_G_14=.*gone.pt"):
        P.resolve_pretrained("eva01-clip-g-14", tmp_path / "weights")


@pytest.mark.parametrize("offline", ["argument", "GRAM_OFFLINE", "HF_HUB_OFFLINE"])
def test_missing_offline_is_one_error_with_path_and_command(tmp_path, monkeypatch, offline):
    if offline != "argument":
        monkeypatch.setenv(offline, "1")
    with pytest.raises(P.PretrainedNotFoundError) as err:
        P.resolve_pretrained("beats-iter3-plus-as2m", tmp_path, download=False if offline == "argument" else None)
    message = str(err.value)
    assert "'beats-iter3-plus-as2m'" in message and str(tmp_path / BEATS) in message
    assert f"python scripts/download_weights.py beats-iter3-plus-as2m --weights-dir {tmp_path}" in message
    assert "\n" not in message and "sig=" not in message  # one line; the link's token is not repeated


def test_incomplete_local_folder_is_reported_not_overwritten(tmp_path):
    bert = tmp_path / "bert" / "bert-base-uncased"
    bert.mkdir(parents=True)
    (bert / "config.json").write_text("{}")
    (bert / "vocab.txt").write_text("[PAD]\n")  # wrong size: a truncated copy
    (bert / "model.safetensors").write_bytes(b"w")
    with pytest.raises(P.PretrainedNotFoundError, match="incomplete.*vocab.txt has 6 bytes, expected 231508"):
        P.resolve_pretrained("bert-base-uncased", tmp_path)
    assert (bert / "vocab.txt").read_text() == "[PAD]\n"


def test_pytorch_bin_stands_in_for_safetensors(tmp_path):
    vocab = shared_path("data", "bert-base-uncased", "vocab.txt")
    if not vocab.is_file():
        pytest.skip("../shared is absent")
    bert = tmp_path / "bert" / "bert-base-uncased"
    bert.mkdir(parents=True)
    (bert / "config.json").write_text("{}")
    (bert / "vocab.txt").write_bytes(vocab.read_bytes())
    (bert / "pytorch_model.bin").write_bytes(b"w")
    assert P.resolve_pretrained("bert-base-uncased", tmp_path, download=False) == bert


# ------------------------------------------------------------------------------------ downloads, replaced
def test_download_goes_through_a_partial_name_and_is_installed(tmp_path, monkeypatch):
    seen = []

    def fake_url(source, dest, progress):
        seen.append((source.url, dest))
        assert P.PARTIAL in dest.name and dest.parent == tmp_path / "beats"
        dest.write_bytes(b"beats weights")

    monkeypatch.setitem(P.FETCHERS, "url", fake_url)
    path = P.resolve_pretrained("beats-iter3-plus-as2m", tmp_path, progress=False)
    assert path == tmp_path / BEATS and path.read_bytes() == b"beats weights"
    assert seen[0][0].startswith("https://valle.blob.core.windows.net/share/BEATs/BEATs_iter3_plus_AS2M.pt?")
    assert leftovers(tmp_path) == []
    assert P.resolve_pretrained("beats-iter3-plus-as2m", tmp_path) == path and len(seen) == 1  # not again


def test_interrupted_download_never_looks_complete(tmp_path, monkeypatch):
    def broken(source, dest, progress):
        dest.write_bytes(b"half of it")
        raise P.DownloadUnavailableError("connection reset")

    monkeypatch.setitem(P.FETCHERS, "url", broken)
    with pytest.raises(P.PretrainedNotFoundError, match="connection reset"):
        P.resolve_pretrained("beats-iter3-plus-as2m", tmp_path, progress=False)
    assert not (tmp_path / BEATS).exists() and leftovers(tmp_path) == []
    # a process killed mid-download leaves its partial file: it is never taken for the release
    (tmp_path / "beats" / f"BEATs_iter3_plus_AS2M.pt{P.PARTIAL}-999").write_bytes(b"half")
    with pytest.raises(P.PretrainedNotFoundError, match="not found"):
        P.resolve_pretrained("beats-iter3-plus-as2m", tmp_path, download=False)


def hf_writer(contents: dict[str, bytes]):
    def fake_hf(source, dest, progress):
        assert dest.is_dir() and P.PARTIAL in dest.name
        for name in source.files:
            (dest / name).write_bytes(contents[name])
    return fake_hf


def test_checksum_mismatch_installs_nothing(tmp_path, monkeypatch):
    wrong_vocab = b"x" * 231508  # the published size, other bytes: only the sha256 can tell
    monkeypatch.setitem(P.FETCHERS, "hf", hf_writer({"config.json": b"{}", "vocab.txt": wrong_vocab,
                                                       "model.safetensors": b"w"}))
    with pytest.raises(P.ChecksumError, match="vocab.txt fails its sha256 check"):
        P.resolve_pretrained("bert-base-uncased", tmp_path, progress=False)
    assert not (tmp_path / "bert" / "bert-base-uncased").exists() and leftovers(tmp_path) == []


def test_size_mismatch_of_a_download_installs_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(P.FETCHERS, "hf", hf_writer({"config.json": b"{}", "vocab.txt": b"short",
                                                       "model.safetensors": b"w"}))
    with pytest.raises(P.ChecksumError, match="vocab.txt has 5 bytes, expected 231508"):
        P.resolve_pretrained("bert-base-uncased", tmp_path, progress=False)
    assert not (tmp_path / "bert").exists() or not any((tmp_path / "bert").iterdir())


def test_partial_user_folder_is_kept_and_a_fresh_one_downloaded_whole(tmp_path, monkeypatch):
    vocab = shared_path("data", "bert-base-uncased", "vocab.txt")
    if not vocab.is_file():
        pytest.skip("../shared is absent")
    bert = tmp_path / "bert" / "bert-base-uncased"
    bert.mkdir(parents=True)
    (bert / "config.json").write_text('{"mine": true}')  # the user's file, kept; the rest completes the folder
    monkeypatch.setitem(P.FETCHERS, "hf", hf_writer({"config.json": b"{}", "vocab.txt": vocab.read_bytes(),
                                                       "model.safetensors": b"w"}))
    with pytest.raises(P.PretrainedNotFoundError, match="incomplete"):  # a partial folder is not overwritten
        P.resolve_pretrained("bert-base-uncased", tmp_path, progress=False)
    (bert / "config.json").unlink()
    bert.rmdir()
    assert P.resolve_pretrained("bert-base-uncased", tmp_path, progress=False) == bert
    assert sorted(p.name for p in bert.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    assert P.check_files(bert, P.get_pretrained("bert-base-uncased").files, hash_files=True) == []


def test_real_hf_fetcher_moves_hub_files_into_place(tmp_path, monkeypatch):
    """The hub client is replaced; _fetch_hf itself runs (file layout, no cache symlinks left behind)."""
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, local_dir):
        calls.append((repo_id, filename))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{repo_id}/{filename}".encode())
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setitem(P.FETCHERS, "hf", P._fetch_hf)
    path = P.resolve_pretrained("eva01-clip-g-14", tmp_path, progress=False)
    assert path == tmp_path / EVA and path.read_bytes() == b"QuanSun/EVA-CLIP/EVA01_CLIP_g_14_psz14_s11B.pt"
    assert calls == [("QuanSun/EVA-CLIP", "EVA01_CLIP_g_14_psz14_s11B.pt")]
    assert sorted(p.name for p in (tmp_path / "clip").iterdir()) == ["EVA01_CLIP_g_14_psz14_s11B.pt"]


def test_open_clip_chooses_the_eva_file(tmp_path, monkeypatch):
    """open_clip's own registry and downloader run; only the hub call is replaced."""
    pretrained = pytest.importorskip("open_clip.pretrained")
    asked = []

    def fake_hub(repo_id, filename, revision=None, cache_dir=None):
        asked.append((repo_id, filename))
        path = Path(cache_dir) / "snapshots" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"eva in open_clip layout")
        return str(path)

    monkeypatch.setattr(pretrained, "hf_hub_download", fake_hub)
    monkeypatch.setitem(P.FETCHERS, "open_clip", P._fetch_open_clip)
    path = P.resolve_pretrained("eva01-g-14-open-clip", tmp_path, progress=False)
    assert asked == [("timm/eva_giant_patch14_clip_224.laion400m_s11b_b41k", "open_clip_model.safetensors")]
    assert path == tmp_path / "clip/open_clip/EVA01-g-14_laion400m_s11b_b41k/open_clip_model.safetensors"
    assert path.read_bytes() == b"eva in open_clip layout" and leftovers(tmp_path) == []
    assert [p.name for p in path.parent.iterdir()] == ["open_clip_model.safetensors"]


def test_missing_gdown_is_explained(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_gdown(name, *args, **kwargs):
        if name == "gdown":
            raise ImportError("No module named 'gdown'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gdown)
    monkeypatch.setitem(P.FETCHERS, "gdrive_folder", P._fetch_gdrive_folder)
    with pytest.raises(P.PretrainedNotFoundError, match="pip install gdown") as err:
        P.resolve_pretrained("gram-finetuned-vatex", tmp_path, progress=False)
    assert "drive.google.com/drive/folders/1klv4o7OSSPc1urGgdp3tRxgfU_XYKneW" in str(err.value)
    assert str(tmp_path / "gram/released/GRAM_finetuned_VATEX") in str(err.value)


# ------------------------------------------------------------------------------------ GRAM releases
def write_release(folder: Path, steps=(10, 200)) -> None:
    (folder / "ckpt").mkdir(parents=True)
    (folder / "log").mkdir()
    for step in steps:
        (folder / "ckpt" / f"model_step_{step}.pt").write_bytes(b"ref")
    (folder / "log" / "hps.json").write_text("{}")


@pytest.fixture()
def converter(monkeypatch):
    """Records the converter's command line and writes what it would (the real one is tested end to end below)."""
    calls = []

    def fake(argv):
        calls.append(argv)
        out = Path(argv[3])
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"w")
        (out / "config.json").write_text(json.dumps({"modalities": argv[argv.index("--modalities") + 1:]}))

    monkeypatch.setattr(P, "_run_converter", fake)
    return calls


def test_released_folder_is_converted_once_for_the_models_modalities(tmp_path, converter):
    write_release(tmp_path / "gram/released/GRAM_pretrained_5modalities")
    (tmp_path / "beats").mkdir()
    (tmp_path / BEATS).write_bytes(b"b")
    path = P.resolve_pretrained("gram-pretrained-tvas", tmp_path, download=False)
    assert path == tmp_path / "gram/pretrained_tvas" and (path / "model.safetensors").is_file()
    argv = converter[0]
    assert argv[1].endswith("scripts/convert_checkpoint.py") and Path(argv[1]).is_file()
    assert argv[2].endswith("ckpt/model_step_200.pt")  # the latest step, as the reference's --pretrain_dir
    assert argv[4:] == ["--modalities", "video", "audio", "subtitle", "--beats-cfg", str(tmp_path / BEATS),
                        "--tokenizer", str(tmp_path / "bert/bert-base-uncased")]
    # the same release for a T-VA finetuning: its own converted folder
    va = P.resolve_pretrained("gram-pretrained-tvas", tmp_path, modalities=["video", "audio"], download=False)
    assert va == tmp_path / "gram/pretrained_tvas-tva" and converter[1][4:7] == ["--modalities", "video", "audio"]
    assert P.resolve_pretrained("gram-pretrained-tvas", tmp_path, download=False) == path and len(converter) == 2
    assert leftovers(tmp_path) == []


def test_failed_conversion_leaves_no_converted_folder(tmp_path, monkeypatch):
    write_release(tmp_path / "gram/released/GRAM_finetuned_DIDEMO")

    def crash(argv):
        Path(argv[3]).mkdir(parents=True)
        (Path(argv[3]) / "config.json").write_text("{}")
        raise P.PretrainedError(f"converting failed (exit status 1): {' '.join(argv)}")

    monkeypatch.setattr(P, "_run_converter", crash)
    with pytest.raises(P.PretrainedError, match="converting failed"):
        P.resolve_pretrained("gram-finetuned-didemo", tmp_path, download=False)
    assert not (tmp_path / "gram/finetuned_didemo").exists()


def test_drive_folder_download_then_conversion(tmp_path, monkeypatch, converter):
    def fake_drive(source, dest, progress):
        assert source.url.endswith("1CEpdfL2xAm15FlYbmNd4r5c8fqTKDy16")
        write_release(dest / "GRAM_finetuned_MSRVTT", steps=(7,))  # the folder arrives inside a folder

    monkeypatch.setitem(P.FETCHERS, "gdrive_folder", fake_drive)
    path = P.resolve_pretrained("gram-finetuned-msrvtt", tmp_path, progress=False)
    released = tmp_path / "gram/released/GRAM_finetuned_MSRVTT"
    assert (released / "ckpt/model_step_7.pt").is_file() and (released / "log/hps.json").is_file()
    assert path == tmp_path / "gram/finetuned_msrvtt" and converter[0][2] == str(released / "ckpt/model_step_7.pt")
    assert leftovers(tmp_path) == []


def test_missing_gram_release_error(tmp_path):
    with pytest.raises(P.PretrainedNotFoundError) as err:
        P.resolve_pretrained("gram-pretrained-tvasd", tmp_path, download=False)
    message = str(err.value)
    for part in ("'gram-pretrained-tvasd'", str(tmp_path / "gram/pretrained_tvasd"),
                 str(tmp_path / "gram/released/GRAM_pretrained_4modalities"),
                 "python scripts/download_weights.py gram-pretrained-tvasd", "1mD9PDvugLx3t1KtTCwJtYO8VZDFKfMgs"):
        assert part in message


# ------------------------------------------------------------------------- load_model / init_from / checkpoint
def test_model_source_passes_paths_and_rejects_encoders_and_typos(tmp_path):
    assert P.resolve_model_source(tmp_path) == tmp_path
    assert P.resolve_model_source("outputs/some_run") == "outputs/some_run"  # the loader's own error follows
    with pytest.raises(P.PretrainedError, match="encoder's weights.*model.text.weights"):
        P.resolve_model_source("bert-base-uncased", tmp_path)
    with pytest.raises(P.UnknownPretrainedError, match="did you mean gram-finetuned-vatex"):
        P.resolve_model_source("gram-finetuned-vatexx", tmp_path)


def test_load_model_by_name_reports_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAM_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("GRAM_OFFLINE", "1")
    with pytest.raises(P.PretrainedNotFoundError, match="download_weights.py gram-finetuned-msrvtt"):
        gram.load_model("gram-finetuned-msrvtt")


def test_run_config_names_resolve_under_paths_weights_dir(tmp_path, converter):
    from types import SimpleNamespace

    from gram.main import pretrained_source

    write_release(tmp_path / "gram/released/GRAM_pretrained_5modalities")
    cfg = SimpleNamespace(paths=SimpleNamespace(weights_dir=str(tmp_path)))
    assert pretrained_source("gram-pretrained-tvas", cfg, ["video", "audio"]) == tmp_path / "gram/pretrained_tvas-tva"
    assert pretrained_source(str(tmp_path), cfg) == str(tmp_path)
    assert pretrained_source(None, cfg) is None
    with pytest.raises(P.UnknownPretrainedError):
        pretrained_source("gram-pretrained-tvass", cfg)


@pytest.mark.slow
def test_real_conversion_of_a_tiny_release_loads_by_name(tmp_path, monkeypatch):
    """A tiny checkpoint in the reference's layout, converted by the real script in its own process when its name
    is resolved (as gram.load_model(NAME) does), with the modalities the release is registered with; the result
    loads strictly and gives the source model's embeddings."""
    torch = pytest.importorskip("torch")
    from gram.models.gram_model import GramModel
    from tests.test_convert import inputs, load_converted, outputs, reference_layout, tiny_config
    from tests.test_released import hps, write_vocabulary

    torch.manual_seed(0)
    model = GramModel(tiny_config())  # the reference's state dict always holds every head
    released = tmp_path / "gram/released/GRAM_finetuned_ANET"
    write_release(released, steps=())
    (released / "log" / "hps.json").write_text(json.dumps(hps()))  # the real keys, for the tiny model
    write_vocabulary(tmp_path / P.REGISTRY["bert-base-uncased"].path)  # where the registry keeps the vocabulary
    torch.save(reference_layout(model, 0.05), released / "ckpt" / "model_step_3.pt")
    command = P.convert_command  # the tiny model's head counts are not the full model's: name its config

    def tiny_command(*args):
        return [*command(*args), "--model-config", str(ROOT / "configs" / "model" / "tiny.yaml")]

    monkeypatch.setattr(P, "convert_command", tiny_command)
    monkeypatch.setenv("GRAM_WEIGHTS_DIR", str(tmp_path))
    folder = P.resolve_model_source("gram-finetuned-activitynet")
    assert folder == tmp_path / "gram/finetuned_activitynet" and leftovers(tmp_path) == []
    task = load_converted(folder)  # strict
    assert task.model.modalities == ("video", "audio")
    batch = inputs(model.cfg)
    model.eval()
    expected, got = outputs(model, batch), outputs(task.model, batch)
    for modality in ("text", "video", "audio"):
        assert torch.equal(expected[modality], got[modality]), modality


def test_experiments_name_their_starting_weights_by_registry_name():
    for path in sorted((ROOT / "configs" / "experiment").glob("*.yaml")):
        init_from = (path.read_text().split("\ninit_from:", 1)[1].split("#")[0].split("\n")[0].strip()
                     if "\ninit_from:" in path.read_text() else "null")
        assert init_from == "null" or P.is_pretrained_name(init_from), (path.name, init_from)
        if init_from != "null":
            assert path.stem in P.get_pretrained(init_from).experiments, path.name


@pytest.mark.slow
def test_run_takes_names_for_checkpoint_and_init_from(sample_root, tmp_path, monkeypatch):
    """A short run's checkpoint placed where two names live: `mode=test checkpoint=NAME` evaluates it and
    `init_from=NAME` starts a T-VA run from the folder converted for T-VA, loading strictly."""
    import shutil

    import gram.main as main
    from gram.checkpoint_format import list_checkpoints
    from tests.conftest import compose_config, sample_overrides

    first = tmp_path / "first"
    main.run(compose_config(*sample_overrides(sample_root, "trainer.max_steps=2"), output_dir=first))
    weights = tmp_path / "weights"
    for folder in ("gram/finetuned_didemo", "gram/pretrained_tvas-tva"):  # T-VA: the tiny model's modalities
        shutil.copytree(list_checkpoints(first)[-1], weights / folder)

    tested = main.run(compose_config(*sample_overrides(sample_root, "mode=test", f"paths.weights_dir={weights}",
                                                       "checkpoint=gram-finetuned-didemo"), output_dir=tmp_path / "t"))
    assert next(iter(tested.values()))["checkpoint"] == str(weights / "gram/finetuned_didemo")

    loaded = []
    real_load = main.load_init_weights
    monkeypatch.setattr(main, "load_init_weights", lambda task, path: loaded.append(path) or real_load(task, path))
    main.run(compose_config(*sample_overrides(sample_root, "trainer.max_steps=1", f"paths.weights_dir={weights}",
                                              "init_from=gram-pretrained-tvas"), output_dir=tmp_path / "second"))
    assert loaded == [weights / "gram/pretrained_tvas-tva"]


def _rank_resolves(rank: int, port: int, weights: str, name: str, out: str) -> None:
    from datetime import timedelta
    from types import SimpleNamespace

    import torch.distributed as dist

    from gram.main import pretrained_source

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        cfg = SimpleNamespace(paths=SimpleNamespace(weights_dir=weights))
        try:
            outcome = f"path {pretrained_source(name, cfg, ['video', 'audio'])}"
        except Exception as err:
            outcome = f"error {type(err).__name__}: {err}"
        Path(out, f"rank{rank}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("present", [True, False])
def test_ranks_agree_rank0_converts_and_nobody_hangs(tmp_path, monkeypatch, present):
    """Two gloo ranks resolve a name: rank 0 alone converts (or fails), the other gets the same path (or an error
    naming rank 0) instead of waiting forever."""
    import torch.multiprocessing as mp

    from tests.test_distributed import free_port

    monkeypatch.setenv("GRAM_OFFLINE", "1")
    calls = tmp_path / "converter_calls.txt"
    calls.touch()

    def fake(argv):
        with open(calls, "a") as f:
            f.write(" ".join(argv) + "\n")
        Path(argv[3]).mkdir(parents=True)
        for name in ("model.safetensors", "config.json"):
            (Path(argv[3]) / name).write_text("{}")

    monkeypatch.setattr(P, "_run_converter", fake)
    weights = tmp_path / "weights"
    if present:
        write_release(weights / "gram/released/GRAM_pretrained_5modalities")
    # fork: the ranks inherit the imports and the replaced converter
    mp.start_processes(_rank_resolves, args=(free_port(), str(weights), "gram-pretrained-tvas", str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    if present:
        assert outcomes == [f"path {weights / 'gram/pretrained_tvas-tva'}"] * 2
        assert len(calls.read_text().splitlines()) == 1
    else:
        assert outcomes[0].startswith("error PretrainedNotFoundError: pretrained 'gram-pretrained-tvas' not found")
        assert outcomes[1].startswith("error UserError: 'gram-pretrained-tvas' could not be resolved on rank 0")
        assert calls.read_text() == ""
