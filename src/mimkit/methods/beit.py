"""BEiT pretraining: block-wise masking drawn per sample in the data view, a frozen dVAE tokenizer
on its own lower-resolution view of the same crop, cross-entropy over the codebook at masked patches.

The tokenizer is not part of the checkpointed model: it runs inside the loss under ``no_grad`` in eval
mode, and its vocabulary size and view size are written into the run's configuration
(`resolve_config`), so the run rebuilds without it.

- BEiT: Bao et al., 2021, arXiv:2106.08254
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

import mimkit.interop.beit as layouts
from mimkit.config import (
    PretrainConfig,
    at_least,
    check_crop_scale,
    check_model_kwargs,
    check_range,
    config_key,
)
from mimkit.data.transforms import BEiTView
from mimkit.errors import MimkitError
from mimkit.interop.foreign import HALF
from mimkit.masking import checked_block_count
from mimkit.methods.dvae import find_tokenizer, load_tokenizer, load_tokenizer_encoder
from mimkit.models.beit import BEIT_MODELS, BEiT, create_beit
from mimkit.models.vit import check_patch_grid
from mimkit.registry import Export, HFLayout, Images, Import, LossFn, Method, TimmLayout, View, register
from mimkit.tokenizers.dvae import DVAE
from mimkit.viz import beit_predictions, block_masks


@dataclass
class BEiTConfig:
    """A BEiT run's own settings (``config.settings``; ``beit:`` in YAML)."""

    tokenizer: str | None = None  # a dVAE run directory (`mimkit tokenizer train dvae`) or a save_dvae file
    tokenizer_size: int | None = None  # side of the tokenizer's view; None: the size the tokenizer trained on
    mask_ratio: float = 0.4  # share of patches masked block-wise (BEiT: 75 of 196)
    min_block: int | None = None  # smallest block in patches; None: 16 at 14x14, scaled by grid area
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop, shared by both views
    color_jitter: float = 0.4  # brightness, contrast and saturation jitter; 0 turns it off
    SECTION: ClassVar[str] = "beit"  # how messages name the section (the subclasses' own)

    def __post_init__(self):
        ratio = config_key(self.SECTION, "mask_ratio")
        check_range(ratio, self.mask_ratio, 0, 1, low_open=True, high_open=True)
        at_least(1, self.SECTION, min_block=self.min_block, tokenizer_size=self.tokenizer_size)
        at_least(0, self.SECTION, color_jitter=self.color_jitter)
        check_crop_scale(self.SECTION, self.crop_scale)


def resolve_config(config: PretrainConfig) -> PretrainConfig:
    """Fill in what the tokenizer decides: the codebook size (``model.kwargs.vocab_size``) and the side
    of its view (``beit.tokenizer_size``); refuse a tokenizer whose code grid is not the patch grid."""
    beit = config.settings
    if not beit.tokenizer:
        raise MimkitError(f"{config.method} pretraining needs a tokenizer: --tokenizer runs/dvae "
                          "(train one with: mimkit tokenizer train dvae --data ... --out runs/dvae)")
    tokenizer = find_tokenizer(beit.tokenizer)
    img_size, patch_size = config.data.img_size, config.model.patch_size
    grid = check_patch_grid(img_size, patch_size)
    cell = 2 ** tokenizer.dvae["num_down"]  # pixels of the tokenizer's view per code
    size = beit.tokenizer_size or tokenizer.img_size or grid * cell
    if size != grid * cell:
        raise MimkitError(f"tokenizer '{beit.tokenizer}': {size // cell}x{size // cell} codes from {size} px "
                          f"views, but the patch grid is {grid}x{grid} (img_size {img_size} / patch "
                          f"{patch_size}); it needs {grid * cell} px views (beit.tokenizer_size) or a "
                          "tokenizer trained for this patch grid")
    if tokenizer.dvae["in_chans"] != config.data.channels:
        raise MimkitError(f"tokenizer '{beit.tokenizer}' takes {tokenizer.dvae['in_chans']}-channel images, "
                          f"the data has {config.data.channels} (--set data.channels=N)")
    vocab_size = tokenizer.dvae["vocab_size"]
    if config.model.kwargs.get("vocab_size", vocab_size) != vocab_size:
        raise MimkitError(f"model.kwargs.vocab_size={config.model.kwargs['vocab_size']} differs from the "
                          f"tokenizer's {vocab_size} codes")
    model = replace(config.model, kwargs={**config.model.kwargs, "vocab_size": vocab_size})
    return replace(config, model=model, settings=replace(beit, tokenizer_size=size))


