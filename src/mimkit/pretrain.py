"""Set up and run a pretraining job from a resolved configuration."""

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from mimkit.config import OptimConfig, PretrainConfig, TrainConfig
from mimkit.data.loader import SeededViews
from mimkit.data.sources import MAX_IMAGE_PIXELS, SourceInfo, build_source
from mimkit.errors import MimkitError
from mimkit.methods import METHODS
from mimkit.runs import hold_run_dir, keep_config
from mimkit.train.distributed import World, init_world
from mimkit.train.loop import Schedule, epoch_steps, train
from mimkit.train.optim import build_adamw, param_groups
from mimkit.train.schedule import cosine_schedule


def resolve_data(config: PretrainConfig, info: SourceInfo) -> PretrainConfig:
    """Fill the data fields left to the source (size, channels, normalization)."""
    img_size = config.data.img_size or info.image_size
    if img_size is None:
        raise MimkitError("the images in this folder differ in size; set one with --set data.img_size=224")
    data = replace(config.data, img_size=img_size, channels=info.channels,
                   mean=config.data.mean or list(info.mean), std=config.data.std or list(info.std))
    return replace(config, data=data)


@dataclass(frozen=True)
class RunPlan:
    """How long a run is and how fast it learns, from its data size and configuration."""

    schedule: Schedule
    steps_per_epoch: int
    global_batch: int
    lr: float  # peak learning rate (after warmup)

    def describe(self) -> str:
        total = self.schedule.total_steps
        return (f"{total} steps ({total / self.steps_per_epoch:.2f} epochs), "
                f"global batch {self.global_batch}, lr {self.lr:.2e}")


def plan_run(num_samples: int, world_size: int, train_cfg: TrainConfig, optim_cfg: OptimConfig,
             values_fn=None, lr_schedule=cosine_schedule) -> RunPlan:
    """Length (``train.epochs`` or ``train.max_steps``), lr = base_lr × global batch / 256, warmup + decay.

    Args:
        values_fn: optional ``total_steps -> {name: per-step list}`` of more scheduled values.
        lr_schedule: the decay after warmup, ``(base, final, total_steps, warmup_steps) -> list``:
            `cosine_schedule` (default) or `mimkit.train.schedule.poly_schedule`.
    """
    global_batch = train_cfg.batch_size * world_size * train_cfg.accum_steps
    steps_per_epoch = epoch_steps(num_samples, train_cfg.batch_size * world_size, train_cfg.accum_steps)
    total_steps = train_cfg.epochs * steps_per_epoch if train_cfg.max_steps is None else train_cfg.max_steps
    lr = optim_cfg.base_lr * global_batch / 256
    warmup = round(optim_cfg.warmup_epochs * steps_per_epoch)
    values = values_fn(total_steps) if values_fn else {}
    schedule = Schedule(total_steps, lr_schedule(lr, optim_cfg.min_lr, total_steps, warmup),
                        train_cfg.accum_steps, optim_cfg.clip_grad, values)
    return RunPlan(schedule, steps_per_epoch, global_batch, lr)


def run_pretraining(config: PretrainConfig, run_dir: str | Path, force_config: bool = False) -> dict:
    """Pretrain ``config.method`` into ``run_dir`` (resuming when it holds a checkpoint), holding the run
    directory's lock meanwhile (`mimkit.runs.hold_run_dir`).

    Args:
        force_config: resume a trained run whose configuration, number of processes or global batch differ
            from this one's (otherwise refused; `mimkit.runs.keep_config`).

    Returns:
        The training loop's summary (final step, whether it was interrupted, where it resumed from).
    """
    world = init_world()
    with hold_run_dir(run_dir, enabled=world.is_main):
        return _pretrain(config, Path(run_dir), world, force_config)


def _pretrain(config: PretrainConfig, run_dir: Path, world: World, force_config: bool) -> dict:
    torch.manual_seed(config.train.seed)  # identical initial weights on every rank
    data = config.data
    # a large file is decoded at a reduced size that still gives every crop of the view its full detail
    source = build_source(data.source, split="train", root=data.root, channels=data.channels,
                          skip_bad_images=data.skip_bad_images, max_bad_images=data.max_bad_images,
                          max_image_pixels=data.max_image_pixels or MAX_IMAGE_PIXELS,
                          decode_min_side=3 * data.img_size if data.img_size else None)
    config = resolve_data(config, source.info)
    method = METHODS[config.method]
    if hasattr(method, "resolve_config"):  # fields left to something outside the run, e.g. a tokenizer
        config = method.resolve_config(config)
    model = method.build_model(config).to(world.device)
    if config.train.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise MimkitError(f"train.grad_checkpointing is not available for {config.method}; "
                              "it checkpoints ViT blocks (mae, beit, beitv2)")
        model.set_grad_checkpointing()
    view, loss_fn = method.build_task(config, model)
    # evaluated at each epoch end and at the end, e.g. a tokenizer's codebook usage on held-out images
    evaluate = method.build_evaluate(config, model) if hasattr(method, "build_evaluate") else None

    train_cfg, optim_cfg = config.train, config.optim
    # more values scheduled per step, e.g. the dVAE's Gumbel temperature
    values_fn = partial(method.schedule_values, config) if hasattr(method, "schedule_values") else None
    plan = plan_run(len(source), world.size, train_cfg, optim_cfg, values_fn)
    optimizer = build_adamw(param_groups(model, optim_cfg.weight_decay), optim_cfg.betas)

    if world.is_main:
        keep_config(run_dir, config, force_config)
        how = f" ({source.info.channels_note})" if source.info.channels_note else ""
        tqdm.write(f"{config.method} {config.model.name}: {len(source)} images, "
                   f"{config.data.channels} channel{'s' if config.data.channels > 1 else ''}{how}, "
                   f"{plan.describe()}")
    if train_cfg.compile:
        model.compile()
    return train(model, loss_fn, SeededViews(source, view), optimizer, plan.schedule, run_dir, world,
                 batch_size=train_cfg.batch_size, seed=train_cfg.seed, num_workers=data.num_workers,
                 checkpoint_every=train_cfg.checkpoint_every, keep_last=train_cfg.keep_last,
                 log_every=train_cfg.log_every, evaluate=evaluate, force_resume=force_config,
                 desc=f"pretrain {config.method}")
