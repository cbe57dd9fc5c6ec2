"""A foreign checkpoint read into mimkit's names: the `Foreign` record every reader returns (the readers of
each method's reference checkpoints live beside its key maps, `mimkit.interop.mae` ...; the timm and
Hugging Face readers in `mimkit.interop.importer`), and what they share.
"""

from dataclasses import dataclass, field

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from mimkit.interop.keymaps import KeyMap, from_foreign

IMAGENET_MEAN, IMAGENET_STD = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)  # lists: YAML-friendly
HALF = [0.5, 0.5, 0.5]  # BEiT's (and many timm ViTs') normalization: [-1, 1]
REFERENCE_NORM = "default: the reference code's"


@dataclass
class Foreign:
    """A checkpoint in mimkit's names.

    Attributes:
        method: the registered method whose model holds these weights (`mimkit.registry.method_of`).
        state: mimkit key -> tensor.
        unexpected: the checkpoint's keys that no template accounts for, in its own names.
        hints: architecture facts that weights do not show (attention heads, MAE's target, ...), from the
            checkpoint's training arguments or a config file.
        origin: where each hint (and the normalization, under "normalization") was read.
        mean, std: the normalization the weights were trained with, when known.
        source: what was read, for reports.
        notes: what the reader noticed that changes nothing but is worth knowing.
    """

    method: str
    state: dict[str, torch.Tensor]
    unexpected: list[str]
    hints: dict = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    mean: list[float] | None = None
    std: list[float] | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)


def convert(method: str, state: dict, keymap: KeyMap, source: str, ignore=(), **extra) -> Foreign:
    """``state`` renamed by ``keymap`` (foreign keys matching an ``ignore`` pattern dropped unread) as a
    `Foreign` of ``method``; ``extra``: its other fields."""
    ours, unexpected = from_foreign(state, keymap, ignore)
    return Foreign(method, ours, unexpected, source=source, **extra)


def unknown_name(args: dict, known: dict) -> list[str]:
    """A note when a reference checkpoint's ``args.model`` names no released model in ``known``."""
    name = args.get("model")
    if name is None or name in known:
        return []
    return [f"args.model {name!r} is not a released model name: it fixes no dimension"]
