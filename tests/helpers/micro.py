"""What the helpers launched under a launcher share: a Trainer on tests/configs/micro.yaml with the
command line's overrides, and one JSON file per rank in the run's output folder."""
import json
import sys
from pathlib import Path

from codistill.cli import leave  # noqa: F401  (the helpers end through it)
from codistill.config import RunConfig, load_config
from codistill.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def micro_trainer(*defaults: str) -> tuple[RunConfig, Trainer]:
    """The config (``defaults``, then the command line's overrides; the launcher's --local_rank dropped) and
    its Trainer."""
    overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    cfg = load_config(ROOT / "tests" / "configs" / "micro.yaml", [*defaults, *overrides])
    return cfg, Trainer(cfg)


def write_rank(cfg: RunConfig, trainer: Trainer, data) -> None:
    """``data`` as OUT/rank<N>.json."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.world.rank}.json").write_text(json.dumps(data))
