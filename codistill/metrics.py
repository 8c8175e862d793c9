"""Rank-0 reporting: TensorBoard scalars, a progress bar and a concise log line."""
from __future__ import annotations

import logging
import math
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from tqdm.auto import tqdm

log = logging.getLogger("codistill")


def read_scalars(output_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar a run wrote to ``<output_dir>/tensorboard``: tag -> {step: value} (the
    last value written at a step wins, e.g. after a resume repeats it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(output_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def peak_bytes() -> int:
    """This process's peak memory so far: allocated device memory on a GPU, else peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


FROZEN_CE = "frozen/loss_ce"  # a frozen (or cached) model's CE on each training batch: it scores, it does not learn
CROSS_CE = "cross/loss_ce"  # a model with its own tokenizer: its CE in nats per token of the run's tokenization


def cross_tag(side: str = "") -> str:
    """:data:`CROSS_CE` per token of a further students' side (crosstok.side_prefix, e.g. ``cross/s1/loss_ce``)."""
    return f"cross/{side.rstrip('_')}/loss_ce" if side else CROSS_CE


def batch_ce(values: Mapping[str, float], name: str, side: str = "") -> Optional[float]:
    """A model's CE on the step's training batches (trained on or only scored), per token of the run's
    tokenization (or of a further students' side: ``side``): comparable across models."""
    for tag in (cross_tag(side), "train/loss_ce", FROZEN_CE):
        if f"{name}/{tag}" in values:
            return values[f"{name}/{tag}"]
    return None


class Tags:
    """TensorBoard tags of per-student values: ``<group>/<key>`` with one student, ``<group>/<key>/<student>``
    with several."""

    def __init__(self, students: list[str]):
        self.students = students

    def student(self, group: str, key: str, index: int) -> str:
        return f"{group}/{key}" if len(self.students) == 1 else f"{group}/{key}/{self.students[index]}"


@dataclass
class Settings:
    """What TensorBoard shows of a run's config: the resolved YAML, the main settings as HParams, and the
    tags HParams compares runs by."""

    text: str
    hparams: dict[str, Any]
    metrics: list[str]

    @classmethod
    def of(cls, cfg) -> "Settings":
        from .config import dump_config

        flat = {"mode": cfg.mode, "seq_len": cfg.data.seq_len, "dataset": cfg.data.dataset,
                "max_steps": cfg.train.max_steps, "micro_batch_size": cfg.train.micro_batch_size,
                "accumulation": cfg.train.gradient_accumulation_steps, "seed": cfg.train.seed}
        for spec, d, _ in cfg.learners():
            flat.update({f"{spec.name}/{k}": v for k, v in (
                ("alpha_max", d.alpha_max), ("schedule", d.schedule), ("temperature", d.temperature),
                ("divergence", d.divergence), ("benefit_gate", d.benefit_gate), ("targets", d.targets))})
        return cls(dump_config(cfg), flat, [f"{m.name}/eval/loss" for m in cfg.models])


class Metrics:
    """Writes ``<output_dir>/tensorboard`` on rank 0; a no-op on other ranks."""

    def __init__(self, output_dir: Path, enabled: bool, total_steps: int, start_step: int = 0,
                 layout: Optional[dict] = None, settings: Optional["Settings"] = None):
        """``layout``: TensorBoard's custom-scalars layout ({category: {chart: ["Multiline", [tag regexes]]}});
        ``settings``: the run's config, written as text and as HParams (runs compared side by side)."""
        self.enabled = enabled
        self.total = total_steps
        self.tokens = 0.0  # trained on by every rank in this invocation (padding not counted)
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams

            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
            if layout:
                self.writer.add_custom_scalars(layout)
            if settings is not None:
                self.writer.add_text("config", f"```\n{settings.text}\n```", global_step=start_step)
                for summary in hparams(settings.hparams, {tag: 0.0 for tag in settings.metrics}):
                    self.writer.file_writer.add_summary(summary)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (enabled and sys.stderr.isatty()), unit="step",
                        dynamic_ncols=True, leave=True)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def advance(self, step: int, values: Mapping[str, float], line: bool) -> None:
        """Record one finished optimizer step; print a summary line when ``line``."""
        self.scalars(step, values)
        self.tokens += values.get("perf/tokens", 0.0)  # this invocation's, for the summary's throughput
        if not self.enabled:
            return
        self.bar.update(1)
        short = {k.replace("/train/", " ").replace("schedule/", ""): v for k, v in values.items()
                 if k.endswith("/train/loss") or k == "schedule/alpha"}
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in short.items()}, refresh=False)
        if line:
            self.bar.write(f"step {step}/{self.total}: " + format_values(values))

    def samples(self, step: int, continuations: list[tuple[str, str, str]]) -> None:
        """Each model's continuation of each shown prompt: a log line each (cut short) and one text entry per
        model in TensorBoard (the whole of each)."""
        by_model: dict[str, list[str]] = {}
        for name, prompt, text in continuations:
            self.message(f"sample at step {step}, {name}: {_cut(prompt, 60)} -> {_cut(text, 120)}")
            by_model.setdefault(name, []).append(f"**{prompt}** {text}")
        if self.writer is not None:
            for name, entries in by_model.items():
                self.writer.add_text(f"{name}/samples", "\n\n".join(entries), global_step=step)

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


