"""Loss math against plain reference formulas: token-by-token float64 loops for the
values, and plain PyTorch (full log_softmax, autograd) for the gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

import codistill.losses as losses
from codistill.losses import distill_loss, next_token_targets, top1_agreement


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


def _autograd_reference(student, teacher, labels, mask, alpha, temp):
    """The naive objective: full fp32 softmaxes, autograd backward."""
    s, t, y = student[mask].float(), teacher[mask].float(), labels[mask]
    ce = F.cross_entropy(s, y)
    log_ps, log_pt = F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1)
    kd = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * temp**2
    return (1 - alpha) * ce + alpha * kd, ce, kd


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


@pytest.mark.parametrize("temp", [1.0, 2.0, 0.5])
def test_kd_value_matches_reference(temp, chunking):
    student, teacher, labels, mask = _batch(seed=1)
    got = distill_loss(student, labels, mask, teacher, alpha=0.3, temperature=temp)
    kd = _ref_kl(student, teacher, mask, temp)
    assert got.kd.item() == pytest.approx(kd, rel=1e-5)
    assert got.loss.item() == pytest.approx(0.7 * _ref_ce(student, labels, mask) + 0.3 * kd, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_gradient_matches_autograd_of_the_naive_loss(alpha, temp, chunking):
    student, teacher, labels, mask = _batch(seed=2)
    mine = student.clone().requires_grad_(True)
    ref = student.clone().requires_grad_(True)
    distill_loss(mine, labels, mask, teacher, alpha, temp).loss.backward()
    _autograd_reference(ref, teacher, labels, mask, alpha, temp)[0].backward()
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-4, atol=1e-7)
    assert torch.count_nonzero(mine.grad[~mask]) == 0


def test_kd_gradient_is_t_times_prob_difference():
    """d/dz_s [T² · mean KL] = T · (softmax(z_s/T) − softmax(z_t/T)) / n on real targets."""
    student, teacher, labels, mask = _batch(seed=4)
    student.requires_grad_(True)
    temp = 2.0
    distill_loss(student, labels, mask, teacher, alpha=1.0, temperature=temp).loss.backward()
    n = int(mask.sum())
    expected = temp * (torch.softmax(student.detach() / temp, -1) - torch.softmax(teacher / temp, -1)) / n
    expected[~mask] = 0.0
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)


def test_teacher_logits_are_constants():
    student, teacher, labels, mask = _batch(seed=5)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    distill_loss(student, labels, mask, teacher, 0.5, 2.0).loss.backward()
    assert teacher.grad is None


def test_padded_vocabulary_slice_and_bf16_inputs():
    student, teacher, labels, mask = _batch(seed=6)
    padded = torch.cat([student, torch.randn(*student.shape[:2], 5) * 100], -1).requires_grad_(True)
    distill_loss(padded[..., :11], labels, mask, teacher, 0.5, 1.0).loss.backward()
    assert torch.count_nonzero(padded.grad[..., 11:]) == 0
    low = distill_loss(student.bfloat16(), labels, mask, teacher.bfloat16(), 0.5, 1.0)
    full = distill_loss(student.bfloat16().float(), labels, mask, teacher.bfloat16().float(), 0.5, 1.0)
    assert low.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)


def test_a_scaled_loss_scales_the_gradient():
    student, teacher, labels, mask = _batch(seed=7)
    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    distill_loss(a, labels, mask, teacher, 0.5, 1.0).loss.backward()
    (distill_loss(b, labels, mask, teacher, 0.5, 1.0).loss / 4).backward()  # gradient accumulation
    torch.testing.assert_close(b.grad, a.grad / 4)


def test_kl_is_zero_for_identical_distributions_and_positive_otherwise():
    student, teacher, labels, mask = _batch(seed=3)
    assert distill_loss(teacher, labels, mask, teacher, 1.0, 2.0).kd.item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(student, labels, mask, teacher, 1.0, 2.0).kd.item() > 0


def test_no_real_target_gives_zero_loss_and_gradient():
    student, teacher, labels, _ = _batch()
    student.requires_grad_(True)
    none = torch.zeros(student.shape[:2], dtype=torch.bool)
    parts = distill_loss(student, labels, none, teacher, 0.5, 1.0)
    parts.loss.backward()
    assert parts.loss.item() == 0.0 and torch.count_nonzero(student.grad) == 0


def test_mismatched_vocabularies_are_refused():
    student, teacher, labels, mask = _batch()
    with pytest.raises(ValueError, match="slice both"):
        distill_loss(student[..., :-1], labels, mask, teacher)


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
    assert top1_agreement(s, t, mask) == 1
