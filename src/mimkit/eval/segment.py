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

Registers the ``segment`` run kind (`mimkit.kinds`): a segmentation run loads as its `Segmenter`, draws
image | ground truth | prediction, and predicts label maps.
"""

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from mimkit.config import from_dict, merge, parse_overrides, to_dict
from mimkit.cpus import data_workers
from mimkit.data.loader import SeededViews, eval_loader
from mimkit.data.seg_transforms import SegEvalView, SegTrainView
from mimkit.data.segmentation import SegSource, build_seg_source
from mimkit.errors import MimkitError
from mimkit.eval.config import SegmentConfig
from mimkit.eval.predict import predict_masks
from mimkit.eval.scores import write_segmentation_results
from mimkit.eval.seg_metrics import IGNORE_INDEX, MODES, evaluate_segmentation, format_table, predict_logits
from mimkit.eval.seg_sizing import SegDataFacts, label_hint, seg_size_hint, survey_seg_data
from mimkit.eval.subsets import label_subset
from mimkit.kinds import Kind, register_kind
from mimkit.models.segmentation import HEADS, Segmenter, segmentation_encoder
from mimkit.registry import read_config
from mimkit.runner import Job, OpenedRun, open_run, run_job
from mimkit.runs import (
    Encoder,
    best_weights,
    load_encoder,
    random_encoder,
    read_run,
)
from mimkit.train.checkpoint_files import load_weights
from mimkit.train.loop import Evaluation
from mimkit.train.optim import param_groups
from mimkit.train.schedule import RunPlan, plan_run, poly_schedule
from mimkit.viz import save_picture, segmentation_figure

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
    encoder = segmentation_encoder(encoder, seg.crop_size, seg.drop_path, seg.rel_pos_bias)
    return Segmenter(encoder, seg.num_classes, seg.head,
                     seg.blocks, seg.channels, seg.aux_channels, seg.freeze_encoder)


def load_segmenter(config: SegmentConfig, run_dir: Path) -> Segmenter:
    """A segmentation run's model (its best weights, else its newest) in eval mode on CPU."""
    model = build_segmenter(config, random_encoder(read_config(config.encoder_config)))
    load_weights(model, best_weights(run_dir))
    return model.eval()


def load_segmentation_run(run_dir: str | Path) -> tuple[Segmenter, SegmentConfig]:
    """The model (`load_segmenter`) and configuration of the segmentation run in ``run_dir``; another kind of
    run is refused."""
    kind, config = read_run(run_dir)
    if kind.name != "segment":
        raise MimkitError(f"'{run_dir}' is a {kind.name} run, not a segmentation run; make one with "
                          "mimkit segment")
    return load_segmenter(config, Path(run_dir)), config


def visualize_segmentation(config: SegmentConfig, run_dir: Path, out: Path, n: int, seed: int) -> list[Path]:
    """``mimkit visualize SEGRUN``: image | ground truth | prediction for ``n`` validation images."""
    model = load_segmenter(config, run_dir)
    seg, data = config.seg, config.data
    source = build_seg_source(data.source, "val", root=data.root, num_classes=seg.num_classes,
                              channels=data.channels)
    view = SegEvalView(seg.eval_scale, data.mean, data.std)
    picks = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:n]
    rows = []
    with torch.inference_mode():
        for index in picks.tolist():
            image, truth = source[index]
            logits = predict_logits(model, view.image(image)[None], seg.crop_size, seg.eval_mode,
                                    seg.eval_stride, seg.eval_flip, seg.eval_scales)
            logits = F.interpolate(logits, size=truth.shape, mode="bilinear", align_corners=False)
            rows.append((image, truth, logits.argmax(1)[0]))
    return [save_picture(segmentation_figure(rows, seg.classes), out)]


def predict_label_maps(config: SegmentConfig, run_dir: Path, images: str, out: str, tta: str | None,
                       batch_size: int, force: bool) -> str:
    """``mimkit predict SEGRUN``: a label map (and its overlay) per image
    (`mimkit.eval.predict.predict_masks`)."""
    written, naming = predict_masks(load_segmenter(config, run_dir), config, images, out, tta, batch_size,
                                    force)
    return f"wrote {len(written)} label maps (and their _overlay.png) to {out}: {naming}"


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


