"""Loss math against reference formulas written independently here: token-by-token
float64 loops for CE and KL values, and plain float64 PyTorch (full softmax, autograd)
for every divergence's value and gradient."""
import math

import pytest
import torch

import codistill.losses as losses
from codistill.losses import SoftSpec, Targets, distill_loss, next_token_targets, top1_agreement, topk_targets

def _batch(seed=0, b=3, s=7, v=11, pad_from=(7, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, s, v, generator=g) * 2
    teacher = torch.randn(b, s, v, generator=g) * 2
    labels = torch.randint(0, v, (b, s), generator=g)
    mask = torch.zeros(b, s, dtype=torch.bool)
    for i, n in enumerate(pad_from):
        mask[i, :n] = True
    return student, teacher, labels, mask


def _ref_ce(logits, labels, mask):
    total, n = 0.0, 0
    for i in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if mask[i, t]:
                row = logits[i, t].double()
                total += -(row[int(labels[i, t])].item() - math.log(sum(math.exp(x) for x in row.tolist())))
                n += 1
    return total / n


def _ref_kl(student, teacher, mask, temp):
    total, n = 0.0, 0
    for i in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not mask[i, t]:
                continue
            zs = [x / temp for x in student[i, t].double().tolist()]
            zt = [x / temp for x in teacher[i, t].double().tolist()]
            ls = math.log(sum(math.exp(x) for x in zs))
            lt = math.log(sum(math.exp(x) for x in zt))
            total += sum(math.exp(a - lt) * ((a - lt) - (b - ls)) for a, b in zip(zt, zs))
            n += 1
    return temp**2 * total / n


def _ref_divergence(div, beta, p, q):
    """Per-row D(P || Q) for probability rows, float64, straight from the definitions."""
    if div == "jsd" and beta == 0.0:
        div = "forward_kl"
    if div == "jsd" and beta == 1.0:
        div = "reverse_kl"
    if div == "forward_kl":
        return (p * (p.log() - q.log())).sum(-1)
    if div == "reverse_kl":
        return (q * (q.log() - p.log())).sum(-1)
    if div == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    return 0.5 * (p - q).abs().sum(-1)


def _reference(student, teacher, labels, mask, div="forward_kl", beta=0.5, alpha=0.5, temp=1.0, k=None):
    """(loss, ce, kd) of the naive objective in float64; backward through autograd."""
    s, t, y = student[mask].double(), teacher[mask].double(), labels[mask]
    ce = torch.nn.functional.cross_entropy(s, y)
    p, q = torch.softmax(t / temp, -1), torch.softmax(s / temp, -1)
    if k is not None:  # coarsen both to the teacher's top-k plus one tail bucket
        ids = p.topk(k, -1).indices
        p_top, q_top = p.gather(1, ids), q.gather(1, ids)
        p = torch.cat([p_top, (1 - p_top.sum(-1, keepdim=True)).clamp(min=1e-300)], 1)
        q = torch.cat([q_top, (1 - q_top.sum(-1, keepdim=True)).clamp(min=1e-300)], 1)
    kd = _ref_divergence(div, beta, p, q).mean() * temp**2
    return (1 - alpha) * ce + alpha * kd, ce, kd


def full(teacher, temp=1.0):
    return Targets(temperature=temp, logits=teacher)


@pytest.fixture(params=[False, True], ids=["one-chunk", "many-chunks"])
def chunking(request, monkeypatch):
    if request.param:  # 11-wide vocabulary: 2 positions per chunk
        monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 22)


def test_cross_entropy_matches_reference_and_ignores_padding(chunking):
    student, _, labels, mask = _batch()
    got = distill_loss(student, labels, mask)
    assert got.ce.item() == pytest.approx(_ref_ce(student, labels, mask), rel=1e-6)
    assert got.loss.item() == got.ce.item() and got.kd.item() == 0.0
    garbage = student.clone()
    garbage[~mask] = 1e4  # padding positions must not matter
    assert distill_loss(garbage, labels, mask).ce.item() == pytest.approx(got.ce.item(), rel=1e-6)
    assert torch.count_nonzero(got.token_ce[~mask.reshape(-1)]) == 0


