"""Never lose a run: exact resume, preemption, crashes during a save, corrupted files."""
import json
import math
import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from codistill.distributed import free_port

from conftest import MICRO, ROOT, launch, launch_cmd, launch_env, read_layout, read_scalars

TRACKED = ["teacher/train/loss", "student/train/loss", "student/train/loss_kd", "teacher/train/lr",
           "student/train/grad_norm", "schedule/alpha", "benefit/openness"]
# The teacher-lead schedule's and the benefit gate's state must survive the restart too (the gate
# measures at steps 1, 4 and 7: the split at 4 carries two measurements' state across), and so
# must the student's peak learning rate (α x lr / peak lr, under a schedule that peaks at step 2).
# The gate's probe is the held-out documents' (benefit_probe: heldout): drawn by step, nothing saved.
COMMON = ["train.max_steps=8", "distill.schedule=lead", "distill.lead_scale=0.01", "distill.burn_in_steps=0",
          "distill.benefit_interval=3", "distill.alpha_decay=lr", "distill.benefit_probe=heldout",
          "students.0.deepspeed.scheduler={type: WarmupDecayLR, params: {warmup_num_steps: 2, total_num_steps: 8, "
          "warmup_max_lr: 3.0e-3, warmup_type: linear}}"]


def deepspeed(out, *overrides):
    proc = launch(f"output_dir={out}", *COMMON, *overrides, how="deepspeed")
    return proc.stdout + proc.stderr


def per_step(out):
    scalars = read_scalars(out)
    return {tag: scalars[tag] for tag in TRACKED}


def final_weights(out, step=8):
    root = out / "checkpoints" / f"step_{step:08d}"
    return {name: get_fp32_state_dict_from_zero_checkpoint(str(root / name), tag="ds") for name in ("teacher", "student")}


@pytest.fixture(scope="module")
def straight_zero2(tmp_path_factory):
    """An uninterrupted 2-rank ZeRO-2 run, the reference for several resume tests."""
    out = tmp_path_factory.mktemp("straight") / "run"
    deepspeed(out)
    return out


@pytest.fixture(scope="module")
def split_zero2(tmp_path_factory):
    """The same run stopped at step 4 (train.steps_this_run), and its log: each test that resumes it
    works on a copy."""
    out = tmp_path_factory.mktemp("split") / "run"
    return out, deepspeed(out, "train.steps_this_run=4")


def copy_of(run, folder):
    shutil.copytree(run, folder)
    return folder


