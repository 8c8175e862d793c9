"""codistill-compare end to end on micro models (its driver in the test process, each run a process): five arms and
a variant, a table, a plot, and reruns that repeat nothing; its --variant checks without a run."""
import copy
import json
import sys

import pytest
import yaml

from codistill.commands import compare
from codistill.config import ConfigError, load_config

from conftest import MICRO, run_cmd, run_here


def test_compare_trains_five_arms_writes_table_and_plot_and_resumes(tmp_path):
    """Every arm on the bundled corpus, one seed; then its paired run with a second corpus (Django's source, its own
    tokenizer) in one cross-corpus table (--paired-only: three runs fewer than every arm on both)."""
    top = tmp_path / "cmp"
    out = top / "shakespeare"
    common = ["--seeds", "1", "--variant", "t2:distill.temperature=2 distill.divergence=jsd", "train.max_steps=6",
              "distill.head_start_steps=2", "train.eval_interval=3"]
    cmd = [*common, "--datasets", "shakespeare", "--output-dir", str(out)]  # the folder a corpus gets below
    run_here(compare.main, *cmd)  # the driver in this process; its runs are processes of their own
    table = (out / "results.md").read_text()
    for label in ("(a) student alone", "(b) co-distilled", "(c) two-stage (frozen teacher)",
                  "(d) co-distilled, handicapped teacher", "(e) co-distilled, lead-only gate",
                  "teacher (trained alone)", "seed 7", "variant t2: `distill.temperature=2 distill.divergence=jsd`",
                  "never worse", "helps"):
        assert label in table
    assert (out / "validation_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    curves = data["curves"]
    for seed in ("7",):
        alone, codistilled = dict(curves["alone"][seed]), dict(curves["codistill"][seed])
        assert sorted(alone) == sorted(codistilled) == [0, 3, 6]
        assert alone[0] == codistilled[0]  # equal initial weights: a paired comparison
        assert alone[6] != codistilled[6]
        assert seed in data["final"]["two_stage"] and seed in data["final"]["handicap"]
        assert dict(curves["lead"][seed])[0] == alone[0]
        variant = dict(curves["variant:t2"][seed])
        assert variant[0] == alone[0] and variant[6] not in (alone[6], codistilled[6])
    # The arms are what they claim to be.
    seed_dir = out / "seed_7"
    paired, weak, two = (yaml.safe_load((seed_dir / f"{n}.yaml").read_text())
                         for n in ("paired", "handicap", "two_stage"))
    assert [s["name"] for s in paired["students"]] == ["student", "lead_only", "alone", "t2"]
    assert paired["students"][3]["distill"] == {**(paired["students"][0]["distill"] or {}), "temperature": 2,
                                                "divergence": "jsd"}
    assert paired["students"][2]["distill"]["alpha_max"] == 0.0
    assert [(s["distill"] or {}).get("benefit_gate", True) for s in paired["students"]] == [True, False, False, True]
    lr = paired["teacher"]["deepspeed"]["optimizer"]["params"]["lr"]
    assert weak["teacher"]["deepspeed"]["optimizer"]["params"]["lr"] == lr * 0.1
    assert two["mode"] == "soft" and two["teacher"]["pretrained"].endswith("teacher_hf/teacher")
    # A second run finds every run done and only rebuilds the report.
    again = run_here(compare.main, *cmd)
    assert again.stdout.count("already done") == 3 and "training ->" not in again.stdout
    # --paired-only with a second corpus: its paired run only, reported beside the first corpus's paired arms.
    paired_only = run_here(compare.main, *common, "--datasets", "shakespeare", "django-code", "--paired-only",
                           "--output-dir", str(top))
    assert paired_only.stdout.count("already done") == 1 and paired_only.stdout.count("training ->") == 1
    code = yaml.safe_load((top / "django-code" / "seed_7" / "paired.yaml").read_text())
    assert code["data"]["dataset"] == "django-code"
    across = (top / "results.md").read_text()
    assert "| shakespeare | 7 |" in across and "| django-code | 7 |" in across and "never worse on every corpus" in across
    assert "(e) − (a)" in across and "mean share of the (a) → teacher gap closed" in across
    assert "| corpus | seed | (b) | t2 |" in across and "- t2: `distill.temperature=2 distill.divergence=jsd`" in across
    assert "(c) two-stage" not in (out / "results.md").read_text() and "| +" in across and "| — |" in across
    # Another set of variants is refused, not mixed in.
    other = run_here(compare.main, *cmd, "--variant", "rkl:distill.divergence=reverse_kl", ok=False)
    assert other.returncode == 2 and "paired.yaml: this run's students were" in other.stderr
    assert "give another --output-dir" in other.stderr


@pytest.mark.parametrize("given, message", [
    (["t2"], "expected NAME:key=value"),
    (["t2:temperature"], "expected NAME:key=value"),
    (["../x:distill.temperature=2"], "--variant name '../x' is not allowed"),
    (["a:distill.temperature=2", "a:distill.temperature=3"], "--variant a: the name is taken"),
    (["alone:distill.temperature=2"], "--variant alone: the name is taken"),
])
def test_a_malformed_variant_is_one_clear_error(given, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        compare.parse_variants(given)


@pytest.mark.parametrize("override, message", [
    ("distill.temperatur=2", "--variant v: unknown config key 'students.0.distill.temperatur'"),
    ("distill.temperature=-1", "--variant v: config key 'students.0.distill.temperature'"),
])
def test_a_variant_with_a_bad_key_or_value_is_refused_before_any_run(tmp_path, override, message):
    base = load_config(MICRO).model_dump(mode="json")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        compare.arm_configs(base, 7, tmp_path, 0.1, {"v": [override]})
    assert not any(tmp_path.iterdir())


def test_a_tail_stays_in_the_co_distilled_runs_and_two_stage_distils_the_finished_teacher(tmp_path):
    from codistill.config import validate

    base = load_config(MICRO, ["train.tail_steps=2"]).model_dump(mode="json")
    runs = compare.arm_configs(base, 7, tmp_path, 0.1)
    assert runs["paired"]["train"]["tail_steps"] == runs["handicap"]["train"]["tail_steps"] == 2
    assert runs["two_stage"]["train"]["tail_steps"] == 0
    for name, tree in runs.items():  # each a config the trainer takes
        validate(copy.deepcopy(tree), name)


def test_selection_stays_in_the_co_distilled_student_and_two_stage_is_one_student(tmp_path):
    from codistill.config import validate

    base = load_config(MICRO, ["students.0.twin=true", "students.0.population=[0.1]", "distill.selection_interval=2"]
                       ).model_dump(mode="json")
    runs = compare.arm_configs(base, 7, tmp_path, 0.1)
    paired = validate(copy.deepcopy(runs["paired"]), "paired")
    assert paired.selection_groups() == {"student": ["student_alone", "student_p1"]}
    assert paired.distill.selection_interval == 2
    two = validate(copy.deepcopy(runs["two_stage"]), "two_stage")
    assert [s.name for s in two.students] == ["student"] and two.distill.selection_interval == 0


def test_compare_refuses_a_config_that_is_not_co_distillation(tmp_path):
    proc = run_cmd([sys.executable, "tools/compare.py", "--config", "configs/hard.yaml",
                    "--output-dir", str(tmp_path)])
    assert proc.returncode == 2 and "codistill-compare: error: mode=hard" in proc.stderr


def test_a_corpus_that_does_not_exist_is_refused_before_any_run(tmp_path, capsys):
    code = compare.main(["--config", str(MICRO), "--datasets", "shakespeare", str(tmp_path / "nosuch"),
                         "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"--datasets: '{tmp_path / 'nosuch'}' is not a bundled corpus (shakespeare, django-code" in err[0]
    assert not (tmp_path / "out").exists()
