"""One optimizer step: set the lr, run ``accum_steps`` micro-batches forward (under bf16 autocast on a GPU)
and backward (gradients synced across processes on the last one only), take the gradient norm (clipping it
when asked), stop *before* the update when a loss or the norm is not finite on any process, update.

Nothing here waits for the device but the one finiteness check a step needs: the loss and the metrics stay
on the device, averaged over the micro-batches, until someone logs them.
"""

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mimkit.errors import MimkitError
from mimkit.train.distributed import World, any_rank_each
from mimkit.train.schedule import Schedule

LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, dict]]


class NonFiniteLoss(MimkitError):
    """The loss or the gradient norm became NaN or infinite (the optimizer step was not taken), or the
    weights did (they were not saved)."""


class _Forward(nn.Module):
    """Binds a loss function to the model so DDP sees one ``forward``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict):
        return self.loss_fn(self.model, batch)


def _grad_norm(model: nn.Module, clip_grad: float | None) -> torch.Tensor:
    """The total norm of the gradients (before clipping them to ``clip_grad``, when it is set)."""
    if clip_grad is None:
        return nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return nn.utils.clip_grad_norm_(model.parameters(), clip_grad)


def _detached(value):
    return value.detach().float() if torch.is_tensor(value) else value


class OptimizerStep:
    """Takes optimizer steps on ``model`` as ``schedule`` says (with DDP when ``world`` has several ranks).

    Args:
        model: already on ``world.device``.
        loss_fn: ``(model, batch) -> (loss, metrics)``; batch tensors are on the device, with the step's
            scheduled values (`Schedule.values`) under their names.
        optimizer: groups may carry ``lr_scale`` (layer-wise decay), applied on top of ``schedule.lr``.
        last_checkpoint: the step a stopped run can go on from, named in the error that stops it.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
                 schedule: Schedule, world: World, last_checkpoint: Callable[[], int | None]):
        self.model, self.optimizer, self.schedule, self.world = model, optimizer, schedule, world
        self.last_checkpoint = last_checkpoint
        self.forward = _Forward(model, loss_fn)
        if world.size > 1:
            self.forward = DistributedDataParallel(
                self.forward, device_ids=[world.device.index] if world.device.type == "cuda" else None)
        self.autocast = torch.autocast(world.device.type, dtype=torch.bfloat16,
                                       enabled=world.device.type == "cuda")

    def __call__(self, step: int, micro_batches: Iterator[dict]) -> dict:
        """Optimizer step ``step + 1`` from the next ``accum_steps`` micro-batches.

        Returns:
            ``{"loss", "lr", **scheduled values, **metrics, "grad_norm"}``: the loss and the metrics are the
            means over the micro-batches, tensors left on the device.

        Raises:
            NonFiniteLoss: the loss or the gradient norm is not finite on some process; the weights and the
                optimizer are as they were before this step.
        """
        lr = self.schedule.lr[step]
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        values = {name: per_step[step] for name, per_step in self.schedule.values.items()}
        loss, metrics = self._forward_backward(micro_batches, values)
        grad_norm = _grad_norm(self.model, self.schedule.clip_grad)
        self._stop_unless_finite(loss, grad_norm, step + 1)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "lr": lr, **values, **metrics, "grad_norm": grad_norm}

    def _forward_backward(self, micro_batches: Iterator[dict], values: dict) -> tuple[torch.Tensor, dict]:
        """Accumulate the gradients of ``accum_steps`` micro-batches; their mean loss and metrics."""
        accum_steps = self.schedule.accum_steps
        loss_sum, metric_sums = 0.0, {}
        for micro in range(accum_steps):
            batch = {k: v.to(self.world.device, non_blocking=True) for k, v in next(micro_batches).items()}
            batch |= values
            sync = micro == accum_steps - 1 or self.world.size == 1
            with contextlib.nullcontext() if sync else self.forward.no_sync():
                with self.autocast:
                    loss, metrics = self.forward(batch)
                (loss / accum_steps).backward()
            loss_sum = loss_sum + loss.detach().float()
            for name, value in metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + _detached(value)
        return loss_sum / accum_steps, {name: total / accum_steps for name, total in metric_sums.items()}

    def _stop_unless_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> None:
        """One all-reduce and one wait for the device: every process stops together, before the update."""
        loss_bad, norm_bad = any_rank_each(torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm)]),
                                           self.world)
        if loss_bad:
            local = loss.item()
            what = f"loss is {local}" if not math.isfinite(local) else "another process's loss is not finite"
        elif norm_bad:
            what = f"gradient norm is {grad_norm.item()}"
        else:
            return
        raise NonFiniteLoss(f"{what} at step {step}; stopped before the optimizer step (last checkpoint: "
                            f"step {self.last_checkpoint()})")