# At ZeRO-3 the student is also on-policy (on steps 1, 4, 6, 7, 8: the draw from seed 7): its samples,
# drawn per rank and step, and the teacher's scores of them must come out the same after the restart.
ON_POLICY = ["distill.on_policy={fraction: 0.5, prefix_tokens: 8, max_new_tokens: 8}",
             "teacher.deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
             "students.0.deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]
SAMPLED = ["student/on_policy/loss", "student/on_policy/teacher_logp", "student/on_policy/length",
           "student/eval/teacher_logp"]


@pytest.mark.parametrize("stage", [2, 3])
def test_stop_and_resume_mid_epoch_matches_an_uninterrupted_run_bitwise(tmp_path, request, stage):
    zero = [f"teacher.deepspeed.zero_optimization.stage={stage}", f"students.0.deepspeed.zero_optimization.stage={stage}",
            *(ON_POLICY if stage == 3 else [])]
    if stage == 2:  # the runs other tests share
        straight = request.getfixturevalue("straight_zero2")
        split, first = request.getfixturevalue("split_zero2")
        copy_of(split, tmp_path / "split")
    else:
        straight = tmp_path / "straight"
        deepspeed(straight, *zero)
        first = deepspeed(tmp_path / "split", *zero, "train.steps_this_run=4")
    assert "stopping at step 4 (train.steps_this_run); continue with resume=auto" in first
    assert "held-out probe: " in first and "blocks of training documents set aside" in first
    second = deepspeed(tmp_path / "split", *zero, "resume=auto")
    assert "resumed from" in second and "step_00000004 at step 4" in second
    assert "since step 0" in second  # the summary knows the start from the checkpoint
    a, b = per_step(straight), per_step(tmp_path / "split")
    for tag in TRACKED:
        assert sorted(b[tag]) == list(range(1, 9)), tag
        assert [a[tag][s] for s in range(1, 9)] == [b[tag][s] for s in range(1, 9)], tag
    if stage == 3:  # a 2-rank ZeRO-3 on-policy run: its tags present, finite, and the same after the restart
        sampled, resumed = read_scalars(straight), read_scalars(tmp_path / "split")
        for tag in SAMPLED:
            assert sampled[tag] == resumed[tag] and all(map(math.isfinite, sampled[tag].values())), tag
        assert sorted(sampled["student/on_policy/loss"]) == [1, 4, 6, 7, 8]
        assert all(1 <= v <= 8 for v in sampled["student/on_policy/length"].values())
        assert 0 < min(sampled["student/on_policy/generate_share"].values()) < 1
        assert any("on its own samples" in chart for chart in read_layout(straight))
    assert max(a["schedule/alpha"].values()) > 0  # the lead state was live across the restart
    # α at step k = α_max · clip(lead / lead_scale) · openness · lr / peak lr, from the gap and the
    # learning rate logged at step k − 1 (both are what the step after them starts from).
    scalars = read_scalars(straight)
    gap, lr = scalars["schedule/lead"], scalars["student/train/lr"]
    for k in range(2, 9):
        peak = max(lr[j] for j in range(1, k))  # 0 at the first step: no peak yet, no decay
        decay = lr[k - 1] / peak if peak > 0 else 1.0
        expected = 0.5 * min(1.0, max(0.0, gap[k - 1] / 0.01)) * a["benefit/openness"][k] * decay
        assert a["schedule/alpha"][k] == pytest.approx(expected, rel=1e-5, abs=1e-9), k
    assert lr[7] < 0.5 * max(lr.values()) and a["schedule/alpha"][8] > 0  # the decay was live at the end
    signal = scalars["benefit/signal"]
    assert sorted(signal) == [1, 4, 7] and read_scalars(tmp_path / "split")["benefit/signal"] == signal
    assert len(set(a["benefit/openness"].values())) > 1  # the gate moved, and moved alike after the restart
    wa, wb = final_weights(straight), final_weights(tmp_path / "split")
    for name in wa:
        for key in wa[name]:
            assert torch.equal(wa[name][key], wb[name][key]), (name, key)


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
    resumed = launch(f"output_dir={out}", f"train.max_steps={step + 2}", "resume=auto", how="deepspeed")
    assert f"at step {step}" in resumed.stdout and f"step {step + 2}/{step + 2}" in resumed.stdout


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
    resumed = launch(f"output_dir={out}", "resume=auto", how="python")
    assert "step_00000002 at step 2" in resumed.stdout
    assert (root / "step_00000006" / "manifest.json").exists() and not (root / ".staging_step_00000004").exists()


def test_corrupted_checkpoint_is_named_and_auto_resume_falls_back(tmp_path):
    out = tmp_path / "run"
    launch(f"output_dir={out}", "checkpoint.interval=2", "checkpoint.keep_last=0", "train.max_steps=4", how="python")
    newest = out / "checkpoints" / "step_00000004"
    victim = next(p for p in sorted((newest / "student").rglob("*.pt")))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    explicit = launch(f"output_dir={out}", f"resume={newest}", "train.max_steps=6", how="python", ok=False)
    assert explicit.returncode == 2
    assert explicit.stderr.strip().splitlines()[-1] == (
        f"codistill-train: error: resume: checkpoint file {victim} is corrupted (sha256 differs from the manifest)")
    auto = launch(f"output_dir={out}", "resume=auto", "train.max_steps=6", how="python")
    assert f"skipping step_00000004: checkpoint file {victim} is corrupted" in auto.stderr
    assert "step_00000002 at step 2" in auto.stdout


def test_checkpoints_are_pruned_only_after_a_newer_one_is_complete(tmp_path):
    out = tmp_path / "run"
    launch(f"output_dir={out}", "checkpoint.interval=1", "checkpoint.keep_last=2", "train.max_steps=4", how="python")
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000004"]
    state = json.loads((out / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["step"] == 4


def test_resume_path_without_a_checkpoint_is_refused(tmp_path):
    proc = launch(f"output_dir={tmp_path / 'o'}", f"resume={tmp_path}", how="python", ok=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"codistill-train: error: resume: {tmp_path} is not a complete checkpoint (no manifest.json)"


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
    launch(f"output_dir={straight}", "train.max_steps=3", how="python")
    for name, weights in final_weights(out, step=3).items():
        for key, tensor in weights.items():
            assert torch.equal(tensor, final_weights(straight, step=3)[name][key]), (name, key)
    cursors = [torch.load(run / "checkpoints" / "step_00000003" / "rank_00000.pt", weights_only=False)["data"]
               for run in (out, straight)]
    assert cursors[0] == cursors[1] == {"epoch": 0, "position": 3}
    resumed = launch(f"output_dir={out}", "resume=auto", how="python")
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


def test_a_two_rank_checkpoint_resumes_on_one_rank(tmp_path, straight_zero2, split_zero2):
    """Saved by 2 ranks, resumed by 1 with twice the accumulation (same global batch, same
    samples): the continuation matches the 2-rank run up to float summation order."""
    copy_of(split_zero2[0], tmp_path / "split")
    proc = launch(f"output_dir={tmp_path / 'split'}", *COMMON, "resume=auto", "train.gradient_accumulation_steps=2",
                  how="python")
    assert "resuming a 2-rank checkpoint on 1 rank(s) through DeepSpeed's universal checkpoint" in proc.stderr
    assert "world: 1 rank(s)" in proc.stdout and "at step 4" in proc.stdout
    a, b = per_step(straight_zero2), per_step(tmp_path / "split")
    # The student's step 8 follows its benefit gate's step-7 measurement, which on one rank sees one
    # micro-batch where two ranks saw two (and separated their noise): the gate measures the layout it
    # runs on, so only the steps before it can match.
    for tag, last in (("teacher/train/loss", 8), ("student/train/loss", 7)):
        for step in range(5, last + 1):
            assert b[tag][step] == pytest.approx(a[tag][step], rel=1e-4), (tag, step)


def test_resume_auto_continues_this_run_never_the_one_overwrite_wrote_beside(tmp_path):
    """Run A leaves checkpoints 3 and 6; run B (overwrite=true) starts afresh in the same folder
    and keeps one checkpoint: pruning leaves A's alone, and resume=auto (given no config) continues B
    with its own config, not A's higher step."""
    out = tmp_path / "run"
    launch(f"output_dir={out}", "checkpoint.interval=3", "checkpoint.keep_last=0", how="python")
    launch(f"output_dir={out}", "overwrite=true", "train.max_steps=2", "checkpoint.keep_last=1", how="python")
    root = out / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000003", "step_00000006"]
    assert (root / "latest").read_text().split()[0] == "step_00000002"
    # continued with nothing but its folder: no --config (not the embedded default: the run's own config)
    resumed = launch(f"output_dir={out}", "resume=auto", "train.max_steps=4", how="python", config=None)
    assert f"config: {out / 'config.yaml'} (the run's own; resume without --config)" in resumed.stdout
    assert "step_00000002 at step 2" in resumed.stdout
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000003", "step_00000004", "step_00000006"]
    # B's one checkpoint damaged where its run id is kept: ``latest`` still says whose run this is
    (root / "step_00000004" / "trainer_state.json").write_text("{not json")
    from codistill.checkpoint import find_resume

    assert find_resume(out, "auto") is None  # a fresh start, never A's intact step 3


@pytest.mark.parametrize("damage, problem", [
    (lambda m: [], "is corrupted (expected a files table"),
    (lambda m: {"files": {k: {"sha256": v["sha256"]} for k, v in m["files"].items()}}, "is corrupted"),
    (lambda m: {"files": {}}, "does not list trainer_state.json"),
    (lambda m: {"files": {k: v for k, v in m["files"].items() if k != "rank_00000.pt"}}, "does not list rank_00000.pt"),
    (lambda m: {"files": {**m["files"], "../outside": m["files"]["rank_00000.pt"]}}, "outside the checkpoint"),
])
def test_a_damaged_manifest_is_not_intact_and_auto_resume_falls_back(tmp_path, damage, problem, two_checkpoints):
    from codistill.checkpoint import find_resume, verify

    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    newest = out / "checkpoints" / "step_00000004"
    manifest = json.loads((newest / "manifest.json").read_text())
    (newest / "manifest.json").write_text(json.dumps(damage(manifest)))
    assert problem in verify(newest)
    assert find_resume(out, "auto") == out / "checkpoints" / "step_00000002"


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    launch(f"output_dir={out}", "checkpoint.interval=2", "checkpoint.keep_last=0", "train.max_steps=4", how="python")
    return out


def test_one_run_per_output_dir_and_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(launch_cmd(["--config", str(MICRO), f"output_dir={out}", "train.max_steps=100000",
                                         "train.log_interval=1"], how="python", ranks=1),
                             cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if line.startswith("step 1/"):
                break
        second = launch(f"output_dir={out}", "resume=auto", how="python", ok=False)
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stderr.strip().splitlines() == [
            f"codistill-train: error: output_dir: {out.resolve()} is in use by another run (pid {first.pid} on "
            f"{os.uname().nodename} since {json.loads((out / '.codistill.lock').read_text())['since']}); wait for it, "
            f"or remove {out.resolve() / '.codistill.lock'} if no run is using it"]
    finally:
        first.kill()  # as a crash would: the lock stays behind
        first.wait()
    assert (out / ".codistill.lock").exists()
    third = launch(f"output_dir={out}", "overwrite=true", "train.max_steps=2", how="python")
    assert f"taking over {out.resolve() / '.codistill.lock'}, left by pid {first.pid} which no longer runs" in third.stderr
    assert not (out / ".codistill.lock").exists()  # released at the end


def test_a_save_that_takes_longer_than_the_collective_timeout_completes(tmp_path):
    """Rank 0 takes 8 s over its share of the hashing, with collective_timeout_s=4: the other rank
    waits on the checkpoint's own (long) timeout, not the one that detects dead ranks."""
    out = tmp_path / "run"
    proc = launch(f"output_dir={out}", "train.max_steps=2", "train.eval_interval=2", "train.collective_timeout_s=4",
                  how="deepspeed", script="tests/helpers/slow_hash.py", timeout=400, SLOW_HASH_S="8")
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
    resumed = launch(f"output_dir={out}", "checkpoint.interval=2", "resume=auto", how="deepspeed")
    assert "step_00000002 at step 2" in resumed.stdout and verify(root / "step_00000006") is None


def test_a_really_full_disk(tmp_path):
    """The same on a real disk that fills up (a 22 MB tmpfs holds one checkpoint of the micro run
    and not two), where torch.save reports the full disk as a RuntimeError of its zip writer."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=22m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root); the injected full disk above covers the logic")
    try:
        out, root = disk / "run", disk / "run" / "checkpoints"
        proc = launch(f"output_dir={out}", "checkpoint.interval=2", "checkpoint.keep_last=0", how="python", ok=False)
        assert proc.returncode == 5 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(
            "codistill-train: error: checkpoint step_00000004: the disk is full (rank 0: No space left on device: ")
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    finally:
        subprocess.run(["umount", str(disk)])
