"""Exact resume: a stopped run continues as if never stopped (ZeRO-2 and ZeRO-3, on fewer ranks), resume=auto
picks this run's newest intact checkpoint, pruning and corrupted files. Crashes and signals: test_faults.py."""
import json
import math
import shutil

import pytest
import torch

from conftest import after, launch, read_layout, read_scalars, resumed_beside, train_cli_here, zero_weights

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


def two_ranks(out, *overrides):
    proc = launch(f"output_dir={out}", *COMMON, *overrides)
    return proc.stdout + proc.stderr


def per_step(out):
    scalars = read_scalars(out)
    return {tag: scalars[tag] for tag in TRACKED}


@pytest.fixture(scope="module")
def straight_zero2(tmp_path_factory):
    """An uninterrupted 2-rank ZeRO-2 run, the reference for several resume tests."""
    out = tmp_path_factory.mktemp("straight") / "run"
    two_ranks(out)
    return out


@pytest.fixture(scope="module")
def split_zero2(tmp_path_factory):
    """The same run stopped at step 4 (train.steps_this_run), and its log: each test that resumes it
    works on a copy."""
    out = tmp_path_factory.mktemp("split") / "run"
    return out, two_ranks(out, "train.steps_this_run=4")


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
    """ZeRO-2: stopped at step 4 (train.steps_this_run) and continued with resume=auto. ZeRO-3: the straight run's
    own step-4 checkpoint continued in another folder (resume=<checkpoint>), one launch fewer."""
    zero = [f"teacher.deepspeed.zero_optimization.stage={stage}", f"students.0.deepspeed.zero_optimization.stage={stage}",
            *(ON_POLICY if stage == 3 else [])]
    if stage == 2:  # the runs other tests share
        straight = request.getfixturevalue("straight_zero2")
        split, first = request.getfixturevalue("split_zero2")
        assert "stopping at step 4 (train.steps_this_run); continue with resume=auto" in first
        second = two_ranks(copy_of(split, tmp_path / "split"), *zero, "resume=auto")
        start = 1
    else:
        straight = tmp_path / "straight"
        first = two_ranks(straight, *zero, "checkpoint.interval=4")
        proc = resumed_beside(straight, 4, tmp_path / "split", *COMMON, *zero, "checkpoint.interval=4")
        second, start = proc.stdout + proc.stderr, 5
    assert "held-out probe: " in first and "blocks of training documents set aside" in first
    assert "resumed from" in second and "step_00000004 at step 4" in second
    assert "since step 0" in second  # the summary knows the start from the checkpoint
    a, b = per_step(straight), per_step(tmp_path / "split")
    for tag in TRACKED:
        assert sorted(b[tag]) == list(range(start, 9)), tag
        assert [a[tag][s] for s in range(start, 9)] == [b[tag][s] for s in range(start, 9)], tag
    if stage == 3:  # a 2-rank ZeRO-3 on-policy run: its tags present, finite, and the same after the restart
        sampled, resumed = read_scalars(straight), read_scalars(tmp_path / "split")
        for tag in SAMPLED:
            assert after(sampled, 4)[tag] == resumed[tag] and all(map(math.isfinite, sampled[tag].values())), tag
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
    assert sorted(signal) == [1, 4, 7]
    assert read_scalars(tmp_path / "split")["benefit/signal"] == {k: v for k, v in signal.items() if k >= start}
    assert len(set(a["benefit/openness"].values())) > 1  # the gate moved, and moved alike after the restart
    wa, wb = zero_weights(straight, 8), zero_weights(tmp_path / "split", 8)
    for name in wa:
        for key in wa[name]:
            assert torch.equal(wa[name][key], wb[name][key]), (name, key)


def test_corrupted_checkpoint_is_named_and_auto_resume_falls_back(tmp_path, caplog):
    out = tmp_path / "run"
    train_cli_here(f"output_dir={out}", "checkpoint.interval=2", "checkpoint.keep_last=0", "train.max_steps=4")
    newest = out / "checkpoints" / "step_00000004"
    victim = next(p for p in sorted((newest / "student").rglob("*.pt")))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    explicit = train_cli_here(f"output_dir={out}", f"resume={newest}", "train.max_steps=6", ok=False)
    assert explicit.returncode == 2
    assert explicit.stderr.strip().splitlines()[-1] == (
        f"codistill-train: error: resume: checkpoint file {victim} is corrupted (sha256 differs from the manifest)")
    auto = train_cli_here(f"output_dir={out}", "resume=auto", "train.max_steps=6")
    assert f"skipping step_00000004: checkpoint file {victim} is corrupted" in caplog.text
    assert "step_00000002 at step 2" in auto.stdout


def test_checkpoints_are_pruned_only_after_a_newer_one_is_complete(tmp_path, caplog):
    out = tmp_path / "run"
    train_cli_here(f"output_dir={out}", "checkpoint.interval=1", "checkpoint.keep_last=2", "train.max_steps=4")
    assert "could not remove" not in caplog.text  # (a rescaled resume's conversion folder is removed only if made)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000004"]
    state = json.loads((out / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["step"] == 4


def test_resume_path_without_a_checkpoint_is_refused(tmp_path):
    proc = train_cli_here(f"output_dir={tmp_path / 'o'}", f"resume={tmp_path}", ok=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"codistill-train: error: resume: {tmp_path} is not a complete checkpoint (no manifest.json)"


def test_a_two_rank_checkpoint_resumes_on_one_rank(tmp_path, caplog, straight_zero2, split_zero2):
    """Saved by 2 ranks, resumed by 1 with twice the accumulation (same global batch, same
    samples): the continuation matches the 2-rank run up to float summation order."""
    copy_of(split_zero2[0], tmp_path / "split")
    proc = train_cli_here(f"output_dir={tmp_path / 'split'}", *COMMON, "resume=auto",
                            "train.gradient_accumulation_steps=2")
    assert "resuming a 2-rank checkpoint on 1 rank(s) through DeepSpeed's universal checkpoint" in caplog.text
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
    train_cli_here(f"output_dir={out}", "checkpoint.interval=3", "checkpoint.keep_last=0")
    train_cli_here(f"output_dir={out}", "overwrite=true", "train.max_steps=2", "checkpoint.keep_last=1")
    root = out / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000003", "step_00000006"]
    assert (root / "latest").read_text().split()[0] == "step_00000002"
    # continued with nothing but its folder: no --config (not the embedded default: the run's own config)
    resumed = train_cli_here(f"output_dir={out}", "resume=auto", "train.max_steps=4", config=None)
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
    train_cli_here(f"output_dir={out}", "checkpoint.interval=2", "checkpoint.keep_last=0", "train.max_steps=4")
    return out
