import math

import pytest

from codistill.schedules import alpha_at, lr_fraction


def test_burn_in_holds_alpha_at_zero():
    assert [alpha_at(s, 0.5, 3, 4, "linear") for s in range(4)] == [0.0, 0.0, 0.0, 0.0]


def test_linear_warmup_then_constant():
    values = [alpha_at(s, 0.8, 2, 4, "linear") for s in range(2, 9)]
    assert values == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8])


def test_cosine_warmup_midpoint_and_end():
    assert alpha_at(10 + 5, 0.6, 10, 10, "cosine") == pytest.approx(0.3)
    assert alpha_at(10 + 2, 0.6, 10, 10, "cosine") == pytest.approx(0.6 * 0.5 * (1 - math.cos(math.pi * 0.2)))
    assert alpha_at(25, 0.6, 10, 10, "cosine") == pytest.approx(0.6)


def test_no_warmup_jumps_to_alpha_max_after_burn_in():
    assert alpha_at(4, 0.5, 5, 0, "linear") == 0.0
    assert alpha_at(5, 0.5, 5, 0, "linear") == 0.5


def test_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="linear"):
        alpha_at(5, 0.5, 0, 10, "exp")


def test_lead_alpha_is_zero_while_the_teacher_is_behind():
    from codistill.schedules import lead_alpha

    assert lead_alpha(500, 0.5, 0, lead=-0.3, scale=0.2) == 0.0
    assert lead_alpha(500, 0.5, 0, lead=0.0, scale=0.2) == 0.0
    assert lead_alpha(500, 0.5, 0, lead=None, scale=0.2) == 0.0


def test_lead_alpha_follows_the_gap_and_respects_burn_in():
    from codistill.schedules import lead_alpha

    assert lead_alpha(10, 0.5, 0, lead=0.1, scale=0.2) == pytest.approx(0.25)
    assert lead_alpha(10, 0.5, 0, lead=0.4, scale=0.2) == 0.5
    assert lead_alpha(10, 0.5, 20, lead=0.4, scale=0.2) == 0.0


def test_lead_alpha_moves_only_when_the_gap_signal_does():
    from codistill.schedules import lead_alpha, ema

    gap, alphas = None, []
    for student_ce, teacher_ce in [(5.0, 5.5)] * 20 + [(5.0, 4.6)] * 40:
        alphas.append(lead_alpha(len(alphas), 0.5, 0, gap, 0.2))
        gap = ema(gap, student_ce - teacher_ce, 0.9)
    assert alphas[:21] == [0.0] * 21  # teacher behind: nothing moves
    assert all(b >= a for a, b in zip(alphas[20:], alphas[21:]))
    assert alphas[-1] == pytest.approx(0.5)


def test_ema_and_temperature_schedule():
    from codistill.schedules import ema, temperature_at

    assert ema(None, 3.0, 0.9) == 3.0
    assert ema(1.0, 2.0, 0.75) == pytest.approx(1.25)
    assert temperature_at(0, 11, 4.0, 1.0) == 4.0
    assert temperature_at(5, 11, 4.0, 1.0) == pytest.approx(2.5)
    assert temperature_at(10, 11, 4.0, 1.0) == 1.0
    assert temperature_at(7, 11, 2.0, None) == 2.0


@pytest.mark.parametrize("lr, peak, fraction", [(1e-3, 2e-3, 0.5), (2e-3, 2e-3, 1.0), (0.0, 2e-3, 0.0),
                                                (1e-3, 0.0, 1.0), (3e-3, 2e-3, 1.0)])
def test_lr_fraction_is_the_learning_rate_over_its_peak_clipped_to_one(lr, peak, fraction):
    assert lr_fraction(lr, peak) == pytest.approx(fraction)  # no peak yet (0): no decay


@pytest.mark.parametrize("schedule, own, lead, expected", [
    ("constant", 3, None, 0.0),  # still in its burn-in
    ("constant", 4, None, 0.4),
    ("warmup", 6, None, 0.2),  # half-way up the ramp
    ("lead", 9, 0.05, 0.2),  # half the lead at which α is full
    ("lead", 9, None, 0.0),  # no lead measured yet
])
def test_compose_alpha_takes_each_schedule_then_the_gate_then_the_decay(schedule, own, lead, expected):
    from codistill.config import DistillConfig
    from codistill.schedules import compose_alpha

    d = DistillConfig(schedule=schedule, alpha_max=0.4, burn_in_steps=4, warmup_steps=4, lead_scale=0.1)
    assert compose_alpha(d, own, lead, None, 1e-3, 0.0) == pytest.approx(expected)
    assert compose_alpha(d, own, lead, 0.5, 1e-3, 0.0) == pytest.approx(expected * 0.5)  # the benefit gate
    decayed = d.model_copy(update={"alpha_decay": "lr"})
    assert compose_alpha(decayed, own, lead, 0.5, 1e-3, 4e-3) == pytest.approx(expected * 0.5 * 0.25)
    assert compose_alpha(decayed, own, lead, None, 5e-3, 4e-3) == pytest.approx(expected)  # lr above the peak
