import json
import re

import pytest

from codistill.config import DEFAULT_CONFIG, ConfigError, load_config, load_deepspeed_config
from codistill.engines import optimizer_steps, resolve_deepspeed_config

from conftest import MICRO, ROOT


def test_embedded_default_loads_with_a_teacher_and_a_student():
    cfg = load_config()
    assert DEFAULT_CONFIG == ROOT / "configs" / "tiny.yaml"
    assert cfg.mode == "codistill"
    assert [m.name for m in cfg.models] == ["teacher", "student"]
    assert cfg.data.dataset == "shakespeare"


def test_dotted_overrides_change_any_key():
    cfg = load_config(MICRO, ["output_dir=/tmp/x", "train.max_steps=17", "train.seed=3",
                              "students.0.config.hidden_size=48", "distill.warmup=cosine",
                              "teacher.deepspeed.zero_optimization.stage=3"])
    assert cfg.output_dir == "/tmp/x"
    assert cfg.train.max_steps == 17 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.seed == 3
    assert cfg.students[0].config["hidden_size"] == 48
    assert cfg.distill.warmup == "cosine"
    assert cfg.teacher.deepspeed["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("override, message", [
    (["train.max_stepz=3"], "unknown config key 'train.max_stepz'"),
    (["banana=1"], "unknown config key 'banana'"),
    (["train.max_steps=many"], "config key 'train.max_steps'"),
    (["train.micro_batch_size=0"], "config key 'train.micro_batch_size': input should be greater than 0"),
    (["data.seq_len=-5"], "config key 'data.seq_len'"),
    (["distill.alpha_max=1.5"], "config key 'distill.alpha_max'"),
    (["distill.warmup=exponential"], "config key 'distill.warmup'"),
    (["students.3.name=x"], "expected a list index below 1"),
    (["train.max_steps"], "must look like key.path=value"),
    (["students=[]"], "config key 'students'"),
    (["students.0.name=teacher"], "model names must be unique"),
    (["distill.benefit_probe=validation"], "config key 'distill.benefit_probe'"),
    (["data.probe_fraction=1"], "config key 'data.probe_fraction'"),
])
def test_bad_config_values_give_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(MICRO, override)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_deepspeed_json_by_path_is_read_as_is(tmp_path):
    cfg = load_config(MICRO, ["teacher.deepspeed=configs/ds/zero3_cpu.json"])
    ds = load_deepspeed_config(cfg.teacher)
    assert ds == json.loads((ROOT / "configs/ds/zero3_cpu.json").read_text())
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    cfg = load_config(MICRO, [f"teacher.deepspeed={broken}"])
    with pytest.raises(ConfigError, match="teacher.deepspeed: .*broken.json is not valid JSON"):
        load_deepspeed_config(cfg.teacher)
    cfg = load_config(MICRO, [f"teacher.deepspeed={tmp_path / 'absent.json'}"])
    with pytest.raises(ConfigError, match="absent.json does not exist"):
        load_deepspeed_config(cfg.teacher)


def test_shared_batch_geometry_is_filled_in_and_checked():
    cfg = load_config(MICRO, ["train.gradient_accumulation_steps=2"])
    ds = resolve_deepspeed_config(cfg.teacher, cfg.train, world_size=2, on_cpu=True)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16
    assert ds["optimizer"]["params"]["torch_adam"] is True  # no FusedAdam JIT on CPU
    cfg = load_config(MICRO, ["teacher.deepspeed.train_micro_batch_size_per_gpu=16"])
    with pytest.raises(ConfigError, match="teacher.deepspeed.train_micro_batch_size_per_gpu=16 disagrees"):
        resolve_deepspeed_config(cfg.teacher, cfg.train, world_size=1, on_cpu=True)
    cfg = load_config(MICRO, ["teacher.deepspeed.train_batch_size=100"])
    with pytest.raises(ConfigError, match="train_batch_size=100 disagrees"):
        resolve_deepspeed_config(cfg.teacher, cfg.train, world_size=2, on_cpu=True)
    cfg = load_config(MICRO, ["teacher.deepspeed.optimizer=null"])
    with pytest.raises(ConfigError, match="teacher.deepspeed.optimizer"):
        resolve_deepspeed_config(cfg.teacher, cfg.train, world_size=1, on_cpu=True)


