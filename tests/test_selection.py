"""Selection among a student, its twin and its population (distill.selection_interval): the worst distilling
member takes the best's whole training state (then both step alike, at ZeRO-2 here and at ZeRO-3 on two ranks) and
its α perturbed, the twin nothing; the decisions are the same after a restart and never read the validation split,
and the settings it needs are one-line errors."""
import json
import math
import sys

import pytest
import torch

from codistill import distributed
from codistill.config import ConfigError, load_config, validate

from conftest import MICRO, ROOT, launch, read_scalars, train_cli_here, zero_weights

SELECTING = ["students.0.twin=true", "distill.selection_interval=2", "distill.burn_in_steps=0",
             "distill.schedule=constant", "distill.benefit_gate=false", "train.log_interval=1"]
TAGS = ["student/selection/probe_ce", "student_alone/selection/probe_ce", "selection/student/distilled_won"]


def test_selection_chooses_among_a_student_its_twin_and_its_population_once_for_the_run():
    with pytest.raises(ConfigError, match=r"distill\.selection_interval=5: selection chooses among a student, its "
                                          r"twin trained alone and its population; give a student twin: true or "
                                          r"population: \[alpha_max, \.\.\.\]"):
        load_config(MICRO, ["distill.selection_interval=5"])
    with pytest.raises(ConfigError, match=r"student\.population=\[0\.5\]: its copies are selected among every "
                                          r"distill\.selection_interval steps, which is 0; set it"):
        load_config(MICRO, ["students.0.population=[0.5]"])
    with pytest.raises(ConfigError, match=r"config key 'students\.0\.population\.1': input should be less than or "
                                          r"equal to 1 \(got 2\)"):
        load_config(MICRO, ["students.0.population=[0.5, 2]", "distill.selection_interval=5"])
    with pytest.raises(ConfigError, match=r"student: its copy's name student_p1 is taken by another model; rename "
                                          r"that one"):
        tree = load_config(MICRO, [*SELECTING, "students.0.population=[0.1]"]).model_dump(mode="json")
        tree["students"][2]["init_seed"] += 1  # another model under the copy's name
        validate(tree, "resolved")
    cfg = load_config(MICRO, [*SELECTING, "students.0.population=[0.1, 1]"])
    assert cfg.selection_groups() == {"student": ["student_alone", "student_p1", "student_p2"]}
    assert [(s.name, d.alpha_max, s.init_seed) for s, d, _ in cfg.learners()] == [
        ("student", 0.5, 8), ("student_alone", 0.0, 8), ("student_p1", 0.1, 8), ("student_p2", 1.0, 8)]
    with pytest.raises(ConfigError, match=r"student\.distill\.selection_batches=2: selection is one setting for the "
                                          r"run; set it in the top-level distill section \(here 4\)"):
        load_config(MICRO, [*SELECTING, "students.0.distill={selection_batches: 2}"])
    assert load_config(MICRO, SELECTING).probe_fraction() == 0.05  # it scores on training documents set aside
    assert load_config(MICRO, ["students.0.twin=true"]).probe_fraction() is None


def test_a_student_swapped_to_nvme_is_refused_in_one_line():
    from codistill import selection

    cfg = load_config(MICRO, SELECTING)
    swapped = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}}}
    resident = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    selection.check_in_memory(cfg, {"teacher": resident, "student": resident, "student_alone": resident})
    with pytest.raises(ConfigError, match=r"distill\.selection_interval=2: student's zero_optimization\."
                                          r"offload_optimizer swaps to NVMe, and selection copies"):
        selection.check_in_memory(cfg, {"teacher": resident, "student": swapped, "student_alone": swapped})


