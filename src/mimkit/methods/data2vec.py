"""data2vec pretraining (vision): BEiT's view and block mask, a student with a mask token regressing an EMA
teacher's averaged top-block outputs at the masked patches; the authors' checkpoints, and exports.

The view is the authors' (their BEiT-based ``DataAugmentationForBEiT`` without a tokenizer view): color
jitter 0.4, a horizontal flip, a random resized crop (scale 0.08-1, bicubic), normalization, and BEiT's
block mask (the authors' ViT-B run: 120 of 196 patches, blocks of at least 16). The teacher moves once per
optimizer step (`Method.after_step`), with the decay `mimkit.models.data2vec.teacher_decay` gives.

Reference checkpoints (``mimkit import --format data2vec``) are ``run_cyclical.py``'s ``checkpoint-799.pth``:
``{"model", "model_ema", "args", ...}``. ``model`` is BEiT's pretraining layout (mask token, an
``embed_dim``-wide ``lm_head``), ``model_ema`` the teacher (a copy of the student when absent, said so);
``args`` give the targets, the loss, the masking and the EMA schedule. Exports: the encoder to timm
(`Beit`); to transformers a ``Data2VecVisionModel`` (with the mask token unless ``--encoder-only``:
transformers has no data2vec pretraining head, so the regression head stays behind). transformers'
``data2vec-vision`` folders import too (the teacher a copy of the student).

- data2vec: Baevski et al., 2022, arXiv:2202.03555 (authors' vision code:
  github.com/facebookresearch/data2vec_vision, ``beit/``)
"""

import argparse
import ast
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.transforms import v2

from mimkit.config import PretrainConfig, check_crop_scale, check_model_kwargs, check_range
from mimkit.data.transforms import crop_view
from mimkit.errors import MimkitError
from mimkit.interop.beit import DERIVED, HF_BEIT, OFFICIAL_BEIT, beit_arch, hf_beit_config, timm_export
from mimkit.interop.foreign import IMAGENET_MEAN, IMAGENET_STD, REFERENCE_NORM, Foreign, convert
from mimkit.interop.keymaps import block_count, nest, to_foreign
from mimkit.masking import block_mask, checked_block_count
from mimkit.models.data2vec import DATA2VEC_MODELS, NORMS, Data2Vec, create_data2vec, teacher_decay
from mimkit.models.posembed import rel_grid
from mimkit.models.simmim import pixel_mask
from mimkit.registry import Export, HFLayout, Images, Import, LossFn, Method, View, register
from mimkit.safe_load import load_pickle
from mimkit.viz import block_masks


@dataclass
class Data2VecConfig:
    """A data2vec run's own settings (``config.settings``; ``data2vec:`` in YAML)."""

    mask_ratio: float = 0.6  # share of patches masked block-wise (the authors' ViT-B: 120 of 196)
    min_block: int | None = None  # smallest block in patches; None: 16 at 14x14 scaled by grid area
    top_k: int = 6  # top blocks averaged into the targets (the authors' target_layers [6..11] of 12)
    block_norm: str = "layer"  # each block's output before the average: layer | instance | none
    target_norm: str = "layer"  # the average: layer | instance | none (--post_target_layer_norm)
    loss_beta: float = 2.0  # smooth-L1 beta (--l1_beta 2.0); 0: squared error
    teacher_decay_start: float = 0.999  # EMA decay at step 0 (--ema_decay_init 0.999)
    teacher_decay_end: float = 0.9998  # EMA decay after the anneal (--ema_decay 0.9998)
    teacher_anneal_steps: int = 0  # optimizer steps of the linear anneal (--ema_start_at 0: end throughout)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop's area range
    color_jitter: float = 0.4  # brightness, contrast and saturation jitter; 0 turns it off

    def __post_init__(self):
        check_range("config 'data2vec.mask_ratio'", self.mask_ratio, 0, 1, low_open=True, high_open=True)
        check_range("config 'data2vec.min_block'", self.min_block, 1)
        check_range("config 'data2vec.top_k'", self.top_k, 1)
        check_range("config 'data2vec.loss_beta'", self.loss_beta, 0)
        check_range("config 'data2vec.teacher_decay_start'", self.teacher_decay_start, 0, 1)
        check_range("config 'data2vec.teacher_decay_end'", self.teacher_decay_end, 0, 1)
        check_range("config 'data2vec.teacher_anneal_steps'", self.teacher_anneal_steps, 0)
        check_range("config 'data2vec.color_jitter'", self.color_jitter, 0)
        for name in ("block_norm", "target_norm"):
            if getattr(self, name) not in NORMS:
                raise MimkitError(f"config 'data2vec.{name}' must be one of: {', '.join(NORMS)}, "
                                  f"got {getattr(self, name)!r}")
        check_crop_scale("data2vec", self.crop_scale)