@pytest.mark.parametrize("temp", [1.0, 2.0, 0.5])
def test_forward_kl_value_matches_token_loop(temp, chunking):
    student, teacher, labels, mask = _batch(seed=1)
    got = distill_loss(student, labels, mask, full(teacher, temp), SoftSpec(alpha=0.3))
    kd = _ref_kl(student, teacher, mask, temp)
    assert got.kd.item() == pytest.approx(kd, rel=1e-5)
    assert got.loss.item() == pytest.approx(0.7 * _ref_ce(student, labels, mask) + 0.3 * kd, rel=1e-5)


DIVS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0), ("jsd", 0.2), ("tvd", 0.5)]


@pytest.mark.parametrize("div, beta", DIVS)
@pytest.mark.parametrize("temp", [1.0, 2.5])
@pytest.mark.parametrize("k", [None, 3, 11], ids=["full", "top3", "top-all"])
def test_every_divergence_value_and_gradient_match_the_reference(div, beta, temp, k, chunking):
    student, teacher, labels, mask = _batch(seed=2)
    alpha = 0.6
    spec = SoftSpec(divergence=div, beta=beta, alpha=alpha)
    targets = full(teacher, temp) if k is None else topk_targets(teacher, k, temp)
    mine = student.clone().requires_grad_(True)
    got = distill_loss(mine, labels, mask, targets, spec)
    got.loss.backward()
    ref_in = student.clone().double().requires_grad_(True)
    ref_loss, ref_ce, ref_kd = _reference(ref_in, teacher, labels, mask, div, beta, alpha, temp, k)
    ref_loss.backward()
    assert got.kd.item() == pytest.approx(ref_kd.item(), rel=1e-5, abs=1e-7)
    assert got.loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    torch.testing.assert_close(mine.grad, ref_in.grad.float(), rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(mine.grad[~mask]) == 0


@pytest.mark.parametrize("div, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2),
                                      ("tvd", 0.5)])
def test_peaked_distributions_whose_probabilities_underflow(div, beta):
    """Logits 60 apart: most of P and Q is 0 in fp32 (M too, where both are), which must give 0, not NaN."""
    student, teacher, labels, mask = _batch(seed=9)
    student, teacher = student * 25, teacher * 25
    spec = SoftSpec(divergence=div, beta=beta, alpha=0.6)
    mine = student.clone().requires_grad_(True)
    got = distill_loss(mine, labels, mask, full(teacher), spec)
    got.loss.backward()
    ref_in = student.clone().double().requires_grad_(True)
    ref_loss, _, ref_kd = _reference(ref_in, teacher, labels, mask, div, beta, 0.6)
    ref_loss.backward()
    assert got.kd.item() == pytest.approx(ref_kd.item(), rel=1e-5)
    torch.testing.assert_close(mine.grad, ref_in.grad.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("div, beta", DIVS)
@pytest.mark.parametrize("spread", [40.0, 52.0], ids=["tail-1e-35", "tail-1e-45"])
def test_top_k_when_the_students_tail_underflows(div, beta, spread):
    """The student puts ~1e-35, or less than fp32's smallest number, on each token outside the teacher's
    top 3, the teacher does not: the tail's mass, and each tail token's share of it, must come from logits
    (fp32 probabilities lose them), against a float64 reference that keeps the tail in log space."""
    student = torch.full((1, 4, 11), -spread)
    student[..., :3] = spread + torch.arange(4.0).view(1, 4, 1) * torch.tensor([0.5, 0.0, -0.5])
    teacher = torch.zeros(1, 4, 11)
    teacher[..., :3] = torch.tensor([3.0, 2.5, 2.0])
    labels, mask = torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool)
    spec = SoftSpec(divergence=div, beta=beta, alpha=1.0)
    mine = student.clone().requires_grad_(True)
    got = distill_loss(mine, labels, mask, topk_targets(teacher, 3, 1.0), spec)
    got.loss.backward()
    ref_in = student.clone().double().requires_grad_(True)
    log_q, log_p = ref_in[0].log_softmax(-1), teacher[0].double().log_softmax(-1)
    buckets = lambda lp: torch.cat([lp[:, :3], lp[:, 3:].logsumexp(-1, keepdim=True)], 1)  # noqa: E731
    ref = _ref_divergence(div, beta, buckets(log_p).exp(), buckets(log_q).exp()).mean()
    ref.backward()
    assert got.kd.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.isfinite(mine.grad).all()
    torch.testing.assert_close(mine.grad, ref_in.grad.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_bf16_logits_get_the_fp32_computation_rounded(div, temp):
    """bf16 logits: the loss is computed in fp32 (as from their fp32 copies) and the gradient rounded once."""
    student, teacher, labels, mask = _batch(seed=10)
    spec = SoftSpec(divergence=div, alpha=0.5)
    low = student.bfloat16().requires_grad_(True)
    wide = student.bfloat16().float().requires_grad_(True)
    a = distill_loss(low, labels, mask, full(teacher.bfloat16(), temp), spec)
    b = distill_loss(wide, labels, mask, full(teacher.bfloat16().float(), temp), spec)
    a.loss.backward()
    b.loss.backward()
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)
    assert low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(low.grad, wide.grad.bfloat16())


