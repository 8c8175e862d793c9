"""Losses for distillation. Pure tensor functions, no state.

Shapes: ``B`` batch, ``S`` sequence, ``V`` vocabulary (the tokenizer's real
vocabulary: callers slice away embedding padding first), ``N = B·S`` positions,
``n`` the positions whose target counts (not padding, not prompt), ``k`` top-k.

A student's objective is ``(1 − α)·CE + α·T²·D(P ‖ Q)`` averaged over the ``n``
counted positions, where ``P = softmax(z_teacher / T)``, ``Q = softmax(z_student / T)``
and ``D`` is one of

- ``forward_kl``: ``Σ P (log P − log Q)`` (mode-covering; the classic KD loss)
- ``reverse_kl``: ``Σ Q (log Q − log P)`` (mode-seeking)
- ``jsd`` with ``β``: ``β·KL(P ‖ M) + (1 − β)·KL(Q ‖ M)``, ``M = β·P + (1 − β)·Q``;
  as in TRL/Liger, ``β = 0`` is taken to mean forward KL and ``β = 1`` reverse KL
  (the mixture form itself vanishes at both ends); ``β = 0.5`` is the usual JSD
- ``tvd``: ``½ Σ |P − Q|``

The ``T²`` factor (Hinton et al., 2015) keeps the soft term's gradient on the scale
of the hard term's when ``T`` changes: ∂D/∂z_student carries a ``1/T``.

**Top-k targets** keep only the teacher's ``k`` most likely tokens and put the rest
of its mass in one tail bucket; the student's distribution is coarsened the same
way, so ``D`` is still a divergence between two proper distributions over ``k + 1``
outcomes (with ``k = V`` it is exactly the full loss).

:func:`distill_loss` computes CE, ``D`` and the gradient with respect to the
student's logits together, chunk by chunk over positions, in one custom autograd
function: no full [N × V] fp32 softmax of either model is held, the teacher's logits
stay detached in their own dtype, and backward is one multiply of the stored
gradient. The gradient uses ``∂D/∂z_v = q_v (G_b(v) − Σ_b Q_b G_b)`` with
``G = ∂D/∂Q`` over buckets ``b`` (tokens, or top-k tokens plus the tail).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
# Default chunk of the losses: CHUNK_ELEMENTS // V positions. On CPU a chunk's fp32 temporaries
# (1 MB each) stay in cache across the loss's passes over them (2x faster at V = 50k than 16 MB
# chunks; tools/bench_loss.py); a GPU wants large chunks (few kernel launches), ~16 MB each.
CHUNK_ELEMENTS = 1 << 18
CHUNK_ELEMENTS_GPU = 1 << 22


class LossParts(NamedTuple):
    loss: torch.Tensor  # the differentiable objective
    ce: torch.Tensor  # mean hard cross-entropy (nats), no gradient
    kd: torch.Tensor  # T²·mean D(P ‖ Q), no gradient; 0 without targets
    token_ce: torch.Tensor  # [N] per-position CE (T = 1), no gradient; 0 where not counted
    filtered: torch.Tensor  # share of counted positions the soft term used (1 without the token filter)
    lse: torch.Tensor  # [N] logsumexp of the logits (T = 1), no gradient: a teacher's, saves students a pass


@dataclass
class Targets:
    """The teacher's side of the soft term for N positions: full logits, or top-k."""

    temperature: float
    logits: Optional[torch.Tensor] = None  # [N, V], any float dtype, detached
    topk_ids: Optional[torch.Tensor] = None  # [N, k] int32 (int64 per chunk when used)
    topk_logp: Optional[torch.Tensor] = None  # [N, k] log P of those ids (at ``temperature``)
    tail_logp: Optional[torch.Tensor] = None  # [N] log of the remaining mass (−inf if none)
    token_ce: Optional[torch.Tensor] = None  # [N] the teacher's own CE per position, for the token filter
    lse: Optional[torch.Tensor] = None  # [N] logsumexp of ``logits`` (T = 1, from the teacher's own loss)

    def nbytes(self) -> int:
        held = (self.logits, self.topk_ids, self.topk_logp, self.tail_logp, self.token_ce)
        return sum(t.numel() * t.element_size() for t in held if t is not None)


