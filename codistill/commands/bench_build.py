"""Host memory a rank adds while building a model: whole (every rank builds all of it in fp32,
then DeepSpeed partitions it) against ZeRO-3 construction (built partitioned under
deepspeed.zero.Init; rank 0 initialises one module at a time), side by side in one
invocation. Each way runs as its own N-rank job, since a process's peak memory only grows;
each rank reports its peak resident memory during the build minus its memory before it.

    python tools/bench_build.py [--ranks 2] [--hidden 1024] [--layers 32] [--vocab 32000]
    codistill-bench-build ...   (the same, as a console command)

Prints the parameter count, each way's largest per-rank figure and their ratio; with
--json FILE also writes them there.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path
from typing import Optional

from .. import cli


def _config(args: argparse.Namespace):
    from transformers import AutoConfig

    return AutoConfig.for_model("llama", vocab_size=args.vocab, hidden_size=args.hidden,
                                intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                                num_attention_heads=max(1, args.hidden // 128), num_key_value_heads=max(1, args.hidden // 512),
                                max_position_embeddings=2048)


def _worker(args: argparse.Namespace) -> None:
    import psutil
    import torch

    from .. import distributed
    from ..config import ModelSpec
    from ..engines import quiet_library_noise
    from ..models import build_model

    quiet_library_noise()
    distributed.init()
    world = torch.distributed.get_world_size()
    ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world, "zero_optimization": {"stage": 3}}
    spec, cfg = ModelSpec(name="model", deepspeed=ds), _config(args)
    before = psutil.Process().memory_info().rss
    model = build_model(spec, cfg, seed=1, zero3=ds if args.worker == "zero3" else None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    added = [None] * world
    torch.distributed.all_gather_object(added, peak - before)
    if torch.distributed.get_rank() == 0:
        Path(args.out).write_text(json.dumps({"parameters": n, "added_per_rank": added}))
    torch.distributed.barrier()
    cli.leave(0)  # measured and written; models built under zero.Init without an engine may abort teardown


def body(args: argparse.Namespace) -> None:
    if args.worker:
        return _worker(args)
    shape = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for how in ("whole", "zero3"):
            out = Path(tmp) / f"{how}.json"
            cli.run_module("codistill.commands.bench_build", ["--worker", how, "--out", str(out), *shape],
                           nproc=args.ranks, log_file=Path(tmp) / "log.txt" if args.quiet else None)
            results[how] = json.loads(out.read_text())
    n = results["whole"]["parameters"]
    whole, zero3 = (max(results[h]["added_per_rank"]) for h in ("whole", "zero3"))
    print(f"building a {n / 1e6:.0f}M-parameter Llama (fp32) on {args.ranks} ranks, peak host memory a rank adds:")
    print(f"  whole, then partitioned by DeepSpeed : {whole / 2**30:.3f} GB (fp32 weights alone: {4 * n / 2**30:.3f} GB)")
    print(f"  ZeRO-3 construction                  : {zero3 / 2**30:.3f} GB (a 1/{args.ranks} share: "
          f"{4 * n / args.ranks / 2**30:.3f} GB)")
    print(f"  ratio ZeRO-3 / whole                 : {zero3 / whole:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "ratio": zero3 / whole}, indent=1) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for("codistill-bench-build", __doc__, config=False)
    parser.add_argument("--ranks", type=cli.positive_int, default=2)
    parser.add_argument("--hidden", type=cli.positive_int, default=1024)
    parser.add_argument("--layers", type=cli.positive_int, default=32)
    parser.add_argument("--vocab", type=cli.positive_int, default=32000)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--quiet", action="store_true", help="keep the ranks' own output out of sight")
    parser.add_argument("--worker", choices=["whole", "zero3"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run("codistill-bench-build", build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
