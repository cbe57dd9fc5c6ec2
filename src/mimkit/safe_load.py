"""Reading foreign checkpoint files without executing anything in them.

safetensors files hold tensors only. Pickle files (``.pth``, ``.pt``, ``.bin``) are read with
``torch.load(weights_only=True)``, whose unpickler builds tensors and plain containers and refuses any
other global, so a file that would run code when unpickled is rejected before anything runs. The one
extra allowed class is ``argparse.Namespace``: training scripts (the MAE and BEiT reference code among
them) store their arguments in checkpoints, and a namespace is plain attributes.
"""

import argparse
import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from mimkit.errors import MimkitError

# Where training scripts put the model's weights inside a checkpoint dict, in the order tried.
STATE_DICT_KEYS = ("model", "state_dict", "module")


def _is_state_dict(value) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(torch.is_tensor(v) for v in value.values())


def refusal(path: str | Path, err: pickle.UnpicklingError) -> MimkitError:
    """The one-line error for a pickle that ``torch.load(weights_only=True)`` refused to unpickle."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    why = f"loading it would run {found.group(1)}" if found else "it holds more than tensors"
    return MimkitError(f"refusing '{path}': {why}; only tensors and plain containers are read "
                       "(nothing was executed)")


def read_json(path: Path) -> dict:
    """A JSON file's content; an unreadable or malformed file is a one-line error."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MimkitError(f"cannot read '{path}': {err}") from None


def load_pickle(path: Path) -> object:
    """A PyTorch pickle read with `torch.load(weights_only=True)`; a one-line `MimkitError` when it would run
    code or is damaged."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as err:
        raise MimkitError(f"cannot read '{path}': {err.strerror}") from None
    if head[:1] != b"\x80" and head != b"PK":  # a pickle's PROTO opcode, or torch.save's zip archive
        raise MimkitError(f"'{path}' is not a safetensors file nor a PyTorch checkpoint")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise refusal(path, err) from None
    except Exception as err:  # a damaged archive
        raise MimkitError(f"'{path}' is not a safetensors file nor a PyTorch checkpoint "
                          f"({type(err).__name__})") from None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict in one checkpoint file, on the CPU, and the training arguments stored beside it.

    A dict of tensors is returned as is; a training checkpoint is unwrapped from its first entry among
    `STATE_DICT_KEYS` that holds tensors; a ``module.`` prefix that DistributedDataParallel left on every
    key is removed. The reference code of MAE, BEiT and BEiT v2 stores its command-line arguments under
    ``args`` (an ``argparse.Namespace``).

    Args:
        path: a ``.safetensors`` file, or a PyTorch pickle (``.pth``, ``.pt``, ``.bin``).

    Returns:
        ``{name: tensor}``, and ``{argument: value}`` of the checkpoint's ``args`` (empty when it has none).
    """
    path = Path(path)
    if not path.is_file():
        raise MimkitError(f"checkpoint '{path}' does not exist or is not a file")
    if path.suffix == ".safetensors":
        try:
            state = load_file(path)
        except Exception as err:  # safetensors raises its own error types
            raise MimkitError(f"'{path}' is not a valid safetensors file ({err})") from None
    else:
        state = load_pickle(path)
    stored = state.get("args") if isinstance(state, Mapping) else None
    args = vars(stored) if isinstance(stored, argparse.Namespace) else {}
    if not _is_state_dict(state):
        inner = (state.get(k) for k in STATE_DICT_KEYS) if isinstance(state, Mapping) else ()
        state = next((s for s in inner if _is_state_dict(s)), None)
        if state is None:
            raise MimkitError(f"'{path}' holds no state dict (a dict of tensors, or one under "
                              f"{', '.join(map(repr, STATE_DICT_KEYS))})")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state), args


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in one checkpoint file, on the CPU (`load_checkpoint` without the arguments)."""
    return load_checkpoint(path)[0]


def _shards(index: Path) -> list[str]:
    """The shard files a ``*.index.json`` names, each a plain path inside the index's folder."""
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise MimkitError(f"'{index}' is not a shard index (a JSON weight_map of names to files): "
                          f"{type(err).__name__}") from None
    for shard in shards:
        parts = Path(shard).parts if isinstance(shard, str) else ()
        if not parts or Path(shard).is_absolute() or ".." in parts:
            raise MimkitError(f"refusing '{index}': shard {shard!r} is not a file inside its folder")
    return shards


def load_sharded(folder: str | Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The weights saved in a model folder: the first of ``names`` present, or its sharded form.

    Args:
        folder: e.g. a Hugging Face ``save_pretrained`` directory.
        names: file names in order of preference, e.g. ``("model.safetensors", "pytorch_model.bin")``;
            ``<name>.index.json`` (a shard index) stands for its shards.
    """
    folder = Path(folder)
    for name in names:
        if (folder / name).is_file():
            return load_tensors(folder / name)
        index = folder / f"{name}.index.json"
        if index.is_file():
            state: dict[str, torch.Tensor] = {}
            for shard in _shards(index):
                state.update(load_tensors(folder / shard))
            return state
    raise MimkitError(f"'{folder}' holds none of {', '.join(names)}")
