"""Measure the bytes one training forward pass leaves held for backward (logits excluded), in
a fresh process, from the RSS before and after it. Run with MALLOC_MMAP_THRESHOLD_=65536 so
that freed temporaries go back to the system and RSS follows the live tensors:

    held_activations.py CHECKPOINTING(0|1) LAYERS HIDDEN SEQ BATCH  -> prints the bytes
"""
import sys

import psutil
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from codistill.models import enable_checkpointing


def main() -> None:
    checkpointing, layers, hidden, seq, batch = (int(a) for a in sys.argv[1:6])
    cfg = AutoConfig.for_model("llama", vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                               max_position_embeddings=seq)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").train()
    if checkpointing:
        enable_checkpointing(model)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    with torch.no_grad():  # the first forward also sets up thread pools and kernel buffers: not activations
        model(input_ids=ids, use_cache=False)
    proc = psutil.Process()
    before = proc.memory_info().rss
    logits = model(input_ids=ids, use_cache=False).logits
    held = proc.memory_info().rss - before - logits.numel() * logits.element_size()
    logits.sum().backward()  # the graph was real
    print(held)


if __name__ == "__main__":
    main()
