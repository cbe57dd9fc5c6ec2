"""Run metrics: one JSON object per line in ``<run>/metrics.jsonl``, and TensorBoard events when the
``tensorboard`` package is installed."""

import json
import warnings
from functools import cached_property
from pathlib import Path

from mimkit.errors import MimkitError, explain_write_errors
from mimkit.files import write_text_atomically


class MetricsLog:
    """Appends metric records; a no-op on non-main ranks. Nothing is written, TensorBoard's folder included,
    before the first record."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"

    @cached_property
    def tensorboard(self):
        """TensorBoard's event writer, opened at the first record; None without the (optional) package."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.path.parent / "tensorboard"))

    def write(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with explain_write_errors(self.path), self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)

    def drop_after(self, step: int) -> None:
        """Forget records past ``step`` (a resumed run writes them again)."""
        if self.enabled and self.path.exists():
            kept = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= step]
            write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        """Close TensorBoard's writer, if a record opened it; a later record opens it again."""
        writer = vars(self).pop("tensorboard", None)
        if writer is not None:
            writer.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run, in order.

    A last line cut short (a crash while it was written, or NUL bytes after a power loss) is left out with a
    warning (`MetricsLog.drop_after` then trims it from the file); a damaged line before it is a one-line
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
