"""Import a foreign checkpoint as a mimkit run directory.

Four steps, each usable alone: `read_checkpoint` reads a file or folder safely and renames its tensors
into mimkit's names (a `Foreign`, with what the checkpoint's training arguments or config file say);
`resolve_arch` decides the architecture and records where each field came from (the weights, ``args``, a
config file, a default, a guess); `load_foreign` loads the weights into a mimkit model, resizing position
tables to the model's grid and refusing missing or unexpected keys unless asked not to;
`import_checkpoint` writes the run's configuration and a step-0 checkpoint that every command reads like one
it wrote: ``visualize``, ``finetune``, ``linprobe``, ``knn``, ``export``, and ``pretrain`` (which continues
from the imported weights with a fresh optimizer).

Where the architecture comes from, first match wins: ``--set`` (``overrides``); the weights (widths,
depths, patch, channels, image size, BEiT's heads from its relative position tables); the checkpoint's
training arguments (``args.model`` of a released model name fixes the heads, ``args.norm_pix_loss``,
``args.early_layers``, ...) or a timm/Hugging Face config file; a documented default; and for attention
heads nothing else decides, the released models' head width (64; MAE's decoder 32), reported as guessed.
A field no rule decides stops the import with an error naming the ``--set`` to pass.

Formats (`formats`): each method's reference checkpoints under the method's name (``mae``: the MAE
reference code's, with or without the decoder; ``beit``, ``beitv2``: the BEiT and BEiT v2 reference code's
pretraining checkpoints; ``vqkd``: BEiT v2's reference tokenizer checkpoints), ``timm`` (a
`VisionTransformer` or `Beit` state dict, or a timm folder with ``config.json``), ``hf`` (a transformers
ViTMAE, ViT or BEiT folder). What each method reads, and how its fields land in the run's configuration,
is its record's `mimkit.registry.Import`; nothing here names a method.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mimkit.config import PretrainConfig, check_range, merge
from mimkit.errors import MimkitError, explain_write_errors
from mimkit.interop.foreign import IMAGENET_MEAN, IMAGENET_STD, Foreign, convert
from mimkit.interop.hf import read_hf_folder
from mimkit.models.posembed import abs_grid, rel_grid, resize_abs_pos_embed, resize_rel_pos_table
from mimkit.models.vit import ENCODER_ARCHS
from mimkit.registry import HFLayout, Import, method_of, read_config, registered
from mimkit.runs import is_run_dir, save_run_config, some_names
from mimkit.safe_load import load_sharded, load_tensors, read_json
from mimkit.train.checkpoint_files import Checkpoints


def importing(method: str) -> Import:
    """The import hooks of a registered ``method`` (`mimkit.registry.Import`)."""
    found = method_of(method).importing
    if found is None:
        raise MimkitError(f"mimkit imports no {method} weights")
    return found


def read_timm(path: Path) -> Foreign:
    """A timm state dict of a class some method imports (its `mimkit.registry.TimmLayout`: a
    `VisionTransformer` as MAE, a `Beit` as BEiT): a weights file, or a folder with ``config.json`` (timm's
    ``architecture``, ``model_args``, ``pretrained_cfg``) and ``model.safetensors``."""
    timm_config: dict = {}
    if path.is_dir():
        timm_config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
        state = load_sharded(path, ("model.safetensors", "pytorch_model.bin"))
    else:
        state = load_tensors(path)
    pretrained = timm_config.get("pretrained_cfg", {})
    model_args = timm_config.get("model_args", {})
    hints = {"num_heads": model_args["num_heads"]} if "num_heads" in model_args else {}
    origin = dict.fromkeys(hints, "config.json model_args")
    origin["normalization"] = "config.json pretrained_cfg" if "mean" in pretrained else "default: timm's"
    layouts = {name: m.importing.timm for name, m in registered().items() if m.importing and m.importing.timm}
    method = next((name for name, layout in layouts.items() if layout.claims(state.keys())), None)
    if method is None:
        raise MimkitError(f"'{path}' holds no timm model that mimkit imports (a "
                          f"{' or '.join(layout.name for layout in layouts.values())} state dict; its keys "
                          f"start: {', '.join(sorted(state)[:3])})")
    layout = layouts[method]
    return convert(method, state, layout.keymap, f"timm {layout.name}", layout.ignore, hints=hints,
                   origin=origin, mean=pretrained.get("mean", layout.mean),
                   std=pretrained.get("std", layout.std))


def hf_model_types() -> dict[str, tuple[str, HFLayout]]:
    """transformers ``model_type`` -> (the method its folders import as, their layout), from the registry."""
    return {model_type: (name, layout) for name, m in registered().items() if m.importing
            for model_type, layout in m.importing.hf.items()}


def read_hf(path: Path) -> Foreign:
    """A transformers folder: ViTMAE (``ViTMAEForPreTraining`` or ``ViTMAEModel``), ViT or BEiT."""
    config, state, processor = read_hf_folder(path)
    model_type, model_types = config.get("model_type"), hf_model_types()
    if model_type not in model_types:
        raise MimkitError(f"'{path}' holds a {model_type!r} model; importable: {', '.join(model_types)}")
    if config.get("hidden_act", "gelu") != "gelu":
        raise MimkitError(f"'{path}' uses hidden_act {config['hidden_act']!r}; mimkit's blocks use gelu")
    method, layout = model_types[model_type]
    hints = layout.hints(config) if layout.hints else {}
    source = f"transformers {model_type} ({', '.join(config.get('architectures', []))})"
    mean, std = processor.get("image_mean", IMAGENET_MEAN), processor.get("image_std", IMAGENET_STD)
    eps = config.get("layer_norm_eps", 1e-12)
    notes = [] if eps == 1e-6 else [f"its config has LayerNorm eps {eps:g}; mimkit's timm blocks use 1e-6 "
                                    "(a negligible difference for trained weights)"]
    origin = dict.fromkeys(hints, "config.json") | {
        "normalization": "preprocessor_config.json" if "image_mean" in processor else "default: ImageNet's"}
    return convert(method, state, layout.keymap, source, layout.ignore, hints=hints, origin=origin, mean=mean,
                   std=std, notes=notes)


def formats() -> dict[str, Callable[[Path], Foreign]]:
    """``--format`` name -> reader: each registered method's reference checkpoints under its name, then
    ``timm`` and ``hf``."""
    references = {name: m.importing.reference for name, m in sorted(registered().items())
                  if m.importing and m.importing.reference}
    return references | {"timm": read_timm, "hf": read_hf}


def read_checkpoint(path: str | Path, fmt: str) -> Foreign:
    """Read ``path`` (a file, or a folder for ``hf``/``timm``) in format ``fmt`` (a key of `formats`)."""
    readers = formats()
    if fmt not in readers:
        raise MimkitError(f"unknown checkpoint format {fmt!r}; choose one of: {', '.join(readers)}")
    path = Path(path)
    if not path.exists():
        raise MimkitError(f"'{path}' does not exist")
    foreign = readers[fmt](path)
    if not foreign.state:
        raise MimkitError(f"'{path}' holds no tensor of a {fmt} checkpoint (its keys start: "
                          f"{', '.join(foreign.unexpected[:3])})")
    return foreign


def _fit_table(key: str, value: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    """``value`` resized to ``target``'s grid if ``key`` is a position table, else None."""
    if key.endswith("pos_embed"):
        old, new = abs_grid(value), abs_grid(target)
        resized, how = resize_abs_pos_embed(value, new)
        return resized, f"{key}: {how} from {old}x{old} to {new}x{new}"
    if key.endswith("relative_position_bias_table"):
        old, new = rel_grid(value), rel_grid(target)
        return resize_rel_pos_table(value, new), f"{key}: BEiT's resize from {old}x{old} to {new}x{new}"
    return None


