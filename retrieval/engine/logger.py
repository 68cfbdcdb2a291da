"""Training logs: console, OUTPUT_DIR/metrics.jsonl (one JSON object per line) and TensorBoard.

Only the main process writes; on other ranks MetricLogger is inert and console logging is at
WARNING.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

FORMAT = "[%(asctime)s %(name)s %(levelname)s] %(message)s"


def setup_logging(main_process: bool = True) -> None:
    """One console handler on stderr (beside tqdm's bars): INFO on the main process, else WARNING.

    Called by every tool at start-up and again by the trainer once the rank is known; repeated
    calls only change the level, so no line is printed twice.
    """
    level = logging.INFO if main_process else logging.WARNING
    root = logging.getLogger()
    if not any(getattr(h, "_retrieval", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        handler._retrieval = True  # marks our handler so repeated calls do not add another
        root.addHandler(handler)
    root.setLevel(level)


class MetricLogger:
    """Writes scalar metrics to metrics.jsonl and TensorBoard (main process only)."""

    def __init__(
        self, output_dir: str | os.PathLike, enabled: bool, tensorboard: bool = True
    ) -> None:
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard import is slow

            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        """Append {'iteration': it, **metrics} to metrics.jsonl and each scalar to TensorBoard."""
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, iteration)

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
