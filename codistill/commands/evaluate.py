"""Evaluate a trained model: its perplexity on text, and what it writes for prompts.

    codistill-eval MODEL --data my_texts.jsonl [--text-field text] [--seq-len 512] [--max-blocks 200]
    codistill-eval MODEL --prompt "Once upon a time" --prompt "def fib(n):" [--max-new-tokens 64]
    python tools/evaluate.py ...   (the same)

MODEL is an exported Hugging Face folder (codistill-export), or a checkpoint or a run's output_dir
(its newest intact checkpoint; --model NAME picks the model, default the first student).
--data takes what data.dataset takes: a file, a folder or glob of .txt/.jsonl/.json/.parquet files, a
datasets.save_to_disk folder, or hub:<name>. The documents are read with the model's own tokenizer,
joined with its end-of-text token and cut into --seq-len blocks; the perplexity is exp of the mean
next-token cross-entropy over every block's positions. Prompts are answered greedily, through the
tokenizer's chat template when it has one (--no-chat-template: the raw text). --json writes every
figure and reply for scripts.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Optional

from .. import cli
from ..errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for("codistill-eval", __doc__, config=False)
    parser.add_argument("model", type=Path, help="an exported folder, a checkpoint or a run's output_dir")
    parser.add_argument("--model", dest="name", help="the model of a checkpoint or run (default: the first student)")
    parser.add_argument("--data", help="text to measure the perplexity on (what data.dataset takes)")
    parser.add_argument("--text-field", default="text", help="the text column of .jsonl/.parquet data (default text)")
    parser.add_argument("--seq-len", type=cli.positive_int, default=512, help="tokens per block (default 512)")
    parser.add_argument("--max-blocks", type=cli.positive_int, default=200, help="blocks measured at most (default 200)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt to answer (repeatable)")
    parser.add_argument("--max-new-tokens", type=cli.positive_int, default=64)
    parser.add_argument("--no-chat-template", action="store_true", help="give prompts as raw text")
    parser.add_argument("--json", type=Path, help="also write the figures and replies to this file")
    return parser


def load_model(path: Path, name: Optional[str], workdir: Path):
    """The model and its tokenizer from an exported folder, or exported first from a checkpoint or run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..checkpoint import export_checkpoint, intact, read_state

    if not path.exists():
        raise ConfigError(f"model: {path} does not exist")
    folder = path
    if not (path / "config.json").is_file():  # a checkpoint or a run: verified once, exported
        found = intact(path)
        models = read_state(found)["models"]
        name = name or (models[1] if len(models) > 1 else models[0])
        folder = export_checkpoint(found, workdir, [name])[0]
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def documents(spec: str, text_field: str) -> list[str]:
    """The texts of ``spec`` (every split), as data.dataset reads them."""
    from ..config import DataConfig
    from ..data import _load_raw, _source_identity, check_data_source

    cfg = DataConfig(dataset=spec, text_field=text_field)
    check_data_source(cfg)
    raw = _load_raw(cfg, _source_identity(cfg)[0])
    texts = []
    for split in raw.values():
        if text_field not in split.column_names:
            raise ConfigError(f"--text-field: '{spec}' has no column '{text_field}' (it has {split.column_names})")
        texts += [t for t in split[text_field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise ConfigError(f"--data: '{spec}' holds no text in column '{text_field}'")
    return texts


def perplexity(model, tokenizer, texts: list[str], seq_len: int, max_blocks: int) -> dict:
    """exp of the mean next-token cross-entropy over non-overlapping ``seq_len`` blocks of the texts joined
    with the end-of-text token."""
    import torch

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(ids) >= seq_len * max_blocks:
            break
    blocks = min(len(ids) // seq_len, max_blocks)
    if blocks == 0:
        raise ConfigError(f"--data: {len(ids)} tokens make no block of --seq-len {seq_len}; lower it")
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(blocks):
            x = torch.tensor([ids[b * seq_len:(b + 1) * seq_len]])
            logits = model(input_ids=x).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += seq_len - 1
    return {"perplexity": math.exp(total / count), "cross_entropy": total / count, "tokens": count, "blocks": blocks,
            "seq_len": seq_len}


def answer(model, tokenizer, prompts: list[str], max_new_tokens: int, chat: bool) -> list[dict]:
    """Greedy replies, through the chat template when the tokenizer has one (and ``chat``)."""
    out = []
    for prompt in prompts:
        if chat and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        made = model.generate(input_ids=ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        new = made[0, ids.shape[1]:].tolist()
        out.append({"prompt": prompt, "reply": tokenizer.decode(new, skip_special_tokens=True),
                    "stopped": tokenizer.eos_token_id in new, "tokens": len(new)})
    return out


def body(args: argparse.Namespace) -> None:
    if not args.data and not args.prompt:
        raise ConfigError("nothing to evaluate: give --data (perplexity) and/or --prompt (replies)")
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = load_model(args.model, args.name, Path(tmp))
        report: dict = {"model": str(args.model)}
        if args.data:
            report["data"] = args.data
            report.update(perplexity(model, tokenizer, documents(args.data, args.text_field), args.seq_len,
                                     args.max_blocks))
            print(f"{args.model} on {args.data}: perplexity {report['perplexity']:,.3f} (cross-entropy "
                  f"{report['cross_entropy']:.4f} nats over {report['tokens']:,} tokens in {report['blocks']} blocks "
                  f"of {args.seq_len})")
        if args.prompt:
            report["replies"] = answer(model, tokenizer, args.prompt, args.max_new_tokens, not args.no_chat_template)
            for r in report["replies"]:
                end = "" if r["stopped"] else f" [cut at {r['tokens']} tokens]"
                print(f"{r['prompt'][:60]!r} -> {r['reply'][:200]!r}{end}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run("codistill-eval", build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
