"""Writes inside a run's folder never follow a link planted there: the temporary file of an atomic write is
made exclusively under a fresh name, and a link at the target itself is replaced, not written through."""
import os

from codistill.files import UMASK, temp_beside, write_atomically


def test_an_atomic_write_never_writes_through_a_planted_link(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    for name in (".latest.tmp", ".config.yaml.tmp"):  # the fixed names earlier releases wrote through
        (run / name).symlink_to(outside)
    write_atomically(run / "latest", "step_00000002\n")
    (run / "config.yaml").symlink_to(outside)  # a link at the target: replaced by the new file
    write_atomically(run / "config.yaml", "mode: codistill\n")
    assert outside.read_text() == "keep me\n"
    assert (run / "latest").read_text() == "step_00000002\n"
    assert not (run / "config.yaml").is_symlink() and (run / "config.yaml").read_text() == "mode: codistill\n"
    assert sorted(p.name for p in run.iterdir()) == [".config.yaml.tmp", ".latest.tmp", "config.yaml", "latest"]


def test_temporary_names_are_fresh_files_and_folders_beside_their_target(tmp_path):
    a, b = temp_beside(tmp_path / "part-00001.parquet"), temp_beside(tmp_path / "part-00001.parquet")
    assert a != b and a.parent == tmp_path and a.is_file() and not a.is_symlink() and a.stat().st_size == 0
    d = temp_beside(tmp_path / "student", folder=True)
    assert d.is_dir() and d.name.startswith(".student.") and os.stat(d).st_mode & 0o777 == 0o777 & ~UMASK
    assert os.stat(a).st_mode & 0o777 == 0o666 & ~UMASK  # an ordinary file's permissions, not tempfile's 0600
    write_atomically(tmp_path / "config.yaml", "x\n")
    assert os.stat(tmp_path / "config.yaml").st_mode & 0o777 == 0o666 & ~UMASK


def fake_checkpoint(root, step, run="r1", damaged=False):
    import json

    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "run_id": run}))
    (folder / "weights.bin").write_bytes(b"x" * 10)
    files = {name: {"size": (folder / name).stat().st_size, "sha256": "-"} for name in ("trainer_state.json",
                                                                                     "weights.bin")}
    (folder / "manifest.json").write_text(json.dumps({"step": step, "files": files}))
    if damaged:
        (folder / "weights.bin").write_bytes(b"x" * 3)  # truncated after it was listed
    return folder


def test_pruning_counts_only_intact_checkpoints_and_never_removes_a_damaged_or_another_runs(tmp_path):
    from codistill.checkpoint import _prune

    for step, run, damaged in ((1, "r1", False), (2, "r1", False), (3, "other", False), (4, "r1", True)):
        fake_checkpoint(tmp_path, step, run, damaged)
    new = fake_checkpoint(tmp_path, 5)
    _prune(tmp_path, keep_last=2, keep=new, run="r1")
    # the damaged step 4 is not counted: the newest intact one before step 5 (step 2) stays, step 1 goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003", "step_00000004",
                                                          "step_00000005"]
