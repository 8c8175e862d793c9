"""Bad input ends with one line naming the key or file and what was expected, before any
engine exists, with no process group left behind, and leaves the user's files alone.

One table: each case makes its inputs in a fresh folder (a data file, a pretrained folder, an
output_dir holding something) and gives the command-line arguments. Every case runs the real
entry point in this process and must end with exit code 2, exactly one stderr line
``codistill-train: error: ...`` holding the expected text, no engine built (a bad data file is found
once the process group exists: ranks read data together), no process group left, every file that was
there before unchanged, and nothing written into the run's output_dir.
"""
import hashlib
import json
import os
from pathlib import Path

import deepspeed
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from codistill.commands import train as entry

from conftest import MICRO, launch


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


# ---------------------------------------------------------------- inputs the cases make

def config_arg(value):
    return lambda tmp, tok: ["--config", str(value(tmp) if callable(value) else value)]


def own_data(name, content, *extra):
    """A data file (text, or bytes) of the user's with the bundled tokenizer beside it."""
    def make(tmp, tok):
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        tok.save_pretrained(tmp / "tok")
        return [f"data.dataset={path}", f"data.tokenizer={tmp / 'tok'}", f"data.cache_dir={tmp / 'cache'}", *extra]
    return make


def saved_folder(damage):
    """A datasets.save_to_disk folder of the user's, damaged by ``damage(folder)``."""
    def make(tmp, tok):
        import datasets

        folder = tmp / "saved"
        datasets.Dataset.from_dict({"text": ["a line of text " * 30] * 20}).save_to_disk(str(folder))
        damage(folder)
        tok.save_pretrained(tmp / "tok")
        return [f"data.dataset={folder}", f"data.tokenizer={tmp / 'tok'}", f"data.cache_dir={tmp / 'cache'}"]
    return make


