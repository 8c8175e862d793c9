"""Build models whole and partitioned under ZeRO-3 with the same seed on every rank and
compare the gathered parameters; load a pretrained folder both ways too. Run under any
launcher with 2 ranks:  zero3_build.py PRETRAINED_FOLDER  -> prints one line per check."""
import os
import sys

import deepspeed
import torch
from transformers import AutoConfig

from codistill import distributed
from codistill.config import ModelSpec
from codistill.models import build_model


def compare(whole, part) -> float:
    worst = 0.0
    for (name, a), (other, b) in zip(whole.named_parameters(), part.named_parameters()):
        assert name == other and hasattr(b, "ds_tensor") and not hasattr(a, "ds_tensor"), (name, other)
        with deepspeed.zero.GatheredParameters([b]):
            worst = max(worst, (a - b).abs().max().item())
    return worst


def main() -> None:
    distributed.init()  # gloo on CPU, without the shm op DeepSpeed would compile for ~30 s
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world, "zero_optimization": {"stage": 3}}
    shapes = {"llama-tied-gqa": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
              "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=2, n_positions=64)),
              "qwen2-padded": ("qwen2", dict(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1))}
    for label, (arch, kwargs) in shapes.items():
        cfg = AutoConfig.for_model(arch, **{"vocab_size": 600, "max_position_embeddings": 64, **kwargs})
        spec = ModelSpec(name="m", deepspeed=ds)
        whole, part = build_model(spec, cfg, seed=3), build_model(spec, cfg, seed=3, zero3=ds)
        local = sum(p.ds_tensor.numel() for p in part.parameters())
        total = sum(p.ds_numel for p in part.parameters())
        diff = compare(whole, part)
        if rank == 0:
            print(f"random {label}: max difference {diff}, rank 0 holds {local} of {total}", flush=True)
    folder = sys.argv[1]
    spec = ModelSpec(name="m", pretrained=folder, deepspeed=ds)
    cfg = AutoConfig.from_pretrained(folder)
    diff = compare(build_model(spec, cfg, seed=0), build_model(spec, cfg, seed=0, zero3=ds))
    after = build_model(spec, cfg, seed=0)  # the next build is whole again
    if rank == 0:
        print(f"pretrained: max difference {diff}; next build whole: {not hasattr(next(after.parameters()), 'ds_tensor')}",
              flush=True)
    torch.distributed.barrier()
    os._exit(0)  # see codistill/commands/bench_build.py: no engine, so shutdown may abort


if __name__ == "__main__":
    main()
