"""SimMIM pretraining: random masking of large mask patches drawn per sample in the data view, raw pixel
regression with an L1 loss on masked pixels; the reference code's checkpoints, and exports.

The view is the reference ``SimMIMTransform``: a random resized crop (scale 0.67-1, aspect 3/4-4/3,
bilinear), a horizontal flip, normalization, and the ``MaskGenerator``'s mask: ``ceil(ratio * cells)`` of the
cells of a grid of ``mask_patch_size`` squares, each a block of patches. The paper masks 32 px squares (60%)
of 224 px images, 2x2 of its 16 px patches; the mask patch is set in pixels, a multiple of the patch size
that divides the image size (the Fashion-MNIST recipe scales it to its 28 px images).

Reference checkpoints (``mimkit import --format simmim``) are the ViT ones of ``main_simmim.py``:
``{"model": ..., "config": ...}``, the config a yacs ``CfgNode``. It is read without yacs and without running
anything: the unpickler builds an ``OrderedDict`` under that class's name. The weights give
the architecture (heads from the relative position table), the config the masking and the stochastic depth;
a file without its config gets the reference defaults, reported as such. Exports: the encoder to timm
(`Beit`); to transformers a ``BeitModel`` (with the mask token unless ``--encoder-only``: transformers has no
SimMIM pixel head for BEiT, so the prediction layer stays behind).

- SimMIM: Xie et al., 2022, arXiv:2111.09886 (reference code: github.com/microsoft/SimMIM)
"""

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.transforms import v2

from mimkit.config import PretrainConfig, check_crop_scale, check_model_kwargs
from mimkit.data.transforms import normalize
from mimkit.errors import MimkitError
from mimkit.interop.beit import DERIVED, HF_BEIT, TIMM_BEIT, beit_arch, hf_beit_fields, timm_export
from mimkit.interop.foreign import IMAGENET_MEAN, IMAGENET_STD, REFERENCE_NORM, Foreign, convert
from mimkit.interop.keymaps import nest, to_foreign
from mimkit.models.simmim import (
    SIMMIM_MODELS,
    SimMIM,
    check_mask_geometry,
    create_simmim,
    num_masked_cells,
    pixel_mask,
    simmim_mask,
)
from mimkit.registry import Export, Images, Import, LossFn, Method, View, register
from mimkit.safe_load import load_pickle, load_tensors


@dataclass
class SimMIMConfig:
    """A SimMIM run's own settings (``config.settings``; ``simmim:`` in YAML)."""

    mask_ratio: float = 0.6  # share of mask-patch cells hidden, rounded up (30 of 49)
    mask_patch_size: int = 32  # side of a masked square in pixels: a multiple of the patch size
    crop_scale: tuple[float, float] = (0.67, 1.0)  # random resized crop's area range

    def __post_init__(self):
        check_crop_scale("simmim", self.crop_scale)


def mask_geometry(config: PretrainConfig) -> tuple[int, int, int]:
    """(mask grid side, patches per mask-patch side, cells masked) of a run; bad settings are one line."""
    settings, patch_size = config.settings, config.model.patch_size
    grid = check_mask_geometry(config.data.img_size, patch_size, settings.mask_patch_size)
    return grid, settings.mask_patch_size // patch_size, num_masked_cells(grid * grid, settings.mask_ratio)


