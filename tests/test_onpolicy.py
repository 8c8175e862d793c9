"""On-policy distillation: the draw, prompts cut from a micro-batch (plain and chat-templated), batched
KV-cache sampling against a row-by-row reference, the mask of sampled tokens, the loss against a reference,
bad configs, the memory estimate and the evidence's arm. A 2-rank ZeRO-3 on-policy run that resumes to the
same samples is part of tests/test_resume.py's exact-resume test; a chat-templated one from a saved instruct
teacher, of tests/test_chat.py."""
import copy
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from codistill.config import ConfigError, DataConfig, load_config
from codistill.data import build_splits, render_prompt
from codistill.losses import SoftSpec
from codistill.onpolicy import (drawn, left_padded, on_policy_loss, pick, prompt_lengths, sample, sample_seed,
                                sampled_batch)

from conftest import MICRO, ROOT

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PAD = 0


@pytest.fixture(scope="module")
def model():
    hf = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(hf).eval()


def test_the_draw_is_the_same_in_every_run_and_takes_its_share_of_steps():
    assert [drawn(7, s, "student", 0.5) for s in range(50)] == [drawn(7, s, "student", 0.5) for s in range(50)]
    assert not any(drawn(7, s, "student", 0.0) for s in range(100))
    assert all(drawn(7, s, "student", 1.0) for s in range(100))
    assert 2700 < sum(drawn(7, s, "student", 0.3) for s in range(10_000)) < 3300
    assert [drawn(7, s, "a", 0.5) for s in range(50)] != [drawn(7, s, "b", 0.5) for s in range(50)]
    assert len({sample_seed(7, r, s, m, "a") for r in range(2) for s in range(3) for m in range(2)}) == 12


