"""Typed run configuration: dataclasses, packaged YAML recipes, dotted ``--set`` overrides.

The CLI reads recipes and flags into these dataclasses, and library entry points take them (or plain
arguments). A run directory keeps the resolved configuration (`mimkit.runs.CONFIG`) so that any later command
can rebuild the run's model.
"""

import contextlib
import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mimkit.errors import MimkitError, explain_write_errors

_FLAGS = {"train.epochs": "--epochs", "train.max_steps": "--max-steps", "train.batch_size": "--batch-size"}


def check_range(name: str, value: float | None, low: float, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = False) -> None:
    """The one check of every number a command reads (batch sizes, fractions, lrs, ...): refuse NaN, an
    infinity, and a value outside ``[low, high]`` (an open end excludes it). None means "unset" and passes.

    Args:
        name: how the message names the number: a config key and its flag (`config_key`), or a flag.
    """
    if value is None:
        return
    inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if math.isfinite(value) and inside:
        return
    if high == math.inf:
        allowed = f"{'above' if low_open else 'at least'} {low}"
    else:
        allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    finite = "" if math.isfinite(value) else "a finite number "
    raise MimkitError(f"{name} must be {finite}{allowed}, got {value}")


def check_crop_scale(section: str, scale) -> None:
    """A random resized crop's area range ``[low, high]``, a fraction of the image: ``0 < low <= high <= 1``.

    Args:
        section: the settings section that holds it, named in the message (``maskfeat``).
    """
    low, high = scale
    if not 0 < low <= high <= 1:
        raise MimkitError(f"config '{section}.crop_scale' must be 0 < low <= high <= 1, got {list(scale)}")


def config_key(section: str, name: str) -> str:
    """``config 'train.batch_size' (--batch-size)``: a key as messages name it, with its flag if any."""
    key = f"{section}.{name}" if section else name
    return f"config '{key}'" + (f" ({_FLAGS[key]})" if key in _FLAGS else "")


def at_least(minimum: float, section: str, **values) -> None:
    """Refuse a number below ``minimum``, or not finite (None means "unset" and passes), naming the key and
    its flag."""
    for name, value in values.items():
        check_range(config_key(section, name), value, minimum)


