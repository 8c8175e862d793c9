"""Evaluate a trained model: its perplexity on text, and what it writes for prompts.

    codistill-eval MODEL --data my_texts.jsonl [--text-field text] [--seq-len 512] [--max-blocks 200]
    codistill-eval MODEL --data chats.jsonl --messages-field messages [--split validation]
    codistill-eval MODEL --prompt "Once upon a time" --prompt "def fib(n):" [--max-new-tokens 64]
    python tools/evaluate.py ...   (the same)

MODEL is an exported Hugging Face folder (codistill-export), or a checkpoint or a run's output_dir
(its newest intact checkpoint; --model NAME picks the model, default the first student).
--data takes what data.dataset takes: a file, a folder or glob of .txt/.jsonl/.json/.parquet files, a
datasets.save_to_disk folder, a bundled corpus name, or hub:<name> (every split, or --split). Plain
text is read with the model's own tokenizer, joined with its end-of-text token and cut into --seq-len
blocks; the perplexity is exp of the mean next-token cross-entropy over every block's positions.
Instruction pairs (--prompt-field, the reply in --text-field) and conversations (--messages-field,
rendered by the model's chat template) are measured one example each, on the reply's tokens only,
exactly as training counts them. Prompts are answered greedily, through the tokenizer's chat
template when it has one (--no-chat-template: the raw text). --json writes every figure and reply.
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
    parser.add_argument("--split", help="measure this split only (default: every split of --data)")
    parser.add_argument("--text-field", default="text", help="the text column (with --prompt-field: the reply; "
                                                             "default text)")
    parser.add_argument("--prompt-field", help="instruction pairs: the prompt column (only the replies are measured)")
    parser.add_argument("--messages-field", help="conversations: a column of {role, content} lists ending with the "
                                                 "assistant's reply, rendered by the model's chat template")
    parser.add_argument("--seq-len", type=cli.int_at_least(2), default=512,
                        help="tokens per block, or per example at most (default 512)")
    parser.add_argument("--max-blocks", type=cli.positive_int, default=200,
                        help="blocks (or examples) measured at most (default 200)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt to answer (repeatable)")
    parser.add_argument("--max-new-tokens", type=cli.positive_int, default=64)
    parser.add_argument("--no-chat-template", action="store_true", help="give prompts as raw text")
    parser.add_argument("--json", type=Path, help="also write the figures and replies to this file")
    return parser


def model_folder(path: Path, name: Optional[str], workdir: Path) -> Path:
    """An exported folder: ``path`` itself, or the export of a checkpoint's (or run's) model into ``workdir``."""
    from ..checkpoint import export_checkpoint, intact, read_state

    if not path.exists():
        raise ConfigError(f"model: {path} does not exist")
    if (path / "config.json").is_file():
        return path
    found = intact(path)  # a checkpoint or a run: verified once, exported
    models = read_state(found)["models"]
    name = name or (models[1] if len(models) > 1 else models[0])
    return export_checkpoint(found, workdir, [name])[0]


# the data flags and the data.* keys whose checks they share (their errors name the flag)
FLAGS = {"data.dataset": "--data", "data.text_field": "--text-field", "data.prompt_field": "--prompt-field",
         "data.messages_field": "--messages-field", "data.seq_len": "--seq-len"}
CHUNK = 1000  # documents tokenized at a time (packing cuts at its end, as the training data's does)


def data_config(args: argparse.Namespace):
    """The data.* settings the flags stand for: plain text packed into blocks, instruction pairs or
    conversations one example per row (their replies counted)."""
    from ..config import DataConfig

    if args.messages_field and args.prompt_field:
        raise ConfigError("give --messages-field or --prompt-field, not both")
    if not args.data.strip():
        raise ConfigError("--data: expected a file, a folder, a corpus name or hub:<name>, got an empty value")
    return DataConfig(dataset=args.data, text_field=args.text_field, prompt_field=args.prompt_field,
                      messages_field=args.messages_field, seq_len=args.seq_len,
                      pack=not (args.prompt_field or args.messages_field))


def examples(cfg, split: Optional[str]):
    """The rows of ``cfg.dataset``'s ``split`` (default: every split), only the columns measured."""
    import datasets

    from ..data import _load_raw, _source_identity, check_data_source

    check_data_source(cfg)
    raw = _load_raw(cfg, _source_identity(cfg)[0])
    if split is not None and split not in raw:
        raise ConfigError(f"--split: '{cfg.dataset}' has no split '{split}' (it has {', '.join(raw)})")
    flags = ({cfg.messages_field: "--messages-field"} if cfg.messages_field
             else {cfg.text_field: "--text-field", **({cfg.prompt_field: "--prompt-field"} if cfg.prompt_field else {})})
    parts = [raw[split]] if split is not None else list(raw.values())
    for part in parts:
        for column, flag in flags.items():
            if column not in part.column_names:
                raise ConfigError(f"{flag}: '{cfg.dataset}' has no column '{column}' (it has {part.column_names})")
    columns = list(flags)
    return datasets.concatenate_datasets([part.select_columns(columns) for part in parts])


