"""codistill-eval: the perplexity of a saved model on the user's text equals transformers' own computation,
and prompts get greedy replies; a run's checkpoint is evaluated through an export."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from codistill.commands import evaluate


def test_perplexity_of_a_saved_folder_equals_a_direct_computation(pretrained_teacher, tmp_path, capsys):
    docs = [f"Scene {i}. Now is the winter of our discontent made glorious summer. " * 3 for i in range(12)]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    out = tmp_path / "eval.json"
    code = evaluate.main([str(pretrained_teacher), "--data", str(tmp_path / "texts.jsonl"), "--text-field", "body",
                          "--seq-len", "32", "--max-blocks", "5", "--prompt", "Now is", "--max-new-tokens", "6",
                          "--no-chat-template", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    got = json.loads(out.read_text())
    # the same blocks by hand: the documents' tokens joined with eos, five blocks of 32, mean CE of 31 positions each
    tok = AutoTokenizer.from_pretrained(str(pretrained_teacher))
    model = AutoModelForCausalLM.from_pretrained(str(pretrained_teacher)).eval()
    ids = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    blocks = torch.tensor(ids[:5 * 32]).view(5, 32)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).item()
    assert got["blocks"] == 5 and got["tokens"] == 5 * 31
    assert got["cross_entropy"] == pytest.approx(ce, rel=1e-5) and got["perplexity"] == pytest.approx(math.exp(ce), rel=1e-5)
    reply = got["replies"][0]
    assert reply["prompt"] == "Now is" and 1 <= reply["tokens"] <= 6
    expected = model.generate(input_ids=tok("Now is", return_tensors="pt")["input_ids"], max_new_tokens=6, do_sample=False,
                              pad_token_id=tok.eos_token_id)
    assert reply["reply"] == tok.decode(expected[0, len(tok("Now is")["input_ids"]):], skip_special_tokens=True)
    printed = capsys.readouterr().out
    assert f"perplexity {got['perplexity']:,.3f}" in printed and "'Now is' -> " in printed


def test_nothing_to_evaluate_or_no_model_is_one_line(tmp_path, capsys):
    assert evaluate.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("codistill-eval: error: nothing to evaluate: give --data (perplexity) "
                                               "and/or --prompt (replies)")
    assert evaluate.main([str(tmp_path / "none"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.strip().endswith("none does not exist")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tokenizer):
    """A small Llama whose tokenizer has a ChatML template, saved as an exported folder."""
    import copy

    from transformers import AutoConfig

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    folder = tmp_path_factory.mktemp("chat") / "model"
    hf = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                              pad_token_id=tok.pad_token_id, initializer_range=0.1)
    torch.manual_seed(2)
    AutoModelForCausalLM.from_config(hf).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_conversations_are_measured_on_the_replies_through_the_models_chat_template(chat_model, tmp_path, capsys):
    chats = [[{"role": "user", "content": f"Who rules in act {i}?"},
              {"role": "assistant", "content": "The king, my lord." + " Long live the king." * (i % 3)}]
             for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats[:4]))
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats[4:]))
    saved = tmp_path / "saved"
    import datasets

    datasets.DatasetDict({name: datasets.load_dataset("json", data_files=str(tmp_path / f"{name}.jsonl"), split="train")
                          for name in ("train", "validation")}).save_to_disk(str(saved))
    out = tmp_path / "eval.json"
    assert evaluate.main([str(chat_model), "--data", str(saved), "--split", "validation", "--messages-field",
                          "messages", "--seq-len", "100", "--json", str(out)]) == 0, capsys.readouterr().err
    got = json.loads(out.read_text())
    # by hand: the rendered prompt (assistant turn opened), then the reply with its end-of-turn and eos; only
    # the reply's tokens (and the marker and eos) are predicted and counted
    tok = AutoTokenizer.from_pretrained(str(chat_model))
    model = AutoModelForCausalLM.from_pretrained(str(chat_model)).eval()
    total, count = 0.0, 0
    for chat in chats[4:]:
        prompt = tok(tok.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"]
        reply = tok(chat[1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + reply])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
        total += torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):], reduction="sum").item()
        count += len(reply)
    assert got["examples"] == 2 and got["tokens"] == count and got["cut"] == 0
    assert got["cross_entropy"] == pytest.approx(total / count, rel=1e-5)
    assert "reply tokens in 2 examples" in capsys.readouterr().out


def test_bad_data_flags_are_one_line_naming_the_flag(chat_model, pretrained_teacher, tmp_path, capsys):
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                   {"role": "assistant", "content": "hello"}]}) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    data = str(tmp_path / "chats.jsonl")
    cases = [
        ([str(pretrained_teacher), "--data", data, "--messages-field", "messages"],
         "--messages-field: the model's tokenizer has no chat template to render the messages with"),
        ([str(chat_model), "--data", data, "--messages-field", "turns"],
         f"--messages-field: '{data}' has no column 'turns' (it has ['messages'])"),
        ([str(chat_model), "--data", data, "--split", "test"], f"--split: '{data}' has no split 'test' (it has train)"),
        ([str(chat_model), "--data", data, "--messages-field", "m", "--prompt-field", "p"],
         "give --messages-field or --prompt-field, not both"),
        ([str(chat_model), "--data", str(tmp_path / "bad.jsonl"), "--messages-field", "messages"],
         "--messages-field: every example must be a list of {role, content} messages ending with the assistant's reply"),
    ]
    for argv, line in cases:
        assert evaluate.main(argv) == 2, argv
        assert capsys.readouterr().err.strip() == f"codistill-eval: error: {line}"