def topk_bytes_per_position(k: int) -> int:
    """Bytes top-k targets hold per position while the students train (live or cached alike):
    k int32 ids and k fp32 log-probabilities, the fp32 tail and the teacher's fp32 CE."""
    return 8 * k + 8


@dataclass(frozen=True)
class SoftSpec:
    divergence: str = "forward_kl"
    beta: float = 0.5
    alpha: float = 0.0
    token_filter: bool = False  # use the soft term only where the teacher's CE < the student's (the token filter)

    def resolved(self) -> str:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; expected one of {DIVERGENCES}")
        if self.divergence == "jsd" and self.beta == 0.0:
            return "forward_kl"
        if self.divergence == "jsd" and self.beta == 1.0:
            return "reverse_kl"
        return self.divergence


def next_token_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       loss_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and mask aligned with unshifted causal-LM logits.

    Position ``t`` of the logits predicts token ``t + 1``; the last position has no
    target. Returns labels [B, S] (the last column is a placeholder 0) and a bool
    mask [B, S], true where the target is a real token that counts: not padding and,
    when ``loss_mask`` [B, S] marks them with 0, not a prompt token. Keeping the
    logits unshifted lets them be viewed as [N, V] without a copy.
    """
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]
    counted = attention_mask.bool() if loss_mask is None else attention_mask.bool() & loss_mask.bool()
    mask = torch.zeros_like(counted)
    mask[:, :-1] = counted[:, 1:]
    return labels, mask


def chunk_rows(vocab: int, chunk_tokens: Optional[int] = None, device: Optional[torch.device] = None) -> int:
    """Positions per chunk: ``chunk_tokens`` if given, else about CHUNK_ELEMENTS logits (on CPU)."""
    if chunk_tokens:
        return chunk_tokens
    elements = CHUNK_ELEMENTS if device is None or torch.device(device).type == "cpu" else CHUNK_ELEMENTS_GPU
    return max(1, elements // vocab)


def topk_targets(logits: torch.Tensor, k: int, temperature: float, chunk_tokens: Optional[int] = None) -> Targets:
    """The teacher's top-``k`` tokens, their log-probabilities at ``T`` and the tail mass.

    logits: [..., V] (flattened to [N, V]); computed chunk by chunk in fp32.
    """
    flat = logits.detach().reshape(-1, logits.shape[-1])
    k = min(k, flat.shape[1])
    ids = torch.empty(flat.shape[0], k, dtype=torch.int32, device=flat.device)
    logp = torch.empty(flat.shape[0], k, dtype=torch.float32, device=flat.device)
    tail = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    rows = chunk_rows(flat.shape[1], chunk_tokens)
    for i in range(0, flat.shape[0], rows):
        lp = F.log_softmax(flat[i:i + rows].float() / temperature, dim=-1)
        top = lp.topk(k, dim=-1)
        ids[i:i + rows], logp[i:i + rows] = top.indices, top.values
        tail[i:i + rows] = torch.logsumexp(lp.scatter_(1, top.indices, -math.inf), dim=-1)
    return Targets(temperature=temperature, topk_ids=ids, topk_logp=logp, tail_logp=tail)


def _divergence_terms(div: str, beta: float, log_p: torch.Tensor, log_q: torch.Tensor):
    """Per-bucket terms of ``D(P ‖ Q)`` (summing over the last dim gives D) and
    ``W = Q ⊙ ∂D/∂Q``, both [n, b] over ``b`` buckets."""
    if div == "forward_kl":
        p = log_p.exp()
        return p * (log_p - log_q), p.neg_()
    q = log_q.exp()
    if div == "reverse_kl":
        r = log_q - log_p
        return q * r, q * r.add_(1.0)
    p = log_p.exp()
    if div == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
        lq_m = log_q - log_m
        w = (1.0 - beta) * q * lq_m
        return beta * p * (log_p - log_m) + w, w
    diff = q - p  # tvd
    return 0.5 * diff.abs(), 0.5 * q * diff.sign()


def _soft_chunk(spec: SoftSpec, div: str, targets: Targets, rows: slice, log_q: torch.Tensor, need_grad: bool):
    """Divergence per row and (if asked) its gradient with respect to the scaled logits."""
    if targets.logits is not None:
        log_p = F.log_softmax(targets.logits[rows].float() / targets.temperature, dim=-1)
        terms, w = _divergence_terms(div, spec.beta, log_p, log_q)
        value = terms.sum(-1)
        if not need_grad:
            return value, None
        if div == "forward_kl":  # Σ W = −Σ P = −1, so the gradient is simply Q − P
            return value, w.add_(log_q.exp())
        q = log_q.exp()
        return value, w.sub_(q * w.sum(-1, keepdim=True))
    ids = targets.topk_ids[rows].long()
    log_p = torch.cat([targets.topk_logp[rows].float(), targets.tail_logp[rows].float().unsqueeze(1)], dim=1)
    log_q_tail = torch.logsumexp(log_q.scatter(1, ids, -math.inf), dim=-1, keepdim=True)
    log_q_top = log_q.gather(1, ids)
    terms, w = _divergence_terms(div, spec.beta, log_p, torch.cat([log_q_top, log_q_tail], dim=1))
    keep = dict(nan=0.0, posinf=math.inf, neginf=-math.inf)  # 0·log 0 = 0 for an empty tail
    value, w = torch.nan_to_num(terms, **keep).sum(-1), torch.nan_to_num(w, **keep)
    if not need_grad:
        return value, None
    c = w.sum(-1, keepdim=True)
    w_top, w_tail = w[:, :-1], w[:, -1:]
    per_tail = torch.where(log_q_tail > -math.inf, w_tail / log_q_tail.exp(), torch.zeros_like(w_tail))
    q = log_q.exp()
    grad = q * (per_tail - c)
    grad.scatter_(1, ids, w_top - log_q_top.exp() * c)
    return value, grad


def _softmax_into(z: torch.Tensor, out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``out = softmax(z · scale)`` computed in place in ``out`` (no allocation of [n, V]);
    returns logsumexp(z · scale) [n, 1]. On CPU this is ~2x faster than torch.softmax,
    whose fresh output buffer costs page faults every chunk."""
    src = z
    if scale != 1.0:
        src = torch.mul(z, scale, out=out)
    top = src.amax(dim=-1, keepdim=True)
    torch.sub(src, top, out=out).exp_()
    total = out.sum(dim=-1, keepdim=True)
    out.div_(total)
    return top + total.log()