@pytest.mark.parametrize("div, beta", DIVS)
def test_top_k_with_k_equal_to_vocab_is_the_full_loss(div, beta):
    student, teacher, labels, mask = _batch(seed=8)
    spec = SoftSpec(divergence=div, beta=beta, alpha=1.0)
    a, b = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    whole = distill_loss(a, labels, mask, full(teacher, 2.0), spec)
    top = distill_loss(b, labels, mask, topk_targets(teacher, 11, 2.0), spec)
    whole.loss.backward()
    top.loss.backward()
    assert top.kd.item() == pytest.approx(whole.kd.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("div, beta", DIVS)
def test_chunked_equals_unchunked(div, beta):
    student, teacher, labels, mask = _batch(seed=9, b=4, s=9)
    spec = SoftSpec(divergence=div, beta=beta, alpha=0.4)
    results = []
    for chunk in (None, 1, 5):
        x = student.clone().requires_grad_(True)
        parts = distill_loss(x, labels, mask, full(teacher, 1.5), spec, chunk_tokens=chunk)
        parts.loss.backward()
        results.append((parts.loss.item(), x.grad))
    for loss, grad in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-8)


def test_topk_targets_hold_the_teachers_best_tokens_and_the_rest_of_the_mass():
    _, teacher, _, _ = _batch(seed=10)
    t = topk_targets(teacher, 4, 2.0)
    p = torch.softmax(teacher.reshape(-1, 11).double() / 2.0, -1)
    assert torch.equal(t.topk_ids.long(), p.topk(4, -1).indices)
    mass = t.topk_logp.double().exp().sum(-1) + t.tail_logp.double().exp()
    torch.testing.assert_close(mass, torch.ones_like(mass), rtol=0, atol=1e-6)
    assert t.nbytes() < teacher.numel() * teacher.element_size()


def test_token_filter_uses_only_positions_where_the_teacher_is_better():
    student, teacher, labels, mask = _batch(seed=11)
    teacher_ce = distill_loss(teacher, labels, mask).token_ce
    targets = Targets(temperature=1.0, logits=teacher, token_ce=teacher_ce)
    x = student.clone().requires_grad_(True)
    gated = distill_loss(x, labels, mask, targets, SoftSpec(alpha=1.0, token_filter=True))
    gated.loss.backward()
    student_ce = distill_loss(student, labels, mask).token_ce
    keep = (teacher_ce < student_ce) & mask.reshape(-1)
    assert 0 < int(keep.sum()) < int(mask.sum())
    assert gated.filtered.item() == pytest.approx(int(keep.sum()) / int(mask.sum()))
    flat_grad = x.grad.reshape(-1, 11)
    assert torch.count_nonzero(flat_grad[~keep]) == 0 and torch.count_nonzero(flat_grad[keep]) > 0
    n = int(mask.sum())
    kl = (torch.softmax(teacher, -1) * (torch.log_softmax(teacher, -1) - torch.log_softmax(student, -1))).sum(-1)
    assert gated.kd.item() == pytest.approx(float(kl.reshape(-1)[keep].sum()) / n, rel=1e-5)


