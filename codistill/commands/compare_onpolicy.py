"""``codistill-compare --on-policy``: does learning on its own samples make a student's text better in the
teacher's eyes, without costing its fit to the data? Per corpus:

  teacher    the config's own run (the embedded default: a co-distillation run), once, its teacher exported
             at the end: a teacher trained by the default;
  per seed   one soft-mode run from that teacher, frozen, with two students of equal init on the same
             batches: ``offpolicy`` (the config's distill settings: λ = 0) and ``onpolicy`` (the same with
             ``distill.on_policy``: fraction 0.5 and the defaults, or --on-policy-key's keys).

Prompts are the data's: each row's prompt in instruction data (``data.pack: false``), else each block's
first ``prefix_tokens`` tokens, the rest of the block being the reference. Reports per corpus and seed each
student's final validation CE and the teacher's mean log-probability per token of its samples of the
validation prompts (``<student>/eval/teacher_logp``: the same prompts and generator seeds for both), and
checks: on-policy raises that log-probability on every corpus and seed, and ends within 0.02 nats of the
λ = 0 student's validation CE.
"""
from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path
from typing import Any

WORSE_CE = 0.02  # nats: how much validation CE on-policy may cost against λ = 0
STUDENTS = ("offpolicy", "onpolicy")


def soft_run(base: dict[str, Any], seed: int, folder: Path, teacher_dir: Path, on_policy: dict[str, Any]) -> dict:
    """Mode soft from the exported teacher: the config's student twice, equal init (seed + 1), the second with
    ``distill.on_policy``; no head start (the teacher is finished)."""
    from .compare_mutual import soft_from

    tree = copy.deepcopy(base)
    tree["train"]["seed"] = seed
    tree["resume"], tree["overwrite"] = "auto", True
    tree["students"] = tree["students"][:1]
    student = soft_from(tree, teacher_dir)["students"][0]
    student["init_seed"] = seed + 1
    tree["students"] = []
    for name in STUDENTS:
        twin = {**copy.deepcopy(student), "name": name}
        if name == "onpolicy":
            twin["distill"] = {**(twin.get("distill") or {}), "on_policy": {"fraction": 0.5, **on_policy}}
        tree["students"].append(twin)
    tree["output_dir"] = str(folder / "soft")
    return tree


def teacher_run(base: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The config's own run, which trains the teacher."""
    tree = copy.deepcopy(base)
    tree["resume"], tree["overwrite"] = "auto", True
    tree["output_dir"] = str(folder / "teacher_run")
    return tree


def collect(run: Path, read_scalars) -> dict[str, dict[str, float]]:
    """Each student's final validation CE and the teacher's final log-probability of its samples."""
    scalars = read_scalars(run)
    out = {}
    for name in STUDENTS:
        ce, logp = scalars[f"{name}/eval/loss"], scalars[f"{name}/eval/teacher_logp"]
        out[name] = {"ce": ce[max(ce)], "teacher_logp": logp[max(logp)], "start_logp": logp[min(logp)]}
    return out


def report(results: dict[str, dict[int, dict]], seeds: list[int], cmdline: str, machine: str,
           on_policy: dict[str, Any]) -> tuple[str, bool]:
    """One table across corpora and seeds, and the two checks."""
    lines = [f"Command: `{cmdline}`  ", f"Machine: {machine}.  ",
             f"On-policy student: `distill.on_policy: {json.dumps({'fraction': 0.5, **on_policy})}`.", "",
             "Final validation CE of each student, and the teacher's mean log-probability per token of its samples of "
             "the validation prompts (higher: likelier in the teacher's eyes; at step 0 both students write "
             "alike).", "",
             "| corpus | seed | CE λ=0 | CE on-policy | Δ CE | teacher log p λ=0 | on-policy | Δ log p |",
             "|---|---|---|---|---|---|---|---|"]
    d_ce, d_logp = [], []
    for label, by_seed in results.items():
        for s in seeds:
            off, on = by_seed[s]["offpolicy"], by_seed[s]["onpolicy"]
            d_ce.append(on["ce"] - off["ce"])
            d_logp.append(on["teacher_logp"] - off["teacher_logp"])
            lines.append(f"| {label} | {s} | {off['ce']:.4f} | {on['ce']:.4f} | {d_ce[-1]:+.4f} | "
                         f"{off['teacher_logp']:.3f} | {on['teacher_logp']:.3f} | {d_logp[-1]:+.3f} |")
    raised, kept = all(d > 0 for d in d_logp), all(d <= WORSE_CE for d in d_ce)
    checks = [f"- on-policy raises the teacher's log-probability of the student's samples on every corpus and seed: "
              f"**{'yes' if raised else 'no'}** (least {min(d_logp):+.3f}, mean {statistics.fmean(d_logp):+.3f})",
              f"- validation CE within {WORSE_CE} nats of λ = 0: **{'yes' if kept else 'no'}** "
              f"(worst {max(d_ce):+.4f}, mean {statistics.fmean(d_ce):+.4f})"]
    return "\n".join(lines + [""] + checks) + "\n", raised and kept


def run_on_policy(args, cfg, labels: list[str], out: Path, seeds: list[int], cmdline: str, machine: str,
                  bases: list[dict[str, Any]], run_training, on_policy: dict[str, Any]) -> bool:
    """Every corpus (its teacher once, then every seed's soft run; finished runs skipped, with compare.py's
    ``run_training``); writes results.md and results.json into ``out``."""
    from ..metrics import read_scalars
    from .compare_mutual import exported_teacher, write_results

    results: dict[str, dict[int, dict]] = {}
    for base, label in zip(bases, labels):
        folder = out if len(labels) == 1 else out / label
        print(f"{label}, the teacher:", flush=True)
        run_training("teacher_run", teacher_run(base, folder), args.nproc, folder / "teacher_run.log")
        teacher_dir = exported_teacher(folder / "teacher_run", folder / "teacher_hf", cfg.teacher.name,
                                       folder / "teacher_run.log")
        results[label] = {}
        for s in seeds:
            seed_dir = folder / f"seed_{s}"
            print(f"{label}, seed {s}:", flush=True)
            run_training("soft", soft_run(base, s, seed_dir, teacher_dir, on_policy), args.nproc, seed_dir / "soft.log")
            results[label][s] = collect(seed_dir / "soft", read_scalars)
    text, ok = report(results, seeds, cmdline, machine, on_policy)
    write_results(out, text, results)
    return ok