def _jsd_chunk(beta: float, temp: float, zt: torch.Tensor, lse_p: torch.Tensor, p: torch.Tensor, z: torch.Tensor,
               lse_q: torch.Tensor, q: torch.Tensor, buf_m: torch.Tensor, buf: torch.Tensor):
    """JSD(β) per row of a chunk from the teacher's and student's logits at T (``zt``, ``z``, unscaled), their
    log-normalisers at T and probabilities ``p``, ``q``; returns the value [n], ``W = Q ⊙ ∂D/∂Q`` (in
    ``buf``) and ΣW [n, 1]. In two reused buffers: log M, then each side's log-ratio to it.
    D = β·Σ P·(log P − log M) + ΣW, W = (1 − β)·Q·(log Q − log M)."""
    inv_t = 1.0 / temp
    # log M; M below fp32's smallest normal number only where P and Q are too (terms that vanish)
    log_m = torch.mul(p, beta, out=buf_m).add_(q, alpha=1.0 - beta).clamp_min_(torch.finfo(torch.float32).tiny).log_()
    side_p = torch.mul(zt, inv_t, out=buf).sub_(lse_p).sub_(log_m).mul_(p)
    value = side_p.sum(dim=-1).mul_(beta)
    w = torch.mul(z, inv_t, out=buf).sub_(lse_q).sub_(log_m).mul_(q).mul_(1.0 - beta)
    sum_w = w.sum(dim=-1, keepdim=True)
    return value.add_(sum_w.squeeze(1)), w, sum_w


def _reverse_kl_chunk(temp: float, zt: torch.Tensor, lse_p: torch.Tensor, z: torch.Tensor, lse_q: torch.Tensor,
                      q: torch.Tensor, buf: torch.Tensor):
    """Reverse KL per row of a chunk, as :func:`_jsd_chunk` returns JSD: the value [n], ``W`` (in ``buf``) and
    ΣW [n, 1], here with ``W = Q·r``, r = log Q − log P = (z − z_t)/T − lse_Q + lse_P (Q ⊙ ∂D/∂Q is
    Q·(r + 1); the gradient W − Q·ΣW is the same without the + 1). D = ΣW; no teacher probabilities needed."""
    r = torch.sub(z, zt, out=buf)
    if temp != 1.0:
        r.mul_(1.0 / temp)
    w = r.add_(lse_p - lse_q).mul_(q)
    sum_w = w.sum(dim=-1, keepdim=True)
    return sum_w.squeeze(1), w, sum_w


