"""The benefit gate's math against a reference, and its state machine (no process group)."""
import math

import pytest
import torch

from codistill.gate import BenefitState, consistency, cosine, hypergradient_terms, update
from codistill.losses import SoftSpec, Targets, distill_loss


class TinyLM(torch.nn.Module):
    """Embedding -> tanh MLP -> head, in float64: enough for a non-trivial hypergradient."""

    def __init__(self, vocab: int = 11, width: int = 6, tied: bool = False):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width, dtype=torch.float64)
        self.mix = torch.nn.Linear(width, width, dtype=torch.float64)
        self.head = torch.nn.Linear(width, vocab, bias=False, dtype=torch.float64)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def _batch(seed: int, vocab: int = 11, n: int = 24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n,), generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    mask = torch.rand(n, generator=g) > 0.2
    return ids, labels, mask


def _ce64(logits, labels, mask):
    """Reference CE in float64 (distill_loss computes in fp32, too coarse for a finite difference)."""
    token = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    return (token * mask).sum() / mask.sum()


def _kl64(logits, teacher_logits, mask, temperature):
    """Reference T²·KL(teacher ‖ student) at temperature T, in float64."""
    p = torch.log_softmax(teacher_logits / temperature, -1)
    q = torch.log_softmax(logits / temperature, -1)
    token = (p.exp() * (p - q)).sum(-1)
    return temperature ** 2 * (token * mask).sum() / mask.sum()


@pytest.mark.parametrize("tied,temperature", [(False, 1.0), (True, 2.0)])
def test_dot_is_the_one_step_hypergradient(tied, temperature):
    """d/dα L_probe(θ − lr·∇[(1−α)·CE + α·T²·KL]) equals −lr·⟨g_probe, g_soft − g_hard⟩ to first order in
    lr: the gate's inner product against a central finite difference of a real SGD step, in float64."""
    torch.manual_seed(0)
    vocab = 11
    model = TinyLM(vocab, tied=tied)
    ids, labels, mask = _batch(1, vocab)
    probe_ids, probe_labels, probe_mask = _batch(2, vocab)
    teacher_logits = torch.randn(len(ids), vocab, dtype=torch.float64) * 2
    mask, probe_mask = mask.double(), probe_mask.double()
    params = [p for p in model.parameters() if p.requires_grad]

    def blended(alpha):
        logits = model(ids)
        return (1 - alpha) * _ce64(logits, labels, mask) + alpha * _kl64(logits, teacher_logits, mask, temperature)

    def probe_ce():
        return _ce64(model(probe_ids), probe_labels, probe_mask)

    dot, probe_sq, diff_sq = hypergradient_terms(params, lambda: blended(1.0) - blended(0.0), probe_ce)
    assert all(p.grad is None for p in params)  # nothing accumulated into .grad

    def probe_after_step(alpha, lr):
        grads = torch.autograd.grad(blended(alpha), params)
        with torch.no_grad():
            saved = [p.clone() for p in params]
            for p, g in zip(params, grads):
                p -= lr * g
            value = float(probe_ce())
            for p, s in zip(params, saved):
                p.copy_(s)
        return value

    lr, alpha, eps = 1e-6, 0.3, 1e-2
    finite = (probe_after_step(alpha + eps, lr) - probe_after_step(alpha - eps, lr)) / (2 * eps)
    assert finite == pytest.approx(-lr * dot, rel=1e-4)
    g_probe = torch.autograd.grad(probe_ce(), params)
    assert probe_sq == pytest.approx(sum(float((g * g).sum()) for g in g_probe), rel=1e-12)
    assert diff_sq > 0 and abs(cosine(dot, probe_sq, diff_sq)) <= 1.0


@pytest.mark.parametrize("divergence,temperature,topk,token_gate", [
    ("forward_kl", 1.0, False, False), ("reverse_kl", 2.0, False, False), ("jsd", 1.0, True, False),
    ("tvd", 1.0, False, False), ("forward_kl", 1.5, True, True)])
def test_the_training_loss_is_linear_in_alpha(divergence, temperature, topk, token_gate):
    """The trainer's soft − hard (distill_loss at α = 1 minus at α = 0) is d loss / dα only if the blended
    loss is linear in α, values and gradients, for every divergence, top-k targets and gating."""
    from codistill.losses import topk_targets

    torch.manual_seed(1)
    vocab = 11
    logits = torch.randn(24, vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (24,))
    mask = torch.rand(24) > 0.2
    teacher = torch.randn(24, vocab) * 2
    targets = topk_targets(teacher, 4, temperature) if topk else Targets(temperature=temperature, logits=teacher)
    targets.token_ce = torch.nn.functional.cross_entropy(teacher, labels, reduction="none")

    def loss(alpha):
        return distill_loss(logits, labels, mask, targets, SoftSpec(divergence, 0.3, alpha, token_gate)).loss

    alpha = 0.37
    expected = loss(0.0) + alpha * (loss(1.0) - loss(0.0))
    assert float(loss(alpha).detach()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-6)
    grad = torch.autograd.grad(loss(alpha), logits)[0]
    grad0 = torch.autograd.grad(loss(0.0), logits)[0]
    grad1 = torch.autograd.grad(loss(1.0), logits)[0]
    torch.testing.assert_close(grad, grad0 + alpha * (grad1 - grad0), rtol=1e-4, atol=1e-7)


def test_cosine_of_vanishing_gradients_is_zero():
    assert cosine(0.0, 0.0, 1.0) == 0.0
    assert cosine(2.0, 4.0, 1.0) == pytest.approx(1.0)
    assert cosine(-1.0, 1.0, 4.0) == pytest.approx(-0.5)


def test_a_consistent_signal_moves_the_openness_by_the_rate_per_measurement():
    state = BenefitState(0.5)
    opens = []
    for _ in range(4):
        state = update(state, 0.05, rate=0.2, decay=0.8)  # small but always positive: fully consistent
        opens.append(state.openness)
    # z = EMA(c)/EMA(|c|) = 1 − 0.8^n: the first readings count for less, then the full rate.
    assert opens == pytest.approx([0.54, 0.612, 0.7096, 0.82768])
    assert consistency(state) == pytest.approx(1 - 0.8 ** 4)
    for _ in range(8):
        state = update(state, -0.3, rate=0.2, decay=0.8)
    assert state.openness == 0.0 and state.measurements == 12


def test_noise_around_zero_leaves_the_gate_near_where_it_was():
    state = BenefitState(0.5)
    for k in range(40):
        state = update(state, 0.2 if k % 2 else -0.2, rate=0.2, decay=0.8)
    assert abs(state.openness - 0.5) < 0.15
    assert abs(consistency(state)) < 0.2


def test_state_round_trips_through_its_checkpoint_form():
    state = update(update(BenefitState(0.25), 0.1, 0.2, 0.8), -0.4, 0.2, 0.8)
    again = BenefitState.from_dict(state.to_dict())
    assert again == state
    assert math.isclose(update(again, 0.3, 0.2, 0.8).openness, update(state, 0.3, 0.2, 0.8).openness)
