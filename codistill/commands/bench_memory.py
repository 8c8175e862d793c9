"""Where a training step's memory goes: peak RSS by phase of the step, for each arm of a comparison.

Each arm (by default ``plain``: ``distill.fused_linear=false`` and ``fused``: ``=true``) runs
``--steps`` optimizer steps of the config in a process of its own (a process's peak is its own),
one after another. In it a thread samples the resident set every ``--interval-ms`` and keeps the
highest value per step and per phase; the phases are the calls the step makes, named after them:
each model's forward, backward and optimizer step, the loss over its logits (``loss``), the fused
pass (``fused loss pass``), a student's benefit-gate measurement and the panels; anything between
them is ``between phases``. A phase inside another is named with both (``student benefit gate >
fused loss pass``).

With ``--trim`` (the default; ``--no-trim`` measures the allocator as a run has it) each arm runs with
glibc's mmap threshold at 1 MB (``GLIBC_TUNABLES``: every allocation of 1 MB or more mapped on its own and
unmapped when freed) and calls ``malloc_trim(0)`` at every phase boundary, so the resident set follows
what is allocated rather than what glibc's heap keeps after frees. After each step the arm also reads
the resident set after ``gc.collect()`` (and the trim): what stays between steps (``at rest``).

The report: every step's peak and the phase it is in, and for the steps after ``--skip`` (ZeRO-3
records its prefetch trace over the first steps, the fused path's again at its second) each phase's
highest value, side by side across arms, with the memory estimate's step peak of each arm's config.
With ``--timeline PHASE``, also that phase's resident set over its duration (the highest per tenth of it),
and where a model is at ZeRO-3 the bytes of its parameters gathered whole over the same tenths (beside
their partitions: what ZeRO-3's fetching holds at that point of the phase).

    python tools/bench_memory.py --config configs/examples/mid-gpt2.yaml --steps 4 \\
        teacher.deepspeed.bf16.enabled=false students.0.deepspeed.bf16.enabled=false
    python tools/bench_memory.py --arm plain:distill.fused_linear=false \\
        --arm "nogate:distill.fused_linear=true distill.benefit_gate=false" ...
    codistill-bench-memory ...   (the same, as a console command)

One process per arm (no launcher: what a rank of a multi-rank run holds differs by its share of
ZeRO's partitions, which ``codistill-estimate --world-size N`` counts). The arms' overrides come
after the config and before the shared ones given at the end, which every arm gets. On a GPU the
resident set is host memory; use the step log's peak there.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .. import cli
from ..errors import ConfigError, RunFailed

BETWEEN = "between phases"
AT_REST = "at rest after the step"
MMAP_THRESHOLD = "glibc.malloc.mmap_threshold=1048576"
DEFAULT_ARMS = ("plain:distill.fused_linear=false", "fused:distill.fused_linear=true")
GB = 2**30  # as everywhere in codistill (codistill-estimate, the step log)


@functools.cache
def _this_process():
    """psutil's handle on this process, made once (the sampler reads it every few ms)."""
    import psutil

    return psutil.Process()


def rss_bytes() -> int:
    """This process's resident set now (psutil, as bench_build reads it; DeepSpeed depends on it)."""
    return _this_process().memory_info().rss


def _malloc_trim() -> Callable[[], None]:
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        raise ConfigError("--trim needs glibc's malloc_trim (Linux with glibc); run with --no-trim") from None
    return lambda: trim(0)