def test_the_copy_takes_weights_moments_and_an_fp16_loss_scale():
    """Outside DeepSpeed (a torch optimizer under a wrapper with a dynamic loss scaler, as fp16 runs have on a GPU):
    what adopt takes, checked field by field."""
    from types import SimpleNamespace

    from codistill.selection import adopt

    def member(seed, scale):
        torch.manual_seed(seed)
        module = torch.nn.Linear(3, 2)
        inner = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
        module(torch.randn(4, 3)).sum().backward()
        inner.step()  # a momentum buffer per parameter
        scaler = SimpleNamespace(cur_scale=scale, cur_iter=seed, last_overflow_iter=-seed, cur_hysteresis=seed)
        wrapper = SimpleNamespace(optimizer=inner, loss_scaler=scaler)
        return SimpleNamespace(engine=SimpleNamespace(module=module, optimizer=wrapper, lr_scheduler=None))

    dst, src = member(1, 1024.0), member(2, 2048.0)
    adopt(dst, src)
    for a, b in zip(dst.engine.module.parameters(), src.engine.module.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
        ours, theirs = dst.engine.optimizer.optimizer.state[a], src.engine.optimizer.optimizer.state[b]
        assert torch.equal(ours["momentum_buffer"], theirs["momentum_buffer"])
    assert vars(dst.engine.optimizer.loss_scaler) == vars(src.engine.optimizer.loss_scaler)


def last_winner(scalars: dict, names: tuple[str, ...]) -> str:
    """Who won the last decision (step 6), from the members' probe tags: the lowest CE, a tie to the first."""
    return min(names, key=lambda n: (scalars[f"{n}/selection/probe_ce"][6], names.index(n)))


def test_the_worst_distiller_takes_the_best_and_its_alpha_perturbed_and_the_twin_nothing(monkeypatch):
    """The decision alone (the state copy stubbed): who takes whose state, whose α moves and by how much, ties,
    the twin that never takes another's state, the student that takes the best's at the last step, and the α and
    counts across a save and load."""
    from types import SimpleNamespace

    from codistill import selection
    from codistill.student import StudentState

    taken = []
    monkeypatch.setattr(selection, "adopt", lambda dst, src: taken.append((dst.name, src.name)))
    cfg = load_config(MICRO, [*SELECTING, "students.0.population=[0.1, 1]", "distill.selection_perturb=0.5"])

    def selecting():
        states = [StudentState(s.name, d, False) for s, d, _ in cfg.learners()]
        members = [SimpleNamespace(name=s.name) for s in states]
        return selection.Selection([selection.Group(members, states, "student_alone")], None, None, None, 2, 1,
                                   6, 7, 0.5)

    sel = selecting()
    group, alphas = sel.groups[0], lambda: [s.distill.alpha_max for s in sel.groups[0].states]
    sel.decide(group, [3.0, 3.0, 3.0, 3.0], 2)  # a tie (before distilling): the student wins, nothing is taken
    assert taken == [] and alphas() == [0.5, 0.0, 0.1, 1.0] and group.ties == 1
    tags = sel.decide(group, [3.0, 2.9, 3.1, 3.2], 4)  # the twin best: p2 keeps its own α, perturbed, at most 1
    up = sel.draw("perturb 4 student_p2") % 2 == 1
    assert taken[-1] == ("student_p2", "student_alone") and alphas()[3] == (1.0 if up else 0.5)
    assert tags["selection/student/distilled_won"] == 0.0 and "student_alone/selection/alpha_max" not in tags
    sel.decide(group, [3.0, 3.3, 2.9, 3.1], 5)  # p1 best, the twin worst: the worst distiller (p2) takes p1's
    up = sel.draw("perturb 5 student_p2") % 2 == 1
    assert taken[-1] == ("student_p2", "student_p1") and alphas()[3] == pytest.approx(0.1 * (1.5 if up else 0.5))
    sel.decide(group, [3.3, 3.0, 2.9, 3.1], 5)  # the student worst: p1's α, perturbed
    up = sel.draw("perturb 5 student") % 2 == 1
    assert taken[-1] == ("student", "student_p1") and alphas()[0] == pytest.approx(0.1 * (1.5 if up else 0.5))
    assert all(dst != "student_alone" for dst, _ in taken)
    taken.clear()
    before = alphas()
    sel.decide(group, [3.0, 2.8, 2.9, 3.2], 6)  # the last step: the student takes the best's (the twin's), α stays
    assert taken == [("student", "student_alone")] and alphas() == before
    assert group.wins == {"student": 1, "student_alone": 2, "student_p1": 2} and group.last_winner == "student_alone"
    assert "won by student 1, student_alone 2, student_p1 2, student_p2 0; student ends with the weights of the " \
           "last winner, student_alone" in sel.summary()[0]
    again = selecting()
    again.load_state_dict(json.loads(json.dumps(sel.state_dict())))
    assert [s.distill.alpha_max for s in again.groups[0].states] == alphas()
    assert again.state_dict() == sel.state_dict()


def test_the_worse_takes_the_betters_state_and_both_then_step_alike(tmp_path, monkeypatch):
    """After a run with selection, one more step parts the two; the twin takes the student's state and both step on
    one batch: every weight and this rank's optimizer state (fp32 masters, moments) are bitwise equal."""
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "helpers"))
    monkeypatch.setattr(sys, "argv", ["adopt_step.py", f"output_dir={tmp_path}", *SELECTING])
    import adopt_step

    try:
        adopt_step.main()
    finally:
        distributed.shutdown()
    assert json.loads((tmp_path / "rank0.json").read_text()) == {
        "differed": True, "weights_equal": True, "optimizer_equal": True, "lr": [3e-3, 3e-3]}


