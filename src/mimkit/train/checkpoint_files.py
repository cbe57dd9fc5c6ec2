"""The checkpoint files of a run (`Checkpoints`): written so that they survive interruption, and loaded
without executing anything. (What the loop puts in them and restores is `mimkit.train.training_state`.)

A checkpoint at optimizer step N is two files in ``<run>/checkpoints/``:
``step-N.safetensors`` (model weights) and ``step-N.pt`` (optimizer, step, data
position and RNG states; tensors and plain containers only, so it loads with
``torch.load(weights_only=True)``; an imported run's step-0 state holds only the step and where the
weights came from, and training starts from them with a fresh optimizer). Each is written to a
temporary file created exclusively in that folder (a random name that no planted symlink can claim)
and renamed, the state file first, so a checkpoint whose weights file exists is complete. What a
killed save leaves (temporary files, ours and safetensors' own; a state file without its weights) is
removed at start-up and after each pruning. A newest checkpoint that cannot be read (damaged, or a
pickle that would run code) is skipped for the newest readable one. A run that tracks an evaluation
metric also keeps ``best.safetensors`` and ``best.json`` (its step and value) there. Runs saved before
2026-12-06 named the files with eight digits (``step-00000003.pt``); those names are still read, and a
step's files keep the name they were saved under.
"""

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from mimkit.errors import MimkitError, explain_write_errors
from mimkit.files import check_free_space, write_atomically, write_text_atomically
from mimkit.safe_load import load_pickle

_NAME = re.compile(r"^step-(\d+)\.safetensors$")
_STATE_NAME = re.compile(r"^step-(\d+)\.pt$")


def _is_temporary(name: str) -> bool:
    """Ours end in ``.tmp``; safetensors writes ``.tmpXXXXXX`` next to its target, then renames it."""
    return name.endswith(".tmp") or name.startswith(".tmp")


def _tensor_bytes(value) -> int:
    """Bytes of the tensors in a (nested) state: about what saving it takes."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


class Checkpoints:
    """The checkpoints of one run directory: save, list, keep the last ``keep_last``, load."""

    def __init__(self, run_dir: str | Path, keep_last: int = 2):
        if keep_last < 1:  # 0 would keep every checkpoint and a negative count delete them
            raise MimkitError(f"keep_last must be at least 1, got {keep_last}")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def keeping(self, keep_last: int) -> "Checkpoints":
        """The same checkpoints, keeping the last ``keep_last`` from the next save on."""
        return Checkpoints(self.dir.parent, keep_last)

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        if not self.dir.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m and (self.dir / f"step-{m.group(1)}.pt").exists())

    def _stem(self, step: int) -> str:
        """``step-N``, or an older run's eight-digit ``step-0000000N`` where that checkpoint exists."""
        padded = f"step-{step:08d}"
        return padded if (self.dir / f"{padded}.safetensors").exists() else f"step-{step}"

    def weights_path(self, step: int) -> Path:
        return self.dir / f"{self._stem(step)}.safetensors"

    def state_path(self, step: int) -> Path:
        return self.dir / f"{self._stem(step)}.pt"

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, model: nn.Module, state: dict) -> None:
        """Write weights and training state for ``step``, then drop checkpoints beyond ``keep_last``; refused
        before anything is written when the disk has not the room for both."""
        with explain_write_errors(self.dir):
            self.dir.mkdir(parents=True, exist_ok=True)
        check_free_space(self.state_path(step), _tensor_bytes(state) + _tensor_bytes(model.state_dict()))
        write_atomically(self.state_path(step), lambda tmp: torch.save(state, tmp))
        write_atomically(self.weights_path(step), lambda tmp: save_model(model, str(tmp)))
        for old in self.steps()[:-self.keep_last]:
            weights, state = self.weights_path(old), self.state_path(old)  # named before either goes
            weights.unlink()
            state.unlink()
        self.clean()

    def clean(self) -> None:
        """Remove what a save killed midway leaves: temporary files and state files without weights.

        Symlinks are removed, never followed; a run directory holds one writer at a time, so nothing here
        is being written.
        """
        if not self.dir.is_dir():
            return
        for path in self.dir.iterdir():
            state = _STATE_NAME.match(path.name)
            orphan = state and not (self.dir / f"step-{state.group(1)}.safetensors").exists()
            if (_is_temporary(path.name) or orphan) and (path.is_symlink() or path.is_file()):
                path.unlink(missing_ok=True)

    @property
    def best_path(self) -> Path:
        """Where the best weights are kept (`save_best`)."""
        return self.dir / "best.safetensors"

    def save_best(self, step: int, model: nn.Module, metric: str, value: float) -> None:
        """Keep ``model``'s weights as the best so far by ``metric`` (`best_path`, ``best.json``)."""
        with explain_write_errors(self.dir):
            self.dir.mkdir(parents=True, exist_ok=True)
        write_atomically(self.best_path, lambda tmp: save_model(model, str(tmp)))
        record = {"step": step, "metric": metric, "value": value}
        write_text_atomically(self.dir / "best.json", json.dumps(record))

    def best(self) -> dict | None:
        """``{"step", "metric", "value"}`` of the kept best weights, or None."""
        path = self.dir / "best.json"
        return json.loads(path.read_text()) if path.exists() else None

    def load_state(self, step: int) -> dict:
        """The training state saved with ``step``'s weights; a one-line `MimkitError` when it is damaged or
        would run code (nothing in it is executed)."""
        path = self.state_path(step)
        state = load_pickle(path)
        if not isinstance(state, dict) or "step" not in state:
            raise MimkitError(f"'{path}' is not a mimkit training state (no step in it)")
        return state

    def resume(self, model: nn.Module) -> dict | None:
        """Load the newest checkpoint that reads cleanly: its weights into ``model``, its state returned.

        A checkpoint that fails to load is warned about and the next older one tried. Returns None when
        the run has no checkpoint; raises `MimkitError` when none of them loads.
        """
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                load_weights(model, self.weights_path(step))
                return self.load_state(step)
            except MimkitError as err:
                failures.append(str(err))
                warnings.warn(f"skipping checkpoint step {step}, it does not load: {err}", stacklevel=2)
        if steps:
            raise MimkitError(f"none of the {len(steps)} checkpoints in '{self.dir}' loads (newest: "
                              f"{failures[0]}); move that folder away to start the run afresh")
        return None


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load safetensors weights into ``model`` strictly, with a one-line error on mismatch."""
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except RuntimeError as err:  # shape mismatch
        reason = str(err).splitlines()[-1].strip()
        raise MimkitError(f"weights in '{path}' do not fit the model: {reason}") from None
    except Exception as err:  # a missing, truncated or damaged file; safetensors raises its own types
        raise MimkitError(f"cannot read weights '{path}': {str(err).splitlines()[0]}") from None
    if missing or unexpected:
        raise MimkitError(f"weights in '{path}' do not fit the model: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
