"""The one training loop, shared by pretraining, tokenizer training and fine-tuning.

Per optimizer step: set the lr from a per-iteration schedule, run ``accum_steps``
micro-batches (gradient sync only on the last under DDP), stop on a non-finite loss or gradient norm
*before* the optimizer step, clip, step, log, and checkpoint (never non-finite weights). Ctrl-C or
SIGTERM finishes the current step, saves a checkpoint and returns; running the same command again
resumes from it.
"""

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mimkit.data.loader import EpochBatches, SeededViews, build_loader, workers_end_with_errors
from mimkit.errors import MimkitError
from mimkit.train.checkpoint import Checkpoints
from mimkit.train.distributed import World, any_rank, gather_objects
from mimkit.train.metrics import MetricsLog, drop_records_after

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, dict]]


class NonFiniteLoss(MimkitError):
    """The loss or the gradient norm became NaN or infinite (the optimizer step was not taken), or the
    weights did (they were not saved)."""


@dataclass
class Schedule:
    """What the loop needs to know about the length of the run and its per-step values."""

    total_steps: int
    lr: list[float]
    accum_steps: int = 1
    clip_grad: float | None = None
    values: dict[str, list[float]] = field(default_factory=dict)  # more per-step values, e.g. a temperature;
    # the loss function finds each in the batch under its name


class _Step(nn.Module):
    """Binds a loss function to the model so DDP sees one ``forward``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict):
        return self.loss_fn(self.model, batch)


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between optimizer steps."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _rng_state(world: World) -> dict:
    cuda = torch.cuda.get_rng_state(world.device) if world.device.type == "cuda" else torch.empty(0)
    return {"cpu": gather_objects(torch.get_rng_state(), world), "cuda": gather_objects(cuda, world)}


def _restore_rng(state: dict, world: World) -> None:
    rank = world.rank if world.rank < len(state["cpu"]) else 0
    torch.set_rng_state(state["cpu"][rank])
    if world.device.type == "cuda" and state["cuda"][rank].numel():
        torch.cuda.set_rng_state(state["cuda"][rank], world.device)


def _scalar(value) -> float:
    return value.detach().float().item() if torch.is_tensor(value) else float(value)


def _check_resumable(state: dict, world: World, global_batch: int, force: bool) -> None:
    """Refuse to resume a checkpoint trained by another number of processes or with another global batch:
    the lr, the batches and the position in the data would all change without a word."""
    then = (state.get("world_size", world.size), state.get("global_batch", global_batch))
    if then == (world.size, global_batch):
        return
    message = (f"checkpoint step {state['step']} was trained by {then[0]} process(es) with global batch "
               f"{then[1]}; this run has {world.size} with global batch {global_batch}")
    if not force:
        raise MimkitError(f"{message}: resume it as it was trained, or pass --force-config to change it")
    if world.is_main:
        logger.warning(f"--force-config: {message}")


def _grad_norm(model: nn.Module, clip_grad: float | None) -> torch.Tensor:
    """The total norm of the gradients (before clipping them to ``clip_grad``, when it is set)."""
    if clip_grad is None:
        return nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return nn.utils.clip_grad_norm_(model.parameters(), clip_grad)


def _check_finite_weights(model: nn.Module, step: int, last_saved: int | None) -> None:
    """Refuse to save weights that are NaN or infinite: a checkpoint must be one a run can go on from."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param.detach()).all():
            raise NonFiniteLoss(f"weight '{name}' is not finite after step {step}; not saved (last "
                                f"checkpoint: step {last_saved}); lower the lr or set optim.clip_grad")


def epoch_steps(num_samples: int, global_micro_batch: int, accum_steps: int) -> int:
    """Optimizer steps in one epoch (incomplete batches are dropped)."""
    if global_micro_batch < 1 or accum_steps < 1:
        raise MimkitError(f"batch {global_micro_batch} with {accum_steps} accumulation steps: both must be "
                          "at least 1")
    steps = num_samples // global_micro_batch // accum_steps
    if steps == 0:
        raise MimkitError(f"the data has {num_samples} images, fewer than one global batch of "
                          f"{global_micro_batch * accum_steps}; lower train.batch_size")
    return steps


