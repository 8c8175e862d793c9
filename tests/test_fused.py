"""The fused-linear losses against a plain float64 reference written here (logits from hidden
states and head weights, full softmaxes, autograd): values and the gradients of every model's
hidden states, head weight and bias, for every divergence, T, top-k, masks, the token gate,
padded and tied heads, several students, one and many chunks; and bf16 heads against the
unfused bf16 path."""
import math

import pytest
import torch
import torch.nn.functional as F

from codistill.fused import Head, StudentTerm, fused_linear_losses
from codistill.losses import SoftSpec, Targets, distill_loss

from test_losses import _ref_divergence

B, S, H, V = 2, 6, 5, 13  # V: the tokenizer's vocabulary; heads may hold more rows


def _inputs(seed, hidden=H, rows=V, bias=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, S, hidden, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    w = (torch.randn(rows, hidden, generator=g, dtype=torch.float64) * 0.8).to(dtype).requires_grad_(True)
    b = (torch.randn(rows, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_(True) if bias else None
    return h, w, b


def _batch(seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    labels = torch.randint(0, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, 4:] = False  # padding
    mask[1, :2] = False  # a prompt
    return labels, mask


def _logits64(h, w, b):
    z = h.double().reshape(-1, h.shape[-1]) @ w.double()[:V].t()
    return z if b is None else z + b.double()[:V]


def _reference(teacher, students, labels, mask):
    """Losses of the naive objective in float64 from hidden states and heads (autograd graphs)."""
    y, m = labels.reshape(-1), mask.reshape(-1)
    n = m.sum()
    z_t = _logits64(*teacher)
    t_ce = F.cross_entropy(z_t, y, reduction="none")
    out = [(t_ce * m).sum() / n]
    for (h, w, b), spec, temp, k in students:
        z = _logits64(h, w, b)
        ce = F.cross_entropy(z, y, reduction="none")
        p, q = torch.softmax(z_t.detach() / temp, -1), torch.softmax(z / temp, -1)
        if k is not None:  # both coarsened to the teacher's top-k plus one tail bucket
            ids = p.topk(k, -1).indices
            p_top, q_top = p.gather(1, ids), q.gather(1, ids)
            p = torch.cat([p_top, (1 - p_top.sum(-1, keepdim=True)).clamp(min=1e-300)], 1)
            q = torch.cat([q_top, (1 - q_top.sum(-1, keepdim=True)).clamp(min=1e-300)], 1)
        soft = m & (t_ce.detach() < ce.detach()) if spec.token_filter else m
        d = _ref_divergence(spec.divergence, spec.beta, p, q)
        out.append((1 - spec.alpha) * (ce * m).sum() / n + spec.alpha * temp**2 * (d * soft).sum() / n)
    return out


def _grads(tensors):
    return [None if t is None or t.grad is None else t.grad.clone() for t in tensors]


def _zero(tensors):
    for t in tensors:
        if t is not None:
            t.grad = None


def _check(teacher, students, chunk, rtol=1e-5):
    """Fused (fp32) against the float64 reference: every loss value and every gradient."""
    labels, mask = _batch()
    models = [teacher, *(s[0] for s in students)]
    every = [t for model in models for t in model]
    expected = _reference(teacher, students, labels, mask)
    _zero(every)
    sum(expected).backward()
    want = _grads(every)
    _zero(every)
    as32 = [[None if t is None else t.detach().float().requires_grad_(t.requires_grad) for t in model]
            for model in models]
    heads = [Head(*model) for model in as32]
    terms = [StudentTerm(head, spec, temp, k) for head, (_, spec, temp, k) in zip(heads[1:], students)]
    t_parts, s_parts = fused_linear_losses(heads[0], terms, labels, mask, V, chunk_tokens=chunk)
    for got, ref in zip([t_parts, *s_parts], expected):
        assert got.loss.item() == pytest.approx(ref.item(), rel=rtol, abs=1e-7)
    sum(p.loss for p in [t_parts, *s_parts]).backward()
    got = _grads([t for model in as32 for t in model])
    for g, r in zip(got, want):
        if r is None:
            assert g is None
            continue
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6)
    return t_parts, s_parts, [got[i:i + 3] for i in range(0, len(got), 3)]


@pytest.mark.parametrize("chunk", [None, 3], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize("div, beta, temp, k", [
    ("forward_kl", 0.5, 1.0, None), ("forward_kl", 0.5, 2.0, None), ("reverse_kl", 0.5, 1.0, None),
    ("jsd", 0.5, 1.5, None), ("jsd", 0.2, 1.0, 4), ("tvd", 0.5, 1.0, None), ("forward_kl", 0.5, 2.0, 4),
    ("reverse_kl", 0.5, 0.7, 5),
])
def test_every_divergence_temperature_and_top_k_match_the_float64_reference(div, beta, temp, k, chunk):
    teacher = _inputs(1, hidden=7)  # the teacher is wider than the student
    student = _inputs(2)
    _check(teacher, [(student, SoftSpec(div, beta, alpha=0.6), temp, k)], chunk)


@pytest.mark.parametrize("chunk", [None, 4])
def test_several_students_padded_heads_biases_gating_and_a_frozen_teacher(chunk):
    """Two students with their own divergence, T, targets and gate share one teacher pass; the
    heads hold rows past the vocabulary (never used: zero gradient); the teacher may train or not."""
    for teacher_trains in (True, False):
        teacher = _inputs(3, hidden=7, rows=V + 3, bias=True)
        if not teacher_trains:
            teacher = tuple(None if t is None else t.detach() for t in teacher)
        first = _inputs(4, rows=V + 2)
        second = _inputs(5, bias=True)
        students = [(first, SoftSpec("forward_kl", alpha=0.5, token_filter=True), 1.0, None),
                    (second, SoftSpec("jsd", 0.5, alpha=0.3), 2.0, 6)]
        t_parts, s_parts, grads = _check(teacher, students, chunk)
        assert s_parts[0].filtered.item() < 1.0  # the gate dropped some positions
        if teacher_trains:
            assert torch.count_nonzero(grads[0][1][V:]) == 0 and torch.count_nonzero(grads[0][2][V:]) == 0
        else:
            assert grads[0] == [None, None, None]
        assert torch.count_nonzero(grads[1][1][V:]) == 0 and torch.count_nonzero(grads[1][1][:V]) > 0


def test_a_tied_head_gets_the_gradient_of_both_its_uses():
    """A student whose head is its input embedding: the fused loss's share and the embedding's
    add up, as autograd adds them on the plain path."""
    labels, mask = _batch(1)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, V, (B, S), generator=g)
    emb = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7).requires_grad_(True)
    mix = torch.randn(H, H, generator=g, dtype=torch.float64).requires_grad_(True)
    teacher = _inputs(6, hidden=7)

    def run(e, mx, t_hidden, t_weight, fused):
        h = torch.tanh(e[ids] @ mx)
        spec = SoftSpec("forward_kl", alpha=0.5)
        if not fused:
            return sum(_reference((t_hidden, t_weight, None), [((h, e, None), spec, 1.0, None)], labels, mask))
        t, (s,) = fused_linear_losses(Head(t_hidden, t_weight), [StudentTerm(Head(h, e), spec)], labels, mask, V, 5)
        return t.loss + s.loss

    run(emb, mix, *teacher[:2], fused=False).backward()
    want = [emb.grad.clone(), mix.grad.clone(), teacher[0].grad.clone(), teacher[1].grad.clone()]
    e32, m32 = emb.detach().float().requires_grad_(True), mix.detach().float().requires_grad_(True)
    th, tw = (t.detach().float().requires_grad_(True) for t in teacher[:2])
    run(e32, m32, th, tw, fused=True).backward()
    for got, ref in zip([e32.grad, m32.grad, th.grad, tw.grad], want):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


def test_the_parts_are_those_of_the_unfused_loss():
    """CE, KD, per-position CE, logsumexp and the gate's share, as distill_loss gives them from logits."""
    labels, mask = _batch(2)
    (th, tw, tb), (sh, sw, sb) = (tuple(None if t is None else t.detach().float() for t in _inputs(s, bias=True))
                                  for s in (7, 8))
    spec = SoftSpec("reverse_kl", alpha=0.4, token_filter=True)
    t_parts, (s_parts,) = fused_linear_losses(Head(th, tw, tb), [StudentTerm(Head(sh, sw, sb), spec, 1.0)],
                                              labels, mask, V, chunk_tokens=5)
    z_t, z_s = (torch.addmm(b, h.reshape(-1, H), w.t()) for h, w, b in ((th, tw, tb), (sh, sw, sb)))
    plain_t = distill_loss(z_t, labels, mask)
    plain_s = distill_loss(z_s, labels, mask, Targets(1.0, logits=z_t, token_ce=plain_t.token_ce), spec)
    for got, want in ((t_parts, plain_t), (s_parts, plain_s)):
        for name in ("loss", "ce", "kd", "filtered"):
            assert getattr(got, name).item() == pytest.approx(getattr(want, name).item(), rel=1e-6, abs=1e-7)
        torch.testing.assert_close(got.token_ce, want.token_ce)
        torch.testing.assert_close(got.lse, want.lse)


def test_bf16_heads_agree_with_the_unfused_bf16_path():
    """The GEMMs in bf16 as the model's own head would run them, the loss in fp32 and the head's
    gradient accumulated in fp32: the fused path is at least as close to float64 as the plain one."""
    labels, mask = _batch(3)
    teacher, student = _inputs(10, hidden=16), _inputs(11, hidden=16)
    spec = SoftSpec("jsd", 0.5, alpha=0.5)
    ref = _reference(teacher, [(student, spec, 1.0, None)], labels, mask)
    sum(ref).backward()
    want = [t.grad for t in (*teacher[:2], *student[:2])]
    low = [t.detach().bfloat16().requires_grad_(True) for t in (*teacher[:2], *student[:2])]
    t_parts, (s_parts,) = fused_linear_losses(Head(*low[:2]), [StudentTerm(Head(*low[2:]), spec)], labels, mask, V, 4)
    (t_parts.loss + s_parts.loss).backward()
    fused = [t.grad.double() for t in low]
    plain_in = [t.detach().bfloat16().requires_grad_(True) for t in (*teacher[:2], *student[:2])]
    z_t = (plain_in[0].reshape(-1, 16) @ plain_in[1].t()).float()
    z_s = (plain_in[2].reshape(-1, 16) @ plain_in[3].t()).float()
    plain_t = distill_loss(z_t, labels, mask)
    plain_s = distill_loss(z_s, labels, mask, Targets(1.0, logits=z_t.detach(), token_ce=plain_t.token_ce), spec)
    assert s_parts.loss.item() == pytest.approx(plain_s.loss.item(), rel=1e-3)
    (plain_t.loss + plain_s.loss).backward()
    for f, p, r in zip(fused, [t.grad.double() for t in plain_in], want):
        assert (f - r).abs().max() <= 1.5 * (p - r).abs().max() + 1e-3 * r.abs().max()


def test_scaled_losses_scale_the_gradients_and_a_second_backward_is_refused():
    labels, mask = _batch(4)
    h, w = _inputs(12)[:2]
    h, w = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    t_h, t_w = (t.detach().float() for t in _inputs(13)[:2])
    spec = SoftSpec(alpha=0.5)
    _, (parts,) = fused_linear_losses(Head(t_h, t_w), [StudentTerm(Head(h, w), spec)], labels, mask, V)
    (parts.loss * 0.25).backward(retain_graph=True)
    once = h.grad.clone()
    with pytest.raises(RuntimeError, match="back-propagated twice"):
        parts.loss.backward()
    h.grad = None
    _, (parts,) = fused_linear_losses(Head(t_h, t_w), [StudentTerm(Head(h, w), spec)], labels, mask, V)
    parts.loss.backward()
    torch.testing.assert_close(once * 4, h.grad)
    assert math.isfinite(parts.kd.item())


def test_mismatched_shapes_are_refused_with_the_head_named():
    labels, mask = _batch()
    h, w = (t.detach().float() for t in _inputs(14)[:2])
    with pytest.raises(ValueError, match="head 1: head weight"):
        fused_linear_losses(Head(h, w), [StudentTerm(Head(h, w[:V - 1]), SoftSpec())], labels, mask, V)
    with pytest.raises(ValueError, match="head 0: hidden states"):
        fused_linear_losses(Head(h[:, :3], w), [], labels, mask, V)
