"""Run a few co-distillation steps and record, per rank, a hash of every batch each
model's forward received. Launched by tests/test_launch.py under the deepspeed launcher.

    record_batches.py output_dir=OUT [key.path=value ...]   (writes OUT/rank<N>.json)
"""
import hashlib

from micro import leave, micro_trainer, write_rank


def main() -> None:
    cfg, trainer = micro_trainer()
    seen = {m.name: [] for m in trainer.members}
    for m in trainer.members:
        def record(module, inputs, kwargs, name=m.name):
            seen[name].append(hashlib.sha1(kwargs["input_ids"].numpy().tobytes()).hexdigest())
        m.engine.module.register_forward_pre_hook(record, with_kwargs=True)
    for step in range(3):
        trainer.train_step(step)
    write_rank(cfg, trainer, seen)


if __name__ == "__main__":
    main()
    leave(0)  # no interpreter teardown: C++ threads left by the engines may abort it