def _tvd_chunk(p: torch.Tensor, q: torch.Tensor, buf: torch.Tensor):
    """TVD per row of a chunk, as :func:`_jsd_chunk` returns JSD: ½·Σ|Q − P|, W = ½·Q·sign(Q − P), ΣW."""
    diff = torch.sub(q, p, out=buf)
    value = torch.linalg.vector_norm(diff, ord=1, dim=-1).mul_(0.5)
    w = diff.sign_().mul_(q).mul_(0.5)
    return value, w, w.sum(dim=-1, keepdim=True)


def _topk_chunk(spec: SoftSpec, div: str, targets: Targets, rows: slice, z: torch.Tensor, lse_q: torch.Tensor,
                q: torch.Tensor, temp: float):
    """The divergence over the teacher's top-k + tail buckets per row of a chunk, from the student's
    logits ``z`` and its softmax at T in ``q`` (left as it was): the value [n], the top-k ids, Q at them,
    W = Q ⊙ ∂D/∂Q at them, the tail's W per unit of Q (``per_tail``), ΣW (all [n, k] or [n, 1]), and the
    rows' tail gradient where it is computed token by token (or None). The tail's mass is Q's sum with the
    top-k set to 0 in place (restored after); where that sum is below 1e-30, fp32 probabilities lose it,
    so those rows take it as a log-sum-exp of their logits, and their tail tokens' Q / Q_tail · W_tail
    as exp(log Q − log Q_tail) · W_tail (their per_tail is 0)."""
    ids = targets.topk_ids[rows].long()
    log_p = torch.cat([targets.topk_logp[rows].float(), targets.tail_logp[rows].float().unsqueeze(1)], dim=1)
    q_top = q.gather(1, ids)
    q_tail = q.scatter_(1, ids, 0.0).sum(dim=-1, keepdim=True)
    q.scatter_(1, ids, q_top)
    log_q_top = z.gather(1, ids).div_(temp).sub_(lse_q)
    log_q_tail = q_tail.log()
    low = (q_tail < 1e-30).squeeze(1).nonzero().squeeze(1) if ids.shape[1] < q.shape[1] else ids[:0, 0]
    ratio = None
    if low.numel():  # (a tail of tokens whose logits are all -inf stays empty: its ratio 0/0 is taken as 0)
        log_q_low = (z[low] / temp - lse_q[low]).scatter_(1, ids[low], -math.inf)
        log_q_tail[low] = torch.logsumexp(log_q_low, dim=-1, keepdim=True)
        ratio = log_q_low.sub_(log_q_tail[low]).exp_().nan_to_num_(nan=0.0)  # Q / Q_tail off the top-k, 0 on it
    terms, w = _divergence_terms(div, spec.beta, log_p, torch.cat([log_q_top, log_q_tail], dim=1))
    keep = dict(nan=0.0, posinf=math.inf, neginf=-math.inf)  # 0·log 0 = 0 for an empty tail
    value, w = torch.nan_to_num(terms, **keep).sum(-1), torch.nan_to_num(w, **keep)
    w_tail = w[:, -1:]
    per_tail = w_tail / q_tail.clamp_min(1e-30)
    tail_rows = None
    if ratio is not None:
        per_tail[low] = 0.0
        tail_rows = (low, ratio.mul_(w_tail[low]))
    return value, ids, q_top, w[:, :-1], per_tail, w.sum(-1, keepdim=True), tail_rows


class ChunkLoss(NamedTuple):
    """What :func:`loss_and_grad` computes for N positions."""

    loss: torch.Tensor  # (1 − α)·CE + α·kd (CE alone without targets)
    ce: torch.Tensor  # weighted CE
    kd: torch.Tensor  # T²·weighted D
    token_ce: torch.Tensor  # [N] per-position CE (T = 1); 0 where not counted
    filtered: torch.Tensor  # share of the counted weight the soft term used (1 without the token filter)
    lse: torch.Tensor  # [N] logsumexp of the logits (T = 1)
    grad: Optional[torch.Tensor]  # [N, V] ∂loss/∂logits, or None