def train(model: nn.Module, loss_fn: LossFn, dataset: SeededViews, optimizer: torch.optim.Optimizer,
          schedule: Schedule, run_dir: str | Path, world: World, *, batch_size: int, seed: int = 0,
          num_workers: int = 0, checkpoint_every: int = 500, keep_last: int = 2, log_every: int = 10,
          evaluate: Callable[[nn.Module], dict] | None = None, evaluate_every: int | None = None,
          keep_best: str | None = None, after_step: Callable[[int], None] | None = None,
          force_resume: bool = False, desc: str = "train") -> dict:
    """Train ``model`` to ``schedule.total_steps`` optimizer steps, resuming from ``run_dir`` if it
    holds a checkpoint.

    Args:
        model: what is checkpointed; already on ``world.device``.
        loss_fn: ``(model, batch) -> (loss, metrics)``; batch tensors are on the device.
        dataset: items addressed by `EpochBatches`.
        optimizer: groups may carry ``lr_scale`` (layer-wise decay), applied on top of ``schedule.lr``.
        schedule: run length, per-step lr, accumulation and clipping.
        run_dir: checkpoints and ``metrics.jsonl`` go here.
        world: process group description (`mimkit.train.distributed.init_world`).
        batch_size: per-process micro-batch.
        seed: data order, augmentation and mask seed.
        evaluate: called on the model every ``evaluate_every`` optimizer steps (default: at every epoch
            end) and at the end; its numbers are logged.
        keep_best: a key of ``evaluate``'s results; the weights where it was highest are kept as
            as the best weights (`Checkpoints.save_best`).
        after_step: called with the new step number after each optimizer step (e.g. a model EMA update).
        force_resume: resume a checkpoint trained by another number of processes or with another global
            batch (refused otherwise).

    Returns:
        ``{"step", "interrupted", "resumed_from", **last evaluation}``.
    """
    if world.is_main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(run_dir, keep_last)
    log = MetricsLog(run_dir, enabled=world.is_main)
    batches = EpochBatches(len(dataset), batch_size, seed, world.rank, world.size)
    steps_per_epoch = epoch_steps(len(dataset), batch_size * world.size, schedule.accum_steps)
    loader = build_loader(dataset, batches, num_workers)
    evaluate_every = evaluate_every or steps_per_epoch
    best = checkpoints.best()
    best_value = best["value"] if best else -math.inf

    images_per_step = batch_size * world.size * schedule.accum_steps
    if world.is_main:
        checkpoints.clean()  # what a killed save left
    step, resumed_from = 0, None
    state = checkpoints.resume(model)
    if state is not None:
        resumed_from = state["step"]
        _check_resumable(state, world, images_per_step, force_resume)
        if "optimizer" in state:  # an imported checkpoint holds weights only: fresh optimizer and RNG
            optimizer.load_state_dict(state["optimizer"])
            _restore_rng(state["rng"], world)
        step = state["step"]
        if world.is_main:
            drop_records_after(run_dir, step)
            logger.info(f"resuming from step {step} ({checkpoints.weights_path(step)})")

    step_module = _Step(model, loss_fn)
    if world.size > 1:
        step_module = DistributedDataParallel(
            step_module, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    autocast = torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=world.device.type == "cuda")

    def save(at: int) -> None:
        _check_finite_weights(model, at, checkpoints.latest())
        state = {"optimizer": optimizer.state_dict(), "step": at, "rng": _rng_state(world),
                 "world_size": world.size, "global_batch": images_per_step}
        if world.is_main:
            checkpoints.save(at, model, state)

    def run_evaluation(at: int, epoch: float) -> dict:
        nonlocal best_value
        results = evaluate(model) if evaluate else {}
        if results:
            log.write(at, epoch=epoch, **results)
        if keep_best and results[keep_best] > best_value:
            best_value = results[keep_best]
            _check_finite_weights(model, at, checkpoints.latest())
            if world.is_main:
                checkpoints.save_best(at, model, keep_best, best_value)
        return results

    model.train()
    results: dict = {}
    bar = tqdm(total=schedule.total_steps, initial=step, desc=desc, disable=not world.is_main,
               dynamic_ncols=True, unit="step")
    last_log, last_log_step = time.perf_counter(), step
    interrupted = False
    with _StopRequest() as stop, bar, workers_end_with_errors(loader):
        while step < schedule.total_steps and not interrupted:
            epoch, first = divmod(step, steps_per_epoch)
            batches.set_position(epoch, first * schedule.accum_steps)
            micro_batches = iter(loader)
            for _ in range(first, steps_per_epoch):
                lr = schedule.lr[step]
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                total_loss, metrics = 0.0, {}
                step_values = {name: values[step] for name, values in schedule.values.items()}
                for micro in range(schedule.accum_steps):
                    batch = {k: v.to(world.device, non_blocking=True) for k, v in next(micro_batches).items()}
                    batch |= step_values
                    sync = micro == schedule.accum_steps - 1 or world.size == 1
                    with contextlib.nullcontext() if sync else step_module.no_sync(), autocast:
                        loss, metrics = step_module(batch)
                    if any_rank(not torch.isfinite(loss.detach()).item(), world):
                        raise NonFiniteLoss(f"loss is {loss.item()} at step {step + 1}; stopped before the "
                                            f"optimizer step (last checkpoint: step {checkpoints.latest()})")
                    with contextlib.nullcontext() if sync else step_module.no_sync():
                        (loss / schedule.accum_steps).backward()
                    total_loss += loss.item() / schedule.accum_steps
                metrics["grad_norm"] = grad_norm = _grad_norm(model, schedule.clip_grad)
                if any_rank(not torch.isfinite(grad_norm).item(), world):
                    raise NonFiniteLoss(f"gradient norm is {grad_norm.item()} at step {step + 1}; stopped "
                                        "before the optimizer step (last checkpoint: step "
                                        f"{checkpoints.latest()})")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if after_step:
                    after_step(step)
                bar.update(1)

                if step % log_every == 0 or step == schedule.total_steps:
                    now = time.perf_counter()
                    speed = (step - last_log_step) * images_per_step / (now - last_log)
                    last_log, last_log_step = now, step
                    record = {"loss": total_loss, "lr": lr, "images_per_s": speed, **step_values,
                              **{k: _scalar(v) for k, v in metrics.items()}}
                    log.write(step, epoch=step / steps_per_epoch, **record)
                    bar.set_postfix(loss=f"{total_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}")
                if step % evaluate_every == 0 or step == schedule.total_steps:
                    results = run_evaluation(step, step / steps_per_epoch)
                interrupted = any_rank(stop.requested, world)
                if interrupted or step == schedule.total_steps or step % checkpoint_every == 0:
                    save(step)
                if interrupted or step == schedule.total_steps:
                    break
    log.close()
    if interrupted and world.is_main:
        logger.info(f"interrupted: checkpoint saved at step {step} in {checkpoints.dir}; "
                    "run the same command again to resume")
    return {"step": step, "interrupted": interrupted, "resumed_from": resumed_from, **results}