class Data2VecView:
    """data2vec's pretraining view: color jitter, random resized crop (bicubic), flip, normalize, and a block
    mask drawn per sample (so it follows the sample's seed).

    Returns (when called on uint8 `(C, H, W)`):
        `{"image": float (C, img_size, img_size), "mask": bool (grid * grid,)}`, True where hidden.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], grid: int, num_masked: int,
                 min_block: int | None, scale: tuple[float, float], color_jitter: float):
        jitter = color_jitter
        self.jitter = v2.ColorJitter(jitter, jitter, jitter) if jitter else v2.Identity()
        self.crop = crop_view(img_size, mean, std, scale)
        self.grid, self.num_masked, self.min_block = grid, num_masked, min_block

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = block_mask(self.grid, self.grid, self.num_masked, self.min_block)
        return self.crop(self.jitter(image)) | {"mask": mask.flatten()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(grid={self.grid}, num_masked={self.num_masked}, "
                f"min_block={self.min_block}, jitter={self.jitter}, crop={self.crop})")


def build_model(config: PretrainConfig) -> Data2Vec:
    check_model_kwargs(Data2Vec, config.model.kwargs)
    s = config.settings
    return create_data2vec(config.model.name, img_size=config.data.img_size,
                           patch_size=config.model.patch_size, in_chans=config.data.channels, top_k=s.top_k,
                           block_norm=s.block_norm, target_norm=s.target_norm, loss_beta=s.loss_beta,
                           **config.model.kwargs)


def build_task(config: PretrainConfig, model: Data2Vec) -> tuple[View, LossFn]:
    s, data = config.settings, config.data
    grid = model.encoder.patch_embed.grid_size[0]
    num_masked = checked_block_count("data2vec", grid, s.mask_ratio, s.min_block)
    view = Data2VecView(data.img_size, data.mean, data.std, grid, num_masked, s.min_block, s.crop_scale,
                        s.color_jitter)

    def loss_fn(model: Data2Vec, batch: dict):
        return model(batch["image"], batch["mask"])

    return view, loss_fn


def after_step(config: PretrainConfig, model: Data2Vec, step: int) -> None:
    """After optimizer step ``step`` (1-based): the teacher's EMA update at that step's decay."""
    s = config.settings
    model.update_teacher(teacher_decay(step - 1, s.teacher_decay_start, s.teacher_decay_end,
                                       s.teacher_anneal_steps))


def describe(config: PretrainConfig) -> str:
    """The start-up summary's note: the masking and the targets."""
    s = config.settings
    return (f", {s.mask_ratio:.0%} masked block-wise, targets: top {s.top_k} blocks of an EMA teacher (decay "
            f"{s.teacher_decay_start:g} -> {s.teacher_decay_end:g} over {s.teacher_anneal_steps} steps)")


