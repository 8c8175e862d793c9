"""On-policy distillation (Agarwal et al., "On-Policy Distillation of Language Models", ICLR 2024): a student
learns on continuations it samples itself, scored by the teacher.

On a share ``distill.on_policy.fraction`` of its optimizer steps (drawn from ``train.seed`` and the step: the
same on every rank, and again after a resume) a student's loss on every micro-batch of the step gains a term
on its own text, beside its usual loss on the micro-batch's text (it never sees less of the data):

1. prompts cut from the micro-batch: each row's prompt (instruction or chat data, rendered as the training data
   is) or its first ``prefix_tokens`` tokens. Ranks hold different rows, so they sample different prompts;
2. its continuations of them, up to ``max_new_tokens`` each (a sample ends at its first stop token), sampled
   with a KV cache at ``temperature`` and ``top_p`` from a generator seeded by (seed, rank, step, micro-batch,
   student): a resumed run samples what the uninterrupted one would have;
3. the teacher's predictions on the sampled sequences, from one forward without gradient (a co-distilled
   teacher keeps training on the ground-truth micro-batch; a frozen one only scores);
4. the term ``weight·T²·D(P_teacher ‖ P_student)`` on the generated positions only (default reverse KL; the
   student's temperature and full or top-k targets), with no cross-entropy on its own text, added to the
   student's loss on the text before its one backward of the micro-batch.

The pure parts are here (the draw, prompts, sampling, the sampled batch); the step (codistill/step.py) runs them.
"""
from __future__ import annotations

import hashlib
import inspect
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .losses import LossParts, SoftSpec, chunk_rows, distill_loss, next_token_targets
from .mixture import mix, source_targets


@dataclass(frozen=True)
class Sampling:
    """What every on-policy learner of a run samples with."""

    seed: int  # train.seed
    rank: int
    stops: tuple[int, ...]  # token ids that end a sample (eos; a chat template's end of turn)
    pad_id: int
    prompted: bool  # the data has prompts (data.prompt_field / messages_field)

    @classmethod
    def of(cls, cfg, tokenizer, rank: int) -> "Sampling":
        """A run's (``cfg``: its RunConfig): a sample stops at eos, and in chat data at the template's end of
        turn (a tokenizer without either samples ``max_new_tokens`` every time); padding is the tokenizer's pad
        token, else eos, else 0 (padding is masked out)."""
        from .data import stop_ids

        stops = stop_ids(tokenizer)[0] if cfg.data.messages_field else [tokenizer.eos_token_id]
        pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        return cls(cfg.train.seed, rank, tuple(t for t in stops if t is not None), pad,
                   bool(cfg.data.prompt_field or cfg.data.messages_field))

    def scoring(self, learners: list) -> Optional[tuple["Sampling", object]]:
        """What evaluation samples every student with (``learners``: the run's (spec, distill, sources)): these
        settings and the first on-policy learner's, or None when no learner is on-policy."""
        on_policy = next((d.on_policy for _, d, _ in learners if d.on_policy is not None), None)
        return None if on_policy is None else (self, on_policy)


def drawn(seed: int, step: int, learner: str, fraction: float) -> bool:
    """Whether learner ``learner`` is on-policy at optimizer step ``step``: a draw from (seed, step, learner),
    identical on every rank and in every run."""
    return fraction > 0 and random.Random(f"on-policy:{seed}:{step}:{learner}").random() < fraction


