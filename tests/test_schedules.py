import math

import pytest

from codistill.schedules import alpha_at


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