def run_segment(config: SegmentConfig, run_dir: str | Path, force_config: bool = False, *, recipe: str = "",
                auto_size: bool = False) -> dict:
    """Train ``config.encoder`` for segmentation on ``config.data`` into ``run_dir`` (resuming when it holds a
    checkpoint) with the one runner (`mimkit.runner`), holding the run directory's lock meanwhile.

    Before the first step the masks are checked (every evaluated val mask, a sample of the train ones:
    `mimkit.eval.seg_sizing`) and a start-up summary is logged: data, masks and classes, recipe, model, run,
    engine, and a hint when the images are much smaller than the crop. ``run_dir`` receives its
    configuration, ``metrics.jsonl`` (loss, lr, and the validation aAcc/mIoU/mAcc), ``checkpoints/`` (the
    last ones and the best weights, highest val mIoU) and, once training has finished, ``results.json``
    (the scores with the per-class table) and the validation confusion matrix
    (`mimkit.eval.scores.write_segmentation_results`).

    Args:
        force_config: resume a trained run whose configuration, number of processes or global batch differ
            from this one's (otherwise refused; `mimkit.runs.keep_config`).
        recipe: one line on which recipe the configuration came from and why, for the summary.
        auto_size: for images at most half the crop, apply `mimkit.eval.seg_sizing.seg_size_hint`.

    Returns:
        The results (or, when interrupted, the training loop's summary).
    """
    with open_run(run_dir, force_config) as run:
        return _segment(config, run, recipe, auto_size)


def _applied(config: SegmentConfig, settings: dict) -> SegmentConfig:
    """``config`` with dotted ``settings`` applied, as ``--set`` would."""
    overrides = parse_overrides([f"{k}={v}" for k, v in settings.items()])
    return from_dict(SegmentConfig, merge(to_dict(config), overrides))


def _summary(config: SegmentConfig, encoder: Encoder, facts: SegDataFacts, plan: RunPlan, recipe: str,
             hint: dict | None, auto_size: bool, labels_note: str) -> list[str]:
    """The start-up summary: one short line per subject (the runner adds how it computes:
    `mimkit.runner.engine_line`)."""
    seg, data = config.seg, config.data
    names = ", ".join(seg.classes[:8]) + (", ..." if seg.num_classes > 8 else "")
    width, height = facts.median
    lines = [f"data      {data.source}: {facts.train_images} train images ({100 * config.labels.fraction:g}% "
             f"used), {facts.val_images} val images evaluated; median {width}x{height} px, "
             f"{data.channels} channel{'s' if data.channels > 1 else ''}",
             f"masks     {facts.describe_masks()}",
             f"classes   {seg.num_classes}: {names}"]
    lines += [f"hint      {labels_note}"] if labels_note else []
    lines += [f"recipe    {recipe}"] if recipe else []
    grid = seg.crop_size // encoder.spec.model.patch_size
    head = (f"UperNet {seg.channels or encoder.model.embed_dim} wide, auxiliary {seg.aux_channels}"
            if seg.head == "upernet" else "BatchNorm + 1x1 convolution")
    stride = f" stride {seg.eval_stride or seg.crop_size}" if seg.eval_mode == "slide" else ""
    evaluation = seg.eval_mode + stride
    evaluation += " + flip" if seg.eval_flip else ""
    evaluation += f" at scales {seg.eval_scales}" if seg.eval_scales else ""
    lines += [f"model     {seg.head} on {seg.init} {encoder.spec.model.name} ({encoder.spec.method}), crop "
              f"{seg.crop_size} px ({grid}x{grid} patches), base scale {seg.scale[0]}x{seg.scale[1]} x "
              f"{seg.ratio_range[0]:g}-{seg.ratio_range[1]:g}; {head}; drop path {seg.drop_path}; eval "
              f"{evaluation}",
              f"run       {plan.describe()}, layer decay {config.optim.layer_decay}"]
    if hint and not auto_size:
        fit = " ".join(f"--set '{k}={v}'" if isinstance(v, list) else f"--set {k}={v}"
                       for k, v in hint.items())
        why = (f"images (median {width}x{height}) are much smaller than the {seg.crop_size} px crop"
               if "seg.crop_size" in hint else f"a {seg.crop_size} px crop")
        lines.append(f"hint      {why}: --auto-size fits the run to them ({fit})")
    elif auto_size:
        fitted = " ".join(f"{k}={v}" for k, v in hint.items()) if hint else "nothing: the images fit the crop"
        lines.append(f"auto-size {fitted}")
    return lines