@dataclass
class _Scratch:
    """The [step, V] fp32 buffers of one loss, reused chunk after chunk (fresh ones would cost page faults on
    CPU as large as the work they hold)."""

    q: Optional[torch.Tensor]  # the student's softmax (None: written straight into the gradient)
    p: Optional[torch.Tensor]  # the teacher's softmax at T (full targets)
    tmp: Optional[torch.Tensor]  # a divergence's working buffer (full targets)
    qt: Optional[torch.Tensor]  # the student's softmax at T ≠ 1
    m: Optional[torch.Tensor]  # JSD's log M

    @classmethod
    def make(cls, step: int, vocab: int, device: torch.device, in_place: bool, full: bool, tempered: bool,
             jsd: bool) -> "_Scratch":
        new = lambda: torch.empty(step, vocab, dtype=torch.float32, device=device)  # noqa: E731
        q = None if in_place else new()
        p, tmp = (new(), new()) if full else (None, None)
        return cls(q, p, tmp, new() if tempered else None, new() if jsd else None)


def _full_chunk(spec: SoftSpec, div: str, targets: Targets, rows: slice, n: int, z: torch.Tensor, q: torch.Tensor,
                lse: torch.Tensor, buf: _Scratch, ce_w: torch.Tensor, w_soft: torch.Tensor, need_grad: bool):
    """One chunk's divergence to the teacher's full logits per row [n], and (with ``need_grad``) the blended
    loss's gradient written into ``q`` (the student's softmax at T = 1, which it replaces):
    g = (1−α)·w·(q − onehot) + α·T·w_soft·(W − q_T·ΣW), less the one-hot part the caller adds. KL =
    Σ P·(z_t − z_s)/T − lse_P + lse_Q; reverse KL from the log-ratio alone (no teacher softmax); JSD from
    M = β·P + (1 − β)·Q in probabilities, one log per element; TVD from Q − P."""
    temp = targets.temperature
    zt = targets.logits[rows].float()
    p_t = buf.p[:n]
    if temp == 1.0 and targets.lse is not None:  # the teacher's loss already has its logsumexp
        lse_p = targets.lse[rows].unsqueeze(1)
        if div != "reverse_kl":
            torch.sub(zt, lse_p, out=p_t).exp_()
    else:
        lse_p = _softmax_into(zt, p_t, 1.0 / temp)
    q_t, lse_q = (q, lse) if temp == 1.0 else (buf.qt[:n], None)
    if temp != 1.0:
        lse_q = _softmax_into(z, q_t, 1.0 / temp)
    if div == "forward_kl":
        d = torch.sub(zt, z, out=buf.tmp[:n]).mul_(p_t)  # P·(z_t − z_s)
        value = d.sum(dim=-1) / temp - lse_p.squeeze(1) + lse_q.squeeze(1)
    elif div == "jsd":
        value, w_div, sum_w = _jsd_chunk(spec.beta, temp, zt, lse_p, p_t, z, lse_q, q_t, buf.m[:n], buf.tmp[:n])
    elif div == "reverse_kl":
        value, w_div, sum_w = _reverse_kl_chunk(temp, zt, lse_p, z, lse_q, q_t, buf.tmp[:n])
    else:
        value, w_div, sum_w = _tvd_chunk(p_t, q_t, buf.tmp[:n])
    if not need_grad:
        return value, None
    a_t = (w_soft * (spec.alpha * temp)).unsqueeze(1)
    if div == "forward_kl":  # W − q_T·ΣW = q_T − p_T
        g = q.mul_(ce_w + a_t) if temp == 1.0 else q.mul_(ce_w).addcmul_(q_t, a_t)
        g.addcmul_(p_t, a_t, value=-1.0)
    else:
        g = q.mul_(ce_w - a_t * sum_w) if temp == 1.0 else q.mul_(ce_w).addcmul_(q_t, a_t * sum_w, value=-1.0)
        g.addcmul_(w_div, a_t)
    return value, g


