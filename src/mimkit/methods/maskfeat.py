"""MaskFeat pretraining: block-wise masking drawn per sample in the data view, a ViT with a mask token, a
linear head regressing the HOG features of the masked patches (MSE).

The HOG target has no weights: it is computed from the model's own input inside the loss, so a run needs
no tokenizer or teacher. Its settings (bins, cell size, Gaussian window) shape the head and are fixed for
the run.

- MaskFeat: Wei et al., Masked Feature Prediction for Self-Supervised Visual Pre-Training, 2022,
  arXiv:2112.09133
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import mimkit.interop.mae as vit_layouts
from mimkit.config import PretrainConfig, check_crop_scale, check_model_kwargs, check_range
from mimkit.data.transforms import crop_view
from mimkit.interop.keymaps import to_foreign
from mimkit.masking import block_mask, checked_block_count
from mimkit.models.maskfeat import MaskFeat, create_maskfeat
from mimkit.registry import Export, Images, LossFn, Method, register
from mimkit.viz import block_masks

GLYPH_SCALE = 4  # a cell's glyph is drawn 4 times the cell's side (`mimkit.viz.image_grid` upscales likewise)


@dataclass
class MaskFeatConfig:
    """A MaskFeat run's own settings (``config.settings``; ``maskfeat:`` in YAML)."""

    mask_ratio: float = 0.4  # share of patches masked block-wise (the authors: 78 of 196)
    min_block: int | None = None  # smallest block in patches; None: 16 at 14x14 scaled by grid area
    hog_bins: int = 9  # orientation bins over 180 degrees
    hog_cell: int = 8  # HOG cell side in pixels; must divide the patch size
    hog_window: int | None = None  # Gaussian window side; None: the patch size (the authors'); 0: none
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random resized crop's area range (the authors')

    def __post_init__(self):
        check_range("config 'maskfeat.mask_ratio'", self.mask_ratio, 0, 1, low_open=True, high_open=True)
        check_range("config 'maskfeat.hog_bins'", self.hog_bins, 1)
        check_range("config 'maskfeat.hog_cell'", self.hog_cell, 1)
        check_range("config 'maskfeat.hog_window'", self.hog_window, 0)
        check_range("config 'maskfeat.min_block'", self.min_block, 1)
        check_crop_scale("maskfeat", self.crop_scale)


class MaskFeatView:
    """MaskFeat's pretraining view: random resized crop (bicubic), horizontal flip, normalize, and a block
    mask drawn per sample (so it follows the sample's seed).

    - MaskFeat: Wei et al., 2022, arXiv:2112.09133 (the authors' config: crop scale (0.5, 1.0), flip,
      BEiT's block masking of 78 of 196 patches, blocks of at least 15)

    Returns (when called on uint8 `(C, H, W)`):
        `{"image": float (C, img_size, img_size), "mask": bool (grid * grid,)}`, True where hidden.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], grid: int, num_masked: int,
                 min_block: int | None, scale: tuple[float, float]):
        self.crop = crop_view(img_size, mean, std, scale)
        self.grid, self.num_masked, self.min_block = grid, num_masked, min_block

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = block_mask(self.grid, self.grid, self.num_masked, self.min_block)
        return self.crop(image) | {"mask": mask.flatten()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(grid={self.grid}, num_masked={self.num_masked}, "
                f"min_block={self.min_block}, crop={self.crop})")


def build_model(config: PretrainConfig) -> MaskFeat:
    check_model_kwargs(MaskFeat, config.model.kwargs)
    s = config.settings
    return create_maskfeat(config.model.name, img_size=config.data.img_size,
                           patch_size=config.model.patch_size, in_chans=config.data.channels,
                           hog_bins=s.hog_bins, hog_cell=s.hog_cell, hog_window=s.hog_window,
                           **config.model.kwargs)


def build_task(config: PretrainConfig, model: MaskFeat) -> tuple[MaskFeatView, LossFn]:
    s, data = config.settings, config.data
    grid = model.encoder.patch_embed.grid_size[0]
    num_masked = checked_block_count("maskfeat", grid, s.mask_ratio, s.min_block)
    view = MaskFeatView(data.img_size, data.mean, data.std, grid, num_masked, s.min_block, s.crop_scale)

    def loss_fn(model: MaskFeat, batch: dict):
        loss, _, _ = model(batch["image"], batch["mask"])
        return loss, {}

    return view, loss_fn


def describe(config: PretrainConfig) -> str:
    """The start-up summary's note: the masking and the HOG target."""
    s = config.settings
    return f", {s.mask_ratio:.0%} masked block-wise, HOG targets ({s.hog_bins} bins, {s.hog_cell}-px cells)"