def measured_rows(cfg, tokenizer, rows, limit: int):
    """(ids, counted) of at most ``limit`` rows, made as the training data is: packed blocks of plain text,
    or one (padded, cut at seq_len) example per row with only its reply counted."""
    import datasets

    from ..data import _to_blocks

    plain = not (cfg.prompt_field or cfg.messages_field)
    made = 0
    for start in range(0, len(rows), CHUNK):
        chunk = datasets.Dataset.from_dict(rows[start:start + CHUNK])
        if plain:  # blank documents hold nothing to measure
            chunk = chunk.filter(lambda r: not isinstance(r[cfg.text_field], str) or r[cfg.text_field].strip())
        for row in _to_blocks(chunk, cfg, tokenizer):
            length = sum(row["attention_mask"])  # padding sits at the end
            yield row["input_ids"][:length], row["loss_mask"][:length]
            made += 1
            if made == limit:
                return


def perplexity(model, tokenizer, cfg, rows, max_blocks: int) -> dict:
    """exp of the mean next-token cross-entropy over the counted tokens: every token after a block's first
    (plain text joined with the end-of-text token, in non-overlapping ``seq_len`` blocks), or a reply's tokens
    and its end-of-turn (instruction pairs, conversations through the tokenizer's chat template)."""
    import torch

    from ..losses import next_token_targets

    total, count, measured, full = 0.0, 0, 0, 0
    with torch.no_grad():
        for ids, counted in measured_rows(cfg, tokenizer, rows, max_blocks):
            x = torch.tensor([ids])
            labels, mask = next_token_targets(x, torch.ones_like(x), torch.tensor([counted]))
            logits = model(input_ids=x).logits.float()
            ce = torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="none")
            total += ce[mask[0]].sum().item()
            count += int(mask.sum())
            measured += 1
            full += len(ids) == cfg.seq_len
    if count == 0:
        what = "no block of --seq-len" if cfg.pack else "no counted reply token"
        raise ConfigError(f"--data: '{cfg.dataset}' gives {what} ({cfg.seq_len}); lower --seq-len or give more text")
    unit = "blocks" if cfg.pack else "examples"
    out = {"perplexity": math.exp(total / count), "cross_entropy": total / count, "tokens": count, unit: measured,
           "seq_len": cfg.seq_len}
    if not cfg.pack:
        out["cut"] = full  # examples that filled seq_len: longer ones lose their end
    return out


def prepared(args: argparse.Namespace, tokenizer):
    """The data settings and rows of ``--data``, checked before any model is loaded; errors name the flags."""
    try:
        cfg = data_config(args)
        if tokenizer.pad_token_id is None:  # examples are padded to one length, the padding cut again
            tokenizer.pad_token = tokenizer.eos_token
        if cfg.messages_field and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--messages-field: the model's tokenizer has no chat template to render the messages "
                              "with")
        return cfg, examples(cfg, args.split)
    except ConfigError as exc:
        raise flagged(exc) from None


def flagged(exc: ConfigError) -> ConfigError:
    text = str(exc)
    for key, flag in FLAGS.items():
        text = text.replace(key, flag)
    return ConfigError(text)


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


def _where(report: dict) -> str:
    if "blocks" in report:
        return f"tokens in {report['blocks']} blocks of {report['seq_len']}"
    cut = f"; {report['cut']} filled --seq-len and were cut there" if report["cut"] else ""
    return f"reply tokens in {report['examples']} examples{cut}"


def body(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not args.data and not args.prompt:
        raise ConfigError("nothing to evaluate: give --data (perplexity) and/or --prompt (replies)")
    hf_logging.disable_progress_bar()  # one line per failure; the weights load in seconds or say nothing
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args.model, args.name, Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        data = prepared(args, tokenizer) if args.data else None
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
        report: dict = {"model": str(args.model)}
        if data is not None:
            report["data"] = args.data
            try:
                report.update(perplexity(model, tokenizer, *data, args.max_blocks))
            except ConfigError as exc:
                raise flagged(exc) from None
            print(f"{args.model} on {args.data}: perplexity {report['perplexity']:,.3f} (cross-entropy "
                  f"{report['cross_entropy']:.4f} nats over {report['tokens']:,} {_where(report)})")
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
