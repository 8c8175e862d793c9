"""Soft-label distillation from cached top-k teacher predictions."""
import json
import re
import shutil

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from codistill.cache import TeacherCache, part_path, read_meta, write_meta
from codistill.config import ConfigError, DataConfig
from codistill.data import build_splits, tokenizer_fingerprint
from codistill.losses import topk_targets

from codistill.cache import stored_bytes_per_token

from conftest import MICRO, run_here, train_here

K = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("cachecorpus")
    with open(root / "docs.jsonl", "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"text": f"Scene {i}. " + "Now is the winter of our discontent. " * 12}) + "\n")
    tokenizer.save_pretrained(root / "tok")
    return root


def overrides(corpus, teacher, out):
    return [f"data.dataset={corpus / 'docs.jsonl'}", f"data.tokenizer={corpus / 'tok'}",
            f"data.cache_dir={corpus / 'cache'}", "mode=soft", f"teacher.pretrained={teacher}", "teacher.config={}",
            f"teacher.cache={out}", f"distill.top_k={K}", "distill.temperature=2.0", "train.max_steps=6"]


def make_cache(corpus, teacher, out, *extra, ok=True):
    from codistill.commands import cache_logits

    return run_here(cache_logits.main, "--shard-blocks", "16", *overrides(corpus, teacher, out), *extra, ok=ok)


@pytest.fixture(scope="module")
def cached(corpus, pretrained_teacher):
    out = corpus / "teacher-cache"
    proc = make_cache(corpus, pretrained_teacher, out)
    return out, proc


def test_cache_holds_the_live_teachers_top_k_within_fp16(cached, corpus, pretrained_teacher, tokenizer):
    out, proc = cached
    meta = read_meta(out)
    assert meta["complete"] and meta["k"] == K and meta["temperature"] == 2.0
    assert meta["bytes_per_token"] <= stored_bytes_per_token(K)
    assert f"bytes/token (bound {stored_bytes_per_token(K)})" in proc.stdout
    splits = build_splits(DataConfig(dataset=str(corpus / "docs.jsonl"), tokenizer=str(corpus / "tok"), seq_len=32,
                                     cache_dir=str(corpus / "cache")), tokenizer, seed=7)
    cache = TeacherCache.open(out, {"tokenizer": tokenizer_fingerprint(tokenizer), "data": splits.fingerprint,
                                    "seq_len": 32}, 2.0)
    index = torch.tensor([0, 5, len(splits.train) - 1])
    model = AutoModelForCausalLM.from_pretrained(pretrained_teacher, local_files_only=True)
    with torch.no_grad():
        live = topk_targets(model(input_ids=splits.train[index.tolist()]["input_ids"]).logits, K, 2.0)
    got = cache.targets(index, torch.device("cpu"))
    assert torch.equal(got.topk_ids.long(), live.topk_ids.long())
    torch.testing.assert_close(got.topk_logp, live.topk_logp, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got.tail_logp, live.tail_logp, rtol=2e-3, atol=2e-3)


def test_training_from_the_cache_does_not_load_the_teacher(cached, corpus, pretrained_teacher, tmp_path, capsys):
    out, _ = cached
    train_here(f"output_dir={tmp_path}", *overrides(corpus, "/nonexistent/teacher", out))
    assert f"teacher: not loaded; top-{K} predictions at T=2.0 from the cache" in capsys.readouterr().out


def test_a_cache_for_other_data_or_temperature_is_refused(cached, corpus, pretrained_teacher, tmp_path, capsys):
    from codistill.commands import train

    out, _ = cached
    base = ["--config", str(MICRO), f"output_dir={tmp_path}", *overrides(corpus, pretrained_teacher, out)]
    for change, message in (("data.seq_len=16", "was made for seq_len=32 but this run has seq_len=16"),
                            ("distill.temperature=1.0", "holds probabilities at temperature 2.0, but "
                                                        "distill.temperature=1.0")):
        capsys.readouterr()
        assert train.main([*base, change]) == 2
        assert message in capsys.readouterr().err


def test_a_damaged_part_is_named_when_the_cache_is_opened(cached, tmp_path, corpus, tokenizer):
    out, _ = cached
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    meta = read_meta(copy)
    expected = {key: meta[key] for key in ("tokenizer", "data", "seq_len")}
    part = part_path(copy, 1)
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=f"teacher.cache: {part} is corrupted \\(sha256 differs from "
                                          "codistill_cache.json\\); remake it"):
        TeacherCache.open(copy, expected, meta["temperature"])
    part.write_bytes(bytes(data[:100]))
    with pytest.raises(ConfigError, match=f"{part} is truncated or changed \\(100 bytes"):
        TeacherCache.open(copy, expected, meta["temperature"])
    part.unlink()
    with pytest.raises(ConfigError, match=f"{part} is missing"):
        TeacherCache.open(copy, expected, meta["temperature"])


@pytest.mark.parametrize("key, value, expected", [
    ("shard_blocks", 0, "has no valid 'shard_blocks' (expected an integer >= 1, got 0)"),
    ("k", None, "has no valid 'k' (expected an integer >= 1, got None)"),
    ("temperature", "2", "has no valid 'temperature' (expected a number > 0"),
])
def test_cache_metadata_outside_its_schema_is_named(cached, tmp_path, key, value, expected):
    out, _ = cached
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    meta = read_meta(copy)
    write_meta(copy, {k: v for k, v in meta.items() if k != key} if value is None else {**meta, key: value})
    with pytest.raises(ConfigError, match=re.escape(expected)):
        TeacherCache.check_ready(copy)


def test_a_cache_holding_ids_beyond_the_vocabulary_is_refused(cached):
    out, _ = cached
    meta = read_meta(out)
    expected = {key: meta[key] for key in ("tokenizer", "data", "seq_len")}
    largest = int(TeacherCache.open(out, expected, meta["temperature"]).rows[:]["topk_ids"].max())
    assert TeacherCache.open(out, expected, meta["temperature"], vocab=largest + 1)
    with pytest.raises(ConfigError, match=f"holds token id {largest}, beyond this run's vocabulary of {largest:,}"):
        TeacherCache.open(out, expected, meta["temperature"], vocab=largest)


def test_an_interrupted_cache_run_resumes_to_the_same_cache(cached, corpus, pretrained_teacher, tmp_path):
    out, _ = cached
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    parts = sorted(partial.glob("part-*.parquet"))
    assert len(parts) >= 3
    for victim in parts[1::2]:  # as if killed: some parts never written, metadata not complete
        victim.unlink()
    damaged = bytearray(parts[0].read_bytes())  # and one part the metadata lists has rotted on disk
    damaged[len(damaged) // 2] ^= 0xFF
    parts[0].write_bytes(bytes(damaged))
    write_meta(partial, {**read_meta(partial), "complete": False})
    make_cache(corpus, pretrained_teacher, partial)
    assert read_meta(partial)["complete"]
    for chunk in range(len(parts)):
        a = datasets.Dataset.from_parquet(str(part_path(out, chunk))).to_dict()
        b = datasets.Dataset.from_parquet(str(part_path(partial, chunk))).to_dict()
        assert a == b, chunk
    proc = make_cache(corpus, pretrained_teacher, partial, "distill.top_k=8", ok=False)
    assert proc.returncode == 2 and "made with other settings (k: 16 here, 8 asked)" in proc.stderr
