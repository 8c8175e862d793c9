"""A 1-process run inside the test process: a teacher loaded from a local pretrained
folder (saved first, loaded offline) and a student whose embedding is padded past
the tokenizer's vocabulary."""
import hashlib
import json

import deepspeed
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from codistill import distributed
from codistill.config import ConfigError, load_config
from codistill.trainer import Trainer

from conftest import MICRO

PADDED_VOCAB = 4096 + 64


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("inprocess")
    pretrained = tmp / "teacher-pretrained"
    hf = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                              max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    saved = AutoModelForCausalLM.from_config(hf)
    saved.save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)
    cfg = load_config(MICRO, [f"output_dir={tmp / 'out'}", f"teacher.pretrained={pretrained}", "teacher.config={}",
                              f"students.0.config.vocab_size={PADDED_VOCAB}", "train.gradient_accumulation_steps=2",
                              "teacher.deepspeed.zero_optimization.stage=3",
                              "teacher.deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
                              # the benefit gate's extra forwards of the student would break the batch
                              # record below; the gate has its own tests (test_gate, test_resume)
                              "distill.benefit_gate=false"])
    trainer = Trainer(cfg)
    teacher = trainer.teacher.engine.module  # ZeRO-3: gather the shards to read the weights
    with deepspeed.zero.GatheredParameters(list(teacher.parameters())):
        start_weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = {m.name: [] for m in trainer.members}
    for m in trainer.members:
        def record(module, inputs, kwargs, name=m.name):
            seen[name].append(hashlib.sha1(kwargs["input_ids"].numpy().tobytes()).hexdigest())
        m.engine.module.register_forward_pre_hook(record, with_kwargs=True)
    before = trainer.evaluate()
    for m in seen.values():
        m.clear()
    after = trainer.fit()
    # What the trained engines compute, recorded now: later tests may train them further.
    batches = [trainer.prepare_batch(b) for b in trainer.val_batches]
    with torch.no_grad():
        for m in trainer.members:
            m.engine.eval()
        final_logits = {m.name: [m.engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                                 for b in batches] for m in trainer.members}
        for m in trainer.members:
            m.engine.train()
    yield dict(trainer=trainer, saved=saved, start=start_weights, seen=seen, before=before, after=after, cfg=cfg,
               batches=batches, final_logits=final_logits)
    distributed.shutdown()  # DeepSpeed's cached groups too: a later run in this process makes fresh ones


def test_pretrained_teacher_starts_from_the_saved_weights(run):
    for name, tensor in run["saved"].state_dict().items():
        torch.testing.assert_close(run["start"][name], tensor)


def test_padded_student_vocabulary_trains(run):
    student = run["trainer"].students[0].engine.module
    assert student.get_input_embeddings().num_embeddings == PADDED_VOCAB
    assert run["trainer"].vocab == 4096


def test_every_model_sees_the_identical_batch(run):
    seen = run["seen"]
    assert len(seen["teacher"]) == len(seen["student"]) > 6  # train micro-steps + eval batches
    assert seen["teacher"] == seen["student"]
    assert len(set(seen["teacher"])) > 3


def test_validation_loss_drops_for_both_models(run):
    before, after = run["before"], run["after"]
    for name in ("teacher", "student"):
        assert after[f"{name}/eval/loss"] < before[f"{name}/eval/loss"] - 0.1


def test_agreement_is_the_share_of_validation_tokens_where_both_models_rank_the_same_token_first(run):
    """Recomputed here from the engines' own logits (the student's embedding is padded: only
    the tokenizer's 4,096 real tokens may be compared)."""
    same = counted = 0
    for i, batch in enumerate(run["batches"]):
        teacher = run["final_logits"]["teacher"][i][..., :4096].argmax(-1)
        student = run["final_logits"]["student"][i][..., :4096].argmax(-1)
        same += int((teacher == student)[batch["mask"]].sum())
        counted += int(batch["mask"].sum())
    assert run["after"]["student/eval/agreement"] == pytest.approx(same / counted, abs=1e-12)
    assert 0.0 < same / counted < 1.0  # trained for 6 steps: neither nothing nor everything in common
    common = sum(int(run["final_logits"]["teacher"][i][..., :4096].argmax(-1)[b["mask"]].bincount().max())
                 for i, b in enumerate(run["batches"]))  # the teacher's most common top-1 token, per batch
    assert run["after"]["teacher/eval/top1_share"] == pytest.approx(common / counted, abs=1e-12)


