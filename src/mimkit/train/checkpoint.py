"""Checkpoints that survive interruption and load without executing anything.

A checkpoint at optimizer step N is two files in ``<run>/checkpoints/``:
``step-0000000N.safetensors`` (model weights) and ``step-0000000N.pt`` (optimizer, step, data
position and RNG states; tensors and plain containers only, so it loads with
``torch.load(weights_only=True)``; an imported run's step-0 state holds only the step and where the
weights came from, and training starts from them with a fresh optimizer). Each is written to a
temporary name and renamed, the state file first, so a checkpoint whose weights file exists is complete.
A run that tracks an evaluation metric also keeps ``best.safetensors`` and ``best.json`` (its step and
value) there.
"""

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from mimkit.errors import MimkitError

_NAME = re.compile(r"^step-(\d{8})\.safetensors$")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class Checkpoints:
    """The checkpoints of one run directory: save, list, keep the last ``keep_last``, load."""

    def __init__(self, run_dir: str | Path, keep_last: int = 2):
        if keep_last < 1:  # 0 would keep every checkpoint and a negative count delete them
            raise MimkitError(f"keep_last must be at least 1, got {keep_last}")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        if not self.dir.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m and (self.dir / f"step-{m.group(1)}.pt").exists())

    def weights_path(self, step: int) -> Path:
        return self.dir / f"step-{step:08d}.safetensors"

    def state_path(self, step: int) -> Path:
        return self.dir / f"step-{step:08d}.pt"

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, model: nn.Module, state: dict) -> None:
        """Write weights and training state for ``step``, then drop checkpoints beyond ``keep_last``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic(self.state_path(step), lambda tmp: torch.save(state, tmp))
        _atomic(self.weights_path(step), lambda tmp: save_model(model, str(tmp)))
        for old in self.steps()[:-self.keep_last]:
            self.weights_path(old).unlink()
            self.state_path(old).unlink()

    def save_best(self, step: int, model: nn.Module, metric: str, value: float) -> None:
        """Keep ``model``'s weights as the best so far by ``metric`` (``best.safetensors``, ``best.json``)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic(self.dir / "best.safetensors", lambda tmp: save_model(model, str(tmp)))
        record = {"step": step, "metric": metric, "value": value}
        _atomic(self.dir / "best.json", lambda tmp: tmp.write_text(json.dumps(record)))

    def best(self) -> dict | None:
        """``{"step", "metric", "value"}`` of the kept best weights, or None."""
        path = self.dir / "best.json"
        return json.loads(path.read_text()) if path.exists() else None

    def load_state(self, step: int) -> dict:
        return torch.load(self.state_path(step), map_location="cpu", weights_only=True)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load safetensors weights into ``model`` strictly, with a one-line error on mismatch."""
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except RuntimeError as err:  # shape mismatch
        reason = str(err).splitlines()[-1].strip()
        raise MimkitError(f"weights in '{path}' do not fit the model: {reason}") from None
    if missing or unexpected:
        raise MimkitError(f"weights in '{path}' do not fit the model: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
