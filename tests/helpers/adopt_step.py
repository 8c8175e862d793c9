"""Train a run with selection, then make its student and twin differ by one more step, let the twin take the
student's state (selection.adopt) and step both on one CE batch: writes, per rank, whether they differed before
and are bitwise equal after (every weight, gathered under ZeRO-3; this rank's optimizer state).

    adopt_step.py output_dir=OUT [key.path=value ...]   (writes OUT/rank<N>.json)
"""
import torch
from micro import leave, micro_trainer, write_rank

from codistill.engines import forward_logits
from codistill.losses import distill_loss
from codistill.selection import _inner, adopt, masters


def weights(member) -> list[torch.Tensor]:
    import deepspeed

    params = list(member.engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):  # a no-op below ZeRO-3
        return [p.detach().clone() for p in params]


def states(member) -> list[torch.Tensor]:
    """This rank's fp32 master weights and their moments."""
    inner = _inner(member.engine.optimizer)
    held = [t.detach().clone() for p in masters(member.engine.optimizer)
            for t in [p, *(v for v in inner.state.get(p, {}).values() if torch.is_tensor(v))]]
    assert len(held) > len(masters(member.engine.optimizer)), "no optimizer state found"
    return held


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def ce_step(trainer, member, batch) -> None:
    loss = distill_loss(forward_logits(member, batch, trainer.vocab), batch["labels"], batch["mask"]).loss
    member.engine.backward(loss)
    member.engine.step()


def main() -> None:
    cfg, trainer = micro_trainer()
    trainer.fit()
    student, twin = (next(m for m in trainer.members if m.name == n) for n in ("student", "student_alone"))
    trainer.train_step(cfg.train.max_steps)  # one more step: the student distils, the twin does not
    differed = not same(weights(student), weights(twin))
    adopt(twin, student)
    batch = trainer.prepare_batch(next(trainer.stream))
    for m in (student, twin):
        ce_step(trainer, m, batch)
    write_rank(cfg, trainer, {"differed": differed,
                              "weights_equal": same(weights(student), weights(twin)),
                              "optimizer_equal": same(states(student), states(twin)),
                              "lr": [student.engine.get_lr()[0], twin.engine.get_lr()[0]]})


if __name__ == "__main__":
    main()
    leave(0)  # no interpreter teardown: C++ threads left by the engines may abort it