def cosine_map(pred: torch.Tensor, targets: torch.Tensor, patch_size: int, channels: int, mean,
               std) -> torch.Tensor:
    """Per-patch cosine similarity drawn as an image: black -1, mid-gray 0, white 1.

    Args:
        pred, targets: (B, L, D) on a square patch grid.
        patch_size: pixels per patch side.
        channels, mean, std: the images' channels and normalization (the map is normalized like them).

    Returns:
        (B, channels, H, W) normalized images.
    """
    cos = torch.nn.functional.cosine_similarity(pred.float(), targets.float(), dim=-1)  # [B, L]
    gray = pixel_mask((cos + 1) / 2, patch_size).expand(-1, channels, -1, -1)  # [B, C, H, W] in [0, 1]
    shape = (1, -1, 1, 1)
    return (gray - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


@torch.no_grad()
def pictures(model: Data2Vec, config: PretrainConfig, images: Images, generator: torch.Generator) -> dict:
    """The image, what the student saw, and per patch the cosine between the student's prediction and the
    teacher's target (white: the same direction), at every patch: the hidden ones are what it learns."""
    data = config.data
    shown = images(data.img_size, data.mean, data.std)
    grid = data.img_size // config.model.patch_size
    mask = block_masks(config.settings, grid, len(shown), generator).flatten(1)  # [B, L]
    targets = model.forward_targets(shown)  # [B, L, D]
    x, _ = model.forward_features(shown, mask)
    pred = model.lm_head(x[:, 1:])  # [B, L, D]: every patch
    p = config.model.patch_size
    hidden = pixel_mask(mask, p)
    cosine = cosine_map(pred, targets, p, data.channels, data.mean, data.std)
    return {"original": shown, "masked": shown * (1 - hidden), "cosine": cosine}


# transformers Data2VecVisionModel (its mask token unless encoder-only), "data2vec_vision." removed: BEiT's
# names without the codebook head.
HF_DATA2VEC = {k: v for k, v in HF_BEIT.items() if not k.startswith("lm_head.")}


def with_teacher(keymap: dict, teacher_prefix: str = "") -> dict:
    """``keymap`` plus the teacher's keys: each encoder tensor's foreign name under ``teacher_prefix``
    (``""``: the teacher reads the student's encoder, a copy)."""
    encoder = {k.removeprefix("encoder."): v for k, v in keymap.items() if k.startswith("encoder.")}
    return keymap | nest(encoder, ours="teacher.", theirs=teacher_prefix)


def hf_export(model: Data2Vec, config: PretrainConfig, encoder_only: bool) -> tuple[str, dict, dict]:
    """(transformers architecture, its config fields, its state dict): ``Data2VecVisionModel``, with the mask
    token (``model(pixel_values, bool_masked_pos)`` is then the student) unless ``encoder_only``."""
    fields = hf_beit_config(model, head=False) | {"model_type": "data2vec-vision",
                                                   "use_mask_token": not encoder_only}
    del fields["vocab_size"]
    state = {k: v for k, v in model.state_dict().items()
             if k.startswith("encoder.") or (k == "mask_token" and not encoder_only)}
    return "Data2VecVisionModel", fields, to_foreign(state, HF_DATA2VEC)[0]


# The authors' script's arguments -> mimkit's (`reference_hints` reads the rest).
REFERENCE_ARGS = {"l1_beta": "loss_beta", "ema_decay_init": "teacher_decay_start",
                  "ema_decay": "teacher_decay_end", "ema_start_at": "teacher_anneal_steps",
                  "min_mask_patches_per_block": "min_block",
                  "layer_scale_init_value": "layer_scale_init", "drop_path": "drop_path_rate",
                  "attn_drop_rate": "attn_drop_rate"}
# What a checkpoint without its arguments gets: the authors' ViT-B command's (their README).
REFERENCE_DEFAULTS = {"mask_ratio": 120 / 196, "top_k": 6, "block_norm": "layer", "target_norm": "layer",
                      "loss_beta": 2.0, "teacher_decay_start": 0.999, "teacher_decay_end": 0.9998,
                      "teacher_anneal_steps": 0}


def _norm_of(args: dict, layer: str, instance: str, where: str) -> str:
    """The one normalization the authors' flags ``layer`` and ``instance`` ask for (argparse's values)."""
    if args.get(layer) and args.get(instance):
        raise MimkitError(f"a data2vec checkpoint normalizing {where} twice (--{instance} and {layer}): "
                          "mimkit normalizes each one way")
    return "instance" if args.get(instance) else "layer" if args.get(layer) else "none"


def reference_hints(args: dict, depth: int, num_patches: int) -> tuple[dict, dict[str, str]]:
    """What the authors' training arguments fix that the weights do not show.

    Args:
        args: ``vars(checkpoint["args"])``.
        depth, num_patches: what the weights show (to read ``target_layers`` and ``num_mask_patches``).

    Returns:
        ``{field: value}`` and ``{field: origin}``; targets mimkit cannot build (other than the top blocks'
        outputs after the residual) are refused.
    """
    fields = {ours: args[theirs] for theirs, ours in REFERENCE_ARGS.items() if theirs in args}
    origin = {ours: f"args.{theirs}" for theirs, ours in REFERENCE_ARGS.items() if theirs in args}
    if args.get("layer_results", "end") != "end":
        raise MimkitError(f"a data2vec checkpoint with --layer_results {args['layer_results']}: mimkit's "
                          "targets are the blocks' outputs ('end')")
    if "target_layers" in args:
        layers = sorted(ast.literal_eval(str(args["target_layers"])))
        if layers != list(range(depth - len(layers), depth)):
            raise MimkitError(f"a data2vec checkpoint with --target_layers {layers}: mimkit averages the top "
                              f"K blocks (of {depth})")
        fields["top_k"], origin["top_k"] = len(layers), "args.target_layers"
    if "num_mask_patches" in args and num_patches:
        fields["mask_ratio"] = args["num_mask_patches"] / num_patches
        origin["mask_ratio"] = "args.num_mask_patches"
    if args.get("ema_annealing_till_end"):
        raise MimkitError("a data2vec checkpoint with --ema_annealing_till_end: its anneal length is the "
                          "run's; pass it as --set data2vec.teacher_anneal_steps=N after importing")
    if args.get("target_batch_norm"):
        raise MimkitError("a data2vec checkpoint trained with --target_batch_norm: mimkit's targets are "
                          "layer- or instance-normalized")
    layer_norm_last = {"target_layer_norm_last": not args.get("no_target_layer_norm_last")}  # their default
    fields["block_norm"] = _norm_of(args | layer_norm_last, "target_layer_norm_last", "target_instance_norm",
                                    "each block")
    fields["target_norm"] = _norm_of(args, "post_target_layer_norm", "post_target_instance_norm",
                                     "the average")
    origin["block_norm"] = "args.no_target_layer_norm_last, target_instance_norm"
    origin["target_norm"] = "args.post_target_layer_norm, post_target_instance_norm"
    return fields, origin


def _strip_module(state: dict) -> dict:
    if state and all(k.startswith("module.") for k in state):
        return {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def read_official_data2vec(path: Path) -> Foreign:
    """A pretraining checkpoint of the authors' vision code: student, EMA teacher and training arguments."""
    raw = load_pickle(path)
    state = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise MimkitError(f"'{path}' holds no data2vec state dict (a dict of tensors under 'model')")
    state, ema = _strip_module(state), raw.get("model_ema")
    args = vars(raw["args"]) if isinstance(raw.get("args"), argparse.Namespace) else {}
    notes = []
    if isinstance(ema, dict) and ema:
        state |= {"model_ema." + k: v for k, v in _strip_module(ema).items()}
        keymap = with_teacher(OFFICIAL_BEIT, "model_ema.")
    else:
        keymap = with_teacher(OFFICIAL_BEIT)
        notes.append("the checkpoint has no model_ema: the teacher starts as a copy of the student")
    table = state.get("rel_pos_bias.relative_position_bias_table", state.get(
        "blocks.0.attn.relative_position_bias_table"))
    depth = block_count(state, "blocks.")
    num_patches = rel_grid(table) ** 2 if table is not None else 0
    hints, origin = reference_hints(args, depth, num_patches) if args else ({}, {})
    # the EMA model's head and mask token are EMAs too, never used: the teacher is the encoder alone
    ignore = (*DERIVED, r"^model_ema\.(lm_head\.|mask_token$)")
    return convert("data2vec", state, keymap, "data2vec reference checkpoint", ignore, hints=hints,
                   origin=origin | {"normalization": f"{REFERENCE_NORM} (ImageNet)"}, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD, notes=notes)


def data2vec_arch(state: dict) -> dict:
    """`Data2Vec` constructor arguments read off a mimkit-layout state dict (`beit_arch`'s: its ``lm_head``
    is the regression head, ``embed_dim`` wide, not a codebook)."""
    return {k: v for k, v in beit_arch(state).items() if k != "vocab_size"}


def data2vec_defaults(arch: dict) -> dict[str, tuple[object, str]]:
    """The targets, loss, masking and EMA of a checkpoint that carries no arguments: the authors' ViT-B
    command's, reported as such."""
    defaults = REFERENCE_DEFAULTS | {"top_k": min(REFERENCE_DEFAULTS["top_k"], arch["depth"])}  # 6 at most
    return {k: (v, "default: the authors' ViT-B command's") for k, v in defaults.items()}


MODEL_KWARGS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "layer_scale_init", "shared_rel_pos_bias",
                "drop_path_rate", "attn_drop_rate")
IMPORT = Import(
    arch=data2vec_arch, model_names=DATA2VEC_MODELS, model_kwargs=MODEL_KWARGS,
    section_fields=("min_block", *REFERENCE_DEFAULTS),
    guesses=data2vec_defaults, reference=read_official_data2vec,
    optional_parts={"mask token": ("mask_token",), "regression head": ("lm_head.",)},
    hf={"data2vec-vision": HFLayout(with_teacher(HF_DATA2VEC), ignore=DERIVED)},
)

register(Method("data2vec", "pretraining", build_model, build_task, settings=Data2VecConfig,
                describe=describe, pictures=pictures, importing=IMPORT,
                export=Export(timm=timm_export, hf=hf_export), after_step=after_step))
