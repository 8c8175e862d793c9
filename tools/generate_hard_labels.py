#!/usr/bin/env python
"""Hard-label (sequence-level) distillation data: the teacher writes the responses.

    python tools/generate_hard_labels.py --config configs/hard.yaml --out runs/generated [options]
    deepspeed --num_gpus 2 tools/generate_hard_labels.py --config configs/hard.yaml --out runs/generated

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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from codistill import cache, distributed  # noqa: E402
from codistill.config import ConfigError, load_config  # noqa: E402
from codistill.data import build_splits, resolve_tokenizer, tokenizer_fingerprint  # noqa: E402
from codistill.models import check_model, model_config, pretrained_tokenizer_dir  # noqa: E402

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


def run(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    cfg = load_config(args.config, args.overrides)
    if not cfg.teacher.pretrained:
        raise ConfigError("teacher.pretrained: generation needs a trained teacher folder")
    own = pretrained_tokenizer_dir(cfg.teacher)
    tokenizer = resolve_tokenizer(cfg.data, str(own) if own else None)
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
    torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config naming the teacher and data (default: configs/tiny.yaml)")
    parser.add_argument("--out", required=True, help="output folder (a datasets Parquet dataset)")
    parser.add_argument("--prompts", help="JSON-lines file with a 'prompt' field (default: cut from training data)")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_args(argv)
    if min(args.num_prompts, args.prompt_tokens, args.max_new_tokens, args.batch_size) < 1 or args.temperature <= 0 \
            or not 0 < args.top_p <= 1:
        parser.error("counts must be positive, --temperature > 0 and 0 < --top-p <= 1")
    try:
        run(args)
    except ConfigError as exc:
        if distributed.env_rank() == 0:
            print(f"generate_hard_labels: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
