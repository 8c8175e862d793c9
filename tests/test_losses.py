"""Loss math against plain reference formulas, written token by token in float64."""
import math

import pytest
import torch

from codistill.losses import blend, cross_entropy, forward_kl, shift_for_next_token, top1_agreement


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


def test_cross_entropy_matches_reference_and_ignores_padding():
    student, _, labels, mask = _batch()
    got = cross_entropy(student, labels, mask)
    assert got.item() == pytest.approx(_ref_ce(student, labels, mask), rel=1e-6)
    garbage = student.clone()
    garbage[~mask] = 1e4  # padding positions must not matter
    assert cross_entropy(garbage, labels, mask).item() == pytest.approx(got.item(), rel=1e-6)


@pytest.mark.parametrize("temp", [1.0, 2.0, 0.5])
def test_forward_kl_value_matches_reference(temp):
    student, teacher, _, mask = _batch(seed=1)
    got = forward_kl(student, teacher, mask, temp)
    assert got.item() == pytest.approx(_ref_kl(student, teacher, mask, temp), rel=1e-5)


@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_forward_kl_gradient_is_t_times_prob_difference(temp):
    """d/dz_s [T² · mean KL] = T · (softmax(z_s/T) − softmax(z_t/T)) / N on real tokens, 0 on padding."""
    student, teacher, _, mask = _batch(seed=2)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    forward_kl(student, teacher, mask, temp).backward()
    n = int(mask.sum())
    expected = temp * (torch.softmax(student.detach() / temp, -1) - torch.softmax(teacher.detach() / temp, -1)) / n
    expected[~mask] = 0.0
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)
    assert teacher.grad is None  # the teacher's logits are targets, never trained through the KD term


def test_kl_is_zero_for_identical_distributions_and_positive_otherwise():
    student, teacher, _, mask = _batch(seed=3)
    assert forward_kl(teacher, teacher, mask, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert forward_kl(student, teacher, mask, 2.0).item() > 0


def test_empty_mask_gives_zero_with_a_graph():
    student, teacher, labels, _ = _batch()
    student.requires_grad_(True)
    none = torch.zeros(student.shape[:2], dtype=torch.bool)
    loss = cross_entropy(student, labels, none) + forward_kl(student, teacher, none, 1.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(student.grad) == 0


def test_blend_weights_the_two_terms():
    ce, kd = torch.tensor(2.0), torch.tensor(6.0)
    assert blend(ce, kd, 0.0).item() == 2.0
    assert blend(ce, kd, 1.0).item() == 6.0
    assert blend(ce, kd, 0.25).item() == pytest.approx(0.75 * 2 + 0.25 * 6)


def test_mismatched_vocabularies_are_refused():
    student, teacher, _, mask = _batch()
    with pytest.raises(ValueError, match="slice both"):
        forward_kl(student[..., :-1], teacher, mask)


def test_shift_aligns_positions_with_next_tokens():
    ids = torch.tensor([[5, 6, 7, 0]])
    am = torch.tensor([[1, 1, 1, 0]])
    logits = torch.arange(4 * 3, dtype=torch.float).reshape(1, 4, 3)
    shifted, labels, mask = shift_for_next_token(logits, ids, am)
    assert shifted.shape == (1, 3, 3)
    assert labels.tolist() == [[6, 7, 0]]
    assert mask.tolist() == [[True, True, False]]


def test_top1_agreement_counts_masked_tokens_only():
    s = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    t = torch.tensor([[[0.0, 2.0], [0.0, 2.0], [3.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    assert top1_agreement(s, t, mask) == (1, 2)
