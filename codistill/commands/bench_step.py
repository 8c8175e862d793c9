"""Cost of a co-distillation step against training the models separately.

In one run, on the same engines and the same batches, rotates through
  (a) the co-distillation step: teacher fwd + CE + bwd + step, then each student
      fwd + (1-α)·CE + α·T²·KL to the teacher's logits + bwd + step (mode mutual: every peer's
      forward, its loss against the others' average, its backward and step; with distill.teacher_ema, the
      students read the teacher's moving average, one more forward, and the average moves after the step);
  (b) every model's step alone (CE only) on the same batch (the teacher's and each student's, or
      each peer's);
  (c) the two-stage pipeline's cost per student step: a teacher training step, plus a
      frozen-teacher forward (no grad) whose logits the student step then learns from; and each of its
      two stages timed by itself, (c1) the teacher's step and (c2) the frozen forward and student step
      (also a step of the teacher's tail, train.tail_steps), which give the whole run's cost against
      two-stage's from the steps each takes;
  (e) with a listening teacher (teacher.distill): step (a) with the teacher deaf;
  (d) step (a) at which every student with a benefit gate measures it (two more forwards
      and backwards of the student, on its batch and on the next, unseen one), through the path
      the run would take (``distill.fused_linear``);
  (a') where the fused-linear path is exact: step (a) from hidden states and LM heads (no model's
      [tokens x vocabulary] logits; codistill/fused.py), (b) and (c) unchanged (each model trained
      by itself, as a user would without co-distillation),
  (o) with on-policy students (distill.on_policy): step (a), through the path the run takes, at which every
      one of them also learns on its own samples (sampling, the teacher's scoring forward, its pass on them),
  (s) with selection (distill.selection_interval, students with twins): step (a), then a decision (both
      members' probe forwards and the loser's copy of the winner's state; the twin's own step is in (a)),
and prints median times, tokens/s, the ratios a/b and a/c (and a'/b, a'/c, a'/a), the benefit gate's cost per
step (d − a, or d − a' where the run takes the fused path, paid once every distill.benefit_interval steps,
as a share of that step), an on-policy step against an off-policy one (o/a, and at λ = 0.5, half the steps
on-policy: (o + a) / 2a, with the share of (o) spent sampling), a decision's cost (s − a, once every
distill.selection_interval steps, as a share of the step) and each
rank's peak memory. Rotating the order round by round cancels most of the drift of a shared,
noisy machine.

    python tools/bench_step.py [--config configs/tiny.yaml] [--rounds 20] [key.path=value ...]
    deepspeed --num_gpus 2 tools/bench_step.py --rounds 20
    codistill-bench-step ...   (the same, as a console command)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from .. import cli


def timed(fn) -> float:
    import torch

    torch.distributed.barrier()
    start = time.perf_counter()
    fn()
    torch.distributed.barrier()
    return time.perf_counter() - start


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for("codistill-bench-step", __doc__)
    parser.add_argument("--rounds", type=cli.positive_int, default=20, help="timed rounds of each variant (default 20)")
    parser.add_argument("--warmup", type=cli.int_at_least(0), default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--out", help="also write the figures as JSON here (rank 0)")
    return parser


def variants(trainer, plans: list, gated: list, probes: dict, sampled: list) -> dict[str, Callable[[list], None]]:
    """Each variant as a function of one step's micro-batches, every one a micro-step over the run's engines
    with other edges: the run's (every model reading its sources), none (every model alone), the teacher
    frozen after its own step (two-stage), a deaf teacher (with a listening one), the other strategy where
    it is exact; ``sampled`` gets the seconds each on-policy step spent sampling."""
    from ..fused import static_problem
    from ..step import Models, fused_problems, make_step

    cfg, sink, models = trainer.cfg, {}, trainer.models

    def step_of(m: Models, fused: bool = False):
        return make_step(fused, m, cfg, trainer.world.size, trainer.cache, trainer.world.device)

    def steps(micro_step, plans_of_step, probe_first=False):
        def run(batches):
            for k, batch in enumerate(batches):
                micro_step(batch, plans_of_step, sink, probes=probes.get("now") if probe_first and k == 0 else None)
        return run

    run_step = step_of(models)
    run_step.smoothed = trainer.smoothed  # a smoothed teacher's update after the teacher's step, as the run does
    out = {"codistill": steps(run_step, plans),
           "separate": steps(step_of(replace(models, sources=[[] for _ in models.sources])), plans)}
    cached = cfg.teacher is not None and bool(cfg.teacher.cache)
    if not models.cross and not fused_problems(static_problem(cfg.mode, cached), trainer.members, trainer.vocab):
        out["fused"] = steps(step_of(models, fused=True), plans)
    teacher = trainer.teacher
    if teacher is not None and teacher.trainable:
        # two-stage: the teacher's own step, then the same engine frozen feeds the students
        students = [i for i, k in enumerate(models.learners) if k != 0]
        alone = replace(models, members=[teacher], learners=[], states=[], sources=[])
        frozen = replace(teacher, trainable=False)  # (its own vocabulary, if it has one, kept)
        fed = replace(models, members=[frozen, *trainer.students], teacher=frozen,
                      learners=[models.learners[i] for i in students], states=[models.states[i] for i in students],
                      sources=[[0] for _ in students])
        first, then = steps(step_of(alone), []), steps(step_of(fed), [plans[i] for i in students])

        def two_stage(batches):
            first(batches)
            then(batches)

        out["two_stage"] = two_stage
        out["teacher_alone"], out["frozen_teacher"] = first, then  # its two stages, for the run's cost
        if 0 in models.learners:  # a listening teacher: the same step with it deaf
            deaf = [[] if k == 0 else s for k, s in zip(models.learners, models.sources)]
            out["deaf"] = steps(step_of(replace(models, sources=deaf)), plans)
    if any(s.benefit is not None for s in trainer.learners):
        out["measured"] = steps(trainer.micro_step, gated, probe_first=True)  # the path the run takes
    return {**out, **learners_variants(trainer, plans, out["codistill"], steps, sink, sampled)}


def learners_variants(trainer, plans: list, codistill: Callable, steps: Callable, sink: dict,
                      sampled: list) -> dict[str, Callable[[list], None]]:
    """(o), where students learn on their own samples (``sampled`` gets the seconds each step spent sampling), and
    (s), step (a) then a selection decision, where students are selected against their twins."""
    out = {}
    if any(s.distill.on_policy is not None for s in trainer.learners):
        own = steps(trainer.micro_step, [replace(p, on_policy=s.distill.on_policy is not None)
                                         for p, s in zip(plans, trainer.learners)])

        def on_policy(batches):
            for key in [k for k in sink if k.endswith("/on_policy/seconds")]:
                del sink[key]
            own(batches)
            sampled.append(sum(v for k, v in sink.items() if k.endswith("/on_policy/seconds")))

        out["on_policy"] = on_policy
    if trainer.selection is not None:
        def selecting(batches):
            codistill(batches)
            trainer.selection.after_step(trainer.selection.interval)  # a step at which the decision is due

        out["selecting"] = selecting
    return out


def summary(trainer, med: dict[str, float], rounds: int, config: Optional[str],
            sampling: Optional[float] = None) -> dict:
    """The figures: medians, tokens/s, the ratios, the benefit gate's cost share and (``sampling``: the median
    seconds an on-policy step spent sampling) the on-policy step's."""
    import torch

    from ..metrics import peak_bytes

    tokens = trainer.tokens_per_step
    peak = torch.tensor([float(peak_bytes())], dtype=torch.float64)  # RSS on CPU, allocated on a GPU
    peaks = [torch.zeros_like(peak) for _ in range(trainer.world.size)]
    torch.distributed.all_gather(peaks, peak)
    result = {
        "config": config or "configs/tiny.yaml", "world_size": trainer.world.size,
        "device": trainer.world.device.type, "tokens_per_step": tokens, "rounds": rounds,
        **{f"{k}_ms": v * 1e3 for k, v in med.items()},
        **{f"{k}_tokens_per_sec": tokens / v for k, v in med.items()},
        "ratio_a_over_b": med["codistill"] / med["separate"],
        "fused_linear": trainer.fused,
        "peak_memory_mb_per_rank": [float(p) / 2**20 for p in peaks],
    }
    if "two_stage" in med:
        result["ratio_a_over_c"] = med["codistill"] / med["two_stage"]
        base = med["fused" if trainer.fused else "codistill"]
        result.update(run_cost(trainer.cfg, base, med["teacher_alone"], med["frozen_teacher"],
                               med["measured"] - base if "measured" in med else 0.0))
    if "deaf" in med:
        result["ratio_listening_over_deaf"] = med["codistill"] / med["deaf"]
    if "fused" in med:
        result["ratio_fused_a_over_b"] = med["fused"] / med["separate"]
        if "two_stage" in med:
            result["ratio_fused_a_over_c"] = med["fused"] / med["two_stage"]
        result["ratio_fused_over_a"] = med["fused"] / med["codistill"]
    if "measured" in med:  # the gate measures once every benefit_interval steps (the most frequent gate counts)
        interval = min(s.distill.benefit_interval for s in trainer.learners if s.benefit is not None)
        base = med["fused" if trainer.fused else "codistill"]  # (d) takes the path the run takes
        result["benefit_gate_interval"] = interval
        result["benefit_gate_step_ratio"] = (med["measured"] - base) / base
        result["benefit_gate_cost_share"] = result["benefit_gate_step_ratio"] / interval
    if "on_policy" in med:  # against the off-policy step of the path the run takes
        base = med["fused" if trainer.fused else "codistill"]
        result["ratio_on_policy_over_a"] = med["on_policy"] / base
        result["ratio_lambda_half_over_a"] = (med["on_policy"] + base) / (2 * base)
        result["on_policy_sampling_share"] = (sampling or 0.0) / med["on_policy"]
    if "selecting" in med:  # a decision once every selection_interval steps, against the step it follows
        result["selection_interval"] = trainer.selection.interval
        result["selection_step_ratio"] = (med["selecting"] - med["codistill"]) / med["codistill"]
        result["selection_cost_share"] = result["selection_step_ratio"] / trainer.selection.interval
    return result


