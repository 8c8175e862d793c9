"""The benefit gate's math against a reference, and its state machine (no process group)."""
import math

import pytest
import torch

from codistill import gate
from codistill.gate import (TERMS, BenefitState, hypergradient_terms, length_weight, signal, signal_parts, step_products,
                            update)
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


@pytest.mark.parametrize("tied,temperature,alpha", [(False, 1.0, 0.3), (True, 2.0, 0.0), (False, 1.5, 0.8)])
def test_signal_is_the_alpha_derivative_of_a_fixed_length_steps_progress(tied, temperature, alpha, monkeypatch):
    """A step of fixed length η along the update g_α = ∇[(1−α)·CE + α·T²·KL] changes the probe CE by
    −η·cos(g_p, g_α)·‖g_p‖ to first order in η, so its derivative in α is −η·‖g_p‖·s: the gate's signal
    against a central finite difference of real normalised SGD steps, in float64."""
    torch.manual_seed(0)
    vocab = 11
    model = TinyLM(vocab, tied=tied)
    ids, labels, mask = _batch(1, vocab)
    probe_ids, probe_labels, probe_mask = _batch(2, vocab)
    teacher_logits = torch.randn(len(ids), vocab, dtype=torch.float64) * 2
    mask, probe_mask = mask.double(), probe_mask.double()
    params = [p for p in model.parameters() if p.requires_grad]

    def losses(*_):  # CE and T²·KL (both, whichever is asked for): the blended loss at α = 0 and α = 1
        logits = model(ids)
        return _ce64(logits, labels, mask), _kl64(logits, teacher_logits, mask, temperature)

    def diff_losses():  # CE and T²·KL − CE: the blended loss is hard + α·diff
        hard, soft = losses()
        return hard, soft - hard

    def probe_ce():
        return _ce64(model(probe_ids), probe_labels, probe_mask)

    terms = hypergradient_terms(params, alpha, losses, probe_ce)
    assert set(terms) == set(TERMS)
    assert all(p.grad is None for p in params)  # nothing accumulated into .grad

    def probe_after_step(a, eta):
        hard, diff = diff_losses()
        grads = torch.autograd.grad(hard + a * diff, params)
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        with torch.no_grad():
            saved = [p.clone() for p in params]
            for p, g in zip(params, grads):
                p -= eta * g / norm
            value = float(probe_ce())
            for p, s in zip(params, saved):
                p.copy_(s)
        return value

    eta, eps = 1e-7, 1e-3
    finite = (probe_after_step(alpha + eps, eta) - probe_after_step(alpha - eps, eta)) / (2 * eps)
    assert finite == pytest.approx(-eta * math.sqrt(terms["probe_sq"]) * signal(terms), rel=1e-3)
    # The terms are the gradients' own inner products.
    g_p = torch.autograd.grad(probe_ce(), params)
    assert terms["probe_sq"] == pytest.approx(sum(float((g * g).sum()) for g in g_p), rel=1e-12)
    hard, diff = diff_losses()
    g_a = torch.autograd.grad(hard + alpha * diff, params)
    assert terms["probe_update"] == pytest.approx(sum(float((x * y).sum()) for x, y in zip(g_p, g_a)), rel=1e-10)
    assert terms["update_sq"] == pytest.approx(sum(float((x * x).sum()) for x in g_a), rel=1e-10)
    g_d = torch.autograd.grad(diff_losses()[1], params)
    assert terms["update_diff"] == pytest.approx(sum(float((x * y).sum()) for x, y in zip(g_a, g_d)), rel=1e-10)
    assert terms["probe_diff"] == pytest.approx(sum(float((x * y).sum()) for x, y in zip(g_p, g_d)), rel=1e-10)
    # The ranks' summed products, with an all-reduce that stands for two ranks holding these same
    # gradients (it doubles them), are those of the doubled gradients; every element is summed once, all in
    # one all-reduce while they fit a bucket, in several when they do not (the same products either way).
    elements = sum(p.numel() for p in params)
    for bucket in (gate.SLICE, 40):
        monkeypatch.setattr(gate, "SLICE", bucket)
        calls = []
        doubled = hypergradient_terms(params, alpha, losses, probe_ce, lambda t: calls.append(t.shape) or t.mul_(2))
        assert sum(shape[1] for shape in calls) == elements and all(shape[0] == 2 for shape in calls)
        assert (len(calls) == 1) if bucket > elements else (len(calls) > 2)
        assert doubled["update_diff_all"] == pytest.approx(4 * terms["update_diff"], rel=1e-10)
        assert doubled["update_sq_all"] == pytest.approx(4 * terms["update_sq"], rel=1e-10)
        assert {k: doubled[k] for k in TERMS} == pytest.approx(terms, rel=1e-12)
    # ZeRO-3's way (each graph differentiated once, one forward per gradient) gives the same products.
    assert hypergradient_terms(params, alpha, losses, probe_ce, separate=True) == pytest.approx(terms, rel=1e-12)


