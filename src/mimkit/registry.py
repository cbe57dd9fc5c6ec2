"""The methods a run can be trained with, by name: each ``mimkit/methods/<name>.py`` registers a `Method`
record when it is imported (importing `mimkit.methods` imports them all), and whatever needs a run's model
looks its method up here, below the methods in the package's layers.

The built-in methods are plug-ins of this registry: `method_of` loads the `BUILTIN_METHODS` package by
name the first time a name is not found, and `registered` before it lists them, so ``mimkit.runs.load_run``
and the commands work without importing it first
(the same discovery entry points give; no module here imports a method).

Besides training, a record carries the method's extras, which the commands look up here instead of naming
methods: the pictures ``mimkit visualize`` draws (`Pictures`), how ``mimkit import`` reads foreign weights
of it (`Import`) and how ``mimkit export`` writes them (`Export`), the start-up summary's note, the
tokenizer or teacher a method takes and which of its settings a run may resume with changed. Its settings
are its own dataclass, which `read_config` reads from the section under its name. So a new method is its
own module (and model), nothing else.
"""

import importlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mimkit.config import PretrainConfig, pretrain_from_dict
from mimkit.errors import MimkitError
from mimkit.interop.foreign import Foreign
from mimkit.interop.keymaps import KeyMap
from mimkit.train.step import LossFn  # (model, batch) -> (loss, {name: metric})

View = Callable[..., dict]  # one image (and its seed) -> the training sample: {"image", ...}
Evaluate = Callable[[nn.Module], dict[str, float]]  # model -> {name: number}, logged
# (side, mean, std) -> (B, C, side, side): the pictured images in that view (`mimkit.viz.run_panels`)
Images = Callable[[int, Sequence[float], Sequence[float]], torch.Tensor]
# (model in eval mode, config, images, generator for masks) -> {column name: (B, C, H, W) normalized images}
Pictures = Callable[[nn.Module, PretrainConfig, Images, torch.Generator], dict[str, torch.Tensor]]
# model -> (timm model name, its kwargs, the encoder's state dict in timm's names)
TimmExport = Callable[[nn.Module], tuple[str, dict, dict]]
# (model, config, encoder_only) -> (transformers architecture, its config fields, its state dict)
HFExport = Callable[[nn.Module, PretrainConfig, bool], tuple[str, dict, dict]]


@dataclass(frozen=True)
class Export:
    """How ``mimkit export`` writes a model of a method (`mimkit.interop.export`); a target left None is
    refused with an error.

    Attributes:
        timm: the encoder for timm (its folder format is written by the export).
        hf: a Hugging Face transformers folder, the whole model or (``encoder_only``) its encoder.
    """

    timm: TimmExport | None = None
    hf: HFExport | None = None


