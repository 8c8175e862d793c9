"""DeepSpeed's accelerator on a machine without a GPU: ``DS_ACCELERATOR=cpu`` unless the user set one.

Imported first by every codistill module that imports deepspeed (directly or through
transformers' DeepSpeed integration), so the variable is set before DeepSpeed first probes for
an accelerator (it warns when it falls back to the CPU by itself). Importing this imports torch,
which is why the package itself and ``codistill.cli`` do not import it.
"""
import os

import torch


def default_to_cpu() -> None:
    """Set ``DS_ACCELERATOR=cpu`` when torch sees no CUDA device (a value already set wins)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


default_to_cpu()
