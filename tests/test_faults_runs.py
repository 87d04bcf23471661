"""Faults around runs and their folders: preemption of the whole process group, runs sharing a folder, sweeps,
damaged checkpoints and a full disk. Each case keeps the work, names the culprit in one line, prints no traceback."""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gram.checkpoint_format import list_checkpoints
from gram.cli import UserError
from gram.main import run
from gram.train import rundir
from gram.train.logger import read_metrics
from tests.conftest import ROOT, compose_config, sample_overrides

# A short run that stops early (no final evaluation) with a checkpoint after every step.
SHORT = ("trainer.max_steps=6", "trainer.save_every=1", "trainer.keep_last=3", "data.batch_size=8")


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _steps(out: Path) -> list[str]:
    return [p.name for p in list_checkpoints(out)]


@pytest.fixture(scope="module")
def two_checkpoints(sample_root, tmp_path_factory) -> Path:
    """A run stopped at step 2 with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("two") / "run"
    run(compose_config(*sample_overrides(sample_root, *SHORT, "trainer.stop_after_steps=2"), output_dir=out))
    assert _steps(out) == ["step_00000001", "step_00000002"]
    return out


@pytest.fixture
def copy_of_run(two_checkpoints, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out, symlinks=True)
    (out / rundir.LOCK_FILE).unlink(missing_ok=True)
    return out


def _resume(sample_root, out: Path, *extra: str) -> dict:
    return run(compose_config(*sample_overrides(sample_root, *SHORT, "trainer.resume=true", *extra), output_dir=out))


# ------------------------------------------------------------------------------------------------ preemption
def _start_training(cmd: list[str], out, timeout: float) -> subprocess.Popen:
    """Start a run in its own process group (as SLURM or a shell job would) and return once it has logged two
    steps (or ended, or `timeout` seconds passed)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not (
            metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.3)
    return proc


