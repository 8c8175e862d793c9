"""The teacher's tail (train.tail_steps): the teacher stops training before the end and its students distil its
final weights, frozen; in a 2-rank run, and across a restart inside the tail."""
import math

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from conftest import launch, read_scalars, train_here

TAIL = ["train.max_steps=6", "train.tail_steps=2", "train.log_interval=1", "checkpoint.interval=4",
        "checkpoint.keep_last=0"]


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
    for tag in ("teacher/frozen/loss_ce", "student/train/loss_kd", "schedule/alpha"):
        assert all(math.isfinite(v) for v in scalars[tag].values()), tag
    before, after = weights(out, 4), weights(out, 6)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(a, b) for a, b in zip(weights(out, 4, "student").values(),
                                                      weights(out, 6, "student").values()))


def test_a_restart_inside_the_tail_continues_it_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_here(f"output_dir={straight}", *TAIL)
    train_here(f"output_dir={split}", *TAIL, "train.steps_this_run=5")
    train_here(f"output_dir={split}", *TAIL, "resume=auto")
    a, b = read_scalars(straight), read_scalars(split)
    for tag in ("teacher/frozen/loss_ce", "student/train/loss", "student/train/loss_kd", "schedule/alpha"):
        assert a[tag][6] == pytest.approx(b[tag][6], rel=1e-6), tag
    wa, wb = weights(straight, 6, "student"), weights(split, 6, "student")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