@dataclass(frozen=True)
class TimmLayout:
    """A timm model class whose state dicts import as a method's model (``mimkit import --format timm``).

    Attributes:
        name: the timm class, for reports ("Beit").
        keymap: mimkit -> timm names.
        claims: whether a state dict's keys are of this class (each class's test excludes the others').
        mean, std: its normalization when the folder's ``config.json`` gives none.
        ignore: regular expressions of timm keys that are derived, dropped unread.
    """

    name: str
    keymap: KeyMap
    claims: Callable[[Collection[str]], bool]
    mean: list[float]
    std: list[float]
    ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class HFLayout:
    """A transformers ``model_type`` whose folders import as a method's model (``--format hf``).

    Attributes:
        keymap: mimkit -> transformers names (as ``save_pretrained`` writes them, no base prefix).
        hints: ``config.json`` -> the architecture fields it gives that weights do not show (heads, ...).
        ignore: regular expressions of transformers keys that are derived, dropped unread.
    """

    keymap: KeyMap
    hints: Callable[[dict], dict] | None = None
    ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class Import:
    """How ``mimkit import`` makes a run of a method from foreign weights (`mimkit.interop.importer`).

    Attributes:
        arch: a state dict in mimkit's names -> the architecture fields it shows (``embed_dim``,
            ``patch_size``, ``in_chans``, ``img_size``, ...).
        model_names: the method's named models (``model.name``); the one nearest in width is written.
        model_kwargs: the architecture fields that go to ``model.kwargs``.
        section_fields: those that go to the method's own configuration section instead.
        guesses: the architecture so far -> {field: (value or None, "guessed: why" / "default: why")} for
            the fields nothing read decides; None: none.
        optional_parts: part name -> key prefixes of model parts that keep their fresh initialization when
            a checkpoint lacks them entirely (MAE's decoder in an encoder-only file).
        reference: path -> `Foreign`: the method's reference code's checkpoints, ``--format NAME``; None:
            no such format.
        timm: the timm model class whose state dicts import as this method; None: none.
        hf: transformers ``model_type`` -> its layout, for those that import as this method.
    """

    arch: Callable[[dict[str, torch.Tensor]], dict]
    model_names: Collection[str]
    model_kwargs: tuple[str, ...]
    section_fields: tuple[str, ...] = ()
    guesses: Callable[[dict], dict[str, tuple[Any, str]]] | None = None
    optional_parts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    reference: Callable[[Path], Foreign] | None = None
    timm: TimmLayout | None = None
    hf: Mapping[str, HFLayout] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """What a pretraining method (or tokenizer) provides to the commands.

    Attributes:
        name: ``config.method`` of its runs (``mimkit pretrain NAME`` / ``mimkit tokenizer train NAME``).
        kind: ``pretraining`` or ``tokenizer``: which command trains it.
        settings: the dataclass of its own settings, ``config.settings`` (saved under its name, set as
            ``--set NAME.FIELD=...``); None: it has none.
        build_model: config -> the module that is checkpointed.
        build_task: (config, model) -> (view, loss_fn): what the training loop needs.
        resolve_config: config -> config with the fields left to something outside the run filled in (BEiT's
            tokenizer decides its vocabulary); None: nothing to fill.
        schedule_values: (config, total_steps) -> {name: per-step list} of more scheduled values (a Gumbel
            temperature) the loss finds in the batch under their names; None: none.
        build_evaluate: (config, model) -> evaluate, run at each epoch end and at the end, its numbers logged
            (a VQ-KD tokenizer's codebook usage on held-out images); None: no evaluation.
        describe: config -> words the start-up summary adds to its model line (MAE's ", 75% masked");
            None: nothing.
        tokenizer: for a pretraining method, the tokenizer method whose run directories ``--tokenizer``
            takes (BEiT: "dvae"); None: it takes none.
        teacher: whether it takes ``--teacher``, a frozen feature teacher (`mimkit.tokenizers.teachers`
            spec forms) kept in its settings' ``teacher`` field (VQ-KD, MaskDistill).
        pictures: what ``mimkit visualize`` draws of a run (`Pictures`); None: it draws nothing.
        importing: how ``mimkit import`` makes a run of it from foreign weights; None: nothing imports.
        export: how ``mimkit export`` writes its model; None: it does not export.
        resumable: settings of its own (dotted keys) that a run may resume with changed values, besides
            `mimkit.runs.RESUMABLE_CHANGES` (VQ-KD's held-out image count).
        after_step: (config, model, step) -> None, called once after each optimizer step with the new step
            number, not per micro-batch (data2vec moves its EMA teacher); whatever it changes in the model
            must live in its state dict to resume exactly. None: nothing.
    """

    name: str
    kind: Literal["pretraining", "tokenizer"]
    build_model: Callable[[PretrainConfig], nn.Module]
    build_task: Callable[[PretrainConfig, nn.Module], tuple[View, LossFn]]
    settings: type | None = None
    resolve_config: Callable[[PretrainConfig], PretrainConfig] | None = None
    schedule_values: Callable[[PretrainConfig, int], dict[str, list[float]]] | None = None
    build_evaluate: Callable[[PretrainConfig, nn.Module], Evaluate] | None = None
    describe: Callable[[PretrainConfig], str] | None = None
    tokenizer: str | None = None
    teacher: bool = False
    pictures: Pictures | None = None
    importing: Import | None = None
    export: Export | None = None
    resumable: tuple[str, ...] = ()
    after_step: Callable[[PretrainConfig, nn.Module, int], None] | None = None


_METHODS: dict[str, Method] = {}
BUILTIN_METHODS = "mimkit.methods"  # the package whose modules register mimkit's own methods


def register(method: Method) -> Method:
    """Make ``method`` known under its name (once)."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def registered(kind: str | None = None) -> dict[str, Method]:
    """The registered methods by name (the built-in ones loaded first), in registration order; only those of
    ``kind`` when given."""
    importlib.import_module(BUILTIN_METHODS)
    return {name: m for name, m in _METHODS.items() if kind is None or m.kind == kind}


def method_of(name: str) -> Method:
    """The method a run's ``config.method`` names (the built-in ones loaded on first use)."""
    if name not in _METHODS:
        importlib.import_module(BUILTIN_METHODS)
    if name not in _METHODS:
        raise MimkitError(f"method {name!r} is unknown (methods: {', '.join(_METHODS)})")
    return _METHODS[name]


def read_config(values: dict) -> PretrainConfig:
    """A pretraining run's configuration from its YAML layout (a saved ``config.yaml``, a recipe with
    overrides): the section under the method's name read as the settings the method registered. Sections of
    other methods are dropped: runs saved every method's section before each kept only its own."""
    method = method_of(values.get("method", PretrainConfig.method))
    return pretrain_from_dict(values, method.settings, others=set(_METHODS) - {method.name})