ONE_TOKEN = 0.5  # the share of positions with one top-1 token past which an agreement figure gets a note


def format_values(values: Mapping[str, float]) -> str:
    """A short human summary: per model its cross-entropy first (the number comparable across models and with
    validation), then its soft term and the objective it minimised when distilling; then α, T and throughput."""
    models: dict[str, dict[str, float]] = {}
    later: dict[str, list[str]] = {}  # a model's on-policy figures, after its loss on the text
    extra = []
    for tag, value in values.items():
        parts = tag.split("/")
        if len(parts) == 3 and parts[1] in ("train", "eval") and parts[2] in ("loss", "loss_ce", "loss_kd", "agreement",
                                                                            "top1_share"):
            models.setdefault(parts[0], {})[parts[2]] = value
        elif len(parts) == 3 and parts[2] == "teacher_logp":  # how the teacher scores the model's own samples
            if parts[1] == "on_policy":
                later.setdefault(parts[0], []).append(f"teacher logp {value:.3f}")
            else:
                models.setdefault(parts[0], {})["teacher_logp"] = value
        elif len(parts) == 3 and parts[1] == "on_policy" and parts[2] in ("loss", "length"):
            later.setdefault(parts[0], []).append(f"on-policy {value:.4f}" if parts[2] == "loss"
                                                  else f"{value:.1f} tokens sampled")
        elif tag == "schedule/alpha":
            extra.append(f"alpha {value:.3f}")
        elif tag == "schedule/temperature":
            extra.append(f"T {value:g}")
        elif tag == "perf/tokens_per_sec":
            extra.append(f"{value:,.0f} tok/s")
        elif tag == "perf/peak_memory_gb":
            extra.append(f"peak {value:.2f} GB")
    shown = []
    one = next((g["top1_share"] for g in models.values() if "top1_share" in g), 0.0)  # see ONE_TOKEN
    for name in dict.fromkeys([*models, *later]):
        got = models.get(name, {})
        if "loss_ce" in got:  # a training step: the CE heads the line; the objective only where it differs
            head = f"ce {got['loss_ce']:.4f}"
            rest = [f"kd {got['loss_kd']:.4f}"] if "loss_kd" in got else []
            if "loss" in got and abs(got["loss"] - got["loss_ce"]) > 5e-5:
                rest.append(f"objective {got['loss']:.4f}")
        else:  # validation: the loss is the CE
            head = f"{got['loss']:.4f}" if "loss" in got else ""
            rest = []
        if "agreement" in got:  # agreement on one token the teacher predicts almost everywhere says little
            rest.append(f"agree {got['agreement']:.4f}" + (f": the teacher predicts one token at {one:.0%} of positions"
                                                            if one > ONE_TOKEN else ""))
        rest += [f"teacher logp {got['teacher_logp']:.3f}"] if "teacher_logp" in got else []
        rest += later.get(name, [])
        if not head and rest:
            head, rest = rest[0], rest[1:]
        shown.append(f"{name} {head}" + (f" ({', '.join(rest)})" if rest else ""))
    return " | ".join(shown + extra)


