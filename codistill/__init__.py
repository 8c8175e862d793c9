"""codistill: co-distillation of LLMs on DeepSpeed."""

__version__ = "0.1.0"
