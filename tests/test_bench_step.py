"""codistill-bench-step, one round on the micro config, as users run it: it drives the run's micro-step and
the other strategy through the step's interface (no trainer internals), and reports every variant."""
import json
import sys

import pytest

from conftest import MICRO, run_cmd


def test_one_round_reports_every_variant_and_its_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cmd([sys.executable, "tools/bench_step.py", "--config", str(MICRO), "--rounds", "1", "--warmup", "0",
                    "--out", str(out), f"output_dir={tmp_path / 'run'}", "distill.benefit_interval=1",
                    "distill.on_policy={prefix_tokens: 8, max_new_tokens: 8}", "train.tail_steps=2",
                    "students.0.twin=true", "distill.selection_interval=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for name in ("codistill", "fused", "separate", "two_stage", "teacher_alone", "frozen_teacher", "measured",
                 "on_policy", "selecting"):  # micro's heads are linear
        assert result[f"{name}_ms"] > 0, name
    assert result["fused_linear"] is False and result["benefit_gate_interval"] == 1
    for ratio in ("ratio_a_over_b", "ratio_a_over_c", "ratio_fused_over_a", "benefit_gate_cost_share",
                  "ratio_on_policy_over_a", "ratio_lambda_half_over_a", "selection_step_ratio"):
        assert 0 < abs(result[ratio]) < 100, ratio
    assert 0 < result["on_policy_sampling_share"] < 1
    assert result["ratio_lambda_half_over_a"] == pytest.approx((result["ratio_on_policy_over_a"] + 1) / 2)
    ms = {k[:-3]: v / 1e3 for k, v in result.items() if k.endswith("_ms")}  # micro: 6 steps, no head start
    gate = 4 * (ms["measured"] - ms["codistill"])  # steps 2-5 measure (burn-in 2, every step): in both runs
    assert result["run_s"] == pytest.approx(4 * ms["codistill"] + 2 * ms["frozen_teacher"] + gate)
    assert result["two_stage_run_s"] == pytest.approx(4 * ms["teacher_alone"] + 6 * ms["frozen_teacher"] + gate)
    assert "the whole run (head start, co-distillation, tail) against two-stage" in proc.stdout
    assert "(a') step (a) with fused-linear losses" in proc.stdout and "at lambda 0.5" in proc.stdout
    assert result["selection_cost_share"] == pytest.approx(result["selection_step_ratio"] / 3)
    assert "selection: (s - a) / a = " in proc.stdout


def test_peers_and_a_listening_teacher_are_benchmarked_against_their_models_alone_and_deaf(tmp_path):
    peers = ["mode=mutual", "teacher=null", "students=[" + ", ".join(
        "{name: %s, config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
        "num_key_value_heads: 2, max_position_embeddings: 64}, deepspeed: {zero_optimization: {stage: 2}, "
        "optimizer: {type: AdamW, params: {lr: 1.0e-3}}}}" % n for n in ("p1", "p2")) + "]"]
    for name, overrides, variants in (("peers", peers, {"codistill", "separate", "fused", "measured"}),
                                      ("listening", ["teacher.distill={}"],
                                       {"codistill", "separate", "two_stage", "teacher_alone", "frozen_teacher",
                                        "deaf", "fused", "measured"})):
        out = tmp_path / f"{name}.json"
        proc = run_cmd([sys.executable, "tools/bench_step.py", "--config", str(MICRO), "--rounds", "1", "--warmup",
                        "0", "--out", str(out), f"output_dir={tmp_path / name}", *overrides])
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(out.read_text())
        assert {k[:-3] for k in result if k.endswith("_ms")} == variants, name
        assert 0 < result["ratio_a_over_b"] < 100
    assert 0 < result["ratio_listening_over_deaf"] < 100 and "listening/deaf a/e = " in proc.stdout