def summary_lines(final: Mapping[str, float], start: Mapping[str, float], teacher: Optional[str], students: list[str],
                  wall_s: float, tokens: int, checkpoint: Path, output_dir: Path,
                  twins: Optional[Mapping[str, str]] = None, selected: Optional[list[str]] = None) -> list[str]:
    """The run's face at its end: each model's validation loss and perplexity, each student's gap
    to the teacher and its change since step 0, each student against its twin trained alone (or how to
    get that comparison; ``selected``: before it, what selection among them decided), time and throughput,
    and where to look next."""
    lines = ["run finished:"]
    for name in [*([teacher] if teacher else []), *students]:
        loss = final.get(f"{name}/eval/loss")
        if loss is None:  # a teacher that was not loaded (cached, or hard mode)
            continue
        parts = [f"validation loss {loss:.4f} (perplexity {math.exp(min(loss, 50.0)):,.1f})"]
        ref = final.get(f"{teacher}/eval/loss_aligned", final.get(f"{teacher}/eval/loss"))  # per token of the run's
        aligned = final.get(f"{name}/eval/loss_aligned")  # another tokenizer: say both figures, compare the run's
        if aligned is not None:
            parts[0] += f" per token of its own tokenizer, {aligned:.4f} per token of the run's (data.tokenizer)"
        if name != teacher and ref is not None:
            parts.append(f"{(loss if aligned is None else aligned) - ref:+.4f} vs the teacher")
        if f"{name}/eval/loss" in start and loss != start[f"{name}/eval/loss"]:  # (a frozen teacher's never moves)
            parts.append(f"{loss - start[f'{name}/eval/loss']:+.4f} since step 0")
        lines.append(f"  {name}: " + ", ".join(parts))
    lines += [f"  {line}" for line in selected or []] + baseline_lines(final, teacher, twins or {})
    rate = f", {tokens / wall_s:,.0f} tokens/s" if wall_s > 0 and tokens else ""
    lines += [f"  {wall_s:,.1f} s of training in this run{rate}",
              f"  checkpoint: {checkpoint}",
              f"  TensorBoard logs: {output_dir / 'tensorboard'}; view them with: "
              f"tensorboard --logdir {output_dir / 'tensorboard'}"]
    return lines


def baseline_lines(final: Mapping[str, float], teacher: Optional[str], twins: Mapping[str, str]) -> list[str]:
    """Whether distilling beat training alone: each student against its twin (the same initial weights and
    batches, cross-entropy only); without twins, how to get that comparison."""
    out = []
    for student, twin in twins.items():
        ours, alone = final.get(f"{student}/eval/loss"), final.get(f"{twin}/eval/loss")
        if ours is not None and alone is not None:
            verdict = "distilling helped" if ours < alone else "distilling did not help here"
            out.append(f"  {student} against its twin trained alone ({twin}): {ours - alone:+.4f} ({verdict})")
    if not out and teacher is not None:
        out.append("  whether distilling beats training alone on this data: add students.N.twin=true (a copy trained "
                   "on cross-entropy alone, in this run) or run codistill-compare")
    return out


def _cut(text: str, limit: int) -> str:
    """A sample for one log line: escaped (no line breaks) and at most ``limit`` characters."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit - 4] + "...'"
