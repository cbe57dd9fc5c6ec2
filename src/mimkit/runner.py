"""The one runner of every training kind (pretraining, tokenizer, fine-tuning, segmentation, and any kind a
plug-in registers): a kind builds a `Job` from its configuration, and the runner gives every job every engine
feature the same way.

`open_run` opens the run directory once (`OpenedRun`: the process group, the held directory, its checkpoints
and metric records), and the kind builds its job inside it; the training loop is handed those parts, never the
directory's path. `run_job` then keeps the configuration (`mimkit.runs.keep_config`, ``--force-config``),
prints the start-up summary with its ``engine`` line, turns on gradient checkpointing and compilation as
``train`` asks, builds the optimizer, and hands the rest to the training loop (`mimkit.train.loop.train`: bf16
autocast on GPUs, SIGTERM and Ctrl-C, the stop on a non-finite loss, the best weights), whose summary it
returns.
"""

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mimkit.data.loader import SeededViews
from mimkit.errors import MimkitError
from mimkit.runs import HeldRun, hold_run_dir
from mimkit.train.checkpoint_files import Checkpoints
from mimkit.train.distributed import World, init_world
from mimkit.train.loop import Evaluation, LoopOptions, describe_engine, train
from mimkit.train.metrics_log import MetricsLog
from mimkit.train.optim import build_adamw
from mimkit.train.schedule import RunPlan
from mimkit.train.step import LossFn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenedRun:
    """A run directory opened for training by `open_run`, passed down to whatever reads or writes it.

    Attributes:
        held: the run directory (`mimkit.runs.HeldRun`); the main process holds its lock.
        world: the process group (`mimkit.train.distributed.init_world`).
        checkpoints: the run's checkpoints (the newest step tells whether it resumes).
        metrics: the run's metric records (``metrics.jsonl``; written by the main process only).
        force_config: resume a trained run although its configuration, number of processes or global batch
            differ from this one's (otherwise refused: `mimkit.runs.keep_config`).
    """

    held: HeldRun
    world: World
    checkpoints: Checkpoints
    metrics: MetricsLog
    force_config: bool = False

    @property
    def dir(self) -> Path:
        """The run directory."""
        return self.held.dir


@contextlib.contextmanager
def open_run(run_dir: str | Path, force_config: bool = False) -> Iterator[OpenedRun]:
    """Join the process group and hold ``run_dir``'s lock (main process; `mimkit.runs.hold_run_dir`) while
    the block runs."""
    world = init_world()
    with hold_run_dir(run_dir, enabled=world.is_main) as held:
        yield OpenedRun(held, world, Checkpoints(held.dir), MetricsLog(held.dir, enabled=world.is_main),
                        force_config)


@dataclass
class Job:
    """What a kind of run hands the runner: everything its training needs, built from its configuration.

    Attributes:
        kind: the run's kind (`mimkit.kinds`), saved at the head of its ``config.yaml``.
        config: the resolved configuration (its ``train`` section is a `mimkit.config.TrainConfig`).
        model: what is trained and checkpointed, on the world's device.
        loss_fn: ``(model, batch) -> (loss, metrics)``.
        dataset: the training images and their view.
        param_groups: the optimizer's groups (`mimkit.train.optim.param_groups`).
        betas: AdamW's betas.
        plan: length, lr schedule and accumulation (`mimkit.train.schedule.plan_run`).
        workers: data loader processes; ``asked_workers`` what the configuration asked for.
        desc: the progress bar's label.
        summary: the kind's lines of the start-up summary (the runner adds the ``engine`` line).
        checkpointed: the module whose ``set_grad_checkpointing()`` ``train.grad_checkpointing`` turns on
            (timm's encoders, mimkit's method models); None: the kind has none.
        evaluation: what the loop evaluates and which weights it keeps as the best; None: nothing.
        after_step: called with the step number after each optimizer step (a model EMA update).
        facts: the start-up summary as JSON-friendly facts, saved in the run
            (`mimkit.runs.HeldRun.save_data_facts`); None: none saved.
    """

    kind: str
    config: Any
    model: nn.Module
    loss_fn: LossFn
    dataset: SeededViews
    param_groups: list[dict]
    betas: tuple[float, float]
    plan: RunPlan
    workers: int
    asked_workers: int
    desc: str
    summary: list[str]
    checkpointed: nn.Module | None = None
    evaluation: Evaluation | None = None
    after_step: Callable[[int], None] | None = None
    facts: dict | None = None


def engine_line(run: OpenedRun, job: Job) -> str:
    """The start-up summary's line on how the job computes (`mimkit.train.loop.describe_engine`)."""
    return f"engine    {describe_engine(run.world, job.config.train, job.workers, job.asked_workers)}"


def run_job(run: OpenedRun, job: Job, report: Callable[[list[str]], None] | None = None) -> dict:
    """Train ``job`` in ``run`` to its end (or until interrupted), resuming from the run's newest checkpoint.

    Args:
        report: receives the start-up summary's lines (main process); None logs them (`logging`, logger
            ``mimkit.runner``).

    Returns:
        The training loop's summary (``step``, ``interrupted``, ``resumed_from``, the last evaluation).
    """
    train_cfg = job.config.train
    if train_cfg.grad_checkpointing:
        if not hasattr(job.checkpointed, "set_grad_checkpointing"):
            raise MimkitError(f"train.grad_checkpointing is not available for {job.desc}; it checkpoints ViT "
                              "blocks")
        job.checkpointed.set_grad_checkpointing()
    optimizer = build_adamw(job.param_groups, job.betas)
    if run.world.is_main:
        run.held.keep_config(job.config, job.kind, run.checkpoints.latest(), run.force_config)
        if job.facts is not None:
            run.held.save_data_facts(job.facts)
        (report or _log_lines)(job.summary + [engine_line(run, job)])
    if train_cfg.compile:
        job.model.compile()
    options = LoopOptions.from_config(train_cfg, num_workers=job.workers, force_resume=run.force_config,
                                      desc=job.desc)
    return train(job.model, job.loss_fn, job.dataset, optimizer, job.plan.schedule, run.world, options,
                 checkpoints=run.checkpoints, metrics=run.metrics, evaluation=job.evaluation,
                 after_step=job.after_step)


def _log_lines(lines: list[str]) -> None:
    for line in lines:
        logger.info(line)
