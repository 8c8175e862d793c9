"""The trainer with ``distill.fused_linear`` on against the logits path, in the test process: the same
micro run (same seeds, batches and weights) gives the same losses, benefit-gate measurements, panels
and validation figures at every step, for co-distillation and a frozen soft teacher; and ``auto``
decides as documented."""
import math

import pytest

from codistill.config import load_config
from codistill.fused import FUSED_AUTO_VOCAB
from codistill.trainer import Trainer

from conftest import MICRO, launch, read_scalars

STEPS = 6
SHOWN = ("/train/loss", "benefit/", "distill/", "schedule/alpha")


def _trace(tmp, overrides):
    trainer = Trainer(load_config(MICRO, [f"output_dir={tmp}", "train.panel_interval=2", "distill.benefit_interval=1",
                                          *overrides]))
    rows = []
    for step in range(STEPS):
        values = trainer.train_step(step)
        trainer.step = step + 1
        rows.append({k: v for k, v in values.items() if any(s in k for s in SHOWN)})
    rows.append(trainer.evaluate())
    return trainer.fused, rows


def _assert_same(off, on):
    """Losses, panels and validation figures to 2e-5; the gate's figures (and α, which it scales), ratios of fp32 inner products of
    whole gradients that amplify rounding, to 1e-4."""
    for step, (a, b) in enumerate(zip(off, on)):
        assert a.keys() == b.keys(), step
        for key, value in a.items():
            tolerance = 1e-4 if key.startswith(("benefit/", "schedule/alpha")) else 2e-5
            assert math.isclose(b[key], value, rel_tol=tolerance, abs_tol=1e-6), (step, key, value, b[key])


CASES = {
    "forward KL, T=2": [],
    "JSD, top-k, token gate, tied padded student, accumulation":
        ["distill.divergence=jsd", "distill.targets=topk", "distill.top_k=16", "distill.token_filter=true",
         "students.0.config.tie_word_embeddings=true", "students.0.config.vocab_size=4160",
         "train.gradient_accumulation_steps=2"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_codistillation_matches_the_logits_path(tmp_path, case):
    fused_off, off = _trace(tmp_path / "off", ["distill.fused_linear=false", *CASES[case]])
    fused_on, on = _trace(tmp_path / "on", ["distill.fused_linear=true", *CASES[case]])
    assert (fused_off, fused_on) == (False, True)
    assert any(k.startswith("benefit/signal") for k in off[-2]) and any(k.startswith("distill/kd_pos") for k in off[-2])
    _assert_same(off, on)


def test_fused_soft_mode_with_a_frozen_teacher_matches_the_logits_path(tmp_path, pretrained_teacher):
    soft = ["mode=soft", f"teacher.pretrained={pretrained_teacher}", "teacher.config={}"]
    _, off = _trace(tmp_path / "off", ["distill.fused_linear=false", *soft])
    fused, on = _trace(tmp_path / "on", ["distill.fused_linear=true", *soft])
    assert fused
    _assert_same(off, on)


def test_auto_is_off_below_its_vocabulary(tmp_path):
    assert FUSED_AUTO_VOCAB > 4096  # the bundled tokenizer's vocabulary: auto stays off
    trainer = Trainer(load_config(MICRO, [f"output_dir={tmp_path / 'a'}"]))
    assert trainer.cfg.distill.fused_linear == "auto" and not trainer.fused


def test_fused_zero3_two_ranks_matches_the_logits_path(tmp_path):
    """Both models at ZeRO-3 on 2 ranks (the heads gathered for the fused pass and the backwards), tied
    embeddings (the student's padded past the vocabulary), gradient accumulation, the gate measuring every step and
    the panels every other: every logged loss equal to the logits path's within 1e-5 for 5 steps, the
    gate's figures within 1e-4."""
    common = ["train.max_steps=5", "train.log_interval=1", "train.eval_interval=5", "train.panel_interval=2",
              "train.gradient_accumulation_steps=2", "distill.benefit_interval=1",
              "teacher.deepspeed.zero_optimization.stage=3", "students.0.deepspeed.zero_optimization.stage=3",
              "teacher.deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
              "students.0.deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
              "students.0.config.tie_word_embeddings=true", "students.0.config.vocab_size=4160",
              "teacher.config.tie_word_embeddings=true"]
    scalars = {}
    for fused in ("false", "true"):
        out = tmp_path / fused
        launch(f"output_dir={out}", f"distill.fused_linear={fused}", *common)
        scalars[fused] = read_scalars(out)
    off, on = scalars["false"], scalars["true"]
    assert off.keys() == on.keys()
    losses = [tag for tag in off if "/train/loss" in tag or "/eval/" in tag]
    assert len(losses) >= 6 and any(tag.startswith("benefit/signal") for tag in off)
    for tag, curve in off.items():
        if not tag.startswith(("benefit/", "schedule/alpha", "distill/", "teacher/", "student/")) or "/lr" in tag \
                or "grad_norm" in tag:
            continue
        assert curve.keys() == on[tag].keys(), tag
        tolerance = 1e-5 if tag in losses else 1e-4
        for step, value in curve.items():
            assert math.isclose(on[tag][step], value, rel_tol=tolerance, abs_tol=1e-6), (tag, step, value, on[tag][step])
