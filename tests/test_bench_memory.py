"""codistill-bench-memory: the phase sampler's bookkeeping (no process group), its bad input, and one
short run of both default arms on the micro models (the figures at real sizes are the tool's, not a test's)."""
import json

import pytest

from codistill.commands import bench_memory
from codistill.commands.bench_memory import AT_REST, BETWEEN, PhaseMemory, parse_arms
from codistill.errors import ConfigError
from conftest import MICRO, bin_path, run_cmd


def test_phases_keep_their_own_peak_per_step_and_nest():
    level = {"now": 100}
    trims = []
    memory = PhaseMemory(reader=lambda: level["now"], trim=lambda: trims.append(1))
    memory.step = 1

    class Model:
        def forward(self, size):
            level["now"] = size
            memory.record()
            level["now"] = 100
            return size * 2

    model = Model()
    memory.wrap(model, "forward", "teacher forward")
    assert model.forward(500) == 1000
    with memory.phase("gate"):
        level["now"] = 300
        memory.record()
        model.forward(700)
    memory.step = 2
    model.forward(200)
    memory.at_rest()
    assert memory.peaks[1] == {BETWEEN: 100, "teacher forward": 500, "gate": 300, "gate > teacher forward": 700}
    assert memory.peaks[2] == {BETWEEN: 100, "teacher forward": 200, AT_REST: 100}
    assert memory.label == BETWEEN and len(trims) == 4 * 4 + 1  # four boundaries per phase, one at rest


def test_a_phase_that_raises_ends_and_the_label_returns():
    memory = PhaseMemory(reader=lambda: 1)
    with pytest.raises(ValueError):
        with memory.phase("outer"):
            with memory.phase("inner"):
                raise ValueError("boom")
    assert memory.label == BETWEEN


def test_the_sampler_thread_records_while_a_phase_runs():
    import time

    memory = PhaseMemory(interval=0.001, reader=lambda: 42)
    with memory:
        with memory.phase("long"):
            time.sleep(0.05)
    assert memory.peaks[0]["long"] == 42


@pytest.mark.parametrize("arm, expected", [
    ("noname", "expected NAME:key=value"), (":distill.fused_linear=true", "expected NAME:key=value"),
    ("a/b:x=1", "expected NAME:key=value"), ("fused:distill.fused_linear", "is not key=value"),
])
def test_bad_arms_are_one_line_errors(arm, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_arms([arm])


def test_an_arm_given_twice_and_an_arm_with_a_bad_key_are_refused_before_anything_runs(capsys):
    assert bench_memory.main(["--arm", "x:a=1", "--arm", "x:b=2"]) == 2
    assert "--arm x: given twice" in capsys.readouterr().err
    assert bench_memory.main(["--config", str(MICRO), "--arm", "x:distill.fused_linear=maybe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("codistill-bench-memory: error: --arm x:") and "fused_linear" in err[0]


def test_both_default_arms_report_every_phase_of_their_path(tmp_path):
    out = tmp_path / "memory.json"
    proc = run_cmd([bin_path("codistill-bench-memory"), "--config", str(MICRO), "--steps", "2", "--skip", "1",
                    "--out", str(out), "distill.burn_in_steps=0", "distill.benefit_interval=1"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "highest per phase over steps 2-2" in proc.stdout and "estimate's step peak" in proc.stdout
    report = json.loads(out.read_text())
    plain, fused = report["results"]["plain"], report["results"]["fused"]
    assert not plain["fused_linear"] and fused["fused_linear"] and plain["trimmed"]
    assert 0.3e9 < plain["estimate_step_peak"] < 3e9  # measured in the parent, not in an arm that already trained
    for res in (plain, fused):
        assert sorted(res["peaks"]) == ["1", "2"] and len(res["at_rest"]) == 2
        phases = res["peaks"]["2"]
        for name in ("teacher forward", "teacher backward", "student forward", "student backward",
                     "teacher optimizer step", "student optimizer step", "student benefit gate", AT_REST):
            assert phases[name] > 50e6, name  # a Python process with torch holds far more than 50 MB
    assert "loss" in plain["peaks"]["2"] and "fused loss pass" not in plain["peaks"]["2"]
    assert "fused loss pass" in fused["peaks"]["2"] and "student benefit gate > fused loss pass" in fused["peaks"]["2"]


def test_a_timeline_keeps_one_phase_over_time_in_tenths():
    from codistill.commands.bench_memory import tenths

    level = {"now": 1}
    memory = PhaseMemory(reader=lambda: level["now"], timeline="backward")
    memory.step = 3
    with memory.phase("forward"):
        level["now"] = 9
        memory.record()
    with memory.phase("backward"):
        for value in (2, 5, 3):
            level["now"] = value
            memory.record()
    assert [v for _, v in memory.timeline[3]] == [9, 2, 5, 3, 3]  # from its entry (the level the forward left) to its exit
    assert tenths([(0.0, 1), (0.55, 7), (1.0, 4)]) == [1, 1, 1, 1, 1, 7, 7, 7, 7, 4]
    assert tenths([]) == []


def test_a_timeline_also_reads_the_gathered_parameters_and_zero3s_reader_counts_only_whole_ones():
    """Beside each timeline reading the bytes ZeRO-3 holds gathered (none outside the phase); the reader sums
    the parameters that are available or being fetched, at their dtype's size, and is None below ZeRO-3."""
    from types import SimpleNamespace

    import torch
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from codistill.commands.bench_memory import zero3_gathered

    level = {"now": 1, "gathered": 0}
    memory = PhaseMemory(reader=lambda: level["now"], timeline="backward", gathered=lambda: level["gathered"])
    memory.step = 1
    with memory.phase("forward"):
        level["gathered"] = 100
        memory.record()
    with memory.phase("backward"):
        for value in (40, 10):
            level["gathered"] = value
            memory.record()
    assert [v for _, v in memory.gathered_timeline[1]] == [100, 40, 10, 10]
    assert [t for t, _ in memory.gathered_timeline[1]] == [t for t, _ in memory.timeline[1]]

    def param(numel, status, dtype=torch.float32):
        p = torch.nn.Parameter(torch.empty(0, dtype=dtype))
        p.ds_numel, p.ds_status = numel, status
        return p

    module = torch.nn.Module()
    module.a = param(10, ZeroParamStatus.AVAILABLE)
    module.b = param(20, ZeroParamStatus.NOT_AVAILABLE)
    module.c = param(30, ZeroParamStatus.INFLIGHT, torch.bfloat16)
    engine = lambda stage: SimpleNamespace(zero_optimization_stage=lambda: stage, module=module)  # noqa: E731
    trainer = SimpleNamespace(members=[SimpleNamespace(engine=engine(3))])
    assert zero3_gathered(trainer)() == 10 * 4 + 30 * 2
    module.b.ds_status = ZeroParamStatus.AVAILABLE
    assert zero3_gathered(trainer)() == 10 * 4 + 20 * 4 + 30 * 2
    assert zero3_gathered(SimpleNamespace(members=[SimpleNamespace(engine=engine(2))])) is None
