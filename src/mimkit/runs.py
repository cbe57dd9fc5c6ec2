"""Run directories: what a finished (or interrupted) run leaves, and how to get its model back.

``<run>/config.yaml`` is the resolved configuration; ``<run>/checkpoints/step-*.safetensors`` the weights.
"""

from pathlib import Path

from torch import nn

from mimkit.config import PretrainConfig, from_dict, read_yaml
from mimkit.errors import MimkitError
from mimkit.methods import METHODS
from mimkit.train.checkpoint import Checkpoints, load_weights


def load_config(run_dir: str | Path) -> PretrainConfig:
    """The resolved configuration a run saved."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise MimkitError(f"'{run_dir}' is not a mimkit run directory (no config.yaml)")
    return from_dict(PretrainConfig, read_yaml(path))


def latest_weights(run_dir: str | Path) -> Path:
    """The newest weights file of a run."""
    step = Checkpoints(run_dir).latest()
    if step is None:
        raise MimkitError(f"run '{run_dir}' has no checkpoint yet")
    return Checkpoints(run_dir).weights_path(step)


def load_run(run_dir: str | Path) -> tuple[nn.Module, PretrainConfig]:
    """Rebuild a run's model from its configuration and load its newest weights (eval mode, CPU)."""
    config = load_config(run_dir)
    model = METHODS[config.method].build_model(config)
    load_weights(model, latest_weights(run_dir))
    return model.eval(), config
