"""Validation: every model's CE on the validation batches and each student's top-1 agreement with the
teacher, averaged over ranks (a cached or hard-mode teacher has neither: it is not loaded); in a run with an
on-policy student, the teacher's mean log-probability per token of every student's samples of the validation
prompts (how good a student's own text is in the teacher's eyes)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .config import OnPolicyConfig
from .crosstok import start_tokens
from .engines import (Member, forward_hidden, forward_logits, heads_gathered, lm_head, view,
                      whole_for_generation)
from .fused import Head, HeadLogits, fused_linear_losses, fused_rows
from .losses import distill_loss, top1_agreement
from .onpolicy import Sampling, left_padded, prompt_lengths, sample, sample_seed, sampled_batch

Batch = dict[str, torch.Tensor]


class Validator:
    """Evaluates the models on this rank's validation batches (``prepare`` moves one to the device and adds
    its labels), from their logits or, on the fused path, one model's head at a time."""

    def __init__(self, batches: list[Batch], prepare: Callable[[Batch], Batch], vocab: int, fused: bool,
                 chunk_tokens: Optional[int], sampling: Optional[tuple[Sampling, OnPolicyConfig]] = None,
                 shown: Optional["Shown"] = None):
        """``sampling``: how every student's samples are scored (a run with an on-policy student), or None;
        ``shown``: the prompts every model continues at each evaluation for the log, or None."""
        self.batches, self.prepare, self.vocab, self.fused, self.chunk_tokens = (
            batches, prepare, vocab, fused, chunk_tokens)
        self.sampling, self.shown = sampling, shown

    @torch.no_grad()
    def __call__(self, members: list[Member], teacher: Optional[Member], students: list[Member]) -> dict[str, float]:
        for m in members:
            m.engine.eval()
        keys = [f"{m.name}/eval/loss" for m in members]
        teacher = teacher if teacher is not None and teacher.vocab is None else None  # top-1 ids of one vocabulary
        if teacher is not None:
            keys += [f"{s.name}/eval/agreement" for s in students] + [f"{teacher.name}/eval/top1_share"]
        sums = torch.zeros(len(keys), dtype=torch.float64)
        counts = torch.zeros(len(members) + 1, dtype=torch.float64)  # tokens: each model's own, then the run's
        for raw in self.batches:
            batch = self.prepare(raw)
            counts[-1] += int(batch["mask"].sum())
            top1 = {}
            for i, m in enumerate(members):  # one model's logits (or none, fused) at a time
                ce, top1[m.name] = self.model(m, batch)
                own = int(view(m, batch)["mask"].sum())
                counts[i] += own
                sums[i] += ce * own
            if teacher is not None:
                for j, student in enumerate(students):
                    sums[len(members) + j] += top1_agreement(top1[student.name], top1[teacher.name], batch["mask"])
                # how much of the agreement one token can explain: the teacher's most common top-1 token's share
                picked = top1[teacher.name][batch["mask"]]
                sums[len(members) + len(students)] += int(picked.bincount().max()) if picked.numel() else 0
        scored = self.scores(teacher, students) if teacher is not None and self.sampling is not None else {}
        for m in members:
            if m.trainable:
                m.engine.train()
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(counts)
        out = {key: float(sums[i] / counts[i if i < len(members) else -1]) for i, key in enumerate(keys)}
        for i, m in enumerate(members):  # another tokenizer: its CE per own token, and per token of the run's
            if m.vocab is not None:
                out[f"{m.name}/eval/loss_aligned"] = float(sums[i] / counts[-1])
        return {**out, **scored}

    def scores(self, teacher: Member, students: list[Member]) -> dict[str, float]:
        """Each student's continuations of the validation prompts (the on-policy settings; the same generator
        seeds at every evaluation and for every student, so equal students write alike), scored by the teacher:
        its mean log-probability per sampled token."""
        s, cfg = self.sampling
        sums = torch.zeros(2 * len(students), dtype=torch.float64)  # per student: log-probability, tokens
        for b, raw in enumerate(self.batches):
            batch = self.prepare(raw)
            lengths = prompt_lengths(batch, None if s.prompted and cfg.prompts != "prefix" else cfg.prefix_tokens)
            ids, attention = left_padded(batch["input_ids"], lengths, s.pad_id)
            for j, student in enumerate(students):
                generator = torch.Generator(device=ids.device)
                generator.manual_seed(sample_seed(s.seed, s.rank, -1, b, "evaluation"))  # alike for every student
                with whole_for_generation(student) as module:
                    tokens, made = sample(module, ids, attention, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                          s.stops, s.pad_id, self.vocab, generator)
                sampled = sampled_batch(batch["input_ids"], lengths, tokens, made, s.pad_id)
                ce = distill_loss(forward_logits(teacher, sampled, self.vocab), sampled["labels"], sampled["mask"]).ce
                n = int(sampled["mask"].sum())
                sums[2 * j] -= float(ce) * n
                sums[2 * j + 1] += n
        torch.distributed.all_reduce(sums)
        return {f"{student.name}/eval/teacher_logp": float(sums[2 * j] / sums[2 * j + 1].clamp(min=1))
                for j, student in enumerate(students)}

    @torch.no_grad()
    def continuations(self, members: list[Member]) -> list[tuple[str, str, str]]:
        """(model, prompt, its greedy continuation) for every model and shown prompt: the same prompts at every
        evaluation, so a model's samples read as its progress (collective under ZeRO-3: every rank calls)."""
        if self.shown is None:
            return []
        out = []
        for m in members:  # each in its own tokenizer
            show = self.shown.sides[m.side] if m.side else self.shown
            ids, attention = left_padded(show.ids, show.lengths, show.pad_id)
            m.engine.eval()
            with whole_for_generation(m) as module:
                device = next(module.parameters()).device
                tokens, made = sample(module, ids.to(device), attention.to(device), show.max_new_tokens, 0.0, 1.0,
                                      show.stops, show.pad_id, m.vocab or self.vocab, torch.Generator())
            if m.trainable:
                m.engine.train()
            for i, text in enumerate(show.texts):
                out.append((m.name, text, show.decode(tokens[i, :int(made[i])].tolist())))
        return out

    def model(self, member: Member, batch: Batch) -> tuple[float, torch.Tensor]:
        """One model's CE on a validation batch (as it reads it: :func:`view`) and its most likely token per
        position [B, S]."""
        batch = view(member, batch)
        if not self.fused:
            logits = forward_logits(member, batch, self.vocab)
            return distill_loss(logits, batch["labels"], batch["mask"]).ce.item(), logits.argmax(dim=-1)
        hidden = forward_hidden(member, batch)
        with heads_gathered(member):
            head = Head(hidden, *lm_head(member))
            ce = fused_linear_losses(head, [], batch["labels"], batch["mask"], self.vocab, self.chunk_tokens)[0].ce.item()
            logits = HeadLogits(head, self.vocab).reshape(-1, self.vocab)
            rows = fused_rows(self.vocab, self.chunk_tokens)
            top = torch.cat([logits[i:i + rows].argmax(dim=-1) for i in range(0, logits.shape[0], rows)])
        return ce, top.view(batch["mask"].shape)


