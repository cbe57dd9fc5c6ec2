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

Formats: ``mae`` (the MAE reference code's checkpoints, with or without the decoder), ``beit`` and
``beitv2`` (the BEiT and BEiT v2 reference code's pretraining checkpoints), ``vqkd`` (BEiT v2's
reference tokenizer checkpoints), ``timm`` (a
`VisionTransformer` or `Beit` state dict, or a timm folder with ``config.json``), ``hf`` (a transformers
ViTMAE, ViT or BEiT folder).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from mimkit.config import PretrainConfig, from_dict, merge, save_config, to_dict
from mimkit.errors import MimkitError
from mimkit.interop import beit, mae, vqkd
from mimkit.interop.hf import read_hf_folder
from mimkit.interop.keymaps import KeyMap, from_foreign
from mimkit.methods import METHODS
from mimkit.models.beit import BEIT_MODELS
from mimkit.models.mae import MAE_MODELS
from mimkit.models.posembed import abs_grid, rel_grid, resize_abs_pos_embed, resize_rel_pos_table
from mimkit.models.vit import ENCODER_ARCHS
from mimkit.runs import config_path
from mimkit.safe_load import load_checkpoint, load_sharded, load_tensors, read_json
from mimkit.train.checkpoint import Checkpoints

IMAGENET_MEAN, IMAGENET_STD = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)  # lists: YAML-friendly
HALF = [0.5, 0.5, 0.5]  # BEiT's (and many timm ViTs') normalization: [-1, 1]


@dataclass
class Foreign:
    """A checkpoint in mimkit's names.

    Attributes:
        method: the mimkit method whose model holds these weights ("mae", "beit", "beitv2", "vqkd").
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


def _convert(method: str, state: dict, keymap: KeyMap, source: str, ignore=(), **extra) -> Foreign:
    ours, unexpected = from_foreign(state, keymap, ignore)
    return Foreign(method, ours, unexpected, source=source, **extra)


REFERENCE_NORM = "default: the reference code's"


def _unknown_name(args: dict, known: dict) -> list[str]:
    """A note when ``args.model`` names no released model in ``known``."""
    name = args.get("model")
    if name is None or name in known:
        return []
    return [f"args.model {name!r} is not a released model name: it fixes no dimension"]


def read_official_mae(path: Path) -> Foreign:
    """A checkpoint of the MAE reference code (``{"model": …, "args": …}``; encoder-only pretrain files
    too); its ``args`` give the model name's dims and heads, ``norm_pix_loss`` and ``mask_ratio``."""
    state, args = load_checkpoint(path)
    hints, origin = mae.official_mae_args(args)
    return _convert("mae", state, mae.OFFICIAL_MAE, "MAE reference checkpoint", hints=hints,
                    origin=origin | {"normalization": f"{REFERENCE_NORM} (ImageNet)"}, mean=IMAGENET_MEAN,
                    std=IMAGENET_STD, notes=_unknown_name(args, mae.OFFICIAL_MAE_MODELS))


def read_official_beit(path: Path) -> Foreign:
    """A pretraining checkpoint of the BEiT reference code (mask token, codebook head included)."""
    return _convert("beit", load_tensors(path), beit.OFFICIAL_BEIT, "BEiT reference checkpoint",
                    beit.DERIVED, origin={"normalization": f"{REFERENCE_NORM} ([-1, 1])"}, mean=HALF,
                    std=HALF)


def read_official_beitv2(path: Path) -> Foreign:
    """A pretraining checkpoint of the BEiT v2 reference code (with the [CLS] aggregation blocks, and their
    own norm and codebook layer when it ran with ``--shared_lm_head False``); its ``args`` give the block
    the head reads (``early_layers``)."""
    state, args = load_checkpoint(path)
    hints, origin = beit.official_beitv2_args(args)
    return _convert("beitv2", state, beit.OFFICIAL_BEITV2, "BEiT v2 reference checkpoint", beit.DERIVED,
                    hints=hints, origin=origin | {"normalization": f"{REFERENCE_NORM} (ImageNet)"},
                    mean=IMAGENET_MEAN, std=IMAGENET_STD)


