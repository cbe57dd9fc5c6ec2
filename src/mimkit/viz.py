"""Pictures: MAE reconstruction grids, dVAE reconstructions from tokens, BEiT's predicted tokens drawn
through the tokenizer's decoder.

Grids are assembled as tensors and written with PIL; a header row names the columns.
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from mimkit.config import PretrainConfig
from mimkit.data.loader import SeededViews
from mimkit.data.transforms import CENTER_CROP_MIN_SIZE, IMAGENET_CROP_PCT, denormalize, eval_view
from mimkit.errors import MimkitError
from mimkit.masking import block_mask, count_for_ratio
from mimkit.methods.dvae import find_tokenizer, load_tokenizer
from mimkit.models.beit import BEiT
from mimkit.models.mae import MAE
from mimkit.tokenizers.dvae import DVAE


@torch.no_grad()
def mae_reconstructions(model: MAE, images: torch.Tensor, mask_ratio: float,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The four panels of the MAE demo, in normalized image space.

    Norm-pix predictions are mapped back to pixels with each target patch's own mean and variance,
    as the MAE reference demo does.

    Args:
        model: an MAE in eval mode.
        images: (B, C, H, W) normalized images.
        mask_ratio: fraction of patches hidden.
        noise: optional (B, L) masking noise.

    Returns:
        ``original``, ``masked``, ``reconstruction`` and ``pasted`` (visible patches from the original),
        each (B, C, H, W).
    """
    _, pred, mask = model(images, mask_ratio=mask_ratio, noise=noise)  # pred: (B, L, p*p*C)
    if model.norm_pix_loss:
        target = model.patchify(images)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    patch_mask = model.unpatchify(mask[..., None].expand_as(pred))  # 1 where hidden
    reconstruction = model.unpatchify(pred)
    return {"original": images, "masked": images * (1 - patch_mask),
            "reconstruction": reconstruction,
            "pasted": images * (1 - patch_mask) + reconstruction * patch_mask}


@torch.no_grad()
def dvae_reconstructions(model: DVAE, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Images next to their reconstructions from the argmax tokens.

    Args:
        model: a dVAE in eval mode.
        images: (B, C, H, W) normalized images at the dVAE's input size.

    Returns:
        ``original`` and ``from tokens``, each (B, C, H, W).
    """
    return {"original": images, "from tokens": model.decode(model.tokenize(images))}


def _patch_pixels(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """bool (B, h, w) patch mask -> float (B, 1, h * p, w * p), 1 where hidden."""
    return mask.float().repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)[:, None]


@torch.no_grad()
def beit_predictions(model: BEiT, tokenizer: DVAE, images: torch.Tensor, tokenizer_images: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """What BEiT predicts for hidden patches, drawn through the tokenizer's decoder.

    Args:
        model: a BEiT in eval mode.
        tokenizer: the dVAE whose ids it learned to predict.
        images: (B, C, H, W) normalized images at the ViT's size.
        tokenizer_images: (B, C, H', W') the same images at the tokenizer's size.
        mask: bool (B, h, w), True where a patch is hidden.

    Returns:
        ``original``; ``masked`` (what the encoder saw); ``tokens``: the tokenizer's ids of every patch,
        decoded; ``prediction``: the same with BEiT's most likely ids at the hidden patches, decoded.
    """
    ids = tokenizer.tokenize(tokenizer_images)  # [B, h, w]
    x, _ = model.forward_features(images, mask)
    predicted = ids.clone()
    predicted[mask] = model.forward_head(x, mask).argmax(-1)
    hidden = _patch_pixels(mask, images.shape[-1] // mask.shape[-1])
    return {"original": images, "masked": images * (1 - hidden), "tokens": tokenizer.decode(ids),
            "prediction": tokenizer.decode(predicted)}


def _images(source: Dataset, picks: Sequence[int], size: int, mean, std, crop_pct: float) -> torch.Tensor:
    views = SeededViews(source, eval_view(size, mean, std, crop_pct))
    return torch.stack([views[(int(i), 0)]["image"] for i in picks])


def run_panels(model, config: PretrainConfig, source: Dataset, picks: Sequence[int],
               seed: int = 0) -> dict[str, torch.Tensor]:
    """The columns `mimkit visualize` draws for a run of any method.

    Args:
        model: the run's model in eval mode (`mimkit.runs.load_run`).
        config: the run's configuration.
        source: images to draw from; `picks` indexes it.
        seed: the masks' seed.

    Returns:
        Column name -> (B, C, H, W) normalized images (columns may differ in size).
    """
    data = config.data
    crop_pct = IMAGENET_CROP_PCT if data.img_size >= CENTER_CROP_MIN_SIZE else 1.0  # the ViT view's, for all
    generator = torch.Generator().manual_seed(seed)
    if config.method == "mae":
        images = _images(source, picks, data.img_size, data.mean, data.std, crop_pct)
        noise = torch.rand(len(images), model.num_patches, generator=generator)
        return mae_reconstructions(model, images, config.mae.mask_ratio, noise)
    if config.method == "dvae":
        size = config.dvae.tokenizer_size or data.img_size
        return dvae_reconstructions(model, _images(source, picks, size, data.mean, data.std, crop_pct))
    if config.method == "beit":
        if not config.beit.tokenizer:
            raise MimkitError("this BEiT run has no tokenizer (beit.tokenizer) to draw its predictions with")
        found = find_tokenizer(config.beit.tokenizer)
        tokenizer = load_tokenizer(found)
        images = _images(source, picks, data.img_size, data.mean, data.std, crop_pct)
        tokenizer_images = _images(source, picks, config.beit.tokenizer_size, found.mean or data.mean,
                                   found.std or data.std, crop_pct)
        grid = data.img_size // config.model.patch_size
        num_masked = count_for_ratio(grid * grid, config.beit.mask_ratio)
        mask = torch.stack([block_mask(grid, grid, num_masked, config.beit.min_block, generator=generator)
                            for _ in picks])
        return beit_predictions(model, tokenizer, images, tokenizer_images, mask)
    raise MimkitError(f"visualize has no pictures for {config.method} runs")


def image_grid(panels: dict[str, torch.Tensor], mean, std, scale: int = 4) -> Image.Image:
    """Rows of samples, one column per panel, with the panel names on top.

    Args:
        panels: name -> (B, C, H, W) normalized images (same B and C; each tile is resized to the first
            column's size).
        mean, std: the normalization to undo.
        scale: integer upscaling for small images (nearest neighbour keeps the patches visible).
    """
    columns = [denormalize(p.float().cpu(), mean, std) for p in panels.values()]
    b, c, h, w = columns[0].shape
    scale = max(1, scale if h >= 64 else 112 // h)
    h, w, pad, header = h * scale, w * scale, 4, 18
    canvas = Image.new("RGB", (len(columns) * (w + pad) + pad, header + b * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (name, column) in enumerate(zip(panels, columns, strict=True)):
        x = pad + j * (w + pad)
        draw.text((x, 3), name, fill="black")
        for i in range(b):
            tile = column[i].expand(3, -1, -1) if c == 1 else column[i]
            pixels = (tile.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            canvas.paste(Image.fromarray(pixels).resize((w, h), Image.NEAREST), (x, header + pad + i * (h + pad)))
    return canvas


def save_picture(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
