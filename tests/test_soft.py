"""Soft-label distillation from a frozen pretrained teacher (live logits)."""
import json

import pytest

from codistill.config import ConfigError, load_config

from conftest import MICRO, ROOT, launch, read_scalars


def test_soft_mode_needs_a_pretrained_teacher():
    with pytest.raises(ConfigError, match="mode=soft distils from a trained, frozen teacher"):
        load_config(MICRO, ["mode=soft"])
    assert load_config(ROOT / "configs" / "soft.yaml").mode == "soft"


STUDENT = ("{name: %s, config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
           "num_key_value_heads: 2, max_position_embeddings: 64}, distill: {divergence: %s}, "
           "deepspeed: {zero_optimization: {stage: 2}, optimizer: {type: AdamW, params: {lr: 0.003}}}}")


def test_frozen_zero3_teacher_is_partitioned_unchanged_and_still_logged(tmp_path, pretrained_teacher):
    """Two students learn from one frozen teacher (ZeRO-3 across 2 ranks)."""
    out = tmp_path / "run"
    students = f"students=[{STUDENT % ('student', 'forward_kl')}, {STUDENT % ('second', 'jsd')}]"
    proc = launch(f"output_dir={out}", "mode=soft", f"teacher.pretrained={pretrained_teacher}",
                  "teacher.config={}", "teacher.deepspeed=configs/ds/zero3_cpu.json", students)
    log = proc.stdout + proc.stderr
    line = next(x for x in log.splitlines() if x.startswith("teacher: "))
    assert "ZeRO stage 3, bf16=False, frozen" in line and f" parameters (from {pretrained_teacher}), " in line
    total = int(line.split(" parameters")[0].split(": ")[1].replace(",", ""))
    shards = [int(x.replace(",", "")) for x in line.split("stored per rank: ")[1].split()]
    assert all(abs(s - total / 2) / total < 0.02 for s in shards)
    tb = read_scalars(out)
    evals = list(tb["teacher/eval/loss"].values())
    assert len(evals) == 3 and evals[0] == evals[-1]  # same weights, same validation batches
    assert len(tb["teacher/frozen/loss_ce"]) == 6  # its CE on every batch, the reference of the teacher lead
    assert "teacher/train/loss" not in tb  # it scores; it does not train
    steps = [x for x in log.splitlines() if x.startswith("step ") and not x.startswith("step 0:")]
    assert steps and not any("teacher" in x for x in steps)
    assert any(x.startswith("eval at step") and "teacher" in x for x in log.splitlines()), log[-3000:]
    assert "teacher/train/lr" not in tb
    for name in ("student", "second"):
        losses = list(tb[f"{name}/eval/loss"].values())
        assert losses[-1] < losses[0]
        assert len(tb[f"{name}/train/loss_kd"]) == 6
        assert tb[f"distill/teacher_lead/{name}"]  # against the frozen teacher's CE on the same batches
    state = json.loads((out / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["models"] == ["student", "second"]  # the frozen teacher is not re-saved