def test_output_holds_resolved_config_and_final_checkpoints(run):
    out = run["trainer"].output_dir
    assert load_config(out / "config.yaml").train.max_steps == run["cfg"].train.max_steps
    step = out / "checkpoints" / "step_00000006"
    assert (out / "checkpoints" / "latest").read_text().split()[0] == "step_00000006"
    for name in ("teacher", "student"):
        assert (step / name / "latest").read_text().strip() == "ds"
        assert any((step / name / "ds").iterdir())
    state = json.loads((step / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 1 and set(state["students"]) == {"student"}
    assert (step / "rank_00000.pt").exists()
    from codistill.checkpoint import verify
    assert verify(step) is None


def test_export_gives_hf_folders_whose_logits_equal_the_engines(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codistill.commands import export as export_tool

    trainer = run["trainer"]
    proc_args = [str(trainer.output_dir), str(tmp_path / "hf")]

    assert export_tool.main(proc_args) == 0
    batch = run["batches"][0]
    for member in trainer.members:  # the teacher is ZeRO-3 partitioned, the student ZeRO-2
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / member.name, local_files_only=True)
        assert (tmp_path / "hf" / member.name / "model.safetensors").exists()
        with torch.no_grad():
            got = exported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(got, run["final_logits"][member.name][0], rtol=1e-5, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf" / "student", local_files_only=True)
    assert len(tok) == 4096
    assert export_tool.main(proc_args) == 2  # never writes over an export silently


def test_train_step_reports_every_metric(run):
    trainer = run["trainer"]
    values = trainer.train_step(10)
    for name in ("teacher", "student"):
        for part in ("loss", "loss_ce", "lr", "grad_norm"):
            assert torch.isfinite(torch.tensor(values[f"{name}/train/{part}"]))
    assert values["student/train/loss_kd"] > 0
    assert values["schedule/alpha"] == 0.5 and values["schedule/temperature"] == 2.0
    assert not any(key.startswith("benefit/") for key in values)  # the benefit gate is off in this run
    blended = 0.5 * values["student/train/loss_ce"] + 0.5 * values["student/train/loss_kd"]
    assert values["student/train/loss"] == pytest.approx(blended, rel=1e-6)


def test_the_start_up_lines_name_the_gates_probe_and_a_gate_turned_off_sets_no_documents_aside(tmp_path):
    held = ["students.0.distill.benefit_probe=heldout", "distill.burn_in_steps=0"]
    gated = Trainer(load_config(MICRO, [f"output_dir={tmp_path / 'a'}", *held]))
    assert gated.heldout is not None and "blocks of training documents set aside" in " ".join(gated.describe())
    off = Trainer(load_config(MICRO, [f"output_dir={tmp_path / 'b'}", *held, "students.0.distill.benefit_gate=false"]))
    assert off.heldout is None and any(line.endswith("no benefit gate") for line in off.describe())


def test_a_run_that_repeats_small_data_many_times_is_warned():
    from codistill.report import describe_data

    class Tokenizer:
        name_or_path = "/data/tok"

        def __len__(self):
            return 8192

    cfg = load_config(MICRO, ["train.max_steps=100", "data.dataset=/data/mine.jsonl"])
    lines = describe_data(cfg, Tokenizer(), train_blocks=40, val_blocks=4, tokens_per_step=4 * 32)
    assert lines[0] == ("data: /data/mine.jsonl: 40 training blocks of 32 tokens (1,280 tokens), 4 validation blocks; "
                        "tokenizer /data/tok (8,192 tokens); 100 steps make 10 epochs")
    assert lines[1] == ("warning: train.max_steps=100 repeats the training data 10 times: the models will learn it by "
                        "heart (add data, or lower train.max_steps)")
    assert len(describe_data(cfg, Tokenizer(), 400, 4, 4 * 32)) == 1  # once over: no warning


def test_a_step_line_leads_with_each_models_cross_entropy():
    """The distilling student's objective (blended with its soft term) is not its loss on the data: the
    line leads with the CE, which compares across models and with validation."""
    from codistill.metrics import format_values

    step = {"teacher/train/loss": 8.4112, "teacher/train/loss_ce": 8.4112, "student/train/loss": 6.3524,
            "student/train/loss_ce": 8.393, "student/train/loss_kd": 0.2306, "schedule/alpha": 0.25,
            "perf/tokens_per_sec": 2083.2}
    assert format_values(step) == ("teacher ce 8.4112 | student ce 8.3930 (kd 0.2306, objective 6.3524) | "
                                   "alpha 0.250 | 2,083 tok/s")
    # a frozen teacher scores the batch (the teacher lead's reference) but does not train: not in the step line
    frozen = {"teacher/frozen/loss_ce": 3.1, "student/train/loss": 6.3524, "student/train/loss_ce": 8.393}
    assert format_values(frozen) == "student ce 8.3930 (objective 6.3524)"
    assert format_values({"teacher/eval/loss": 7.794, "student/eval/loss": 7.2254, "student/eval/agreement": 0.0015,
                          "teacher/eval/top1_share": 0.2}) == "teacher 7.7940 | student 7.2254 (agree 0.0015)"
    # high agreement because the teacher predicts one (frequent) token almost everywhere is said to be so
    assert format_values({"teacher/eval/loss": 7.0, "student/eval/loss": 7.1, "student/eval/agreement": 0.9999,
                          "teacher/eval/top1_share": 0.93}) == ("teacher 7.0000 | student 7.1000 (agree 0.9999: the "
                                                                "teacher predicts one token at 93% of positions)")


def test_a_twin_trained_alone_starts_equal_and_the_summary_says_whether_distilling_helped(tmp_path, capsys):
    from codistill.metrics import summary_lines

    cfg = load_config(MICRO, [f"output_dir={tmp_path / 'run'}", "students.0.twin=true", "train.max_steps=4",
                              "distill.burn_in_steps=0", "train.samples=1", "train.sample_tokens=5",
                              "train.sample_prompts=[Now is the winter]"])
    trainer = Trainer(cfg)
    assert [m.name for m in trainer.members] == ["teacher", "student", "student_alone"]
    start = trainer.evaluate()
    assert start["student/eval/loss"] == start["student_alone/eval/loss"]  # the same initial weights
    capsys.readouterr()
    final = trainer.fit()
    assert final["student/eval/loss"] != final["student_alone/eval/loss"]
    # every evaluation shows each model's greedy continuation of the fixed prompt: a log line, a TensorBoard text
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sample at step 4, ")]
    assert [line.split(":")[0] for line in shown] == [f"sample at step 4, {n}" for n in ("teacher", "student",
                                                                                         "student_alone")]
    assert all(line.split(": ", 1)[1].startswith("'Now is the winter' -> '") for line in shown)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert {"student/samples/text_summary", "config/text_summary"} <= set(events.Tags()["tensors"])
    from tensorboard.plugins.hparams import plugin_data_pb2

    plugins = events.PluginTagToContent("hparams")  # the run's settings, for HParams' side-by-side table
    session = plugin_data_pb2.HParamsPluginData.FromString(plugins["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["student_alone/alpha_max"].number_value == 0.0
    assert session.hparams["student/alpha_max"].number_value == 0.5 and session.hparams["seq_len"].number_value == 32
    lines = summary_lines(final, start, "teacher", ["student", "student_alone"], 1.0, 10, tmp_path, tmp_path,
                          cfg.twins())
    delta = final["student/eval/loss"] - final["student_alone/eval/loss"]
    verdict = "distilling helped" if delta < 0 else "distilling did not help here"
    assert f"  student against its twin trained alone (student_alone): {delta:+.4f} ({verdict})" in lines
    untwinned = summary_lines(final, start, "teacher", ["student"], 1.0, 10, tmp_path, tmp_path, {})
    assert any("add students.N.twin=true" in line for line in untwinned)


def test_a_twin_is_a_ce_only_copy_listed_once_and_only_where_a_student_learns_from_a_teacher():
    from codistill.config import dump_config, load_yaml, validate

    cfg = load_config(MICRO, ["students.0.twin=true"])
    student, twin = cfg.students
    assert twin.name == "student_alone" and not twin.twin and twin.init_seed == student.init_seed == 7 + 1
    d = cfg.distill_for(1)
    assert d.alpha_max == 0.0 and not d.benefit_gate and d.on_policy is None
    again = validate(load_yaml(dump_config(cfg)), "resolved")  # a resolved config lists the twin already
    assert [s.name for s in again.students] == ["student", "student_alone"] and again.twins() == cfg.twins()
    listening = load_config(MICRO, ["students.0.twin=true", "teacher.distill={}"])
    assert listening.teacher.sources == ["student"]  # the teacher never listens to the baseline
    with pytest.raises(ConfigError, match="student.twin: a twin trained alone is the baseline"):
        load_config(MICRO, ["mode=hard", "students.0.twin=true", "data.dataset=x", "data.prompt_field=p"])


def test_tokens_per_second_counts_no_padding(tmp_path, tokenizer):
    """Short documents, unpacked: each block is one document padded to seq_len; only its tokens count."""
    import json

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"line {i} of a short text"}) + "\n"
                                                 for i in range(200)))
    tokenizer.save_pretrained(tmp_path / "tok")
    trainer = Trainer(load_config(MICRO, [f"output_dir={tmp_path / 'run'}", f"data.dataset={tmp_path / 'docs.jsonl'}",
                                          f"data.tokenizer={tmp_path / 'tok'}", f"data.cache_dir={tmp_path / 'cache'}",
                                          "data.pack=false", "distill.benefit_gate=false"]))
    batch = trainer.stream.peek()  # the micro-batch the step trains on
    values = trainer.train_step(0)
    assert values["perf/tokens"] == int(batch["attention_mask"].sum()) < 4 * 32  # padding not counted
    assert values["perf/tokens_per_sec"] > 0


@pytest.mark.parametrize("kind, compile_section, off", [("AdamW", None, True), ("MuonWithAuxAdam", None, False),
                                                     ("AdamW", {"deepcompile": True}, False)])
def test_an_engine_is_built_with_torchdynamo_off_unless_it_trains_with_muon(monkeypatch, tokenizer, kind,
                                                                            compile_section, off):
    """DeepSpeed's ZeRO check imports its Muon optimizer, whose torch.compile decorators load TorchInductor: not
    for a run that does not use Muon, nor one that asks DeepSpeed to compile. A user's own setting is kept and the
    variable is restored after."""
    from transformers import AutoConfig

    from codistill import engines

    seen = []
    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: seen.append(engines.os.environ.get(
        "TORCHDYNAMO_DISABLE")) or (None,))
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    spec = load_config(MICRO).students[0]
    hf = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    ds = {"optimizer": {"type": kind}, "zero_optimization": {"stage": 2},
          **({"compile": compile_section} if compile_section else {})}
    engines.build_engine(spec, hf, ds, seed=0, trainable=True)
    assert seen == ["1" if off else None] and "TORCHDYNAMO_DISABLE" not in engines.os.environ
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")
    engines.build_engine(spec, hf, ds, seed=0, trainable=False)
    assert seen[-1] == "0" and engines.os.environ["TORCHDYNAMO_DISABLE"] == "0"
