"""Hard-label (sequence-level) distillation data: the teacher writes the responses.

    python tools/generate.py --config configs/hard.yaml --out runs/generated [options]
    deepspeed --num_gpus 2 tools/generate.py --config configs/hard.yaml --out runs/generated
    codistill-generate ...   (the same, as a console command)

Prompts come from a JSON-lines file (--prompts), each line {"prompt": "..."} or
{"messages": [{"role": ..., "content": ...}, ...]} (a conversation awaiting the assistant's
reply), or are cut from the run's training blocks (--num-prompts of --prompt-tokens tokens
each, chosen by --seed). The teacher is ``teacher.pretrained`` of the config.

Instruct teachers: when the teacher's tokenizer has a chat template, each prompt is
rendered through it as a user turn (after --system-prompt, if given) and the teacher
writes the assistant's reply, stopping at the template's end-of-turn marker or EOS; the
reply is stored without template tokens, with the conversation in a ``messages`` column.
Train on that with mode=hard data.messages_field=messages: the prompt is rendered
through the same template and masked out of the loss. --no-chat-template gives raw
continuations; prompts cut from training data are rendered only with --chat-template.
Empty replies (the teacher ended its turn at once) are counted and not written; a ``cut`` column
marks the replies that ran to --max-new-tokens without ending, and the end says how many did.

Prompts are generated in fixed batches, batch b on rank b mod world, each batch sampled
with seed + b, so the output is the same for any number of ranks. Each batch is written
atomically as a Parquet part; a killed run continues where it stopped. Without a chat
template, train with mode=hard data.dataset=OUT data.prompt_field=prompt data.text_field=response.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import cli
from ..config import ConfigError, RunConfig

META = "codistill_generation.json"


def features(chat: bool):
    """The columns of a part: prompt and response, whether the reply ran to --max-new-tokens without
    ending, and in a chat the conversation with the reply (a ``datasets.Features``; built here, as
    importing datasets takes a second)."""
    import datasets

    text = datasets.Value("string")
    columns = {"prompt": text, "response": text, "cut": datasets.Value("bool")}  # cut: ran to --max-new-tokens
    if chat:
        columns["messages"] = [{"role": text, "content": text}]
    return datasets.Features(columns)


def read_prompts(path: Path) -> list[list[dict] | str]:
    """The prompts of a JSON-lines file: a string per {"prompt"} line, a message list per {"messages"} line."""
    if not path.is_file():
        raise ConfigError(f"--prompts: {path} does not exist")
    prompts: list[list[dict] | str] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
        elif isinstance(row, dict) and _is_conversation(row.get("messages")):
            prompts.append(row["messages"])
        else:
            raise ConfigError(f"--prompts: line {n} of {path} is not a JSON object with a 'prompt' string or a "
                              "'messages' list of {role, content} awaiting the assistant's reply")
    if not prompts:
        raise ConfigError(f"--prompts: {path} holds no prompts")
    return prompts


def _is_conversation(messages: object) -> bool:
    return (isinstance(messages, list) and bool(messages)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)
            and messages[-1]["role"] != "assistant")


def cut_prompts(args: argparse.Namespace, cfg: RunConfig, tokenizer) -> list[str]:
    """--num-prompts prompts of --prompt-tokens tokens, cut from the run's training blocks."""
    import torch

    from ..data import build_splits

    train = build_splits(cfg.data, tokenizer, cfg.train.seed).train
    picked = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:args.num_prompts]
    return [tokenizer.decode(train[int(i)]["input_ids"][:args.prompt_tokens]) for i in picked]


