"""Cost of a co-distillation step against training the models separately.

In one run, on the same engines and the same batches, rotates through
  (a) the co-distillation step: teacher fwd + CE + bwd + step, then each student
      fwd + (1-α)·CE + α·T²·KL to the teacher's logits + bwd + step;
  (b) a teacher-only step plus a student-only (CE) step on the same batch;
  (c) the two-stage pipeline's cost per student step: a teacher training step, plus a
      frozen-teacher forward (no grad) whose logits the student step then learns from;
  (d) step (a) at which every student with a benefit gate measures it (two more forwards
      and backwards of the student, on its batch and on the next, unseen one), through the path
      the run would take (``distill.fused_linear``);
  (a') where the fused-linear path is exact: step (a) from hidden states and LM heads (no model's
      [tokens x vocabulary] logits; codistill/fused.py), (b) and (c) unchanged (each model trained
      by itself, as a user would without co-distillation),
and prints median times, tokens/s, the ratios a/b and a/c (and a'/b, a'/c, a'/a), the benefit gate's cost per
step (d − a, or d − a' where the run takes the fused path, paid once every distill.benefit_interval steps,
as a share of that step) and each
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
from typing import Optional

import torch

from .. import cli
from ..metrics import peak_bytes


def timed(fn) -> float:
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


def body(args: argparse.Namespace) -> None:
    from ..engines import forward_logits
    from ..losses import Targets, distill_loss
    from ..trainer import StudentPlan, Trainer

    cfg = cli.run_config(args, ["overwrite=true"])
    trainer = Trainer(cfg)

    # Every student active with its soft term on (alpha_max, or 0.5 if the config turns it off).
    plans = [StudentPlan(True, p.temperature, replace(p.spec, alpha=d.alpha_max or 0.5))
             for p, d in zip(trainer.plan(0), trainer.distill)]
    gas = cfg.train.gradient_accumulation_steps
    sink: dict[str, float] = {}

    configured = trainer.fused
    fusable = not trainer.fused_problems()

    def codistill(batches, fused=False):
        trainer.fused = fused
        for batch in batches:
            trainer.micro_step(batch, plans, sink)
        trainer.fused = configured

    gated = [replace(p, measure=trainer.benefit[i] is not None) for i, p in enumerate(plans)]
    intervals = [d.benefit_interval for d, b in zip(trainer.distill, trainer.benefit) if b is not None]

    def measured(batches):
        for k, batch in enumerate(batches):
            trainer.micro_step(batch, gated, sink, probes=probes if k == 0 else None)

    def separate(batches):
        for batch in batches:
            trainer.teacher_micro_step(batch, sink)
            for i, plan in enumerate(plans):
                trainer.student_micro_step(i, batch, None, plan, sink)

    def two_stage(batches):
        for batch in batches:
            trainer.teacher_micro_step(batch, sink)  # stage 1: the teacher's own training
            with torch.no_grad():  # stage 2: the trained teacher, frozen, feeds the student
                logits = forward_logits(trainer.teacher, batch, trainer.vocab)
            for i, plan in enumerate(plans):
                targets = Targets(temperature=plan.temperature, logits=logits)
                if trainer.distill[i].token_gate:
                    targets.token_ce = distill_loss(logits, batch["labels"], batch["mask"]).token_ce
                trainer.student_micro_step(i, batch, targets, plan, sink)

    variants = [("codistill", codistill), ("separate", separate), ("two_stage", two_stage)]
    if fusable:
        variants.insert(1, ("fused", lambda batches: codistill(batches, fused=True)))
    if intervals:
        variants.append(("measured", measured))
    labels = {"codistill": "(a) co-distillation step", "separate": "(b) teacher step + student step",
              "two_stage": "(c) two-stage: teacher step + frozen fwd + student step",
              "measured": "(d) step (a) with the benefit gate measuring",
              "fused": "(a') step (a) with fused-linear losses"}
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for r in range(args.warmup + args.rounds):
        batches = [trainer.prepare_batch(next(trainer.stream)) for _ in range(gas)]
        probes = trainer.probes(0, gated)
        shift = r % len(variants)
        for name, fn in variants[shift:] + variants[:shift]:
            t = timed(lambda: fn(batches))
            if r >= args.warmup:
                times[name].append(t)

    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = trainer.tokens_per_step
    peak = torch.tensor([float(peak_bytes())], dtype=torch.float64)  # RSS on CPU, allocated on a GPU
    peaks = [torch.zeros_like(peak) for _ in range(trainer.world.size)]
    torch.distributed.all_gather(peaks, peak)
    result = {
        "config": args.config or "configs/tiny.yaml", "world_size": trainer.world.size,
        "device": trainer.world.device.type, "tokens_per_step": tokens, "rounds": args.rounds,
        **{f"{k}_ms": v * 1e3 for k, v in med.items()},
        **{f"{k}_tokens_per_sec": tokens / v for k, v in med.items()},
        "ratio_a_over_b": med["codistill"] / med["separate"], "ratio_a_over_c": med["codistill"] / med["two_stage"],
        "fused_linear": configured,
        "peak_memory_mb_per_rank": [float(p) / 2**20 for p in peaks],
    }
    if fusable:
        result["ratio_fused_a_over_b"] = med["fused"] / med["separate"]
        result["ratio_fused_a_over_c"] = med["fused"] / med["two_stage"]
        result["ratio_fused_over_a"] = med["fused"] / med["codistill"]
    gate_base = "fused" if configured and fusable else "codistill"  # (d) takes the path the run takes
    if intervals:  # the gate measures once every benefit_interval steps (the most frequent gate counts)
        base = med[gate_base]
        result["benefit_gate_interval"] = min(intervals)
        result["benefit_gate_step_ratio"] = (med["measured"] - base) / base
        result["benefit_gate_cost_share"] = result["benefit_gate_step_ratio"] / min(intervals)
    if trainer.world.is_main:
        print(f"world {trainer.world.size} x {trainer.world.device.type}, {tokens:,} tokens/step, "
              f"{args.rounds} rounds (median):")
        for name, _ in variants:
            print(f"  {labels[name]:<58} {result[name + '_ms']:9.1f} ms  {result[name + '_tokens_per_sec']:10,.0f} tok/s")
        print(f"  ratio a/b = {result['ratio_a_over_b']:.3f}   ratio a/c = {result['ratio_a_over_c']:.3f}")
        if fusable:
            print(f"  fused: ratio a'/b = {result['ratio_fused_a_over_b']:.3f}   ratio a'/c = "
                  f"{result['ratio_fused_a_over_c']:.3f}   a'/a = {result['ratio_fused_over_a']:.3f}")
        if intervals:
            a = "a'" if gate_base == "fused" else "a"
            print(f"  benefit gate: (d - {a}) / {a} = {result['benefit_gate_step_ratio']:.3f} at a "
                  f"measuring step, once every {min(intervals)} steps: {result['benefit_gate_cost_share']:.1%} of "
                  "the co-distillation step")
        kind = "peak RSS" if trainer.world.device.type == "cpu" else "peak allocated"
        print(f"  {kind} per rank (whole run): " + ", ".join(f"{m:,.0f} MB" for m in result["peak_memory_mb_per_rank"]))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run("bench_step", build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