@pytest.mark.slow
def test_loader_workers_leave_stop_signals_to_the_main_process():
    from gram.data.loader import leave_signals_to_main

    code = ("import os, signal, time\nfrom gram.data.loader import leave_signals_to_main\nleave_signals_to_main(0)\n"
            "os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2)\n"
            "print('survived', signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0 and "survived True" in proc.stdout, proc.stderr
    assert callable(leave_signals_to_main)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_to_the_process_group_saves_and_the_printed_command_resumes(sig, sample_root, tmp_path):
    """SIGTERM from SLURM / `kill -- -PGID`, or Ctrl-C, reach the loader workers too: the run still saves."""
    out = tmp_path / "preempted"
    cmd = [sys.executable, str(ROOT / "run.py"), *sample_overrides(
        sample_root, "trainer.max_steps=100000", "data.batch_size=8", "data.num_workers=2"), f"output_dir={out}"]
    proc, metrics = _start_training(cmd, out, timeout=300), out / "metrics.jsonl"
    os.killpg(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr + stdout and "killed by signal" not in stderr
    last = read_metrics(metrics)[-1]["step"]
    assert _steps(out) == [f"step_{last:08d}"] and not (out / "results.json").exists()
    console = stdout + stderr
    assert f"output folder: {out}" in console and f"saved checkpoint at step {last}" in console
    line = next(x for x in console.splitlines() if "resume with: " in x)
    assert f"stopped at step {last} by {sig.name}" in line
    resume = shlex.split(line.split("resume with: ", 1)[1])
    assert resume[:2] == ["python", "run.py"] and f"output_dir={out}" in resume and "trainer.resume=true" in resume
    again = subprocess.run([sys.executable, str(ROOT / "run.py"), *resume[2:], f"trainer.stop_after_steps={last + 1}"],
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{last:08d}'} at step {last}" in again.stdout + again.stderr
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, last + 2))


# ------------------------------------------------------------------------------------------------ folders
@pytest.mark.slow
def test_a_second_run_in_a_held_folder_fails_at_once_naming_folder_and_holder(sample_root, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    lock = rundir.RunLock(out)
    lock.acquire()
    try:
        with pytest.raises(UserError, match=f"output_dir {out} is in use by another run \\(pid {os.getpid()} on "):
            run(compose_config(*sample_overrides(sample_root, "trainer.max_steps=2"), output_dir=out))
        proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *sample_overrides(sample_root), f"output_dir={out}"],
                              cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and str(out) in errors[0] and f"pid {os.getpid()}" in errors[0]
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    assert not (out / ".hydra").exists()  # the live run's record is never overwritten
    rundir.RunLock(out).acquire()  # released: the folder is free again


def test_a_fresh_run_refuses_a_folder_with_another_runs_checkpoints(copy_of_run, sample_root):
    before = {p: p.stat().st_mtime_ns for p in copy_of_run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already holds checkpoints of another run .*trainer.resume=true") as error:
        run(compose_config(*sample_overrides(sample_root, *SHORT), output_dir=copy_of_run))
    assert str(copy_of_run) in str(error.value)
    after = {p: p.stat().st_mtime_ns for p in copy_of_run.rglob("*") if p.is_file() and p.name != rundir.LOCK_FILE}
    assert after == {p: t for p, t in before.items() if p.name != rundir.LOCK_FILE}  # nothing touched


def test_default_folders_of_jobs_started_in_the_same_second_differ(tmp_path):
    base = tmp_path / "outputs" / "2026-12-01" / "10-00-00"
    first = rundir.claim_default_folder(base, "host:1:1.0")
    second = rundir.claim_default_folder(base, "host:2:1.0")
    assert first == base and second == base.with_name("10-00-00_1")
    assert rundir.claim_default_folder(base, "host:1:1.0") == first  # another rank of the first job
    taken = tmp_path / "outputs" / "old"
    taken.mkdir()
    (taken / "results.json").write_text("{}")  # an unclaimed folder in use (older gram, the user)
    assert rundir.claim_default_folder(taken, "host:3:1.0") == taken.with_name("old_1")


def test_the_default_output_dir_is_claimed_for_the_launch(tmp_path):
    code = ("from gram.train.rundir import unique_run_dir; import os; a = unique_run_dir('outs'); "
            "print(a, os.readlink(os.path.join(a, '.claim')))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    folders = [p.communicate(timeout=120)[0].split() for p in procs]
    assert folders[0][0] != folders[1][0] and all(f[0].startswith("outs/") for f in folders)
    assert folders[0][1] != folders[1][1]  # each claimed by its own process


@pytest.mark.slow
def test_multirun_gives_every_job_its_own_folder(sample_root, tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", *sample_overrides(
        sample_root, "trainer.max_steps=2,3", "data.batch_size=8"), f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, steps in (("0", 2), ("1", 3)):
        folder = out / job
        result = json.loads((folder / "results.json").read_text())["sample"]
        assert result["checkpoint"] == str(folder / "checkpoints" / f"step_{steps:08d}")
        assert _steps(folder) == [f"step_{steps:08d}"]
        assert [r["step"] for r in read_metrics(folder / "metrics.jsonl")] == list(range(1, steps + 1))
        assert (folder / "run.log").exists() and (folder / ".hydra" / "overrides.yaml").exists()
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_slurm_script_names_the_folder_by_experiment_overrides_and_array_task(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, body in (("scontrol", "echo node0"), ("srun", 'echo "$@"')):
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)

    def folder(*args: str, **env: str) -> str:
        full = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node0",
                "SLURM_NNODES": "1", "SLURM_JOB_ID": "7", **env}
        out = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_train.sh"), *args], env=full, capture_output=True,
                             text=True, timeout=60, check=True).stdout
        return out.split("output_dir=", 1)[1].split()[0]

    msrvtt = folder("experiment=finetune_msrvtt_tvas")
    assert msrvtt.startswith("outputs/slurm/finetune_msrvtt_tvas-")
    assert folder("experiment=finetune_msrvtt_tvas") == msrvtt  # resubmitting resumes
    assert folder("experiment=finetune_didemo_tva") != msrvtt
    assert folder("experiment=finetune_msrvtt_tvas", "trainer.lr=1e-5") != msrvtt
    assert folder("experiment=finetune_msrvtt_tvas", SLURM_ARRAY_TASK_ID="3") == msrvtt + "_task3"
    assert folder("experiment=finetune_msrvtt_tvas", OUTPUT_DIR="/shared/x") == "/shared/x"


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.slow
def test_damaged_weights_are_named_in_one_line(copy_of_run, sample_root, tmp_path):
    weights = copy_of_run / "checkpoints" / "step_00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *sample_overrides(sample_root, "mode=test"),
                           f"checkpoint={weights.parent}", f"output_dir={tmp_path / 'eval'}"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and f"{weights} is damaged" in errors[0]


@pytest.mark.parametrize("damage", ["train_state.pt", "model.safetensors", "rng_rank0.pt"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(damage, copy_of_run, sample_root, caplog):
    newest = copy_of_run / "checkpoints" / "step_00000002"
    (newest / damage).write_bytes(b"\0" * 100)
    with caplog.at_level(logging.INFO):
        _resume(sample_root, copy_of_run, "trainer.stop_after_steps=3")
    warning = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
    assert str(newest / damage) in warning and str(copy_of_run / "checkpoints" / "step_00000001") in warning
    assert f"resumed from {copy_of_run / 'checkpoints' / 'step_00000001'} at step 1" in caplog.text
    assert (copy_of_run / "checkpoints" / "damaged_step_00000002" / damage).exists()  # kept for inspection
    assert _steps(copy_of_run) == ["step_00000001", "step_00000002", "step_00000003"]
    assert [r["step"] for r in read_metrics(copy_of_run / "metrics.jsonl")] == [1, 2, 3]


def test_resume_with_every_checkpoint_damaged_names_them(copy_of_run, sample_root):
    for folder in list_checkpoints(copy_of_run):
        (folder / "train_state.pt").write_bytes(b"")
    with pytest.raises(UserError, match="no readable checkpoint in .*step_00000002.*step_00000001"):
        _resume(sample_root, copy_of_run)


def test_a_half_written_metrics_line_does_not_block_resume(copy_of_run, sample_root, caplog):
    metrics = copy_of_run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "loss": 1.2')
    with caplog.at_level(logging.INFO):
        _resume(sample_root, copy_of_run, "trainer.stop_after_steps=3")
    assert f"{metrics} line 3 is incomplete" in caplog.text
    assert (f"stopped at step 3 by trainer.stop_after_steps; checkpoint {copy_of_run / 'checkpoints' / 'step_00000003'}"
            f"; resume with: python run.py output_dir={copy_of_run} trainer.resume=true") in caplog.text
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3]
    assert all(json.loads(line) for line in metrics.read_text().splitlines())


@pytest.mark.parametrize("failure", ["oserror", "torch_unexpected_pos"])
def test_a_full_disk_during_save_keeps_the_earlier_checkpoints(failure, copy_of_run, sample_root, monkeypatch):
    from gram.train import checkpoint as ckpt

    if failure == "oserror":
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(ckpt, "save_weights", full)
    else:  # what torch.save says when the disk fills; the disk itself tells the cause
        real_save = ckpt.torch.save

        def full(obj, path, *args, **kwargs):
            if Path(path).name == "train_state.pt":
                raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 832 vs 768")
            return real_save(obj, path, *args, **kwargs)
        monkeypatch.setattr(ckpt.torch, "save", full)
        monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 4096))
    with pytest.raises(ckpt.CheckpointSaveError, match="no space left on device") as error:
        _resume(sample_root, copy_of_run, "trainer.stop_after_steps=3")
    assert f"could not save checkpoint {copy_of_run / 'checkpoints' / 'step_00000003'}" in str(error.value)
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in (copy_of_run / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]