def use_chat_template(asked: Optional[bool], tokenizer, from_file: bool) -> bool:
    """--chat-template / --no-chat-template, else: on for a prompts file when the tokenizer has one."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if asked and not has:
        raise ConfigError("--chat-template: the teacher's tokenizer has no chat template")
    return has and from_file if asked is None else bool(asked)


def conversation(prompt: list[dict] | str, system: Optional[str]) -> list[dict]:
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def clean_reply(tokenizer, ids: list[int], stops: list[int], end: str, chat: bool) -> str:
    """A generated reply as text: up to its first stop token or end-of-turn marker, without
    special tokens (and, in a chat, without the whitespace around it)."""
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    text = tokenizer.decode(ids[:cut], skip_special_tokens=True)
    if end and end in text:
        text = text[:text.index(end)]
    return text.strip() if chat else text


@dataclass
class Prompts:
    """The prompts to answer: as given (a string or a conversation awaiting the assistant's reply each),
    as conversations (with the chat template; else None) and as the texts the teacher continues."""

    given: list[list[dict] | str]
    conversations: Optional[list[list[dict]]]
    texts: list[str]
    chat: bool


def body(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from .. import distributed
    from ..data import stop_ids

    cfg = cli.run_config(args)
    if cfg.teacher is None or not cfg.teacher.pretrained:
        raise ConfigError("teacher.pretrained: generation needs a trained teacher folder")
    tokenizer, hf_config, run = _checked_teacher(cfg)
    prompts = rendered_prompts(args, cfg, tokenizer, run)
    check_lengths(prompts, tokenizer, getattr(hf_config, "max_position_embeddings", None), args.max_new_tokens)
    stops, end = stop_ids(tokenizer) if prompts.chat else ([tokenizer.eos_token_id], "")
    world = distributed.init(timeout_s=cfg.train.collective_timeout_s)
    out = Path(args.out)
    settings = _settings(args, cfg, tokenizer, prompts)
    if world.is_main:
        _start(out, settings)
    torch.distributed.barrier()
    model = AutoModelForCausalLM.from_pretrained(cfg.teacher.pretrained, local_files_only=True,
                                                 trust_remote_code=cfg.teacher.trust_remote_code).to(world.device).eval()
    tokenizer.padding_side = "left"  # batched generation continues every prompt from its own end
    batches = -(-len(prompts.given) // args.batch_size)
    _generate(args, model, tokenizer, prompts, stops, end, out, batches, world)
    torch.distributed.barrier()  # every rank's parts are written
    if world.is_main:
        _finish(out, settings, batches, len(prompts.given))


def _checked_teacher(cfg: RunConfig):
    """The teacher's tokenizer (its own, else the run's), its Hugging Face config, checked against each other,
    and the run's tokenizer (which the training blocks prompts may be cut from are in)."""
    from ..data import own_tokenizer, run_tokenizer, tokenizer_fingerprint
    from ..models import check_model, model_config

    run = run_tokenizer(cfg)
    tokenizer = own_tokenizer(cfg.teacher) or run  # the text it writes is text: any students' tokenizer reads it
    hf_config = model_config(cfg.teacher, tokenizer)
    check_model(cfg.teacher, hf_config, tokenizer, tokenizer_fingerprint(tokenizer), cfg.data.seq_len)
    return tokenizer, hf_config, run


def rendered_prompts(args: argparse.Namespace, cfg: RunConfig, tokenizer, run=None) -> Prompts:
    """The prompts of --prompts (else cut from the training data, in the ``run``'s tokenizer), through the
    teacher ``tokenizer``'s chat template when it is used."""
    from ..data import render_prompt

    prompts = read_prompts(Path(args.prompts)) if args.prompts else cut_prompts(args, cfg, run or tokenizer)
    chat = use_chat_template(args.chat_template, tokenizer, from_file=bool(args.prompts))
    if args.system_prompt is not None and not chat:
        raise ConfigError("--system-prompt needs the chat template (the teacher's tokenizer has none, or "
                          "--no-chat-template was given)")
    if not chat and any(isinstance(p, list) for p in prompts):
        raise ConfigError("--prompts: 'messages' prompts need the chat template (the teacher's tokenizer has "
                          "none, or --no-chat-template was given)")
    conversations = [conversation(p, args.system_prompt) for p in prompts] if chat else None
    texts = ([render_prompt(tokenizer, c, f"prompt {n}") for n, c in enumerate(conversations, 1)] if chat
             else list(prompts))
    return Prompts(prompts, conversations, texts, chat)


def check_lengths(prompts: Prompts, tokenizer, positions: Optional[int], max_new_tokens: int) -> None:
    """Every prompt (in tokens, as rendered) and its --max-new-tokens reply fit the teacher's ``positions``."""
    for n, text in enumerate(prompts.texts, 1):
        length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if positions is not None and length + max_new_tokens > positions:
            raise ConfigError(f"prompt {n} is {length} tokens"
                              f"{' as rendered by the chat template' if prompts.chat else ''}; "
                              f"with --max-new-tokens={max_new_tokens} it exceeds the teacher's "
                              f"{positions} positions")


def _settings(args: argparse.Namespace, cfg: RunConfig, tokenizer, prompts: Prompts) -> dict:
    """What makes a generation: a folder is only continued with the same."""
    from ..data import tokenizer_fingerprint

    return {"teacher": str(Path(cfg.teacher.pretrained).expanduser().resolve()), "greedy": args.greedy,
            "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
            "seed": args.seed, "batch_size": args.batch_size, "prompts": len(prompts.given),
            "tokenizer": tokenizer_fingerprint(tokenizer), "chat_template": prompts.chat,
            "system_prompt": args.system_prompt, "columns": list(features(prompts.chat))}


