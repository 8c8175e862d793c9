"""Generated bad input beside the table of test_bad_input: configs with a value of the wrong type or out of
bounds, nested where a value belongs, cut short or with a byte flipped, and damaged or swapped files (a
pretrained model's config, a DeepSpeed JSON, a data file). Each case runs the real entry point in this
process up to where the process group would start: it must either be refused (exit code 2, one line
``codistill-train: error: ...``) or get there (the input was valid after all); never a traceback, nothing
written outside the run's fresh output folder, no file that was there before changed.

A fixed seed and ``CODISTILL_FUZZ_CASES`` cases (default 60) keep it within the suite's budget; set it
higher, and ``CODISTILL_FUZZ_SEED``, for a longer search.
"""
import copy
import hashlib
import json
import os
import random
from pathlib import Path

import pytest
import yaml

from codistill import trainer
from codistill.commands import train as entry

from conftest import MICRO

CASES = int(os.environ.get("CODISTILL_FUZZ_CASES", "60"))
SEED = int(os.environ.get("CODISTILL_FUZZ_SEED", "0"))
BAD_VALUES = ["x", "", -1, 0, 10**20, -(10**20), 1e309, float("nan"), True, None, [1, 2], {"a": 1}, "3e-4",
              "x" * 5000, "a\nb", "../no/such/folder", [[[[[1]]]]]]


class Reached(BaseException):
    """The input passed every check: the run would now make its process group."""


def leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, (*prefix, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from leaves(value, (*prefix, i))
    else:
        yield prefix


def put(tree, path, value):
    node = tree
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def deep(depth):
    value = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def mutated_config(rng, base, tmp):
    """A config file of one kind of damage: a value replaced, a section nested or replaced, a key added, the
    text cut short, a byte flipped."""
    tree, kind = copy.deepcopy(base), rng.choice(["value", "value", "value", "nest", "section", "key", "cut", "flip"])
    paths = list(leaves(tree))
    if kind == "value":
        put(tree, rng.choice(paths), rng.choice(BAD_VALUES))
    elif kind == "nest":
        put(tree, rng.choice(paths), deep(rng.choice([3, 70, 200])))
    elif kind == "section":
        tree[rng.choice(sorted(tree))] = rng.choice(BAD_VALUES)
    elif kind == "key":
        path = rng.choice(paths)
        node = tree
        for part in path[:-1]:
            node = node[part]
        if isinstance(node, dict):
            node[f"{path[-1]}_typo"] = 1
    text = yaml.safe_dump(tree, sort_keys=False)
    data = text.encode()
    if kind == "cut":
        data = data[: rng.randrange(len(data))]
    elif kind == "flip":
        at = rng.randrange(len(data))
        data = data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:]
    path = tmp / "config.yaml"
    path.write_bytes(data)
    return ["--config", str(path)], kind


def damaged_file(rng, tmp, tokenizer):
    """The micro config with one of its files damaged or swapped for another: a pretrained teacher's
    config.json, a DeepSpeed JSON, a data file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kind = rng.choice(["teacher config.json", "deepspeed json", "data file", "swapped"])
    if kind in ("teacher config.json", "swapped"):
        folder = tmp / "teacher"
        hf = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                  max_position_embeddings=64)
        AutoModelForCausalLM.from_config(hf).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        target = folder / "config.json"
        if kind == "swapped":  # the tokenizer's file where the model's config belongs
            target.write_bytes((folder / "tokenizer_config.json").read_bytes())
        else:
            _damage(rng, target)
        return ["--config", str(MICRO), f"teacher.pretrained={folder}", "teacher.config={}"], kind
    if kind == "deepspeed json":
        target = tmp / "ds.json"
        target.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW",
                                                                                      "params": {"lr": 1e-3}}}))
        _damage(rng, target)
        return ["--config", str(MICRO), f"teacher.deepspeed={target}"], kind
    target = tmp / "docs.jsonl"
    target.write_text("".join(json.dumps({"text": "a line of text " * 20}) + "\n" for _ in range(30)))
    _damage(rng, target)
    tokenizer.save_pretrained(tmp / "tok")
    return ["--config", str(MICRO), f"data.dataset={target}", f"data.tokenizer={tmp / 'tok'}",
            f"data.cache_dir={tmp / 'cache'}"], kind


def _damage(rng, path):
    data = path.read_bytes()
    how = rng.choice(["cut", "flip", "empty", "binary"])
    if how == "cut":
        data = data[: rng.randrange(len(data))]
    elif how == "flip":
        at = rng.randrange(len(data))
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
    elif how == "empty":
        data = b""
    else:
        data = bytes(rng.randrange(256) for _ in range(512))
    path.write_bytes(data)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


@pytest.mark.parametrize("case", range(CASES))
def test_generated_bad_input_is_refused_in_one_line_or_reaches_the_process_group(case, tmp_path, tokenizer, capsys,
                                                                                   monkeypatch):
    rng = random.Random(SEED * 100_003 + case)
    base = yaml.safe_load(MICRO.read_text())
    make = mutated_config if case % 3 else (lambda r, b, t: damaged_file(r, t, tokenizer))
    args, kind = make(rng, base, tmp_path)

    def reached(*_a, **_k):
        raise Reached

    monkeypatch.setattr(trainer.distributed, "init", reached)
    before = snapshot(tmp_path)
    capsys.readouterr()
    out = tmp_path / "out"
    try:
        code = entry.main([*args, f"output_dir={out}"])
    except Reached:
        code = None
    err = capsys.readouterr().err.strip()
    if code is not None and code != 0:  # refused (exit 0: a dry run the damage switched on)
        assert code == 2, (kind, err[-3000:])
        assert len(err.splitlines()) == 1 and err.startswith("codistill-train: error: "), (kind, err[-3000:])
        assert len(err) < 2500, kind
    after = snapshot(tmp_path)
    assert {p: h for p, h in after.items() if p in before} == before, kind  # nothing there before changed
    outside = [p for p in after if p not in before and not Path(p).is_relative_to(out)
               and not Path(p).is_relative_to(tmp_path / "cache")]
    assert not outside, (kind, outside)
    assert not (out / ".codistill.lock").exists(), kind  # released