def _listing(keys: list[str], limit: int = 8) -> str:
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_foreign(model: nn.Module, foreign: Foreign, allow_mismatch: bool = False) -> list[str]:
    """Load ``foreign`` into ``model``, a fresh model of ``foreign.method``.

    Position tables of another grid are resized (`mimkit.models.posembed`). An optional part of the method
    (`mimkit.registry.Import.optional_parts`) that the checkpoint lacks entirely (the decoder of an
    encoder-only file) keeps its fresh initialization. Other keys the model has but the checkpoint lacks
    ("missing"), and keys the model has no place for ("unexpected"), are an error unless ``allow_mismatch``;
    a shape that cannot be resized is always an error.

    Returns:
        One line per thing worth reporting: resized tables, freshly initialized parts, skipped keys.
    """
    target = model.state_dict()
    state, notes, bad_shapes = {}, [], []
    for key, value in foreign.state.items():
        if key in target and value.shape != target[key].shape:
            fitted = _fit_table(key, value, target[key])
            if fitted is None:
                bad_shapes.append(f"{key} {tuple(value.shape)} vs {tuple(target[key].shape)}")
                continue
            value, note = fitted
            notes.append(note)
        state[key] = value
    if bad_shapes:
        raise MimkitError(f"the checkpoint does not fit the inferred model: {_listing(bad_shapes, 4)}")
    fresh = set()
    for part, prefixes in importing(foreign.method).optional_parts.items():
        keys = {k for k in target if k.startswith(prefixes)}
        if keys and not keys & state.keys():
            fresh |= keys
            notes.append(f"{part}: not in the checkpoint; freshly initialized")
    missing = sorted(set(target) - state.keys() - fresh)
    unexpected = foreign.unexpected + sorted(state.keys() - target.keys())
    if (missing or unexpected) and not allow_mismatch:
        problems = [f"missing {len(missing)}: {_listing(missing)}"] if missing else []
        problems += [f"unexpected {len(unexpected)}: {_listing(unexpected)}"] if unexpected else []
        raise MimkitError(f"the checkpoint does not match the model ({'; '.join(problems)}); "
                          "--allow-mismatch loads the rest")
    if missing:
        notes.append(f"kept the fresh init of {len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        notes.append(f"skipped {len(unexpected)} unexpected keys: {_listing(unexpected)}")
    model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    return notes


def _nearest_name(method: str, embed_dim: int) -> str:
    """The method's named model closest in width (it decides what the checkpoint does not, e.g. the size
    of a fresh decoder; every dimension the checkpoint shows overrides it in ``model.kwargs``)."""
    return min(importing(method).model_names,
               key=lambda name: abs(ENCODER_ARCHS[name]["embed_dim"] - embed_dim))


def setting(method: str, key: str) -> str:
    """The ``--set`` key (or flag) that decides architecture field ``key`` of an imported ``method`` run."""
    if key in importing(method).section_fields:
        return f"{method}.{key}"
    if key in importing(method).model_kwargs:
        return f"model.kwargs.{key}"
    return {"img_size": "--img-size", "patch_size": "model.patch_size", "in_chans": "data.channels",
            "normalization": "--set data.mean=[...] --set data.std=[...]"}.get(key, key)


def run_config(method: str, arch: dict, img_size: int | None, mean: list[float] | None,
               std: list[float] | None) -> dict:
    """The configuration fields (a nested dict) that describe an imported model."""
    channels = arch["in_chans"]
    if mean is None or len(mean) != channels:
        mean, std = [0.5] * channels, [0.5] * channels
    values = {"method": method,
              "data": {"img_size": img_size or arch["img_size"], "channels": channels, "mean": list(mean),
                       "std": list(std)},
              "model": {"name": _nearest_name(method, arch["embed_dim"]), "patch_size": arch["patch_size"],
                        "kwargs": {k: arch[k] for k in importing(method).model_kwargs if k in arch}}}
    section = {k: arch[k] for k in importing(method).section_fields if k in arch}
    if section:
        values[method] = section
    return values


def resolve_arch(foreign: Foreign, overrides: dict | None = None) -> tuple[dict, dict[str, str]]:
    """The architecture of ``foreign`` and where each field came from.

    Order: ``overrides`` (a nested configuration, as ``--set`` gives) win; then what the weights show; then
    the training arguments or config file (``foreign.hints``), which must agree with the weights; then
    the method's guesses (`mimkit.registry.Import.guesses`: a guess at attention heads, reported as such;
    None when no guess fits).

    Returns:
        ``{field: value}`` (the method's ``Import.arch`` names) and ``{field: origin}``.
    """
    hooks = importing(foreign.method)
    arch = hooks.arch(foreign.state)
    origin = dict.fromkeys(arch, "weights")
    clash = [f"{foreign.origin[k]} says {k}={v}, the weights {arch[k]}" for k, v in foreign.hints.items()
             if k in arch and arch[k] != v]
    if clash:
        raise MimkitError(f"the checkpoint contradicts itself: {'; '.join(clash)}")
    arch |= foreign.hints
    origin |= {k: foreign.origin[k] for k in foreign.hints}
    for key, (value, why) in (hooks.guesses(arch) if hooks.guesses else {}).items():
        if key not in arch:
            arch[key], origin[key] = value, why
    overrides = overrides or {}
    given = overrides.get("model", {}).get("kwargs", {}) | overrides.get(foreign.method, {})
    for key in given.keys() & arch.keys():
        arch[key], origin[key] = given[key], "--set"
    return arch, origin


@dataclass
class ImportReport:
    """What `import_checkpoint` made: the run, its configuration, what was read and what to know about it.

    Attributes:
        origin: architecture field -> where it came from ("weights", "args.model 'mae_vit_base_patch16'",
            "config.json", "--set", "default: ...", "guessed: ...").
    """

    run_dir: Path
    config: PretrainConfig
    source: str
    notes: list[str]
    origin: dict[str, str] = field(default_factory=dict)

    def summary(self) -> list[str]:
        """Lines for the user: the resolved architecture, what was read from where, and each default or
        guess with the ``--set`` that changes it."""
        config, method = self.config, self.config.method
        data, model = config.data, config.model
        section = {k: getattr(config.settings, k) for k in importing(method).section_fields}
        fields = {"img_size": data.img_size, "patch_size": model.patch_size, "in_chans": data.channels,
                  **model.kwargs, **section}
        lines = [f"imported {self.source} as {method}: {data.img_size} px, patch {model.patch_size}, "
                 f"{data.channels} channels, normalization mean {data.mean} std {data.std}",
                 "  " + ", ".join(f"{k} {v}" for k, v in fields.items() if k not in ("img_size", "patch_size",
                                                                                       "in_chans"))]
        by_origin: dict[str, list[str]] = {}
        for key, where in self.origin.items():
            by_origin.setdefault(where, []).append(key)
        for where, keys in by_origin.items():
            kind, _, why = where.partition(": ")
            if kind not in ("default", "guessed"):
                verb = "set by" if where.startswith("--") else "read from"
                lines.append(f"  {verb} {where}: {', '.join(keys)}")
                continue
            for key in keys:
                value = f"mean {data.mean} std {data.std}" if key == "normalization" else fields.get(key)
                flag = setting(method, key)
                flag = flag if flag.startswith("--") else f"--set {flag}=..."
                lines.append(f"  {kind} {key} {value} ({why}); if not, {flag}")
        return lines


def import_checkpoint(path: str | Path, fmt: str, out: str | Path, img_size: int | None = None,
                      allow_mismatch: bool = False, overrides: dict | None = None,
                      force: bool = False) -> ImportReport:
    """Turn a foreign checkpoint into a mimkit run directory.

    Args:
        path: the checkpoint file or folder.
        fmt: a key of `formats`.
        out: the run directory to create: new, empty, or a run without a checkpoint yet.
        img_size: the image size of the run; position tables are resized when it differs from the
            checkpoint's. None keeps the checkpoint's.
        allow_mismatch: load what matches instead of refusing missing or unexpected keys.
        overrides: nested configuration values applied last, e.g. ``{"model": {"kwargs": {"num_heads": 2}}}``
            for heads nothing in the checkpoint decides, ``{"data": {"source": "path/to/images"}}``.
        force: write the run into an ``out`` folder that holds other files (its ``config.yaml`` and
            ``checkpoints/`` are replaced).

    Returns:
        The run directory, its configuration, what was resized, initialized or skipped, and where each
        architecture field came from.
    """
    check_range("--img-size", img_size, 1)
    out = Path(out)
    if Checkpoints(out).latest() is not None:
        raise MimkitError(f"'{out}' already holds a run; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_run_dir(out) and not force:
        raise MimkitError(f"--out '{out}' is a folder that is not a mimkit run (it holds {some_names(out)}); "
                          "give a new or empty folder, or --force to write the run into it (its config.yaml "
                          "and checkpoints/ are replaced)")
    foreign = read_checkpoint(path, fmt)
    arch, origin = resolve_arch(foreign, overrides)
    unknown = [k for k, v in arch.items() if v is None]
    if unknown:
        raise MimkitError(f"nothing in the checkpoint decides {', '.join(unknown)} of this "
                          f"{arch['embed_dim']}-wide model ({'; '.join(origin[k] for k in unknown)}); pass "
                          + " ".join(f"--set {setting(foreign.method, k)}=N" for k in unknown))
    values = run_config(foreign.method, arch, img_size, foreign.mean, foreign.std)
    values = merge(values, overrides or {})
    origin |= {"img_size": "--img-size"} if img_size else {}
    origin["normalization"] = foreign.origin.get("normalization", "default: [0.5] per channel")
    config = read_config(values)
    torch.manual_seed(config.train.seed)  # the fresh parts, reproducibly
    model = method_of(config.method).build_model(config)
    notes = foreign.notes + load_foreign(model, foreign, allow_mismatch)
    with explain_write_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    save_run_config(out, method_of(config.method).kind, config)
    Checkpoints(out).save(0, model, {"step": 0, "imported_from": str(path), "format": fmt})
    return ImportReport(out, config, foreign.source, notes, origin)