def test_separate_forwards_draw_the_same_dropout_masks():
    """ZeRO-3's two forwards of the training batch see one model: with dropout on, the second replays the
    first's random draws, so the products equal those of one forward differentiated twice."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Dropout(0.5), torch.nn.Linear(12, 5)).double().train()
    x, probe_x = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)
    y, probe_y, target = torch.randint(0, 5, (9,)), torch.randint(0, 5, (9,)), torch.randn(9, 5, dtype=torch.float64)
    params = list(model.parameters())

    def losses(*_):
        logits = model(x)
        kl = torch.nn.functional.kl_div(logits.log_softmax(-1), target.log_softmax(-1), log_target=True,
                                        reduction="batchmean")
        return torch.nn.functional.cross_entropy(logits, y), kl

    def probe_ce():
        return torch.nn.functional.cross_entropy(model(probe_x), probe_y)

    torch.manual_seed(11)
    once = hypergradient_terms(params, 0.3, losses, probe_ce)
    after_once = torch.rand(1)
    torch.manual_seed(11)
    twice = hypergradient_terms(params, 0.3, losses, probe_ce, separate=True)
    assert twice == pytest.approx(once, rel=1e-12)
    assert torch.rand(1) == after_once  # and the stream goes on as after one forward


def test_less_label_noise_for_the_same_progress_opens_the_gate():
    """The term plain one-step hypergradients miss: a soft term that shortens the update (less noise)
    without changing its component along the held-out gradient raises the cosine, so s > 0."""
    # g_p = e1; g_0 = e1 + 2·e2 (noise along e2); g_d = −e2 (the soft term removes some noise).
    terms = {"probe_diff": 0.0, "probe_update": 1.0, "update_diff": -2.0, "update_sq": 5.0, "probe_sq": 1.0}
    assert signal(terms) > 0
    # And a soft term that pulls the update away from the held-out gradient closes it.
    terms = {"probe_diff": -1.0, "probe_update": 1.0, "update_diff": 0.0, "update_sq": 1.0, "probe_sq": 1.0}
    assert signal(terms) < 0
    assert signal(dict.fromkeys(TERMS, 0.0)) == 0.0
    pull, length = signal_parts(terms)
    assert pull + length == pytest.approx(signal(terms)) and pull == pytest.approx(-1.0) and length == 0.0


@pytest.mark.parametrize("divergence,temperature,topk,token_filter", [
    ("forward_kl", 1.0, False, False), ("reverse_kl", 2.0, False, False), ("jsd", 1.0, True, False),
    ("tvd", 1.0, False, False), ("forward_kl", 1.5, True, True)])
def test_the_training_loss_is_linear_in_alpha(divergence, temperature, topk, token_filter):
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
        return distill_loss(logits, labels, mask, targets, SoftSpec(divergence, 0.3, alpha, token_filter)).loss

    alpha = 0.37
    expected = loss(0.0) + alpha * (loss(1.0) - loss(0.0))
    assert float(loss(alpha).detach()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-6)
    grad = torch.autograd.grad(loss(alpha), logits)[0]
    grad0 = torch.autograd.grad(loss(0.0), logits)[0]
    grad1 = torch.autograd.grad(loss(1.0), logits)[0]
    torch.testing.assert_close(grad, grad0 + alpha * (grad1 - grad0), rtol=1e-4, atol=1e-7)


def test_consistent_evidence_opens_or_shuts_the_gate_and_noise_leaves_it_near_init():
    state = BenefitState(0.5)
    for _ in range(3):
        state = update(state, 0.05, init=0.5, gain=0.25, decay=0.9)  # small but always positive
    # t = S/√Q = s·(1 + 0.9 + 0.81)/√(s²·(1 + 0.9 + 0.81)) = √2.71 for a constant signal s
    assert state.evidence == pytest.approx(math.sqrt(2.71))
    assert state.openness == pytest.approx(min(1.0, 0.5 + 0.25 * state.evidence))
    for _ in range(30):
        state = update(state, 0.05, init=0.5, gain=0.25, decay=0.9)
    assert state.openness == 1.0 and state.evidence <= math.sqrt(1 / 0.1) + 1e-9
    for _ in range(30):
        state = update(state, -0.2, init=0.5, gain=0.25, decay=0.9)
    assert state.openness == 0.0 and state.measurements == 63  # it changed its mind: the past is forgotten
    noise = BenefitState(0.5)
    g = torch.Generator().manual_seed(3)
    opens = []
    for _ in range(200):
        noise = update(noise, float(torch.randn((), generator=g)), init=0.5, gain=0.25, decay=0.9)
        opens.append(noise.openness)
    assert 0.35 < sum(opens) / len(opens) < 0.65 and sum(o in (0.0, 1.0) for o in opens) < 20


def test_state_round_trips_through_its_checkpoint_form():
    state = update(update(BenefitState(0.25), 0.1, 0.25, 0.2, 0.8), -0.4, 0.25, 0.2, 0.8)
    again = BenefitState.from_dict(state.to_dict())
    assert again == state
    assert update(again, 0.3, 0.25, 0.2, 0.8) == update(state, 0.3, 0.25, 0.2, 0.8)
    earlier = {**state.to_dict(), "lr_peak": 2e-3}  # an earlier release kept the student's peak lr here
    assert BenefitState.from_dict(earlier) == state


@pytest.mark.parametrize("mode, lr, peak, weight", [
    ("constant", 1e-4, 1e-3, 1.0), ("lr", 1e-4, 1e-3, 0.1), ("lr", 1e-3, 1e-3, 1.0),
    ("lr", 5e-4, 0.0, 1.0),  # no peak seen yet: nothing to weigh against
])
def test_the_length_term_is_weighted_by_the_learning_rate_over_its_peak_only_when_asked(mode, lr, peak, weight):
    assert length_weight(mode, lr, peak) == pytest.approx(weight)


def test_with_several_ranks_the_steps_products_are_the_rank_averaged_gradients():
    """Summing the ranks' gradients separates noise from signal: with one micro-batch per rank the
    corrected products are exactly those of the mean gradient, which the step follows."""
    g = torch.Generator().manual_seed(5)
    world = 4
    updates = [torch.randn(7, generator=g, dtype=torch.float64) for _ in range(world)]
    diffs = [torch.randn(7, generator=g, dtype=torch.float64) for _ in range(world)]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    terms = {"update_diff": mean([float(u @ d) for u, d in zip(updates, diffs)]),
             "update_sq": mean([float(u @ u) for u in updates]),
             "update_diff_all": float(sum(updates) @ sum(diffs)), "update_sq_all": float(sum(updates) @ sum(updates))}
    diff, square = step_products(terms, world, batches=world)
    assert diff == pytest.approx(float(mean(updates) @ mean(diffs)))
    assert square == pytest.approx(float(mean(updates) @ mean(updates)))
    # One rank: the micro-batch's own products; and no summed terms means no correction.
    assert step_products(terms, 1, 1) == (terms["update_diff"], terms["update_sq"])
    local = {k: terms[k] for k in ("update_diff", "update_sq")}
    assert step_products(local, world, world) == (terms["update_diff"], terms["update_sq"])
