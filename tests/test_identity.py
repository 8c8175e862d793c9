"""Which run a folder, a checkpoint and a config belong to: resume only ever continues this run, with
a config that keeps its models and data; no process group needed (checkpoints written by hand)."""
import json
import logging
import os

import pytest
import torch

from codistill import checkpoint, identity
from codistill.config import ConfigError, dump_config, load_config
from codistill.files import check_run_folder, file_entry

from conftest import MICRO


def fake_checkpoint(out, step, run, config=None):
    """A checkpoint folder as a save leaves it (a trainer state, a rank file, the manifest), and ``latest``."""
    folder = checkpoint.step_dir(out, step)
    folder.mkdir(parents=True)
    state = {"step": step, "world_size": 1, "models": ["student"], "run_id": run,
             "config": config or load_config(MICRO).model_dump(mode="json")}
    (folder / checkpoint.STATE).write_text(json.dumps(state))
    torch.save({"data": {"epoch": 0, "position": step}}, folder / "rank_00000.pt")
    files = {p.name: file_entry(p) for p in folder.iterdir()}
    (folder / checkpoint.MANIFEST).write_text(json.dumps({"step": step, "files": files}))
    (out / "checkpoints" / "latest").write_text(f"{folder.name}\n{run}\n")
    return folder


def test_resume_auto_takes_only_this_folders_run(tmp_path, caplog):
    out = tmp_path / "run"
    a3, a6 = fake_checkpoint(out, 3, "aaaa"), fake_checkpoint(out, 6, "aaaa")
    identity.write_run(out, "aaaa")
    assert checkpoint.find_resume(out, "auto") == a6
    # overwrite=true started run bbbb, which saved step 2, since deleted: never run aaaa's step 6 or 3
    b2 = fake_checkpoint(out, 2, "bbbb")
    identity.write_run(out, "bbbb")
    assert checkpoint.find_resume(out, "auto") == b2
    for path in b2.iterdir():
        path.unlink()
    b2.rmdir()
    with caplog.at_level(logging.WARNING, logger="codistill"):
        assert checkpoint.find_resume(out, "auto") is None
    assert "no intact checkpoint of run bbbb" in caplog.text and "left alone: step_00000003, step_00000006" in caplog.text
    # run bbbb started (overwrite=true) after aaaa's last save and has saved nothing: a fresh start, not aaaa's
    (out / "checkpoints" / "latest").write_text("step_00000006\naaaa\n")
    os.utime(out / "checkpoints" / "latest", ns=(1, 1))
    assert checkpoint.find_resume(out, "auto") is None
    # checkpoints swapped in from another run: ``latest`` (or the checkpoint it names) disagrees with run.json
    (out / "checkpoints" / "latest").write_text("step_00000006\naaaa\n")
    with pytest.raises(ConfigError, match=r"latest names run aaaa, but .*run.json says this folder holds run bbbb"):
        checkpoint.find_resume(out, "auto")
    (out / "checkpoints" / "latest").write_text("step_00000006\nbbbb\n")
    with pytest.raises(ConfigError, match="step_00000006 names run aaaa.*adopt=true"):
        checkpoint.find_resume(out, "auto")
    assert a3.is_dir() and a6.is_dir()  # nothing removed
    # a folder of an earlier release (no run.json): ``latest`` says whose run it is
    (out / identity.RUN_RECORD).unlink()
    with pytest.raises(ConfigError, match="step_00000006 names run aaaa"):  # and ``latest`` says bbbb
        checkpoint.find_resume(out, "auto")
    (out / "checkpoints" / "latest").write_text("step_00000006\n")  # nor does ``latest``: the checkpoint's own
    assert checkpoint.find_resume(out, "auto") == a6
    (out / identity.RUN_RECORD).write_text("{not json")
    with pytest.raises(ConfigError, match="run.json is damaged"):
        checkpoint.find_resume(out, "auto")


def test_another_runs_checkpoint_is_resumed_only_when_adopted(tmp_path):
    other = fake_checkpoint(tmp_path / "a", 4, "aaaa")
    out = tmp_path / "b"
    cfg = load_config(MICRO, [f"output_dir={out}", f"resume={other}"])
    state = checkpoint.read_state(other)
    assert identity.check_resume(cfg, out, other, state) == []  # a fresh folder: allowed
    out.mkdir()
    identity.write_run(out, "bbbb")
    with pytest.raises(ConfigError, match="belongs to run aaaa, but output_dir .* holds run bbbb; pass adopt=true"):
        identity.check_resume(cfg, out, other, state)
    adopted = load_config(MICRO, [f"output_dir={out}", f"resume={other}", "adopt=true"])
    assert identity.check_resume(adopted, out, other, state) == []


