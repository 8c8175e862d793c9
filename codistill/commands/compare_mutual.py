"""The mutual arms of ``codistill-compare --mutual``: do models that teach each other end better than
each trained alone? Per seed, on the same data and batches, each arm one run:

  peers      two peers of the config's student size in mode mutual (its defaults, or --peer's distill
             keys), beside a CE-only twin of each (equal init, same batches and steps: a model of the
             same run whose sources are none, so it teaches nobody and learns from nobody);
  large      the same with two peers of about 4x the student's parameters;
  handicap   peers, the second one (and its twin) at --handicap x its learning rate: never worse;
  listening  co-distillation with the teacher listening to its student (teacher.distill, with
             --listen overrides), against the same run with a deaf teacher (deaf, run too): the
             teacher against its CE-only twin (the deaf run's teacher), the student against the
             one-way run's.

Reports per corpus and seed each model's final validation loss against its twin, and for the
peers the share of the twin's steps a peer needed to reach the twin's final validation loss
(interpolated between evaluations). Runs are subprocesses, skipped when done, resumed when
interrupted, as the other arms'.
"""
from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path
from typing import Any, Optional

from ..config import MUTUAL_DEFAULTS, ConfigError, ModelSpec, load_deepspeed_config, load_yaml, twin_name

ARMS = ("peers", "large", "handicap", "listening")
NEVER_WORSE = 0.01  # nats: a model may not end more than this above its twin
KEEPS_GAIN = 0.005  # nats: the student of a listening teacher against the one-way run's
LARGE = {"hidden_size": 2, "intermediate_size": 2, "num_hidden_layers": 5 / 3}  # x ~4 parameters (3 -> 5 layers)


