"""Losses for co-distillation. Pure tensor functions, no state.

Shapes: ``B`` batch, ``S`` sequence, ``V`` vocabulary (the tokenizer's real
vocabulary: callers slice away embedding padding first), ``N = B·S`` positions,
``n`` the positions whose target is a real token.

The student objective is ``(1 − α)·CE + α·T²·KL(p_teacher^T ‖ p_student^T)`` with
``p^T = softmax(logits / T)``, averaged over the ``n`` real targets. The ``T²``
factor (Hinton et al., 2015) keeps the soft term's gradient on the scale of the
hard term's when ``T`` changes, since ∂KL/∂z_student = (p_s^T − p_t^T) / T.

:func:`distill_loss` computes CE, KL and the gradient with respect to the student's
logits together, chunk by chunk over positions, in one custom autograd function:
no full-size fp32 softmax of either model is ever held, and the backward pass is a
single multiply of the stored gradient.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 22  # positions per chunk = CHUNK_ELEMENTS // V: ~16 MB fp32 temporaries


class LossParts(NamedTuple):
    loss: torch.Tensor  # the differentiable objective
    ce: torch.Tensor  # mean hard cross-entropy (nats), no gradient
    kd: torch.Tensor  # T²·mean KL(teacher ‖ student), no gradient; 0 without a teacher


def next_token_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and mask aligned with unshifted causal-LM logits.

    Position ``t`` of the logits predicts token ``t + 1``; the last position has no
    target. Returns labels [B, S] (the last column is a placeholder 0) and a bool
    mask [B, S], true where the target is a real (non-padding) token. Keeping the
    logits unshifted lets them be viewed as [N, V] without a copy.
    """
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]
    mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    mask[:, :-1] = attention_mask[:, 1:].bool()
    return labels, mask


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def _forward_and_grad(student, labels, weights, teacher, alpha, temperature, need_grad):
    """Sums over chunks of positions; see :func:`distill_loss` for the formulas."""
    n_pos, vocab = student.shape
    grad = torch.empty_like(student) if need_grad else None
    ce_sum = student.new_zeros((), dtype=torch.float64)
    kd_sum = student.new_zeros((), dtype=torch.float64)
    ce_scale = 1.0 - alpha if teacher is not None else 1.0
    rows = _chunk_rows(vocab)
    for i in range(0, n_pos, rows):
        w = weights[i:i + rows]
        y = labels[i:i + rows].unsqueeze(1)
        log_ps = F.log_softmax(student[i:i + rows].float(), dim=-1)  # a fresh fp32 buffer
        ce_sum += -(log_ps.gather(1, y).squeeze(1) * w).sum(dtype=torch.float64)
        if teacher is not None:
            log_pt = F.log_softmax(teacher[i:i + rows].float() / temperature, dim=-1)
            log_ps_t = log_ps if temperature == 1.0 else F.log_softmax(student[i:i + rows].float() / temperature, dim=-1)
            pt = log_pt.exp()
            log_pt.sub_(log_ps_t)  # now log(p_t / p_s)
            kd_sum += ((pt * log_pt).sum(-1) * w).sum(dtype=torch.float64)
        if grad is None:
            continue
        # ∂/∂z per position of (1-α)·CE + α·T²·KL = (1-α)(p_s - onehot(y)) + α·T·(p_s^T - p_t^T)
        g = log_ps.exp_()  # p_s, reusing the buffer
        if teacher is not None and alpha > 0.0 and temperature == 1.0:
            g.add_(pt, alpha=-alpha)  # (1-α)p_s + α p_s - α p_t
        elif teacher is not None and alpha > 0.0:
            g.mul_(ce_scale).add_(log_ps_t.exp_().sub_(pt), alpha=alpha * temperature)
        else:
            g.mul_(ce_scale)
        g.scatter_add_(1, y, torch.full(y.shape, -ce_scale, dtype=g.dtype, device=g.device))
        g.mul_(w.unsqueeze(1))
        grad[i:i + rows] = g
    ce = ce_sum.float()
    kd = (kd_sum * temperature**2).float()
    loss = ce.clone() if teacher is None else (1.0 - alpha) * ce + alpha * kd
    return loss, ce, kd, grad


class _DistillLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, labels, weights, teacher, alpha, temperature, need_grad):
        loss, ce, kd, grad = _forward_and_grad(student, labels, weights, teacher, alpha, temperature, need_grad)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        (grad,) = ctx.saved_tensors
        if grad_loss.item() != 1.0:
            grad.mul_(grad_loss.to(grad.dtype))  # used once: the graph is not retained
        return grad, None, None, None, None, None, None


def distill_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    alpha: float = 0.0,
    temperature: float = 1.0,
) -> LossParts:
    """Mean next-token CE, and with a teacher the blended distillation objective.

    Args:
        student_logits: [B, S, V] or [N, V], any float dtype (computed in fp32 per chunk).
        labels: [B, S] / [N] target ids (from :func:`next_token_targets`).
        mask: [B, S] / [N] bool, true where the target counts.
        teacher_logits: same shape as ``student_logits``, treated as constants; ``None``
            for plain CE (then ``loss == ce``).
        alpha: weight α of the soft term; temperature: T > 0 applied to both models.

    Returns ``LossParts(loss, ce, kd)`` where
    ``loss = (1 − α)·CE + α·T²·mean_n Σ_v p_t^T(v) (log p_t^T(v) − log p_s^T(v))``.
    With no real target the result is 0 and so is the gradient.
    """
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = None
    if teacher_logits is not None:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher logits "
                f"{tuple(teacher_logits.shape)} differ; slice both to the tokenizer's vocabulary"
            )
        teacher = teacher_logits.detach().reshape(-1, vocab)
    flat_mask = mask.reshape(-1)
    weights = flat_mask.float() / flat_mask.sum().clamp(min=1)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss, ce, kd = _DistillLoss.apply(student, labels.reshape(-1), weights, teacher, float(alpha),
                                      float(temperature), need_grad)
    return LossParts(loss, ce, kd)


def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> int:
    """How many masked positions have the student's argmax equal to the teacher's."""
    same = student_logits.argmax(dim=-1) == teacher_logits.argmax(dim=-1)
    return int(same[mask].sum())
