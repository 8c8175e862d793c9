"""The entry point started the three ways users start it, with 2 ranks on gloo."""
import json
import math
import re

import pytest

from conftest import launch, read_layout, read_scalars

TAGS = [
    "teacher/train/loss", "teacher/train/loss_ce", "teacher/train/lr", "teacher/train/grad_norm",
    "student/train/loss", "student/train/loss_ce", "student/train/lr", "student/train/grad_norm",
    "student/train/loss_kd", "schedule/alpha", "schedule/temperature", "perf/tokens_per_sec",
    "teacher/eval/loss", "student/eval/loss", "student/eval/agreement",
    "benefit/openness", "benefit/signal", "benefit/evidence", "benefit/signal_pull", "benefit/signal_length",  # the benefit gate
]


def log_of(proc):
    return proc.stdout + proc.stderr


def stored_per_rank(log: str, name: str) -> tuple[int, list[int]]:
    m = re.search(rf"{name}: ([\d,]+) parameters.*stored per rank: ([\d, ]+)", log)
    total = int(m.group(1).replace(",", ""))
    return total, [int(x.replace(",", "")) for x in m.group(2).split()]


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2") / "run"
    return out, log_of(launch(f"output_dir={out}", how="deepspeed"))


def test_deepspeed_two_ranks_zero2(zero2):
    out, log = zero2
    assert "world: 2 rank(s) on cpu (launcher)" in log
    assert re.search(r"data: shakespeare: [\d,]+ training blocks of 32 tokens \([\d,]+ tokens\), [\d,]+ validation "
                     r"blocks; tokenizer \S+ \(4,096 tokens\); 6 steps make [\d.e-]+ epochs", log)
    assert "Traceback" not in log
    total, stored = stored_per_rank(log, "teacher")
    assert stored == [total, total]  # ZeRO-2 keeps full parameters on every rank
    for name in ("teacher", "student"):
        assert (out / "checkpoints" / "step_00000006" / name / "latest").exists()
    assert (out / "config.yaml").exists()
    assert len(re.findall(r"FutureWarning", log)) == 0


def test_tensorboard_holds_every_tag_with_finite_values(zero2):
    out, _ = zero2
    scalars = read_scalars(out)
    for tag in TAGS:
        assert tag in scalars, tag
        assert all(math.isfinite(v) for v in scalars[tag].values()), tag
    alpha = list(scalars["schedule/alpha"].values())
    # The warm-up schedule (burn-in 2, ramp 2, then 0.5) times the benefit gate's openness from step 3 on,
    # which moved after its one measurement (at the student's first step after the burn-in).
    openness = scalars["benefit/openness"]
    assert sorted(openness) == [3, 4, 5, 6] and sorted(scalars["benefit/signal"]) == [3]
    assert openness[3] == 0.5 and openness[6] == openness[4] != 0.5
    assert len(alpha) == 6 and alpha[:2] == [0.0, 0.0] and alpha[-1] == pytest.approx(0.5 * openness[6])
    assert alpha[2] == pytest.approx(0.0) and alpha[3] == pytest.approx(0.25 * openness[4])
    assert sorted(scalars["teacher/eval/loss"]) == [0, 3, 6]
    assert list(scalars["schedule/temperature"].values()) == [2.0] * 6


