"""Does co-distillation make the student better than training it alone? Five arms, N seeds.

For every seed, on the same data, batches and number of student steps:
  (a) alone      the student trained alone (cross-entropy only);
  (b) codistill  the student co-distilled with the teacher (the config's distill settings);
  (c) two-stage  the teacher trained alone first, then the student from it, frozen (soft mode);
  (d) handicap   co-distillation with a handicapped teacher (its learning rate x --handicap);
  (e) lead-only  (b) without the benefit gate (distill.benefit_gate=false): the teacher-lead gate alone.
(a), (b) and (e) are three students of one run: same initial weights (equal init_seed), same
batches, the same teacher; the alone student has α = 0, so the teacher cannot touch it. That
run's teacher, exported at the end, is (c)'s frozen teacher. Each ``--variant NAME:OVERRIDES``
adds one more student to that run: (b) with the overrides applied to the student's section
(``--variant t2:distill.temperature=2``, several overrides separated by spaces), reported
against (a) like the arms; ``--paired-only`` runs that run alone (no (c), no (d)). Runs are subprocesses of
codistill-train (``python -m codistill.commands.train``), one after another; a finished run is not repeated when compare.py is run
again, and an interrupted one resumes from its last checkpoint.

Writes into --output-dir: results.md (a table of final validation loss and perplexity per
arm and seed, mean ± sd, the checks below), results.json, and validation_loss.png
(validation loss against step for every arm and both teachers, mean over seeds).

Checks (printed, and non-zero exit with --strict when one fails):
  * never worse: (b) and (d) end within 0.01 nats of (a), or better, on every seed;
  * helps: (b) ends below (a) on every seed (with the share of the (a) → teacher gap closed).

    python tools/compare.py [--config configs/tiny.yaml] [--seeds 3] [--nproc 1] [key.path=value ...]
    python tools/compare.py --datasets shakespeare django-code django-locale   (one table across corpora)
    python tools/compare.py --cross-tokenizer gpt2   (a teacher with another tokenizer: compare_crosstok.py)
    python tools/compare.py --paired-only --variant t2:distill.temperature=2 \
        --variant "a25:distill.alpha_max=0.25 distill.schedule=constant"   (settings side by side)
    codistill-compare ...   (the same, as a console command)
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .. import cli
from ..config import ConfigError, ModelSpec, apply_override, check_name, load_deepspeed_config, validate
from ..errors import RunFailed

ARMS = {
    "alone": "(a) student alone",
    "codistill": "(b) co-distilled",
    "two_stage": "(c) two-stage (frozen teacher)",
    "handicap": "(d) co-distilled, handicapped teacher",
    "lead": "(e) co-distilled, lead-only gate",
}
NEVER_WORSE = 0.01  # nats: (b) and (d) may not end more than this above (a)
ALONE = "alone"  # name of the CE-only copy of the student in the paired run
LEAD = "lead_only"  # name of the copy without the benefit gate in the paired run
PAIRED_ARMS = ("alone", "codistill", "lead")  # the arms of the paired run


def parse_variants(given: list[str]) -> dict[str, list[str]]:
    """``NAME:key=value key=value`` per --variant -> {name: overrides of the student's section}."""
    variants: dict[str, list[str]] = {}
    for text in given:
        name, sep, rest = text.partition(":")
        overrides = rest.split()
        if not sep or not overrides or not all("=" in o for o in overrides):
            raise ConfigError(f"--variant {text!r}: expected NAME:key=value [key=value ...], e.g. "
                              "t2:distill.temperature=2")
        try:
            check_name(name, "--variant name")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if name in variants or name in (ALONE, LEAD):
            raise ConfigError(f"--variant {name}: the name is taken (by another variant, or '{ALONE}'/'{LEAD}' "
                              "of the paired run)")
        variants[name] = overrides
    return variants


def arm_configs(base: dict[str, Any], seed: int, folder: Path, handicap: float,
                variants: Optional[dict[str, list[str]]] = None) -> dict[str, dict[str, Any]]:
    """The three runs of one seed, as config trees: paired (a+b+e and the variants), handicap (d),
    two_stage (c)."""
    base = copy.deepcopy(base)
    base["train"]["seed"] = seed
    base["resume"] = "auto"
    base["overwrite"] = True
    teacher, student = base["teacher"], base["students"][0]
    # Equal seeds give the two copies of the student equal initial weights.
    student["init_seed"] = student.get("init_seed") if student.get("init_seed") is not None else seed + 1
    for spec in (teacher, student):  # inline the DeepSpeed JSON, so it can be edited and travels
        spec["deepspeed"] = load_deepspeed_config(ModelSpec.model_validate(spec))

    paired = copy.deepcopy(base)
    alone = copy.deepcopy(student)
    # (a) and (e) are single models; (b) keeps a twin and a population it selects among (selection.py)
    alone["twin"], alone["population"] = False, []
    alone["name"] = ALONE
    alone["distill"] = {**(alone.get("distill") or {}), "schedule": "constant", "alpha_max": 0.0,
                        "token_filter": False, "benefit_gate": False}
    lead = {**copy.deepcopy(student), "twin": False, "population": []}
    lead["name"] = LEAD
    lead["distill"] = {**(lead.get("distill") or {}), "benefit_gate": False}
    paired["students"] = [copy.deepcopy(student), lead, alone]
    for name, overrides in (variants or {}).items():
        if name == student["name"]:
            raise ConfigError(f"--variant {name}: the name is the student's; give it another")
        variant = copy.deepcopy(student)
        for override in overrides:
            apply_override(variant, override)
        variant["name"] = name
        validate({**copy.deepcopy(paired), "students": [variant]}, f"--variant {name}")  # before anything runs
        paired["students"].append(variant)
    paired["output_dir"] = str(folder / "paired")

    weak = copy.deepcopy(base)
    weak["students"] = [copy.deepcopy(student)]
    optimizer = weak["teacher"]["deepspeed"].get("optimizer", {})
    params = optimizer.setdefault("params", {})
    if "lr" not in params:
        raise ConfigError("teacher.deepspeed.optimizer.params.lr: compare.py handicaps the teacher through its "
                          "learning rate; give it explicitly")
    params["lr"] = params["lr"] * handicap
    weak["output_dir"] = str(folder / "handicap")

    two = copy.deepcopy(base)
    two["mode"] = "soft"
    two["train"]["tail_steps"] = 0  # the paired run's teacher, finished: its tail is the whole run
    two["distill"] = {**two.get("distill", {}), "selection_interval": 0}  # plain two-stage: one student
    two["students"] = [{**copy.deepcopy(student), "twin": False, "population": []}]
    two["teacher"] = {"name": teacher["name"], "pretrained": str(folder / "teacher_hf" / teacher["name"]),
                      "deepspeed": teacher["deepspeed"]}
    two["output_dir"] = str(folder / "two_stage")
    return {"paired": paired, "handicap": weak, "two_stage": two}


def run_training(name: str, tree: dict[str, Any], nproc: int, log_file: Path) -> None:
    """One training run as a subprocess; skipped when its DONE marker exists."""
    import yaml

    out = Path(tree["output_dir"])
    done = out / "DONE"
    cfg_file = out.parent / f"{name}.yaml"
    if cfg_file.exists():  # a run of other students cannot hold the curves of these
        before = [s["name"] for s in (yaml.safe_load(cfg_file.read_text()) or {}).get("students", [])]
        now = [s["name"] for s in tree["students"]]
        if before != now:
            raise ConfigError(f"{cfg_file}: this run's students were {before}, now {now} (--variant changed); "
                              "give another --output-dir")
    if done.exists():
        print(f"  {name}: already done ({out})", flush=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(yaml.safe_dump(tree, sort_keys=False))
    start = time.time()
    print(f"  {name}: training -> {out} (log {log_file})", flush=True)
    cli.run_module("codistill.commands.train", ["--config", str(cfg_file)], nproc, log_file)
    done.write_text(f"{time.time() - start:.0f} s\n")
    print(f"  {name}: finished in {time.time() - start:.0f} s", flush=True)


def eval_curve(run_dir: Path, model: str) -> dict[int, float]:
    """step -> validation loss of ``model``, from the run's TensorBoard events."""
    from ..metrics import read_scalars

    tag = f"{model}/eval/loss"
    curve = read_scalars(run_dir).get(tag)
    if curve is None:
        raise RunFailed(f"{run_dir}: no '{tag}' in its TensorBoard events")
    return curve


def summarize(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {sd:.4f}"


def report(curves: dict[str, dict[int, dict[int, float]]], seeds: list[int], cmdline: str,
           machine: str, minutes: float, variants: Optional[dict[str, list[str]]] = None
           ) -> tuple[str, dict[str, Any], bool, bool]:
    """Markdown table + checks from the curves (curve name -> seed -> step -> loss); the arms that
    ran (all five, or the paired run's with --paired-only) and the variants."""
    variants = variants or {}
    final = {arm: {s: curves[arm][s][max(curves[arm][s])] for s in seeds} for arm in curves}
    lines = [f"Command: `{cmdline}`  ", f"Machine: {machine}; {minutes:.0f} min in all.", "",
             "Final validation loss (perplexity) per seed; lower is better.", "",
             "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | vs (a), per seed |",
             "|---|" + "---|" * len(seeds) + "---|---|"]
    rows = [*ARMS.items(), *((variant_key(n), f"variant {n}: `{' '.join(o)}`") for n, o in variants.items()),
            ("teacher", "teacher (trained alone)"), ("weak_teacher", "handicapped teacher")]
    for arm, label in rows:
        if arm not in final:
            continue
        cells = [f"{final[arm][s]:.4f} ({math.exp(final[arm][s]):.1f})" for s in seeds]
        delta = "" if arm in ("alone",) else ", ".join(f"{final[arm][s] - final['alone'][s]:+.4f}" for s in seeds)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {summarize(list(final[arm].values()))} | {delta} |")
    checked = [arm for arm in ("codistill", "handicap") if arm in final]
    never_worse = all(final[arm][s] - final["alone"][s] <= NEVER_WORSE for arm in checked for s in seeds)
    helps = all(final["codistill"][s] < final["alone"][s] for s in seeds)
    closed, closed_lead = gap_closed(final, "codistill", seeds), gap_closed(final, "lead", seeds)
    lines += ["",
              f"- never worse: {' and '.join(ARMS[a].split()[0] for a in checked)} within {NEVER_WORSE} nats of "
              f"(a) or better on every seed: **{'yes' if never_worse else 'no'}**"
              + ("" if "handicap" in final else " ((d) not run: --paired-only)"),
              f"- helps: (b) below (a) on every seed: **{'yes' if helps else 'no'}**; share of the (a) → teacher "
              f"gap closed by (b), per seed: {', '.join(_share(c) for c in closed)} (mean {_share(_mean(closed))}); "
              f"by (e): {', '.join(_share(c) for c in closed_lead)} (mean {_share(_mean(closed_lead))})"]
    shares = {n: gap_closed(final, variant_key(n), seeds) for n in variants}
    lines += [f"- variant {n}: worst − (a) {max(final[variant_key(n)][s] - final['alone'][s] for s in seeds):+.4f}; "
              f"gap closed per seed {', '.join(_share(c) for c in shares[n])} (mean {_share(_mean(shares[n]))})"
              for n in variants]
    data = {"seeds": seeds, "final": final, "never_worse": never_worse, "helps": helps, "gap_closed": closed,
            "gap_closed_lead": closed_lead,
            "variants": {n: {"overrides": o, "gap_closed": shares[n]} for n, o in variants.items()},
            "curves": {k: {s: sorted(v.items()) for s, v in c.items()} for k, c in curves.items()}}
    return "\n".join(lines) + "\n", data, never_worse, helps


def variant_key(name: str) -> str:
    """A variant's key among the arms' curves (apart from theirs whatever its name)."""
    return f"variant:{name}"


def gap_closed(final: dict[str, dict[int, float]], arm: str, seeds: list[int]) -> list[float]:
    """Per seed, the share of the (a) → teacher gap that ``arm`` closed (NaN where the teacher is not ahead)."""
    out = []
    for s in seeds:
        gap = final["alone"][s] - final["teacher"][s]
        out.append((final["alone"][s] - final[arm][s]) / gap if gap > 0 else float("nan"))
    return out


def _mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.fmean(kept) if kept else float("nan")


def _share(value: float) -> str:
    return "n/a (teacher not ahead)" if math.isnan(value) else f"{value:.0%}"


def plot(curves: dict[str, dict[int, dict[int, float]]], seeds: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    styles = {"alone": ("C0", "-"), "codistill": ("C1", "-"), "two_stage": ("C2", "-"), "handicap": ("C3", "-"),
              "lead": ("C4", "-"),
              "teacher": ("k", "--"), "weak_teacher": ("C3", ":")}
    labels = {**ARMS, "teacher": "teacher", "weak_teacher": "handicapped teacher"}
    for i, name in enumerate(n for n in curves if n.startswith(variant_key(""))):
        styles[name], labels[name] = (f"C{5 + i % 5}", "-."), name
    styles = {name: style for name, style in styles.items() if name in curves}
    for name, (color, style) in styles.items():
        steps = sorted(set.intersection(*(set(curves[name][s]) for s in seeds)))
        mean = [statistics.fmean(curves[name][s][t] for s in seeds) for t in steps]
        ax.plot(steps, mean, style, color=color, label=labels[name], linewidth=1.6)
        if len(seeds) > 1:
            lo = [min(curves[name][s][t] for s in seeds) for t in steps]
            hi = [max(curves[name][s][t] for s in seeds) for t in steps]
            ax.fill_between(steps, lo, hi, color=color, alpha=0.12, linewidth=0)
    finals = [curves[n][s][max(curves[n][s])] for n in styles for s in seeds]
    ax.set_ylim(min(finals) - 0.3, min(finals) + 2.5)  # the interesting part, not the first steps at ~8
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for("codistill-compare", __doc__)
    parser.add_argument("--seeds", type=cli.positive_int, default=3, help="seeds train.seed, +1, ... (default 3)")
    parser.add_argument("--nproc", type=cli.positive_int, default=1,
                        help="processes per run (default 1; >1 uses torchrun)")
    parser.add_argument("--handicap", type=float, default=0.1, help="arm (d): teacher lr factor (default 0.1)")
    parser.add_argument("--output-dir", type=Path, help="default: <config's output_dir>/compare")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a check fails")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:OVERRIDES",
                        help="one more student of the paired run: (b) with these overrides of the student's "
                             "section, e.g. 't2:distill.temperature=2' (repeatable)")
    parser.add_argument("--paired-only", action="store_true",
                        help="run only the paired run ((a), (b), (e) and the variants): no (c), no (d)")
    parser.add_argument("--mutual", action="store_true",
                        help="the mutual arms instead (codistill/commands/compare_mutual.py): peers in mode mutual "
                             "against CE-only twins (peers, large, handicap) and a listening teacher (listening)")
    parser.add_argument("--mutual-arms", nargs="+", metavar="ARM",
                        help="with --mutual: some of peers large handicap listening (default: all)")
    parser.add_argument("--peer", action="append", default=[], metavar="KEY=VALUE",
                        help="with --mutual: the peers' distill keys (repeatable; default: mode mutual's defaults)")
    parser.add_argument("--listen", action="append", default=[], metavar="KEY=VALUE",
                        help="with --mutual: the listening teacher's teacher.distill keys (repeatable; default: "
                             "none given, the students' distill section)")
    parser.add_argument("--on-policy", action="store_true",
                        help="the on-policy arm instead (codistill/commands/compare_onpolicy.py): from the config's "
                             "teacher, frozen, a student at lambda 0 against its twin with distill.on_policy")
    parser.add_argument("--on-policy-key", action="append", default=[], metavar="KEY=VALUE",
                        help="with --on-policy: the on-policy student's distill.on_policy keys (repeatable; default: "
                             "fraction=0.5)")
    parser.add_argument("--cross-tokenizer", metavar="TOKENIZER",
                        help="the cross-tokenizer arms instead (codistill/commands/compare_crosstok.py): a teacher with "
                             "this tokenizer (a folder, gpt2, or train:N), frozen and co-training, against one of the "
                             "student's own")
    parser.add_argument("--datasets", nargs="+", metavar="CORPUS",
                        help="run every arm and seed on each of these corpora (built-in ones by name, as "
                             "codistill-prepare-corpus --help lists them; or files/folders, each with a 4,096-token "
                             "BPE trained on it unless data.tokenizer is set) and write one table across them")
    return parser


def checked_corpora(args: argparse.Namespace, cfg) -> tuple[list[str], list[str]]:
    """The corpora to run (``--datasets``, else the config's) and their labels, each checked before any run
    starts (not in the first run's log)."""
    from ..data import CORPORA, data_files

    corpora = args.datasets or [cfg.data.dataset]
    labels = [corpus_label(d) for d in corpora]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--datasets: two corpora share the name {labels}; give distinct files or folders")
    for dataset in corpora:
        if dataset not in CORPORA:
            try:
                data_files(dataset)
            except ConfigError as exc:
                raise ConfigError(f"{'--datasets' if args.datasets else 'data.dataset'}: '{dataset}' is not a bundled "
                                  f"corpus ({', '.join(CORPORA)}) and {str(exc).removeprefix('data.dataset: ')}") from None
    return corpora, labels


def body(args: argparse.Namespace) -> int:
    if args.handicap <= 0:
        raise ConfigError(f"--handicap={args.handicap}: expected a positive learning-rate factor")
    if args.datasets:  # "--datasets a b key=value": argparse hands the overrides after it to --datasets
        args.overrides += [d for d in args.datasets if "=" in d]
        args.datasets = [d for d in args.datasets if "=" not in d]
    variants = parse_variants(args.variant)
    cfg = cli.run_config(args)
    if cfg.mode != "codistill":
        raise ConfigError(f"mode={cfg.mode}: compare.py needs a co-distillation config (mode=codistill)")
    out = (args.output_dir or Path(cfg.output_dir) / "compare").expanduser().resolve()
    seeds = [cfg.train.seed + k for k in range(args.seeds)]
    corpora, labels = checked_corpora(args, cfg)
    out.mkdir(parents=True, exist_ok=True)
    cmdline = ("codistill-compare " + " ".join(shlex.quote(a) for a in sys.argv[1:])).strip()
    machine = f"{os.cpu_count()} CPU cores, {args.nproc} process(es) per run"
    bases = [corpus_base(cfg, dataset, len(corpora) > 1 or bool(args.datasets)) for dataset in corpora]
    if args.on_policy:
        from .compare_mutual import keys
        from .compare_onpolicy import run_on_policy

        on_policy = keys(args.on_policy_key, "--on-policy-key")
        ok = run_on_policy(args, cfg, labels, out, seeds, cmdline, machine, bases, run_training, on_policy)
        return 0 if ok or not args.strict else 1
    if args.cross_tokenizer:
        from .compare_crosstok import run_cross_tokenizer

        ok = run_cross_tokenizer(args, cfg, labels, out, seeds, cmdline, machine, bases, run_training)
        return 0 if ok or not args.strict else 1
    if args.mutual:
        from .compare_mutual import run_mutual

        ok = run_mutual(args, cfg, corpora, labels, out, seeds, cmdline, machine, bases, run_training, eval_curve)
        return 0 if ok or not args.strict else 1
    results, ok = {}, True
    for base, dataset, label in zip(bases, corpora, labels):
        folder = out if len(corpora) == 1 else out / label
        if len(corpora) > 1:
            print(f"corpus {label}:", flush=True)
        start = time.time()
        curves = run_corpus(base, seeds, folder, args, cfg.teacher.name, cfg.students[0].name, variants)
        text, data, never_worse, helps = report(curves, seeds, cmdline, machine, (time.time() - start) / 60,
                                                variants)
        plot(curves, seeds, folder / "validation_loss.png",
             f"{label}: validation loss, mean (band: min-max) of {len(seeds)} seeds")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.md").write_text(text + "\n![validation loss](validation_loss.png)\n")
        (folder / "results.json").write_text(json.dumps(data, indent=1) + "\n")
        print(text)
        results[label], ok = data, ok and never_worse and helps
    if len(corpora) > 1:
        text = cross_corpus(results, seeds, cmdline, machine)
        (out / "results.md").write_text(text)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        print(text)
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}" + (" (and one folder per corpus)"
                                                                         if len(corpora) > 1 else ""))
    return 0 if ok or not args.strict else 1


