"""What a run shows of itself: the opening description, TensorBoard's chart layout and the per-step
values read from the engines and the students' state. The trainer gathers; this module words and
lays out (writing is :class:`codistill.metrics.Metrics`'s)."""
from __future__ import annotations

import math
import re
from typing import Optional

import torch

from .config import DistillConfig, RunConfig
from .engines import Member
from .errors import NonFinite
from .fused import fused_rows
from .losses import topk_bytes_per_position
from .metrics import Tags, peak_bytes
from .models import count_parameters, local_parameters
from .student import StudentPlan, StudentState


EPOCHS_WARNED = 4  # passes over the training blocks past which a run is told its data repeats


def describe_data(cfg, tokenizer, train_blocks: int, val_blocks: int, tokens_per_step: int) -> list[str]:
    """What the run trains on: the data's blocks and tokens, the tokenizer and where it came from, and how
    many passes over the data ``train.max_steps`` makes (with a warning when the data repeats many times), and
    the teacher's tail."""
    seq, steps = cfg.data.seq_len, cfg.train.max_steps
    epochs = steps * tokens_per_step / max(1, train_blocks * seq)
    lines = [f"data: {cfg.data.dataset}: {train_blocks:,} training blocks of {seq} tokens ({train_blocks * seq:,} "
             f"tokens), {val_blocks:,} validation blocks; tokenizer {getattr(tokenizer, 'name_or_path', '?') or '?'} "
             f"({len(tokenizer):,} tokens); {steps:,} steps make {epochs:.3g} epochs"]
    if epochs > EPOCHS_WARNED:
        lines.append(f"warning: train.max_steps={steps} repeats the training data {epochs:.0f} times: the models will "
                     "learn it by heart (add data, or lower train.max_steps)")
    tail = cfg.train.tail_steps
    if tail:
        lines.append(f"{cfg.teacher.name}: trains {cfg.train.teacher_steps:,} steps, then runs frozen for the last {tail:,} "
                     "(train.tail_steps): the students distil its final weights")
    return lines


def describe_models(members: list[Member], world_size: int) -> list[str]:
    """One line per model: size, ZeRO stage, precision and what each rank stores (collective: every rank calls)."""
    lines = []
    for m in members:
        module = m.engine.module
        local = torch.tensor([local_parameters(module)], dtype=torch.int64)
        gathered = [torch.zeros_like(local) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, local)
        stored = " ".join(f"{int(t):,}" for t in gathered)
        recomputed = m.trainable and m.spec.gradient_checkpointing
        origin = m.about or (f"from {m.spec.pretrained}" if m.spec.pretrained else "random init")
        own = f"; its own tokenizer ({m.vocab:,} tokens), aligned with the run's by characters" if m.vocab else ""
        lines.append(
            f"{m.name}: {count_parameters(module):,} parameters ({origin}), ZeRO stage {m.engine.zero_optimization_stage()}, "
            f"bf16={m.engine.bfloat16_enabled()}{'' if m.trainable else ', frozen'}, "
            f"{m.spec.attn_implementation} attention{', checkpointed' if recomputed else ''}; stored per rank: {stored}{own}"
        )
    return lines


def describe_teacher_source(cfg: RunConfig, cache) -> Optional[str]:
    """Where the students' teacher comes from when it is not loaded (None: a live teacher, or no teacher)."""
    if cfg.teacher is None:
        return None
    if cfg.mode == "hard":
        return f"{cfg.teacher.name}: not loaded; hard mode trains on the text it generated (CE on response tokens)"
    if cache is not None and "teacher_tokenizer" in cache.meta:
        return (f"{cfg.teacher.name}: not loaded; its CE per position over its own tokenization of the same text, "
                f"from the cache {cache.folder}, for chunk likelihoods across tokenizers")
    if cache is not None:
        meta = cache.meta
        return (f"{cfg.teacher.name}: not loaded; top-{meta['k']} predictions at T={meta['temperature']} "
                f"from the cache {cache.folder} ({meta.get('bytes_per_token', 0):.1f} bytes/token)")
    return None


