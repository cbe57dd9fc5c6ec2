"""Fine-tuning: a pretrained encoder becomes a classifier, trained end to end by the one training loop.

The MAE/BEiT recipe: AdamW with layer-wise lr decay, drop path, RandAugment, random erasing, mixup +
cutmix with label smoothing, an optional EMA of the weights. Top-1/top-5 on the validation split
after every ``eval_every`` epochs; the best weights are kept beside the last ones. The test split is
read once, at the end.

- MAE: He et al., 2021, arXiv:2111.06377, appendix A.2
- BEiT: Bao et al., 2021, arXiv:2106.08254, appendix (layer-wise lr decay)

Registers the ``finetune`` run kind (`mimkit.kinds`): a fine-tuning run gives its classifier's encoder to the
other protocols, and predicts classes.
"""

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from mimkit.config import DataConfig, from_dict, to_dict
from mimkit.data.loader import SeededViews, eval_loader
from mimkit.data.source_info import SourceInfo
from mimkit.data.sources import build_source
from mimkit.data.transforms import eval_view
from mimkit.errors import MimkitError
from mimkit.eval.augment import FinetuneView, MixTargets
from mimkit.eval.config import FinetuneConfig
from mimkit.eval.predict import predict_classes
from mimkit.eval.scores import classification_accuracy, prefixed, write_results
from mimkit.eval.subsets import make_splits
from mimkit.kinds import Kind, register_kind
from mimkit.models.classifier import FineTuned, build_classifier
from mimkit.registry import read_config
from mimkit.runner import Job, OpenedRun, open_run, run_job
from mimkit.runs import Encoder, best_weights, load_encoder, random_encoder
from mimkit.train.checkpoint_files import load_weights
from mimkit.train.loop import Evaluation
from mimkit.train.optim import param_groups
from mimkit.train.schedule import plan_run

logger = logging.getLogger(__name__)


def finetuned_model(config: FinetuneConfig) -> FineTuned:
    """The (randomly initialized) module a fine-tuning run checkpoints, rebuilt from its configuration."""
    spec = read_config(config.encoder_config)
    classifier = build_classifier(random_encoder(spec), config.classifier.num_classes, config.classifier.pool,
                                  config.classifier.drop_path)
    return FineTuned(classifier, config.ema_decay)


def finetuned_encoder(config: FinetuneConfig, run_dir: Path, weights: Path | None) -> tuple[torch.nn.Module,
                                                                                           Path]:
    """A fine-tuning run's classifier (its encoder with the head), from ``weights``, else its best weights
    (else its newest): the EMA's when it kept one, the weights "best" chose."""
    model = finetuned_model(config)
    weights = weights or best_weights(run_dir)
    load_weights(model, weights)
    return (model.ema.module if config.ema_decay else model.classifier), weights


def read_finetune(values: dict) -> FinetuneConfig:
    """A saved fine-tuning configuration, to rebuild its model: the training augmentation does not shape it
    (and older runs name other fields of it: torchvision's rand_augment_ops, ...), so it is left out."""
    return from_dict(FinetuneConfig, {k: v for k, v in values.items() if k != "augment"})


def predict_with_classifier(config: FinetuneConfig, run_dir: Path, images: str, out: str, tta: str | None,
                            batch_size: int, force: bool) -> str:
    """``mimkit predict FINETUNERUN``: ``predictions.csv`` (`mimkit.eval.predict.predict_classes`)."""
    if tta:
        raise MimkitError("--tta is for segmentation runs; a classifier predicts each image once")
    return f"wrote {predict_classes(run_dir, images, out, force=force)}"


def resolve_finetune(config: FinetuneConfig, encoder: Encoder, info: SourceInfo) -> FinetuneConfig:
    """Fill what the encoder decides (input size, channels, normalization, its own configuration) and
    what the data decides (number of classes)."""
    spec = encoder.spec.data
    if config.data.img_size not in (None, spec.img_size):
        raise MimkitError(f"data.img_size={config.data.img_size} differs from the encoder's {spec.img_size}; "
                          "fine-tune at the pretraining size")
    data = replace(config.data, img_size=spec.img_size, channels=spec.channels,
                   mean=config.data.mean or spec.mean, std=config.data.std or spec.std)
    classifier = replace(config.classifier, num_classes=config.classifier.num_classes or info.num_classes)
    return replace(config, encoder_config=to_dict(encoder.spec), data=data, classifier=classifier)


def read_split(data: DataConfig, split: str, channels: int) -> Dataset:
    """``split`` of the run's data in ``channels``, unreadable images skipped as the run asks in every split
    (a folder's val/ and test/ read its train/ again, for its classes)."""
    return build_source(data.source, split, root=data.root, channels=channels,
                        skip_bad_images=data.skip_bad_images, max_bad_images=data.max_bad_images)


def same_images(a: Dataset, b: Dataset, probes: int = 8) -> bool:
    """Whether two sources hold the same images: equal length and labels, and equal images at a few
    spread-out positions (a data set without a validation split serves its test split for both)."""
    if len(a) != len(b) or not torch.equal(torch.as_tensor(a.labels), torch.as_tensor(b.labels)):
        return False
    return all(torch.equal(a[i][0], b[i][0]) for i in torch.linspace(0, len(a) - 1, probes).long().tolist())


def accuracies(model: FineTuned, loader, device: torch.device, split: str) -> dict:
    """``{split}_top1/top5`` of the classifier, and ``{split}_ema_top1/top5`` of its EMA when it keeps one."""
    results = prefixed(split, classification_accuracy(model.classifier, loader, device, split))
    if not isinstance(model.ema, torch.nn.Identity):
        ema = classification_accuracy(model.ema.module, loader, device, f"{split} ema")
        results |= prefixed(f"{split}_ema", ema)
    return results