def corpus_base(cfg, dataset: str, given: bool) -> dict[str, Any]:
    """The config tree of the runs on one corpus: the config's, on ``dataset`` when corpora were ``given``
    (a file or folder with a BPE of the built-in corpora's size trained on it, unless data.tokenizer is set)."""
    from ..data import BUILTIN_VOCAB, CORPORA

    base = cfg.model_dump(mode="json")
    if given:
        base["data"]["dataset"] = dataset
        if dataset not in CORPORA and base["data"].get("tokenizer") is None:
            base["data"]["tokenizer"] = {"train": {"vocab_size": BUILTIN_VOCAB}}
    return base


def corpus_label(dataset: str) -> str:
    """A folder name for a corpus: its name, or its file's or folder's name."""
    from ..data import CORPORA

    if dataset in CORPORA:
        return dataset
    path = Path(dataset).expanduser()
    return (path.stem if path.is_file() else path.name) or "corpus"


def run_corpus(base: dict[str, Any], seeds: list[int], out: Path, args: argparse.Namespace, teacher: str,
               student: str, variants: dict[str, list[str]]) -> dict[str, dict[int, dict[int, float]]]:
    """Every seed's runs on one corpus (finished ones skipped); the curve of every arm that ran."""
    from .compare_mutual import exported_teacher

    plans = {s: arm_configs(base, s, out / f"seed_{s}", args.handicap, variants) for s in seeds}
    names = [*PAIRED_ARMS, *map(variant_key, variants), "teacher"]
    if not args.paired_only:
        names += ["two_stage", "handicap", "weak_teacher"]
    curves: dict[str, dict[int, dict[int, float]]] = {k: {} for k in names}
    for s in seeds:
        folder = out / f"seed_{s}"
        print(f"seed {s}:", flush=True)
        runs = plans[s]
        run_training("paired", runs["paired"], args.nproc, folder / "paired.log")
        curves["alone"][s] = eval_curve(folder / "paired", ALONE)
        curves["codistill"][s] = eval_curve(folder / "paired", student)
        curves["lead"][s] = eval_curve(folder / "paired", LEAD)
        curves["teacher"][s] = eval_curve(folder / "paired", teacher)
        for name in variants:
            curves[variant_key(name)][s] = eval_curve(folder / "paired", name)
        if args.paired_only:
            continue
        exported_teacher(folder / "paired", folder / "teacher_hf", teacher, folder / "paired.log")
        run_training("two_stage", runs["two_stage"], args.nproc, folder / "two_stage.log")
        run_training("handicap", runs["handicap"], args.nproc, folder / "handicap.log")
        curves["two_stage"][s] = eval_curve(folder / "two_stage", student)
        curves["handicap"][s] = eval_curve(folder / "handicap", student)
        curves["weak_teacher"][s] = eval_curve(folder / "handicap", teacher)
    return curves