def _inline(spec: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    spec["deepspeed"] = load_deepspeed_config(ModelSpec.model_validate(spec))
    return spec


def _lr_times(spec: dict[str, Any], factor: float) -> None:
    params = spec["deepspeed"].setdefault("optimizer", {}).setdefault("params", {})
    if "lr" not in params:
        raise ConfigError(f"{spec['name']}.deepspeed.optimizer.params.lr: the handicap arm scales the learning "
                          "rate; give it explicitly")
    params["lr"] = params["lr"] * factor


def larger(config: dict[str, Any]) -> dict[str, Any]:
    """A model config with about 4x the parameters of the default student's (wider and deeper)."""
    out = dict(config)
    for key, factor in LARGE.items():
        out[key] = max(1, round(int(config.get(key, 1)) * factor))
    return out


def peer_run(base: dict[str, Any], student: dict[str, Any], seed: int, out: Path,
             handicap: Optional[float] = None, peer: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Mode mutual: peer_a and peer_b (init seeds seed+1, seed+2) and a CE-only twin of each; ``peer``: distill
    keys of the peers (default: mode mutual's defaults)."""
    tree = copy.deepcopy(base)
    tree.pop("teacher", None)
    tree["mode"] = "mutual"
    # the peers get mode mutual's defaults (or --peer's keys), not the one-way schedule of a co-distillation config
    tree["distill"] = {**{k: v for k, v in tree["distill"].items() if k not in MUTUAL_DEFAULTS}, **(peer or {})}
    peers = []
    for k, name in enumerate(("peer_a", "peer_b")):
        peer = {**copy.deepcopy(student), "name": name, "init_seed": seed + 1 + k, "sources": None}
        if handicap is not None and k == 1:
            _lr_times(peer, handicap)
        twin = {**copy.deepcopy(peer), "name": twin_name(name), "sources": []}
        peers.append((peer, twin))
    tree["students"] = [p for p, _ in peers] + [t for _, t in peers]
    tree["students"][0]["sources"] = ["peer_b"]
    tree["students"][1]["sources"] = ["peer_a"]
    tree["output_dir"] = str(out)
    return tree


def listening_runs(base: dict[str, Any], seed: int, folder: Path, listen: dict[str, Any]) -> dict[str, dict]:
    """The one-way run (a deaf teacher and the student) and the same with the teacher listening to it."""
    deaf = copy.deepcopy(base)
    deaf["teacher"] = _inline(deaf["teacher"])
    deaf["students"] = [_inline(deaf["students"][0])]
    deaf["students"][0]["init_seed"] = deaf["students"][0].get("init_seed") or seed + 1
    deaf["output_dir"] = str(folder / "deaf")
    heard = copy.deepcopy(deaf)
    heard["teacher"]["distill"] = dict(listen)
    heard["output_dir"] = str(folder / "listening")
    return {"deaf": deaf, "listening": heard}


def arm_runs(base: dict[str, Any], seed: int, folder: Path, arms: list[str], handicap: float,
             listen: dict[str, Any], peer: Optional[dict[str, Any]] = None) -> dict[str, dict[str, Any]]:
    """Every run of one seed, as config trees, by run name."""
    base = copy.deepcopy(base)
    base["train"]["seed"] = seed
    base["resume"], base["overwrite"] = "auto", True
    base["train"]["eval_interval"] = min(base["train"]["eval_interval"], 25)  # finer curves for steps-to-reach
    student = _inline(base["students"][0])
    runs = {}
    if "peers" in arms:
        runs["peers"] = peer_run(base, student, seed, folder / "peers", peer=peer)
    if "large" in arms:
        runs["large"] = peer_run(base, {**student, "config": larger(student.get("config", {}))}, seed,
                                 folder / "large", peer=peer)
    if "handicap" in arms:
        runs["handicap"] = peer_run(base, student, seed, folder / "handicap", handicap, peer)
    if "listening" in arms:
        runs.update(listening_runs(base, seed, folder, listen))
    return runs


def steps_to_reach(curve: dict[int, float], target: float) -> float:
    """The first step at which ``curve`` reaches ``target`` (linear between evaluations; inf if never)."""
    points = sorted(curve.items())
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if v1 <= target:
            return s1 if v0 <= target or v0 == v1 else s0 + (s1 - s0) * (v0 - target) / (v0 - v1)
    return math.inf


def pairs(arm: str) -> list[tuple[str, str, str, str]]:
    """Each model an arm compares, as (label, its run, its name, "twin run:twin name"); the names
    ``teacher`` and ``student`` stand for the config's."""
    if arm == "listening":
        return [("teacher", "listening", "teacher", "deaf:teacher"), ("student", "listening", "student",
                                                                       "deaf:student")]
    return [(name, arm, name, f"{arm}:{twin_name(name)}") for name in ("peer_a", "peer_b")]


def collect(folder: Path, arms: list[str], teacher: str, student: str, eval_curve) -> dict[str, Any]:
    """Per arm and model: its final loss, its twin's, and (peers) the share of steps to the twin's final."""
    out: dict[str, Any] = {}
    for arm in arms:
        for label, run, model, twin in pairs(arm):
            model = {"teacher": teacher, "student": student}.get(model, model)
            twin_run, twin_model = twin.split(":")
            twin_model = {"teacher": teacher, "student": student}.get(twin_model, twin_model)
            mine, theirs = eval_curve(folder / run, model), eval_curve(folder / twin_run, twin_model)
            last = max(theirs)
            out[f"{arm}/{label}"] = {"final": mine[max(mine)], "twin": theirs[last],
                                     "share": steps_to_reach(mine, theirs[last]) / last}
    return out


def report(results: dict[str, dict[int, dict[str, Any]]], seeds: list[int], cmdline: str, machine: str,
           listen: dict[str, Any], handicap: float) -> tuple[str, bool]:
    """One table across corpora and seeds, and the checks."""
    lines = [f"Command: `{cmdline}`  ", f"Machine: {machine}.", "",
             "Final validation loss of each model minus its twin's (negative: better than trained alone); for "
             "peers also the share of the twin's steps the model needed to reach the twin's final loss.", "",
             "| corpus | seed | arm | model | final | twin | − twin | steps share |", "|---|---|---|---|---|---|---|---|"]
    rows: dict[str, list[float]] = {}
    shares: dict[str, list[float]] = {}
    for label, by_seed in results.items():
        for s in seeds:
            for key, r in by_seed[s].items():
                arm, model = key.split("/")
                d = r["final"] - r["twin"]
                rows.setdefault(arm if arm != "listening" else f"listening/{model}", []).append(d)
                if arm in ("peers", "large"):
                    shares.setdefault(arm, []).append(r["share"])
                share = f"{r['share']:.2f}" if math.isfinite(r["share"]) else "never"
                lines.append(f"| {label} | {s} | {arm} | {model} | {r['final']:.4f} | {r['twin']:.4f} | {d:+.4f} | "
                             f"{share if arm in ('peers', 'large') else '—'} |")
    checks, ok = [], True
    for arm in ("peers", "large"):
        if arm in rows:
            below = all(d < 0 for d in rows[arm])
            finite = [x for x in shares[arm] if math.isfinite(x)]
            ok &= below
            checks.append(f"- {arm}: every peer below its twin on every corpus and seed: **{'yes' if below else 'no'}** "
                          f"(worst {max(rows[arm]):+.4f}, mean {statistics.fmean(rows[arm]):+.4f}); share of steps to "
                          f"the twin's final loss: mean {statistics.fmean(finite) if finite else math.nan:.2f}, worst "
                          f"{max(shares[arm]):.2f} (goal ≤ 0.7)")
    if "handicap" in rows:
        held = all(d <= NEVER_WORSE for d in rows["handicap"])
        ok &= held
        checks.append(f"- handicap (peer_b at {handicap} x its learning rate): every model within {NEVER_WORSE} nats "
                      f"of its twin: **{'yes' if held else 'no'}** (worst {max(rows['handicap']):+.4f})")
    if "listening/teacher" in rows:
        t, s = rows["listening/teacher"], rows["listening/student"]
        held = all(d <= NEVER_WORSE for d in t) and all(d <= KEEPS_GAIN for d in s)
        ok &= held
        checks.append(f"- listening teacher (`teacher.distill: {json.dumps(listen)}`): teacher − its deaf twin worst "
                      f"{max(t):+.4f} (≤ {NEVER_WORSE}), mean {statistics.fmean(t):+.4f}; student − the one-way run's "
                      f"worst {max(s):+.4f} (≤ {KEEPS_GAIN}), mean {statistics.fmean(s):+.4f}: "
                      f"**{'yes' if held else 'no'}**")
    return "\n".join(lines + [""] + checks) + "\n", ok


def keys(given: list[str], option: str) -> dict[str, Any]:
    """``key=value`` items of a repeatable option as a mapping (values parsed as YAML)."""
    import yaml

    out = {}
    for item in given:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option} {item!r}: expected key=value, e.g. schedule=warmup")
        try:
            out[key] = load_yaml(value)
        except (yaml.YAMLError, ConfigError) as exc:
            raise ConfigError(f"{option} {key}: its value is not valid YAML ({' '.join(str(exc).split())[:200]})") \
                from None
    return out


def run_mutual(args, cfg, corpora: list[str], labels: list[str], out: Path, seeds: list[int], cmdline: str,
               machine: str, bases: list[dict[str, Any]], run_training, eval_curve) -> bool:
    """Every corpus, seed and arm (finished runs skipped, with compare.py's ``run_training``; curves read with
    its ``eval_curve``); writes results.md and results.json into ``out``."""
    arms = args.mutual_arms or list(ARMS)
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise ConfigError(f"--mutual-arms: {unknown} unknown; expected some of {', '.join(ARMS)}")
    listen, peer = keys(args.listen, "--listen"), keys(args.peer, "--peer")
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for base, label in zip(bases, labels):
        folder = out if len(corpora) == 1 else out / label
        results[label] = {}
        for s in seeds:
            seed_dir = folder / f"seed_{s}"
            print(f"{label}, seed {s}:", flush=True)
            for name, tree in arm_runs(base, s, seed_dir, arms, args.handicap, listen, peer).items():
                run_training(name, tree, args.nproc, seed_dir / f"{name}.log")
            results[label][s] = collect(seed_dir, arms, cfg.teacher.name, cfg.students[0].name, eval_curve)
    text, ok = report(results, seeds, cmdline, machine, listen, args.handicap)
    write_results(out, text, results)
    return ok


def exported_teacher(run: Path, out: Path, name: str, log: Path) -> Path:
    """The teacher ``name`` of the finished ``run``, exported once into ``out/name`` (the export's output and
    progress bars appended to ``log``); a later call finds it there."""
    import contextlib

    from ..checkpoint import export_hf

    target = out / name
    if not (target / "config.json").exists():
        with open(log, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):  # its bars too
            export_hf(run, out, [name], overwrite=True)
    return target


def soft_from(tree: dict[str, Any], teacher_dir: Path) -> dict[str, Any]:
    """``tree`` (a run's config, changed in place and returned) in mode soft from the exported teacher in
    ``teacher_dir``: its name and DeepSpeed config kept, no head start (the teacher is finished), and every
    student's DeepSpeed config read in (a path relative to the config would not resolve from the run)."""
    teacher = tree["teacher"]
    tree["mode"] = "soft"
    tree["train"] = {**tree.get("train", {}), "tail_steps": 0}  # a finished teacher has no tail
    tree["teacher"] = {"name": teacher["name"], "pretrained": str(teacher_dir),
                       "deepspeed": load_deepspeed_config(ModelSpec.model_validate(teacher))}
    tree["distill"] = {**tree.get("distill", {}), "head_start_steps": 0}
    for student in tree["students"]:
        student["deepspeed"] = load_deepspeed_config(ModelSpec.model_validate(student))
    return tree


def write_results(out: Path, text: str, results: dict) -> None:
    """An arm's table (results.md, also printed) and its figures (results.json) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