def test_prompts_are_each_rows_prefix_or_its_prompt():
    batch = {"input_ids": torch.arange(1, 21).reshape(2, 10),
             "attention_mask": torch.tensor([[1] * 10, [1] * 4 + [0] * 6]),
             "loss_mask": torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [0] * 10])}
    assert prompt_lengths(batch, 6).tolist() == [6, 3]  # a short row keeps one token to continue from
    assert prompt_lengths(batch, None).tolist() == [3, 3]  # its prompt; a row of prompt only: all but one token
    ids, attention = left_padded(batch["input_ids"], torch.tensor([3, 1]), PAD)
    assert ids.tolist() == [[1, 2, 3], [PAD, PAD, 11]] and attention.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_the_mask_counts_exactly_the_sampled_tokens():
    input_ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    tokens = torch.tensor([[40, 41, 42], [50, PAD, PAD]])
    out = sampled_batch(input_ids, torch.tensor([2, 3]), tokens, torch.tensor([3, 1]), PAD)
    assert out["input_ids"].tolist() == [[5, 6, 40, 41, 42], [9, 10, 11, 50, PAD]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # position t predicts token t + 1: counted where that token was sampled, never the prompt or padding
    assert out["mask"].tolist() == [[False, True, True, True, False], [False, False, True, False, False]]
    assert out["labels"][out["mask"]].tolist() == [40, 41, 42, 50]


def greedy_alone(model, prompt: list[int], steps: int) -> list[int]:
    """The reference: one row, no padding, no cache, the whole sequence forwarded for every token."""
    seq = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_batched_left_padded_sampling_with_a_cache_matches_each_row_alone(model):
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    rows = torch.zeros(3, 5, dtype=torch.long)
    for i, p in enumerate(prompts):
        rows[i, :len(p)] = torch.tensor(p)
    ids, attention = left_padded(rows, torch.tensor([len(p) for p in prompts]), PAD)
    g = torch.Generator().manual_seed(0)
    tokens, lengths = sample(model, ids, attention, 6, 1.0, 1e-9, [63], PAD, 64, g)  # top_p ~0: greedy
    for i, p in enumerate(prompts):
        assert tokens[i].tolist() == greedy_alone(model, p, 6)
    assert lengths.tolist() == [6, 6, 6]
    stop = int(tokens[1, 2])  # a row ends at its first stop token, padding after; the others go on
    tokens, lengths = sample(model, ids, attention, 6, 1.0, 1e-9, [stop], PAD, 64, g)
    first = (tokens[1] == stop).nonzero()[0].item()
    assert lengths[1] == first + 1 and (tokens[1, first + 1:] == PAD).all()


def test_sampling_is_fixed_by_its_generator_and_top_p_keeps_the_nucleus(model):
    ids, attention = torch.tensor([[3, 4, 5]] * 4), torch.ones(4, 3, dtype=torch.long)
    runs = [sample(model, ids, attention, 8, 1.0, 1.0, [], PAD, 64, torch.Generator().manual_seed(s))[0]
            for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    picked = pick(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    assert set(picked.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7: the tail is never drawn
    assert 0.55 < (picked == 0).float().mean() < 0.70  # renormalised: 0.5 / 0.8


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_the_loss_is_the_divergence_on_the_sampled_tokens_alone(divergence):
    torch.manual_seed(0)
    out = sampled_batch(torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.tensor([2, 1]), torch.tensor([[11, 12], [13, 1]]),
                        torch.tensor([2, 2]), PAD)
    student = torch.randn(2, 4, 16, requires_grad=True)
    teacher = torch.randn(2, 4, 16)
    T = 2.0
    parts, scored = on_policy_loss(student, teacher, out["labels"], out["mask"], SoftSpec(divergence=divergence),
                                   T, None)
    q, p = torch.log_softmax(student / T, -1), torch.log_softmax(teacher / T, -1)
    per = (q.exp() * (q - p)).sum(-1) if divergence == "reverse_kl" else (p.exp() * (p - q)).sum(-1)
    expected = T * T * per[out["mask"]].mean()
    torch.testing.assert_close(parts.loss, expected)
    parts.loss.backward()
    assert (student.grad[~out["mask"]] == 0).all() and (student.grad[out["mask"]] != 0).any()
    logp = torch.log_softmax(teacher, -1).gather(-1, out["labels"][..., None])[..., 0]
    torch.testing.assert_close(-scored.ce, logp[out["mask"]].mean())  # the teacher's score of the samples


def test_chat_prompts_are_the_rendered_conversation_up_to_the_reply(tmp_path, tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    chats = [[{"role": "user", "content": f"Who is king {i}?"}, {"role": "assistant", "content": "Lear."}]
             for i in range(40)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    data = DataConfig(dataset=str(path), messages_field="messages", pack=False, seq_len=48,
                      cache_dir=str(tmp_path / "cache"))
    rows = build_splits(data, tok, seed=7).train[:4]
    lengths = prompt_lengths(rows, None)
    for i in range(4):
        prompt = tok.decode(rows["input_ids"][i, :lengths[i]])
        assert prompt.startswith("<|im_start|>user\nWho is king") and prompt.endswith("<|im_start|>assistant\n")
        number = prompt.split("king ")[1].split("?")[0]
        assert prompt == render_prompt(tok, chats[int(number)][:1], "test")


@pytest.mark.parametrize("overrides, message", [
    (["mode=hard"], "student.distill.on_policy: a student learns on its own samples scored by a teacher: mode "
                    "codistill or soft, not hard"),
    (["distill.on_policy={prompts: data}"], "student.distill.on_policy.prompts=data: the data has no prompts"),
    (["data.prompt_field=q"], "student.distill.on_policy: prompts from the data need data.pack=false"),
    (["distill.on_policy={prefix_tokens: 32}"], "student.distill.on_policy.prefix_tokens=32 leaves nothing of "
                                                "data.seq_len=32"),
    (["teacher.distill={on_policy: {}}"], "teacher.distill.on_policy: the teacher scores the samples"),
    (["mode=soft", "teacher.cache=somewhere"], "teacher.cache holds predictions for the data's text only"),
])
def test_bad_on_policy_configs_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(MICRO, ["distill.on_policy={}", *overrides])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_memory_estimate_counts_the_kv_cache_and_the_whole_model_a_zero3_student_samples_with():
    from codistill.memory import estimate, report_lines

    on = ["distill.on_policy={prefix_tokens: 8, max_new_tokens: 24}",
          "students.0.deepspeed.zero_optimization={stage: 3, stage3_param_persistence_threshold: 0}"]
    est = estimate(load_config(MICRO, on), 2, "cpu")
    student = next(m for m in est.models if m.name == "student")
    assert student.sample_tokens == 8 + 24
    # micro.yaml's student: 1 layer, 2 KV heads of 16 dimensions, fp32: keys and values per position
    assert student.kv_per_token == 2 * 1 * 2 * 16 * 4
    sampling = next(p for p in est._phase_terms(4)[1] if "student KV cache (sampling)" in p)
    assert sampling["student KV cache (sampling)"] == student.kv_per_token * 4 * 32
    assert sampling["student gathered whole to sample (ZeRO-3)"] == 4 * student.parameters - student.params > 0
    assert "on-policy, before the step's other passes: sampling" in "\n".join(report_lines(est))
    off = estimate(load_config(MICRO, on[1:]), 2, "cpu")
    assert not any("KV cache" in k for p in off._phase_terms(4)[1] for k in p)


def test_the_on_policy_evidence_pairs_two_equal_students_from_the_default_teacher_and_checks_both_targets():
    from codistill.commands.compare_onpolicy import report, soft_run, teacher_run
    from codistill.config import RunConfig

    base = load_config(ROOT / "configs" / "tiny.yaml").model_dump(mode="json")
    assert teacher_run(base, ROOT / "x")["mode"] == "codistill"
    tree = soft_run(base, 5, ROOT / "x", ROOT / "t", {"max_new_tokens": 16})
    cfg = RunConfig.model_validate(tree)
    assert cfg.mode == "soft" and cfg.teacher.pretrained == str(ROOT / "t")
    assert [(s.name, s.init_seed) for s in cfg.students] == [("offpolicy", 6), ("onpolicy", 6)]
    assert cfg.distill_for(0).on_policy is None and cfg.distill_for(1).on_policy.fraction == 0.5
    assert cfg.distill_for(1).on_policy.max_new_tokens == 16 and cfg.distill_for(1).head_start_steps == 0
    row = lambda ce, logp: {"ce": ce, "teacher_logp": logp, "start_logp": -9.0}  # noqa: E731
    text, ok = report({"c": {1: {"offpolicy": row(5.0, -6.0), "onpolicy": row(5.01, -5.5)},
                             2: {"offpolicy": row(5.0, -6.0), "onpolicy": row(5.03, -5.9)}}}, [1, 2], "cmd", "m", {})
    assert not ok and "every corpus and seed: **yes** (least +0.100" in text and "**no** (worst +0.0300" in text


def test_samples_longer_than_a_models_positions_are_refused_before_training(tokenizer):
    from codistill.models import model_config
    from codistill.preflight import check_sample_lengths

    cfg = load_config(MICRO, ["distill.on_policy={prefix_tokens: 8, max_new_tokens: 60}"])
    hf = {s.name: model_config(s, tokenizer) for s in cfg.models}
    with pytest.raises(ConfigError, match=r"student.distill.on_policy: a prompt of up to 8 tokens plus "
                                          r"max_new_tokens=60 exceeds student's max_position_embeddings=64"):
        check_sample_lengths(cfg, hf)
    check_sample_lengths(load_config(MICRO, ["distill.on_policy={prefix_tokens: 8, max_new_tokens: 56}"]), hf)
