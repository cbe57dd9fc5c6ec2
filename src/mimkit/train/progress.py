"""What a training run shows and records as it goes: a progress bar, and every ``log_every`` optimizer steps
(and at the last) a record of the step's loss, metrics, lr and speed in the run's `MetricsLog`. Logging is
where the loop waits for the device to hand over its numbers; between records nothing is read back."""

import time

import torch
from tqdm import tqdm

from mimkit.train.distributed import World
from mimkit.train.metrics_log import MetricsLog


def _scalar(value) -> float:
    return value.detach().float().item() if torch.is_tensor(value) else float(value)


class ProgressLog:
    """The progress bar and the metric records of one run (records on the main process only); a context
    manager that closes both.

    Args:
        metrics: the run's records (enabled on the main process only).
        total_steps: the run's length in optimizer steps; the last one is always logged.
        start_step: where the run (re)starts; records logged past it are forgotten (they come again).
        images_per_step: images of one optimizer step over all processes, for the speed.
        steps_per_epoch: optimizer steps in one epoch, for the records' ``epoch``.
        desc: the progress bar's label.
    """

    def __init__(self, metrics: MetricsLog, world: World, *, total_steps: int, start_step: int,
                 log_every: int, images_per_step: int, steps_per_epoch: int, desc: str):
        self.metrics = metrics
        metrics.drop_after(start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, disable=not world.is_main,
                        dynamic_ncols=True, unit="step")
        self.total_steps, self.log_every = total_steps, log_every
        self.images_per_step, self.steps_per_epoch = images_per_step, steps_per_epoch
        self.last_time, self.last_step = time.perf_counter(), start_step

    def __enter__(self) -> "ProgressLog":
        self.last_time = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.metrics.close()

    def step(self, step: int, values: dict) -> None:
        """After optimizer step ``step``: advance the bar, and record ``values`` (numbers or tensors on the
        device, `mimkit.train.step.OptimizerStep`'s) when the step is due."""
        self.bar.update(1)
        if not self.metrics.enabled or step % self.log_every and step != self.total_steps:
            return
        now = time.perf_counter()
        speed = (step - self.last_step) * self.images_per_step / (now - self.last_time)
        self.last_time, self.last_step = now, step
        record = {name: _scalar(value) for name, value in values.items()} | {"images_per_s": speed}
        self.metrics.write(step, epoch=step / self.steps_per_epoch, **record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{speed:.0f}")

    def evaluation(self, step: int, results: dict) -> None:
        """Record an evaluation's ``results`` at ``step``."""
        self.metrics.write(step, epoch=step / self.steps_per_epoch, **results)