class PhaseMemory:
    """The highest resident set per (step, phase), sampled on a thread every ``interval`` seconds and at
    every phase boundary. ``reader`` returns the bytes to record (default :func:`rss_bytes`); ``trim``
    is called at every boundary (e.g. glibc's ``malloc_trim``) before the boundary's reading."""

    def __init__(self, interval: float = 0.002, trim: Optional[Callable[[], None]] = None,
                 reader: Callable[[], int] = rss_bytes, timeline: Optional[str] = None,
                 gathered: Optional[Callable[[], int]] = None):
        self.interval, self.trim, self.reader = interval, trim, reader
        self.step = 0
        self.peaks: dict[int, dict[str, int]] = {}
        self.timeline_phase = timeline  # every reading in this phase is also kept, with its time
        self.timeline: dict[int, list[tuple[float, int]]] = {}
        self.gathered = gathered  # with a timeline: bytes of parameters ZeRO-3 holds gathered, read beside each reading
        self.gathered_timeline: dict[int, list[tuple[float, int]]] = {}
        self._stack: list[str] = []
        self._label = BETWEEN
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def label(self) -> str:
        return self._label

    def record(self, label: Optional[str] = None) -> int:
        """Read the resident set and keep it as the current phase's (or ``label``'s) highest if it is."""
        value = self.reader()
        with self._lock:
            phases = self.peaks.setdefault(self.step, {})
            key = self._label if label is None else label
            if value > phases.get(key, -1):
                phases[key] = value
            if key == self.timeline_phase:
                now = time.perf_counter()
                self.timeline.setdefault(self.step, []).append((now, value))
                if self.gathered is not None:
                    self.gathered_timeline.setdefault(self.step, []).append((now, self.gathered()))
        return value

    def _boundary(self) -> None:
        if self.trim is not None:
            self.trim()
        self.record()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Everything inside is recorded as phase ``name`` (nested: ``outer > name``)."""
        self._boundary()  # the phase before ends here
        self._stack.append(name)
        self._label = " > ".join(self._stack)
        self._boundary()
        try:
            yield
        finally:
            self._boundary()
            self._stack.pop()
            self._label = " > ".join(self._stack) if self._stack else BETWEEN
            self._boundary()

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        """Make every call of ``owner.attribute`` a phase ``name`` (an instance or module attribute)."""
        original = getattr(owner, attribute)

        def wrapped(*args, **kwargs):
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, wrapped)

    def at_rest(self) -> int:
        """The resident set between steps, after a garbage collection (and the trim): what stays."""
        gc.collect()
        if self.trim is not None:
            self.trim()
        return self.record(AT_REST)

    def __enter__(self) -> "PhaseMemory":
        def sample() -> None:
            while not self._stop.wait(self.interval):
                self.record()

        self._thread = threading.Thread(target=sample, name="phase-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def zero3_gathered(trainer) -> Optional[Callable[[], int]]:
    """A reader of the bytes of every model's ZeRO-3 parameters that are gathered whole now (available or
    being fetched), beside their partitions; None when no model is at ZeRO-3."""
    params = [p for m in trainer.members if m.engine.zero_optimization_stage() == 3
              for p in m.engine.module.parameters() if hasattr(p, "ds_status")]
    if not params:
        return None
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    whole = (ZeroParamStatus.AVAILABLE, ZeroParamStatus.INFLIGHT)
    sized = [(p, p.ds_numel * p.element_size()) for p in params]
    return lambda: sum(size for p, size in sized if p.ds_status in whole)


def instrument(trainer, memory: PhaseMemory) -> None:
    """Name the calls a training step makes as phases of ``memory`` (see the module doc): each model's forward,
    backward and optimizer step, and the parts the micro-step names through its ``phase`` hook."""
    for member in [trainer.teacher, *trainer.students]:
        if member is None or getattr(member, "engine", None) is None:
            continue
        for method, what in (("forward", "forward"), ("backward", "backward"), ("step", "optimizer step")):
            if callable(getattr(member.engine, method, None)):  # a frozen teacher's engine only runs forwards
                memory.wrap(member.engine, method, f"{member.name} {what}")
    trainer.micro_step.phase = memory.phase


def run_arm(args: argparse.Namespace) -> dict:
    """One arm in this process: the trainer, ``--steps`` instrumented steps, the figures."""
    from ..trainer import Trainer

    cfg = cli.run_config(args, [f"output_dir={args.arm_output}", "overwrite=true"])
    trainer = Trainer(cfg)
    if trainer.world.size != 1:
        raise ConfigError("codistill-bench-memory runs each arm as one process; start it with python, not a launcher")
    memory = PhaseMemory(args.interval_ms / 1e3, _malloc_trim() if args.trim else None, timeline=args.timeline,
                         gathered=zero3_gathered(trainer) if args.timeline else None)
    instrument(trainer, memory)
    rest = []
    memory.step = 1  # the sampling thread starts with the block: its first readings are step 1's, not a step 0's
    with memory:
        for step in range(args.steps):
            memory.step = step + 1
            memory.record()
            start = time.perf_counter()
            trainer.train_step(step)
            rest.append(memory.at_rest())
            print(f"  step {step + 1}: {time.perf_counter() - start:.1f} s", flush=True)
    return {"peaks": {str(k): v for k, v in memory.peaks.items()}, "at_rest": rest,
            "timeline": {str(k): tenths(v) for k, v in memory.timeline.items()},
            "gathered_timeline": {str(k): tenths(v) for k, v in memory.gathered_timeline.items()},
            "fused_linear": bool(trainer.fused), "trimmed": args.trim}


def tenths(samples: list[tuple[float, int]]) -> list[int]:
    """The highest reading in each tenth of the time from the first sample to the last (a phase met several
    times in a step spans from its first entry to its last exit)."""
    if not samples:
        return []
    start, end = samples[0][0], samples[-1][0]
    span = max(end - start, 1e-9)
    out = [0] * 10
    for t, value in samples:
        k = min(9, int(10 * (t - start) / span))
        out[k] = max(out[k], value)
    for k in range(1, 10):  # a tenth without a reading holds what the one before it ended at
        out[k] = out[k] or out[k - 1]
    return out


def parse_arms(given: Optional[list[str]]) -> dict[str, list[str]]:
    """``NAME:key=value [key=value ...]`` per --arm -> {name: overrides}."""
    arms: dict[str, list[str]] = {}
    for text in given or DEFAULT_ARMS:
        name, sep, rest = text.partition(":")
        name = name.strip()
        if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"--arm {text!r}: expected NAME:key=value [key=value ...] with a name of letters, "
                              "digits, - and _, e.g. plain:distill.fused_linear=false")
        if name in arms:
            raise ConfigError(f"--arm {name}: given twice")
        overrides = rest.split()
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"--arm {name}: {bad[0]!r} is not key=value")
        arms[name] = overrides
    return arms


def table(results: dict[str, dict], skip: int) -> list[str]:
    """The report's lines: each step's peak and where it is; each phase's highest after ``skip`` steps."""
    lines = ["peak resident set per step (GB), and the phase it is in:"]
    for name, res in results.items():
        steps = sorted(int(k) for k in res["peaks"])
        row = []
        for step in steps:
            phases = {k: v for k, v in res["peaks"][str(step)].items() if k != AT_REST}
            top = max(phases, key=phases.get)
            row.append(f"{step}: {phases[top] / GB:.2f} ({top})")
        lines.append(f"  {name:<10} " + "; ".join(row))
        lines.append(f"  {'':<10} at rest after each step: " + ", ".join(f"{v / GB:.2f}" for v in res["at_rest"]))
    names = list(results)
    steady = {n: [s for s in sorted(int(k) for k in results[n]["peaks"]) if s > skip] for n in names}
    if not all(steady.values()):
        lines.append(f"(no step after --skip {skip}: no steady-state table)")
        return lines
    lines.append(f"highest per phase over steps {skip + 1}-{max(max(v) for v in steady.values())} (GB):")
    order: list[str] = []  # the phases in the order a step meets them, each arm's new ones after their predecessor
    for n in names:
        for s in steady[n]:
            before = None
            for p in results[n]["peaks"][str(s)]:
                if p not in order:
                    order.insert(order.index(before) + 1 if before in order else len(order), p)
                before = p
    order.sort(key=lambda p: p == AT_REST)  # last
    width = max(len(p) for p in order + ["estimate's step peak"])
    lines.append(f"  {'phase':<{width}} " + " ".join(f"{n:>10}" for n in names))
    best = {}
    for phase in order:
        cells = []
        for n in names:
            values = [results[n]["peaks"][str(s)].get(phase) for s in steady[n]]
            values = [v for v in values if v is not None]
            cells.append(f"{max(values) / GB:10.2f}" if values else f"{'-':>10}")
            if values and phase != AT_REST:
                best[n] = max(best.get(n, 0), max(values))
        lines.append(f"  {phase:<{width}} " + " ".join(cells))
    lines.append(f"  {'step peak':<{width}} " + " ".join(f"{best.get(n, 0) / GB:10.2f}" for n in names))
    lines.append(f"  {'estimate' + chr(39) + 's step peak':<{width}} "
                 + " ".join(f"{results[n]['estimate_step_peak'] / GB:10.2f}" for n in names))
    timed = [n for n in names if results[n].get("timeline")]
    if timed:
        phase = results[timed[0]].get("timeline_phase", "the phase")
        for key, title in (("timeline", f"'{phase}' over its duration, highest per tenth of it (GB), step by step:"),
                           ("gathered_timeline", f"ZeRO-3 parameters gathered whole during '{phase}', highest per "
                                                 "tenth of it (GB):")):
            shown = [n for n in timed if results[n].get(key)]
            if shown:
                lines.append(title)
            for n in shown:
                for step, row in sorted(results[n][key].items(), key=lambda kv: int(kv[0])):
                    lines.append(f"  {n:<10} step {step}: " + " ".join(f"{v / GB:.2f}" for v in row))
    lines.append("  (fused path taken: " + ", ".join(f"{n} {'yes' if results[n]['fused_linear'] else 'no'}"
                                                   for n in names) + ")")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for("codistill-bench-memory", __doc__)
    parser.add_argument("--arm", action="append", metavar="NAME:OVERRIDES",
                        help="an arm and its overrides (repeatable; default: plain:distill.fused_linear=false "
                             "and fused:distill.fused_linear=true)")
    parser.add_argument("--steps", type=cli.positive_int, default=4, help="optimizer steps per arm (default 4)")
    parser.add_argument("--skip", type=cli.int_at_least(0), default=2,
                        help="steps left out of the per-phase table (default 2: ZeRO-3's trace recording)")
    parser.add_argument("--interval-ms", type=float, default=2.0, help="sampling interval (default 2 ms)")
    parser.add_argument("--trim", action=argparse.BooleanOptionalAction, default=True,
                        help="1 MB mmap threshold and malloc_trim at phase boundaries (default on)")
    parser.add_argument("--timeline", metavar="PHASE",
                        help="also report this phase's resident set over its duration, per tenth of it "
                             "(e.g. 'teacher backward'), and at ZeRO-3 the parameters gathered whole then")
    parser.add_argument("--out", help="also write the figures as JSON here")
    parser.add_argument("--arm-output", help=argparse.SUPPRESS)  # set by the parent for an arm's process
    parser.add_argument("--arm-result", help=argparse.SUPPRESS)
    return parser


