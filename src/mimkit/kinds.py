"""The kinds of run, by name: pretraining, tokenizer, fine-tuning, segmentation, linear probe and k-NN.

A run directory's ``config.yaml`` says its kind (``kind: finetune``), and whatever reads a run looks the kind
up here and asks its record, instead of guessing the kind from the configuration's keys. Each kind registers
its `Kind` record when its module is imported (`BUILTIN_KINDS`, loaded on the first name not found, as
`mimkit.registry` loads the methods); a new kind is its own module, nothing else. This module is a leaf: it
imports nothing of mimkit above `mimkit.config`, so the run-directory layer (`mimkit.runs`) can dispatch on
kinds without importing the evaluation code that defines them.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mimkit.config import from_dict
from mimkit.errors import MimkitError

# the modules whose import registers mimkit's own kinds
BUILTIN_KINDS = ("mimkit.pretrain", "mimkit.eval.finetune", "mimkit.eval.segment", "mimkit.eval.linprobe",
                 "mimkit.eval.knn")


@dataclass(frozen=True)
class Kind:
    """What a kind of run provides to the commands that read its run directories.

    Attributes:
        name: what ``config.yaml`` says under ``kind:``.
        config: the dataclass of its configuration.
        summary: one line on what the kind does, for ``mimkit kinds``.
        read: the saved configuration's values (``kind:`` removed) -> its typed configuration.
        spec: its configuration -> the pretraining configuration of the encoder it holds or evaluates
            (`mimkit.config.PretrainConfig`); None: it has none.
        encoder: (configuration, run directory, weights file or None) -> (the trained encoder, the weights it
            loaded), for the commands that evaluate a run's encoder (`mimkit.runs.load_encoder`); None: a run
            of this kind gives no encoder to evaluate.
        load: (configuration, run directory) -> its trained model in eval mode on CPU; None: nothing to load.
        visualize: (configuration, run directory, PNG path, number of images, seed) -> the files written,
            for ``mimkit visualize``; None: it draws nothing.
        predict: (configuration, run directory, images folder, out folder, tta, batch size, force) ->
            one line on what was written, for ``mimkit predict``; None: it predicts nothing.
        picture: the default file name of ``mimkit visualize``'s picture.
    """

    name: str
    config: type
    summary: str = ""
    read: Callable[[dict], Any] | None = None
    spec: Callable[[Any], Any] | None = None
    encoder: Callable[[Any, Path, Path | None], tuple[nn.Module, Path]] | None = None
    load: Callable[[Any, Path], nn.Module] | None = None
    visualize: Callable[[Any, Path, Path, int, int], list[Path]] | None = None
    predict: Callable[..., str] | None = None
    picture: str = "recon.png"

    def read_config(self, values: dict) -> Any:
        """Its typed configuration from saved values (`read`, else the dataclass read as it is)."""
        return self.read(values) if self.read else from_dict(self.config, values)


_KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    """Make ``kind`` known under its name (once)."""
    if kind.name in _KINDS:
        raise ValueError(f"run kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


def registered_kinds() -> dict[str, Kind]:
    """Every known kind by name (the built-in ones loaded first), in registration order."""
    _load_builtin()
    return dict(_KINDS)


def kind_of(name: str) -> Kind:
    """The kind a run's ``config.yaml`` names (the built-in ones loaded on first use)."""
    if name not in _KINDS:
        _load_builtin()
    if name not in _KINDS:
        raise MimkitError(f"run kind {name!r} is unknown (kinds: {', '.join(_KINDS)})")
    return _KINDS[name]


def _load_builtin() -> None:
    for module in BUILTIN_KINDS:
        importlib.import_module(module)