def _topk_grad_chunk(spec: SoftSpec, div: str, targets: Targets, rows: slice, n: int, z: torch.Tensor,
                     q: torch.Tensor, lse: torch.Tensor, buf: _Scratch, ce_w: torch.Tensor, w_soft: torch.Tensor,
                     need_grad: bool):
    """As :func:`_full_chunk`, against top-k targets (k + 1 buckets, :func:`_topk_chunk`): g = (1−α)·w·(q −
    onehot) + α·T·w_soft·∂D/∂z; ∂D/∂z is q_T·(per_tail − c) off the top-k and W_top − q_top·c on it, written
    there (per_tail is large where the student's tail mass is small: adding a correction to q_top·per_tail
    would cancel catastrophically)."""
    temp = targets.temperature
    q_t, lse_q = q, lse
    if temp != 1.0:
        q_t = buf.qt[:n]
        lse_q = _softmax_into(z, q_t, 1.0 / temp)
    value, ids, q_top, w_top, per_tail, c, tail_rows = _topk_chunk(spec, div, targets, rows, z, lse_q, q_t, temp)
    if not need_grad:
        return value, None
    a_t = (w_soft * (spec.alpha * temp)).unsqueeze(1)
    ce_top = q_top if temp == 1.0 else q.gather(1, ids)
    shift = a_t * (per_tail - c)
    g = q.mul_(ce_w + shift) if temp == 1.0 else q.mul_(ce_w).addcmul_(q_t, shift)
    g.scatter_(1, ids, ce_top * ce_w + a_t * (w_top - q_top * c))
    if tail_rows is not None:
        low, tail_grad = tail_rows
        g.index_add_(0, low, tail_grad.mul_(a_t[low]))
    return value, g


def loss_and_grad(student: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, targets: Optional[Targets],
                  spec: SoftSpec, chunk_tokens: Optional[int], need_grad: bool,
                  grad_out: Optional[torch.Tensor] = None) -> ChunkLoss:
    """The loss's value, parts and (with ``need_grad``) its gradient with respect to ``student`` [N, V] (labels
    [N], weights [N] summing to 1 over the counted positions), chunk by chunk; the gradient is written into
    ``grad_out`` when given (an fp32 [≥ N, V] buffer the caller reuses, not ``student`` itself). Every
    divergence to full teacher logits has a fused path (every [n, V] temporary in reused buffers, one
    gradient buffer for both terms); top-k targets read the student's softmax at the top-k tokens and its
    tail mass from the same buffer."""
    n_pos, vocab = student.shape
    soft = targets is not None
    div = spec.resolved() if soft else None
    temp = targets.temperature if soft else 1.0
    ce_scale = 1.0 - spec.alpha if soft else 1.0
    full = soft and targets.logits is not None
    if not need_grad:
        grad = None
    elif grad_out is not None:
        grad = grad_out[:n_pos]
    else:
        grad = torch.empty_like(student)  # the logits' own dtype
    token_ce = torch.zeros(n_pos, dtype=torch.float32, device=student.device)
    lse_all = torch.empty(n_pos, dtype=torch.float32, device=student.device)
    ce_sum, kd_sum, used = (student.new_zeros((), dtype=torch.float64) for _ in range(3))
    step = min(n_pos, chunk_rows(vocab, chunk_tokens, student.device))
    in_place = grad is not None and grad.dtype == torch.float32  # q is written straight into grad
    buf = _Scratch.make(step, vocab, student.device, in_place, full, soft and temp != 1.0, full and div == "jsd")
    soft_chunk = _full_chunk if full else _topk_grad_chunk
    for i in range(0, n_pos, step):
        rows = slice(i, i + step)
        n = min(step, n_pos - i)
        w, y = weights[rows], labels[rows].unsqueeze(1)
        z = student[rows].float()
        q = grad[rows] if in_place else buf.q[:n]
        lse = _softmax_into(z, q)  # q = softmax(z): ∂CE/∂z = q − onehot(y)
        lse_all[rows] = lse.squeeze(1)
        tok_ce = (lse - z.gather(1, y)).squeeze(1)
        token_ce[rows] = tok_ce * (w > 0)
        ce_sum += (tok_ce * w).sum(dtype=torch.float64)
        ce_w = (w * ce_scale).unsqueeze(1)
        if soft:
            w_soft = w * (targets.token_ce[rows] < tok_ce) if spec.token_filter else w
            used += w_soft.sum(dtype=torch.float64)
            value, g = soft_chunk(spec, div, targets, rows, n, z, q, lse, buf, ce_w, w_soft, grad is not None)
            kd_sum += (value * w_soft).sum(dtype=torch.float64)
        elif grad is not None:
            g = q.mul_(ce_w)
        if grad is None:
            continue
        g.scatter_add_(1, y, -ce_w)
        if not in_place:
            grad[rows] = g
    ce = ce_sum.float()
    kd = (kd_sum * temp**2).float()
    loss = ce.clone() if not soft else (1.0 - spec.alpha) * ce + spec.alpha * kd
    total = weights.sum(dtype=torch.float64)
    share = (used / total).float() if soft and total > 0 else torch.ones((), device=student.device)
    return ChunkLoss(loss, ce, kd, token_ce, share, lse_all, grad)