def _segment(config: SegmentConfig, run: OpenedRun, recipe: str, auto_size: bool) -> dict:
    start = time.perf_counter()
    world = run.world
    seg, data = config.seg, config.data
    encoder = load_encoder(config.encoder, seg.init, seed=config.train.seed)
    channels = encoder.spec.data.channels
    source = build_seg_source(data.source, "train", root=data.root, num_classes=seg.num_classes,
                              channels=channels, class_list=seg.class_names or None,
                              max_image_pixels=data.max_image_pixels)
    val_set = build_seg_source(data.source, "val", root=data.root, num_classes=source.num_classes,
                               channels=channels, class_list=source.classes,
                               max_image_pixels=data.max_image_pixels)
    if config.eval_images:
        val_set = Subset(val_set, range(min(config.eval_images, len(val_set))))
    facts = survey_seg_data(source, val_set)  # a bad mask stops the run here, before training
    train_set = Subset(source, label_subset([0] * len(source), config.labels.fraction, config.labels.seed))
    crop = seg.crop_size or encoder.spec.data.img_size
    hint = seg_size_hint(facts, crop, encoder.spec.model.patch_size, encoder.model.embed_dim,
                         config.train.batch_size, len(train_set))
    if auto_size and hint:
        config = _applied(config, hint)
    config = resolve_segment(config, encoder, source)
    seg, data, train_cfg, optim = config.seg, config.data, config.train, config.optim

    torch.manual_seed(train_cfg.seed)  # the heads' initialization, the same on every rank
    model = build_segmenter(config, encoder.model).to(world.device)
    if world.size > 1 and world.device.type == "cuda":  # BatchNorm over the global batch, as the papers
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # (CPU processes keep their own statistics)

    def loss_fn(model: Segmenter, batch: dict):
        return segmentation_loss(model, batch["image"], batch["mask"], seg.aux_weight)

    workers = data_workers(data.num_workers)
    eval_view = SegEvalView(seg.eval_scale, data.mean, data.std)
    own_part = Subset(val_set, range(world.rank, len(val_set), world.size))  # matrices summed over ranks
    val_loader = eval_loader(own_part, eval_view, config.eval_batch_size, workers)
    last: dict = {}

    def evaluate(model: Segmenter) -> dict:
        last["scores"] = evaluate_segmentation(model, val_loader, world.device, seg.num_classes,
                                               seg.crop_size, seg.eval_mode, seg.eval_stride, seg.eval_flip,
                                               seg.classes, scales=seg.eval_scales)
        model.train()
        results = {f"val_{k}": last["scores"][k] for k in SCORES}
        if world.is_main:
            logger.info("  ".join(f"{k} {v:.2f}" for k, v in results.items()))
        return results

    plan = plan_run(len(train_set), world.size, train_cfg, optim, lr_schedule=poly_schedule)
    view = SegTrainView(seg.crop_size, seg.scale, data.mean, data.std, seg.ratio_range, seg.cat_max_ratio,
                        photometric=seg.photometric)
    labels_note = label_hint(facts, seg.num_classes)
    lines = _summary(config, encoder, facts, plan, recipe, hint, auto_size, labels_note)
    job = Job("segment", config, model, loss_fn, SeededViews(train_set, view),
              optimizer_groups(model, optim.weight_decay, optim.layer_decay), optim.betas, plan, workers,
              data.num_workers, "segment", lines, checkpointed=model.encoder,
              evaluation=Evaluation(evaluate, config.eval_every, keep_best="val_mIoU"))
    summary = run_job(run, job)
    if summary["interrupted"]:
        return summary
    if "scores" not in last:  # the run had already finished: score its weights once more (every rank)
        evaluate(model)
    if not world.is_main:
        return summary
    scores = last["scores"]
    best = run.checkpoints.best() or {"value": None, "step": None}  # no mIoU yet (no class present)
    results = {
        "protocol": "segment", "encoder": encoder.origin, "init": seg.init, "head": seg.head,
        "frozen_encoder": seg.freeze_encoder, "data": data.source, "label_fraction": config.labels.fraction,
        "seed": config.labels.seed, "train_images": len(train_set), "val_images": len(val_set),
        "crop_size": seg.crop_size, "eval": {"mode": seg.eval_mode, "stride": seg.eval_stride,
                                             "flip": seg.eval_flip, "scales": seg.eval_scales},
        "steps": summary["step"], "epochs": round(summary["step"] / plan.steps_per_epoch, 2),
        **{k: scores[k] for k in SCORES}, "best_val_mIoU": best["value"], "best_step": best["step"],
        "per_class": scores["per_class"], "wall_s": round(time.perf_counter() - start, 1),
    }
    write_segmentation_results(run.dir, results, scores)
    logger.info(format_table(scores))
    return results


register_kind(Kind("segment", SegmentConfig, "mimkit segment RUN: a pretrained encoder with UperNet (or a "
                   "linear head) for semantic segmentation",
                   spec=lambda config: read_config(config.encoder_config),
                   load=load_segmenter, visualize=visualize_segmentation, predict=predict_label_maps,
                   picture="seg.png"))