def _start(out: Path, settings: dict) -> None:
    """Rank 0: refuse a folder holding a generation with other settings, and mark this one incomplete."""
    out.mkdir(parents=True, exist_ok=True)
    old = json.loads((out / META).read_text()) if (out / META).exists() else None
    if old is not None and {k: old.get(k) for k in settings} != settings:
        raise ConfigError(f"{out} holds a generation made with other settings; use another folder")
    (out / META).write_text(json.dumps({**settings, "complete": False}, indent=2) + "\n")


def _generate(args: argparse.Namespace, model, tokenizer, prompts: Prompts, stops: list[int], end: str, out: Path,
              batches: int, world) -> None:
    """Generate and write this rank's batches (batch b is rank b mod world's) that are not written yet."""
    import torch
    from tqdm.auto import tqdm

    from .. import cache

    todo = [b for b in range(batches) if b % world.size == world.rank and not cache.part_path(out, b).exists()]
    bar = tqdm(total=len(todo), disable=not world.is_main, unit="batch", desc=f"generating (rank 0 of {world.size})")
    for b in todo:
        span = slice(b * args.batch_size, (b + 1) * args.batch_size)
        enc = tokenizer(prompts.texts[span], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(world.device)
        torch.manual_seed(args.seed + b)
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=not args.greedy, temperature=args.temperature, top_p=args.top_p,
                                 max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=stops)
        replies = [clean_reply(tokenizer, row.tolist(), stops, end, prompts.chat)
                   for row in ids[:, enc["input_ids"].shape[1]:]]
        kept = [i for i, reply in enumerate(replies) if reply]  # an empty reply teaches nothing
        rows = {"prompt": [p if isinstance(p, str) else p[-1]["content"] for p in prompts.given[span]],
                "response": replies,
                "cut": [not set(row.tolist()) & set(stops) for row in ids[:, enc["input_ids"].shape[1]:]]}
        if prompts.chat:
            rows["messages"] = [[*c, {"role": "assistant", "content": r}]
                                for c, r in zip(prompts.conversations[span], replies)]
        cache.write_part(out, b, {k: [v[i] for i in kept] for k, v in rows.items()}, features(prompts.chat))
        bar.update(1)
    bar.close()


def _finish(out: Path, settings: dict, batches: int, prompts: int) -> None:
    """Rank 0: count the pairs written, mark the generation complete and say how many replies were empty
    (none written at all is an error) and how many ran to --max-new-tokens (in every part, a continued
    generation's earlier ones too)."""
    import pyarrow.parquet as pq

    from .. import cache

    written = sum(pq.read_metadata(cache.part_path(out, b)).num_rows for b in range(batches))
    cut = sum(sum(pq.read_table(cache.part_path(out, b), columns=["cut"])["cut"].to_pylist()) for b in range(batches))
    (out / META).write_text(json.dumps({**settings, "complete": True, "written": written}, indent=2) + "\n")
    print(f"wrote {written} prompt/response pairs to {out}"
          + (f"; {prompts - written} of {prompts} replies were empty (the teacher ended its turn at "
             "once) and were not written" if written < prompts else ""))
    if written == 0:
        raise ConfigError(f"every reply of the teacher was empty; {out} holds no training data (check the "
                          "teacher's chat template and --max-new-tokens)")
    if cut:
        print(f"  {cut} of the {written} replies ran to --max-new-tokens={settings['max_new_tokens']} without "
              "ending (cut short: raise it, or check that the teacher ends its replies; column 'cut' marks them)")
    first = pq.read_table(cache.part_path(out, 0), columns=["prompt", "response"]).to_pylist()[:SHOWN]
    for row in first:  # what the training data looks like, before anyone trains on it
        print(f"  {row['prompt'][-60:]!r} -> {row['response'][:120]!r}")


SHOWN = 3  # pairs printed at the end of a generation


def probability(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for("codistill-generate", __doc__)
    parser.add_argument("--out", required=True, help="output folder (a datasets Parquet dataset)")
    parser.add_argument("--prompts", help="JSON-lines file, each line {\"prompt\": ...} or {\"messages\": [...]} "
                        "(default: prompts cut from the training data)")
    parser.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                        help="render prompts as a user turn through the teacher's chat template (default: yes for "
                        "a --prompts file when the tokenizer has a template; no for prompts cut from data)")
    parser.add_argument("--system-prompt", help="a system message before every prompt (chat template only)")
    parser.add_argument("--num-prompts", type=cli.positive_int, default=256)
    parser.add_argument("--prompt-tokens", type=cli.positive_int, default=32)
    parser.add_argument("--max-new-tokens", type=cli.positive_int, default=64)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--temperature", type=positive_float, default=1.0)
    parser.add_argument("--top-p", type=probability, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=cli.positive_int, default=16)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run("codistill-generate", build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