def sample_seed(seed: int, rank: int, step: int, micro: int, learner: str) -> int:
    """The sampling generator's seed for one micro-batch of one learner on one rank."""
    digest = hashlib.sha256(f"sample:{seed}:{rank}:{step}:{micro}:{learner}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def prompt_lengths(batch: dict[str, torch.Tensor], prefix_tokens: Optional[int]) -> torch.Tensor:
    """Tokens of each row [B] that make its prompt: its first ``prefix_tokens`` (at most its real length less
    one), or with ``prefix_tokens`` None the tokens before its first counted one (``loss_mask``: a prompt/
    response row, unpacked). At least one token each."""
    real = batch["attention_mask"].sum(-1)
    if prefix_tokens is not None:
        lengths = torch.clamp(real - 1, max=prefix_tokens)
    else:
        counted = batch["loss_mask"].bool() & batch["attention_mask"].bool()
        first = torch.where(counted.any(-1), counted.int().argmax(-1), real - 1)
        lengths = torch.minimum(first, real - 1)
    return lengths.clamp(min=1)


def left_padded(input_ids: torch.Tensor, lengths: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's first ``lengths[i]`` tokens, right-aligned in [B, max length] (``pad_id`` before them), and
    their attention mask: the layout a batched generation continues from."""
    width = int(lengths.max())
    ids = torch.full((input_ids.shape[0], width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    attention = torch.zeros_like(ids)
    for i, n in enumerate(lengths.tolist()):
        ids[i, width - n:] = input_ids[i, :n]
        attention[i, width - n:] = 1
    return ids, attention


def pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row [B] from logits [B, V]: softmax at ``temperature``, the nucleus of mass ``top_p``;
    temperature 0: the most likely token."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # the most likely token is always kept
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample(module: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor, max_new_tokens: int,
           temperature: float, top_p: float, stops: Sequence[int], pad_id: int, vocab: int,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue left-padded prompts ``ids`` [B, P] with a KV cache; returns the sampled tokens [B, G]
    (``pad_id`` after a row's stop token) and each row's length [B] (its stop token included). Stops when
    every row has stopped or after ``max_new_tokens``."""
    key = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"  # transformers 5
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = module(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True)
    cache, logits, position = getattr(out, key), out.logits[:, -1, :vocab], positions[:, -1:]
    stop = torch.tensor(list(stops), dtype=ids.dtype, device=ids.device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    lengths = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    tokens = []
    for _ in range(max_new_tokens):
        token = torch.where(done, torch.full_like(done, pad_id, dtype=ids.dtype),
                            pick(logits, temperature, top_p, generator).to(ids.dtype))
        tokens.append(token)
        lengths += (~done).long()
        done |= torch.isin(token, stop)
        if bool(done.all()) or len(tokens) == max_new_tokens:
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
        position = position + 1
        out = module(input_ids=token[:, None], attention_mask=attention, position_ids=position, use_cache=True,
                     **{key: cache})
        cache, logits = getattr(out, key), out.logits[:, -1, :vocab]
    return torch.stack(tokens, dim=1), lengths


def sampled_batch(input_ids: torch.Tensor, prompt_lengths: torch.Tensor, tokens: torch.Tensor,
                  lengths: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """The training micro-batch of one learner's samples: row ``i`` is its prompt (``input_ids[i, :p_i]``) then
    its ``lengths[i]`` sampled tokens, right-padded; ``labels``/``mask`` (as ``next_token_targets`` makes them)
    count the sampled tokens only."""
    width = int((prompt_lengths + lengths).max())
    ids = torch.full((input_ids.shape[0], width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    attention, counted = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, g) in enumerate(zip(prompt_lengths.tolist(), lengths.tolist())):
        ids[i, :p], ids[i, p:p + g] = input_ids[i, :p], tokens[i, :g]
        attention[i, :p + g], counted[i, p:p + g] = 1, 1
    labels, mask = next_token_targets(ids, attention, counted)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels, "mask": mask}


def rates(values: dict[str, float], names: Sequence[str], elapsed: float, batches: int) -> dict[str, float]:
    """Each on-policy learner's generation speed from a step's rank-averaged values (per micro-batch means over
    ``batches`` micro-batches; ``elapsed``: the step's seconds): tokens/s and the share of the step spent
    sampling, in place of the raw token counts and seconds."""
    out = {}
    for name in names:
        tokens, seconds = values.pop(f"{name}/on_policy/tokens", None), values.pop(f"{name}/on_policy/seconds", None)
        if tokens is not None and seconds:
            out[f"{name}/on_policy/tokens_per_s"] = tokens / seconds
            out[f"{name}/on_policy/generate_share"] = min(1.0, seconds * batches / elapsed) if elapsed > 0 else 0.0
    return out


def on_policy_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                   mask: torch.Tensor, spec: SoftSpec, temperature: float, top_k: Optional[int],
                   chunk_tokens: Optional[int] = None) -> tuple[LossParts, LossParts]:
    """The student's loss on its own samples: ``T²·D(P_teacher ‖ P_student)`` (``spec``'s divergence and β) at the
    positions ``mask`` counts (the sampled tokens), against the teacher's full logits or its top-``k``; no CE.

    Args:
        student_logits, teacher_logits: [B, S, V] on the sampled batch (the teacher's detached).
        labels, mask: [B, S] from :func:`sampled_batch`.
    Returns the student's parts (``loss`` differentiable) and the teacher's (its CE per sampled token: minus its
    mean log-probability of the student's text)."""
    with torch.no_grad():
        teacher = distill_loss(teacher_logits, labels, mask, chunk_tokens=chunk_tokens)
    targets = source_targets([teacher_logits], [(teacher.token_ce, teacher.lse)], labels, top_k, temperature, False,
                             chunk_rows(teacher_logits.shape[-1], chunk_tokens), mix, chunk_tokens)
    soft = SoftSpec(divergence=spec.divergence, beta=spec.beta, alpha=1.0, token_filter=False)
    return distill_loss(student_logits, labels, mask, targets, soft, chunk_tokens), teacher