# ------------------------------------------------------------------------------------------------ units
def test_read_metrics_drops_only_unparsable_lines(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert f"{path} line 2" in caplog.text and f"{path} line 5" in caplog.text


def test_resume_command_keeps_overrides_and_drops_the_stop_point():
    command = rundir.resume_command("/runs/a b", ["trainer.max_steps=9", "model.modalities=[video,audio]",
                                                  "trainer.stop_after_steps=4", "output_dir=/old", "trainer.resume=false"])
    assert shlex.split(command) == ["python", "run.py", "trainer.max_steps=9", "model.modalities=[video,audio]",
                                    "output_dir=/runs/a b", "trainer.resume=true"]


@pytest.mark.slow
def test_sigterm_to_a_torchrun_group_saves_on_every_rank(sample_root, tmp_path):
    """torchrun, 2 gloo ranks with loader workers: all ranks stop after the same step and save one checkpoint.
    (The torchrun agent itself reports the signal with a traceback of its own; gram's processes print none.)"""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           str(ROOT / "run.py"), *sample_overrides(sample_root, "trainer.max_steps=100000", "data.batch_size=8",
                                                   "data.num_workers=1"), f"output_dir={out}"]
    proc, metrics = _start_training(cmd, out, timeout=400), out / "metrics.jsonl"
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    last = read_metrics(metrics)[-1]["step"]
    saved = list_checkpoints(out)
    assert [p.name for p in saved] == [f"step_{last:08d}"], stderr[-3000:]
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in saved[0].iterdir()}
    assert "resume with: torchrun --nproc_per_node 2 run.py" in stdout + stderr
    assert f'File "{ROOT / "gram"}' not in stderr and "killed by signal" not in stderr


def _save_with_a_failing_rank(rank: int, world: int, port: int, out: str, queue) -> None:
    import torch
    import torch.distributed as torch_dist

    from gram.train import checkpoint as ckpt

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    module = torch.nn.Linear(2, 2)
    ckpt.save_checkpoint(out, 1, module, {}, {"step": 1}, keep_last=3)
    if rank == 1:  # this rank's disk fills while it writes its RNG state
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        ckpt.torch.save = full
    try:
        ckpt.save_checkpoint(out, 2, module, {}, {"step": 2}, keep_last=3)
        queue.put((rank, "saved"))
    except ckpt.CheckpointSaveError as error:
        queue.put((rank, str(error)))
    torch_dist.destroy_process_group()


@pytest.mark.slow
def test_a_save_failing_on_one_rank_fails_on_every_rank_and_keeps_the_earlier_checkpoint(tmp_path):
    """No rank waits forever for a rank whose disk is full: all raise the failing rank's one-line reason."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_save_with_a_failing_rank, args=(r, 2, 29561, str(tmp_path), queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank in (0, 1):
        assert results[rank].startswith(f"could not save checkpoint {tmp_path / 'checkpoints' / 'step_00000002'}: "
                                        "no space left on device"), results
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]


def test_stop_request_counts_a_second_ctrl_c_only_after_a_pause(monkeypatch):
    from gram.train.trainer import StopRequest

    with StopRequest() as stop:  # the terminal's SIGINT and torchrun's forwarded copy arrive together
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGINT"
    monkeypatch.setattr(StopRequest, "REPEAT_AFTER_S", 0.0)
    with pytest.raises(KeyboardInterrupt), StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM changes nothing
        assert stop.signal_name == "SIGTERM"
        time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)  # a later Ctrl-C stops at once
        time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
