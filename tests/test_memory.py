"""The memory estimate: its accounting per ZeRO stage, the dry run, and its total against
the measured peak of a real 2-rank run of the tiny config."""
import re
import sys

import pytest

from codistill.config import ConfigError, load_config
from codistill.memory import LOSS_TEMPORARIES, estimate, fused_lowers_peak, parse_size, report, report_lines

from conftest import MICRO, ROOT, launch, read_scalars, run_cmd


def by_name(est):
    return {m.name: m for m in est.models}


def test_zero_stages_shard_what_they_promise_and_offload_moves_states_to_the_host():
    plain = by_name(estimate(load_config(MICRO, ["teacher.deepspeed.zero_optimization.stage=0"]), 4))["teacher"]
    n = plain.parameters
    assert (plain.params, plain.grads, plain.optimizer) == (4 * n, 4 * n, 8 * n)  # fp32, Adam's two moments
    # ZeRO keeps an fp32 master copy of its partition even for an fp32 model: 3 x 4 bytes per parameter, sharded
    for stage, (params, grads, optimizer) in {1: (4 * n, 4 * n, 3 * n), 2: (4 * n, n, 3 * n),
                                              3: (n, n, 3 * n)}.items():
        m = by_name(estimate(load_config(MICRO, [f"teacher.deepspeed.zero_optimization.stage={stage}"]), 4))["teacher"]
        assert (m.params, m.grads, m.optimizer) == (params, grads, optimizer), stage
    bf16 = by_name(estimate(load_config(MICRO, ["teacher.deepspeed.bf16={enabled: true}"]), 4))["teacher"]
    assert bf16.params == 2 * n and bf16.optimizer == 12 * n // 4  # + an fp32 master copy, sharded
    assert bf16.activations < plain.activations  # saved in bf16
    offload = by_name(estimate(load_config(MICRO, [
        "teacher.deepspeed.zero_optimization={stage: 3, offload_optimizer: {device: cpu}, offload_param: {device: cpu}}"]),
        4))["teacher"]
    assert offload.optimizer == offload.params == 0 and offload.host == n + 3 * n  # weights + master copy and moments


def test_activations_and_the_largest_micro_batch_scale_with_the_batch():
    small, large = estimate(load_config(MICRO), 1), estimate(load_config(MICRO, ["train.micro_batch_size=8"]), 1)
    assert by_name(large)["teacher"].activations == 2 * by_name(small)["teacher"].activations
    assert large.peak() > small.peak() == small.peak(small.micro_batch_size)
    fit = small.largest_micro_batch(small.peak(40))
    assert fit >= 40 and small.peak(fit + 1) > small.peak(40)
    assert small.largest_micro_batch(small.runtime) == 0


def test_a_frozen_teacher_holds_only_its_weights(pretrained_teacher):
    est = estimate(load_config(MICRO, ["mode=soft", f"teacher.pretrained={pretrained_teacher}", "teacher.config={}"]), 2)
    teacher = by_name(est)["teacher"]
    assert not teacher.trainable and teacher.params == 4 * teacher.parameters
    assert teacher.grads == teacher.optimizer == teacher.activations == 0


def test_a_chunked_loss_holds_a_fraction_of_the_full_logits():
    est = estimate(load_config(MICRO, ["train.micro_batch_size=64", "data.seq_len=64",
                                       "teacher.config.max_position_embeddings=64",
                                       "students.0.config.max_position_embeddings=64"]), 1)
    assert est.kd_bytes(64) * 4 <= est.kd_bytes(64, chunked=False)


def test_memory_sizes_parse_and_bad_ones_are_refused():
    assert parse_size("80GB") == parse_size("80 GiB") == 80 * 2**30
    assert parse_size("512MB") == 2**29 and parse_size("1e9") == 10**9
    for bad in ("lots", "-3GB", "12XB"):
        with pytest.raises(ConfigError, match="memory size"):
            parse_size(bad)


