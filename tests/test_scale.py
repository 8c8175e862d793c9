"""What real LLM pairs need: activation checkpointing, a choice of attention kernel, ZeRO-3
construction without whole copies."""
import pytest

from conftest import launch, read_scalars



def student(name, **extra):
    keys = ", ".join(f"{k}: {v}" for k, v in extra.items())
    return (f"{{name: {name}, init_seed: 11, {keys}{', ' if keys else ''}config: {{hidden_size: 32, intermediate_size: 64, "
            "num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64}, "
            "deepspeed: {zero_optimization: {stage: 3}, optimizer: {type: AdamW, params: {lr: 3.0e-3}}, "
            "gradient_clipping: 1.0}}")


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    out = tmp_path_factory.mktemp("twins") / "run"
    students = ", ".join([student("plain"), student("recompute", gradient_checkpointing="true"),
                          student("eager", attn_implementation="eager")])
    proc = launch(f"output_dir={out}", f"students=[{students}]", "train.max_steps=5", "train.eval_interval=5")
    return out, proc


def test_checkpointing_and_eager_attention_train_the_same_model(twins):
    """fp32 on CPU: recomputing layers (non-reentrant, ZeRO-3) and eager attention give the plain
    student's losses to 1e-6 and 1e-5 for 5 steps on 2 ranks."""
    out, _ = twins
    scalars = read_scalars(out)
    for step in range(1, 6):
        plain = scalars["plain/train/loss"][step]
        assert scalars["recompute/train/loss"][step] == pytest.approx(plain, abs=1e-6), step
        assert scalars["eager/train/loss"][step] == pytest.approx(plain, abs=1e-5), step
    assert scalars["recompute/eval/loss"][5] == pytest.approx(scalars["plain/eval/loss"][5], abs=1e-6)
