"""codistill: co-distillation of LLMs on DeepSpeed."""
import os

import torch

# DeepSpeed probes for accelerators and warns when it falls back to the CPU; say it up front.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

__version__ = "0.1.0"