def hog_strokes(nbins: int, side: int) -> torch.Tensor:
    """(nbins, side, side) antialiased strokes through a glyph's centre, one per orientation bin, along the
    edge that bin's gradients cross (bin 0: horizontal, nbins // 2: vertical), as HOG pictures draw them."""
    angle = (torch.arange(nbins) + 0.5) * math.pi / nbins  # each bin's centre, the HOG's orientation
    dx, dy = angle.cos()[:, None, None], -angle.sin()[:, None, None]  # the edge, across the gradient
    v, u = torch.meshgrid(torch.arange(side) - (side - 1) / 2, torch.arange(side) - (side - 1) / 2,
                          indexing="ij")
    across, along = (u * dy - v * dx).abs(), (u * dx + v * dy).abs()
    return (1 - across).clamp(min=0) * (along <= side / 2)


def hog_glyphs(cells: torch.Tensor, glyph: int, channels: int, mean, std) -> torch.Tensor:
    """HOG histograms drawn as glyphs (one stroke per bin, as bright as the bin's value, channels
    averaged), normalized like the images so that `mimkit.viz.image_grid` shows them beside them.

    Args:
        cells: (B, C, nbins, h, w) histograms (`HOG.cells`, or predictions in that layout).
        glyph: side of one cell's glyph in pixels.
        channels: the images' channels (the gray glyphs are repeated to them).
        mean, std: the images' normalization.

    Returns:
        (B, channels, h * glyph, w * glyph) normalized images.
    """
    hist = cells.float().mean(1).clamp(min=0)  # [B, n, h, w]
    B, n, h, w = hist.shape
    drawn = torch.einsum("bnhw,nyx->bhywx", hist, hog_strokes(n, glyph)).reshape(B, 1, h * glyph, w * glyph)
    shape = (1, -1, 1, 1)
    drawn = drawn.clamp(0, 1).expand(-1, channels, -1, -1)
    return (drawn - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


@torch.no_grad()
def pictures(model: MaskFeat, config: PretrainConfig, images: Images, generator: torch.Generator) -> dict:
    """Original and masked images, the HOG of every patch, and the same with the model's predictions at the
    hidden patches, drawn as orientation glyphs."""
    data = config.data
    shown = images(data.img_size, data.mean, data.std)
    grid = data.img_size // config.model.patch_size
    mask = block_masks(config.settings, grid, len(shown), generator)  # [B, h, w]
    _, pred, target = model(shown, mask)
    predicted = torch.where(mask.flatten(1)[..., None], pred.float(), target)
    p, hog = model.patch_size, model.hog
    hidden = mask[:, None].float().repeat_interleave(p, 2).repeat_interleave(p, 3)
    glyph, c = GLYPH_SCALE * hog.cell_size, data.channels
    return {"original": shown, "masked": shown * (1 - hidden),
            "HOG": hog_glyphs(hog.to_cells(target, p), glyph, c, data.mean, data.std),
            "prediction": hog_glyphs(hog.to_cells(predicted, p), glyph, c, data.mean, data.std)}


def hf_export(model: MaskFeat, config: PretrainConfig, encoder_only: bool) -> tuple[str, dict, dict]:
    """transformers ``ViTModel`` of the encoder, with or without ``encoder_only``: the HOG head serves
    pretraining only and transformers has no MaskFeat class."""
    return "ViTModel", vit_layouts.hf_vit_config(model), to_foreign(model.state_dict(), vit_layouts.HF_VIT)[0]


register(Method("maskfeat", "pretraining", build_model, build_task, settings=MaskFeatConfig,
                describe=describe, pictures=pictures,
                export=Export(timm=vit_layouts.timm_export, hf=hf_export)))
