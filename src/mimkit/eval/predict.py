"""Running a trained model on new images: label maps from a segmentation run, top-5 classes from a
fine-tuned classifier.

Images: every image under ``--images``, recursively, whatever its sub-folders (``train/``, ``val/``, class
folders); of a segmentation folder (ADE20K, Pascal VOC, images/ + masks/) the images of both splits and
none of the masks.

- Segmentation: for each image, a palette PNG whose pixel values are the class ids (its colours are
  `mimkit.viz.seg_palette`'s) and an ``_overlay.png``, the image with the colours blended in, at the
  image's path relative to ``--images`` (``val/x.jpg`` -> ``val/x.png``); images whose names differ only
  by extension keep it (``x.jpg`` -> ``x_jpg.png``). Images are read as the run's encoder reads them (its
  channels and normalization) and predicted as the run evaluates (whole image or sliding window, flip and
  scales if it uses them), or with ``tta`` (``flip``; ``ms``: the papers' scales 0.5-1.75 with flip), on
  the GPU when there is one, a batch of equally sized images at a time.
- Classification: ``predictions.csv`` with the file, then the top-5 classes and their probabilities.

``--out`` is a new folder, an empty one, or one that predict wrote before (`mimkit.runs.claim_out_dir`);
another folder is refused unless ``force``.
"""

import csv
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mimkit.data.folders import FlatFolderSource, ListedFolderSource
from mimkit.data.layouts import find_layout
from mimkit.data.seg_transforms import SegEvalView
from mimkit.data.sources import build_source
from mimkit.data.transforms import eval_view
from mimkit.errors import MimkitError
from mimkit.eval.seg_metrics import TTA, predict_logits
from mimkit.runs import claim_out_dir, load_encoder
from mimkit.viz import overlay, seg_palette


def image_source(folder: str | Path, channels: int) -> ListedFolderSource | FlatFolderSource:
    """Every image under ``folder`` (see the module's docstring), read with ``channels``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MimkitError(f"--images '{folder}' is not a folder of images")
    layout = find_layout(folder)
    if layout is None:
        return FlatFolderSource(folder, channels)
    images = [path for split in ("train", "val") for path in layout.split(split).images]
    return ListedFolderSource(folder, folder.name, [(-1, str(p.relative_to(folder))) for p in images], [],
                              channels)


def output_names(paths: list[str], root: str | Path) -> tuple[list[Path], int]:
    """The label map's path for each image, relative to the output folder: the image's path relative to
    ``root`` with ``.png``; images whose names differ only by extension keep it (``x_jpg.png``).

    Returns:
        The names, and how many images kept their extension.
    """
    relative = [Path(path).relative_to(root) for path in paths]
    stems = Counter(path.with_suffix("") for path in relative)
    names = [path.with_suffix(".png") if stems[path.with_suffix("")] == 1
             else path.with_name(f"{path.stem}_{path.suffix.lstrip('.').lower()}.png") for path in relative]
    return names, sum(count for count in stems.values() if count > 1)


class _Decoded(Dataset):
    """(index, image) of a source, for a loader that decodes in its workers."""

    def __init__(self, source: Dataset):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, self.source[index][0]


def _same_size_batches(source: Dataset, batch_size: int,
                       workers: int) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """The images in order, in runs of up to ``batch_size`` consecutive ones of one size."""
    loader = DataLoader(_Decoded(source), batch_size=None, num_workers=workers)
    batch: list[tuple[int, torch.Tensor]] = []
    for index, image in loader:
        if batch and (len(batch) == batch_size or batch[0][1].shape != image.shape):
            yield batch
            batch = []
        batch.append((index, image))
    if batch:
        yield batch


@torch.inference_mode()
def predict_masks(model: nn.Module, config, images: str | Path, out: str | Path, tta: str | None = None,
                  batch_size: int = 16, force: bool = False, workers: int = 1) -> tuple[list[Path], str]:
    """Label maps and overlays of a segmentation run's model for each image under ``images``.

    Args:
        model: the run's `mimkit.models.segmentation.Segmenter` in eval mode.
        config: the run's `mimkit.eval.config.SegmentConfig`.
        tta: None (as the run evaluates), ``flip`` or ``ms`` (see the module's docstring).
        batch_size: images predicted together (of one size).
        force: write into an ``out`` folder that holds other files.
        workers: data loader processes decoding the images.

    Returns:
        The label maps written, and a note on how they were named.
    """
    if tta is not None and tta not in TTA:
        raise MimkitError(f"--tta {tta!r} is not one of {', '.join(TTA)}")
    seg, data = config.seg, config.data
    scales, flip = TTA[tta] if tta else (seg.eval_scales, seg.eval_flip)
    source = image_source(images, data.channels)
    names, kept = output_names(source.paths, source.root)
    out = claim_out_dir(out, "predict", force)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    view = SegEvalView(seg.eval_scale, data.mean, data.std)
    palette = seg_palette(seg.num_classes)
    padded = torch.cat([palette, torch.zeros(256 - len(palette), 3, dtype=torch.uint8)])
    flat = [int(v) for v in padded.flatten()]
    written = []
    with tqdm(total=len(source), desc="predict", unit="image") as bar:
        for batch in _same_size_batches(source, batch_size, workers):
            inputs = torch.stack([view.image(image) for _, image in batch]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = predict_logits(model, inputs, seg.crop_size, seg.eval_mode, seg.eval_stride, flip,
                                        scales)
            logits = torch.nn.functional.interpolate(logits.float(), size=batch[0][1].shape[1:],
                                                     mode="bilinear", align_corners=False)
            for (index, image), labels in zip(batch, logits.argmax(1).to(torch.uint8).cpu(), strict=True):
                path = out / names[index]
                path.parent.mkdir(parents=True, exist_ok=True)
                label_map = Image.fromarray(labels.numpy(), mode="P")
                label_map.putpalette(flat)
                label_map.save(path)
                Image.fromarray(overlay(image, labels, palette).permute(1, 2, 0).numpy()).save(
                    path.with_name(f"{path.stem}_overlay.png"))
                written.append(path)
            bar.update(len(batch))
    note = (f"; {kept} images whose names differ only by extension keep it (x.jpg -> x_jpg.png)" if kept
            else "")
    return written, f"named as the images under {images}, with .png{note}"


@torch.inference_mode()
def predict_classes(run: str | Path, images: str | Path, out: str | Path, top: int = 5,
                    force: bool = False) -> Path:
    """``<out>/predictions.csv`` of a fine-tuned classifier: file, then the top classes and probabilities."""
    encoder = load_encoder(run)
    if encoder.kind != "finetune":
        raise MimkitError(f"'{run}' is a {encoder.kind} run: predict needs a segmentation run (mimkit "
                          "segment) or a fine-tuned classifier (mimkit finetune)")
    data = encoder.config.data
    classes = build_source(data.source, "train", root=data.root, channels=data.channels).info.classes
    source = image_source(images, data.channels)
    view = eval_view(data.img_size, data.mean, data.std)
    k = min(top, len(classes))
    path = claim_out_dir(out, "predict", force) / "predictions.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file"] + [f"{name}_{i}" for i in range(1, k + 1) for name in ("class", "prob")])
        for index in tqdm(range(len(source)), desc="predict", unit="image"):
            probs = encoder.model(view(source[index][0])["image"][None]).softmax(-1)[0]
            values, ids = probs.topk(k)
            ranked = zip(ids.tolist(), values.tolist(), strict=True)
            writer.writerow([source.paths[index]] + [x for c, p in ranked for x in (classes[c], f"{p:.4f}")])
    return path