def test_the_run_ends_with_a_summary_and_tensorboard_has_the_comparison_charts(zero2):
    out, log = zero2
    scalars = read_scalars(out)
    summary = log[log.index("run finished:"):].splitlines()
    final = {name: scalars[f"{name}/eval/loss"][6] for name in ("teacher", "student")}
    start = {name: scalars[f"{name}/eval/loss"][0] for name in ("teacher", "student")}
    assert summary[1] == (f"  teacher: validation loss {final['teacher']:.4f} (perplexity {math.exp(final['teacher']):,.1f}), "
                          f"{final['teacher'] - start['teacher']:+.4f} since step 0")
    assert summary[2] == (f"  student: validation loss {final['student']:.4f} (perplexity {math.exp(final['student']):,.1f}), "
                          f"{final['student'] - final['teacher']:+.4f} vs the teacher, "
                          f"{final['student'] - start['student']:+.4f} since step 0")
    assert summary[3] == ("  whether distilling beats training alone on this data: add students.N.twin=true (a copy "
                          "trained on cross-entropy alone, in this run) or run codistill-compare")
    assert re.fullmatch(r"  [\d.,]+ s of training in this run, [\d,]+ tokens/s", summary[4])
    assert summary[5] == f"  checkpoint: {out.resolve() / 'checkpoints' / 'step_00000006'}"
    assert summary[6].endswith(f"view them with: tensorboard --logdir {out.resolve() / 'tensorboard'}")
    layout = read_layout(out)
    assert layout["validation loss, every model"] == ["^teacher/eval/loss$", "^student/eval/loss$"]
    assert layout["student: alpha and its sources' lead (running and this step)"] == [
        "^schedule/alpha$", "^schedule/lead$", "^distill/teacher_lead$"]
    for chart, tags in layout.items():  # every chart shows something the run wrote
        for tag in tags:
            assert any(re.fullmatch(tag, t) for t in scalars), (chart, tag)


def test_deepspeed_two_ranks_zero3_partitions_every_model(tmp_path):
    # The student also runs in bf16 while the teacher stays fp32: the KD loss mixes dtypes.
    log = log_of(launch(
        f"output_dir={tmp_path / 'run'}", "train.max_steps=3", "teacher.deepspeed=configs/ds/zero3_cpu.json",
        "students.0.deepspeed.zero_optimization.stage=3",
        "students.0.deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
        "students.0.deepspeed.bf16.enabled=true", "students.0.gradient_checkpointing=true", how="deepspeed",
    ))
    for name in ("teacher", "student"):
        total, stored = stored_per_rank(log, name)
        assert len(stored) == 2
        for shard in stored:  # each rank holds about half (shards are padded to equal size)
            assert abs(shard - total / 2) / total < 0.02, (name, total, stored)
    assert re.search(r"student: [\d,]+ parameters \(random init\), ZeRO stage 3, bf16=True, sdpa attention, checkpointed", log)
    assert "FutureWarning" not in log
    assert re.search(r"eval at step 3: teacher \d+\.\d+ \| student \d+\.\d+", log)


def test_both_models_get_identical_batches_and_ranks_get_different_ones(tmp_path):
    launch(f"output_dir={tmp_path}", "train.gradient_accumulation_steps=2", "teacher.deepspeed.zero_optimization.stage=1",
           "distill.benefit_gate=false",  # its extra forwards of the student (a probe batch) would be recorded
           script="tests/helpers/record_batches.py", config=None)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    for rank in (r0, r1):
        assert len(rank["teacher"]) == 6 and rank["teacher"] == rank["student"]
    assert not set(r0["teacher"]) & set(r1["teacher"])


def test_python_debug_mode_runs_single_process_without_launcher(tmp_path):
    log = log_of(launch("--debug", f"output_dir={tmp_path}", how="python"))
    assert "world: 1 rank(s) on cpu (single)" in log
    assert "step 8/8" in log  # --debug shrinks the run and logs every step


def test_no_config_runs_the_embedded_default(tmp_path):
    log = log_of(launch("--debug", f"output_dir={tmp_path}", "train.max_steps=2", how="python", config=None))
    assert re.search(r"teacher: [67],\d{3},\d{3} parameters", log)
    assert (tmp_path / "checkpoints" / "step_00000002" / "student").is_dir()


def test_mpirun_two_ranks_discover_each_other_through_mpi4py(tmp_path):
    log = log_of(launch(f"output_dir={tmp_path}", "train.max_steps=3", how="mpirun"))
    assert "world: 2 rank(s) on cpu (mpi)" in log
    assert (tmp_path / "checkpoints" / "step_00000003" / "teacher").is_dir()
