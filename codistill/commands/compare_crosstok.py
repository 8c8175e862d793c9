"""``codistill-compare --cross-tokenizer TOKENIZER``: does a teacher with another tokenizer help the student,
and how much of what a teacher of the student's own tokenizer gives? Per corpus:

  teachers   the config's own run twice, once with ``teacher.tokenizer=TOKENIZER`` (the teacher trains on its
             own tokenization of the same text) and once as written; each teacher exported at the end;
  per seed   three runs, the student of equal init (seed + 1) in all, each beside its twin trained alone (the
             same batches and steps: a paired start):
             soft_cross     mode soft from the other-tokenizer teacher, frozen: (b), and its twin (a);
             codistill      the config's run with ``teacher.tokenizer=TOKENIZER``, a fresh teacher training: (c),
                            and its twin (c0), which waits out the same head start;
             soft_same      mode soft from the same-tokenizer teacher: (d), and its twin (d0), whose blocks are
                            packed for one tokenizer (so not the same as (a)'s paired blocks).

TOKENIZER is a tokenizer folder, ``gpt2`` (GPT-2's 50,257-token BPE, built offline) or ``train:N`` (a byte-level
BPE of N tokens trained on the corpus). Checks: (b) below (a) on every seed and at least half of (d)'s gain
over (d0); (c) never more than 0.01 nats above (c0). Finished runs are not repeated.
"""
from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any

from ..config import ConfigError, DataConfig, twin_name

NEVER_WORSE = 0.01  # nats: (c) may not end more than this above its twin (c0)
HALF = 0.5  # (b)'s gain over (a) against (d)'s over (d0)


def teacher_tokenizer(spec: str, base: dict[str, Any], folder: Path, seed: int) -> Path:
    """A folder holding the teacher's tokenizer: ``spec`` itself, GPT-2's, or one trained on the corpus."""
    from ..data import load_tokenizer, resolve_tokenizer

    if spec.startswith("train:"):
        try:
            size = int(spec.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"--cross-tokenizer: '{spec}': expected train:N with N an integer") from None
        tok = resolve_tokenizer(DataConfig(**{**base["data"], "tokenizer": {"train": {"vocab_size": size}}}), None, seed)
    elif spec == "gpt2":
        tok = resolve_tokenizer(DataConfig(tokenizer="gpt2"), None)
    else:
        tok = load_tokenizer(spec, "--cross-tokenizer")
    target = folder / "teacher_tokenizer"
    if not (target / "tokenizer_config.json").exists():
        tok.save_pretrained(target)
    return target


CHECKPOINT_EVERY = 100  # steps: an interrupted run of this hours-long comparison resumes, not restarts


def _run(base: dict[str, Any], output: Path, seed: int | None = None) -> dict[str, Any]:
    """The config's run into ``output``; with ``seed``, its first student alone beside its twin, equal init."""
    tree = copy.deepcopy(base)
    tree["resume"], tree["overwrite"], tree["output_dir"] = "auto", True, str(output)
    tree["checkpoint"] = {**tree.get("checkpoint", {}), "interval": CHECKPOINT_EVERY}
    if seed is not None:
        tree["train"]["seed"] = seed
        tree["students"] = [{**copy.deepcopy(tree["students"][0]), "init_seed": seed + 1, "twin": True}]
    return tree


def crossed(tree: dict[str, Any], tokenizer: Path) -> dict[str, Any]:
    tree["teacher"] = {**tree["teacher"], "tokenizer": str(tokenizer)}
    return tree


def same(tree: dict[str, Any]) -> dict[str, Any]:
    """A run whose teacher shares the students' tokenizer: no teacher's side of the blocks (data.teacher_seq_len)."""
    tree["data"] = {k: v for k, v in tree.get("data", {}).items() if k != "teacher_seq_len"}
    return tree


def soft_run(base: dict[str, Any], seed: int, output: Path, teacher_dir: Path) -> dict[str, Any]:
    """Mode soft from an exported teacher (its own tokenizer inside), the student and its twin alone; no head
    start (the teacher is finished)."""
    from .compare_mutual import soft_from

    return soft_from(_run(base, output, seed), teacher_dir)


def final(run: Path, name: str, read_scalars) -> float:
    curve = read_scalars(run)[f"{name}/eval/loss"]
    return curve[max(curve)]


