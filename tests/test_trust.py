"""Checkpoints are data: a crafted pickle in any checkpoint file is refused, by resume and by
export alike, and its payload never runs."""
import json
import os
import shutil

import pytest
import torch

from codistill.checkpoint import MANIFEST
from codistill.files import sha256_file

from conftest import run_here
from conftest import train_cli_here as train


def export(*args, ok=True):
    from codistill.commands import export

    return run_here(export.main, *args, config=None, ok=ok)


class Payload:
    """Unpickling this runs a shell command that creates ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "run"
    train(f"output_dir={out}", "train.max_steps=2", "train.eval_interval=2")
    return out


def poisoned_copy(saved, tmp_path, victim: str):
    """A copy of the run whose ``victim`` file holds the payload, its manifest entry recomputed
    (the manifest is unsigned: it cannot be what protects)."""
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    step = run / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, step / victim)
    manifest = json.loads((step / MANIFEST).read_text())
    manifest["files"][victim] = {"size": (step / victim).stat().st_size, "sha256": sha256_file(step / victim)}
    (step / MANIFEST).write_text(json.dumps(manifest))
    return run, step / victim, marker


@pytest.mark.parametrize("victim", ["rank_00000.pt", "student/ds/mp_rank_00_model_states.pt"])
def test_resume_refuses_a_checkpoint_file_that_would_run_code(saved, tmp_path, victim):
    run, file, marker = poisoned_copy(saved, tmp_path, victim)
    proc = train(f"output_dir={run}", "resume=auto", "train.max_steps=3", ok=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"codistill-train: error: checkpoint file {file} asks to load posix.system, which is not data DeepSpeed or "
        "codistill writes; refusing it (loading it could run code)")
    assert not marker.exists()


def test_export_refuses_a_checkpoint_file_that_would_run_code(saved, tmp_path):
    run, file, marker = poisoned_copy(saved, tmp_path, "teacher/ds/mp_rank_00_model_states.pt")
    proc = export(str(run), str(tmp_path / "hf"), ok=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("codistill-export: error: checkpoint file ") and "asks to load posix.system" in line
    assert not marker.exists()


def test_an_honest_checkpoint_still_resumes_and_exports(saved, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    proc = train(f"output_dir={run}", "resume=auto", "train.max_steps=3")
    assert "at step 2" in proc.stdout
    export(str(run), str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "student" / "model.safetensors").exists()


def test_export_refuses_a_model_name_from_disk_that_would_leave_its_folder(saved, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    step = run / "checkpoints" / "step_00000002"
    state = json.loads((step / "trainer_state.json").read_text())
    state["models"] = ["teacher", ".."]
    (step / "trainer_state.json").write_text(json.dumps(state))
    manifest = json.loads((step / MANIFEST).read_text())
    manifest["files"]["trainer_state.json"] = {"size": (step / "trainer_state.json").stat().st_size,
                                               "sha256": sha256_file(step / "trainer_state.json")}
    (step / MANIFEST).write_text(json.dumps(manifest))
    out = tmp_path / "hf" / "inner"
    proc = export(str(run), str(out), ok=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"codistill-export: error: {step / 'trainer_state.json'}: model name '..' is not allowed: it names folders, so it "
        "must be letters, digits, _ and -, starting with a letter or digit, at most 64 characters")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_export_checks_every_target_before_writing_any(saved, tmp_path):
    from codistill.checkpoint import export_hf
    from codistill.config import ConfigError

    out = tmp_path / "hf"
    (out / "student").mkdir(parents=True)
    (out / "student" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="student is not empty; choose another folder or pass --overwrite"):
        export_hf(saved, out)
    assert not (out / "teacher").exists()  # the first model was not written before the second was refused
    (out / "student" / "notes.txt").unlink()
    (out / "student").rmdir()
    (out / "student").write_text("a file")
    with pytest.raises(ConfigError, match="student is a file; expected a folder"):
        export_hf(saved, out)
    assert not (out / "teacher").exists() and (out / "student").read_text() == "a file"


def test_eval_reads_a_run_through_an_export_of_its_model(saved, tmp_path):
    from codistill.commands import evaluate

    out = tmp_path / "eval.json"
    assert evaluate.main([str(saved), "--prompt", "to be", "--max-new-tokens", "3", "--no-chat-template",
                          "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["replies"][0]["tokens"] == 3 or report["replies"][0]["stopped"]
    assert not list(tmp_path.glob("**/model.safetensors"))  # the export was temporary
