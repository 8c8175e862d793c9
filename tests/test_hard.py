"""Hard-label (sequence-level) distillation: CE on teacher-written responses only."""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import MICRO, run_cmd


def test_hard_mode_trains_on_responses_without_loading_the_teacher(tmp_path, tokenizer):
    data = tmp_path / "generated.jsonl"
    with open(data, "w") as fh:
        for i in range(60):
            fh.write(json.dumps({"prompt": f"Line {i} of the play:", "response": " To be, or not to be." * 3}) + "\n")
    tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "run"
    proc = run_cmd([sys.executable, "launch/train.py", "--config", str(MICRO), f"output_dir={out}", "mode=hard",
                    f"data.dataset={data}", "data.text_field=response", "data.prompt_field=prompt", "data.pack=false",
                    f"data.tokenizer={tmp_path / 'tok'}", f"data.cache_dir={tmp_path / 'cache'}",
                    "teacher.pretrained=/nonexistent/teacher", "teacher.config={}", "train.max_steps=8",
                    "train.eval_interval=8"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "teacher: not loaded; hard mode trains on the text it generated" in proc.stdout
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "student/train/loss" in tags and not any(t.startswith("teacher/") or t.startswith("schedule/") for t in tags)
    losses = [e.value for e in acc.Scalars("student/eval/loss")]
    assert losses[-1] < losses[0]  # the repeated response is learnt
