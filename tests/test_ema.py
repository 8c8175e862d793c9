"""The smoothed teacher (distill.teacher_ema): its update against the formula, its fp32 average beside a bf16
model, its partitions read back on another number of ranks, a 2-rank run's tags, an exact restart and the
config's refusals."""
import math
from types import SimpleNamespace

import pytest
import torch

from codistill import ema
from codistill.config import ConfigError, load_config
from conftest import MICRO, launch, read_scalars, train_here

RUN = ["distill.teacher_ema=0.5", "train.max_steps=6", "train.log_interval=1", "checkpoint.interval=3",
       "checkpoint.keep_last=0"]


def member(module: torch.nn.Module) -> SimpleNamespace:
    return SimpleNamespace(engine=SimpleNamespace(module=module), name="teacher")


def pair(dtype=torch.float32):
    torch.manual_seed(0)
    teacher, shadow = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3).to(dtype)
    return teacher, shadow, ema.SmoothedTeacher(member(teacher), member(shadow), 0.9)


def test_the_average_starts_at_the_teacher_and_follows_the_formula():
    teacher, shadow, smoothed = pair()
    assert torch.equal(shadow.weight, teacher.weight)
    before = teacher.weight.detach().clone()
    with torch.no_grad():
        teacher.weight.add_(1.0)
    smoothed.update()
    assert torch.allclose(shadow.weight, 0.9 * before + 0.1 * teacher.weight)


def test_a_bf16_model_keeps_its_average_in_fp32():
    teacher, shadow, smoothed = pair(torch.bfloat16)
    start = smoothed.average[0].clone()
    with torch.no_grad():  # steps of 0.1·1e-3: each below bf16's resolution near 0.1-0.5
        teacher.weight.add_(1e-3)
    for _ in range(20):
        smoothed.update()
    moved = smoothed.average[0] - start
    assert smoothed.average[0].dtype == torch.float32
    assert torch.allclose(moved, torch.full_like(moved, 1e-3 * (1 - 0.9 ** 20)), atol=1e-6)
    assert torch.equal(shadow.weight, smoothed.average[0].to(torch.bfloat16))


