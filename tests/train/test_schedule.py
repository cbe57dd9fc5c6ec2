"""Per-step values: warmup, then cosine or polynomial decay that ends exactly on its final value; the run plan
that makes them from a configuration; and the lr the loop sets at the last step."""

import math

import pytest
import torch
from torch import nn

from mimkit.config import OptimConfig, TrainConfig
from mimkit.data.loader import SeededViews
from mimkit.errors import MimkitError
from mimkit.train.distributed import World
from mimkit.train.loop import LoopOptions, train
from mimkit.train.metrics_log import read_metrics
from mimkit.train.optim import build_adamw
from mimkit.train.schedule import Schedule, cosine_schedule, epoch_steps, plan_run, poly_schedule
from tests.conftest import Points, noisy_view, regression_loss, run_records


def test_cosine_decay_by_hand():
    # t = 0, 1/4, 1/2, 3/4, 1 after one warmup step from 0.5
    values = cosine_schedule(1.0, 0.2, 6, warmup_steps=1, start_warmup_value=0.5)
    half = [0.5 * (1 + math.cos(math.pi * t)) for t in (0, 0.25, 0.5, 0.75, 1)]
    assert values == pytest.approx([0.5] + [0.2 + 0.8 * h for h in half])


@pytest.mark.parametrize("schedule", [cosine_schedule, poly_schedule])
@pytest.mark.parametrize("total, warmup", [(10, 3), (7, 0), (3, 1)])
def test_the_last_step_is_exactly_the_final_value(schedule, total, warmup):
    values = schedule(2.0, 0.125, total, warmup)
    assert len(values) == total
    assert values[-1] == 0.125  # exactly: the decay's t reaches 1 on the last step
    assert values[warmup] == 2.0  # and starts at the peak right after warmup
    assert all(a > b for a, b in zip(values[warmup:], values[warmup + 1:], strict=False))


@pytest.mark.parametrize("schedule", [cosine_schedule, poly_schedule])
def test_the_plan_ends_on_min_lr_after_its_warmup(schedule):
    # 64 images, 2 processes x 4 x 2 accumulation steps: 4 optimizer steps an epoch, 3 epochs
    plan = plan_run(64, 2, TrainConfig(epochs=3, batch_size=4, accum_steps=2),
                    OptimConfig(base_lr=0.128, min_lr=1e-3, warmup_epochs=1.0), lr_schedule=schedule)
    lr = plan.schedule.lr
    assert (plan.steps_per_epoch, plan.global_batch, plan.schedule.total_steps) == (4, 16, 12)
    assert plan.lr == pytest.approx(0.128 * 16 / 256)
    assert lr[:5] == pytest.approx([0.0, plan.lr / 4, plan.lr / 2, 3 * plan.lr / 4, plan.lr])
    assert lr[-1] == 1e-3 and len(lr) == 12
    short = plan_run(64, 1, TrainConfig(max_steps=5, batch_size=8), OptimConfig(min_lr=1e-5, warmup_epochs=0),
                     lr_schedule=schedule)
    assert short.schedule.lr[-1] == 1e-5 and len(short.schedule.lr) == 5


def test_the_plan_rounds_a_fractional_warmup_and_carries_the_clipping():
    # 30 images in batches of 10: 3 steps an epoch, so half an epoch of warmup is 1.5 steps, rounded to 2
    plan = plan_run(30, 1, TrainConfig(epochs=2, batch_size=10),
                    OptimConfig(base_lr=0.256, warmup_epochs=0.5, clip_grad=1.5))
    assert plan.warmup_steps == 2 and plan.schedule.lr[:3] == pytest.approx([0.0, 0.005, 0.01])
    assert plan.schedule.clip_grad == 1.5


def test_poly_decay_and_a_warmup_from_a_start_value_by_hand():
    assert poly_schedule(1.0, 0.0, 5, power=2.0) == pytest.approx([1.0, 0.5625, 0.25, 0.0625, 0.0])
    assert cosine_schedule(1.0, 0.0, 3) == pytest.approx([1.0, 0.5, 0.0])  # no warmup unless asked
    assert cosine_schedule(1.0, 0.0, 3, warmup_steps=5) == pytest.approx([0, 1 / 3, 2 / 3])  # cut to the run
    assert cosine_schedule(1.0, 0.0, 6, warmup_steps=2, start_warmup_value=0.5)[:3] == pytest.approx(
        [0.5, 0.75, 1.0])


def test_an_epoch_is_its_whole_global_batches():
    assert epoch_steps(16, 8, 2) == 1 and epoch_steps(31, 8, 2) == 1  # exactly one, and a dropped remainder
    assert epoch_steps(8, 1, 1) == 8  # a batch of one image is a batch
    for images, batch, accum in ((15, 8, 2), (8, 0, 1), (8, 4, 0)):
        with pytest.raises(MimkitError):
            epoch_steps(images, batch, accum)


@pytest.mark.parametrize("warmup_epochs, max_steps, shown", [
    (0.2, None, "20 steps (2.00 epochs), global batch 10, lr 3.91e-04, warmup 2 steps"),  # a tenth: no flag
    (0.3, None, "warmup 3 steps (!) more than a tenth of the run"),
    (1.0, 5, "5 steps (0.50 epochs), global batch 10, lr 3.91e-04, warmup 5 steps (!)"),  # capped at the run
])
def test_the_plans_summary_line(warmup_epochs, max_steps, shown):
    plan = plan_run(100, 1, TrainConfig(epochs=2, max_steps=max_steps, batch_size=10),
                    OptimConfig(base_lr=0.01, warmup_epochs=warmup_epochs))
    assert shown in plan.describe()
    assert ("(!)" in plan.describe()) == ("(!)" in shown)


def test_the_loop_sets_each_steps_lr_the_last_one_included(tmp_path):
    """The optimizer's groups hold the last step's lr (times each group's scale) when the run ends, and the
    log shows every step's."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = build_adamw([{"params": [model.weight], "lr_scale": 0.5}, {"params": [model.bias]}])
    lr = cosine_schedule(1e-2, 1e-3, 6, 2)
    train(model, regression_loss, SeededViews(Points(), noisy_view), optimizer, Schedule(6, lr),
          World(rank=0, size=1, device=torch.device("cpu")), LoopOptions(batch_size=8, log_every=1),
          **run_records(tmp_path))
    assert [g["lr"] for g in optimizer.param_groups] == [0.5e-3, 1e-3]
    assert [r["lr"] for r in read_metrics(tmp_path) if "loss" in r] == lr