def test_scheduler_total_steps_auto_follows_max_steps():
    cfg = load_config(None, ["train.max_steps=42", "distill.head_start_steps=0"])
    ds = resolve_deepspeed_config(cfg.teacher, cfg.train, world_size=1, on_cpu=True)
    assert ds["scheduler"]["params"]["total_num_steps"] == 42


def test_a_head_start_shortens_the_students_schedule_only():
    cfg = load_config(None, ["train.max_steps=400", "distill.head_start_steps=100"])
    steps = optimizer_steps(cfg)
    assert steps == {"teacher": 400, "student": 300}
    ds = resolve_deepspeed_config(cfg.students[0], cfg.train, world_size=1, on_cpu=True, steps=steps["student"])
    assert ds["scheduler"]["params"]["total_num_steps"] == 300  # its cosine ends at its own last step
    with pytest.raises(ConfigError) as refused:  # no --config: the error says so, and what to change
        load_config(None, ["train.max_steps=400", "distill.head_start_steps=400"])
    assert str(refused.value).startswith("the embedded default config (configs/tiny.yaml, no --config given): ")
    assert str(refused.value).endswith("student: distill.head_start_steps=400 leaves no steps of train.max_steps=400 "
                                       "for the student; lower distill.head_start_steps or raise train.max_steps")
    with pytest.raises(ConfigError, match=f"^{DEFAULT_CONFIG}: .*leaves no steps"):  # a file given: its path
        load_config(DEFAULT_CONFIG, ["train.max_steps=400", "distill.head_start_steps=400"])


def test_a_tail_shortens_the_teachers_schedule_and_both_teacher_keys_are_refused_where_nothing_trains():
    cfg = load_config(None, ["train.max_steps=500", "distill.head_start_steps=200", "train.tail_steps=100"])
    assert optimizer_steps(cfg) == {"teacher": 400, "student": 300}  # the teacher's cosine ends at its step 400
    for overrides, message in (
            (["train.tail_steps=400"], "train.tail_steps=400 leaves the teacher no step of train.max_steps=400"),
            (["train.tail_steps=301"], "train.tail_steps=301 is longer than student's steps (train.max_steps 400 "
                                       "less distill.head_start_steps 100)"),
            (["train.tail_steps=50", "mode=hard"], "in mode codistill, with a teacher that does not listen (here "
                                                  "mode hard)"),
            (["train.tail_steps=50", "teacher.distill={}"], "a listening teacher"),
            (["train.tail_steps=-1"], "config key 'train.tail_steps'"),
            (["distill.teacher_progress=lr", "mode=hard"],
             "student.distill.teacher_progress=lr: α follows a teacher that trains, a student's in mode codistill "
             "(here mode hard)"),
            (["distill.teacher_progress=lr", "teacher.distill={}"], "teacher.distill.teacher_progress=lr: α follows "
                                                                    "a teacher that trains, a student's in mode "
                                                                    "codistill (here the teacher itself)")):
        with pytest.raises(ConfigError, match=re.escape(message)) as refused:
            load_config(None, overrides)
        assert "\n" not in str(refused.value)


def test_student_distill_overrides_are_typed_merged_once_and_written_back_as_given():
    cfg = load_config(MICRO, ["students.0.distill.divergence=jsd", "students.0.distill.beta=0.3",
                              "distill.alpha_max=0.4"])
    merged = cfg.distill_for(0)
    assert (merged.divergence, merged.beta, merged.alpha_max) == ("jsd", 0.3, 0.4)
    assert merged is cfg.distill_for(0)  # merged at validation, not at every call
    assert cfg.model_dump()["students"][0]["distill"] == {"divergence": "jsd", "beta": 0.3}
    with pytest.raises(ConfigError, match="students.0.distill.divergence': input should be"):
        load_config(MICRO, ["students.0.distill.divergence=kl"])
    with pytest.raises(ConfigError, match="unknown config key 'students.0.distill.betta'"):
        load_config(MICRO, ["students.0.distill.betta=0.3"])


