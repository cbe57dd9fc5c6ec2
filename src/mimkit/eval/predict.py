"""Running a trained model on new images: label maps from a segmentation run, top-5 classes from a
fine-tuned classifier.

- Segmentation: for each image, ``<stem>.png``, a palette PNG whose pixel values are the class ids (its
  colours are `mimkit.viz.seg_palette`'s), and ``<stem>_overlay.png``, the image with the colours blended
  in. Images are read as the run's encoder reads them (its channels and normalization) and predicted as
  the run evaluates (whole image or sliding window, flip if it flips), at their own size.
- Classification: ``predictions.csv`` with the file, then the top-5 classes and their probabilities.
"""

import csv
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

import mimkit.methods  # noqa: F401  (registers the methods whose runs this loads)
from mimkit.data.seg_transforms import SegEvalView
from mimkit.data.sources import build_source
from mimkit.data.transforms import eval_view
from mimkit.errors import MimkitError
from mimkit.eval.seg_metrics import predict_logits
from mimkit.eval.segment import load_segmenter
from mimkit.runs import load_encoder
from mimkit.viz import overlay, seg_palette


def _images(folder: str | Path, channels: int):
    """The images under ``folder`` (recursively): a source of (uint8 (C, H, W), _) with ``paths``."""
    if not Path(folder).is_dir():
        raise MimkitError(f"--images '{folder}' is not a folder of images")
    return build_source(str(folder), "train", channels=channels)


@torch.inference_mode()
def predict_masks(run: str | Path, images: str | Path, out: str | Path) -> list[Path]:
    """Label maps and overlays of a segmentation run for each image under ``images``; returns the maps."""
    model, config = load_segmenter(run)
    seg, data = config.seg, config.data
    source = _images(images, data.channels)
    view = SegEvalView(seg.eval_scale, data.mean, data.std)
    palette = seg_palette(seg.num_classes)
    padded = torch.cat([palette, torch.zeros(256 - len(palette), 3, dtype=torch.uint8)])
    flat = [int(v) for v in padded.flatten()]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index in tqdm(range(len(source)), desc="predict", unit="image"):
        image, _ = source[index]
        logits = predict_logits(model, view.image(image)[None], seg.crop_size, seg.eval_mode, seg.eval_stride,
                                seg.eval_flip)
        logits = torch.nn.functional.interpolate(logits, size=image.shape[1:], mode="bilinear",
                                                 align_corners=False)
        labels = logits.argmax(1)[0].to(torch.uint8)
        stem = Path(source.paths[index]).stem
        label_map = Image.fromarray(labels.numpy(), mode="P")
        label_map.putpalette(flat)
        label_map.save(out / f"{stem}.png")
        blended = overlay(image, labels, palette).permute(1, 2, 0).numpy()
        Image.fromarray(blended).save(out / f"{stem}_overlay.png")
        written.append(out / f"{stem}.png")
    return written


@torch.inference_mode()
def predict_classes(run: str | Path, images: str | Path, out: str | Path, top: int = 5) -> Path:
    """``<out>/predictions.csv`` of a fine-tuned classifier: file, then the top classes and probabilities."""
    encoder = load_encoder(run)
    if encoder.finetune is None:
        raise MimkitError(f"'{run}' is a pretraining run: predict needs a segmentation run (mimkit segment) "
                          "or a fine-tuned classifier (mimkit finetune)")
    data = encoder.finetune.data
    classes = build_source(data.source, "train", root=data.root, channels=data.channels).info.classes
    source = _images(images, data.channels)
    view = eval_view(data.img_size, data.mean, data.std)
    k = min(top, len(classes))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file"] + [f"{name}_{i}" for i in range(1, k + 1) for name in ("class", "prob")])
        for index in tqdm(range(len(source)), desc="predict", unit="image"):
            probs = encoder.model(view(source[index][0])["image"][None]).softmax(-1)[0]
            values, ids = probs.topk(k)
            ranked = zip(ids.tolist(), values.tolist(), strict=True)
            writer.writerow([source.paths[index]] + [x for c, p in ranked for x in (classes[c], f"{p:.4f}")])
    return path
