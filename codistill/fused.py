"""The fused-linear distillation losses: every model's loss from its final hidden states and
LM head, chunk by chunk over positions, so that no model's [N × V] logits exist at once.

Per chunk of positions the teacher's logits are computed once (``h_t·W_tᵀ + b_t``, in the
model's dtype, then fp32), give its own CE (and its gradient, when it trains) and every
student's soft targets (its full distribution or top-k + tail, at the student's T); each
student's chunk of logits gives its ``(1 − α)·CE + α·T²·D`` and the gradient with respect
to those logits, which is turned into the gradients of its hidden states and head weight
(and bias) at once and dropped. The loss math is :mod:`codistill.losses`' own (the same
kernel runs on each chunk), so every divergence, T, top-k, mask, prompt mask and per-token
filter is exact where that path is: the two agree to fp32 rounding.

Each model's loss is returned as a tensor whose backward hands over the gradients computed
in the pass (the graph of one model reaches only its own hidden states and head), so each
engine back-propagates its own loss as before. The head's gradient is accumulated in fp32
and handed over in the weight's dtype. Rows of the head past ``vocab`` (an embedding padded
past the tokenizer) are never used: their gradient is 0.

Memory: per chunk, the teacher's fp32 logits and one student's at a time with their
gradients (rows × V × 4 bytes each), plus per model an fp32 head-gradient accumulator (the
head's size) and the hidden states' gradient; never N × V.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .losses import ChunkLoss, LossParts, SoftSpec, Targets, loss_and_grad
from .mixture import mix, source_targets

# distill.fused_linear=auto is on from this vocabulary up: below it the logits are not a step's largest
# activations (tools/bench_step.py: the fused step takes about as long as the plain one on CPU).
FUSED_AUTO_VOCAB = 32768

# Positions per chunk by default: about this many fp32 logits per chunk (32 MB; the GEMMs want
# tens of rows or more, the softmax work inside runs on the loss's own cache-sized sub-chunks).
FUSED_ELEMENTS = 1 << 23
# ... and at least this many positions: each chunk reads every head and adds into each head's fp32
# gradient, so a chunk of few rows streams [V, H] tensors for little work (measured on CPU at
# 1024 x 2048 x 128,256: 64 rows per chunk 1.5x the time of 1024, 256 rows within 10% of it).
FUSED_MIN_ROWS = 256


@dataclass
class Head:
    """One model's side: its final hidden states and its LM head (``logits = hidden·weightᵀ + bias``)."""

    hidden: torch.Tensor  # [..., H]; requires grad when the model trains
    weight: torch.Tensor  # [V_emb, H], V_emb ≥ the vocabulary (padding rows unused)
    bias: Optional[torch.Tensor] = None  # [V_emb]

    @property
    def trains(self) -> bool:
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                               for t in (self.hidden, self.weight, self.bias))


@dataclass
class StudentTerm:
    """A student's head and its soft term: divergence, α and the token filter (``spec``) at ``temperature``,
    against the teacher's full distribution (``top_k`` None) or its top-k + tail."""

    head: Head
    spec: SoftSpec
    temperature: float = 1.0
    top_k: Optional[int] = None


def static_problem(mode: str, cached_teacher: bool) -> Optional[str]:
    """Why the fused path cannot serve a run, from its config alone (None: it can, if every head is linear)."""
    if mode == "hard" or cached_teacher:
        return "it needs a live teacher (mode codistill, or soft without teacher.cache)"
    return None


def auto_problem(zero_stages: list[int]) -> Optional[str]:
    """Why ``fused_linear: auto`` leaves the path off for models at these ZeRO stages (None: auto may take it).
    At ZeRO-3 the mid-size pair measured a higher peak with it, not the lower one the estimate expects
    (docs/results.md, section 3); ``true`` still takes it there."""
    if 3 in zero_stages:
        return ("at ZeRO-3 the measured peak was higher with them (docs/results.md, section 3); "
                "distill.fused_linear=true takes them anyway")
    return None