def jsonl(*rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def mixed(tmp, tok):
    (tmp / "mixed").mkdir()
    (tmp / "mixed" / "b.jsonl").write_text(jsonl({"text": "text " * 100}))
    return []


def broken_link(tmp, tok):
    (tmp / "docs").mkdir()
    (tmp / "docs" / "a.txt").write_text("some text " * 100)
    (tmp / "docs" / "b.txt").symlink_to(tmp / "gone.txt")
    tok.save_pretrained(tmp / "tok")
    return [f"data.dataset={tmp / 'docs'}", f"data.tokenizer={tmp / 'tok'}"]


def teacher_folder(damage=None, weights=True, other_vocab=False, extra=()):
    def make(tmp, tok):
        if other_vocab:
            from codistill.data import train_bpe_tokenizer

            tok = train_bpe_tokenizer(["completely different text " * 100], 4096)
        folder = tiny_pretrained(tmp / "teacher", tok, weights)
        if damage:
            damage(next(folder.glob("*.safetensors")))
        return [f"teacher.pretrained={folder}", "teacher.config={}", *extra]
    return make


def truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def output_dir_holding(rel, content="precious"):
    def make(tmp, tok):
        path = tmp / "out" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        return []
    return make


def a_file(tmp, tok):
    (tmp / "a-file").write_text("in the way")
    return []


def with_file(name, content):
    def make(tmp, tok):
        (tmp / name).write_text(content)
        return []
    return make


def not_a_cache(meta=None):
    def make(tmp, tok):
        (tmp / "cache-folder").mkdir()
        if meta is not None:
            (tmp / "cache-folder" / "codistill_cache.json").write_text(meta)
        return []
    return make


def plain(*args):
    return lambda tmp, tok: list(args)


def fmt(make_args, *overrides):
    """Overrides with {tmp} filled in after ``make_args`` made the inputs."""
    def make(tmp, tok):
        return [*make_args(tmp, tok), *(o.format(tmp=tmp) for o in overrides)]
    return make


PARQUET_LIKE = b"PAR1" + os.urandom(2000)
SOFT = ["mode=soft", "teacher.pretrained=null"]

CASES = [
    # config keys and values
    ("unknown key", plain("train.batch_size=4"), "unknown config key 'train.batch_size'"),
    ("misspelt model key", plain("teacher.pretrianed=x"), "unknown config key 'teacher.pretrianed'"),
    ("not an integer", plain("train.max_steps=lots"), "config key 'train.max_steps': input should be a valid integer"),
    ("negative", plain("train.micro_batch_size=-2"), "config key 'train.micro_batch_size': input should be greater than 0"),
    ("alpha above 1", plain("distill.alpha_max=2"), "config key 'distill.alpha_max': input should be less than or equal to 1"),
    ("seq_len too long", plain("data.seq_len=128"), "data.seq_len=128 exceeds teacher's max_position_embeddings=64"),
    ("embedding too small", plain("students.0.config.vocab_size=100"),
     "student: embedding rows (100) are fewer than the tokenizer's 4096"),
    ("unknown arch", plain("teacher.arch=no-such-model"), "teacher.arch: 'no-such-model' is not a transformers model type"),
    ("misspelt arch", plain("teacher.arch=lama"), "teacher.arch: 'lama' is not a transformers model type (close: llama"),
    ("zero hidden size", plain("teacher.config.hidden_size=0"), "teacher.config.hidden_size: expected a positive integer, got 0"),
    ("heads do not divide", plain("teacher.config.num_attention_heads=3"),
     "teacher.config: transformers refuses it for arch 'llama': ValueError: The hidden size (64) is not a multiple"),
    ("negative lr", plain("teacher.deepspeed.optimizer.params.lr=-1"),
     "teacher.deepspeed.optimizer.params.lr: expected a finite number >= 0, got -1"),
    ("betas out of range", plain("students.0.deepspeed.optimizer.params.betas=[0.9,1.5]"),
     "student.deepspeed.optimizer.params.betas: expected two numbers in [0, 1), got [0.9, 1.5]"),
    ("hub dataset out of reach", lambda tmp, tok: tok.save_pretrained(tmp / "tok") and [] or [
        "data.dataset=hub:codistill-tests/no-such-dataset", f"data.tokenizer={tmp / 'tok'}"],
     "data.dataset: cannot load 'codistill-tests/no-such-dataset' from the Hugging Face Hub or its local cache ("),
    ("missing dataset", plain("data.dataset=/nonexistent/corpus.jsonl"),
     "data.dataset: no data file matches '/nonexistent/corpus.jsonl'"),
    ("micro-batch disagrees", plain("teacher.deepspeed.train_micro_batch_size_per_gpu=3"),
     "disagrees with train.micro_batch_size=4"),
    ("missing ds json", plain("teacher.deepspeed=/nonexistent/ds.json"),
     "teacher.deepspeed: file /nonexistent/ds.json does not exist"),
    ("unknown divergence", plain("distill.divergence=kl"),
     "config key 'distill.divergence': input should be 'forward_kl', 'reverse_kl', 'jsd' or 'tvd'"),
    ("per-student override", plain("students.0.distill.alpha_max=-0.5"),
     "config key 'students.0.distill.alpha_max': input should be greater than or equal to 0"),
    ("top_k zero", plain("students.0.distill.top_k=0"), "config key 'students.0.distill.top_k': input should be greater than 0"),
    ("top_k past the vocabulary", plain("distill.targets=topk", "distill.top_k=100000"),
     "student: distill.top_k=100000 is not below the vocabulary's 4,096 tokens"),
    ("empty dataset", plain("data.dataset="),
     "data.dataset: expected a bundled corpus name, a data path or 'hub:<name>', got an empty value"),
    ("fused_linear not a choice", plain("distill.fused_linear=maybe"),
     "config key 'distill.fused_linear': input should be 'auto', true or false (got 'maybe')"),
    ("fused_linear per student", plain("students.0.distill.fused_linear=false"),
     "student.distill.fused_linear: the fused pass is shared by every model"),
    ("missing resume", plain("resume=/nonexistent/ckpt"), "resume: /nonexistent/ckpt does not exist"),
    ("resume a folder that is no checkpoint", fmt(plain(), "resume={tmp}"), "is not a complete checkpoint (no manifest.json)"),
    ("name ..", plain("students.0.name=.."), "students.0.name: model name '..' is not allowed: it names folders"),
    ("name with /", plain("teacher.name=a/b"), "teacher.name: model name 'a/b' is not allowed"),
    ("empty output_dir", plain("output_dir="), "output_dir: expected the folder the run writes to, got an empty value"),
    ("ZeRO stage 4", plain("teacher.deepspeed.zero_optimization.stage=4"),
     "teacher.deepspeed.zero_optimization.stage: input should be 0, 1, 2 or 3 (got 4)"),
    ("unknown ZeRO key", plain("teacher.deepspeed.zero_optimization.stagee=1"),
     "teacher.deepspeed.zero_optimization.stagee: unknown key"),
    ("unknown optimizer", plain("students.0.deepspeed.optimizer.type=Adamz"),
     "student.deepspeed.optimizer.type: 'Adamz' is not an optimizer"),
    ("unknown optimizer parameter", plain("teacher.deepspeed.optimizer.params.weight_decai=0.1"),
     "teacher.deepspeed.optimizer.params.weight_decai: not a parameter of optimizer AdamW (it takes "),
    ("unknown torch optimizer parameter", plain("students.0.deepspeed.optimizer={type: SGD, params: {lr: 0.1, beta: 0.9}}"),
     "student.deepspeed.optimizer.params.beta: not a parameter of optimizer SGD"),
    ("unknown scheduler", plain("teacher.deepspeed.scheduler={type: WarmupLinear, params: {}}"),
     "teacher.deepspeed.scheduler.type: 'WarmupLinear' is not a scheduler DeepSpeed knows (its own: LRRangeTest"),
    ("unknown scheduler parameter", plain("teacher.deepspeed.scheduler={type: WarmupLR, params: {warmup_step: 5}}"),
     "teacher.deepspeed.scheduler.params.warmup_step: not a parameter of scheduler WarmupLR"),
    ("nvme offload without a path", plain("teacher.deepspeed.zero_optimization.offload_optimizer={device: nvme}"),
     "teacher.deepspeed.zero_optimization.offload_optimizer: device nvme needs nvme_path"),
    ("fp16 on CPU", plain("students.0.deepspeed.fp16={enabled: true}"),
     "student.deepspeed.fp16.enabled: fp16 needs a GPU"),
    ("a link in place of the run's TensorBoard folder", lambda tmp, tok: (tmp / "out").mkdir() or
     (tmp / "out" / "tensorboard").symlink_to(tmp) or [], "output_dir: {tmp}/out/tensorboard is a symbolic link"),
    ("negative gradient clipping", plain("teacher.deepspeed.gradient_clipping=-1"),
     "teacher.deepspeed.gradient_clipping: expected a finite number >= 0 (0: no clipping), got -1"),
    ("misspelt DeepSpeed key", plain("teacher.deepspeed.gradient_clipin=1.0"),
     "teacher.deepspeed.gradient_clipin: not a DeepSpeed key; did you mean 'gradient_clipping'?"),
    ("a huge bad value is quoted short", plain("train.max_steps=" + "x" * 100_000),
     "config key 'train.max_steps': input should be a valid integer (got 'xxxxxxxx"),
    ("infinite temperature", plain("distill.temperature=.inf"), "config key 'distill.temperature': input should be a finite number"),
    ("nan alpha", plain("distill.alpha_max=.nan"), "config key 'distill.alpha_max': input should be a finite number"),
    ("seed beyond 64 bits", plain("train.seed=99999999999999999999"), "config key 'train.seed': input should be less than"),
    ("negative seed", plain("train.seed=-1"), "config key 'train.seed': input should be greater than or equal to 0"),
    ("timeout too large", plain("train.collective_timeout_s=99999999999"),
     "config key 'train.collective_timeout_s': input should be less than"),
    ("skip with accumulation", plain("train.nonfinite=skip", "train.gradient_accumulation_steps=2"),
     "train.nonfinite=skip needs train.gradient_accumulation_steps=1"),
    ("cache without soft mode", fmt(plain(), "teacher.cache={tmp}"), "teacher.cache needs mode=soft"),
    ("soft without a teacher", plain("mode=soft"), "teacher.pretrained"),
    ("cache that does not exist", fmt(plain(*SOFT), "teacher.cache={tmp}/nowhere"), "/nowhere does not exist"),
    ("folder that is no cache", fmt(not_a_cache(), *SOFT, "teacher.cache={tmp}/cache-folder"),
     "cache-folder is not a teacher cache (no codistill_cache.json)"),
    ("unfinished cache", fmt(not_a_cache('{"complete": false}'), *SOFT, "teacher.cache={tmp}/cache-folder"),
     "cache-folder is incomplete"),
    ("garbled cache metadata", fmt(not_a_cache("{nope"), *SOFT, "teacher.cache={tmp}/cache-folder"),
     "codistill_cache.json is corrupted (expected JSON)"),
    ("flash attention without flash_attn", plain("teacher.attn_implementation=flash_attention_2"),
     "teacher.attn_implementation: flash_attention_2 needs the flash_attn package and a CUDA GPU"),
    ("an arch that is not a causal LM", plain("students.0.arch=t5"),
     "student.arch: 't5' is not a causal language model transformers can build"),
    ("unknown activation", plain("teacher.config.hidden_act=swishy"),
     "teacher.config.hidden_act: 'swishy' is not an activation transformers knows"),
    ("truncated config.json", teacher_folder(damage=lambda f: (f.parent / "config.json").write_text(
        (f.parent / "config.json").read_text()[:40])), "config.json cannot be read as a transformers config"),
    ("unknown attention", plain("students.0.attn_implementation=flash"),
     "config key 'students.0.attn_implementation': input should be 'sdpa', 'eager' or 'flash_attention_2'"),
    # the config file itself
    ("config missing", config_arg(lambda tmp: tmp / "missing.yaml"), "missing.yaml does not exist"),
    ("config is a folder", config_arg(lambda tmp: tmp), "is a folder; expected a YAML file"),
    ("config is a device", config_arg(lambda tmp: "/dev/null"), "/dev/null is not a regular file; expected a YAML file"),
    ("config is binary", lambda tmp, tok: (tmp / "model.bin").write_bytes(bytes(range(256)) * 4) and
     ["--config", str(tmp / "model.bin")], "model.bin is not a text file; expected YAML"),
    ("unparsable DeepSpeed JSON", fmt(with_file("ds.json", '{"zero_optimization": {"stage": 2,}}'),
                                      "teacher.deepspeed={tmp}/ds.json"), "ds.json is not valid JSON"),
    # the user's data
    ("empty data file", own_data("empty.jsonl", ""), "empty.jsonl is empty; expected documents"),
    ("garbled jsonl", own_data("garbled.jsonl", "{this is not json\n"),
     "garbled.jsonl line 1 is not JSON (Expecting property name"),
    ("jsonl broken half-way", own_data("half.jsonl", jsonl({"text": "fine " * 50}) + '{"text": broken}\n'),
     "half.jsonl line 2 is not JSON"),
    ("jsonl of lists", own_data("lists.jsonl", "[1, 2]\n[3, 4]\n"), "lists.jsonl line 1 is a JSON list; expected one object"),
    ("null text rows", own_data("nulls.jsonl", jsonl({"text": "a line of text " * 20}, {"text": None})),
     "data.text_field: a row of '{tmp}/nulls.jsonl' holds None in column 'text'; expected text in every row"),
    ("binary .txt", own_data("blob.txt", bytes(range(256)) * 40), "blob.txt is a binary file (it holds NUL bytes, as UTF-16 text also does); expected UTF-8 text"),
    ("UTF-16 .txt", own_data("wide.txt", ("some text, " * 300).encode("utf-16")),
     "wide.txt is a binary file (it holds NUL bytes, as UTF-16 text also does); expected UTF-8 text"),
    ("latin-1 .txt", own_data("latin.txt", "caf\xe9 au lait, ".encode("latin-1") * 200),
     "latin.txt line 1 is not UTF-8 text (invalid continuation byte"),
    ("garbage .parquet", own_data("rows.parquet", bytes(range(1, 256)) * 20),
     "rows.parquet is not a parquet file (no PAR1 marker at its start and end)"),
    ("damaged .parquet", own_data("rows.parquet", PARQUET_LIKE + b"PAR1"), "could not read"),
    ("no tokenizer for own data", lambda tmp, tok: (tmp / "d.jsonl").write_text(jsonl({"text": "hello"})) and
     [f"data.dataset={tmp / 'd.jsonl'}"], "data.tokenizer: dataset"),
    ("too little text for a block", own_data("tiny.jsonl", jsonl(*[{"text": "hi"}] * 3)),
     "gives no complete block of data.seq_len=32 tokens"),
    ("a held-out probe from one training document",
     own_data("two.jsonl", jsonl({"text": "a line of text " * 40}, {"text": "more lines of text " * 40}),
              "distill.benefit_probe=heldout"),
     "distill.benefit_probe=heldout: the training split of '{tmp}/two.jsonl' has one document"),
    ("whitespace-only corpus", own_data("blank.txt", " \n\t\n" * 100), "blank.txt holds only whitespace; expected documents"),
    ("damaged state.json of a saved dataset", saved_folder(lambda f: (f / "state.json").write_text("{\"_data_files\": [")),
     "saved is not a whole datasets.save_to_disk folder (JSONDecodeError"),
    ("truncated arrow file of a saved dataset", saved_folder(lambda f: truncate(next(f.glob("*.arrow")))),
     "saved is not a whole datasets.save_to_disk folder ("),
    ("broken link in a data folder", broken_link, "docs/b.txt is a link to nothing; expected data files"),
    ("mixed formats", fmt(lambda tmp, tok: mixed(tmp, tok) + own_data("mixed/a.txt", "text " * 100)(tmp, tok),
                          "data.dataset={tmp}/mixed"),
     "data.format: cannot infer one format from ['.jsonl', '.txt']"),
    # pretrained folders
    ("teacher with another tokenizer, instruction data", teacher_folder(other_vocab=True, extra=["data.pack=false"]),
     "data: a teacher with another tokenizer (the one in teacher.pretrained) reads packed plain text only"),
    ("pretrained without weights", teacher_folder(weights=False), "holds no weights"),
    ("truncated safetensors", teacher_folder(damage=truncate), "model.safetensors is truncated ("),
    ("garbage safetensors", teacher_folder(damage=lambda f: f.write_bytes(b"garbage" * 10)),
     "is truncated or not a safetensors file"),
    # what the run writes to
    ("another run's checkpoints", output_dir_holding("checkpoints/step_00000100/teacher/weights.pt"),
     "already holds checkpoints of another run; pass resume=auto"),
    ("a user's own config.yaml", output_dir_holding("config.yaml", "# my notes\n" + MICRO.read_text()),
     "config.yaml is not a config this program wrote"),
    ("output_dir is a file", fmt(a_file, "output_dir={tmp}/a-file"), "output_dir: {tmp}/a-file is a file; expected a folder"),
    ("output_dir under a file", fmt(a_file, "output_dir={tmp}/a-file/out"),
     "output_dir: cannot write in {tmp}/a-file/out (Not a directory)"),
    ("cache_dir under a file", fmt(a_file, "data.cache_dir={tmp}/a-file/cache"), "data.cache_dir: cannot write in "),
]


real_initialize = deepspeed.initialize


def snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


@pytest.mark.parametrize("make, expected", [pytest.param(m, e, id=i) for i, m, e in CASES])
def test_bad_input(capsys, monkeypatch, tmp_path, tokenizer, make, expected):
    engines = []  # engines this input got as far as building
    monkeypatch.setattr(deepspeed, "initialize", lambda *a, **k: engines.append(1) or real_initialize(*a, **k))
    grouped = torch.distributed.is_initialized()  # another test's process group (left alone)
    args = make(tmp_path, tokenizer)
    config = args[args.index("--config") + 1] if "--config" in args else str(MICRO)
    overrides = [a for a in args if a not in ("--config", config)]
    before = snapshot(tmp_path)
    capsys.readouterr()  # drop what the set-up printed
    code = entry.main(["--config", config, f"output_dir={tmp_path / 'out'}", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("codistill-train: error: "), err
    assert expected.format(tmp=tmp_path) in err and len(err) < 2500  # a bad value is quoted, not repeated whole
    assert not engines
    assert torch.distributed.is_initialized() == grouped  # none left behind
    after = snapshot(tmp_path)
    assert {p: h for p, h in after.items() if p in before} == before  # nothing changed or removed
    written = [p for p in after if p not in before and Path(p).is_relative_to(tmp_path / "out")]
    assert not written, written


def test_the_table_covers_at_least_forty_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_the_user_sees_one_line_and_no_traceback_and_debug_shows_it(tmp_path):
    proc = launch("train.max_stepz=1", how="python", ok=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["codistill-train: error: " + f"{MICRO}: unknown config key 'train.max_stepz'"]
    proc = launch("--debug", "train.max_stepz=1", how="python", ok=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_folders_on_a_read_only_disk(capsys, tmp_path):
    """Not writable for real (root bypasses permission bits, not a read-only mount)."""
    import subprocess

    disk = tmp_path / "ro"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root); 'under a file' cases cover the message")
    try:
        for key in ("output_dir", "data.cache_dir"):
            capsys.readouterr()
            code = entry.main(["--config", str(MICRO), f"output_dir={tmp_path / 'out'}", f"{key}={disk / 'x'}"])
            err = capsys.readouterr().err.strip()
            assert code == 2 and err == f"codistill-train: error: {key}: cannot write in {disk / 'x'} (Read-only file system)"
    finally:
        subprocess.run(["umount", str(disk)])
