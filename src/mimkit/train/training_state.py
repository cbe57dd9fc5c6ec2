"""The training state the loop saves and resumes from (`Checkpointer`): the weights (never non-finite ones),
the optimizer, the step, every process's RNG state, and the number of processes and the global batch the run
was trained with, kept in the run's `Checkpoints` (the files: `mimkit.train.checkpoint_files`)."""

import logging
import math

import torch
from torch import nn

from mimkit.errors import MimkitError
from mimkit.train.checkpoint_files import Checkpoints
from mimkit.train.distributed import World, gather_objects
from mimkit.train.step import NonFiniteLoss

logger = logging.getLogger(__name__)


def _rng_state(world: World) -> dict:
    cuda = torch.cuda.get_rng_state(world.device) if world.device.type == "cuda" else torch.empty(0)
    return {"cpu": gather_objects(torch.get_rng_state(), world), "cuda": gather_objects(cuda, world)}


def _restore_rng(state: dict, world: World) -> None:
    rank = world.rank if world.rank < len(state["cpu"]) else 0
    torch.set_rng_state(state["cpu"][rank])
    if world.device.type == "cuda" and state["cuda"][rank].numel():
        torch.cuda.set_rng_state(state["cuda"][rank], world.device)


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


class Checkpointer:
    """Saves and resumes one run's training (every process calls each method; the main one writes).

    Args:
        checkpoints: the run's checkpoints; what a killed save left among them is removed.
        model: what is saved; already on ``world.device``.
        global_batch: images per optimizer step over all processes, recorded with each checkpoint.
        keep_last: checkpoints kept (`Checkpoints.keeping`).
    """

    def __init__(self, checkpoints: Checkpoints, model: nn.Module, optimizer: torch.optim.Optimizer,
                 world: World, global_batch: int, keep_last: int = 2):
        self.model, self.optimizer, self.world = model, optimizer, world
        self.global_batch = global_batch
        self.files = checkpoints.keeping(keep_last)
        if world.is_main:
            self.files.clean()

    def latest(self) -> int | None:
        """The step of the newest checkpoint, or None."""
        return self.files.latest()

    def resume(self, force: bool = False) -> int | None:
        """Load the newest checkpoint that reads: weights, and (unless it is an import, which holds weights
        only) the optimizer and the RNG states.

        Args:
            force: resume a checkpoint trained by another number of processes or with another global batch
                (refused otherwise).

        Returns:
            The step it resumed from, or None when the run has no checkpoint.
        """
        state = self.files.resume(self.model)
        if state is None:
            return None
        _check_resumable(state, self.world, self.global_batch, force)
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
            _restore_rng(state["rng"], self.world)
        step = state["step"]
        if self.world.is_main:
            logger.info(f"resuming from step {step} ({self.files.weights_path(step)})")
        return step

    def save(self, step: int) -> None:
        """Checkpoint the run after optimizer step ``step``."""
        self._check_finite_weights(step)
        state = {"optimizer": self.optimizer.state_dict(), "step": step, "rng": _rng_state(self.world),
                 "world_size": self.world.size, "global_batch": self.global_batch}
        if self.world.is_main:
            self.files.save(step, self.model, state)

    def best_value(self) -> float:
        """The value of the kept best weights' metric (`save_best`), or -inf."""
        best = self.files.best()
        return best["value"] if best else -math.inf

    def save_best(self, step: int, metric: str, value: float) -> None:
        """Keep the weights of step ``step`` as the best by ``metric`` (`Checkpoints.save_best`)."""
        self._check_finite_weights(step)
        if self.world.is_main:
            self.files.save_best(step, self.model, metric, value)

    def _check_finite_weights(self, step: int) -> None:
        """Refuse to save weights that are NaN or infinite: a checkpoint must be one a run can go on from."""
        for name, param in self.model.named_parameters():
            if not torch.isfinite(param.detach()).all():
                raise NonFiniteLoss(f"weight '{name}' is not finite after step {step}; not saved (last "
                                    f"checkpoint: step {self.latest()}); lower the lr or set optim.clip_grad")