def read_official_vqkd(path: Path) -> Foreign:
    """A tokenizer checkpoint of the BEiT v2 reference code (VQ-KD: encoder, codebook, decoder). It saw
    images scaled to [-1, 1]."""
    raw, args = load_checkpoint(path)
    hints, origin = vqkd.official_vqkd_args(args)
    foreign = _convert("vqkd", raw, vqkd.OFFICIAL_VQKD, "VQ-KD reference checkpoint", vqkd.VQKD_DROPPED,
                       hints=hints, origin=origin | {"normalization": f"{REFERENCE_NORM} ([-1, 1])"},
                       mean=HALF, std=HALF, notes=_unknown_name(args, vqkd.OFFICIAL_VQKD_MODELS))
    if "quantize.codebook" in foreign.state:
        foreign.state["quantize.initialized"] = torch.tensor(True)  # trained: no k-means start
    teacher = sum(k.startswith(("teacher_model.", "scaling_layer.")) for k in raw)
    if teacher:
        foreign.notes.append(f"dropped the reference's frozen teacher ({teacher} tensors) and EMA statistics")
    return foreign


def read_timm(path: Path) -> Foreign:
    """A timm `VisionTransformer` or `Beit` state dict: a weights file, or a folder with ``config.json``
    (timm's ``architecture``, ``model_args``, ``pretrained_cfg``) and ``model.safetensors``."""
    timm_config: dict = {}
    if path.is_dir():
        timm_config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
        state = load_sharded(path, ("model.safetensors", "pytorch_model.bin"))
    else:
        state = load_tensors(path)
    is_beit = any(k.endswith(("attn.q_bias", "relative_position_bias_table")) for k in state)
    pretrained = timm_config.get("pretrained_cfg", {})
    model_args = timm_config.get("model_args", {})
    hints = {"num_heads": model_args["num_heads"]} if "num_heads" in model_args else {}
    origin = dict.fromkeys(hints, "config.json model_args")
    origin["normalization"] = "config.json pretrained_cfg" if "mean" in pretrained else "default: timm's"
    if is_beit:
        return _convert("beit", state, beit.TIMM_BEIT, "timm Beit", beit.DERIVED, hints=hints, origin=origin,
                        mean=pretrained.get("mean", HALF), std=pretrained.get("std", HALF))
    return _convert("mae", state, mae.TIMM_VIT, "timm VisionTransformer", hints=hints, origin=origin,
                    mean=pretrained.get("mean", IMAGENET_MEAN), std=pretrained.get("std", IMAGENET_STD))


HF_MODEL_TYPES = {  # config.json model_type -> (mimkit method, key map)
    "vit_mae": ("mae", mae.HF_VITMAE),
    "vit": ("mae", mae.HF_VIT),
    "beit": ("beit", beit.HF_BEIT),
}


def read_hf(path: Path) -> Foreign:
    """A transformers folder: ViTMAE (``ViTMAEForPreTraining`` or ``ViTMAEModel``), ViT or BEiT."""
    config, state, processor = read_hf_folder(path)
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise MimkitError(f"'{path}' holds a {model_type!r} model; importable: {', '.join(HF_MODEL_TYPES)}")
    if config.get("hidden_act", "gelu") != "gelu":
        raise MimkitError(f"'{path}' uses hidden_act {config['hidden_act']!r}; mimkit's blocks use gelu")
    method, keymap = HF_MODEL_TYPES[model_type]
    hints = mae.arch_from_hf_config(config) if method == "mae" else {}
    source = f"transformers {model_type} ({', '.join(config.get('architectures', []))})"
    mean, std = processor.get("image_mean", IMAGENET_MEAN), processor.get("image_std", IMAGENET_STD)
    eps = config.get("layer_norm_eps", 1e-12)
    notes = [] if eps == 1e-6 else [f"its config has LayerNorm eps {eps:g}; mimkit's timm blocks use 1e-6 "
                                    "(a negligible difference for trained weights)"]
    origin = dict.fromkeys(hints, "config.json") | {
        "normalization": "preprocessor_config.json" if "image_mean" in processor else "default: ImageNet's"}
    return _convert(method, state, keymap, source, beit.DERIVED, hints=hints, origin=origin, mean=mean,
                    std=std, notes=notes)


