"""The methods a run can be trained with, by name: each ``mimkit/methods/<name>.py`` registers a `Method`
record when it is imported (importing `mimkit.methods` imports them all), and whatever needs a run's model
looks its method up here, below the methods in the package's layers.

The built-in methods are plug-ins of this registry: `method_of` loads the `BUILTIN_METHODS` package by
name the first time a name is not found, so ``mimkit.runs.load_run`` works without importing it first
(the same discovery entry points give; no module here imports a method).
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from mimkit.config import PretrainConfig
from mimkit.errors import MimkitError
from mimkit.train.loop import LossFn  # (model, batch) -> (loss, {name: metric})

View = Callable[..., dict]  # one image (and its seed) -> the training sample: {"image", ...}
Evaluate = Callable[[nn.Module], dict[str, float]]  # model -> {name: number}, logged


@dataclass(frozen=True)
class Method:
    """What a pretraining method (or tokenizer) provides to the commands.

    Attributes:
        name: ``config.method`` of its runs (``mimkit pretrain NAME`` / ``mimkit tokenizer train NAME``).
        kind: ``pretraining`` or ``tokenizer``: which command trains it.
        build_model: config -> the module that is checkpointed.
        build_task: (config, model) -> (view, loss_fn): what the training loop needs.
        resolve_config: config -> config with the fields left to something outside the run filled in (BEiT's
            tokenizer decides its vocabulary); None: nothing to fill.
        schedule_values: (config, total_steps) -> {name: per-step list} of more scheduled values (a Gumbel
            temperature) the loss finds in the batch under their names; None: none.
        build_evaluate: (config, model) -> evaluate, run at each epoch end and at the end, its numbers logged
            (a VQ-KD tokenizer's codebook usage on held-out images); None: no evaluation.
    """

    name: str
    kind: Literal["pretraining", "tokenizer"]
    build_model: Callable[[PretrainConfig], nn.Module]
    build_task: Callable[[PretrainConfig, nn.Module], tuple[View, LossFn]]
    resolve_config: Callable[[PretrainConfig], PretrainConfig] | None = None
    schedule_values: Callable[[PretrainConfig, int], dict[str, list[float]]] | None = None
    build_evaluate: Callable[[PretrainConfig, nn.Module], Evaluate] | None = None


_METHODS: dict[str, Method] = {}
BUILTIN_METHODS = "mimkit.methods"  # the package whose modules register mimkit's own methods


def register(method: Method) -> Method:
    """Make ``method`` known under its name (once)."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def registered(kind: str | None = None) -> dict[str, Method]:
    """The registered methods by name, in registration order; only those of ``kind`` when given."""
    return {name: m for name, m in _METHODS.items() if kind is None or m.kind == kind}


def method_of(name: str) -> Method:
    """The method a run's ``config.method`` names (the built-in ones loaded on first use)."""
    if name not in _METHODS:
        importlib.import_module(BUILTIN_METHODS)
    if name not in _METHODS:
        raise MimkitError(f"method {name!r} is unknown (methods: {', '.join(_METHODS)})")
    return _METHODS[name]