def run_cost(cfg, codistill: float, teacher: float, frozen: float, gate: float = 0.0) -> dict[str, float]:
    """The whole run's seconds from its steps' medians, against the two-stage pipeline that trains the same
    teacher for as many steps and then the students from it, frozen: the run takes its head start H of
    teacher steps alone, then S − K co-distillation steps and its tail of K frozen-teacher steps (S: the
    first student's steps); two-stage takes H + S − K teacher steps alone, then S frozen-teacher steps.
    ``gate``: the seconds the benefit gate adds to a step where it measures (measured: (d) − (a)), added to
    both at each of the student's measuring steps (every benefit_interval of its steps after burn-in, from a
    live or a frozen teacher alike: the same student's forwards and gradients on its batch and probe)."""
    d = cfg.distill_for(0)
    head, tail = d.head_start_steps, cfg.train.tail_steps
    students = cfg.train.max_steps - head
    measuring = max(-(-(students - d.burn_in_steps) // d.benefit_interval), 0) if d.benefit_gate else 0
    gated = measuring * gate
    run = head * teacher + (students - tail) * codistill + tail * frozen + gated
    two = cfg.train.teacher_steps * teacher + students * frozen + gated
    return {"run_s": run, "two_stage_run_s": two, "ratio_run_over_two_stage": run / two, "benefit_gate_run_s": gated}


LABELS = {"codistill": "(a) co-distillation step", "separate": "(b) every model's step alone (CE only)",
          "deaf": "(e) step (a) with the teacher deaf (not listening)",
          "two_stage": "(c) two-stage: teacher step + frozen fwd + student step",
          "teacher_alone": "(c1) its first stage: the teacher's step alone",
          "frozen_teacher": "(c2) its second stage (and a tail step): frozen fwd + student step",
          "measured": "(d) step (a) with the benefit gate measuring", "fused": "(a') step (a) with fused-linear losses",
          "on_policy": "(o) step (a) with every on-policy student also on its samples",
          "selecting": "(s) step (a), then a selection decision"}


def print_report(result: dict, names: list[str]) -> None:
    print(f"world {result['world_size']} x {result['device']}, {result['tokens_per_step']:,} tokens/step, "
          f"{result['rounds']} rounds (median):")
    for name in names:
        print(f"  {LABELS[name]:<58} {result[name + '_ms']:9.1f} ms  {result[name + '_tokens_per_sec']:10,.0f} tok/s")
    ratios = [f"ratio a/b = {result['ratio_a_over_b']:.3f}"]
    if "ratio_a_over_c" in result:
        ratios.append(f"ratio a/c = {result['ratio_a_over_c']:.3f}")
    if "ratio_listening_over_deaf" in result:
        ratios.append(f"listening/deaf a/e = {result['ratio_listening_over_deaf']:.3f}")
    print("  " + "   ".join(ratios))
    if "ratio_run_over_two_stage" in result:
        print(f"  the whole run (head start, co-distillation, tail) against two-stage (the teacher's steps, then "
              f"the students'): {result['run_s']:,.0f} s / {result['two_stage_run_s']:,.0f} s = "
              f"{result['ratio_run_over_two_stage']:.3f} (the benefit gate's measuring steps, "
              f"{result['benefit_gate_run_s']:,.0f} s, in both)")
    if "fused" in names:
        over_c = f"   ratio a'/c = {result['ratio_fused_a_over_c']:.3f}" if "ratio_fused_a_over_c" in result else ""
        print(f"  fused: ratio a'/b = {result['ratio_fused_a_over_b']:.3f}{over_c}   "
              f"a'/a = {result['ratio_fused_over_a']:.3f}")
    if "measured" in names:
        a = "a'" if result["fused_linear"] else "a"
        print(f"  benefit gate: (d - {a}) / {a} = {result['benefit_gate_step_ratio']:.3f} at a measuring step, once "
              f"every {result['benefit_gate_interval']} steps: {result['benefit_gate_cost_share']:.1%} of "
              "the co-distillation step")
    if "on_policy" in names:
        a = "a'" if result["fused_linear"] else "a"
        print(f"  on-policy: o/{a} = {result['ratio_on_policy_over_a']:.3f} "
              f"({result['on_policy_sampling_share']:.0%} of (o) sampling); at lambda 0.5 (half the steps "
              f"on-policy): {result['ratio_lambda_half_over_a']:.3f}")
    if "selecting" in names:
        print(f"  selection: (s - a) / a = {result['selection_step_ratio']:.3f} at a deciding step, once every "
              f"{result['selection_interval']} steps: {result['selection_cost_share']:.1%} of the co-distillation step")
    kind = "peak RSS" if result["device"] == "cpu" else "peak allocated"
    print(f"  {kind} per rank (whole run): " + ", ".join(f"{m:,.0f} MB" for m in result["peak_memory_mb_per_rank"]))


def body(args: argparse.Namespace) -> None:
    from ..student import StudentPlan
    from ..trainer import Trainer

    trainer = Trainer(cli.run_config(args, ["overwrite=true"]))
    # Every student active with its soft term on (alpha_max, or 0.5 if the config turns it off).
    plans = [StudentPlan(True, p.temperature, replace(p.spec, alpha=s.distill.alpha_max or 0.5))
             for p, s in zip(trainer.plan(0), trainer.learners)]
    gated = [replace(p, measure=s.benefit is not None) for p, s in zip(plans, trainer.learners)]
    probes: dict = {}  # this round's unseen batches, for the gate's measurement
    sampled: list[float] = []  # seconds each on-policy step spent sampling
    timed_variants = list(variants(trainer, plans, gated, probes, sampled).items())
    times: dict[str, list[float]] = {name: [] for name, _ in timed_variants}
    for r in range(args.warmup + args.rounds):
        batches = [trainer.prepare_batch(next(trainer.stream)) for _ in range(trainer.cfg.train.gradient_accumulation_steps)]
        probes["now"] = trainer.probes(0, gated)
        shift = r % len(timed_variants)
        for name, fn in timed_variants[shift:] + timed_variants[:shift]:
            t = timed(lambda: fn(batches))
            if r >= args.warmup:
                times[name].append(t)
    result = summary(trainer, {k: statistics.median(v) for k, v in times.items()}, args.rounds, args.config,
                     statistics.median(sampled[args.warmup:]) if sampled else None)
    if trainer.world.is_main:
        print_report(result, [name for name, _ in timed_variants])
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run("codistill-bench-step", build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
