"""Scoring a trained segmentation run on a split: ``mimkit evaluate RUN``.

The run's best weights (else its newest) are scored on the ``val`` or ``train`` split of its own data, or of
another folder with the same classes, as the run evaluates or with a test-time augmentation (`TTA`: flip, or
the papers' multi-scale test), on the GPU when there is one. Every mask is checked before the first image
is scored. ``out`` (a new or empty folder, or one evaluate wrote: `mimkit.runs.claim_out_dir`) receives
``results.json`` (aAcc, mIoU, mAcc, the per-class table)
and the confusion matrix (`mimkit.eval.scores.write_segmentation_results`).
"""

import time
from pathlib import Path

import torch

from mimkit.cpus import data_workers
from mimkit.data.loader import eval_loader
from mimkit.data.seg_transforms import SegEvalView
from mimkit.data.segmentation import build_seg_source
from mimkit.errors import MimkitError
from mimkit.eval.scores import write_segmentation_results
from mimkit.eval.seg_metrics import TTA, evaluate_segmentation
from mimkit.eval.segment import SCORES, load_segmentation_run
from mimkit.runs import claim_out_dir


def evaluate_run(run: str | Path, out: str | Path, split: str = "val", data: str | None = None,
                 tta: str | None = None, batch_size: int = 1) -> dict:
    """Score segmentation run ``run`` on ``split`` of ``data`` (default: the run's own) into ``out``.

    Args:
        tta: None (as the run evaluates), or a name of `TTA`.
        batch_size: images scored together (1 for images of different sizes).

    Returns:
        The results written to ``out/results.json``.
    """
    if tta is not None and tta not in TTA:
        raise MimkitError(f"--tta {tta!r} is not one of {', '.join(TTA)}")
    out = claim_out_dir(out, "evaluate")
    start = time.perf_counter()
    model, config = load_segmentation_run(run)
    seg, data_cfg = config.seg, config.data
    source = build_seg_source(data or data_cfg.source, split, root=data_cfg.root, channels=data_cfg.channels,
                              num_classes=seg.num_classes, class_list=seg.classes,
                              max_image_pixels=data_cfg.max_image_pixels)
    source.check_masks(range(len(source)))  # every mask, before the first image is scored
    scales, flip = TTA[tta] if tta else (seg.eval_scales, seg.eval_flip)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = eval_loader(source, SegEvalView(seg.eval_scale, data_cfg.mean, data_cfg.std), batch_size,
                         data_workers(data_cfg.num_workers))
    scores = evaluate_segmentation(model.to(device), loader, device, seg.num_classes, seg.crop_size,
                                   seg.eval_mode, seg.eval_stride, flip, seg.classes, scales=scales)
    results = {"protocol": "segment-evaluate", "run": str(run), "data": data or data_cfg.source,
               "split": split,
               "images": len(source), "eval": {"mode": seg.eval_mode, "stride": seg.eval_stride, "flip": flip,
                                               "scales": list(scales)},
               **{k: scores[k] for k in SCORES}, "per_class": scores["per_class"],
               "wall_s": round(time.perf_counter() - start, 1)}
    write_segmentation_results(out, results, scores)
    return results
