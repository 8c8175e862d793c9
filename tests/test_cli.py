"""The command-line shell every command shares: one line per failure, the documented exit
codes, and a process group torn down only if the command made it (no process group here)."""
import os
import signal
import time

import pytest

from codistill import cli
from codistill.errors import ConfigError, NonFinite, RunFailed

from conftest import MICRO, launch_env


def run(body, *argv, debug=False):
    parser = cli.parser_for("codistill-x", "a test command", debug=debug)
    return cli.run("x", parser, body, list(argv))


def raising(exc):
    def body(args):
        raise exc
    return body


@pytest.mark.parametrize("exc, code, line", [
    (ConfigError("train.max_steps: expected a number"), 2, "x: error: train.max_steps: expected a number"),
    (NonFinite("non-finite loss of student at step 4"), 3, "x: error: non-finite loss of student at step 4"),
    (RunFailed("'python -m y' failed with exit code 2"), 1, "x: error: 'python -m y' failed with exit code 2"),
    (RuntimeError("[gloo] Connection reset by peer"), 4,
     "x: error: rank 0: lost contact with another rank, ending the job ([gloo] Connection reset by peer)"),
])
def test_each_failure_is_one_line_with_its_exit_code(capsys, exc, code, line):
    assert run(raising(exc)) == code
    assert capsys.readouterr().err.strip().splitlines() == [line]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_sigterm_that_python_dropped_in_a_finalizer_still_stops_start_up(capsys):
    class Finalized:
        def __del__(self):  # the handler's exception raised here is printed and dropped by Python
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)

    def body(args):
        Finalized()
        cli.check_interrupted()
        return 0

    assert run(body) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "x: error: stopped by SIGTERM before training began; no checkpoint was written")
    assert run(lambda args: cli.check_interrupted()) == 0  # each run starts with none received


def test_other_errors_and_debug_keep_the_traceback():
    with pytest.raises(RuntimeError, match="a bug"):
        run(raising(RuntimeError("a bug")))
    with pytest.raises(ConfigError):
        run(raising(ConfigError("bad")), "--debug", debug=True)


def test_the_body_gets_config_and_overrides_and_its_exit_code_is_returned():
    seen = {}

    def body(args):
        seen["cfg"] = cli.run_config(args, ["train.max_steps=5"])
        return 7

    assert run(body, "--local_rank=1", "--config", str(MICRO), "train.seed=3") == 7
    assert (seen["cfg"].train.max_steps, seen["cfg"].train.seed) == (5, 3)


def test_bad_arguments_are_refused_by_the_parser(capsys):
    parser = cli.parser_for("codistill-x", None, config=False)
    parser.add_argument("--rounds", type=cli.positive_int)
    with pytest.raises(SystemExit) as stop:
        cli.run("x", parser, lambda args: None, ["--rounds", "0"])
    assert stop.value.code == 2 and "expected an integer of at least 1, got 0" in capsys.readouterr().err


def test_a_failed_subprocess_run_names_itself_and_its_log(tmp_path):
    log = tmp_path / "run.log"
    with pytest.raises(RunFailed, match=r"'python -m codistill.commands.train --config /nonexistent.yaml ...' "
                                        rf"failed with exit code 2; see {log}"):
        cli.run_module("codistill.commands.train", ["--config", "/nonexistent.yaml"], log_file=log)
    assert "codistill-train: error: config file /nonexistent.yaml does not exist" in log.read_text()


@pytest.mark.parametrize("late_signal", ["", "1"], ids=["quiet", "sigterm in the teardown"])
def test_a_command_line_that_made_a_process_group_ends_at_once_with_its_code(tmp_path, late_signal):
    """What a finished run leaves behind (here a thread that never ends) cannot turn it into a
    failed or hung one: the process ends itself with its code, exit handlers run, output flushed;
    a SIGTERM that arrives once the work is done (a scheduler's, at the end of a job) changes none of it."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "handlers"
    helper = Path(__file__).parent / "helpers" / "left_behind.py"
    proc = subprocess.run([sys.executable, str(helper), str(out)], capture_output=True, text=True, timeout=60,
                          env=launch_env(LATE_SIGNAL=late_signal))
    assert proc.returncode == 7, proc.stderr[-2000:]
    assert proc.stdout == "work done\n" and "error" not in proc.stderr
    assert out.read_text() == "handlers ran\n"


def test_a_command_started_by_another_never_joins_that_ones_process_group(monkeypatch):
    """A run made in this process (codistill-compare's driver in a notebook after a training run, a test
    worker) leaves RANK, MASTER_PORT, ... set: the runs and arms a command starts get none of them."""
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29512",
                           KEEP_ME="1").items():
        monkeypatch.setenv(key, value)
    env = cli.child_env(OMP_NUM_THREADS="1")
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(env)
    assert env["KEEP_ME"] == "1" and env["OMP_NUM_THREADS"] == "1" and env["PATH"] == os.environ["PATH"]


def test_two_runs_from_one_python_process(tmp_path):
    """A second run in the same process (a notebook, a sweep from Python) gets fresh process groups:
    the first run's teardown also drops the groups DeepSpeed and the disk barrier cached."""
    import subprocess
    import sys

    script = ("import sys\nfrom codistill.commands import train\n"
              "codes = [train.main(['--config', sys.argv[1], f'output_dir={sys.argv[2]}/run{i}', 'train.max_steps=2',"
              " 'train.eval_interval=2']) for i in range(2)]\nprint(codes)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(MICRO), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=launch_env())  # no rendezvous variable of this process's own
    assert proc.stdout.strip().splitlines()[-1] == "[0, 0]", proc.stderr[-3000:]


# Every command, by module.
COMMANDS = ["train", "export", "evaluate", "estimate", "compare", "bench_step", "bench_memory", "bench_build",
            "bench_loss", "cache_logits", "cache_quality", "generate", "prepare_corpus"]
CONSOLE = {"evaluate": "codistill-eval"}  # the console name, where it is not codistill-<module>


def test_importing_the_shell_imports_no_torch():
    """The shell is imported by every command before it parses its arguments: torch (seconds to import)
    waits until a command's body runs."""
    import subprocess
    import sys

    code = "import codistill.cli, sys; assert 'torch' not in sys.modules, 'codistill.cli imported torch'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_commands_help_imports_no_torch(command):
    """`python -m codistill.commands.X --help` prints its usage without importing torch, DeepSpeed,
    transformers or datasets (read from the interpreter's own import log, -X importtime)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", f"codistill.commands.{command}", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: codistill-"), proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "deepspeed", "transformers", "datasets"}, sorted(imported)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_argument_is_one_line(command, capsys):
    import importlib

    module = importlib.import_module(f"codistill.commands.{command}")
    with pytest.raises(SystemExit) as ended:
        module.main(["--no-such-flag"])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{CONSOLE.get(command, 'codistill-' + command.replace('_', '-'))}: error: "), err
    assert "--no-such-flag" in err or "the following arguments are required" in err, err


def test_without_a_gpu_deepspeed_is_told_to_use_the_cpu_before_it_is_imported():
    """Every module that imports deepspeed imports codistill.accelerator first: DS_ACCELERATOR=cpu when torch
    sees no CUDA device (the user's own value wins)."""
    import os
    import subprocess
    import sys

    code = "import os, torch, codistill.engines; print(os.environ.get('DS_ACCELERATOR'), torch.cuda.is_available())"
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    value, cuda = proc.stdout.split()
    assert value == ("None" if cuda == "True" else "cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, "DS_ACCELERATOR": "cuda"})
    assert proc.stdout.split()[0] == "cuda", proc.stderr[-2000:]