FORMATS: dict[str, Callable[[Path], Foreign]] = {
    "mae": read_official_mae,
    "beit": read_official_beit,
    "beitv2": read_official_beitv2,
    "vqkd": read_official_vqkd,
    "timm": read_timm,
    "hf": read_hf,
}


def read_checkpoint(path: str | Path, fmt: str) -> Foreign:
    """Read ``path`` (a file, or a folder for ``hf``/``timm``) in format ``fmt`` (a key of `FORMATS`)."""
    if fmt not in FORMATS:
        raise MimkitError(f"unknown checkpoint format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise MimkitError(f"'{path}' does not exist")
    foreign = FORMATS[fmt](path)
    if not foreign.state:
        raise MimkitError(f"'{path}' holds no tensor of a {fmt} checkpoint (its keys start: "
                          f"{', '.join(foreign.unexpected[:3])})")
    return foreign


OPTIONAL_PARTS = {"mae": mae.MAE_OPTIONAL_PARTS, "beit": beit.BEIT_OPTIONAL_PARTS,
                  "beitv2": beit.BEITV2_OPTIONAL_PARTS, "vqkd": vqkd.VQKD_OPTIONAL_PARTS}


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

    Position tables of another grid are resized (`mimkit.models.posembed`). A part listed in
    `OPTIONAL_PARTS` that the checkpoint lacks entirely (the decoder of an encoder-only file) keeps its fresh
    initialization. Other keys the model has but the checkpoint lacks ("missing"), and keys the model has
    no place for ("unexpected"), are an error unless ``allow_mismatch``; a shape that cannot be resized is
    always an error.

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
    for part, prefixes in OPTIONAL_PARTS[foreign.method].items():
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


MODEL_NAMES = {"mae": MAE_MODELS, "beit": BEIT_MODELS, "beitv2": BEIT_MODELS, "vqkd": ENCODER_ARCHS}


def _nearest_name(method: str, embed_dim: int) -> str:
    """The method's named model closest in width (it decides what the checkpoint does not, e.g. the size
    of a fresh decoder; every dimension the checkpoint shows overrides it in ``model.kwargs``)."""
    return min(MODEL_NAMES[method], key=lambda name: abs(ENCODER_ARCHS[name]["embed_dim"] - embed_dim))


MODEL_KWARGS = {
    "mae": ("embed_dim", "depth", "num_heads", "mlp_ratio", "decoder_embed_dim", "decoder_depth",
            "decoder_num_heads"),
    "beit": ("embed_dim", "depth", "num_heads", "mlp_ratio", "vocab_size", "layer_scale_init",
             "shared_rel_pos_bias"),
}
MODEL_KWARGS["beitv2"] = MODEL_KWARGS["beit"] + ("agg_layer", "agg_depth", "shared_lm_head")
MODEL_KWARGS["vqkd"] = ("embed_dim", "depth", "num_heads")
# Inferred fields that live in the method's own configuration section rather than in model.kwargs.
SECTION_FIELDS = {"mae": ("norm_pix_loss", "mask_ratio"),
                  "vqkd": ("teacher_dim", "vocab_size", "code_dim", "decoder_depth")}


def setting(method: str, key: str) -> str:
    """The ``--set`` key (or flag) that decides architecture field ``key`` of an imported ``method`` run."""
    if key in SECTION_FIELDS.get(method, ()):
        return f"{method}.{key}"
    if key in MODEL_KWARGS[method]:
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
                        "kwargs": {k: arch[k] for k in MODEL_KWARGS[method] if k in arch}}}
    section = {k: arch[k] for k in SECTION_FIELDS.get(method, ()) if k in arch}
    if section:
        values[method] = section
    return values


