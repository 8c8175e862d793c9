"""Hard-label (sequence-level) distillation data: the teacher writes the responses.

    python tools/generate_hard_labels.py --config configs/hard.yaml --out runs/generated [options]
    deepspeed --num_gpus 2 tools/generate_hard_labels.py --config configs/hard.yaml --out runs/generated
    codistill-generate ...   (the same, as a console command)

Prompts come from a JSON-lines file with a "prompt" field (--prompts) or are cut from
the run's training blocks (--num-prompts of --prompt-tokens tokens each, chosen by
--seed). The teacher is ``teacher.pretrained`` of the config. Prompts are generated
in fixed batches, batch b on rank b mod world, each batch sampled with seed + b, so
the output is the same for any number of ranks. Each batch is written atomically
as a Parquet part (prompt, response); a killed run continues where it stopped.
Train on it with mode=hard data.dataset=OUT data.prompt_field=prompt data.text_field=response.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from .. import cache, cli, distributed
from ..config import ConfigError
from ..data import build_splits, run_tokenizer, tokenizer_fingerprint
from ..models import check_model, model_config

META = "codistill_generation.json"


def load_prompts(args: argparse.Namespace, cfg, tokenizer) -> list[str]:
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise ConfigError(f"--prompts: {path} does not exist")
        prompts = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"--prompts: line {n} of {path} is not a JSON object with a 'prompt' string") from None
        if not prompts:
            raise ConfigError(f"--prompts: {path} holds no prompts")
        return prompts
    train = build_splits(cfg.data, tokenizer, cfg.train.seed).train
    picked = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:args.num_prompts]
    return [tokenizer.decode(train[int(i)]["input_ids"][:args.prompt_tokens]) for i in picked]


def body(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    cfg = cli.run_config(args)
    if not cfg.teacher.pretrained:
        raise ConfigError("teacher.pretrained: generation needs a trained teacher folder")
    tokenizer = run_tokenizer(cfg)
    check_model(cfg.teacher, model_config(cfg.teacher, tokenizer), tokenizer, tokenizer_fingerprint(tokenizer),
                cfg.data.seq_len)
    prompts = load_prompts(args, cfg, tokenizer)
    world = distributed.init(timeout_s=cfg.train.collective_timeout_s)
    out = Path(args.out)
    settings = {"teacher": str(Path(cfg.teacher.pretrained).expanduser().resolve()), "greedy": args.greedy,
                "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
                "seed": args.seed, "batch_size": args.batch_size, "prompts": len(prompts),
                "tokenizer": tokenizer_fingerprint(tokenizer)}
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        old = json.loads((out / META).read_text()) if (out / META).exists() else None
        if old is not None and {k: old.get(k) for k in settings} != settings:
            raise ConfigError(f"{out} holds a generation made with other settings; use another folder")
        (out / META).write_text(json.dumps({**settings, "complete": False}, indent=2) + "\n")
    torch.distributed.barrier()
    model = AutoModelForCausalLM.from_pretrained(cfg.teacher.pretrained, local_files_only=True,
                                                 trust_remote_code=cfg.teacher.trust_remote_code).to(world.device).eval()
    tokenizer.padding_side = "left"  # batched generation continues every prompt from its own end
    batches = -(-len(prompts) // args.batch_size)
    todo = [b for b in range(batches) if b % world.size == world.rank and not cache.part_path(out, b).exists()]
    bar = tqdm(total=len(todo), disable=not world.is_main, unit="batch", desc=f"generating (rank 0 of {world.size})")
    for b in todo:
        chunk = prompts[b * args.batch_size:(b + 1) * args.batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(world.device)
        torch.manual_seed(args.seed + b)
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=not args.greedy, temperature=args.temperature, top_p=args.top_p,
                                 max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        responses = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        cache.write_part(out, b, {"prompt": chunk, "response": responses})
        bar.update(1)
    bar.close()
    torch.distributed.barrier()
    if world.is_main:
        (out / META).write_text(json.dumps({**settings, "complete": True}, indent=2) + "\n")
        print(f"wrote {len(prompts)} prompt/response pairs to {out}")


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
    parser.add_argument("--prompts", help="JSON-lines file with a 'prompt' field (default: cut from training data)")
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
    return cli.run("generate_hard_labels", build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
