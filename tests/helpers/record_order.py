"""Run a few training steps and record, per rank, the order of every model's forwards and optimizer
steps, and each learner's targets against the predictions its sources made before any step.
Launched by tests/test_mutual.py under the deepspeed launcher.

    record_order.py output_dir=OUT [key.path=value ...]   (writes OUT/rank<N>.json)
"""
import torch
from micro import leave, micro_trainer, write_rank


def main() -> None:
    cfg, trainer = micro_trainer()
    events = []
    for m in trainer.members:
        m.engine.module.register_forward_pre_hook(lambda *_, name=m.name: events.append(f"forward {name}"))
        step = m.engine.step

        def stepped(*args, name=m.name, step=step, **kwargs):
            events.append(f"step {name}")
            return step(*args, **kwargs)

        m.engine.step = stepped
    # Each learner's targets, as its loss reads them, against its sources' predictions before the step.
    checks = []
    from codistill import step as step_module

    original = step_module.SourceTargets.make

    def make_and_check(self, sources, state, temperature):
        targets = original(self, sources, state, temperature)
        with torch.no_grad():
            before = [torch.softmax(current["before"][j] / temperature, -1) for j in sources]
            expected = torch.stack(before).mean(0).reshape(-1, before[0].shape[-1])
            got = torch.softmax(targets.logits.reshape(-1, expected.shape[-1])[0:expected.shape[0]].float()
                                / temperature, -1)
            checks.append(float((got - expected).abs().max()))
        return targets

    step_module.SourceTargets.make = make_and_check
    current = {}
    for n in range(4):
        batch = trainer.prepare_batch(trainer.stream.peek())
        with torch.no_grad():  # every model's prediction before this step, from its bare module
            current["before"] = {k: m.engine.module(input_ids=batch["input_ids"],
                                                    attention_mask=batch["attention_mask"]).logits[..., :trainer.vocab]
                                 for k, m in enumerate(trainer.members)}
        events.append(f"train_step {n}")
        trainer.train_step(n)
        events.append("end")
        trainer.step = n + 1
    write_rank(cfg, trainer, {"events": events, "checks": checks})


if __name__ == "__main__":
    main()
    leave(0)  # no interpreter teardown: C++ threads left by the engines may abort it