class SimMIMView:
    """SimMIM's pretraining view: crop, flip, normalize, and a mask drawn from the global (per-sample seeded)
    RNG.

    Args:
        img_size: output side.
        mean, std: per-channel normalization.
        grid, scale, num_masked: `simmim_mask`'s.
        crop_scale: area range of the random resized crop.

    Returns (when called on uint8 `(C, H, W)`):
        ``{"image": float (C, img_size, img_size), "mask": bool (L,)}``, True where a patch is hidden.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], grid: int, scale: int,
                 num_masked: int, crop_scale: tuple[float, float] = (0.67, 1.0)):
        self.grid, self.scale, self.num_masked = grid, scale, num_masked
        self.transform = v2.Compose([  # the reference transform: torchvision's default (bilinear) resize
            v2.RandomResizedCrop(img_size, scale=crop_scale, ratio=(3 / 4, 4 / 3), antialias=True),
            v2.RandomHorizontalFlip(),
            normalize(mean, std),
        ])

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image": self.transform(image),
                "mask": simmim_mask(self.grid, self.scale, self.num_masked).flatten()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(grid={self.grid}, scale={self.scale}, num_masked={self.num_masked}, "
                f"{self.transform})")


def build_model(config: PretrainConfig) -> SimMIM:
    check_model_kwargs(SimMIM, config.model.kwargs)
    return create_simmim(config.model.name, img_size=config.data.img_size, patch_size=config.model.patch_size,
                         in_chans=config.data.channels, **config.model.kwargs)


def build_task(config: PretrainConfig, model: SimMIM) -> tuple[View, LossFn]:
    data = config.data
    view = SimMIMView(data.img_size, data.mean, data.std, *mask_geometry(config), config.settings.crop_scale)

    def loss_fn(model: SimMIM, batch: dict):
        loss, _ = model(batch["image"], batch["mask"])
        return loss, {}

    return view, loss_fn


def describe(config: PretrainConfig) -> str:
    """The start-up summary's note: the share hidden and the mask-patch side."""
    grid, _, num_masked = mask_geometry(config)
    return f", {num_masked} of {grid}x{grid} masked in {config.settings.mask_patch_size} px squares"


@torch.no_grad()
def pictures(model: SimMIM, config: PretrainConfig, images: Images, generator: torch.Generator) -> dict:
    """What the encoder saw, the predicted pixels (everywhere, and pasted into the hidden squares) and the
    original, at the run's masking."""
    data = config.data
    shown = images(data.img_size, data.mean, data.std)
    grid, scale, num_masked = mask_geometry(config)
    mask = torch.stack([simmim_mask(grid, scale, num_masked, generator) for _ in range(len(shown))])
    _, pred = model(shown, mask)
    hidden = pixel_mask(mask, model.patch_size)
    return {"masked input": shown * (1 - hidden), "prediction": pred,
            "pasted": shown * (1 - hidden) + pred * hidden, "original": shown}


# The reference code's pretraining `model` dict (SimMIM over VisionTransformerForSimMIM): the encoder under
# "encoder." with timm Beit's names (both come from BEiT's code), the mask token inside it, the 1x1
# convolution of the pixel head as "decoder.0".
OFFICIAL_SIMMIM = nest(TIMM_BEIT, theirs="encoder.") | {"mask_token": "encoder.mask_token",
                                                         "decoder.0.weight": "decoder.0.weight",
                                                         "decoder.0.bias": "decoder.0.bias"}
# transformers BeitModel (with its mask token unless encoder-only), "beit." removed.
HF_SIMMIM = {k: v for k, v in HF_BEIT.items() if not k.startswith("lm_head.")}
# (section, key) of a reference config -> the architecture field or setting it gives.
REFERENCE_FIELDS = {("DATA", "MASK_RATIO"): "mask_ratio", ("DATA", "MASK_PATCH_SIZE"): "mask_patch_size",
                    ("MODEL", "DROP_PATH_RATE"): "drop_path_rate", ("VIT", "NUM_HEADS"): "num_heads",
                    ("VIT", "INIT_VALUES"): "layer_scale_init", ("VIT", "PATCH_SIZE"): "patch_size",
                    ("DATA", "IMG_SIZE"): "img_size"}
# What a checkpoint without its config gets: the reference config.py's (and the ViT-B yaml's) masking.
REFERENCE_DEFAULTS = {"mask_ratio": 0.6, "mask_patch_size": 32}


# yacs' CfgNode is a dict subclass with attributes: unpickled as an OrderedDict (items and attributes set,
# nothing of yacs run), the one dict type whose attributes torch's weights-only unpickler sets.
REFERENCE_CONFIG_CLASS = (OrderedDict, "yacs.config.CfgNode")


def _plain(node) -> dict:
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in node.items()}


