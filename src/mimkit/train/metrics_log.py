"""Run metrics: one JSON object per line in ``<run>/metrics.jsonl``, and TensorBoard events when the
``tensorboard`` package is installed."""

import json
import warnings
from pathlib import Path

from mimkit.errors import MimkitError, explain_write_errors
from mimkit.files import write_text_atomically


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
    """All records of a run, in order.

    A last line cut short (a crash while it was written, or NUL bytes after a power loss) is left out with a
    warning (`drop_records_after` then trims it from the file); a damaged line before it is a one-line
    `MimkitError`.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise MimkitError(f"'{path}' line {number} is not a JSON record ({line[:40]!r}); remove or "
                                  "repair that line") from None
            warnings.warn(f"'{path}': the last line was cut short (a crash or power loss while it was "
                          f"written) and is left out: {line[:40]!r}", stacklevel=2)
    return records


def drop_records_after(run_dir: str | Path, step: int) -> None:
    """Forget records past ``step`` (a resumed run writes them again)."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
        write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))
