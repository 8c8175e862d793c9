"""Rank-0 reporting: TensorBoard scalars, a progress bar and a concise log line."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Mapping

from tqdm.auto import tqdm

log = logging.getLogger("codistill")


class Metrics:
    """Writes ``<output_dir>/tensorboard`` on rank 0; a no-op on other ranks."""

    def __init__(self, output_dir: Path, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        self.total = total_steps
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (enabled and sys.stderr.isatty()), unit="step",
                        dynamic_ncols=True, leave=True)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def advance(self, step: int, values: Mapping[str, float], line: bool) -> None:
        """Record one finished optimizer step; print a summary line when ``line``."""
        self.scalars(step, values)
        if not self.enabled:
            return
        self.bar.update(1)
        short = {k.replace("/train/", " ").replace("schedule/", ""): v for k, v in values.items()
                 if k.endswith("/train/loss") or k == "schedule/alpha"}
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in short.items()}, refresh=False)
        if line:
            self.bar.write(f"step {step}/{self.total}: " + format_values(values))

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def format_values(values: Mapping[str, float]) -> str:
    """A short human summary: per model its loss (and CE/KD parts), then α, T and throughput."""
    models: dict[str, list[str]] = {}
    extra = []
    for tag, value in values.items():
        parts = tag.split("/")
        if len(parts) == 3 and parts[2] in ("loss", "loss_ce", "loss_kd", "agreement"):
            label = {"loss": "", "loss_ce": "ce ", "loss_kd": "kd ", "agreement": "agree "}[parts[2]]
            models.setdefault(parts[0], []).append(f"{label}{value:.4f}")
        elif tag == "schedule/alpha":
            extra.append(f"alpha {value:.3f}")
        elif tag == "schedule/temperature":
            extra.append(f"T {value:g}")
        elif tag == "perf/tokens_per_sec":
            extra.append(f"{value:,.0f} tok/s")
        elif tag == "perf/peak_memory_gb":
            extra.append(f"peak {value:.2f} GB")
    shown = []
    for name, items in models.items():
        head, rest = items[0], items[1:]
        shown.append(f"{name} {head}" + (f" ({', '.join(rest)})" if rest else ""))
    return " | ".join(shown + extra)
