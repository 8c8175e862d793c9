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
