"""Train while the student's loss turns NaN on its Nth training micro-step, to test
the train.nonfinite policy. Runs the real entry point:

    inject_nan.py N --config ... [key.path=value ...]
"""
import sys

import torch

import codistill.step as step_module
from codistill.commands import train


def main() -> int:
    nan_at, calls, real = int(sys.argv[1]), [0], step_module.distill_loss

    def poisoned(logits, labels, mask, targets=None, *args, **kwargs):
        parts = real(logits, labels, mask, targets, *args, **kwargs)
        if targets is not None and torch.is_grad_enabled():  # a student's training micro-step
            calls[0] += 1
            if calls[0] == nan_at:
                return parts._replace(loss=parts.loss * float("nan"))
        return parts

    step_module.distill_loss = poisoned
    # The benefit gate's own loss calls would count as training micro-steps here.
    return train.main(sys.argv[2:] + ["distill.benefit_gate=false"])


if __name__ == "__main__":
    sys.exit(main())