@dataclass
class DataConfig:
    source: str = "fashion-mnist"  # fashion-mnist | mnist | synthetic | a folder
    root: str | None = None  # where to look for IDX files first
    img_size: int | None = None  # None: the source's native size
    channels: int | None = None  # None: follow the data
    mean: list[float] | None = None  # None: the source's normalization
    std: list[float] | None = None
    num_workers: int = 1
    skip_bad_images: bool = False
    max_bad_images: int = 100
    max_image_pixels: int | None = None  # folders: larger files are refused; None: 8192 x 8192

    def __post_init__(self):
        at_least(1, "data", img_size=self.img_size, channels=self.channels)
        at_least(0, "data", num_workers=self.num_workers, max_bad_images=self.max_bad_images)
        if self.std is not None and not all(s > 0 for s in self.std):
            raise MimkitError(f"config 'data.std' must be positive (it divides the pixels), got {self.std}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and (not values or len(values) not in (1, self.channels or len(values))):
                raise MimkitError(f"config 'data.{name}' has {len(values)} values for {self.channels} "
                                  f"channels; give one per channel")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise MimkitError(f"config 'data.mean' has {len(self.mean)} values and 'data.std' "
                              f"{len(self.std)}; give one per channel to both")


@dataclass
class ModelConfig:
    name: str = "vit_mini"
    patch_size: int = 4
    kwargs: dict = field(default_factory=dict)  # extra constructor arguments (decoder width, depth, …)


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # lr = base_lr × global batch / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 40.0
    clip_grad: float | None = None

    def __post_init__(self):
        check_range(config_key("optim", "base_lr"), self.base_lr, 0, low_open=True)
        at_least(0, "optim", min_lr=self.min_lr, weight_decay=self.weight_decay,
                 warmup_epochs=self.warmup_epochs)
        check_range(config_key("optim", "clip_grad"), self.clip_grad, 0, low_open=True)
        if not all(0 <= b < 1 for b in self.betas):
            raise MimkitError(f"config 'optim.betas' must lie in [0, 1), got {list(self.betas)}")


@dataclass
class TrainConfig:
    epochs: int = 800
    max_steps: int | None = None  # when set, the run (and its schedule) is this many optimizer steps
    batch_size: int = 64  # per process; global batch = batch_size × processes × accum_steps
    accum_steps: int = 1
    seed: int = 0
    compile: bool = False
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory (ViT-L/H)
    log_every: int = 10
    checkpoint_every: int = 500  # optimizer steps; the last step is always saved
    keep_last: int = 2

    def __post_init__(self):
        at_least(1, "train", epochs=self.epochs, max_steps=self.max_steps, batch_size=self.batch_size,
                 accum_steps=self.accum_steps, log_every=self.log_every,
                 checkpoint_every=self.checkpoint_every, keep_last=self.keep_last)


@dataclass
class PretrainConfig:
    """A pretraining (or tokenizer) run: the sections every method has, and ``settings``, the method's own: an
    instance of the dataclass its record names (`mimkit.registry.Method.settings`; None for a method without
    one). YAML holds the settings under the method's name (``mae: {mask_ratio: 0.75}``); `to_dict` writes
    that layout and `mimkit.registry.read_config` reads it."""

    method: str = "mae"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    settings: Any = None


def _coerce(value, hint, key: str):
    """Convert a YAML value to the annotated type, or explain why it cannot be."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        for choice in choices[:-1]:  # ``int | str``: the first type the value is
            with contextlib.suppress(MimkitError):
                return _coerce(value, choice, key)
        hint = choices[-1]
        origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise MimkitError(f"config '{key}' must be a mapping, got {value!r}")
        return from_dict(hint, value, prefix=f"{key}.")
    if origin is tuple:
        items = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise MimkitError(f"config '{key}' must be a list of {len(items)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, items, strict=True))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise MimkitError(f"config '{key}' must be a list, got {value!r}")
        return [_coerce(v, typing.get_args(hint)[0], key) for v in value]
    if isinstance(value, bool) and hint in (int, float):  # YAML's true is no number, though Python's is 1
        raise MimkitError(f"config '{key}' must be {'a number' if hint is float else 'int'}, got {value!r}")
    if hint is float:
        try:  # YAML reads 1e-3 (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise MimkitError(f"config '{key}' must be a number, got {value!r}") from None
    if hint in (int, str, bool, dict) and not isinstance(value, hint):
        raise MimkitError(f"config '{key}' must be {hint.__name__}, got {value!r}")
    return value


def from_dict(cls, values: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise MimkitError(f"unknown config key '{prefix}{unknown[0]}'; known: {', '.join(sorted(known))}")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in values.items()})


def pretrain_from_dict(values: dict, settings: type | None, others: Collection[str] = ()) -> PretrainConfig:
    """Build a `PretrainConfig` from its YAML layout (`to_dict`): the section under the method's name is read
    as ``settings`` (its defaults where it is absent or partial); sections named in ``others`` (other
    methods', which runs saved beside their own before each kept only its own) are dropped unread."""
    method = values.get("method", PretrainConfig.method)
    if "settings" in values:
        raise MimkitError(f"unknown config key 'settings'; the {method} method's own settings go under "
                          f"'{method}'")
    if settings is None and method in values:
        raise MimkitError(f"unknown config key '{method}': the {method} method has no settings of its own")
    common = {k: v for k, v in values.items() if k != method and k not in others}
    config = from_dict(PretrainConfig, common)
    if settings is None:
        return config
    own = values.get(method) or {}
    if not isinstance(own, dict):
        raise MimkitError(f"config '{method}' must be a mapping, got {own!r}")
    return dataclasses.replace(config, settings=from_dict(settings, own, prefix=f"{method}."))


def check_model_kwargs(model_class: type, kwargs: dict) -> None:
    """Refuse ``model.kwargs`` that ``model_class``'s constructor (or a parent's it forwards ``**kwargs``
    to) does not take: a one-line error instead of a ``TypeError`` from deep inside the model."""
    taken: set[str] = set()
    for cls in model_class.__mro__:
        params = inspect.signature(cls.__init__).parameters.values()
        taken |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    unknown = sorted(set(kwargs) - taken - {"self"})
    if unknown:
        raise MimkitError(f"config 'model.kwargs.{unknown[0]}' is not an argument of {model_class.__name__}; "
                          f"it takes: {', '.join(sorted(taken - {'self'}))}")


def to_dict(config) -> dict:
    """The dataclass as plain YAML-friendly data (tuples become lists); a `PretrainConfig`'s ``settings``
    under its method's name."""
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    values = plain(dataclasses.asdict(config))
    if isinstance(config, PretrainConfig):
        settings = values.pop("settings")
        values |= {config.method: settings} if settings is not None else {}
    return values


def parse_overrides(pairs: list[str]) -> dict:
    """``["optim.base_lr=1e-3", "train.epochs=5"]`` → nested dict, values parsed as YAML."""
    nested: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise MimkitError(f"--set expects key=value, got '{pair}'")
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return nested


def merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for key, value in update.items():
        both_mappings = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if both_mappings else value
    return out


def differences(old: dict, new: dict, prefix: str = "") -> dict[str, tuple]:
    """``{"dotted.key": (old value, new value)}`` for every leaf where two nested dicts differ."""
    found = {}
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found |= differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found[f"{prefix}{key}"] = (a, b)
    return found


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise MimkitError(f"config file '{path}' does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise MimkitError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise MimkitError(f"config file '{path}' must hold a mapping")
    return values


def recipe_names() -> list[str]:
    """Names of the recipes shipped inside the package."""
    files = resources.files("mimkit.recipes").iterdir()
    return sorted(p.name.removesuffix(".yaml") for p in files if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> dict:
    """A packaged recipe by name (``mae_fmnist``) or a YAML file by path."""
    packaged = resources.files("mimkit.recipes") / f"{name_or_path}.yaml"
    if packaged.is_file():
        return yaml.safe_load(packaged.read_text())
    if Path(name_or_path).suffix in (".yaml", ".yml") or Path(name_or_path).exists():
        return read_yaml(name_or_path)
    raise MimkitError(f"unknown recipe '{name_or_path}'; packaged recipes: {', '.join(recipe_names())}")


def save_config(config, path: str | Path) -> None:
    """Write the resolved configuration as YAML."""
    with explain_write_errors(path):
        Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