def test_kd_gradient_is_t_times_prob_difference():
    """d/dz_s [T² · mean KL] = T · (softmax(z_s/T) − softmax(z_t/T)) / n on real targets."""
    student, teacher, labels, mask = _batch(seed=4)
    student.requires_grad_(True)
    temp = 2.0
    distill_loss(student, labels, mask, full(teacher, temp), SoftSpec(alpha=1.0)).loss.backward()
    n = int(mask.sum())
    expected = temp * (torch.softmax(student.detach() / temp, -1) - torch.softmax(teacher / temp, -1)) / n
    expected[~mask] = 0.0
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)


def test_teacher_logits_are_constants():
    student, teacher, labels, mask = _batch(seed=5)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    distill_loss(student, labels, mask, full(teacher, 2.0), SoftSpec(alpha=0.5)).loss.backward()
    assert teacher.grad is None


def test_padded_vocabulary_slice_and_bf16_inputs():
    student, teacher, labels, mask = _batch(seed=6)
    padded = torch.cat([student, torch.randn(*student.shape[:2], 5) * 100], -1).requires_grad_(True)
    distill_loss(padded[..., :11], labels, mask, full(teacher), SoftSpec(alpha=0.5)).loss.backward()
    assert torch.count_nonzero(padded.grad[..., 11:]) == 0
    low = distill_loss(student.bfloat16(), labels, mask, full(teacher.bfloat16()), SoftSpec(alpha=0.5))
    wide = distill_loss(student.bfloat16().float(), labels, mask, full(teacher.bfloat16().float()), SoftSpec(alpha=0.5))
    assert low.loss.item() == pytest.approx(wide.loss.item(), rel=1e-6)


def test_a_scaled_loss_scales_the_gradient():
    student, teacher, labels, mask = _batch(seed=7)
    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    distill_loss(a, labels, mask, full(teacher), SoftSpec(alpha=0.5)).loss.backward()
    (distill_loss(b, labels, mask, full(teacher), SoftSpec(alpha=0.5)).loss / 4).backward()  # accumulation
    torch.testing.assert_close(b.grad, a.grad / 4)


def test_divergences_are_zero_for_identical_distributions_and_positive_otherwise():
    student, teacher, labels, mask = _batch(seed=3)
    for div, beta in DIVS:
        spec = SoftSpec(divergence=div, beta=beta, alpha=1.0)
        assert distill_loss(teacher, labels, mask, full(teacher, 2.0), spec).kd.item() == pytest.approx(0.0, abs=1e-6)
        assert distill_loss(student, labels, mask, full(teacher, 2.0), spec).kd.item() > 0


def test_no_counted_position_gives_zero_loss_and_gradient():
    student, teacher, labels, _ = _batch()
    student.requires_grad_(True)
    none = torch.zeros(student.shape[:2], dtype=torch.bool)
    parts = distill_loss(student, labels, none, full(teacher), SoftSpec(alpha=0.5))
    parts.loss.backward()
    assert parts.loss.item() == 0.0 and torch.count_nonzero(student.grad) == 0


def test_bad_arguments_are_refused():
    student, teacher, labels, mask = _batch()
    with pytest.raises(ValueError, match="slice both"):
        distill_loss(student[..., :-1], labels, mask, full(teacher))
    with pytest.raises(ValueError, match="unknown divergence"):
        distill_loss(student, labels, mask, full(teacher), SoftSpec(divergence="kl"))
    with pytest.raises(ValueError, match="token_filter needs"):
        distill_loss(student, labels, mask, full(teacher), SoftSpec(token_filter=True))


