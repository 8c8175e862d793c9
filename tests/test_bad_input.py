"""Bad input ends with one line naming the key or file and what was expected, before
any process group or engine exists, and leaves the user's files alone."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from codistill.commands import train as entry

from conftest import MICRO, launch


def fails_with(capsys, *args) -> str:
    capsys.readouterr()  # drop what the test's own set-up printed
    code = entry.main(["--config", str(MICRO), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("codistill: error: ")
    assert not torch.distributed.is_initialized()
    return err


def tiny_pretrained(folder, tokenizer, weights=True):
    hf = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                              max_position_embeddings=64)
    AutoModelForCausalLM.from_config(hf).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if not weights:
        for f in folder.glob("*.safetensors"):
            f.unlink()
    return folder


@pytest.mark.parametrize("override, expected", [
    ("train.batch_size=4", "unknown config key 'train.batch_size'"),
    ("teacher.pretrianed=x", "unknown config key 'teacher.pretrianed'"),
    ("train.max_steps=lots", "config key 'train.max_steps': input should be a valid integer"),
    ("train.micro_batch_size=-2", "config key 'train.micro_batch_size': input should be greater than 0"),
    ("distill.alpha_max=2", "config key 'distill.alpha_max': input should be less than or equal to 1"),
    ("data.seq_len=128", "data.seq_len=128 exceeds teacher's max_position_embeddings=64"),
    ("students.0.config.vocab_size=100", "student: embedding rows (100) are fewer than the tokenizer's 4096"),
    ("teacher.arch=no-such-model", "teacher.arch: 'no-such-model' is not a transformers model type"),
    ("data.dataset=/nonexistent/corpus.jsonl", "data.dataset: no data file matches '/nonexistent/corpus.jsonl'"),
    ("teacher.deepspeed.train_micro_batch_size_per_gpu=3", "disagrees with train.micro_batch_size=4"),
    ("teacher.deepspeed=/nonexistent/ds.json", "teacher.deepspeed: file /nonexistent/ds.json does not exist"),
    ("distill.divergence=kl", "config key 'distill.divergence': input should be 'forward_kl', 'reverse_kl', 'jsd' or 'tvd'"),
    ("students.0.distill.alpha_max=-0.5", "config key 'students.0.distill.alpha_max': input should be greater than or equal to 0"),
    ("students.0.distill.top_k=0", "config key 'students.0.distill.top_k': input should be greater than 0"),
    ("resume=/nonexistent/ckpt", "resume: /nonexistent/ckpt does not exist"),
    ("students.0.name=..", "students.0.name: model name '..' is not allowed: it names folders"),
    ("teacher.name=a/b", "teacher.name: model name 'a/b' is not allowed"),
    ("output_dir=", "output_dir: expected the folder the run writes to, got an empty value"),
    ("teacher.deepspeed.zero_optimization.stage=4", "teacher.deepspeed.zero_optimization.stage: input should be 0, 1, 2, 3"),
    ("teacher.deepspeed.zero_optimization.stagee=1", "teacher.deepspeed.zero_optimization.stagee: unknown key"),
    ("students.0.deepspeed.optimizer.type=Adamz", "student.deepspeed.optimizer.type: 'Adamz' is not an optimizer"),
    ("teacher.deepspeed.gradient_clipin=1.0", "teacher.deepspeed.gradient_clipin: not a DeepSpeed key; did you mean "
                                              "'gradient_clipping'?"),
    ("distill.temperature=.inf", "config key 'distill.temperature': input should be a finite number"),
    ("distill.alpha_max=.nan", "config key 'distill.alpha_max': input should be a finite number"),
    ("train.seed=99999999999999999999", "config key 'train.seed': input should be less than"),
    ("train.seed=-1", "config key 'train.seed': input should be greater than or equal to 0"),
    ("train.collective_timeout_s=99999999999", "config key 'train.collective_timeout_s': input should be less than"),
])
def test_bad_values(capsys, tmp_path, override, expected):
    assert expected in fails_with(capsys, f"output_dir={tmp_path}", override)


def test_skip_policy_with_accumulation(capsys):
    err = fails_with(capsys, "train.nonfinite=skip", "train.gradient_accumulation_steps=2")
    assert "train.nonfinite=skip needs train.gradient_accumulation_steps=1" in err


def test_empty_and_unreadable_data_files(capsys, tmp_path, tokenizer):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    assert f"data.dataset: {data} is empty; expected documents" in fails_with(capsys, f"data.dataset={data}")
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text("{this is not json\n")
    tokenizer.save_pretrained(tmp_path / "tok")
    err = fails_with(capsys, f"data.dataset={garbled}", f"data.tokenizer={tmp_path / 'tok'}",
                     f"data.cache_dir={tmp_path / 'c'}", f"output_dir={tmp_path / 'o'}")
    assert f"data.dataset: could not read {garbled} as json" in err


def test_dataset_without_a_tokenizer(capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    assert "data.tokenizer: dataset" in fails_with(capsys, f"data.dataset={data}")


def test_missing_config_file(capsys, tmp_path):
    code = entry.main(["--config", str(tmp_path / "missing.yaml")])
    assert code == 2 and "missing.yaml does not exist" in capsys.readouterr().err


def test_unparsable_deepspeed_json(capsys, tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    assert f"teacher.deepspeed: {bad} is not valid JSON" in fails_with(capsys, f"teacher.deepspeed={bad}")


def test_teacher_with_another_tokenizer_is_refused(capsys, tmp_path, tokenizer):
    from codistill.data import train_bpe_tokenizer

    other = train_bpe_tokenizer(["completely different text " * 100], 4096)
    folder = tiny_pretrained(tmp_path / "other-vocab", other)
    err = fails_with(capsys, f"teacher.pretrained={folder}", "teacher.config={}")
    assert "tokenizer in" in err and "differs from the run's tokenizer" in err


def test_pretrained_folder_without_weights(capsys, tmp_path, tokenizer):
    folder = tiny_pretrained(tmp_path / "no-weights", tokenizer, weights=False)
    err = fails_with(capsys, f"teacher.pretrained={folder}", "teacher.config={}")
    assert "holds no weights" in err


def test_output_dir_with_another_runs_checkpoints_is_never_overwritten(capsys, tmp_path):
    keep = tmp_path / "checkpoints" / "step_00000100" / "teacher" / "weights.pt"
    keep.parent.mkdir(parents=True)
    keep.write_text("precious")
    err = fails_with(capsys, f"output_dir={tmp_path}")
    assert "already holds checkpoints" in err and "overwrite=true" in err
    assert keep.read_text() == "precious"


def test_a_users_own_config_yaml_in_output_dir_is_never_replaced(capsys, tmp_path):
    mine = tmp_path / "config.yaml"
    mine.write_text("# my notes\n" + MICRO.read_text())
    err = fails_with(capsys, f"output_dir={tmp_path}")
    assert f"output_dir: {mine} is not a config this program wrote" in err
    assert mine.read_text().startswith("# my notes")


def test_an_output_dir_that_is_a_file_is_refused(capsys, tmp_path):
    file = tmp_path / "out"
    file.write_text("not a folder")
    assert f"output_dir: {file} is a file; expected a folder" in fails_with(capsys, f"output_dir={file}")
    assert file.read_text() == "not a folder"


def test_the_user_sees_one_line_and_no_traceback_and_debug_shows_it(tmp_path):
    proc = launch("train.max_stepz=1", how="python", ok=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["codistill: error: " + f"{MICRO}: unknown config key 'train.max_stepz'"]
    proc = launch("--debug", "train.max_stepz=1", how="python", ok=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_dataset_too_small_for_one_block(capsys, tmp_path, tokenizer):
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"text": "hi"}) + "\n" for _ in range(3)))
    tokenizer.save_pretrained(tmp_path / "tok")
    err = fails_with(capsys, f"data.dataset={data}", f"data.tokenizer={tmp_path / 'tok'}",
                     f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}")
    assert "gives no complete block of data.seq_len=32 tokens" in err


def test_a_config_that_is_a_folder_or_not_text(capsys, tmp_path):
    assert entry.main(["--config", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"codistill: error: config {tmp_path} is a folder; expected a YAML file"
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert entry.main(["--config", str(binary)]) == 2
    assert capsys.readouterr().err.strip() == f"codistill: error: config {binary} is not a text file; expected YAML"


def test_rows_without_text_and_broken_links_in_a_data_folder(capsys, tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    data = tmp_path / "nulls.jsonl"
    data.write_text(json.dumps({"text": "a line of text " * 20}) + "\n" + json.dumps({"text": None}) + "\n")
    err = fails_with(capsys, f"data.dataset={data}", f"data.tokenizer={tmp_path / 'tok'}",
                     f"data.cache_dir={tmp_path / 'c'}", f"output_dir={tmp_path / 'o'}")
    assert f"data.text_field: a row of '{data}' holds None in column 'text'; expected text in every row" in err
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("some text " * 100)
    (folder / "b.txt").symlink_to(tmp_path / "gone.txt")
    err = fails_with(capsys, f"data.dataset={folder}", f"data.tokenizer={tmp_path / 'tok'}")
    assert f"data.dataset: {folder / 'b.txt'} is a link to nothing; expected data files" in err


def test_a_truncated_pretrained_weights_file(capsys, tmp_path, tokenizer):
    folder = tiny_pretrained(tmp_path / "cut", tokenizer)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = fails_with(capsys, f"teacher.pretrained={folder}", "teacher.config={}")
    assert f"teacher.pretrained: {weights} is truncated (" in err
    weights.write_bytes(b"garbage" * 10)
    assert "is truncated or not a safetensors file" in fails_with(capsys, f"teacher.pretrained={folder}",
                                                                  "teacher.config={}")


def test_a_cache_dir_or_output_dir_that_cannot_be_written(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    err = fails_with(capsys, f"data.cache_dir={blocker / 'cache'}", f"output_dir={tmp_path / 'o'}")
    assert err.startswith("codistill: error: data.cache_dir: cannot write in ") and blocker.read_text() == "in the way"
    err = fails_with(capsys, f"output_dir={blocker / 'out'}")
    assert err == f"codistill: error: output_dir: cannot write in {blocker / 'out'} (Not a directory)"
