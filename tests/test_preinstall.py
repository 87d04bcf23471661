"""preinstall.sh's optional torchcodec set-up never fails the base install when apt cannot help.

Python, pip and apt-get are stand-ins on a PATH of their own, so the test runs in a second and installs nothing.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/bin/bash
echo "python $*" >> "$LOG"
if [[ "$1" == "-c" && "$2" == *torchcodec* ]]; then [[ -f "$FFMPEG_OK" ]]; exit; fi
if [[ "$1" == "-" ]]; then cat > /dev/null; fi
exit 0
"""


def _run(tmp_path: Path, *args: str, apt: str | None) -> tuple[subprocess.CompletedProcess, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("dirname", "id", "cat"):
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} not on PATH")
        (bin_dir / tool).unlink(missing_ok=True)
        (bin_dir / tool).symlink_to(found)
    python = bin_dir / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    (bin_dir / "apt-get").unlink(missing_ok=True)
    if apt is not None:
        (bin_dir / "apt-get").write_text(f'#!/bin/bash\necho "apt-get $*" >> "$LOG"\n{apt}\n')
        (bin_dir / "apt-get").chmod(0o755)
    log = tmp_path / "log"
    log.write_text("")
    env = {"PATH": str(bin_dir), "LOG": str(log), "FFMPEG_OK": str(tmp_path / "ffmpeg_ok"), "HOME": str(tmp_path)}
    result = subprocess.run([shutil.which("bash") or "/bin/bash", str(ROOT / "preinstall.sh"), *args],
                            capture_output=True, text=True, env=env, timeout=60)
    return result, log.read_text()


def test_base_install_does_not_touch_apt_or_torchcodec(tmp_path):
    result, log = _run(tmp_path, apt="exit 1")
    assert result.returncode == 0, result.stderr
    assert "-e .[dev]" in log and "apt-get" not in log and "torchcodec" not in log


@pytest.mark.skipif(os.geteuid() != 0, reason="the apt path runs as root (or with password-less sudo)")
def test_torchcodec_without_apt_warns_and_still_succeeds(tmp_path):
    result, log = _run(tmp_path, "torchcodec", apt=None)
    assert result.returncode == 0, result.stderr
    assert "-e .[dev,torchcodec]" in log
    assert "apt-get install libavcodec59" in result.stderr and "data.video_backend=torchcodec" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the apt path runs as root (or with password-less sudo)")
def test_torchcodec_with_failing_apt_warns_and_still_succeeds(tmp_path):
    result, log = _run(tmp_path, "torchcodec", apt="exit 100")
    assert result.returncode == 0, result.stderr
    assert "apt-get update" in log and "could not install" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the apt path runs as root (or with password-less sudo)")
def test_torchcodec_with_working_apt_installs_the_ffmpeg_libraries(tmp_path):
    ok = tmp_path / "ffmpeg_ok"
    result, log = _run(tmp_path, "torchcodec", "decord", apt=f'[[ "$1" == install ]] && : > {ok}; exit 0')
    assert result.returncode == 0, result.stderr
    assert "-e .[dev,torchcodec,decord]" in log
    assert "--no-install-recommends libavcodec59 libavformat59" in log
    assert "torchcodec loads the system FFmpeg" in result.stdout


def test_an_unknown_extra_stops_with_the_choices(tmp_path):
    result, _ = _run(tmp_path, "ffmpeg", apt=None)
    assert result.returncode == 1 and "unknown extra 'ffmpeg'" in result.stderr and "torchcodec" in result.stderr