def test_next_token_targets_align_positions():
    ids = torch.tensor([[5, 6, 7, 0]])
    am = torch.tensor([[1, 1, 1, 0]])
    labels, mask = next_token_targets(ids, am)
    assert labels.tolist() == [[6, 7, 0, 0]]
    assert mask.tolist() == [[True, True, False, False]]


def test_top1_agreement_counts_masked_tokens_only():
    s = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    t = torch.tensor([[[0.0, 2.0], [0.0, 2.0], [3.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    assert top1_agreement(s.argmax(-1), t.argmax(-1), mask) == 1


@pytest.mark.parametrize("div,temp", [("forward_kl", 1.0), ("jsd", 2.0)])
def test_panel_stats_match_the_definitions(div, temp, chunking):
    student, teacher, labels, mask = _batch(b=2, s=8, pad_from=(8, 5))
    stats = losses.panel_stats(student, labels, mask, full(teacher, temp), SoftSpec(div, 0.5), k=3,
                               teacher_logits=teacher)
    s, t = student[mask].double(), teacher[mask].double()
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    assert stats["teacher_entropy"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)
    assert stats["student_entropy"] == pytest.approx(float(-(q * q.log()).sum(-1).mean()), rel=1e-5)
    top = s.topk(3, -1).indices
    assert stats["topk_mass"] == pytest.approx(float(p.gather(1, top).sum(-1).mean()), rel=1e-5)
    # Gradient norms of the summed per-token terms with respect to the student's logits.
    z = s.clone().requires_grad_(True)
    pt, qt = torch.softmax(t / temp, -1), torch.softmax(z / temp, -1)
    (g_kd,) = torch.autograd.grad((_ref_divergence(div, 0.5, pt, qt) * temp**2).sum(), z)
    z2 = s.clone().requires_grad_(True)
    (g_ce,) = torch.autograd.grad(torch.nn.functional.cross_entropy(z2, labels[mask], reduction="sum"), z2)
    assert stats["kd_ce_grad_ratio"] == pytest.approx(float(g_kd.norm() / g_ce.norm()), rel=1e-4)
    # KD by quarter of the sequence (8 positions: 0-1, 2-3, 4-5, 6-7).
    per_token = torch.zeros(mask.shape, dtype=torch.float64)
    per_token[mask] = _ref_divergence(div, 0.5, pt, torch.softmax(s / temp, -1)) * temp**2
    for lo in (0, 2, 4, 6):
        m = mask[:, lo:lo + 2]
        want = float(per_token[:, lo:lo + 2][m].mean())
        assert stats[f"kd_pos_{lo:03d}-{lo + 1:03d}"] == pytest.approx(want, rel=1e-5)
    cached = losses.panel_stats(student, labels, mask, topk_targets(teacher, 11, temp), SoftSpec(div, 0.5), k=3)
    assert "teacher_entropy" not in cached  # a cache holds no full teacher distribution
    assert cached["kd_ce_grad_ratio"] == pytest.approx(stats["kd_ce_grad_ratio"], rel=1e-4)  # k = V: the full loss


def test_a_teachers_logsumexp_from_its_own_loss_gives_the_students_loss_unchanged(chunking):
    student, teacher, labels, mask = _batch()
    own = distill_loss(teacher, labels, mask)
    torch.testing.assert_close(own.lse, torch.logsumexp(teacher.reshape(-1, 11), -1))
    spec = SoftSpec(alpha=0.5)
    a, b = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    plain = distill_loss(a, labels, mask, full(teacher), spec)
    reused = distill_loss(b, labels, mask, Targets(1.0, logits=teacher, lse=own.lse), spec)
    torch.testing.assert_close(reused.loss, plain.loss)
    plain.loss.backward()
    reused.loss.backward()
    torch.testing.assert_close(b.grad, a.grad)
