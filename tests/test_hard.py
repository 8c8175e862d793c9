"""Hard-label (sequence-level) distillation: CE on teacher-written responses only."""
import json

import datasets

from conftest import launch, read_scalars, run_here, train_here


def test_hard_mode_trains_on_responses_without_loading_the_teacher(tmp_path, tokenizer, capsys):
    data = tmp_path / "generated.jsonl"
    with open(data, "w") as fh:
        for i in range(60):
            fh.write(json.dumps({"prompt": f"Line {i} of the play:", "response": " To be, or not to be." * 3}) + "\n")
    tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "run"
    train_here(f"output_dir={out}", "mode=hard", f"data.dataset={data}", "data.text_field=response",
               "data.prompt_field=prompt", "data.pack=false", f"data.tokenizer={tmp_path / 'tok'}",
               f"data.cache_dir={tmp_path / 'cache'}", "teacher.pretrained=/nonexistent/teacher",
               "teacher.config={}", "train.max_steps=8", "train.eval_interval=8")
    assert "teacher: not loaded; hard mode trains on the text it generated" in capsys.readouterr().out
    tb = read_scalars(out)
    assert "student/train/loss" in tb and not any(t.startswith("teacher/") or t.startswith("schedule/") for t in tb)
    losses = list(tb["student/eval/loss"].values())
    assert losses[-1] < losses[0]  # the repeated response is learnt


def test_generation_is_seeded_identical_on_one_and_two_ranks_and_trains(tmp_path, pretrained_teacher):
    args = ["--num-prompts", "6", "--prompt-tokens", "8", "--max-new-tokens", "6",
            "--batch-size", "2", "--seed", "3", "--top-p", "0.9", f"teacher.pretrained={pretrained_teacher}",
            "teacher.config={}"]
    from codistill.commands import generate

    one = run_here(generate.main, "--out", str(tmp_path / "one"), *args)
    two = launch("--out", str(tmp_path / "two"), *args, script="tools/generate.py")
    a = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in (tmp_path / "one").glob("part-*")))["train"]
    b = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in (tmp_path / "two").glob("part-*")))["train"]
    assert len(a) == 6 and a.to_dict() == b.to_dict()
    # an untrained teacher rarely ends a reply in 6 tokens: the count of cut replies is said, alike on 1 and 2 ranks
    said = [line for line in one.stdout.splitlines() if "ran to --max-new-tokens=6 without ending" in line]
    assert said and said == [line for line in two.stdout.splitlines() if "ran to --max-new-tokens" in line]
    assert all(len(r) > 0 for r in a["response"])
    assert json.loads((tmp_path / "one" / "codistill_generation.json").read_text())["complete"]
    train_here(f"output_dir={tmp_path / 'run'}", "mode=hard", f"data.dataset={tmp_path / 'one'}",
               "data.text_field=response", "data.prompt_field=prompt", "data.pack=false", "data.val_fraction=0.34",
               "train.micro_batch_size=2", "train.max_steps=2", f"teacher.pretrained={pretrained_teacher}",
               "teacher.config={}")


def test_the_cut_count_covers_every_part_of_a_continued_generation(tmp_path, capsys):
    """Parts written by an earlier, killed invocation count as well as this one's."""
    from codistill import cache
    from codistill.commands.generate import _finish, features

    for b, cut in enumerate([[True, False], [True, True], [False]]):
        cache.write_part(tmp_path, b, {"prompt": ["p"] * len(cut), "response": ["r"] * len(cut), "cut": cut},
                         features(False))
    _finish(tmp_path, {"max_new_tokens": 6}, batches=3, prompts=6)
    out = capsys.readouterr().out
    assert "wrote 5 prompt/response pairs" in out and "1 of 6 replies were empty" in out
    assert "3 of the 5 replies ran to --max-new-tokens=6 without ending" in out