def load_reference(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights of a reference checkpoint and its config as plain nested dicts (empty when it has none).

    Args:
        path: ``main_simmim.py``'s ``ckpt_epoch_N.pth`` (``{"model", "config", ...}``), a bare state dict, or
            a ``.safetensors`` file.
    """
    if path.suffix == ".safetensors":
        return load_tensors(path), {}
    with torch.serialization.safe_globals([REFERENCE_CONFIG_CLASS]):
        raw = load_pickle(path)
    config = raw.get("config", {}) if isinstance(raw, Mapping) else {}
    state = raw.get("model", raw) if isinstance(raw, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise MimkitError(f"'{path}' holds no SimMIM state dict (a dict of tensors under 'model')")
    return dict(state), _plain(config) if isinstance(config, Mapping) else {}


def reference_hints(config: dict) -> tuple[dict, dict[str, str]]:
    """What a reference checkpoint's config fixes that the weights do not show (masking, stochastic depth,
    layer scale's start) or must agree with (heads, patch and image size); a Swin or absolute-position
    config is refused.

    Returns:
        ``{field: value}`` and ``{field: origin}``.
    """
    model = config.get("MODEL", {})
    if model.get("TYPE", "vit") != "vit":
        raise MimkitError(f"a SimMIM {model['TYPE']} checkpoint: mimkit's SimMIM is the ViT one")
    if model.get("VIT", {}).get("USE_APE"):
        raise MimkitError("a SimMIM ViT with absolute position embeddings (MODEL.VIT.USE_APE): mimkit's has "
                          "relative positions only")
    sections = {"DATA": config.get("DATA", {}), "MODEL": model, "VIT": model.get("VIT", {})}
    fields, origin = {}, {}
    for (section, key), ours in REFERENCE_FIELDS.items():
        value = sections[section].get(key)
        if value is not None:
            prefix = "MODEL.VIT" if section == "VIT" else section
            fields[ours], origin[ours] = value, f"config {prefix}.{key}"
    return fields, origin


def read_official_simmim(path: Path) -> Foreign:
    """A pretraining checkpoint of the SimMIM reference code (ViT), mask token and pixel head included."""
    state, config = load_reference(path)
    hints, origin = reference_hints(config)
    return convert("simmim", state, OFFICIAL_SIMMIM, "SimMIM reference checkpoint", DERIVED, hints=hints,
                   origin=origin | {"normalization": f"{REFERENCE_NORM} (ImageNet)"}, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD)


def simmim_arch(state: dict) -> dict:
    """`SimMIM` constructor arguments read off a mimkit-layout state dict (`beit_arch`'s, less BEiT's
    codebook)."""
    return {k: v for k, v in beit_arch(state).items() if k != "vocab_size"}


def simmim_defaults(arch: dict) -> dict[str, tuple[object, str]]:
    """The masking of a checkpoint that carries no config: the reference defaults, reported as such."""
    return {k: (v, "default: the reference config's") for k, v in REFERENCE_DEFAULTS.items()}


def hf_export(model: SimMIM, config: PretrainConfig, encoder_only: bool) -> tuple[str, dict, dict]:
    """(transformers architecture, its config fields, its state dict): ``BeitModel``, with the mask token
    (``BeitModel(pixel_values, bool_masked_pos)`` is then SimMIM's encoder) unless ``encoder_only``."""
    state = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.") or not encoder_only}
    fields = hf_beit_fields(model.encoder_kwargs, mask_token=not encoder_only, mean_pooling=False)
    return "BeitModel", fields, to_foreign(state, HF_SIMMIM)[0]


MODEL_KWARGS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "layer_scale_init", "shared_rel_pos_bias",
                "drop_path_rate")
IMPORT = Import(
    arch=simmim_arch, model_names=SIMMIM_MODELS, model_kwargs=MODEL_KWARGS,
    section_fields=("mask_ratio", "mask_patch_size"), guesses=simmim_defaults,
    reference=read_official_simmim,
)

register(Method("simmim", "pretraining", build_model, build_task, settings=SimMIMConfig, describe=describe,
                pictures=pictures, importing=IMPORT, export=Export(timm=timm_export, hf=hf_export)))
