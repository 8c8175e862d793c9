"""Training runs that exercise the distillation choices end to end."""
import math

import pytest

from conftest import launch, read_layout, read_scalars, train_here

FROZEN_TEACHER = ["teacher.deepspeed.optimizer.params.lr=0.0"]


def scalars(out, tag):
    return list(read_scalars(out)[tag].values())


def test_every_divergence_trains_on_two_ranks_and_its_kd_term_falls(tmp_path):
    """Four students, one per divergence (one on top-k targets, one gated per token), learn
    from a fixed (frozen, randomly initialised) teacher with α = 1: each one's soft loss must come down."""
    students = []
    for i, extra in enumerate([
        {"divergence": "forward_kl"},
        {"divergence": "reverse_kl", "targets": "topk", "top_k": 32},
        {"divergence": "jsd", "beta": 0.5},
        {"divergence": "tvd"},
    ]):
        students.append(
            "{name: s%d, config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
            "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64}, "
            "distill: %s, deepspeed: {zero_optimization: {stage: 2}, optimizer: {type: AdamW, params: {lr: 0.01}}}}"
            % (i, "{" + ", ".join(f"{k}: {v}" for k, v in extra.items()) + "}")
        )
    out = tmp_path / "run"
    proc = launch(f"output_dir={out}", "train.max_steps=24", "train.eval_interval=24",
                  "distill.schedule=constant", "distill.alpha_max=1.0", "distill.burn_in_steps=0",
                  "distill.benefit_gate=false",  # α = 1 throughout: the divergences' own mechanics
                  "distill.temperature=1.0", "train.panel_interval=6", *FROZEN_TEACHER,
                  f"students=[{', '.join(students)}]")
    # The distillation panels: present for every student, every panel_interval steps, finite.
    tb = read_scalars(out)
    assert "distill/teacher_entropy" in tb
    for i in range(4):
        keys = ["teacher_lead", "student_entropy", "topk_mass", "kd_ce_grad_ratio",
                "kd_pos_000-007", "kd_pos_008-015", "kd_pos_016-023", "kd_pos_024-031"]
        for key in keys:
            values = list(tb[f"distill/{key}/s{i}"].values())
            assert len(values) == (24 if key == "teacher_lead" else 4), (key, i)
            assert all(math.isfinite(v) for v in values), (key, i, values)
        assert all(0.0 < m <= 1.0 for m in tb[f"distill/topk_mass/s{i}"].values())
        assert all(v > 0 for v in tb[f"distill/kd_ce_grad_ratio/s{i}"].values())
    assert sorted(tb["distill/teacher_entropy"]) == [6, 12, 18, 24]
    layout = read_layout(out)  # each student's own chart of its α, gate signal and gap
    for i in range(4):
        assert layout[f"s{i}: alpha and its sources' lead (running and this step)"] == [
            f"^schedule/alpha/s{i}$", f"^schedule/lead/s{i}$", f"^distill/teacher_lead/s{i}$"]
    assert len(layout["validation loss, every model"]) == 5
    assert "s1: top-32 targets hold 0.03 MB per micro-batch instead of 2.00 MB of full teacher logits" in proc.stdout
    for i in range(4):
        kd = scalars(out, f"s{i}/train/loss_kd")
        assert len(kd) == 24
        assert sum(kd[-4:]) / 4 < 0.9 * sum(kd[:4]) / 4, (i, kd)
        assert scalars(out, f"schedule/alpha/s{i}") == [1.0] * 24


def test_lead_alpha_stays_zero_while_the_teacher_is_behind(tmp_path):
    out = tmp_path / "behind"
    train_here(f"output_dir={out}", "train.max_steps=12", "distill.schedule=lead", "distill.burn_in_steps=0",
               *FROZEN_TEACHER)
    assert scalars(out, "schedule/alpha") == [0.0] * 12
    gap = scalars(out, "schedule/lead")
    assert gap[-1] < 0  # the student's CE is below the frozen teacher's


def test_lead_alpha_rises_once_the_teacher_is_ahead_and_gating_and_head_start_work(tmp_path):
    out = tmp_path / "ahead"
    train_here(f"output_dir={out}", "train.max_steps=12", "distill.schedule=lead", "distill.burn_in_steps=2",
               "distill.lead_scale=0.05", "distill.head_start_steps=3", "distill.token_filter=true",
               "distill.benefit_gate=false",  # the teacher-lead schedule alone
               "students.0.deepspeed.optimizer.params.lr=0.0")
    alpha = scalars(out, "schedule/alpha")
    # 3 steps of head start, then the student's own 2 burn-in steps at α = 0.
    assert alpha[:5] == [0.0] * 5 and alpha[5] > 0 and alpha[-1] == pytest.approx(0.5)
    assert len(scalars(out, "student/train/loss")) == 9  # the student joined after the head start
    assert len(scalars(out, "teacher/train/loss")) == 12
    gate = scalars(out, "student/train/token_filter_fraction")
    assert all(0.0 <= g <= 1.0 for g in gate) and gate[-1] > 0.5
