"""scripts/download_weights.py: names and groups through gram.pretrained, with the network calls replaced."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from gram import pretrained as P
from gram.cli import run_with_clear_errors
from tests.conftest import ROOT, shared_path

SCRIPT = ROOT / "scripts" / "download_weights.py"


@pytest.fixture()
def script(monkeypatch):
    spec = importlib.util.spec_from_file_location("download_weights", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for var in ("GRAM_WEIGHTS_DIR", "GRAM_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    calls = []

    def fake(source, dest, progress):
        calls.append(source.url.split("?")[0])
        if dest.is_dir():
            for name in source.files:
                data = (shared_path("data", "bert-base-uncased", "vocab.txt").read_bytes() if name == "vocab.txt"
                        else name.encode())
                (dest / name).write_bytes(data)
        else:
            dest.write_bytes(source.url.encode())

    for kind in ("url", "hf"):
        monkeypatch.setitem(P.FETCHERS, kind, fake)
    module.calls = calls
    return module


def test_help_is_instant_and_imports_no_torch():
    code = (f"import runpy, sys\nsys.argv = [{str(SCRIPT)!r}, '--help']\n"
            f"try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            f"except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "gram-pretrained-tvas" in out.stdout and out.stdout.strip().endswith("False")


def test_encoders_group_downloads_into_the_expected_tree(script, tmp_path, capsys):
    if not shared_path("data", "bert-base-uncased", "vocab.txt").is_file():
        pytest.skip("../shared is absent")
    assert script.main(["encoders", "--weights-dir", str(tmp_path)]) == 0
    expected = {"clip/EVA01_CLIP_g_14_psz14_s11B.pt", "beats/BEATs_iter3_plus_AS2M.pt",
                "bert/bert-base-uncased/config.json", "bert/bert-base-uncased/vocab.txt",
                "bert/bert-base-uncased/model.safetensors"}
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()} == expected
    assert capsys.readouterr().out.count("ready ") == 3
    script.calls.clear()
    assert script.main(["eva01-clip-g-14", "bert-base-uncased", "--weights-dir", str(tmp_path)]) == 0
    assert script.calls == []  # present files are kept, nothing downloaded again
    assert script.main(["--verify", "bert-base-uncased", "--weights-dir", str(tmp_path)]) == 0
    assert "sha256 checked: vocab.txt" in capsys.readouterr().out


def test_verify_flags_a_corrupted_file(script, tmp_path, capsys):
    bert = tmp_path / "bert" / "bert-base-uncased"
    bert.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (bert / name).write_text("{}")
    (bert / "vocab.txt").write_bytes(b"y" * 231508)
    assert script.main(["--verify", "bert-base-uncased", "eva01-clip-g-14", "--weights-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "BAD     bert-base-uncased" in out and "sha256" in out and "missing  eva01-clip-g-14" in out


def test_list_shows_what_is_here(script, tmp_path, capsys):
    (tmp_path / "beats").mkdir()
    (tmp_path / "beats" / "BEATs_iter3_plus_AS2M.pt").write_bytes(b"b")
    assert script.main(["--list", "--weights-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("here") and "beats-iter3-plus-as2m" in line for line in lines)
    assert any(line.startswith("missing") and "gram-pretrained-tvasd" in line for line in lines)
    assert script.calls == []


@pytest.mark.parametrize("argv, needle", [(["gram-pretrained-tvs"], "did you mean gram-pretrained-tvas"),
                                          (["beats-iter3-plus-as2m"], "download_weights.py beats-iter3-plus-as2m")])
def test_errors_are_one_line_and_exit_2(script, tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.setenv("GRAM_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_:
        run_with_clear_errors(lambda: script.main([*argv, "--weights-dir", str(tmp_path)]))
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and needle in err and err.startswith("error: ") and "\n" not in err
    assert script.calls == []