def cross_corpus(results: dict[str, dict[str, Any]], seeds: list[int], cmdline: str, machine: str) -> str:
    """One table across corpora and seeds: each arm against (a), the share of the gap closed; and
    one of the variants, when there are some."""
    lines = [f"Command: `{cmdline}`  ", f"Machine: {machine}.", "",
             "Final validation loss per corpus and seed; differences against (a), the student alone "
             "(negative: better than training alone; — not run).", "",
             "| corpus | seed | teacher | (a) alone | (b) − (a) | (c) − (a) | (d) − (a) | (e) − (a) | gap closed by (b) "
             "| by (e) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    worst = {"codistill": -math.inf, "handicap": -math.inf, "lead": -math.inf}
    for label, data in results.items():
        final = data["final"]
        for i, s in enumerate(seeds):
            a = final["alone"][s]
            closed = data["gap_closed"][i]
            lines.append(f"| {label} | {s} | {final['teacher'][s]:.4f} | {a:.4f} | "
                         + " | ".join(f"{final[arm][s] - a:+.4f}" if arm in final else "—"
                                      for arm in ("codistill", "two_stage", "handicap", "lead"))
                         + f" | {_share(closed)} | {_share(data['gap_closed_lead'][i])} |")
            for arm in worst:
                if arm in final:
                    worst[arm] = max(worst[arm], final[arm][s] - a)
    never_worse = all(d["never_worse"] for d in results.values())
    lines += ["",
              f"- never worse on every corpus and seed ((b) and (d) within {NEVER_WORSE} nats of (a)): "
              f"**{'yes' if never_worse else 'no'}**; worst (b) − (a) {worst['codistill']:+.4f}, worst (d) − (a) "
              + (f"{worst['handicap']:+.4f}" if worst["handicap"] > -math.inf else "— (not run)"),
              f"- lead-only gate (e): worst (e) − (a) {worst['lead']:+.4f}",
              "- helps ((b) below (a) on every seed), per corpus: "
              + ", ".join(f"{label} **{'yes' if d['helps'] else 'no'}**" for label, d in results.items()),
              "- mean share of the (a) → teacher gap closed, per corpus, (b) / (e): "
              + ", ".join(f"{label} {_share(_mean(d['gap_closed']))} / {_share(_mean(d['gap_closed_lead']))}"
                          for label, d in results.items())]
    variants = next(iter(results.values()))["variants"]
    if variants:
        lines += ["", "Variants (students of the paired run: (b) with these overrides), − (a) per corpus and seed; "
                  "the last rows: worst − (a) and the mean share of the gap closed per corpus.", "",
                  "| corpus | seed | (b) | " + " | ".join(variants) + " |",
                  "|---|---|---|" + "---|" * len(variants)]
        for label, data in results.items():
            final = data["final"]
            for s in seeds:
                a = final["alone"][s]
                lines.append(f"| {label} | {s} | {final['codistill'][s] - a:+.4f} | "
                             + " | ".join(f"{final[variant_key(n)][s] - a:+.4f}" for n in variants) + " |")
        lines.append("| worst | all | " + " | ".join(
            f"{max(d['final'][k][s] - d['final']['alone'][s] for d in results.values() for s in seeds):+.4f}"
            for k in ["codistill", *map(variant_key, variants)]) + " |")
        for label, data in results.items():
            lines.append(f"| gap closed | {label} | {_share(_mean(data['gap_closed']))} | "
                         + " | ".join(_share(_mean(data["variants"][n]["gap_closed"])) for n in variants) + " |")
        lines += ["", *(f"- {n}: `{' '.join(v['overrides'])}`" for n, v in variants.items())]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run("codistill-compare", build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