class _DistillLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, labels, weights, targets, spec, chunk_tokens, need_grad):
        out = loss_and_grad(student, labels, weights, targets, spec, chunk_tokens, need_grad)
        # Kept as a plain attribute, not saved_tensors, so backward can hand the buffer
        # over without autograd copying it (the graph is never retained for this loss).
        ctx.grad = out.grad
        ctx.mark_non_differentiable(out.ce, out.kd, out.token_ce, out.filtered, out.lse)
        return out.loss, out.ce, out.kd, out.token_ce, out.filtered, out.lse

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("distill_loss was back-propagated twice; its gradient is computed once")
        if grad_loss.item() != 1.0:
            grad.mul_(grad_loss.to(grad.dtype))  # used once: the graph is not retained
        return grad, None, None, None, None, None, None


def distill_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    targets: Optional[Targets] = None,
    spec: SoftSpec = SoftSpec(),
    chunk_tokens: Optional[int] = None,
) -> LossParts:
    """Mean next-token CE, and with ``targets`` the blended distillation objective.

    Args:
        student_logits: [B, S, V] or [N, V], any float dtype (computed in fp32 per chunk).
        labels: [B, S] / [N] target ids (from :func:`next_token_targets`).
        mask: [B, S] / [N] bool, true where the position counts.
        targets: the teacher's full logits (same shape as the student's) or top-k;
            ``None`` for plain CE (then ``loss == ce``).
        spec: divergence, β, α and the token filter.
        chunk_tokens: positions per chunk (default: CHUNK_ELEMENTS logits per chunk on CPU,
            CHUNK_ELEMENTS_GPU on a GPU; see :func:`chunk_rows`).

    Returns ``LossParts`` with ``loss = (1 − α)·CE + α·T²·mean_n D(P ‖ Q)``.
    With no counted position the result is 0 and so is the gradient.
    """
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    if targets is not None and targets.logits is not None:
        if targets.logits.shape[-1] != vocab or targets.logits.numel() != student.numel():
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher logits "
                f"{tuple(targets.logits.shape)} differ; slice both to the tokenizer's vocabulary"
            )
        targets = Targets(**{**targets.__dict__, "logits": targets.logits.detach().reshape(-1, vocab)})
    if spec.token_filter and (targets is None or targets.token_ce is None):
        raise ValueError("token_filter needs the teacher's per-token CE in targets.token_ce")
    flat_mask = mask.reshape(-1)
    weights = flat_mask.float() / flat_mask.sum().clamp(min=1)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    parts = _DistillLoss.apply(student, labels.reshape(-1), weights, targets, spec, chunk_tokens, need_grad)
    return LossParts(*parts)