class Partitioned(torch.nn.Module):
    """A parameter partitioned as ZeRO-3 does: rank r holds elements [r·p, (r+1)·p) of it, padded at the end."""

    def __init__(self, whole: torch.Tensor, rank: int, world: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        part = math.ceil(whole.numel() / world)
        padded = torch.nn.functional.pad(whole.reshape(-1), (0, part * world - whole.numel()))
        self.w.ds_tensor, self.w.ds_numel = padded[rank * part:(rank + 1) * part].clone(), whole.numel()


def test_partitions_saved_on_three_ranks_load_on_two(monkeypatch, tmp_path):
    whole = torch.arange(10, dtype=torch.float32)
    files = []
    for rank in range(3):
        m = Partitioned(whole, rank, 3)
        state = ema.SmoothedTeacher(member(m), member(Partitioned(whole * 0, rank, 3)), 0.5).rank_state(rank)
        files.append(tmp_path / f"rank_{rank}.pt")
        torch.save(state, files[-1])
    for rank in range(2):
        monkeypatch.setattr(ema, "_rank_world", lambda r=rank: (r, 2))
        target = Partitioned(whole * 0, rank, 2)
        smoothed = ema.SmoothedTeacher(member(Partitioned(whole * 0, rank, 2)), member(target), 0.5)
        smoothed.load(files, lambda f: torch.load(f, weights_only=True))
        assert torch.equal(target.w.ds_tensor, whole[rank * 5:(rank + 1) * 5])


def test_a_checkpoint_without_an_average_is_refused_in_one_line(tmp_path):
    _, _, smoothed = pair()
    torch.save({"data": {}}, tmp_path / "rank_0.pt")
    with pytest.raises(ConfigError, match=r"distill.teacher_ema=0.9: .* holds no moving average of the teacher"):
        smoothed.load([tmp_path / "rank_0.pt"], lambda f: torch.load(f, weights_only=True))


@pytest.mark.parametrize("overrides, message", [
    (["mode=hard", "distill.teacher_ema=0.9"], r"distill.teacher_ema=0.9: .* in mode codistill \(here mode hard\)"),
    (["distill.teacher_ema=0.9", "students.0.distill={teacher_ema: 0.5}"],
     r"student.distill.teacher_ema=0.5: one smoothed teacher serves every student"),
])
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(MICRO, overrides)


def test_a_two_rank_run_logs_the_smoothed_teacher_and_its_students_read_it(tmp_path):
    """Also with the teacher partitioned (ZeRO-3): each rank moves its partition, to the same average."""
    out, partitioned = tmp_path / "run", tmp_path / "zero3"
    proc = launch(f"output_dir={out}", *RUN)
    assert "teacher_ema: " in proc.stdout and "the moving average of teacher's weights, decay 0.5" in proc.stdout
    assert "(from teacher_ema;" in proc.stdout
    scalars = read_scalars(out)
    for tag in ("teacher_ema/frozen/loss_ce", "teacher_ema/eval/loss", "student/train/loss_kd", "teacher/train/loss"):
        assert tag in scalars and all(math.isfinite(v) for v in scalars[tag].values()), tag
    assert sorted(scalars["teacher_ema/frozen/loss_ce"]) == list(range(1, 7))
    launch(f"output_dir={partitioned}", *RUN, "teacher.deepspeed.zero_optimization.stage=3")
    zero3 = read_scalars(partitioned)["teacher_ema/eval/loss"]
    assert zero3 == pytest.approx(scalars["teacher_ema/eval/loss"], rel=1e-5)
    assert zero3[6] != pytest.approx(read_scalars(partitioned)["teacher/eval/loss"][6], rel=1e-3)


def test_a_restart_continues_the_average_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_here(f"output_dir={straight}", *RUN)
    train_here(f"output_dir={split}", *RUN, "train.steps_this_run=3")
    train_here(f"output_dir={split}", *RUN, "resume=auto")
    a, b = read_scalars(straight), read_scalars(split)
    for tag in ("teacher_ema/frozen/loss_ce", "student/train/loss", "teacher_ema/eval/loss"):
        for step in (4, 5, 6):
            if step in a[tag]:
                assert a[tag][step] == pytest.approx(b[tag][step], rel=1e-6), (tag, step)


@pytest.mark.parametrize("half, stage", [(False, 2), (True, 3)])
def test_the_memory_estimate_counts_the_average(half, stage):
    from codistill.memory import estimate

    extra = [f"teacher.deepspeed.zero_optimization.stage={stage}"] + (["teacher.deepspeed.bf16={enabled: true}"] if half
                                                                      else [])
    plain = estimate(load_config(MICRO, extra), world_size=2, device="cuda")
    est = estimate(load_config(MICRO, [*extra, "distill.teacher_ema=0.9"]), world_size=2, device="cuda")
    teacher, shadow = est.models[0], est.models[1]
    assert shadow.name == "teacher_ema" and not shadow.trainable and shadow.grads == shadow.optimizer == 0
    share = teacher.parameters // (2 if stage == 3 else 1)
    assert shadow.params == share * (2 + 4 if half else 4)  # its weights, and the fp32 average beside bf16 ones
    assert est.resident - plain.resident == shadow.params
    assert est.step_peak() > plain.step_peak()


def test_the_average_moves_once_per_optimizer_step_under_accumulation(tmp_path):
    from codistill import distributed
    from codistill.trainer import Trainer

    trainer = Trainer(load_config(MICRO, [f"output_dir={tmp_path}", "distill.teacher_ema=0.5", "train.max_steps=2",
                                          "train.gradient_accumulation_steps=2", "checkpoint.interval=0"]))
    moved, update = [], trainer.smoothed.update
    trainer.smoothed.update = lambda: (moved.append(trainer.step), update())
    try:
        trainer.fit()
    finally:
        distributed.shutdown()
    assert moved == [0, 1]


def test_in_the_teachers_tail_the_average_goes_on_towards_its_final_weights(tmp_path):
    """Three teacher steps, then three of its tail: the average moves after each of the six, and ends closer to
    the final teacher than where the tail found it."""
    from codistill import distributed
    from codistill.trainer import Trainer

    trainer = Trainer(load_config(MICRO, [f"output_dir={tmp_path}", "distill.teacher_ema=0.5", "train.max_steps=6",
                                          "train.tail_steps=3", "checkpoint.interval=0"]))
    moved, update, gaps = [], trainer.smoothed.update, []

    def follow():
        moved.append(trainer.step)
        update()
        live = dict(trainer.smoothed.teacher.engine.module.named_parameters())
        gaps.append(sum(float((p.detach() - live[n].detach()).abs().sum())
                        for n, p in trainer.smoothed.shadow.engine.module.named_parameters()))

    trainer.smoothed.update = follow
    try:
        trainer.fit()
    finally:
        distributed.shutdown()
    assert moved == [0, 1, 2, 3, 4, 5]
    assert gaps[5] < gaps[4] < gaps[3] and gaps[5] == pytest.approx(gaps[2] / 8, rel=1e-3)
