"""The one training loop, shared by pretraining, tokenizer training, fine-tuning and segmentation.

It reads top to bottom as its parts: resume (`Checkpointer.resume`), then per optimizer step the step
itself (`OptimizerStep`: lr, accumulation, autocast, DDP, a stop on a non-finite loss or gradient norm
*before* the update, clipping), the log (`ProgressLog`), the evaluation with its best weights, and the
checkpoint (`Checkpointer.save`, never non-finite weights). Ctrl-C or SIGTERM finishes the current step,
saves a checkpoint and returns; during an evaluation it ends the evaluation at once (the step's checkpoint
is saved first). Running the same command again resumes from it.
"""

import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mimkit.config import TrainConfig
from mimkit.cpus import usable_cpus
from mimkit.data.loader import EpochBatches, SeededViews, build_loader, workers_end_with_errors
from mimkit.train.checkpoint_files import Checkpoints
from mimkit.train.distributed import World, any_rank
from mimkit.train.metrics_log import MetricsLog
from mimkit.train.progress import ProgressLog
from mimkit.train.schedule import Schedule, epoch_steps
from mimkit.train.step import LossFn, OptimizerStep
from mimkit.train.training_state import Checkpointer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopOptions:
    """How the loop feeds, logs and saves a run (its length and lr are its `Schedule`)."""

    batch_size: int  # per process and micro-batch
    seed: int = 0  # data order, augmentation and masks
    num_workers: int = 0  # data loader processes
    log_every: int = 10  # optimizer steps between metric records (the last step is always logged)
    checkpoint_every: int = 500  # optimizer steps between checkpoints (the last step is always saved)
    keep_last: int = 2  # checkpoints kept
    force_resume: bool = False  # resume a checkpoint of another number of processes or global batch
    desc: str = "train"  # the progress bar's label

    @classmethod
    def from_config(cls, train: TrainConfig, **options) -> "LoopOptions":
        """The options a run's ``train`` section sets, and ``options`` (the other fields)."""
        return cls(batch_size=train.batch_size, seed=train.seed, log_every=train.log_every,
                   checkpoint_every=train.checkpoint_every, keep_last=train.keep_last, **options)


@dataclass(frozen=True)
class Evaluation:
    """What the loop evaluates during a run, how often, and which weights it keeps as the best."""

    evaluate: Callable[[nn.Module], dict]  # model -> {name: number}; logged
    every: int | None = None  # optimizer steps; None: at every epoch end. Always at the last step too.
    keep_best: str | None = None  # a key of the results: the weights where it was highest are kept
    # (`mimkit.train.checkpoint_files.Checkpoints.save_best`)


def describe_engine(world: World, train_cfg: TrainConfig, workers: int, asked_workers: int) -> str:
    """One line on how a run computes: device, processes, precision, compile, gradient checkpointing, data
    workers and torch threads."""
    precision = "bf16 autocast" if world.device.type == "cuda" else "fp32"  # `OptimizerStep`'s rule
    return (f"{world.device.type}, {world.size} process{'es' if world.size > 1 else ''}, {precision}, "
            f"compile {'on' if train_cfg.compile else 'off'}, gradient checkpointing "
            f"{'on' if train_cfg.grad_checkpointing else 'off'}, {workers} data worker"
            f"{'' if workers == 1 else 's'} (asked {asked_workers}; this process may use {usable_cpus()} "
            f"CPUs), {torch.get_num_threads()} torch threads")


