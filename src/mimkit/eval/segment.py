"""Semantic segmentation: a pretrained encoder with UperNet (or a linear head), trained end to end by the one
training loop and scored by mIoU.

The papers' ADE20K protocol (BEiT appendix; MAE section 5 uses BEiT's code; BEiT v2 section 4): AdamW with
layer-wise lr decay over the encoder (the heads at the full lr), linear warmup then polynomial decay
(power 1.0), drop path, cross-entropy ignoring label 255 on the decode head plus 0.4 x the auxiliary
head's. The validation split is scored after every ``eval_every`` steps (whole image or sliding window,
optionally flip-averaged); the best weights are kept beside the last ones, and the last scores, with the
per-class table, go to ``results.json``.

- BEiT: Bao et al., 2021, arXiv:2106.08254; MAE: He et al., 2021, arXiv:2111.06377
- BEiT v2: Peng et al., 2022, arXiv:2208.06366; UperNet: Xiao et al., 2018, arXiv:1807.10221
"""

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

import mimkit.methods  # noqa: F401  (registers the methods whose runs this loads)
from mimkit.config import from_dict, to_dict
from mimkit.data.loader import SeededViews, eval_loader
from mimkit.data.seg_transforms import SegEvalView, SegTrainView
from mimkit.data.segmentation import SegSource, build_seg_source
from mimkit.errors import MimkitError
from mimkit.eval.config import SegmentConfig
from mimkit.eval.metrics import write_results
from mimkit.eval.seg_metrics import IGNORE_INDEX, MODES, evaluate_segmentation, format_table
from mimkit.eval.subsets import label_subset
from mimkit.models.segmentation import HEADS, Segmenter, segmentation_encoder
from mimkit.registry import read_config
from mimkit.runs import (
    CONFIG,
    Encoder,
    best_weights,
    hold_run_dir,
    keep_config,
    load_encoder,
    random_encoder,
    saved_values,
)
from mimkit.train.checkpoint import Checkpoints, load_weights
from mimkit.train.distributed import World, init_world
from mimkit.train.loop import Evaluation, LoopOptions, train
from mimkit.train.optim import build_adamw, param_groups
from mimkit.train.schedule import plan_run, poly_schedule

logger = logging.getLogger(__name__)

SCORES = ("aAcc", "mIoU", "mAcc")


def resolve_segment(config: SegmentConfig, encoder: Encoder, source: SegSource) -> SegmentConfig:
    """Fill what the encoder decides (channels, normalization, default crop, its own configuration) and what
    the data decides (classes)."""
    spec = encoder.spec.data
    data = replace(config.data, img_size=None, channels=spec.channels, mean=config.data.mean or spec.mean,
                   std=config.data.std or spec.std)  # the encoder's input, as in fine-tuning
    if config.seg.eval_mode not in MODES:
        raise MimkitError(f"seg.eval_mode={config.seg.eval_mode!r} is not one of {', '.join(MODES)}")
    if config.seg.head not in HEADS:
        raise MimkitError(f"seg.head={config.seg.head!r} is not one of {', '.join(HEADS)}")
    crop = config.seg.crop_size or spec.img_size
    seg = replace(config.seg, num_classes=source.num_classes, classes=list(source.classes), crop_size=crop,
                  scale=config.seg.scale or (crop, crop))
    return replace(config, encoder_config=to_dict(encoder.spec), data=data, seg=seg)


def build_segmenter(config: SegmentConfig, encoder: nn.Module) -> Segmenter:
    """The segmentation model of a resolved configuration around (a copy of) ``encoder``."""
    seg = config.seg
    return Segmenter(segmentation_encoder(encoder, seg.crop_size, seg.drop_path), seg.num_classes, seg.head,
                     seg.blocks, seg.channels, seg.aux_channels, seg.freeze_encoder)


