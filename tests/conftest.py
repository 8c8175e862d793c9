import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MICRO = ROOT / "tests" / "configs" / "micro.yaml"
# One corpus/tokenizer/processed-data cache for the whole suite (built on first use).
os.environ.setdefault("CODISTILL_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def launch_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(extra)
    return env


def run_cmd(cmd: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(**env), capture_output=True, text=True, timeout=timeout)
    return proc


def bin_path(name: str) -> str:
    """A console script of this interpreter's environment (deepspeed, mpirun)."""
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="session")
def tokenizer():
    from codistill.config import DataConfig
    from codistill.data import resolve_tokenizer

    return resolve_tokenizer(DataConfig(), None)


@pytest.fixture(scope="session")
def pretrained_teacher(tmp_path_factory, tokenizer):
    """A small Llama saved with the bundled tokenizer, as a 'trained' teacher folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("teacher") / "teacher"
    hf = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                              max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                              initializer_range=0.1)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(hf).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