def body(args: argparse.Namespace) -> int:
    if not args.interval_ms > 0:
        raise ConfigError(f"--interval-ms: expected a positive number of milliseconds, got {args.interval_ms}")
    if args.arm_result:  # one arm, in its own process
        Path(args.arm_result).write_text(json.dumps(run_arm(args)) + "\n")
        return 0
    from ..memory import estimate

    arms = parse_arms(args.arm)
    estimates = {}
    for name, overrides in arms.items():  # every arm's config is valid before any runs (one line if not)
        try:
            cfg = cli.run_config(args, overrides)
        except ConfigError as exc:
            raise ConfigError(f"--arm {name}: {exc}") from None
        # Here, not in the arm's process: the estimate's runtime term is measured in the process it runs in.
        estimates[name] = estimate(cfg, 1, "cpu")
    results: dict[str, dict] = {}
    env = cli.child_env()
    if args.trim:
        env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), MMAP_THRESHOLD) if t)
    with tempfile.TemporaryDirectory(prefix="codistill-bench-memory-") as tmp:
        for name, overrides in arms.items():
            print(f"arm {name}: {' '.join(overrides) or '(the config as it is)'}", flush=True)
            result = Path(tmp) / f"{name}.json"
            cmd = [*cli.module_command("codistill.commands.bench_memory"),
                   *(["--config", args.config] if args.config else []), "--steps", str(args.steps),
                   "--interval-ms", str(args.interval_ms), "--trim" if args.trim else "--no-trim",
                   *(["--timeline", args.timeline] if args.timeline else []),
                   "--arm-output", str(Path(tmp) / name), "--arm-result", str(result), *overrides, *args.overrides]
            proc = subprocess.run(cmd, env=env)
            if proc.returncode != 0 or not result.exists():
                raise RunFailed(f"arm {name} failed with exit code {proc.returncode} (its output is above)")
            results[name] = json.loads(result.read_text())
            results[name].update(estimate_step_peak=estimates[name].step_peak(), estimate_fused=estimates[name].fused,
                                 timeline_phase=args.timeline)
    print("\n".join(table(results, args.skip)))
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config or "configs/tiny.yaml", "steps": args.steps,
                                              "skip": args.skip, "trim": args.trim, "arms": arms,
                                              "overrides": args.overrides, "results": results}, indent=2) + "\n")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run("codistill-bench-memory", build_parser(), body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