def run_finetune(config: FinetuneConfig, run_dir: str | Path, force_config: bool = False) -> dict:
    """Fine-tune ``config.encoder`` on ``config.data`` into ``run_dir`` (resuming when it holds a checkpoint)
    with the one runner (`mimkit.runner`), holding the run directory's lock meanwhile.

    ``run_dir`` receives its configuration, ``metrics.jsonl``, ``checkpoints/`` (the last ones and the
    best weights) and, once training has finished, ``results.json``.

    Args:
        force_config: resume a trained run whose configuration, number of processes or global batch differ
            from this one's (otherwise refused; `mimkit.runs.keep_config`).

    Returns:
        The results (or, when interrupted, the training loop's summary).
    """
    with open_run(run_dir, force_config) as run:
        return _finetune(config, run)


def _finetune(config: FinetuneConfig, run: OpenedRun) -> dict:
    start = time.perf_counter()
    world = run.world
    encoder = load_encoder(config.encoder, config.classifier.init, seed=config.train.seed)
    data = config.data
    source = read_split(data, "train", encoder.spec.data.channels)
    config = resolve_finetune(config, encoder, source.info)
    data, labels, aug, cls = config.data, config.labels, config.augment, config.classifier
    splits = make_splits(source, labels.fraction, labels.val_fraction, labels.seed)
    train_set = Subset(source, splits.train)
    val_set = Subset(source, splits.val) if splits.val else read_split(data, "val", data.channels)
    test_set = read_split(data, "test", data.channels)
    val_is_test = not splits.val and same_images(val_set, test_set)
    test_view = eval_view(data.img_size, data.mean, data.std)

    torch.manual_seed(config.train.seed)  # the head's initialization, the same on every rank
    model = FineTuned(build_classifier(encoder.model, cls.num_classes, cls.pool, cls.drop_path),
                      config.ema_decay).to(world.device)
    mix = MixTargets(cls.num_classes, aug.mixup, aug.cutmix, aug.label_smoothing, aug.mixup_switch_prob,
                     aug.mixup_prob)

    def loss_fn(model: FineTuned, batch: dict):
        images, targets = mix(batch["image"], batch["label"])
        return F.cross_entropy(model(images), targets), {}

    val_loader = eval_loader(val_set, test_view, config.eval_batch_size, data.num_workers)

    def evaluate(model: FineTuned) -> dict:
        results = accuracies(model, val_loader, world.device, "val")
        model.train()
        if world.is_main:
            logger.info("  ".join(f"{k} {v:.2f}" for k, v in results.items()))
        return results

    optim = config.optim
    plan = plan_run(len(train_set), world.size, config.train, optim)
    steps_per_epoch = plan.steps_per_epoch
    groups = param_groups(model, optim.weight_decay, optim.layer_decay, len(model.classifier.blocks))
    best_metric = "val_ema_top1" if config.ema_decay else "val_top1"
    view = FinetuneView(data.img_size, data.mean, data.std, aug.crop_scale, aug.auto_augment, aug.reprob,
                        aug.remode)
    summary = [f"fine-tune {cls.init} {encoder.spec.model.name} on {data.source}: {len(train_set)} images "
               f"({labels.fraction:g} of the labels), {plan.describe()}, layer decay {optim.layer_decay}"]
    job = Job("finetune", config, model, loss_fn, SeededViews(train_set, view), groups, optim.betas, plan,
              data.num_workers, data.num_workers, "fine-tune", summary, checkpointed=model.classifier,
              evaluation=Evaluation(evaluate, config.eval_every * steps_per_epoch, keep_best=best_metric),
              after_step=model.update_ema if config.ema_decay else None)
    summary = run_job(run, job)
    if summary["interrupted"] or not world.is_main:
        return summary

    last = {k.removeprefix("val_"): v for k, v in summary.items() if k.startswith("val_")}
    test_loader = eval_loader(test_set, test_view, config.eval_batch_size, data.num_workers)
    # when the validation split is the test split, the last evaluation was the test number already
    final = (prefixed("test", last) if val_is_test and last
             else accuracies(model, test_loader, world.device, "test"))
    best = run.checkpoints.best()
    if splits.val:  # the best weights were chosen on held-out training images: their test number is fair
        chosen = finetuned_model(config)
        load_weights(chosen, run.checkpoints.best_path)
        picked = chosen.ema.module if config.ema_decay else chosen.classifier
        final |= prefixed("test_best", classification_accuracy(picked.to(world.device), test_loader,
                                                               world.device, "test best"))
    results = {
        "protocol": "finetune", "encoder": encoder.origin, "init": cls.init, "data": data.source,
        "pool": cls.pool, "label_fraction": labels.fraction, "val_fraction": labels.val_fraction,
        "seed": labels.seed, "train_images": len(train_set),
        "val_split": (f"{labels.val_fraction:g} of train, held out" if splits.val else
                      "the test split (no validation split: for watching only)" if val_is_test else
                      "the data's val split"),
        "steps": summary["step"], "epochs": round(summary["step"] / steps_per_epoch, 2),
        **{k: v for k, v in summary.items() if k.startswith("val")},
        f"best_{best_metric}": best["value"], "best_step": best["step"], **final,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    write_results(run.dir, results)
    logger.info("  ".join(f"{k} {v:.2f}" for k, v in final.items()))
    return results


register_kind(Kind("finetune", FinetuneConfig, "mimkit finetune RUN: a pretrained encoder fine-tuned into a "
                   "classifier", read=read_finetune, spec=lambda config: read_config(config.encoder_config),
                   encoder=finetuned_encoder, predict=predict_with_classifier))
