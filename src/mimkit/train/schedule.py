"""How long a run is and what it sets at each optimizer step: its `Schedule` (planned from the data size
and the configuration by `plan_run`), and per-step values with linear warmup, then cosine or polynomial decay.

Values are computed once as an array indexed by the optimizer step, so a resumed run reads the same value at
the same step without replaying anything.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from mimkit.config import OptimConfig, TrainConfig
from mimkit.errors import MimkitError


def cosine_schedule(base_value: float, final_value: float, total_steps: int, warmup_steps: int = 0,
                    start_warmup_value: float = 0.0) -> list[float]:
    """Values for steps ``0 … total_steps-1``.

    Args:
        base_value: value reached at the end of warmup.
        final_value: value at the last step.
        total_steps: length of the schedule (optimizer steps, not micro-batches).
        warmup_steps: steps of linear ramp from ``start_warmup_value`` to ``base_value``.
        start_warmup_value: value at step 0 when there is a warmup.

    Returns:
        A list of ``total_steps`` floats.
    """
    return _warmup_then_decay(base_value, final_value, total_steps, warmup_steps, start_warmup_value,
                              lambda t: 0.5 * (1 + math.cos(math.pi * t)))


def poly_schedule(base_value: float, final_value: float, total_steps: int, warmup_steps: int = 0,
                  start_warmup_value: float = 0.0, power: float = 1.0) -> list[float]:
    """Values for steps ``0 … total_steps-1``: linear warmup, then
    ``final + (base - final) * (1 - t) ** power`` with ``t`` going from 0 to 1 over the remaining steps (the
    "poly" schedule of the segmentation recipes; power 1.0 is a linear decay).

    Args: as `cosine_schedule`, and
        power: exponent of the decay.

    Returns:
        A list of ``total_steps`` floats.
    """
    return _warmup_then_decay(base_value, final_value, total_steps, warmup_steps, start_warmup_value,
                              lambda t: (1 - t) ** power)


def _warmup_then_decay(base_value: float, final_value: float, total_steps: int, warmup_steps: int,
                       start_warmup_value: float, shape) -> list[float]:
    """Linear warmup, then ``final + (base - final) * shape(t)`` with ``t`` from 0 to 1 over the rest."""
    warmup_steps = min(warmup_steps, total_steps)
    warmup = [start_warmup_value + (base_value - start_warmup_value) * i / warmup_steps
              for i in range(warmup_steps)]
    decay_steps = total_steps - warmup_steps
    span = max(decay_steps - 1, 1)  # the last step lands on final_value
    return warmup + [final_value + (base_value - final_value) * shape(i / span) for i in range(decay_steps)]


WARMUP_SHARE_FLAGGED = 0.1  # a warmup longer than this share of a run is flagged in its summary


@dataclass
class Schedule:
    """What the loop needs to know about the length of the run and its per-step values."""

    total_steps: int
    lr: list[float]
    accum_steps: int = 1
    clip_grad: float | None = None
    values: dict[str, list[float]] = field(default_factory=dict)  # more per-step values, e.g. a temperature;
    # the loss function finds each in the batch under its name


@dataclass(frozen=True)
class RunPlan:
    """How long a run is and how fast it learns, from its data size and configuration."""

    schedule: Schedule
    steps_per_epoch: int
    global_batch: int
    lr: float  # peak learning rate (after warmup)
    warmup_steps: int = 0

    def describe(self) -> str:
        """One line: length, batch, lr and warmup, flagging a warmup longer than a tenth of the run (a long
        warmup on a short run never reaches the lr it plans)."""
        total = self.schedule.total_steps
        warmup = min(self.warmup_steps, total)
        flag = (f" (!) more than a tenth of the run: lower optim.warmup_epochs"
                if warmup > WARMUP_SHARE_FLAGGED * total else "")
        return (f"{total} steps ({total / self.steps_per_epoch:.2f} epochs), "
                f"global batch {self.global_batch}, lr {self.lr:.2e}, warmup {warmup} steps{flag}")


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


def plan_run(num_samples: int, world_size: int, train_cfg: TrainConfig, optim_cfg: OptimConfig,
             values_fn: Callable[[int], dict[str, list[float]]] | None = None,
             lr_schedule: Callable[..., list[float]] = cosine_schedule) -> RunPlan:
    """Length (``train.epochs`` or ``train.max_steps``), lr = base_lr × global batch / 256, warmup + decay.

    Args:
        values_fn: optional ``total_steps -> {name: per-step list}`` of more scheduled values.
        lr_schedule: the decay after warmup, ``(base, final, total_steps, warmup_steps) -> list``:
            `cosine_schedule` (default) or `poly_schedule`.
    """
    global_batch = train_cfg.batch_size * world_size * train_cfg.accum_steps
    steps_per_epoch = epoch_steps(num_samples, train_cfg.batch_size * world_size, train_cfg.accum_steps)
    total_steps = train_cfg.epochs * steps_per_epoch if train_cfg.max_steps is None else train_cfg.max_steps
    lr = optim_cfg.base_lr * global_batch / 256
    warmup = round(optim_cfg.warmup_epochs * steps_per_epoch)
    values = values_fn(total_steps) if values_fn else {}
    schedule = Schedule(total_steps, lr_schedule(lr, optim_cfg.min_lr, total_steps, warmup),
                        train_cfg.accum_steps, optim_cfg.clip_grad, values)
    return RunPlan(schedule, steps_per_epoch, global_batch, lr, warmup)
