"""Never lose a run: preemption (SIGTERM), a killed or silent rank, a crash or a full disk during a save, a
non-finite loss, two runs on one folder."""
import json
import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import torch

from codistill.distributed import free_port

from conftest import MICRO, ROOT, launch, launch_cmd, launch_env, read_scalars, train_cli_here, zero_weights


def test_sigterm_finishes_the_step_saves_and_exits_zero_then_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = launch_cmd(["--config", str(MICRO), f"output_dir={out}", "train.max_steps=500", "train.log_interval=1"])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 3/500"):
            break
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    for p in ranks:  # as SLURM or Kubernetes do: every training process gets SIGTERM
        p.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    log = "".join(seen) + rest
    assert proc.returncode == 0, log[-3000:]
    stopped = [line for line in log.splitlines() if "(signal SIGTERM); continue with resume=auto" in line]
    assert stopped, log[-3000:]
    step = int(stopped[0].split("stopping at step ")[1].split()[0])
    assert (out / "checkpoints" / f"step_{step:08d}" / "manifest.json").exists()
    resumed = launch(f"output_dir={out}", f"train.max_steps={step + 2}", "resume=auto")
    assert f"at step {step}" in resumed.stdout and f"step {step + 2}/{step + 2}" in resumed.stdout


def test_a_stop_while_the_output_dir_is_claimed_lands_after_its_lock_is_written(tmp_path, monkeypatch):
    """SIGTERM that arrives while the lock is being written is held back until the lock holds this process and
    its release is registered at exit: a stop can never leave a lock that nothing will remove."""
    from codistill import checkpoint

    class Stop(Exception):
        pass

    claimed = checkpoint._claimed

    def stopped_first(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # before the lock exists
        return claimed(*args)

    def stop(*_):
        raise Stop

    monkeypatch.setattr(checkpoint, "_claimed", stopped_first)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stop):
            checkpoint.claim(tmp_path / "run")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert json.loads((tmp_path / "run" / checkpoint.LOCK).read_text())["pid"] == os.getpid()


def test_sigterm_during_start_up_ends_with_one_line_and_frees_the_output_dir(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(launch_cmd(["--config", str(MICRO), f"output_dir={out}"], how="python", ranks=1), cwd=ROOT,
                            env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / ".codistill.lock").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)  # claimed at the end of the checks: the process group and engines come next
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        "codistill-train: error: stopped by SIGTERM before training began; no checkpoint was written")
    assert not (out / ".codistill.lock").exists()


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_to_resume_from(tmp_path):
    out = tmp_path / "run"
    proc = launch(f"output_dir={out}", how="python", script="tests/helpers/crash_during_save.py", config=None, ok=False)
    assert proc.returncode == -signal.SIGKILL
    root = out / "checkpoints"
    assert (root / "latest").read_text().split()[0] == "step_00000002"
    assert not (root / "step_00000004").exists() and (root / ".staging_step_00000004").exists()
    resumed = train_cli_here(f"output_dir={out}", "resume=auto")
    assert "step_00000002 at step 2" in resumed.stdout
    assert (root / "step_00000006" / "manifest.json").exists() and not (root / ".staging_step_00000004").exists()