def test_two_ranks_at_zero3_select_log_their_tags_and_take_state_alike(tmp_path):
    """A population of three (the student, its twin, a copy at α_max 1) on two ranks at ZeRO-3."""
    out = tmp_path / "run"
    proc = launch(f"output_dir={out}", *SELECTING, "students.0.population=[1.0]", *(
        f"students.0.deepspeed.zero_optimization.{k}" for k in ("stage=3", "stage3_param_persistence_threshold=0")),
        script=str(ROOT / "tests" / "helpers" / "adopt_step.py"), config=None)
    for rank in (0, 1):
        assert json.loads((out / f"rank{rank}.json").read_text())["weights_equal"]
        assert json.loads((out / f"rank{rank}.json").read_text())["optimizer_equal"]
    assert "student: selected among 3 (alpha_max student 0.5, student_alone 0, student_p1 1) every 2 steps" \
        in proc.stdout
    assert "selection among student's 3: 3 decisions" in proc.stdout
    scalars = read_scalars(out)
    for tag in [*TAGS, *(f"student{n}/selection/{k}" for n, k in (("_p1", "probe_ce"), ("", "alpha_max"),
                                                                  ("_p1", "alpha_max")))]:
        assert sorted(scalars[tag]) == [2, 4, 6] and all(map(math.isfinite, scalars[tag].values())), tag
    assert set(scalars["selection/student/distilled_won"].values()) <= {0.0, 1.0}
    names = ("student", "student_alone", "student_p1")
    best = last_winner(scalars, names)
    assert scalars["student/eval/loss"][6] == scalars[f"{best}/eval/loss"][6]  # the student ends as the last winner


def test_a_restart_across_a_decision_continues_exactly(tmp_path):
    """A population of three (the student, its twin, a copy at α_max 1) split at step 3, between the decisions at 2
    and 4; the students distil from step 3 (a burn-in of 2), so the decision at 2 is a tie of identical models."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    late = [*SELECTING, "distill.burn_in_steps=2", "students.0.population=[1.0]"]
    whole = train_cli_here(f"output_dir={straight}", *late)
    train_cli_here(f"output_dir={split}", *late, "train.steps_this_run=3")
    train_cli_here(f"output_dir={split}", *late, "resume=auto")
    a, b = read_scalars(straight), read_scalars(split)
    names = ("student", "student_alone", "student_p1")
    for tag in [*TAGS, "student_p1/selection/probe_ce", "student/selection/alpha_max",
                "student_p1/selection/alpha_max", *(f"{n}/train/loss" for n in names)]:
        assert a[tag] == b[tag], tag
    assert a["student/selection/probe_ce"][2] == a["student_alone/selection/probe_ce"][2]
    assert a["selection/student/distilled_won"][2] == 1.0 and "3 decisions (1 ties), won by student" in whole.stdout
    assert "student: selected among 3 (alpha_max student 0.5, student_alone 0, student_p1 1)" in whole.stdout
    wa, wb = (zero_weights(run, 6, names) for run in (straight, split))
    assert all(torch.equal(wa[n][k], wb[n][k]) for n in wa for k in wa[n])
    best = last_winner(a, names)  # the student ends as it, the twin as itself
    assert all(torch.equal(wa["student"][k], wa[best][k]) for k in wa[best])


def test_selection_never_reads_the_validation_split(tmp_path):
    """The same run with its validation batches replaced by noise: other validation losses, the same decisions."""
    from codistill.trainer import Trainer

    proc = train_cli_here(f"output_dir={tmp_path / 'clean'}", *SELECTING)
    assert "student: selected against student_alone every 2 steps and at the last" in proc.stdout
    assert "selection: student no worse than student_alone on the held-out probe at " in proc.stdout
    trainer = Trainer(load_config(MICRO, [f"output_dir={tmp_path / 'noise'}", *SELECTING]))
    try:
        for batch in trainer.val_batches:
            batch["input_ids"] = torch.randint_like(batch["input_ids"], 0, trainer.vocab)
        trainer.fit()
    finally:
        distributed.shutdown()
    clean, noise = read_scalars(tmp_path / "clean"), read_scalars(tmp_path / "noise")
    assert clean["student/eval/loss"][6] != noise["student/eval/loss"][6]
    for tag in TAGS:
        assert clean[tag] == noise[tag], tag