def build_model(config: PretrainConfig) -> BEiT:
    check_model_kwargs(BEiT, config.model.kwargs)
    return create_beit(config.model.name, img_size=config.data.img_size, patch_size=config.model.patch_size,
                       in_chans=config.data.channels, **config.model.kwargs)


def masked_view(config: PretrainConfig, model: BEiT, tokenizer_size: int, tokenizer_mean,
                tokenizer_std) -> BEiTView:
    """The `BEiTView` of a BEiT-style run (its settings: a `BEiTConfig`, BEiT v2's included); a mask ratio
    that masks nothing or blocks that cannot be placed are refused before training starts."""
    section = config.settings
    grid = model.encoder.patch_embed.grid_size[0]
    num_masked = checked_block_count(config.method, grid, section.mask_ratio, section.min_block)
    data = config.data
    return BEiTView(data.img_size, tokenizer_size, data.mean, data.std, tokenizer_mean, tokenizer_std, grid,
                    num_masked, section.min_block, section.crop_scale, section.color_jitter)


def tokenizer_task(config: PretrainConfig, model: nn.Module,
                   forward: Callable[[nn.Module, dict, torch.Tensor], tuple]) -> tuple[View, LossFn]:
    """The task of a run predicting a frozen dVAE's ids (its settings a `BEiTConfig`, CAE's included): the
    two-view `masked_view`, and a loss that tokenizes the tokenizer's view (no gradient, eval mode) and hands
    the ids (B, h, w) to ``forward(model, batch, ids)`` -> (loss, metrics)."""
    settings, data = config.settings, config.data
    tokenizer = find_tokenizer(settings.tokenizer)
    encoder = load_tokenizer_encoder(tokenizer).to(next(model.parameters()).device)
    view = masked_view(config, model, settings.tokenizer_size, tokenizer.mean or data.mean,
                       tokenizer.std or data.std)

    def loss_fn(model: nn.Module, batch: dict):
        return forward(model, batch, encoder.tokenize(batch["tokenizer_image"]))

    return view, loss_fn


def build_task(config: PretrainConfig, model: BEiT) -> tuple[View, LossFn]:
    return tokenizer_task(config, model, lambda model, batch, ids: model(batch["image"], batch["mask"], ids))


def tokenizer_views(config: PretrainConfig, images: Images,
                    generator: torch.Generator) -> tuple[DVAE, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a picture of a dVAE-target run (its settings a `BEiTConfig`, CAE's included) needs: its
    tokenizer, the pictured images in the run's view and in the tokenizer's, and block masks (B, h, w)."""
    if not config.settings.tokenizer:
        raise MimkitError(f"this {config.method} run has no tokenizer ({config.method}.tokenizer) to draw "
                          "its predictions with")
    found = find_tokenizer(config.settings.tokenizer)
    data = config.data
    shown = images(data.img_size, data.mean, data.std)
    tokenizer_images = images(config.settings.tokenizer_size, found.mean or data.mean, found.std or data.std)
    mask = block_masks(config.settings, data.img_size // config.model.patch_size, len(shown), generator)
    return load_tokenizer(found), shown, tokenizer_images, mask


def pictures(model: BEiT, config: PretrainConfig, images: Images, generator: torch.Generator) -> dict:
    """What BEiT predicts at block-masked patches, drawn through its dVAE tokenizer's decoder."""
    return beit_predictions(model, *tokenizer_views(config, images, generator))


MODEL_KWARGS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "vocab_size", "layer_scale_init",
                "shared_rel_pos_bias")
# BEiT and BEiT v2 models export alike: the encoder (BEiT v2's aggregation head serves pretraining only)
EXPORT = Export(timm=layouts.timm_export, hf=layouts.hf_export)
IMPORT = Import(
    arch=layouts.beit_arch, model_names=BEIT_MODELS, model_kwargs=MODEL_KWARGS,
    optional_parts=layouts.BEIT_OPTIONAL_PARTS, reference=layouts.read_official_beit,
    timm=TimmLayout("Beit", layouts.TIMM_BEIT, layouts.is_timm_beit, HALF, HALF, layouts.DERIVED),
    hf={"beit": HFLayout(layouts.HF_BEIT, ignore=layouts.DERIVED)},
)

register(Method("beit", "pretraining", build_model, build_task, settings=BEiTConfig,
                resolve_config=resolve_config, tokenizer="dvae", pictures=pictures, importing=IMPORT,
                export=EXPORT))