def describe_student(state: StudentState, max_steps: int, heldout_blocks: Optional[int],
                     sources: Optional[list[str]] = None, cross: bool = False) -> str:
    """When and how one learner distils (and from which models, when that is not simply the teacher): its
    schedule, temperature, divergence (``cross``: its method across tokenizers) and benefit gate."""
    d, name = state.distill, state.name
    if sources is not None and not sources:
        return f"{name}: learns from no other model: CE alone"
    start = d.head_start_steps + d.burn_in_steps
    if start >= max_steps or d.alpha_max == 0:
        return (f"{name}: never distils on the text (alpha_max {d.alpha_max}, head start {d.head_start_steps} + "
                f"burn-in {d.burn_in_steps} of {max_steps} steps): CE alone" + describe_on_policy(d))
    gate = "no benefit gate"
    if d.benefit_gate:  # (only then are held-out documents set aside)
        noise = "x lr / peak lr" if d.benefit_length == "lr" else "unweighted"
        source = (f"held-out probe: {heldout_blocks} blocks of training documents set aside"
                  if d.benefit_probe == "heldout" else "probe: the stream's next micro-batch")
        gate = f"benefit gate every {d.benefit_interval} steps ({source}; noise term {noise})"
    whom = f"from {' + '.join(sources)}; " if sources else ""
    return (f"{name}: distils from step {start} of {max_steps} ({whom}head start {d.head_start_steps}, burn-in "
            f"{d.burn_in_steps}); {d.schedule} alpha up to {d.alpha_max}, T={d.temperature}, "
            f"{_cross_method(d) if cross else d.divergence}, {gate}"
            + describe_on_policy(d))


def _cross_method(d: DistillConfig) -> str:
    """How a learner distils across tokenizers, for its description."""
    if d.cross_tokenizer == "likelihood":
        return f"across tokenizers by likelihood (chunk log-likelihoods / {d.likelihood_temperature:g})"
    if d.cross_tokenizer == "sorted":
        return f"across tokenizers by sorted distributions (top {d.top_k} ranks)"
    targets = f"top-{d.top_k}" if d.targets == "topk" else "full"
    how = "spread" if d.cross_tokenizer == "spread" else "projected"
    return f"across tokenizers by {how} distributions ({d.divergence}, {targets})"


def describe_on_policy(d: DistillConfig) -> str:
    """The on-policy part of a learner's description ('' when it has none)."""
    p = d.on_policy
    if p is None:
        return ""
    prompts = {"data": "the data's prompts", "prefix": f"{p.prefix_tokens}-token prefixes",
               "auto": f"the data's prompts, else {p.prefix_tokens}-token prefixes"}[p.prompts]
    return (f"; on its own samples on {p.fraction:.0%} of its steps from step {d.head_start_steps} ({prompts}, up to "
            f"{p.max_new_tokens} new tokens at temperature {p.temperature}, top_p {p.top_p}; {p.divergence} to the "
            "teacher on them)")


def describe_targets(cfg: RunConfig, states: list[StudentState], vocab: int, fused: bool,
                     teacher_half: bool) -> list[str]:
    """What the students' targets hold per micro-batch: nothing of the logits (fused), or top-k against full."""
    positions = cfg.train.micro_batch_size * cfg.data.seq_len
    if fused:
        rows = min(positions, fused_rows(vocab, cfg.distill.chunk_tokens))
        return [f"fused-linear losses: no model's logits; {rows:,} of the {positions:,} positions of a "
                f"micro-batch per chunk of the pass over every head"]
    lines = []
    for state in states:
        if state.top_k is not None:
            k = min(state.top_k, vocab)
            kept, full = positions * topk_bytes_per_position(k), positions * vocab * (2 if teacher_half else 4)
            lines.append(f"{state.name}: top-{k} targets hold {kept / 2**20:.2f} MB per micro-batch instead of "
                         f"{full / 2**20:.2f} MB of full teacher logits ({full / kept:.1f}x less)")
    return lines