def weighted_ce(student_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """``Σ_n weights[n]·CE_n`` with its gradient, chunk by chunk (any weights, negative ones too): the surrogate
    through which a loss that depends on the tokens' log-probabilities alone back-propagates to the logits
    without an fp32 copy of them."""
    vocab = student_logits.shape[-1]
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _DistillLoss.apply(student_logits.reshape(-1, vocab), labels.reshape(-1), weights.reshape(-1).float(), None,
                              SoftSpec(), chunk_tokens, need_grad)[0]


def top1_agreement(student_top1: torch.Tensor, teacher_top1: torch.Tensor, mask: torch.Tensor) -> int:
    """How many masked positions have the student's most likely token equal to the teacher's
    (each model's argmax over its logits, [B, S])."""
    return int((student_top1 == teacher_top1)[mask].sum())


PANEL_BUCKETS = 4  # KD loss is reported per quarter of the sequence


@torch.no_grad()
def panel_stats(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, targets: Targets,
                spec: SoftSpec, k: int, teacher_logits: Optional[torch.Tensor] = None,
                chunk_tokens: Optional[int] = None) -> dict[str, float]:
    """Diagnostics of one student against its teacher on one micro-batch, chunked like the loss.

    Returns (means over counted positions; ``teacher_logits`` [N, V] enables the first three):
      ``teacher_entropy``, ``student_entropy``: H of each model's distribution (T = 1), nats;
      ``topk_mass``: the teacher's probability mass on the student's ``k`` most likely tokens;
      ``kd_ce_grad_ratio``: ‖∂(T²·D)/∂z‖ / ‖∂CE/∂z‖ over the student's logits z, before α weighs
        the two (multiply by α/(1 − α) for their ratio in the update);
      ``kd_pos_<a>-<b>``: T²·D averaged over the positions a..b of the sequence (quarters).
    """
    seq = student_logits.shape[-2] if student_logits.dim() == 3 else student_logits.shape[0]
    vocab = student_logits.shape[-1]
    student = student_logits.detach().reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab) if teacher_logits is not None else None
    if targets.logits is not None:
        targets = Targets(**{**targets.__dict__, "logits": targets.logits.detach().reshape(-1, vocab)})
    flat_labels, counted = labels.reshape(-1), mask.reshape(-1).float()
    div, temp = spec.resolved(), targets.temperature
    position = torch.arange(student.shape[0], device=student.device) % seq
    bucket = (position * PANEL_BUCKETS) // seq
    sums = {"teacher_entropy": 0.0, "student_entropy": 0.0, "topk_mass": 0.0}
    kd_by_bucket = torch.zeros(PANEL_BUCKETS, dtype=torch.float64, device=student.device)
    n_by_bucket = torch.zeros(PANEL_BUCKETS, dtype=torch.float64, device=student.device)
    grad_sq = {"kd": 0.0, "ce": 0.0}
    step = chunk_rows(vocab, chunk_tokens)
    for i in range(0, student.shape[0], step):
        rows = slice(i, i + step)
        m = counted[rows]
        log_q1 = F.log_softmax(student[rows].float(), dim=-1)
        q1 = log_q1.exp()
        sums["student_entropy"] += float((-(q1 * log_q1).sum(-1) * m).sum())
        if teacher is not None:
            log_p1 = F.log_softmax(teacher[rows].float(), dim=-1)
            p1 = log_p1.exp()
            sums["teacher_entropy"] += float((-(p1 * log_p1).sum(-1) * m).sum())
            top = student[rows].topk(min(k, vocab), dim=-1).indices
            sums["topk_mass"] += float((p1.gather(1, top).sum(-1) * m).sum())
        log_q = log_q1 if temp == 1.0 else F.log_softmax(student[rows].float() / temp, dim=-1)
        value, g_soft = _soft_chunk(spec, div, targets, rows, log_q, need_grad=True)
        kd = value * temp**2
        kd_by_bucket.index_add_(0, bucket[rows], (kd * m).double())
        n_by_bucket.index_add_(0, bucket[rows], m.double())
        grad_sq["kd"] += float(((g_soft * temp).square().sum(-1) * m).sum())  # ∂(T²D)/∂z = T·∂D/∂(z/T)
        g_ce = q1.scatter_add_(1, flat_labels[rows].unsqueeze(1), torch.full((q1.shape[0], 1), -1.0,
                                                                            device=q1.device))
        grad_sq["ce"] += float((g_ce.square().sum(-1) * m).sum())
    n = max(float(counted.sum()), 1.0)
    out = {"student_entropy": sums["student_entropy"] / n,
           "kd_ce_grad_ratio": math.sqrt(grad_sq["kd"]) / max(math.sqrt(grad_sq["ce"]), 1e-30)}
    if teacher is not None:
        out["teacher_entropy"] = sums["teacher_entropy"] / n
        out["topk_mass"] = sums["topk_mass"] / n
    for b in range(PANEL_BUCKETS):
        lo, hi = -(-b * seq // PANEL_BUCKETS), -(-(b + 1) * seq // PANEL_BUCKETS) - 1
        if n_by_bucket[b] > 0:
            out[f"kd_pos_{lo:03d}-{hi:03d}"] = float(kd_by_bucket[b] / n_by_bucket[b])
    return out