def test_dry_run_prints_the_estimate_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    proc = launch(f"output_dir={out}", "dry_run=true", how="python")
    assert "dry run (dry_run=true): nothing trained or written" in proc.stdout
    assert re.search(r"teacher +\d+\.\d+ GB", proc.stdout) and "expected peak per rank" in proc.stdout
    assert "largest micro-batch in" in proc.stdout
    assert not out.exists()
    tool = run_cmd([sys.executable, "tools/estimate.py", "--config", str(MICRO), "--world-size", "0"])
    assert tool.returncode == 2 and "world size 0" in tool.stderr


def test_the_estimate_is_within_25_percent_of_the_measured_peak_of_a_mid_size_zero3_run(tmp_path):
    """An ~82M teacher and a ~16M student, ZeRO-3 with checkpointing, 2 ranks: every rank's peak
    RSS against the estimate, which the models' states, DeepSpeed's buffers and the activations
    dominate here (measured 2.92 GB, estimated 2.89 GB when written)."""
    mid = ROOT / "tests" / "configs" / "mid.yaml"
    out = tmp_path / "mid"
    launch(f"output_dir={out}", config=mid, timeout=600)
    measured = max(read_scalars(out)["perf/peak_memory_gb"].values())
    tool = run_cmd([sys.executable, "tools/estimate.py", "--config", str(mid), "--world-size", "2"])
    assert tool.returncode == 0, tool.stderr[-2000:]
    estimated = float(re.search(r"expected peak per rank: ([\d.]+) GB", tool.stdout).group(1))
    assert abs(estimated - measured) <= 0.25 * measured, (estimated, measured, tool.stdout)


