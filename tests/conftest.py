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
