"""results.json helpers: full sha256, rounding of float noise, provenance (git commit read from a real repo)."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess

import pytest
import torch

import gram
from gram.provenance import file_sha256, git_commit, provenance, rounded


def test_file_sha256_is_the_full_digest(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 5000)  # > 1 MiB: several chunks
    digest = file_sha256(path)
    assert len(digest) == 64 and digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_rounding_removes_float_noise_everywhere():
    noisy = {"t2v_r1": 7.000000000000001, "ratio": 1 / 3, "n": 1000, "ok": True, "name": "x",
             "scorings": {"volume": {"r5": 0.1 + 0.2, "medr": 12.5}}, "list": [2.0000000000000004, 3],
             "nan": math.nan, "tiny": 1.23456789e-7}
    out = rounded(noisy)
    assert out["t2v_r1"] == 7.0 and json.dumps(out["t2v_r1"]) == "7.0"
    assert out["ratio"] == 0.333333 and out["scorings"]["volume"] == {"r5": 0.3, "medr": 12.5}
    assert out["list"] == [2.0, 3] and out["n"] == 1000 and out["ok"] is True and out["name"] == "x"
    assert math.isnan(out["nan"]) and out["tiny"] == pytest.approx(1.23457e-7, rel=1e-12)
    # recalls over up to 100k queries (multiples of 0.001 %) survive unchanged
    assert rounded(100 * 12345 / 100000) == 12.345


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_git_commit_of_a_checkout_and_of_a_plain_folder(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    assert git_commit(repo) == {"commit": _git(repo, "rev-parse", "HEAD"), "dirty": False}
    (repo / "a.py").write_text("x = 2\n")
    assert git_commit(repo)["dirty"] is True
    plain = tmp_path / "plain"
    plain.mkdir()
    assert git_commit(plain) is None


def test_provenance_names_versions_command_and_host():
    record = provenance(["run.py", "trainer.max_steps=3", "logger.wandb.notes=a b"])
    assert record["gram_version"] == gram.__version__ and record["torch_version"] == torch.__version__
    assert record["command"].endswith("run.py trainer.max_steps=3 'logger.wandb.notes=a b'")  # shell-quoted
    assert record["host"] and record["date"].endswith("+00:00")
    assert record["git"] is None or len(record["git"]["commit"]) == 40
