"""Key maps: how the tensors of one checkpoint layout are named in another.

A key map is data: a dict from a mimkit key template to a foreign key template, e.g.
``"encoder.blocks.{i}.norm1.weight": "encoder.layer.{i}.layernorm_before.weight"``. A placeholder
(``{i}``, ``{j}``, …) stands for a block number and is filled from the keys actually present, so one map
serves every depth. A tuple of foreign templates is one mimkit tensor stored in pieces that are
concatenated along dim 0 (timm fuses query, key and value into one ``attn.qkv``; Hugging Face keeps them
apart); a ``None`` piece is zeros the foreign layout does not store (BEiT-style attention has no key bias,
timm's ViT keeps a zero one). Converting is renaming, concatenating and splitting: values are never
changed, so a round trip is bit-identical.
"""

import re
from collections.abc import Iterable, Mapping

import torch

from mimkit.errors import MimkitError

Foreign = str | tuple[str | None, ...]
KeyMap = dict[str, Foreign]

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def nest(keymap: Mapping[str, Foreign], ours: str = "", theirs: str = "") -> KeyMap:
    """Prefix every template of ``keymap``: mimkit keys with ``ours``, foreign keys with ``theirs``."""

    def prefix(foreign: Foreign) -> Foreign:
        if isinstance(foreign, tuple):
            return tuple(f if f is None else theirs + f for f in foreign)
        return theirs + foreign

    return {ours + k: prefix(v) for k, v in keymap.items()}


def identity(templates: Iterable[str], ours: str = "") -> KeyMap:
    """A map that keeps names, optionally under the mimkit prefix ``ours`` (``encoder.``)."""
    return {ours + t: t for t in templates}


def _pattern(template: str) -> re.Pattern:
    parts = _PLACEHOLDER.split(template)  # literal, name, literal, name, …, literal
    regex = "".join(re.escape(p) if n % 2 == 0 else rf"(?P<{p}>\d+)" for n, p in enumerate(parts))
    return re.compile(regex)


def _first(foreign: Foreign) -> str:
    return next(f for f in foreign if f is not None) if isinstance(foreign, tuple) else foreign


def _fill(foreign: Foreign, values: dict[str, str]) -> Foreign:
    if isinstance(foreign, tuple):
        return tuple(f if f is None else f.format(**values) for f in foreign)
    return foreign.format(**values)


def expand(keymap: Mapping[str, Foreign], keys: Iterable[str], ours: bool) -> dict[str, Foreign]:
    """The concrete pairs of ``keymap`` for the block numbers present in ``keys``.

    Args:
        keymap: templates, mimkit -> foreign.
        keys: the keys of the state dict about to be converted.
        ours: whether ``keys`` are mimkit keys (else foreign ones); block numbers are read from that side.

    Returns:
        ``{mimkit key: foreign key or tuple of foreign keys}``.
    """
    keys = list(keys)
    pairs: dict[str, Foreign] = {}
    for template, foreign in keymap.items():
        source = template if ours else _first(foreign)
        if not _PLACEHOLDER.search(source):
            pairs[template] = foreign
            continue
        pattern = _pattern(source)
        for key in keys:
            match = pattern.fullmatch(key)
            if match:
                values = match.groupdict()
                pairs[template.format(**values)] = _fill(foreign, values)
    return pairs


def to_foreign(state: Mapping[str, torch.Tensor], keymap: Mapping[str, Foreign]) -> tuple[dict, list[str]]:
    """Rename a mimkit state dict into a foreign layout.

    Args:
        state: mimkit keys -> tensors.
        keymap: templates, mimkit -> foreign.

    Returns:
        The foreign state dict (fused tensors split into equal parts along dim 0), and the mimkit keys
        that the map has no name for.
    """
    pairs = expand(keymap, state, ours=True)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        foreign = pairs.get(key)
        if isinstance(foreign, tuple):
            if len(value) % len(foreign):
                raise MimkitError(f"{key} has {len(value)} rows: not {len(foreign)} equal parts")
            for name, piece in zip(foreign, value.chunk(len(foreign), dim=0), strict=True):
                if name is None and piece.any():
                    raise MimkitError(f"{key} has a nonzero part that this layout does not store")
                if name is not None:
                    out[name] = piece
        elif foreign is not None:
            out[foreign] = value
    return {k: v.contiguous() for k, v in out.items()}, sorted(set(state) - set(pairs))


def from_foreign(
    state: Mapping[str, torch.Tensor], keymap: Mapping[str, Foreign], ignore: Iterable[str] = ()
) -> tuple[dict, list[str]]:
    """Rename a foreign state dict into the mimkit layout.

    Args:
        state: foreign keys -> tensors.
        keymap: templates, mimkit -> foreign.
        ignore: regular expressions of foreign keys that are derived, not learned (e.g. BEiT's
            ``relative_position_index`` buffers); they are dropped silently.

    Returns:
        The mimkit state dict, and the foreign keys that no template accounts for ("unexpected").
    """
    pairs = expand(keymap, state, ours=False)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, foreign in pairs.items():
        names = foreign if isinstance(foreign, tuple) else (foreign,)
        stored = [n for n in names if n is not None]
        if all(n in state for n in stored):
            pieces = [torch.zeros_like(state[stored[0]]) if n is None else state[n] for n in names]
            out[key] = torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]
            used.update(stored)
    skip = [re.compile(p) for p in ignore]
    unexpected = sorted(k for k in state if k not in used and not any(p.search(k) for p in skip))
    return out, unexpected


def rename(state: Mapping[str, torch.Tensor], rules: Iterable[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply regular-expression renames, in order, to every key (e.g. a library's older names)."""
    rules = [(re.compile(p), r) for p, r in rules]
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = pattern.sub(replacement, key)
        out[key] = value
    return out


def block_count(keys: Iterable[str], prefix: str) -> int:
    """How many numbered blocks ``{prefix}{n}.…`` the keys hold (``prefix="encoder.blocks."``)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    numbers = {int(m.group(1)) for m in map(pattern.match, keys) if m}
    return max(numbers) + 1 if numbers else 0
