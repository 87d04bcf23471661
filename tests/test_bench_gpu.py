"""bench/gpu.py: the smoke run measures every section on the CPU, writes its JSON, and a failing section is
recorded while the others still run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu  # noqa: E402  (bench/gpu.py)


def _run(tmp_path: Path, *extra: str, status: int = 0) -> dict:
    """Smoke runs exit 1 when a case failed other than by running out of memory, so CI notices."""
    out = tmp_path / "gpu.json"
    assert gpu.main(["--smoke", "--out", str(out), *extra]) == status
    return json.loads(out.read_text())


@pytest.mark.slow
def test_smoke_run_measures_each_section_and_writes_json(tmp_path, capsys):
    result = _run(tmp_path, "--sections", "attention", "step", "loss", "eval")
    records = {(r["section"], r["name"]): r for r in result["records"]}
    assert all(r["status"] == "ok" for r in records.values()), records
    # Every encoder's attention goes through SDPA (2 tiny layers each), never an explicit softmax.
    for modality in ("text", "video", "audio", "subtitle"):
        assert records["attention", modality]["sdpa_calls"] == 2
        assert records["attention", modality]["softmax_calls"] == 0
    for ckpt in ("off", "on"):
        for batch in (2, 4):
            row = records["step", f"B={batch} ckpt={ckpt}"]
            assert row["batch"] == batch and row["samples_per_s"] > 0
            assert row["samples_per_s"] == pytest.approx(batch / (row["step_ms"] / 1000), rel=0.02)
    assert result["summary"]["flops_per_sample"] > 1e6  # counted by torch.utils.flop_counter
    assert records["step", "trainer reads at once B=2"]["samples_per_s"] > 0
    assert records["step", "trainer reads late B=2"]["speedup"] > 0
    assert {r["name"] for r in result["records"] if r["section"] == "loss"} == {"B=64 k=3", "B=128 k=3"}
    assert all(r["fwdbwd_vs_matmul"] > 0 for r in result["records"] if r["section"] == "loss")
    assert records["eval", "N=200 k=3"]["vs_matmul"] > 0
    assert result["environment"]["card"].startswith("CPU")
    printed = capsys.readouterr().out
    assert "| step | B=4 ckpt=on | ok |" in printed


def test_a_failing_case_is_recorded_and_the_other_sections_still_run(tmp_path, monkeypatch):
    import torch

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(gpu, "time_steps", out_of_memory)
    monkeypatch.setattr(gpu, "section_attention", lambda *a: (_ for _ in ()).throw(RuntimeError("boom\nsecond line")))
    result = _run(tmp_path, "--sections", "attention", "step", "eval", status=1)
    status = {(r["section"], r["name"]): r["status"] for r in result["records"]}
    assert status["attention", "(section)"] == "error: RuntimeError: boom second line"
    # The ladder stops at the first batch that does not fit, for each setting.
    assert status["step", "B=2 ckpt=off"] == "OOM" and status["step", "B=2 ckpt=on"] == "OOM"
    assert ("step", "B=4 ckpt=off") not in status
    assert status["eval", "N=200 k=3"] == "ok"


@pytest.mark.slow
def test_a_case_past_its_time_limit_is_recorded_as_a_timeout():
    run = gpu.Run(budget_s=30, smoke=True)
    with run.guard("step", "slow", 1.5) as record:
        while True:
            sum(range(1000))
    assert record["status"].startswith("timeout")
    with run.guard("step", "after", 5) as record:
        pass
    assert record["status"] == "ok"


def test_peak_table_matches_device_names():
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA H200") == 989.4
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.peak_tflops("NVIDIA L40S") == 362.05
    assert gpu.peak_tflops("Tesla V100-SXM2-32GB") is None and gpu.peak_tflops("Some GPU") is None


@pytest.mark.slow
def test_the_smoke_command_with_compile(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    records = json.loads(out.read_text())["records"]
    compiled = next(r for r in records if r["section"] == "compile" and r["name"].startswith("compiled"))
    assert compiled["status"] == "ok" and compiled["blocks_compiled"] == 6  # 2 blocks x 3 encoders


@pytest.mark.slow
def test_the_device_command_returns_every_result_file(tmp_path):
    """bench/device_run.sh is what a GPU session runs unattended: its smoke run leaves the results, logs, the
    kernel summary and the compressed trace in $OUT (at most 8 files come back from the device machine)."""
    env = {**os.environ, "OUT": str(tmp_path), "GPU_BUDGET_S": "120"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "device_run.sh"), "--smoke"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) <= 8 and {"gpu.json", "gpu.log", "trace.log", "bench-README.md"} <= set(names), names
    assert any(n.endswith(".trace.json.gz") for n in names) and any(n.startswith("kernels-") for n in names)
    assert json.loads((tmp_path / "gpu.json").read_text())["records"]
