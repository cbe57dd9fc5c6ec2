"""Run metrics: one JSON object per line in ``<run>/metrics.jsonl``, and TensorBoard events when the
``tensorboard`` package is installed."""

import json
from pathlib import Path

from mimkit.errors import explain_write_errors


class MetricsLog:
    """Appends metric records; a no-op on non-main ranks."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                return
            self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with explain_write_errors(self.path), self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def drop_records_after(run_dir: str | Path, step: int) -> None:
    """Forget records past ``step`` (a resumed run writes them again)."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