def report(results: dict[str, dict[int, dict]], seeds: list[int], cmdline: str, machine: str,
           tokenizer: str) -> tuple[str, bool]:
    """One table across corpora and seeds, and the checks."""
    lines = [f"Command: `{cmdline}`  ", f"Machine: {machine}.  ", f"Teacher's tokenizer: `{tokenizer}`.", "",
             "Final validation loss of the student (nats per token of its tokenizer).", "",
             "| corpus | seed | (a) alone | (b) soft, other tokenizer | (c0) alone | (c) co-distilled, other | (d0) alone "
             "| (d) soft, same tokenizer | b − a | c − c0 | d − d0 | (a−b)/(d0−d) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    helps, half, safe = True, True, True
    shares = []
    for label, by_seed in results.items():
        for s in seeds:
            r = by_seed[s]
            gain_b, gain_d = r["a"] - r["b"], r["d0"] - r["d"]
            share = gain_b / gain_d if gain_d > 0 else float("nan")
            shares.append(share)
            helps, safe = helps and gain_b > 0, safe and r["c"] - r["c0"] <= NEVER_WORSE
            half = half and gain_d > 0 and share >= HALF
            lines.append(f"| {label} | {s} | {r['a']:.4f} | {r['b']:.4f} | {r['c0']:.4f} | {r['c']:.4f} | {r['d0']:.4f} "
                         f"| {r['d']:.4f} | {-gain_b:+.4f} | {r['c'] - r['c0']:+.4f} | {-gain_d:+.4f} | {share:.2f} |")
    known = [x for x in shares if x == x]
    checks = [f"- (b) below (a) on every corpus and seed: **{'yes' if helps else 'no'}**",
              f"- (b) gains at least {HALF:.0%} of (d)'s gain on every corpus and seed: **{'yes' if half else 'no'}**"
              + (f" (mean share {statistics.fmean(known):.2f})" if known else ""),
              f"- (c) within {NEVER_WORSE} nats of its twin (c0), or better: **{'yes' if safe else 'no'}**"]
    return "\n".join(lines + [""] + checks) + "\n", helps and half and safe


def run_cross_tokenizer(args, cfg, labels: list[str], out: Path, seeds: list[int], cmdline: str, machine: str,
                        bases: list[dict[str, Any]], run_training) -> bool:
    """Every corpus (its two teachers once, then every seed's three runs; finished runs skipped, with
    compare.py's ``run_training``); writes results.md and results.json into ``out``."""
    from ..metrics import read_scalars
    from .compare_mutual import exported_teacher, write_results

    teacher, student = cfg.teacher.name, cfg.students[0].name
    results: dict[str, dict[int, dict]] = {}
    for base, label in zip(bases, labels):
        folder = out if len(labels) == 1 else out / label
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer = teacher_tokenizer(args.cross_tokenizer, base, folder, cfg.train.seed)
        exported = {}
        for kind in ("cross", "same"):
            print(f"{label}, the {kind}-tokenizer teacher:", flush=True)
            tree = _run(base, folder / f"teacher_{kind}")
            run_training(f"teacher_{kind}", crossed(tree, tokenizer) if kind == "cross" else same(tree), args.nproc,
                         folder / f"teacher_{kind}.log")
            exported[kind] = exported_teacher(folder / f"teacher_{kind}", folder / f"teacher_{kind}_hf", teacher,
                                              folder / f"teacher_{kind}.log")
        results[label] = {}
        for s in seeds:
            seed_dir = folder / f"seed_{s}"
            print(f"{label}, seed {s}:", flush=True)
            runs = {"soft_cross": soft_run(base, s, seed_dir / "soft_cross", exported["cross"]),
                    "codistill": crossed(_run(base, seed_dir / "codistill", s), tokenizer),
                    "soft_same": same(soft_run(base, s, seed_dir / "soft_same", exported["same"]))}
            for name, tree in runs.items():
                run_training(name, tree, args.nproc, seed_dir / f"{name}.log")
            alone = twin_name(student)
            results[label][s] = {
                "a": final(seed_dir / "soft_cross", alone, read_scalars),
                "b": final(seed_dir / "soft_cross", student, read_scalars),
                "c0": final(seed_dir / "codistill", alone, read_scalars),
                "c": final(seed_dir / "codistill", student, read_scalars),
                "d0": final(seed_dir / "soft_same", alone, read_scalars),
                "d": final(seed_dir / "soft_same", student, read_scalars)}
    text, ok = report(results, seeds, cmdline, machine, args.cross_tokenizer)
    write_results(out, text, results)
    return ok