def is_segmentation_run(run: str | Path) -> bool:
    """Whether ``run`` is a directory left by `mimkit segment`."""
    return "seg" in saved_values(run)


def load_segmenter(run_dir: str | Path) -> tuple[Segmenter, SegmentConfig]:
    """A segmentation run's model (its best weights, else its newest) in eval mode on CPU, and its
    configuration."""
    run_dir = Path(run_dir)
    values = saved_values(run_dir)
    if "seg" not in values:
        raise MimkitError(f"'{run_dir}' is not a segmentation run (no seg section in its {CONFIG}); "
                          "make one with mimkit segment")
    config = from_dict(SegmentConfig, values)
    model = build_segmenter(config, random_encoder(read_config(config.encoder_config)))
    load_weights(model, best_weights(run_dir))
    return model.eval(), config


def segmentation_loss(model: Segmenter, images: torch.Tensor, masks: torch.Tensor,
                      aux_weight: float) -> tuple[torch.Tensor, dict]:
    """Cross-entropy (label 255 ignored) of the decode head, plus ``aux_weight`` x the auxiliary head's; each
    head's logits are upsampled bilinearly to the masks' size first.

    Returns:
        The loss and ``{"decode_loss", "aux_loss"}`` (the second when there is an auxiliary head).
    """
    size = masks.shape[-2:]
    losses = [F.cross_entropy(F.interpolate(logits, size=size, mode="bilinear", align_corners=False), masks,
                              ignore_index=IGNORE_INDEX)
              for logits in model.forward_logits(images)]
    weights = [1.0, aux_weight][:len(losses)]
    total = sum(w * loss for w, loss in zip(weights, losses, strict=True))
    return total, dict(zip(("decode_loss", "aux_loss"), (loss.detach() for loss in losses), strict=False))


def optimizer_groups(model: Segmenter, weight_decay: float, layer_decay: float) -> list[dict]:
    """Layer-wise lr decay over the encoder's blocks; the pyramid and heads at scale 1. (The encoder is
    grouped on its own: the heads hold modules named ``blocks`` too, which are no transformer blocks.)"""
    heads = nn.ModuleList([m for m in (model.fpn, model.decode_head, model.auxiliary_head) if m is not None])
    return (param_groups(model.encoder, weight_decay, layer_decay, len(model.encoder.blocks))
            + param_groups(heads, weight_decay))


def run_segment(config: SegmentConfig, run_dir: str | Path, force_config: bool = False) -> dict:
    """Train ``config.encoder`` for segmentation on ``config.data`` into ``run_dir`` (resuming when it holds a
    checkpoint), holding the run directory's lock meanwhile (`mimkit.runs.hold_run_dir`).

    ``run_dir`` receives its configuration, ``metrics.jsonl`` (loss, lr, and the validation aAcc/mIoU/mAcc),
    ``checkpoints/`` (the last ones and the best weights, highest val mIoU) and, once training has
    finished, ``results.json`` (the scores with the per-class table).

    Args:
        force_config: resume a trained run whose configuration, number of processes or global batch differ
            from this one's (otherwise refused; `mimkit.runs.keep_config`).

    Returns:
        The results (or, when interrupted, the training loop's summary).
    """
    world = init_world()
    with hold_run_dir(run_dir, enabled=world.is_main):
        return _segment(config, Path(run_dir), world, force_config)


