"""Run a few co-distillation steps and record, per rank, a hash of every batch each
model's forward received. Launched by tests/test_launch.py under the deepspeed launcher.

    record_batches.py output_dir=OUT [key.path=value ...]   (writes OUT/rank<N>.json)
"""
import hashlib
import json
import sys
from pathlib import Path

from codistill.config import load_config
from codistill.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    cfg = load_config(ROOT / "tests" / "configs" / "micro.yaml", overrides)
    trainer = Trainer(cfg)
    seen = {m.name: [] for m in trainer.members}
    for m in trainer.members:
        def record(module, inputs, kwargs, name=m.name):
            seen[name].append(hashlib.sha1(kwargs["input_ids"].numpy().tobytes()).hexdigest())
        m.engine.module.register_forward_pre_hook(record, with_kwargs=True)
    for step in range(3):
        trainer.train_step(step)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.world.rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
