"""Shared fixtures and helpers: one way to start a run (deepspeed, python, mpirun or
torchrun, each rendezvous on a free port) and one reader of a run's TensorBoard scalars."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The suite runs offline (no hub is ever reached; a test that tries fails at once instead of waiting on a
# network): set before anything imports huggingface_hub or datasets, which read it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from codistill.distributed import free_port  # noqa: E402
from codistill.metrics import read_scalars  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MICRO = ROOT / "tests" / "configs" / "micro.yaml"
TRAIN = "launch/train.py"
# One corpus/tokenizer/processed-data cache for the whole suite (built on first use).
os.environ.setdefault("CODISTILL_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

__all__ = ["MICRO", "ROOT", "TRAIN", "launch", "launch_cmd", "launch_env", "read_layout", "read_scalars", "run_cmd",
           "train_here", "run_here", "train_cli_here", "zero_weights", "resumed_beside", "after"]


def launch_env(**extra: str) -> dict:
    """This process's environment without any rendezvous variables of its own, plus ``extra``: what the
    commands give the runs they start (codistill.cli.child_env)."""
    from codistill.cli import child_env

    return child_env(**extra)


def run_cmd(cmd: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=launch_env(**env), capture_output=True, text=True, timeout=timeout)


def bin_path(name: str) -> str:
    """A console script of this interpreter's environment (deepspeed, mpirun)."""
    return str(Path(sys.executable).parent / name)


def launch_cmd(args: list[str], how: str = "deepspeed", ranks: int = 2, script: str = TRAIN) -> list[str]:
    """The command line that starts ``script args`` on ``ranks`` local ranks, as users start it:
    ``deepspeed``, ``torchrun`` (each with a free port), ``mpirun``, or ``python`` (one process)."""
    if how == "python":
        assert ranks == 1, "python runs one process"
        return [sys.executable, script, *args]
    if how == "deepspeed":
        return [bin_path("deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args]
    if how == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                f"--master_port={free_port()}", script, *args]
    if how == "mpirun":
        return [bin_path("mpirun"), "-np", str(ranks), sys.executable, script, *args]
    raise ValueError(f"unknown launcher {how!r}")


def launch(*args: str, how: str = "torchrun", ranks: int = 2, script: str = TRAIN, config=MICRO,
           timeout: int = 300, ok: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run ``script`` (default: training on the micro config) and wait; with ``ok`` assert it
    succeeded, showing the end of its output if not. ``config=None`` passes no --config. The default
    launcher is torchrun, the quickest to start (~2.5 s less than ``deepspeed`` per run); the tests of
    what the launcher itself does (test_launch, test_resume: signals, exit codes, crashes) name
    ``deepspeed``, as users start runs."""
    if how == "python":
        ranks = 1
    extra = {"MASTER_PORT": str(free_port())} if how == "mpirun" else {}
    cmd = launch_cmd([*(["--config", str(config)] if config else []), *args], how, ranks, script)
    proc = run_cmd(cmd, timeout=timeout, **extra, **env)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_here(*overrides: str, config=MICRO) -> None:
    """A one-rank training run in the test process, as ``launch(..., how="python")`` runs it but without an
    interpreter's start-up (~5 s less); what it prints reaches pytest's capsys."""
    from codistill.config import load_config
    from codistill.trainer import Trainer

    Trainer(load_config(config, list(overrides))).fit()


def run_here(main, *args: str, config=MICRO, ok: bool = True) -> subprocess.CompletedProcess:
    """A one-rank command (``main``: a codistill.commands module's) in the test process, its output captured as a
    launch's would be: the same ``--config`` default, a CompletedProcess with its exit code, stdout and stderr."""
    import contextlib
    import io

    argv = [*(["--config", str(config)] if config else []), *args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    proc = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    if ok:
        assert code == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_cli_here(*args: str, config=MICRO, ok: bool = True) -> subprocess.CompletedProcess:
    """``codistill-train`` on one rank in the test process: what a python launch of it gives (exit code, output),
    without an interpreter's start-up, for tests whose point is not the process itself. Its warnings reach
    pytest's log capture (caplog), not its stderr."""
    from codistill.commands import train

    return run_here(train.main, *args, config=config, ok=ok)


def zero_weights(out, step: int, names=("teacher", "student")) -> dict:
    """Each model's fp32 weights in a run's checkpoint at ``step``, joined from its ZeRO partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root = Path(out) / "checkpoints" / f"step_{step:08d}"
    return {name: get_fp32_state_dict_from_zero_checkpoint(str(root / name), tag="ds") for name in names}


def resumed_beside(run, step: int, folder, *args: str, **kw) -> subprocess.CompletedProcess:
    """Continue ``run`` from its checkpoint at ``step`` in another ``folder`` (``resume=<that checkpoint>``):
    what a stop at ``step`` and resume=auto would train, one launch cheaper; ``args``, ``kw``: the run's own."""
    return launch(f"output_dir={folder}", *args, f"resume={Path(run) / 'checkpoints' / f'step_{step:08d}'}", **kw)


def after(scalars: dict, step: int) -> dict:
    """Each tag's values after ``step`` (what a run resumed at ``step`` logs itself)."""
    return {tag: {s: v for s, v in values.items() if s > step} for tag, values in scalars.items()}


def read_layout(output_dir) -> dict[str, list[str]]:
    """The custom-scalars layout a run wrote to TensorBoard: chart title -> its tag regexes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(Path(output_dir) / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    event = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)[0]
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())
    return {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}


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