def _segment(config: SegmentConfig, run_dir: Path, world: World, force_config: bool) -> dict:
    start = time.perf_counter()
    seg, data = config.seg, config.data
    encoder = load_encoder(config.encoder, seg.init, seed=config.train.seed)
    channels = encoder.spec.data.channels
    source = build_seg_source(data.source, "train", root=data.root, num_classes=seg.num_classes,
                              channels=channels)
    val_set = build_seg_source(data.source, "val", root=data.root, num_classes=source.num_classes,
                               channels=channels)
    config = resolve_segment(config, encoder, source)
    seg, data, labels = config.seg, config.data, config.labels
    train_set = Subset(source, label_subset([0] * len(source), labels.fraction, labels.seed))

    torch.manual_seed(config.train.seed)  # the heads' initialization, the same on every rank
    model = build_segmenter(config, encoder.model).to(world.device)
    if world.size > 1 and world.device.type == "cuda":  # BatchNorm over the global batch, as the papers
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # (CPU processes keep their own statistics)

    def loss_fn(model: Segmenter, batch: dict):
        return segmentation_loss(model, batch["image"], batch["mask"], seg.aux_weight)

    if config.eval_images:
        val_set = Subset(val_set, range(min(config.eval_images, len(val_set))))
    eval_view = SegEvalView(seg.eval_scale, data.mean, data.std)
    own_part = Subset(val_set, range(world.rank, len(val_set), world.size))  # matrices summed over ranks
    val_loader = eval_loader(own_part, eval_view, config.eval_batch_size, data.num_workers)
    last: dict = {}

    def evaluate(model: Segmenter) -> dict:
        last["scores"] = evaluate_segmentation(model, val_loader, world.device, seg.num_classes,
                                               seg.crop_size, seg.eval_mode, seg.eval_stride, seg.eval_flip,
                                               seg.classes)
        model.train()
        results = {f"val_{k}": last["scores"][k] for k in SCORES}
        if world.is_main:
            logger.info("  ".join(f"{k} {v:.2f}" for k, v in results.items()))
        return results

    train_cfg, optim = config.train, config.optim
    plan = plan_run(len(train_set), world.size, train_cfg, optim, lr_schedule=poly_schedule)
    optimizer = build_adamw(optimizer_groups(model, optim.weight_decay, optim.layer_decay), optim.betas)

    if world.is_main:
        keep_config(run_dir, config, force_config)
        logger.info(f"segment {seg.init} {encoder.spec.model.name} with {seg.head} on {data.source}: "
                    f"{len(train_set)} images ({100 * labels.fraction:g}% of them), "
                    f"{seg.num_classes} classes, crop {seg.crop_size}, {plan.describe()}, "
                    f"layer decay {optim.layer_decay}")
    if train_cfg.compile:
        model.compile()
    view = SegTrainView(seg.crop_size, seg.scale, data.mean, data.std, seg.ratio_range, seg.cat_max_ratio,
                        photometric=seg.photometric)
    options = LoopOptions.from_config(train_cfg, num_workers=data.num_workers, force_resume=force_config,
                                      desc="segment")
    summary = train(model, loss_fn, SeededViews(train_set, view), optimizer, plan.schedule, run_dir, world,
                    options, Evaluation(evaluate, config.eval_every, keep_best="val_mIoU"))
    if summary["interrupted"]:
        return summary
    if "scores" not in last:  # the run had already finished: score its weights once more (every rank)
        evaluate(model)
    if not world.is_main:
        return summary
    scores = last["scores"]
    best = Checkpoints(run_dir).best() or {"value": None, "step": None}  # no mIoU yet (no class present)
    results = {
        "protocol": "segment", "encoder": encoder.origin, "init": seg.init, "head": seg.head,
        "frozen_encoder": seg.freeze_encoder, "data": data.source, "label_fraction": labels.fraction,
        "seed": labels.seed, "train_images": len(train_set), "val_images": len(val_set),
        "crop_size": seg.crop_size, "eval": {"mode": seg.eval_mode, "stride": seg.eval_stride,
                                             "flip": seg.eval_flip},
        "steps": summary["step"], "epochs": round(summary["step"] / plan.steps_per_epoch, 2),
        **{k: scores[k] for k in SCORES}, "best_val_mIoU": best["value"], "best_step": best["step"],
        "per_class": scores["per_class"], "wall_s": round(time.perf_counter() - start, 1),
    }
    write_results(run_dir, results)
    logger.info(format_table(scores))
    return results
