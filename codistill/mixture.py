"""The target of a model that learns from several others: the average of their predictions, in
probability space, at the learner's temperature.

A model's soft term is ``T²·D(P_sources ‖ P_self)`` with ``P_sources = mean_j softmax(z_j / T)``.
:class:`Mixture` hands that average to the loss as logits, ``T·log P_sources`` (whose softmax at
T is the average), made a slice of positions at a time when read, so no [N × V] tensor beyond
the sources' own logits exists: the loss, top-k targets and the diagnostics read row slices, as
they read :class:`codistill.fused.HeadLogits`. One source is its own target (no mixture).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch

from .losses import Targets, topk_targets


def mix(chunks: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """``T·log mean_j softmax(z_j / T)`` of rows of logits [n, V] (fp32)."""
    logp = torch.stack([torch.log_softmax(z.float() / temperature, dim=-1) for z in chunks])
    return (torch.logsumexp(logp, dim=0) - math.log(len(chunks))).mul_(temperature)


def mixture_ce(token_ces: Sequence[torch.Tensor]) -> torch.Tensor:
    """The per-position CE (T = 1) of the average of the sources' distributions, from each source's own
    per-position CE: ``−log mean_j exp(−ce_j)``."""
    stacked = torch.stack([ce.float() for ce in token_ces])
    return -(torch.logsumexp(-stacked, dim=0) - math.log(len(token_ces)))


def position_ce(logits, labels: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-position CE [N] of logits ([..., V] or a row-sliceable stand-in) against ``labels`` [N], ``rows``
    positions at a time (a source whose own loss is not computed yet, in a cycle of models)."""
    flat = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    out = torch.empty(labels.shape[0], dtype=torch.float32, device=labels.device)
    for i in range(0, labels.shape[0], rows):
        z = flat[i:i + rows].float()
        out[i:i + rows] = torch.logsumexp(z, dim=-1) - z.gather(1, labels[i:i + rows].unsqueeze(1)).squeeze(1)
    return out


class Mixture:
    """The average of several sources' predictions at ``temperature``, as logits ``T·log P`` read by row
    slices of its [N, V] view (each source: a detached [..., V] tensor or a row-sliceable stand-in)."""

    def __init__(self, sources: Sequence, temperature: float, shape: Optional[tuple[int, ...]] = None):
        if len(sources) < 2:
            raise ValueError("a mixture needs two or more sources (one source is its own target)")
        self.sources, self.temperature = list(sources), temperature
        first = self.sources[0]
        self.shape = torch.Size(shape or tuple(first.shape))
        self.device = first.device

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def detach(self) -> "Mixture":
        return self

    def reshape(self, *shape: int) -> "Mixture":
        vocab = self.shape[-1]
        if shape != (-1, vocab):
            raise ValueError(f"Mixture: only the [N, V] view is available, not {shape}")
        flat = [s.reshape(-1, vocab) for s in self.sources]
        return Mixture(flat, self.temperature, (flat[0].shape[0], vocab))

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice) or len(self.shape) != 2:
            raise TypeError("Mixture: read a slice of positions of the [N, V] view")
        with torch.no_grad():
            return mix([s[rows] for s in self.sources], self.temperature)


def source_targets(logits: Sequence, known: Sequence[Optional[tuple]], labels: torch.Tensor, top_k: Optional[int],
                   temperature: float, token_filter: bool, rows: int, average: Callable,
                   chunk_tokens: Optional[int] = None) -> Targets:
    """A learner's targets from its sources' logits (tensors or row-sliceable stand-ins, by source): one
    source's own, or ``average(logits, T)`` of several; ``known`` holds each source's (CE per position,
    logsumexp) once its own loss is computed (else None: its CE is computed here, ``rows`` positions at a time,
    when the token filter needs it). Full targets or top-``k``."""
    if len(logits) == 1:
        target = logits[0]
        token_ce, lse = known[0] or (None, None)
        if token_ce is None and token_filter:
            token_ce = position_ce(target, labels, rows)
    else:
        target, lse = average(logits, temperature), None
        token_ce = None if not token_filter else mixture_ce(
            [k[0] if k is not None else position_ce(z, labels, rows) for z, k in zip(logits, known)])
    if top_k is None:
        return Targets(temperature=temperature, logits=target, lse=lse, token_ce=token_ce)
    return replace(topk_targets(target, top_k, temperature, chunk_tokens), token_ce=token_ce)