def fused_rows(vocab: int, chunk_tokens: Optional[int] = None) -> int:
    """Positions per chunk: ``chunk_tokens`` if given, else about FUSED_ELEMENTS logits and at least
    FUSED_MIN_ROWS positions."""
    return chunk_tokens or max(FUSED_MIN_ROWS, FUSED_ELEMENTS // vocab)


class _Grads:
    """One model's gradients, filled chunk by chunk: hidden states in their dtype, the head in fp32."""

    def __init__(self, head: Head, n_pos: int, vocab: int):
        self.head, self.vocab = head, vocab
        h, w = head.hidden, head.weight
        self.hidden = torch.zeros(n_pos, h.shape[-1], dtype=h.dtype, device=h.device) if h.requires_grad else None
        self.weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if w.requires_grad else None
        self.bias = (torch.zeros(head.bias.shape, dtype=torch.float32, device=head.bias.device)
                     if head.bias is not None and head.bias.requires_grad else None)
        self.partial = None  # a reused [V, H] buffer for half-precision heads (their GEMM's output dtype)

    def add(self, rows: slice, hidden: torch.Tensor, grad_logits: torch.Tensor) -> None:
        """Fold one chunk's gradient with respect to its logits [n, V] (fp32) into the model's."""
        w = self.head.weight[:self.vocab]
        g = grad_logits.to(w.dtype)
        if self.hidden is not None:
            torch.mm(g, w, out=self.hidden[rows])
        if self.weight is not None:
            if w.dtype == torch.float32:
                self.weight[:self.vocab].addmm_(g.t(), hidden)
            else:
                if self.partial is None:
                    self.partial = torch.empty(w.shape, dtype=w.dtype, device=w.device)
                self.weight[:self.vocab].add_(torch.mm(g.t(), hidden, out=self.partial))
        if self.bias is not None:
            self.bias[:self.vocab].add_(grad_logits.sum(0))

    def handed_over(self) -> tuple[Optional[torch.Tensor], ...]:
        head = self.head
        return (None if self.hidden is None else self.hidden.view(head.hidden.shape),
                None if self.weight is None else self.weight.to(head.weight.dtype),
                None if self.bias is None else self.bias.to(head.bias.dtype))


def _logits(head: Head, hidden: torch.Tensor, vocab: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One chunk's logits [n, V] over the real vocabulary, in fp32 (the GEMM in the model's dtype); written
    into ``out`` ([≥ n, V] fp32, reused chunk after chunk) when given and the model is fp32."""
    w, bias = head.weight[:vocab], None if head.bias is None else head.bias[:vocab]
    direct = out is not None and w.dtype == hidden.dtype == torch.float32  # the GEMM writes into ``out`` itself
    target = out[:hidden.shape[0]] if direct else None
    z = torch.mm(hidden, w.t(), out=target) if bias is None else torch.addmm(bias, hidden, w.t(), out=target)
    if direct:
        return z
    return z.float() if out is None else out[:hidden.shape[0]].copy_(z)


class _Handover(torch.autograd.Function):
    """A loss whose gradients were computed with its value: backward hands them over, scaled."""

    @staticmethod
    def forward(ctx, value, grads, hidden, weight, bias):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("a fused-linear loss was back-propagated twice; its gradient is handed over once")
        scale = grad_loss.item()
        if scale != 1.0:
            grads = tuple(None if g is None else g.mul_(scale) for g in grads)
        return (None, None, *grads)


class _Sums:
    """One model's loss over the pass, folded in chunk by chunk."""

    def __init__(self, n_pos: int, device: torch.device):
        zero = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        self.loss, self.ce, self.kd, self.used = zero(), zero(), zero(), zero()
        self.token_ce = torch.zeros(n_pos, dtype=torch.float32, device=device)
        self.lse = torch.zeros(n_pos, dtype=torch.float32, device=device)

    def fold(self, rows: slice, chunk: ChunkLoss, chunk_weight: torch.Tensor) -> None:
        self.loss += chunk.loss.double()
        self.ce += chunk.ce.double()
        self.kd += chunk.kd.double()
        self.used += chunk.filtered.double() * chunk_weight
        self.token_ce[rows] = chunk.token_ce
        self.lse[rows] = chunk.lse

    def parts(self, head: Head, grads: Optional[_Grads], total: torch.Tensor, soft: bool) -> LossParts:
        value = self.loss.float()
        if grads is not None:
            value = _Handover.apply(value, grads.handed_over(), head.hidden, head.weight, head.bias)
        share = (self.used / total).float() if soft and total > 0 else torch.ones((), device=value.device)
        return LossParts(value, self.ce.float(), self.kd.float(), self.token_ce, share, self.lse)


@dataclass
class Term:
    """A model's soft term in a pass over several heads: the heads it learns from (by position in the pass,
    their predictions averaged at ``temperature``), its divergence, α and token filter (``spec``), and full
    targets (``top_k`` None) or top-k + tail."""

    sources: list[int]
    spec: SoftSpec
    temperature: float = 1.0
    top_k: Optional[int] = None


def _check_heads(heads: list[Head], n_pos: int, vocab: int) -> None:
    for i, head in enumerate(heads):
        if head.hidden.numel() != n_pos * head.hidden.shape[-1]:
            raise ValueError(f"head {i}: hidden states {tuple(head.hidden.shape)} do not hold {n_pos} positions")
        if head.weight.shape[0] < vocab or head.weight.shape[1] != head.hidden.shape[-1]:
            raise ValueError(f"head {i}: head weight {tuple(head.weight.shape)} does not map hidden size "
                             f"{head.hidden.shape[-1]} to at least {vocab} tokens")


def _chunk_targets(term: Term, z: dict[int, torch.Tensor], done: dict[int, ChunkLoss], labels: torch.Tensor,
                   made: dict) -> Targets:
    """A term's targets on one chunk: its one source's logits (with that source's CE per position and
    logsumexp, when its loss on the chunk is known) or the average of several; shared by (sources, top-k, T,
    token filter)."""
    key = (tuple(term.sources), term.top_k, term.temperature, term.spec.token_filter)
    if key not in made:
        made[key] = source_targets([z[j] for j in term.sources],
                                   [(done[j].token_ce, done[j].lse) if j in done else None for j in term.sources],
                                   labels, term.top_k, term.temperature, term.spec.token_filter,
                                   z[term.sources[0]].shape[0], mix)
    return made[key]


def fused_losses(heads: list[Head], terms: list[Optional[Term]], labels: torch.Tensor, mask: torch.Tensor,
                 vocab: int, chunk_tokens: Optional[int] = None) -> list[LossParts]:
    """Every model's loss as :func:`codistill.losses.distill_loss` gives it from logits, without any model's
    [N × V] logits: CE alone where a term is None, else the blended objective against its sources' predictions
    (one source's logits, or the average of several; their per-position CE for the token filter).

    Args:
        heads: every model's hidden states and head. A head whose hidden states, weight or bias require grad
            gets its gradients.
        terms: per head, its soft term (None: CE alone); sources are positions in ``heads``.
        labels, mask: [B, S] / [N] as for ``distill_loss`` (from ``next_token_targets``).
        vocab: the tokenizer's vocabulary (≤ every head's rows).
        chunk_tokens: positions per chunk (default: :func:`fused_rows`).

    Per chunk each source's logits are computed once, before any loss (every target comes from the same
    chunk of logits), and read by every model that learns from it.
    """
    flat_mask = mask.reshape(-1)
    labels = labels.reshape(-1)
    n_pos = flat_mask.shape[0]
    _check_heads(heads, n_pos, vocab)
    weights = flat_mask.float() / flat_mask.sum().clamp(min=1)
    device = heads[0].hidden.device
    flat = [h.hidden.reshape(n_pos, -1).detach() for h in heads]
    grads = [_Grads(h, n_pos, vocab) if h.trains else None for h in heads]
    sums = [_Sums(n_pos, device) for _ in heads]
    sources = sorted({j for t in terms if t is not None for j in t.sources})
    step = min(n_pos, fused_rows(vocab, chunk_tokens)) if n_pos else 1
    # [rows, V] fp32 buffers for the whole pass, reused chunk after chunk: each source's logits (read by every
    # model that learns from it), one for the other models' logits, and the gradient of whichever model's loss
    # is being folded in (used up at once). Fresh ones each chunk would cost page faults on CPU as large as
    # the work they hold.
    buffer = lambda: torch.empty(step, vocab, dtype=torch.float32, device=device)  # noqa: E731
    source_z = {j: buffer() for j in sources}
    other_z = buffer() if len(sources) < len(heads) else None
    grad_z = buffer() if any(g is not None for g in grads) else None

    with torch.no_grad():
        for i in range(0, n_pos, step):
            rows = slice(i, min(n_pos, i + step))
            z = {j: _logits(heads[j], flat[j][rows], vocab, source_z[j]) for j in sources}
            done: dict[int, ChunkLoss] = {}
            made: dict = {}
            for j, term in enumerate(terms):
                z_j = z[j] if j in z else _logits(heads[j], flat[j][rows], vocab, other_z)
                targets = None if term is None else _chunk_targets(term, z, done, labels[rows], made)
                spec = SoftSpec() if term is None else term.spec
                out = loss_and_grad(z_j, labels[rows], weights[rows], targets, spec, None, grads[j] is not None,
                                    grad_z)
                sums[j].fold(rows, out, weights[rows].sum(dtype=torch.float64))
                if grads[j] is not None:
                    grads[j].add(rows, flat[j][rows], out.grad)
                done[j] = out._replace(grad=None)
            del z, done, made
    total = weights.sum(dtype=torch.float64)
    return [acc.parts(head, g, total, soft=t is not None) for acc, head, g, t in zip(sums, heads, grads, terms)]


def fused_linear_losses(teacher: Head, students: list[StudentTerm], labels: torch.Tensor, mask: torch.Tensor,
                        vocab: int, chunk_tokens: Optional[int] = None) -> tuple[LossParts, list[LossParts]]:
    """The teacher's CE and every student's blended objective against it (:func:`fused_losses` with every
    student's one source the teacher); returns the teacher's ``LossParts`` and each student's."""
    terms = [None, *(Term([0], s.spec, s.temperature, s.top_k) for s in students)]
    parts = fused_losses([teacher, *(s.head for s in students)], terms, labels, mask, vocab, chunk_tokens)
    return parts[0], parts[1:]


class HeadLogits:
    """A model's logits ``hidden·Wᵀ + b`` over the vocabulary, made a slice of positions at a time when read:
    stands in for a detached [..., V] logits tensor where only row slices of its [N, V] view are read
    (:func:`codistill.losses.panel_stats`, :func:`topk_targets`, ``Targets.logits``), so diagnostics and
    top-k targets of the fused path never hold N × V either. A slice is fp32."""

    def __init__(self, head: Head, vocab: int, shape: Optional[tuple[int, ...]] = None):
        self.vocab = vocab
        self.head = Head(head.hidden.detach(), head.weight.detach(), None if head.bias is None else head.bias.detach())
        self.flat = self.head.hidden.reshape(-1, head.hidden.shape[-1])
        self.shape = torch.Size(shape or (*head.hidden.shape[:-1], vocab))
        self.device = head.hidden.device

    def dim(self) -> int:
        return len(self.shape)

    def detach(self) -> "HeadLogits":
        return self

    def reshape(self, *shape: int) -> "HeadLogits":
        if shape != (-1, self.vocab):
            raise ValueError(f"HeadLogits: only the [N, V] view is available, not {shape}")
        return HeadLogits(self.head, self.vocab, (self.flat.shape[0], self.vocab))

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice):
            raise TypeError("HeadLogits: read a slice of positions")
        with torch.no_grad():
            return _logits(self.head, self.flat[rows], self.vocab)