PROMPT_TOKENS = 16  # a shown prompt cut from a validation block: its first tokens


@dataclass
class Shown:
    """The prompts every model continues at each evaluation (train.samples), as token ids right-padded."""

    ids: torch.Tensor  # [N, P]
    lengths: torch.Tensor  # [N]
    texts: list[str]
    max_new_tokens: int
    stops: tuple[int, ...]
    pad_id: int
    decode: Callable[[list[int]], str]
    sides: dict[str, "Shown"] = field(default_factory=dict)  # the same prompts in each other tokenizer, by the
    # prefix of the columns its models read (engines.view: a teacher's own, a student's own)

    @classmethod
    def of(cls, cfg, tokenizer, batches: list[Batch], sampling: Sampling,
           own: Optional[dict[str, Any]] = None) -> Optional["Shown"]:
        """``train.sample_prompts``, else the first tokens of this rank's first validation rows; None without
        ``train.samples``. ``own``: other tokenizers by the prefix of their side (the prompts' text retokenized)."""
        count = cfg.train.samples
        if count == 0:
            return None
        if cfg.train.sample_prompts:
            start = start_tokens(tokenizer)  # as every document of the data begins
            rows = [(start + tokenizer(p, add_special_tokens=False)["input_ids"])[-cfg.data.seq_len:]
                    or [sampling.pad_id] for p in cfg.train.sample_prompts[:count]]
        else:
            rows = [r[:PROMPT_TOKENS].tolist() for b in batches for r in b["input_ids"]][:count]
        def decode(t: list[int]) -> str:
            return tokenizer.decode(t, skip_special_tokens=True)
        shown = cls(*_right_padded(rows, sampling.pad_id), [decode(r) for r in rows], cfg.train.sample_tokens,
                    sampling.stops, sampling.pad_id, decode)
        shown.sides = {side: shown.retokenized(tok) for side, tok in (own or {}).items()}
        return shown

    def retokenized(self, tokenizer) -> "Shown":
        """The same prompts' text in another tokenizer (opened by its start tokens), ending at its end-of-text."""
        start, eos = start_tokens(tokenizer), tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        rows = [start + tokenizer(text, add_special_tokens=False)["input_ids"] or [pad] for text in self.texts]
        return Shown(*_right_padded(rows, pad), self.texts, self.max_new_tokens, (eos,), pad,
                     lambda t: tokenizer.decode(t, skip_special_tokens=True))


def _right_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows as one tensor [N, longest] right-padded with ``pad``, and each row's length [N]."""
    ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids, torch.tensor([len(r) for r in rows])