def test_nan_loss_stops_with_a_checkpoint_of_the_last_good_state(tmp_path):
    out = tmp_path / "run"
    proc = launch("4", "--config", str(MICRO), f"output_dir={out}", how="python", script="tests/helpers/inject_nan.py",
                  config=None, ok=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("codistill-train: error: non-finite loss of student at step 4; saved the last good state to ")
    assert last.endswith("step_00000003 (train.nonfinite=stop)")
    # Every model and the data cursor as they were after step 3: the checkpoint equals that of an
    # uninterrupted 3-step run (the teacher had not stepped for step 4 when the student's loss failed).
    straight = tmp_path / "straight"
    train_cli_here(f"output_dir={straight}", "train.max_steps=3")
    for name, weights in zero_weights(out, 3).items():
        for key, tensor in weights.items():
            assert torch.equal(tensor, zero_weights(straight, 3)[name][key]), (name, key)
    cursors = [torch.load(run / "checkpoints" / "step_00000003" / "rank_00000.pt", weights_only=False)["data"]
               for run in (out, straight)]
    assert cursors[0] == cursors[1] == {"epoch": 0, "position": 3}
    resumed = train_cli_here(f"output_dir={out}", "resume=auto")
    assert "step_00000003 at step 3" in resumed.stdout


def test_nan_loss_with_skip_policy_skips_that_update_and_counts_it(tmp_path):
    out = tmp_path / "run"
    launch("4", "--config", str(MICRO), f"output_dir={out}", "train.nonfinite=skip", how="python",
           script="tests/helpers/inject_nan.py", config=None)
    scalars = read_scalars(out)
    assert list(scalars["student/train/skipped_steps"].values()) == [0, 0, 0, 1, 1, 1]
    assert sorted(scalars["student/train/loss"]) == [1, 2, 3, 5, 6]
    assert len(scalars["teacher/train/loss"]) == 6


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "silent"])
def test_a_dead_or_silent_rank_ends_the_job_through_the_trainers_own_handling(tmp_path, fault):
    """Two ranks started as bare processes (no launcher that could stop them for us): when
    rank 1 dies or hangs, rank 0 itself must end with exit code 4 and one 'lost contact'
    line, within train.collective_timeout_s (plus start-up slack)."""
    timeout_s, port, ranks = 10, str(free_port()), []
    for rank in range(2):
        env = launch_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=port)
        ranks.append(subprocess.Popen(
            launch_cmd(["--config", str(MICRO), f"output_dir={tmp_path}", "train.max_steps=100000",
                        "train.log_interval=1", f"train.collective_timeout_s={timeout_s}"], how="python", ranks=1),
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        for line in ranks[0].stdout:
            if line.startswith("step 2/"):
                break
        start = time.monotonic()
        ranks[1].send_signal(fault)
        _, err = ranks[0].communicate(timeout=120)
        elapsed = time.monotonic() - start
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
    assert ranks[0].returncode == 4, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("codistill-train: error: rank 0: lost contact with another rank, ending the job ("), last
    assert elapsed < timeout_s + 15, elapsed


def test_one_run_per_output_dir_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    first = subprocess.Popen(launch_cmd(["--config", str(MICRO), f"output_dir={out}", "train.max_steps=100000",
                                         "train.log_interval=1"], how="python", ranks=1),
                             cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if line.startswith("step 1/"):
                break
        second = train_cli_here(f"output_dir={out}", "resume=auto", ok=False)
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stderr.strip().splitlines() == [
            f"codistill-train: error: output_dir: {out.resolve()} is in use by another run (pid {first.pid} on "
            f"{os.uname().nodename} since {json.loads((out / '.codistill.lock').read_text())['since']}); wait for it, "
            f"or remove {out.resolve() / '.codistill.lock'} if no run is using it"]
    finally:
        first.kill()  # as a crash would: the lock stays behind
        first.wait()
    assert (out / ".codistill.lock").exists()
    train_cli_here(f"output_dir={out}", "overwrite=true", "train.max_steps=2")
    lock = out.resolve() / ".codistill.lock"
    assert f"taking over {lock}, left by pid {first.pid} which no longer runs" in caplog.text
    assert not (out / ".codistill.lock").exists()  # released at the end


def test_a_save_that_takes_longer_than_the_collective_timeout_completes(tmp_path):
    """Rank 0 takes 8 s over its share of the hashing, with collective_timeout_s=4: the other rank
    waits on the checkpoint's own (long) timeout, not the one that detects dead ranks."""
    out = tmp_path / "run"
    proc = launch(f"output_dir={out}", "train.max_steps=2", "train.eval_interval=2", "train.collective_timeout_s=4",
                  script="tests/helpers/slow_hash.py", timeout=400, SLOW_HASH_S="8")
    assert (out / "checkpoints" / "step_00000002" / "manifest.json").exists(), proc.stdout[-2000:]
    from codistill.checkpoint import verify

    assert verify(out / "checkpoints" / "step_00000002") is None


def test_a_full_disk_during_a_save_ends_every_rank_with_one_line_and_keeps_the_earlier_checkpoint(tmp_path):
    """Rank 1's disk fills up part-way through a file of the step-4 save: both ranks stop together
    (exit 5, not a lost rank), the unfinished checkpoint is gone, step 2 and ``latest`` are as they
    were, and the run resumes from step 2 once there is space."""
    from codistill.checkpoint import verify

    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    proc = launch(f"output_dir={out}", "checkpoint.interval=2", script="tests/helpers/full_disk.py", ok=False,
                  how="deepspeed", FULL_DISK_RANK="1", FULL_DISK_STEP="4")
    assert proc.returncode == 5, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "codistill-train: error" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr and "lost contact" not in proc.stderr, errors
    assert errors[0].startswith("codistill-train: error: checkpoint step_00000004: the disk is full (rank 1: No space left "
                                "on device: ") and "the earlier ones are kept (newest: step_00000002)" in errors[0]
    needed = float(errors[0].split("it needs about ")[1].split(" MB")[0]) * 1e6
    stored = sum(f.stat().st_size for f in (root / "step_00000002").rglob("*.pt"))
    assert 0.8 < needed / stored < 1.25, (needed, stored)  # the size a checkpoint of this run takes
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    assert (root / "latest").read_text().split()[0] == "step_00000002" and verify(root / "step_00000002") is None
    resumed = launch(f"output_dir={out}", "checkpoint.interval=2", "resume=auto")
    assert "step_00000002 at step 2" in resumed.stdout and verify(root / "step_00000006") is None


def test_a_really_full_disk(tmp_path):
    """The same on a real disk that fills up (a 22 MB tmpfs holds one checkpoint of the micro run
    and not two), where torch.save reports the full disk as a RuntimeError of its zip writer. In the
    test's own process: nothing of the failed save stays open (the disk unmounts at once), and the free
    space the error reports is the disk's once the unfinished checkpoint is gone."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=22m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root); the injected full disk above covers the logic")
    try:
        out, root = disk / "run", disk / "run" / "checkpoints"
        proc = train_cli_here(f"output_dir={out}", "checkpoint.interval=2", "checkpoint.keep_last=0", ok=False)
        assert proc.returncode == 5 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("codistill-train: error: checkpoint step_00000004: the disk is full (rank 0: No space "
                               "left on device: ")
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
        free = float(last.split(" MB is free in ")[0].rsplit(" ", 1)[1]) * 1e6
        assert abs(free - shutil.disk_usage(disk).free) < 0.2e6, (free, shutil.disk_usage(disk).free)
    finally:
        unmounted = subprocess.run(["umount", str(disk)], capture_output=True, text=True)
        if unmounted.returncode:
            subprocess.run(["umount", "-l", str(disk)])  # detached all the same: the machine keeps no mount
    assert unmounted.returncode == 0, unmounted.stderr  # "target is busy": a file of the failed save still open
