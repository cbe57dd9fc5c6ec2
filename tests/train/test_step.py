"""The training loop's parts: what one optimizer step logs of its micro-batches, and how often it waits for
the device."""

import pytest
import torch
from torch import nn

from mimkit.data.loader import SeededViews
from mimkit.train import step as step_module
from mimkit.train.distributed import World
from mimkit.train.loop import LoopOptions, train
from mimkit.train.metrics import read_metrics
from mimkit.train.optim import build_adamw, param_groups
from mimkit.train.schedule import Schedule
from tests.conftest import Points, noisy_view, regression_loss

CPU = World(rank=0, size=1, device=torch.device("cpu"))


def run(tmp_path, loss_fn, total_steps=2, accum_steps=2, log_every=1):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    schedule = Schedule(total_steps, [0.1] * total_steps, accum_steps)
    train(model, loss_fn, SeededViews(Points(), noisy_view), build_adamw(param_groups(model, 0)), schedule,
          tmp_path, CPU, LoopOptions(batch_size=8 // accum_steps, log_every=log_every))
    return [r for r in read_metrics(tmp_path) if "loss" in r]


def test_the_log_averages_the_loss_and_metrics_of_every_micro_batch(tmp_path):
    losses = []

    def numbered(model, batch, calls=[0]):  # noqa: B006 - a counter across calls
        calls[0] += 1
        loss, metrics = regression_loss(model, batch)
        losses.append(loss.item())
        return loss, {**metrics, "call": torch.tensor(calls[0]), "half_call": calls[0] / 2}

    records = run(tmp_path, numbered)
    assert [r["call"] for r in records] == [1.5, 3.5]  # not the last micro-batch's 2 and 4
    assert [r["half_call"] for r in records] == [0.75, 1.75]
    assert [r["loss"] for r in records] == pytest.approx([sum(losses[:2]) / 2, sum(losses[2:]) / 2])


def test_one_finiteness_check_per_optimizer_step_whatever_the_accumulation(tmp_path, monkeypatch):
    """The only wait for the device between two records: one check of the loss and the gradient norm per
    optimizer step, not one per micro-batch."""
    checks, check = [], step_module.any_rank_each

    def counted(flags, world):
        checks.append(flags.tolist())
        return check(flags, world)

    monkeypatch.setattr(step_module, "any_rank_each", counted)
    records = run(tmp_path, regression_loss, total_steps=3, accum_steps=4, log_every=100)
    assert checks == [[False, False]] * 3
    assert [r["step"] for r in records] == [3]  # logged at the last step only