def test_a_config_that_reshapes_the_models_or_the_data_is_refused_on_resume(tmp_path):
    found = fake_checkpoint(tmp_path / "run", 4, "aaaa")
    state = checkpoint.read_state(found)
    for overrides, keys in ((["data.seq_len=64"], "data.seq_len"),
                            (["students.0.config.hidden_size=48"], "students.0.config.hidden_size"),
                            (["data.tokenizer={train: {vocab_size: 8192}}"], "data.tokenizer"),
                            (["teacher.tokenizer=/a/tokenizer"], "teacher.tokenizer"),  # its vocabulary, the data
                            (["train.seed=5", "teacher.name=big"], "teacher.name, train.seed"),
                            (["students.0.name=s2"], "students.0.name"), (["mode=soft", "teacher.pretrained=/x", "teacher.config={}"], "mode, teacher.config.hidden_size, teacher.config.intermediate_size")):
        cfg = load_config(MICRO, overrides)
        with pytest.raises(ConfigError) as err:
            identity.check_resume(cfg, tmp_path / "run", found, state)
        assert f"differs from {found}'s in {keys}" in str(err.value), (overrides, str(err.value))
        assert "resume=auto, without --config" in str(err.value)
    assert identity.shaping(identity.changed_keys({"students": [{"name": "s"}]}, {"students": [{"name": "s"}] * 2})) \
        == ["students"]  # a model more or fewer
    # what the training does may change: learning rates, distillation, the length of the run, ZeRO stages
    cfg = load_config(MICRO, ["train.max_steps=50", "distill.alpha_max=0.3", "data.num_proc=2",
                              "students.0.deepspeed.zero_optimization.stage=3", "output_dir=elsewhere"])
    assert identity.check_resume(cfg, tmp_path / "run", found, state) == [
        "data.num_proc", "distill.alpha_max", "students.0.deepspeed.zero_optimization.stage", "train.max_steps"]


def test_resume_without_a_config_takes_the_runs_own(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(dump_config(load_config(MICRO, [f"output_dir={out}"])))
    assert identity.own_config([f"output_dir={out}", "resume=auto"]) == out / "config.yaml"
    assert identity.own_config([f"output_dir={out}"]) is None  # no resume: the embedded default
    step = fake_checkpoint(out, 4, "aaaa")
    assert identity.own_config([f"resume={step}", "output_dir=elsewhere"]) == out / "config.yaml"
    assert identity.own_config([f"resume={out}"]) == out / "config.yaml"
    assert identity.own_config([f"output_dir={tmp_path / 'new'}", "resume=auto"]) is None  # a first start
    (out / "config.yaml").write_text("students: []\n")  # not one this program wrote: never taken
    assert identity.own_config([f"output_dir={out}", "resume=auto"]) is None


@pytest.mark.parametrize("damage, message", [
    (lambda s: {k: v for k, v in s.items() if k != "world_size"}, "has no valid 'world_size'"),
    (lambda s: {**s, "step": "4"}, "has no valid 'step'"),
    (lambda s: [s], "holds a list, not a trainer state"),
])
def test_a_trainer_state_without_what_every_checkpoint_holds_is_named(tmp_path, damage, message):
    found = fake_checkpoint(tmp_path / "run", 4, "aaaa")
    path = found / checkpoint.STATE
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    with pytest.raises(ConfigError, match=message):
        checkpoint.read_state(found)


def test_a_link_in_place_of_a_run_folder_is_refused(tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    check_run_folder(out)
    (out / "tensorboard").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="tensorboard is a symbolic link"):
        check_run_folder(out)
    (out / "tensorboard").unlink()
    (out / "checkpoints").write_text("")
    with pytest.raises(ConfigError, match="checkpoints is not a folder"):
        check_run_folder(out)


def test_a_failure_that_cannot_save_names_the_last_good_checkpoint_or_that_there_is_none(tmp_path):
    out = tmp_path / "run"
    assert checkpoint.last_good(out, "aaaa").startswith("no checkpoint of this run was saved before it")
    step = fake_checkpoint(out, 3, "aaaa")
    assert checkpoint.last_good(out, "aaaa") == f"the newest checkpoint, {step}, holds the last good state (resume=auto)"
    assert checkpoint.last_good(out, "bbbb").startswith("no checkpoint of this run")  # another run's is not ours


def test_a_torch_file_cut_short_is_named_even_when_its_manifest_was_rewritten(tmp_path):
    found = fake_checkpoint(tmp_path / "run", 4, "aaaa")
    rank = found / "rank_00000.pt"
    rank.write_bytes(rank.read_bytes()[:-30])
    manifest = json.loads((found / checkpoint.MANIFEST).read_text())
    manifest["files"]["rank_00000.pt"] = file_entry(rank)
    (found / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.verify(found) == (f"checkpoint file {rank} is not a whole torch file (no zip directory at its "
                                        "end: cut short?)")
