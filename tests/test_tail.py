"""The teacher's schedule seen by its students: its tail (train.tail_steps: the teacher stops training before the
end and its students distil its final weights, frozen) and α that follows its progress
(distill.teacher_progress: lr), in a 2-rank run and across a restart."""
import math

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from conftest import launch, read_scalars, train_here

TAIL = ["train.max_steps=6", "train.tail_steps=2", "train.log_interval=1", "checkpoint.interval=4",
        "checkpoint.keep_last=0", "distill.teacher_progress=lr"]
# 8 steps, the teacher's 6 warming up over 2 (DeepSpeed's least) then decaying linearly to 0 after its last: its
# progress moves at each of its steps 5 and 6
DECAY = ["train.max_steps=8", "checkpoint.interval=6", "teacher.deepspeed.scheduler={type: WarmupDecayLR, params: "
         "{warmup_num_steps: 2, total_num_steps: auto, warmup_max_lr: 3.0e-3, warmup_type: linear}}"]


def weights(out, step, name="teacher"):
    return get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints" / f"step_{step:08d}" / name), tag="ds")


def test_a_two_rank_tail_freezes_the_teacher_and_its_students_distil_it(tmp_path):
    out = tmp_path / "run"
    proc = launch(f"output_dir={out}", *TAIL)
    assert "teacher: trains 4 steps, then runs frozen for the last 2 (train.tail_steps)" in proc.stdout
    scalars = read_scalars(out)
    assert sorted(scalars["teacher/train/loss"]) == sorted(scalars["teacher/train/lr"]) == [1, 2, 3, 4]
    assert sorted(scalars["teacher/frozen/loss_ce"]) == [5, 6]  # it scores the batches it no longer trains on
    assert sorted(scalars["student/train/loss_kd"])[-2:] == [5, 6]
    for tag in ("teacher/frozen/loss_ce", "student/train/loss_kd", "schedule/alpha", "schedule/teacher_progress"):
        assert all(math.isfinite(v) for v in scalars[tag].values()), tag
    # at a constant learning rate the teacher makes no progress until it stops: α is 0 until its tail
    progress, alpha = scalars["schedule/teacher_progress"], scalars["schedule/alpha"]
    assert [progress[k] for k in range(1, 7)] == [0, 0, 0, 0, 1, 1]
    assert [alpha[k] for k in range(1, 5)] == [0, 0, 0, 0] and alpha[5] > 0 and alpha[6] > 0
    before, after = weights(out, 4), weights(out, 6)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(a, b) for a, b in zip(weights(out, 4, "student").values(),
                                                      weights(out, 6, "student").values()))


def test_a_restart_continues_the_teachers_progress_and_tail_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_here(f"output_dir={straight}", *TAIL, *DECAY)
    train_here(f"output_dir={split}", *TAIL, *DECAY, "train.steps_this_run=4")
    train_here(f"output_dir={split}", *TAIL, *DECAY, "resume=auto")
    a, b = read_scalars(straight), read_scalars(split)
    progress, lr = a["schedule/teacher_progress"], a["teacher/train/lr"]  # lr logged at k: the one step k + 1 takes
    assert [progress[k] for k in range(3, 9)] == pytest.approx([0, 0, 0.25, 0.5, 1, 1])
    assert progress[5] == pytest.approx(1 - lr[4] / max(lr[k] for k in range(1, 5)))  # its peak: before the restart
    for tag in ("schedule/teacher_progress", "schedule/alpha", "student/train/loss", "student/train/loss_kd"):
        for step in range(5, 9):
            assert a[tag][step] == pytest.approx(b[tag][step], rel=1e-6), (tag, step)
    wa, wb = weights(straight, 8, "student"), weights(split, 8, "student")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_teacher_rests_only_inside_a_tail():
    from codistill.config import TrainConfig

    plain, tailed = TrainConfig(max_steps=6), TrainConfig(max_steps=6, tail_steps=2)
    assert not any(plain.teacher_rests(step) for step in range(12))  # past max_steps too (a debugging call)
    assert [tailed.teacher_rests(step) for step in range(7)] == [False] * 4 + [True] * 3
