"""Pictures: MAE reconstruction grids, dVAE reconstructions from tokens, BEiT's predicted tokens drawn
through the tokenizer's decoder, VQ-KD token maps (BEiT v2's targets and predictions, one shade per
code), and a tokenizer's codebook usage and perplexity over training.

Grids are assembled as tensors and written with PIL; a header row names the columns. Which pictures a
run gets is its method's (`mimkit.registry.Method.pictures`, composed of the drawings here), so this module
sits below the methods: it names no method (a run's pictures are looked up by its ``config.method``), but it
names the models it draws (MAE, BEiT, BEiT v2, the dVAE, VQ-KD), whose drawings live here.
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from mimkit.config import PretrainConfig
from mimkit.data.loader import SeededViews
from mimkit.data.transforms import CENTER_CROP_MIN_SIZE, IMAGENET_CROP_PCT, denormalize, eval_view
from mimkit.errors import MimkitError, explain_write_errors
from mimkit.masking import block_mask, count_for_ratio
from mimkit.models.beit import BEiT, BEiTv2
from mimkit.models.mae import MAE
from mimkit.registry import method_of
from mimkit.tokenizers.dvae import DVAE
from mimkit.tokenizers.vqkd import VQKD


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
        pred = model.target_norm.invert(pred, model.patchify(images))
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
def token_predictions(tokenizer: DVAE, images: torch.Tensor, tokenizer_images: torch.Tensor,
                      mask: torch.Tensor, predicted_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """A model's token predictions at hidden patches, drawn through the tokenizer's decoder (any method whose
    targets are dVAE ids: BEiT, CAE).

    Args:
        tokenizer: the dVAE whose ids the model learned to predict.
        images: (B, C, H, W) normalized images at the ViT's size.
        tokenizer_images: (B, C, H', W') the same images at the tokenizer's size.
        mask: bool (B, h, w), True where a patch is hidden.
        predicted_ids: long (N,), the model's most likely id at each hidden patch, row-major per image.

    Returns:
        ``original``; ``masked`` (what the encoder saw); ``tokens``: the tokenizer's ids of every patch,
        decoded; ``prediction``: the same with the predicted ids at the hidden patches, decoded.
    """
    ids = tokenizer.tokenize(tokenizer_images)  # [B, h, w]
    predicted = ids.clone()
    predicted[mask] = predicted_ids
    hidden = _patch_pixels(mask, images.shape[-1] // mask.shape[-1])
    return {"original": images, "masked": images * (1 - hidden), "tokens": tokenizer.decode(ids),
            "prediction": tokenizer.decode(predicted)}


@torch.no_grad()
def beit_predictions(model: BEiT, tokenizer: DVAE, images: torch.Tensor, tokenizer_images: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """What BEiT predicts for hidden patches, drawn through the tokenizer's decoder (`token_predictions`;
    ``model`` a BEiT in eval mode, the other arguments its)."""
    x, _ = model.forward_features(images, mask)
    predicted_ids = model.forward_head(x, mask).argmax(-1)
    return token_predictions(tokenizer, images, tokenizer_images, mask, predicted_ids)


def token_maps(ids: torch.Tensor, vocab_size: int, patch_size: int, channels: int, mean, std) -> torch.Tensor:
    """Ids drawn as patches of one shade per code (a fixed random palette: gray for 1 channel), normalized
    like the images so that `image_grid` shows them beside them.

    Args:
        ids: long (B, h, w).
        vocab_size, patch_size, channels: codebook size, pixels per patch side, image channels.
        mean, std: the images' normalization.

    Returns:
        (B, channels, h * patch_size, w * patch_size) normalized images.
    """
    palette = torch.rand(vocab_size, channels, generator=torch.Generator().manual_seed(0))
    tiles = palette[ids].permute(0, 3, 1, 2).repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
    shape = (1, -1, 1, 1)
    return (tiles - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


@torch.no_grad()
def vqkd_tokens(model: VQKD, images: torch.Tensor, mean, std) -> dict[str, torch.Tensor]:
    """Images next to their VQ-KD token maps (a VQ-KD decodes to teacher features, not pixels).

    Args:
        model: a VQ-KD in eval mode.
        images: (B, C, H, W) normalized images.
        mean, std: their normalization.

    Returns:
        ``original`` and ``tokens``, each (B, C, H, W).
    """
    ids = model.tokenize(images)
    return {"original": images, "tokens": token_maps(ids, model.vocab_size, images.shape[-1] // ids.shape[-1],
                                                      images.shape[1], mean, std)}


@torch.no_grad()
def beitv2_predictions(model: BEiTv2, tokenizer: VQKD, images: torch.Tensor, tokenizer_images: torch.Tensor,
                       mask: torch.Tensor, mean, std) -> dict[str, torch.Tensor]:
    """BEiT v2's most likely codes at hidden patches beside the tokenizer's, as token maps.

    Args:
        model: a BEiT v2 in eval mode.
        tokenizer: the VQ-KD whose ids it learned to predict.
        images: (B, C, H, W) normalized images.
        tokenizer_images: the same images in the tokenizer's normalization.
        mask: bool (B, h, w), True where a patch is hidden.
        mean, std: the images' normalization.

    Returns:
        ``original``, ``masked`` (what the encoder saw), ``tokens`` (the tokenizer's ids) and
        ``prediction`` (the same with the model's ids at hidden patches), each (B, C, H, W).
    """
    ids = tokenizer.tokenize(tokenizer_images)  # [B, h, w]
    x, _ = model.forward_features(images, mask)
    predicted = ids.clone()
    predicted[mask] = model.forward_head(x, mask).argmax(-1)
    p, c = images.shape[-1] // mask.shape[-1], images.shape[1]
    hidden = _patch_pixels(mask, p)
    return {"original": images, "masked": images * (1 - hidden),
            "tokens": token_maps(ids, tokenizer.vocab_size, p, c, mean, std),
            "prediction": token_maps(predicted, tokenizer.vocab_size, p, c, mean, std)}


def block_masks(section, grid: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n block masks (n, grid, grid) as a BEiT-style run's ``beit``/``beitv2`` section draws them."""
    num_masked = count_for_ratio(grid * grid, section.mask_ratio)
    return torch.stack([block_mask(grid, grid, num_masked, section.min_block, generator=generator)
                        for _ in range(n)])


def _images(source: Dataset, picks: Sequence[int], size: int, mean, std, crop_pct: float) -> torch.Tensor:
    views = SeededViews(source, eval_view(size, mean, std, crop_pct))
    return torch.stack([views[(int(i), 0)]["image"] for i in picks])


def run_panels(model, config: PretrainConfig, source: Dataset, picks: Sequence[int],
               seed: int = 0) -> dict[str, torch.Tensor]:
    """The columns `mimkit visualize` draws for a run: its method's pictures (`mimkit.registry.Pictures`).

    Args:
        model: the run's model in eval mode (`mimkit.runs.load_run`).
        config: the run's configuration.
        source: images to draw from; `picks` indexes it.
        seed: the masks' seed.

    Returns:
        Column name -> (B, C, H, W) normalized images (columns may differ in size).
    """
    pictures = method_of(config.method).pictures
    if pictures is None:
        raise MimkitError(f"visualize has no pictures for {config.method} runs")
    data = config.data
    crop_pct = IMAGENET_CROP_PCT if data.img_size >= CENTER_CROP_MIN_SIZE else 1.0  # the ViT view's, for all

    def images(size: int, mean, std) -> torch.Tensor:
        return _images(source, picks, size, mean, std, crop_pct)

    return pictures(model, config, images, torch.Generator().manual_seed(seed))


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
            tile_image = Image.fromarray(pixels).resize((w, h), Image.NEAREST)
            canvas.paste(tile_image, (x, header + pad + i * (h + pad)))
    return canvas


def picture_path(out: str | Path, name: str) -> tuple[Path, str]:
    """Where a picture asked for as ``out`` is written, and how it was named when that is not ``out``.

    A folder gets the picture inside, as ``name`` (a PNG name), numbered (``recon-2.png``, ...) when that
    is taken; a name without a picture extension gets ``.png``.

    Returns:
        `(path, note)`: the note is empty when the path is ``out`` itself.
    """
    out = Path(out)
    if out.is_dir():
        path, number = out / name, 2
        while path.exists():
            path, number = out / f"{Path(name).stem}-{number}.png", number + 1
        return path, f"--out '{out}' is a folder: the picture is named {path.name}"
    if out.suffix.lower() not in Image.registered_extensions():
        return out.with_name(f"{out.name}.png"), f"--out '{out}' has no picture extension: .png added"
    return out, ""


def save_picture(image: Image.Image, path: str | Path) -> Path:
    """Write a picture in the format its extension names, creating the parent folder."""
    path = Path(path)
    with explain_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return path


def _plot(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
          series: dict[str, tuple[list[float], list[float], str]], fmt: str, x_label: str = "step") -> None:
    """Line chart in `box` (left, top, right, bottom): name -> (steps, values, colour); y from 0."""
    left, top, right, bottom = box
    draw.text((left, top - 14), title, fill="black")
    xs = [x for s, _, _ in series.values() for x in s]
    ys = [y for _, v, _ in series.values() for y in v]
    x_max, y_max = max(xs + [1]), max(ys + [1e-9]) * 1.05
    draw.rectangle(box, outline="black")
    for frac in (0.0, 0.5, 1.0):  # y ticks
        y = bottom - frac * (bottom - top)
        draw.line([(left - 3, y), (left, y)], fill="black")
        draw.text((left - 46, y - 6), format(frac * y_max, fmt), fill="black")
    draw.text((left, bottom + 3), "0", fill="black")
    draw.text((right - 40, bottom + 3), f"{x_label} {x_max:g}", fill="black")
    for i, (name, (steps, values, colour)) in enumerate(series.items()):
        points = [(left + x / x_max * (right - left), bottom - y / y_max * (bottom - top))
                  for x, y in zip(steps, values, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points if len(points) < 30 else ():
            draw.ellipse([(x - 2, y - 2), (x + 2, y + 2)], fill=colour)
        draw.text((left + 6, top + 4 + 12 * i), name, fill=colour)


def codebook_usage_plot(records: list[dict]) -> Image.Image:
    """A tokenizer's codebook over training: usage (share of the codes used) and perplexity, per step for
    the training batches and, where logged (VQ-KD), on held-out images at each epoch end.

    Args:
        records: the run's metrics (`mimkit.train.metrics_log.read_metrics`) with "usage" and "perplexity".

    Returns:
        A 720 x 300 picture with one panel per quantity.
    """
    def series(key: str) -> tuple[list[float], list[float]]:
        kept = [r for r in records if key in r]
        return [r["step"] for r in kept], [r[key] for r in kept]

    if not series("usage")[0]:
        raise MimkitError("these metrics hold no codebook usage (a dVAE or VQ-KD tokenizer run logs it)")
    canvas = Image.new("RGB", (720, 300), "white")
    draw = ImageDraw.Draw(canvas)
    for left, key, fmt in ((60, "usage", ".0%"), (420, "perplexity", ".0f")):
        lines = {f"{key} (batch)": (*series(key), "steelblue")}
        if series(f"val_{key}")[0]:
            lines[f"{key} (held-out)"] = (*series(f"val_{key}"), "darkorange")
        _plot(draw, (left, 30, left + 280, 270), key, lines, fmt)
    return canvas



def seg_palette(num_classes: int) -> torch.Tensor:
    """A colour per class, uint8 (num_classes, 3): Pascal VOC's colour map (class 0 black; the bits of the
    class id spread over the high bits of red, green and blue), the same for every run."""
    ids = torch.arange(num_classes)
    colours = torch.zeros(num_classes, 3, dtype=torch.long)
    for shift in range(7, -1, -1):
        for channel in range(3):
            colours[:, channel] |= ((ids >> (3 * (7 - shift) + channel)) & 1) << shift
    return colours.to(torch.uint8)


def colorize(mask: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Label map (H, W) -> uint8 (3, H, W) in the palette's colours; ignored pixels (255) white."""
    colours = torch.cat([palette, torch.full((256 - len(palette), 3), 255, dtype=torch.uint8)])
    return colours[mask.long().clamp(0, 255)].permute(2, 0, 1)


def overlay(image: torch.Tensor, mask: torch.Tensor, palette: torch.Tensor,
            alpha: float = 0.5) -> torch.Tensor:
    """An image uint8 (C, H, W) with its label map's colours blended in: uint8 (3, H, W)."""
    rgb = image.expand(3, -1, -1).float()
    return (rgb * (1 - alpha) + colorize(mask, palette).float() * alpha).round().to(torch.uint8)


def segmentation_figure(rows: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                        classes: Sequence[str], scale: int = 4) -> Image.Image:
    """Columns image | ground truth | prediction, one row per sample, and a legend of the classes shown.

    Args:
        rows: (image uint8 (C, H, W), truth (H, W), prediction (H, W)) per sample (any sizes).
        classes: class names, index = label.
        scale: integer upscaling for small images (nearest neighbour).
    """
    palette = seg_palette(len(classes))
    h = max(r[0].shape[1] for r in rows)
    scale = max(1, scale if h >= 64 else 224 // h)
    tiles = [[r[0].expand(3, -1, -1), colorize(r[1], palette), colorize(r[2], palette)] for r in rows]
    w = max(t.shape[2] for row in tiles for t in row) * scale
    h, pad, header = h * scale, 4, 18
    labels = torch.cat([t.flatten() for _, truth, pred in rows for t in (truth, pred)]).unique()
    shown = [int(c) for c in labels if c < len(classes)]
    legend_rows = (len(shown) + 2) // 3
    height = header + len(rows) * (h + pad) + pad + 16 * legend_rows + 8
    canvas = Image.new("RGB", (3 * (w + pad) + pad, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(("image", "ground truth", "prediction")):
        draw.text((pad + j * (w + pad), 3), name, fill="black")
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            picture = Image.fromarray(tile.permute(1, 2, 0).numpy())
            picture = picture.resize((tile.shape[2] * scale, tile.shape[1] * scale), Image.NEAREST)
            canvas.paste(picture, (pad + j * (w + pad), header + pad + i * (h + pad)))
    top = header + len(rows) * (h + pad) + pad
    column_width = (3 * (w + pad)) // 3
    for k, c in enumerate(shown):
        x, y = pad + (k % 3) * column_width, top + 16 * (k // 3)
        draw.rectangle([x, y + 2, x + 10, y + 12], fill=tuple(int(v) for v in palette[c]), outline="black")
        draw.text((x + 14, y + 1), f"{c} {classes[c]}", fill="black")
    return canvas


def accuracy_by_depth_plot(rows: list[dict], title: str) -> Image.Image:
    """A probe's accuracy at each block of an encoder.

    Args:
        rows: one per block, with "layer" (1-based) and "test_top1" (and "val_top1" when held out).
        title: e.g. "linprobe top-1 (%) by block".

    Returns:
        A 400 x 300 picture.
    """
    canvas = Image.new("RGB", (400, 300), "white")
    blocks = [r["layer"] for r in rows]
    lines = {"test": (blocks, [r["test_top1"] for r in rows], "steelblue")}
    if all("val_top1" in r for r in rows):
        lines["val"] = (blocks, [r["val_top1"] for r in rows], "darkorange")
    _plot(ImageDraw.Draw(canvas), (60, 30, 380, 270), title, lines, ".1f", x_label="block")
    return canvas


def confusion_plot(matrix: Sequence[Sequence[int]], classes: Sequence[str], cell: int = 24) -> Image.Image:
    """A segmentation confusion matrix as a picture: rows the true class, columns the predicted one, each
    cell shaded by its share of its row's pixels (a perfect model is a dark diagonal) and labelled with
    it in percent; a row with no pixels stays white.

    Args:
        matrix: (K, K) pixel counts, rows truth.
        classes: K names.
        cell: a cell's side in pixels (a matrix of many classes gets smaller cells, no text in them).
    """
    counts = torch.as_tensor(matrix, dtype=torch.float64)
    share = counts / counts.sum(1, keepdim=True).clamp(min=1)
    k = len(classes)
    cell = cell if k <= 24 else max(4, 600 // k)
    margin = 8 + 6 * (min(max(len(name) for name in classes), 16) + len(str(k)) + 1)
    top = 36  # the title, then the predicted classes' ids
    canvas = Image.new("RGB", (max(margin + k * cell + 8, 340), top + k * cell + 8), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 2), "true class (rows) vs predicted (columns), % of each row", fill="black")
    for i in range(k):
        if cell >= 12:
            draw.text((4, top + i * cell + cell // 2 - 6), f"{i} {classes[i][:16]}", fill="black")
            draw.text((margin + i * cell + 2, top - 14), str(i), fill="black")
        for j in range(k):
            shade = 255 - round(float(share[i, j]) * 215)
            box = [margin + j * cell, top + i * cell, margin + (j + 1) * cell - 1, top + (i + 1) * cell - 1]
            draw.rectangle(box, fill=(shade, shade, 255), outline=(220, 220, 220))
            if cell >= 20 and share[i, j] >= 0.005:
                draw.text((box[0] + 2, box[1] + cell // 2 - 6), f"{100 * float(share[i, j]):.0f}",
                          fill="white" if shade < 140 else "black")
    return canvas