class _StopNow(Exception):
    """Raised by a stop request that arrives while an evaluation runs."""


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between optimizer steps; during an evaluation (`during`) it
    ends the evaluation at once instead (it changes no weight, and the checkpoint is saved before it)."""

    def __init__(self):
        self.requested = False
        self.immediate = False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        if self.immediate:
            raise _StopNow

    @contextlib.contextmanager
    def during(self):
        """Stop requests end the block (caught here) rather than wait for its end."""
        self.immediate = True
        try:
            yield
        except _StopNow:
            pass
        finally:
            self.immediate = False

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class _Evaluator:
    """Runs an `Evaluation` when it is due, logs it and keeps the best weights."""

    def __init__(self, evaluation: Evaluation, model: nn.Module, checkpointer: Checkpointer,
                 progress: ProgressLog, every: int, device: torch.device):
        self.evaluation, self.model, self.every, self.device = evaluation, model, every, device
        self.checkpointer, self.progress = checkpointer, progress
        self.best_value = checkpointer.best_value()

    def __call__(self, step: int, stop: "_StopRequest") -> dict | None:
        """Evaluate at ``step``; None when a stop request ended the evaluation (nothing logged or kept).

        The training's random stream is left as the evaluation found it (a data loader draws its seed from
        it), so a run resumed from the checkpoint saved before an evaluation continues exactly."""
        results = None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), stop.during():
            results = self.evaluation.evaluate(self.model)
        if results is None:
            return None
        if results:
            self.progress.evaluation(step, results)
        key = self.evaluation.keep_best
        if key and results[key] > self.best_value:
            self.best_value = results[key]
            self.checkpointer.save_best(step, key, self.best_value)
        return results


def train(model: nn.Module, loss_fn: LossFn, dataset: SeededViews, optimizer: torch.optim.Optimizer,
          schedule: Schedule, world: World, options: LoopOptions, *, checkpoints: Checkpoints,
          metrics: MetricsLog, evaluation: Evaluation | None = None,
          after_step: Callable[[int], None] | None = None) -> dict:
    """Train ``model`` to ``schedule.total_steps`` optimizer steps, resuming from the newest of
    ``checkpoints``.

    Args:
        model: what is checkpointed; already on ``world.device``.
        loss_fn: ``(model, batch) -> (loss, metrics)``; batch tensors are on the device. Both are averaged
            over the micro-batches of a step for the log.
        dataset: items addressed by `EpochBatches`.
        optimizer: groups may carry ``lr_scale`` (layer-wise decay), applied on top of ``schedule.lr``.
        schedule: run length, per-step lr and values, accumulation and clipping.
        world: process group description (`mimkit.train.distributed.init_world`).
        options: batches, logging, checkpoints.
        checkpoints: the run's checkpoints, saved and resumed from (in its existing directory).
        metrics: the run's records (enabled on the main process only).
        evaluation: what to evaluate during the run; its numbers are logged and returned.
        after_step: called with the new step number after each optimizer step (e.g. a model EMA update).

    Returns:
        ``{"step", "interrupted", "resumed_from", **last evaluation}``.
    """
    batches = EpochBatches(len(dataset), options.batch_size, options.seed, world.rank, world.size)
    steps_per_epoch = epoch_steps(len(dataset), options.batch_size * world.size, schedule.accum_steps)
    images_per_step = options.batch_size * world.size * schedule.accum_steps
    loader = build_loader(dataset, batches, options.num_workers, world.device)

    checkpointer = Checkpointer(checkpoints, model, optimizer, world, images_per_step, options.keep_last)
    resumed_from = checkpointer.resume(options.force_resume)
    step = resumed_from or 0
    take_step = OptimizerStep(model, loss_fn, optimizer, schedule, world, last_checkpoint=checkpointer.latest)
    progress = ProgressLog(metrics, world, total_steps=schedule.total_steps, start_step=step,
                           log_every=options.log_every, images_per_step=images_per_step,
                           steps_per_epoch=steps_per_epoch, desc=options.desc)
    evaluate = (_Evaluator(evaluation, model, checkpointer, progress, evaluation.every or steps_per_epoch,
                           world.device) if evaluation else None)

    model.train()
    results: dict = {}
    interrupted = False
    with _StopRequest() as stop, progress, workers_end_with_errors(loader):
        while step < schedule.total_steps and not interrupted:
            epoch, first = divmod(step, steps_per_epoch)
            batches.set_position(epoch, first * schedule.accum_steps)
            micro_batches = iter(loader)
            for _ in range(first, steps_per_epoch):
                values = take_step(step, micro_batches)
                step += 1
                if after_step:
                    after_step(step)
                progress.step(step, values)
                last = step == schedule.total_steps
                interrupted = any_rank(stop.requested, world)
                if interrupted or last or step % options.checkpoint_every == 0:
                    checkpointer.save(step)  # before the evaluation: a failing one loses no training
                if evaluate and not interrupted and (step % evaluate.every == 0 or last):
                    results = evaluate(step, stop) or results
                    interrupted = any_rank(stop.requested, world)
                    if interrupted and not (last or step % options.checkpoint_every == 0):
                        checkpointer.save(step)
                if interrupted or last:
                    break
    if interrupted and world.is_main:
        logger.info(f"interrupted: checkpoint saved at step {step} in {checkpointer.files.dir}; "
                    "run the same command again to resume")
    return {"step": step, "interrupted": interrupted, "resumed_from": resumed_from, **results}
