"""Pictures: MAE reconstruction grids and training curves.

Grids are assembled as tensors and written with PIL; a header row names the columns.
"""

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from mimkit.data.transforms import denormalize
from mimkit.models.mae import MAE


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


def image_grid(panels: dict[str, torch.Tensor], mean, std, scale: int = 4) -> Image.Image:
    """Rows of samples, one column per panel, with the panel names on top.

    Args:
        panels: name -> (B, C, H, W) normalized images (same shapes).
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
