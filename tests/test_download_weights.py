"""The weight download script, with the network calls replaced by local files."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture()
def script(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("download_weights", ROOT / "scripts" / "download_weights.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    calls = []

    def fake_hub_download(repo_id, filename):
        calls.append((repo_id, filename))
        path = tmp_path / "hub" / repo_id / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{repo_id}/{filename}")
        return str(path)

    def fake_urlretrieve(url, target):
        calls.append(("url", url))
        open(target, "w").write(url)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub_download)
    monkeypatch.setattr(module.urllib.request, "urlretrieve", fake_urlretrieve)
    module.calls = calls
    return module


def test_downloads_every_file_into_the_expected_tree(script, tmp_path):
    weights = tmp_path / "weights"
    script.main(["--weights-dir", str(weights), "--beats-url", "https://example.org/beats.pt"])
    expected = {"clip/EVA01_CLIP_g_14_psz14_s11B.pt", "beats/BEATs_iter3_plus_AS2M.pt",
                "bert/bert-base-uncased/config.json", "bert/bert-base-uncased/vocab.txt",
                "bert/bert-base-uncased/model.safetensors"}
    assert {str(p.relative_to(weights)) for p in weights.rglob("*") if p.is_file()} == expected
    assert (weights / "bert/bert-base-uncased/vocab.txt").read_text() == "google-bert/bert-base-uncased/vocab.txt"
    assert ("url", "https://example.org/beats.pt") in script.calls


def test_existing_files_are_kept_and_beats_without_url_is_skipped(script, tmp_path, capsys):
    weights = tmp_path / "weights"
    (weights / "bert/bert-base-uncased").mkdir(parents=True)
    (weights / "bert/bert-base-uncased/vocab.txt").write_text("mine")
    script.main(["--weights-dir", str(weights), "--only", "bert", "beats"])
    assert (weights / "bert/bert-base-uncased/vocab.txt").read_text() == "mine"
    assert ("google-bert/bert-base-uncased", "vocab.txt") not in script.calls
    assert not (weights / "beats").exists()
    assert "--beats-url" in capsys.readouterr().err