def scalars_layout(members: list[Member], teacher: str, states: list[StudentState], mode: str,
                   tags: Tags) -> dict[str, dict[str, list]]:
    """TensorBoard's custom-scalars layout: what a user compares, on one chart each."""
    exact = lambda names: [f"^{re.escape(t)}$" for t in names]  # noqa: E731  (the plugin takes regexes)
    charts = {"validation loss, every model": ["Multiline", exact(f"{m.name}/eval/loss" for m in members)],
              "training loss, every model": ["Multiline", exact(
                  f"{n}/train/loss" for n in dict.fromkeys([*([teacher] if teacher else []),
                                                            *(m.name for m in members), *(s.name for s in states)]))]}
    if mode != "hard":
        for i, state in enumerate(states):
            charts[f"{state.name}: alpha and its sources' lead (running and this step)"] = ["Multiline", exact([
                tags.student("schedule", "alpha", i), tags.student("schedule", "lead", i),
                tags.student("distill", "teacher_lead", i)])]
            if state.benefit is not None:
                charts[f"{state.name}: benefit gate (openness, signal, evidence) and alpha"] = [
                    "Multiline", exact([tags.student("benefit", key, i) for key in ("openness", "signal", "evidence")]
                                       + [tags.student("schedule", "alpha", i)])]
            if state.distill.on_policy is not None:
                charts[f"{state.name}: on its own samples (its loss, the teacher's log-probability of them)"] = [
                    "Multiline", exact([f"{state.name}/on_policy/loss", f"{state.name}/on_policy/teacher_logp"])]
                charts[f"{state.name}: sampling (share of the step, mean length)"] = [
                    "Multiline", exact([f"{state.name}/on_policy/generate_share", f"{state.name}/on_policy/length"])]
    if any(state.distill.on_policy is not None for state in states):
        charts["the teacher's log-probability of each student's samples (validation prompts)"] = [
            "Multiline", exact(f"{m.name}/eval/teacher_logp" for m in members if m.name != teacher)]
    return {"codistill": charts}


def schedule_values(plans: list[StudentPlan], states: list[StudentState], tags: Tags) -> dict[str, float]:
    """Each student's α, T, the teacher's running lead, the benefit gate's factor and the teacher's progress
    (with ``teacher_progress``) at this step."""
    out = {}
    for i, (plan, state) in enumerate(zip(plans, states)):
        out[tags.student("schedule", "alpha", i)] = plan.spec.alpha
        out[tags.student("schedule", "temperature", i)] = plan.temperature
        if state.lead is not None:
            out[tags.student("schedule", "lead", i)] = state.lead
        if plan.openness is not None and plan.active:  # the factor this step's α was given
            out[tags.student("benefit", "openness", i)] = plan.openness
        if plan.progress is not None and plan.active:
            out[tags.student("schedule", "teacher_progress", i)] = plan.progress
    return out


def engine_values(stepped: list[Member], skipped: Optional[dict[str, int]], step: int) -> dict[str, float]:
    """Learning rate, gradient norm (a non-finite one stops the run) and, with ``skipped``, the updates skipped
    so far, of every model that stepped."""
    out = {}
    for member in stepped:
        out[f"{member.name}/train/lr"] = float(member.engine.get_lr()[0])
        norm = member.engine.get_global_grad_norm()
        out[f"{member.name}/train/grad_norm"] = float(norm) if norm is not None else float("nan")
        if norm is not None and not math.isfinite(float(norm)):
            raise NonFinite(f"non-finite gradient norm of {member.name} at step {step + 1}; its update "
                            "is already applied", save=False)
        if skipped is not None:
            out[f"{member.name}/train/skipped_steps"] = float(skipped[member.name])
    return out


def perf_values(elapsed: float, tokens: float) -> dict[str, float]:
    """Throughput of the slowest rank over the step's ``tokens`` (every rank's, padding not counted), and the
    largest rank's peak memory so far (GPU: allocated; CPU: RSS)."""
    t = torch.tensor([elapsed, float(peak_bytes())], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    slowest, peak = t.tolist()
    return {"perf/tokens": tokens, "perf/tokens_per_sec": tokens / slowest, "perf/peak_memory_gb": peak / 2**30}