ARCHS = {"mae": mae.mae_arch, "beit": beit.beit_arch, "beitv2": beit.beitv2_arch, "vqkd": vqkd.vqkd_arch}
# What fills the fields nothing read decides: (value or None, "guessed: why" / "default: why").
FALLBACKS: dict[str, Callable[[dict], dict]] = {
    "mae": mae.mae_head_guesses, "beit": lambda arch: {}, "beitv2": beit.beitv2_defaults,
    "vqkd": vqkd.vqkd_head_guesses,
}


def resolve_arch(foreign: Foreign, overrides: dict | None = None) -> tuple[dict, dict[str, str]]:
    """The architecture of ``foreign`` and where each field came from.

    Order: ``overrides`` (a nested configuration, as ``--set`` gives) win; then what the weights show; then
    the training arguments or config file (``foreign.hints``), which must agree with the weights; then
    `FALLBACKS` (a guess at attention heads, reported as such; None when no guess fits).

    Returns:
        ``{field: value}`` (`ARCHS` names) and ``{field: origin}``.
    """
    arch = ARCHS[foreign.method](foreign.state)
    origin = dict.fromkeys(arch, "weights")
    clash = [f"{foreign.origin[k]} says {k}={v}, the weights {arch[k]}" for k, v in foreign.hints.items()
             if k in arch and arch[k] != v]
    if clash:
        raise MimkitError(f"the checkpoint contradicts itself: {'; '.join(clash)}")
    arch |= foreign.hints
    origin |= {k: foreign.origin[k] for k in foreign.hints}
    for key, (value, why) in FALLBACKS[foreign.method](arch).items():
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
        section = {k: getattr(getattr(config, method), k) for k in SECTION_FIELDS.get(method, ())}
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
                      allow_mismatch: bool = False, overrides: dict | None = None) -> ImportReport:
    """Turn a foreign checkpoint into a mimkit run directory.

    Args:
        path: the checkpoint file or folder.
        fmt: a key of `FORMATS`.
        out: the run directory to create; it must not hold a checkpoint yet.
        img_size: the image size of the run; position tables are resized when it differs from the
            checkpoint's. None keeps the checkpoint's.
        allow_mismatch: load what matches instead of refusing missing or unexpected keys.
        overrides: nested configuration values applied last, e.g. ``{"model": {"kwargs": {"num_heads": 2}}}``
            for heads nothing in the checkpoint decides, ``{"data": {"source": "path/to/images"}}``.

    Returns:
        The run directory, its configuration, what was resized, initialized or skipped, and where each
        architecture field came from.
    """
    out = Path(out)
    if Checkpoints(out).latest() is not None:
        raise MimkitError(f"'{out}' already holds a run; choose another --out")
    foreign = read_checkpoint(path, fmt)
    if foreign.method not in METHODS:
        raise MimkitError(f"'{path}' holds a {foreign.method} model, and mimkit has no {foreign.method} "
                          f"method yet (methods: {', '.join(METHODS)})")
    arch, origin = resolve_arch(foreign, overrides)
    unknown = [k for k, v in arch.items() if v is None]
    if unknown:
        raise MimkitError(f"nothing in the checkpoint decides {', '.join(unknown)} of this "
                          f"{arch['embed_dim']}-wide model ({'; '.join(origin[k] for k in unknown)}); pass "
                          + " ".join(f"--set {setting(foreign.method, k)}=N" for k in unknown))
    values = run_config(foreign.method, arch, img_size, foreign.mean, foreign.std)
    values = merge(merge(to_dict(PretrainConfig(method=foreign.method)), values), overrides or {})
    origin |= {"img_size": "--img-size"} if img_size else {}
    origin["normalization"] = foreign.origin.get("normalization", "default: [0.5] per channel")
    config = from_dict(PretrainConfig, values)
    torch.manual_seed(config.train.seed)  # the fresh parts, reproducibly
    model = METHODS[config.method].build_model(config)
    notes = foreign.notes + load_foreign(model, foreign, allow_mismatch)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, config_path(out))
    Checkpoints(out).save(0, model, {"step": 0, "imported_from": str(path), "format": fmt})
    return ImportReport(out, config, foreign.source, notes, origin)