@pytest.mark.parametrize("checkpointing", [0, 1])
def test_traced_activations_match_what_a_real_forward_holds(checkpointing):
    """A 6-layer model's forward, measured in a fresh process, holds what the meta trace says:
    every layer's saved tensors without checkpointing, only the layer inputs with it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from codistill.memory import trace_activations

    layers, hidden, seq, batch = 6, 256, 512, 8
    proc = run_cmd([sys.executable, "tests/helpers/held_activations.py", str(checkpointing), str(layers), str(hidden),
                    str(seq), str(batch)], MALLOC_MMAP_THRESHOLD_="65536")
    measured = int(proc.stdout.split()[-1])
    cfg = AutoConfig.for_model("llama", vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                               max_position_embeddings=seq)
    with torch.device("meta"):
        traced = trace_activations(AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").train(), seq)
    expected = traced.held(bool(checkpointing)) * batch
    assert 0.8 < measured / expected < 1.2, (measured, expected)
    if checkpointing:  # and what checkpointing saves: the layers' own tensors, all but their inputs
        assert traced.held(True) < 0.25 * traced.held(False)


def qwen_standin(folder):
    """A stand-in for a local Qwen2.5-7B folder: its config.json (152,064 embedding rows), the
    GPT-2 tokenizer (50,257 tokens: an embedding padded far past its tokenizer) and a weights
    file without tensors (the estimate reads no weights)."""
    import json

    from transformers import AutoConfig

    from codistill.config import DataConfig
    from codistill.data import resolve_tokenizer

    folder.mkdir(parents=True)
    AutoConfig.for_model("qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                         max_position_embeddings=32768, rope_theta=1000000.0).save_pretrained(folder)
    resolve_tokenizer(DataConfig(tokenizer="gpt2"), None).save_pretrained(folder)
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return folder


def test_the_example_llm_configs_fit_their_gpus(tmp_path):
    """configs/examples: the 8B + 1.2B co-distillation pair on 8 x 80 GB (and 2 nodes of 8), and the
    frozen 7B teacher with a padded embedding, fit with room for a larger micro-batch."""
    big = load_config(ROOT / "configs/examples/llama8b-codistill-1b.yaml")
    for world in (8, 16):
        est = estimate(big, world, "cuda")
        assert est.peak() < 80 * 2**30 and est.largest_micro_batch(80 * 2**30) > 1
        teacher = by_name(est)["teacher"]
        assert teacher.width == 128256 and teacher.checkpointing and teacher.build < 4 * teacher.parameters / 2
    folder = qwen_standin(tmp_path / "qwen")
    soft = load_config(ROOT / "configs/examples/qwen7b-soft-0.5b.yaml",
                       [f"teacher.pretrained={folder}", f"data.tokenizer={folder}"])
    est = estimate(soft, 8, "cuda")
    teacher = by_name(est)["teacher"]
    assert not teacher.trainable and teacher.width == 152064 and est.vocab == 50257
    assert teacher.params == 2 * teacher.parameters // 8  # bf16, a ZeRO-3 share, no optimizer
    assert est.largest_micro_batch(80 * 2**30) > 2
    mutual = estimate(load_config(ROOT / "configs/examples/llama8b-mutual-1b.yaml"), 8, "cuda")
    assert mutual.together == ["large", "small"] and mutual.peak() < 80 * 2**30  # both forwards at once
    assert mutual.largest_micro_batch(80 * 2**30) >= 2
    # the report recommends the micro-batch that leaves the headroom free, and the global batch it makes
    lines = report(big, 8, "cuda", 80 * 2**30, headroom=0.15)
    fit, room = est_of(big).largest_micro_batch(80 * 2**30), est_of(big).largest_micro_batch(int(0.85 * 80 * 2**30))
    assert f"  largest micro-batch in 80.0 GB: {fit}" in lines and 1 <= room <= fit
    steps = big.train.gradient_accumulation_steps
    assert (f"  recommended micro-batch with 15% headroom: train.micro_batch_size={room} (global batch {room} x "
            f"{steps} accumulation x 8 rank(s) = {room * steps * 8} sequences of {big.data.seq_len} tokens; "
            f"configured: {big.train.micro_batch_size})") in lines
    assert (f"  assumes: fused-linear losses {'on' if est_of(big).fused else 'off'}; activation checkpointing "
            "teacher on, student on") in lines
    assert lines[0].startswith("memory per rank (GB: 2^30 bytes, GiB)")


def est_of(cfg):
    return estimate(cfg, 8, "cuda")


def test_what_does_not_fit_is_named():
    big = load_config(ROOT / "configs/examples/llama8b-codistill-1b.yaml",
                      ["teacher.gradient_checkpointing=false", "data.seq_len=8192"])
    est = estimate(big, 8, "cuda")
    assert est.largest_micro_batch(40 * 2**30) == 0
    assert "teacher activations" in est.why_not(40 * 2**30) and "gradient_checkpointing: true" in est.why_not(40 * 2**30)
    assert "building the models alone needs 18.1 GB" in est.why_not(10 * 2**30)


def test_the_benefit_gate_counts_two_whole_student_gradients_and_its_largest_parameter_at_any_zero_stage():
    """A measuring step holds ∇CE(probe) and ∇CE whole and ∇(T²·D − CE) one parameter at a time, even
    under ZeRO-3 (no reduction then)."""
    for stage in (2, 3):
        zero = f"students.0.deepspeed.zero_optimization.stage={stage}"
        on, off = estimate(load_config(MICRO, [zero]), 2), estimate(load_config(MICRO, [zero, "distill.benefit_gate=false"]), 2)
        student = by_name(on)["student"]
        assert student.largest == 4096 * 32  # the tied embedding and head of the micro student
        assert student.gate == 4 * (2 * student.parameters + student.largest) and by_name(off)["student"].gate == 0
        measuring = [phase for phase in on._phase_terms(4)[1] if "student benefit gate's gradients" in phase]
        assert len(measuring) == 1 and "student gradient reduction (ZeRO-3)" not in measuring[0]
        assert on._phases(4)[1] >= off._phases(4)[1]  # (peak() also holds this process's measured runtime)


def test_fused_linear_drops_every_logits_term_and_counts_the_head_gradients_and_one_chunk():
    """distill.fused_linear=true: no model's logits and no kept teacher targets; all activations at once,
    each trainable head's fp32 gradient and one chunk of the fused pass. auto stays off at the bundled
    4,096-token vocabulary, and at GPT-2's is on only where it lowers the step's peak."""
    plain, fused = (estimate(load_config(MICRO, [f"distill.fused_linear={v}"]), 2) for v in ("false", "true"))
    assert not plain.fused and fused.fused and not estimate(load_config(MICRO), 2).fused
    assert all(m.logits == 0 for m in fused.models) and fused.kept_per_position == 0
    assert all(m.logits > 0 for m in plain.models) and plain.kept_per_position > 0
    terms = fused._phase_terms(4)[1][0]
    assert not any("logits" in name or "targets kept" in name for name in terms)
    for m in fused.models:
        assert m.head == 4096 * (64 if m.name == "teacher" else 32)
        assert terms[f"{m.name} head gradient (fused pass)"] == 4 * m.head
        assert terms[f"{m.name} activations"] == m.activations * 4 / fused.micro_batch_size
    assert terms["heads gathered for the pass (ZeRO-3)"] == 0  # below ZeRO-3 a head is whole anyway
    zero3 = estimate(load_config(MICRO, ["distill.fused_linear=true", "teacher.deepspeed.zero_optimization.stage=3"]), 2)
    assert zero3._phase_terms(4)[1][0]["heads gathered for the pass (ZeRO-3)"] == sum(
        m.head * m.dtype_bytes for m in zero3.models if m.stage == 3) == 4096 * 64 * 4  # the teacher's alone
    rows = min(4 * fused.seq_len, fused.fused_rows)
    assert terms["fused pass working set"] == (3 * rows + LOSS_TEMPORARIES * min(4 * fused.seq_len, fused.chunk_rows)) * 4096 * 4
    # auto, from a 32k vocabulary: only where the step's peak is lower (many tokens per head row), below ZeRO-3
    for stage in (2, 3):
        for batch, lower in ((1, False), (64, True)):
            overrides = ["data.tokenizer=gpt2", f"teacher.deepspeed.zero_optimization.stage={stage}",
                         f"train.micro_batch_size={batch}"]
            auto, plain = (estimate(load_config(MICRO, [*overrides, f"distill.fused_linear={v}"]), 2)
                           for v in ("auto", "false"))
            assert (plain.with_fused().step_peak() < plain.step_peak()) is lower
            assert fused_lowers_peak(load_config(MICRO, overrides), 2, "cpu") is lower
            assert auto.fused is (lower and stage < 3)  # ZeRO-3 measured higher with it (docs/results.md)


def test_models_that_learn_from_each_other_count_with_every_forward_held_at_once():
    """Peers (mode mutual) and a listening teacher hold their forwards, logits and logit gradients together
    until the last of them has run; a one-way run holds one student's beside the teacher's kept logits."""
    peers = ["mode=mutual", "teacher=null", "students=[" + ", ".join(
        "{name: %s, config: {hidden_size: %d, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
        "num_key_value_heads: 2, max_position_embeddings: 64}, deepspeed: {zero_optimization: {stage: 2}, "
        "optimizer: {type: AdamW, params: {lr: 1.0e-3}}}}" % (n, h) for n, h in (("p1", 32), ("p2", 48), ("p3", 64)))
        + "]", "distill.benefit_gate=false"]
    est = estimate(load_config(MICRO, peers), 2)
    assert est.teacher is None and sorted(est.together) == ["p1", "p2", "p3"] and est.kept_per_position == 0
    held = max(sum(phase.values()) for phase in est._phase_terms(4)[1])
    scale = 4 / est.micro_batch_size
    assert held >= sum((m.activations + 2 * m.logits) * scale for m in est.models)
    one_way = estimate(load_config(MICRO, ["distill.benefit_gate=false"]), 2)
    heard = estimate(load_config(MICRO, ["distill.benefit_gate=false", "teacher.distill={benefit_gate: false}"]), 2)
    assert heard.together == ["teacher", "student"] and one_way.together == []
    assert heard.step_peak() > one_way.step_peak()
    gated = estimate(load_config(MICRO, ["teacher.distill={}"]), 2)  # a gated listening teacher measures too
    assert by_name(gated)["teacher"].gate > 0 and by_name(one_way)["teacher"].gate == 0
    # the report names the sides for what they are: no teacher's phase where no teacher runs alone
    assert "the models' passes" in "\n".join(report_lines(est)) and "teacher" not in "\n".join(report_lines(est))
    assert "the teacher's phase" in "\n".join(report_lines(one_way))
