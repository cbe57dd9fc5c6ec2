"""Segmentation scores and inference: a confusion matrix over the whole evaluation set, aAcc / mIoU / mAcc,
and whole-image or sliding-window logits (optionally averaged with the flipped image).

The matrix counts pixels (rows: truth, columns: prediction), ignored pixels left out; under DDP each
process counts its own images and the matrices are summed. From it:

- aAcc: correct pixels / labelled pixels.
- IoU of class c: TP / (TP + FP + FN); a class neither in the truth nor predicted has no IoU.
- Acc of class c: TP / truth pixels of c; a class absent from the truth has no Acc.
- mIoU, mAcc: means over the classes that have one (the mmsegmentation convention the papers report).

- Sliding window: the crop moves by ``stride`` over the image, the last one flush with its border; every
  pixel's logits are the mean over the crops that cover it (BEiT/MAE ADE20K: crop 512, stride 341).
"""

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mimkit.errors import MimkitError

IGNORE_INDEX = 255
MODES = ("whole", "slide")
# test-time augmentations by name: (scales, flip); ms is the papers' multi-scale test (their _ms configs)
TTA = {"flip": ((), True), "ms": ((0.5, 0.75, 1.0, 1.25, 1.5, 1.75), True)}


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixel counts (num_classes, num_classes), rows truth and columns prediction.

    Args:
        pred: int (...) predicted class ids.
        target: int (...) true ids, the same shape; ``ignore_index`` pixels are not counted.
    """
    keep = target != ignore_index
    target, pred = target[keep].long(), pred[keep].long()
    if target.numel() and int(target.max()) >= num_classes:
        raise MimkitError(f"a mask holds label {int(target.max())}, at or above the {num_classes} classes")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def all_reduce_sum(matrix: torch.Tensor) -> torch.Tensor:
    """The sum of ``matrix`` over the processes of a DDP job (itself when there is one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        matrix = matrix.clone()
        dist.all_reduce(matrix)
    return matrix


def _mean(values: torch.Tensor) -> float:
    present = values[~values.isnan()]
    return 100 * float(present.mean()) if present.numel() else float("nan")


def segmentation_scores(matrix: torch.Tensor, classes: Sequence[str] | None = None) -> dict:
    """aAcc, mIoU, mAcc (%) and the per-class table from a confusion matrix.

    Args:
        matrix: (K, K) pixel counts, rows truth.
        classes: K names for the table (default ``class_0`` ...).

    Returns:
        ``{"aAcc", "mIoU", "mAcc", "per_class": [{"class", "IoU", "Acc"}, ...]}``; a class's IoU or Acc is
        None where it has none (see the module's note).
    """
    matrix = matrix.double()
    tp, truth, predicted = matrix.diag(), matrix.sum(1), matrix.sum(0)
    union = truth + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
    acc = torch.where(truth > 0, tp / truth.clamp(min=1), torch.nan)
    names = list(classes) if classes is not None else [f"class_{c}" for c in range(len(tp))]

    def pct(x: torch.Tensor) -> float | None:
        return None if x.isnan() else round(100 * float(x), 2)

    table = [{"class": n, "IoU": pct(i), "Acc": pct(a)} for n, i, a in zip(names, iou, acc, strict=True)]
    return {"aAcc": 100 * float(tp.sum() / truth.sum().clamp(min=1)), "mIoU": _mean(iou), "mAcc": _mean(acc),
            "per_class": table}


def format_table(scores: dict) -> str:
    """The per-class table and the means as aligned text."""
    width = max([5] + [len(row["class"]) for row in scores["per_class"]])
    lines = [f"{'class':<{width}}    IoU    Acc"]
    for row in scores["per_class"]:
        cells = ["    -" if v is None else f"{v:5.2f}" for v in (row["IoU"], row["Acc"])]
        lines.append(f"{row['class']:<{width}}  {cells[0]:>5}  {cells[1]:>5}")
    lines.append(f"aAcc {scores['aAcc']:.2f}  mIoU {scores['mIoU']:.2f}  mAcc {scores['mAcc']:.2f}")
    return "\n".join(lines)


def whole_logits(model: nn.Module, images: torch.Tensor, crop: int) -> torch.Tensor:
    """Logits (B, K, H, W) of whole images (B, C, H, W), resized to the model's ``crop`` x ``crop`` input and
    the logits back to (H, W)."""
    size = images.shape[2:]
    if tuple(size) != (crop, crop):
        images = F.interpolate(images, size=(crop, crop), mode="bilinear", align_corners=False)
    logits = model(images)
    return logits if logits.shape[2:] == size else F.interpolate(logits, size=size, mode="bilinear",
                                                                  align_corners=False)


def _starts(length: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one side: every ``stride``, the last flush with the end (0 when it fits)."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, length - crop), 0) for i in range(count)})


def sliding_logits(model: nn.Module, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Logits (B, K, H, W) averaged over ``crop`` x ``crop`` windows every ``stride`` pixels.

    A side shorter than the crop is padded with zeros for the model and cut away from its logits.
    """
    if not 0 < stride <= crop:
        raise MimkitError(f"sliding window stride {stride} must be in 1..{crop} (the crop)")
    height, width = images.shape[2:]
    total = count = None
    for top in _starts(height, crop, stride):
        for left in _starts(width, crop, stride):
            window = images[:, :, top:top + crop, left:left + crop]
            h, w = window.shape[2:]
            logits = model(F.pad(window, (0, crop - w, 0, crop - h)))[:, :, :h, :w].float()
            if total is None:
                total = logits.new_zeros(*logits.shape[:2], height, width)
                count = logits.new_zeros(1, 1, height, width)
            total[:, :, top:top + h, left:left + w] += logits
            count[:, :, top:top + h, left:left + w] += 1
    return total / count


def predict_logits(model: nn.Module, images: torch.Tensor, crop: int, mode: str = "whole",
                   stride: int | None = None, flip: bool = False, scales: Sequence[float] = ()) -> torch.Tensor:
    """Logits (B, K, H, W) for images (B, C, H, W): ``whole`` or ``slide`` (``stride`` pixels apart), averaged
    with those of the horizontally flipped images when ``flip``, and over the images resized by each ratio
    of ``scales`` (bilinear; the logits resized back to (H, W)) when given: the papers' multi-scale test."""
    if mode not in MODES:
        raise MimkitError(f"inference mode {mode!r} is not one of {', '.join(MODES)}")

    def once(x: torch.Tensor) -> torch.Tensor:
        return (sliding_logits(model, x, crop, stride or crop) if mode == "slide"
                else whole_logits(model, x, crop).float())

    def flipped(x: torch.Tensor) -> torch.Tensor:
        logits = once(x)
        return (logits + once(x.flip(-1)).flip(-1)) / 2 if flip else logits

    size = images.shape[2:]
    total = 0
    for ratio in scales or (1.0,):
        scaled = [max(1, round(side * ratio)) for side in size]
        x = images if list(size) == scaled else F.interpolate(images, size=scaled, mode="bilinear",
                                                              align_corners=False)
        logits = flipped(x)
        total = total + (logits if logits.shape[2:] == size else F.interpolate(
            logits, size=size, mode="bilinear", align_corners=False))
    return total / len(scales or (1.0,))


@torch.inference_mode()
def evaluate_segmentation(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
                          crop: int, mode: str = "whole", stride: int | None = None, flip: bool = False,
                          classes: Sequence[str] | None = None, desc: str = "eval",
                          scales: Sequence[float] = ()) -> dict:
    """Scores of a segmentation model over a loader of ``{"image", "mask"}`` batches (all processes' images),
    inferred as `predict_logits` does.

    The progress bar shows the running mIoU of this process's images. The model is left in eval mode.

    Returns:
        `segmentation_scores` of the summed confusion matrix, and the matrix itself under ``"confusion"``
        (a list of rows: truth, columns: prediction).
    """
    model.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, unit="batch")
    for batch in bar:
        images = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = predict_logits(model, images, crop, mode, stride, flip, scales)
        masks = batch["mask"].to(device)
        if logits.shape[2:] != masks.shape[1:]:  # an image evaluated at another scale: score at the mask's
            logits = F.interpolate(logits, size=masks.shape[1:], mode="bilinear", align_corners=False)
        matrix += confusion_matrix(logits.argmax(1), masks, num_classes)
        bar.set_postfix(mIoU=f"{segmentation_scores(matrix)['mIoU']:.2f}")
    matrix = all_reduce_sum(matrix).cpu()
    return segmentation_scores(matrix, classes) | {"confusion": matrix.tolist()}