def test_documents_are_set_aside_for_a_probe_only_when_a_measuring_student_asks_for_them():
    assert load_config(MICRO, []).probe_fraction() is None  # the stream's next batch: every document trains
    held = ["students.0.distill.benefit_probe=heldout", "data.probe_fraction=0.1"]
    assert load_config(MICRO, held).probe_fraction() == 0.1
    assert load_config(MICRO, [*held, "students.0.distill.benefit_gate=false"]).probe_fraction() is None
    assert load_config(MICRO, [*held, "mode=hard"]).probe_fraction() is None


def test_a_cache_holds_one_temperature_for_every_student(tmp_path):
    with pytest.raises(ConfigError, match="teacher.cache holds probabilities at one temperature"):
        load_config(MICRO, ["mode=soft", f"teacher.cache={tmp_path}", "distill.temperature_final=1.0"])


@pytest.mark.parametrize("name", ["tiny", "tiny_gpt2", "soft", "hard"])
def test_every_shipped_config_is_valid(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.mode == ("codistill" if name.startswith("tiny") else name)


def test_the_previous_releases_distill_names_still_work_with_one_line_each(caplog):
    with caplog.at_level("WARNING", logger="codistill"):
        cfg = load_config(MICRO, ["distill.schedule=adaptive", "distill.adaptive_gap=0.3", "distill.adaptive_ema=0.5",
                                 "students.0.distill.token_gate=true"])
    assert (cfg.distill.schedule, cfg.distill.lead_scale, cfg.distill.lead_ema) == ("lead", 0.3, 0.5)
    assert cfg.distill_for(0).token_filter
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all(line.count("\n") == 0 for line in said)
    assert "distill.adaptive_gap is now distill.lead_scale" in said[0] and "token_gate is now" in said[1]
    with pytest.raises(ConfigError, match="distill.lead_scale or its old name distill.adaptive_gap"):
        load_config(MICRO, ["distill.adaptive_gap=0.3", "distill.lead_scale=0.3"])


BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text, message", [
    ("a: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper than 64 levels (line 1)"),
    ("teacher:\n  config:\n" + "".join("  " * i + f"k{i}:\n" for i in range(2, 100)), "nested deeper than 64"),
    (BOMB, "expands to more than 100,000 values (through its aliases)"),
    ("# " + "x" * (5 << 20) + "\n", "characters; a config is at most 4,194,304"),
])
def test_a_config_file_is_parsed_within_bounds_and_refused_in_one_line_past_them(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_an_override_and_a_deepspeed_file_are_bounded_too(tmp_path):
    with pytest.raises(ConfigError, match=r"^override 'train.seed': its value nested deeper than 64 levels"):
        load_config(None, ["train.seed=" + "[" * 20_000 + "]" * 20_000])
    ds = tmp_path / "ds.json"
    ds.write_text("[" * 100_000 + "]" * 100_000)
    spec = load_config(None, [f"students.0.deepspeed={ds}"]).students[0]
    with pytest.raises(ConfigError, match="student.deepspeed: .*ds.json: nested too deeply to be a config"):
        load_deepspeed_config(spec)


@pytest.mark.parametrize("override, message", [
    ("train.micro_batch_size=true", "config key 'train.micro_batch_size': input should be a valid integer (got True)"),
    ("train.max_steps='40'", "config key 'train.max_steps': input should be a valid integer"),
    ("distill.benefit_gate=1", "config key 'distill.benefit_gate': input should be a valid boolean"),
])
def test_a_value_of_another_type_is_refused_not_coerced(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(MICRO, [override])
    assert message in str(err.value)


def test_a_model_name_too_long_for_the_file_names_built_from_it_is_refused_up_front():
    with pytest.raises(ConfigError) as err:
        load_config(MICRO, ["students.0.name=" + "a" * 300])
    assert "at most 64 characters" in str(err.value) and len(str(err.value)) < 400
    load_config(MICRO, ["students.0.name=" + "a" * 64])
