"""A student's state between steps: its plan (α, T, the gate's measuring steps), what it learns from a
step (the teacher's lead, one peak learning rate, the gate's evidence) and its checkpoint state,
including the layout of an earlier release. No process group."""
import pytest

from codistill.config import DistillConfig
from codistill.student import StudentState, Students


def state(**distill) -> StudentState:
    d = DistillConfig(**{"schedule": "lead", "alpha_max": 0.5, "lead_scale": 0.2, "burn_in_steps": 2,
                         "head_start_steps": 3, "benefit_interval": 2, **distill})
    return StudentState("s", d, gated=d.benefit_gate)


def test_the_plan_waits_for_the_head_start_and_measures_every_interval_after_the_burn_in():
    s = state()
    assert not s.plan(2, 100, 1e-3).active and s.plan(3, 100, 1e-3).active
    assert [s.plan(step, 100, 1e-3).measure for step in range(3, 10)] == [False, False, True, False, True, False, True]
    assert s.plan(5, 100, 1e-3).openness == 0.5 and s.plan(4, 100, 1e-3).openness is None
    s.lead = 0.1
    plan = s.plan(5, 100, 1e-3)
    assert plan.spec.alpha == pytest.approx(0.5 * 0.5 * 0.5)  # α_max · lead / scale · openness
    assert state(benefit_gate=False).plan(5, 100, 1e-3).openness is None


def test_observe_keeps_one_peak_learning_rate_and_the_teachers_running_lead():
    s = state(lead_ema=0.5)
    plan = s.plan(3, 100, 1e-3)
    assert s.observe(plan, source_ce=4.0, own_ce=4.5, lr_after=2e-3) == pytest.approx(0.5)
    assert s.lead == pytest.approx(0.5) and s.lr_peak == 2e-3  # the larger of before and after the step
    s.observe(s.plan(4, 100, 2e-3), source_ce=4.0, own_ce=4.1, lr_after=1e-3)
    assert s.lead == pytest.approx(0.3) and s.lr_peak == 2e-3
    idle = state()
    assert idle.observe(idle.plan(0, 100, 5e-3), 4.0, 5.0, 5e-3) is None and idle.lr_peak == 0.0  # head start


def test_the_gate_takes_finite_measurements_only_and_says_what_moved_it():
    s = state()
    terms = {"probe_diff": 1.0, "probe_update": 0.0, "update_diff": 0.0, "update_sq": 1.0, "probe_sq": 1.0}
    logged = s.measured(terms, 1e-3, world=1, batches=1)
    assert set(logged) == {"signal", "signal_pull", "signal_length", "evidence"} and logged["signal"] == 1.0
    assert s.benefit.openness > 0.5 and s.benefit.measurements == 1
    assert s.measured({**terms, "probe_diff": float("nan")}, 1e-3, 1, 1) == {} and s.benefit.measurements == 1
    assert s.measured({}, 1e-3, 1, 1) == {}


def test_state_round_trips_and_reads_an_earlier_releases_checkpoint():
    s = state()
    s.lead, s.lr_peak = 0.25, 3e-3
    s.measured({"probe_diff": 1.0, "probe_update": 0.0, "update_diff": 0.0, "update_sq": 1.0, "probe_sq": 1.0},
               1e-3, 1, 1)
    fresh = Students([state()])
    fresh.load_state_dict(Students([s]).state_dict())
    assert fresh[0].state_dict() == s.state_dict()
    legacy = {"gap_ema": {"s": 0.1}, "lr_peak": {"s": 2e-3},
              "benefit": {"s": {"openness": 0.7, "evidence_sum": 1.0, "evidence_sq": 1.0, "measurements": 1,
                                "lr_peak": 4e-3}}}
    old = Students([state()])
    old.load_state_dict(Students.from_legacy(legacy))
    assert old[0].lead == 0.1 and old[0].lr_peak == 4e-3 and old[0].benefit.openness == 0.7
