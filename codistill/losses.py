"""Losses for co-distillation. Pure tensor functions, no state.

Shapes: ``B`` batch, ``S`` sequence, ``V`` vocabulary (the tokenizer's real
vocabulary: callers slice away embedding padding first), ``N`` non-masked tokens.

The student objective is ``(1 - α)·CE + α·T²·KL(p_teacher^T ‖ p_student^T)``,
where ``p^T = softmax(logits / T)``. The ``T²`` factor (Hinton et al., 2015) keeps
the gradient of the soft term on the same scale as the hard term when ``T`` changes:
the gradient of ``KL`` with respect to the student's logits scales as ``1/T``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def shift_for_next_token(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align causal-LM outputs with their targets.

    Args:
        logits: [B, S, V] — position ``t`` predicts token ``t + 1``.
        input_ids: [B, S] token ids.
        attention_mask: [B, S], 1 for real tokens, 0 for padding.

    Returns:
        logits [B, S-1, V] (a view), labels [B, S-1], mask [B, S-1] (bool: the target is real).
    """
    return logits[:, :-1], input_ids[:, 1:], attention_mask[:, 1:].bool()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats over the ``N`` tokens where ``mask`` is true.

    logits [B, S, V] (any float dtype; computed in fp32), labels [B, S], mask [B, S] bool.
    """
    picked = logits[mask].float()
    if picked.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(picked, labels[mask])


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``T² · mean_N Σ_v p_t(v) (log p_t(v) − log p_s(v))`` with ``p = softmax(logits / T)``.

    student_logits, teacher_logits: [B, S, V] over the same vocabulary; the teacher's
    are treated as constants (detached). mask: [B, S] bool. Computed in fp32.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; slice both to the tokenizer's vocabulary"
        )
    s = student_logits[mask].float()
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    t = teacher_logits.detach()[mask].float()
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)
    return kl.mean() * temperature**2


def blend(ce: torch.Tensor, kd: torch.Tensor, alpha: float) -> torch.Tensor:
    """The student's objective ``(1 − α)·CE + α·KD``; at α = 0 the soft term adds no graph."""
    if alpha == 0.0:
        return ce
    return (1.0 - alpha) * ce + alpha * kd


def top1_agreement(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor
) -> tuple[int, int]:
    """(matches, tokens): how often the student's argmax equals the teacher's on masked tokens."""
    same = student_logits.argmax(dim=-1) == teacher_logits.argmax(dim=-1)
    return int(same[mask].sum()), int(mask.sum())
