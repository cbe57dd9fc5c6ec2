"""The training loop's parts: what one optimizer step logs of its micro-batches, and how often it waits for
the device, and how often it all-reduces the gradients."""

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from mimkit.data.loader import SeededViews
from mimkit.train import step as step_module
from mimkit.train.distributed import World
from mimkit.train.loop import LoopOptions, train
from mimkit.train.metrics_log import read_metrics
from mimkit.train.optim import build_adamw, param_groups
from mimkit.train.schedule import Schedule
from mimkit.train.step import NonFiniteLoss, OptimizerStep
from tests.conftest import Points, noisy_view, regression_loss, run_records

CPU = World(rank=0, size=1, device=torch.device("cpu"))


def run(tmp_path, loss_fn, total_steps=2, accum_steps=2, log_every=1):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    schedule = Schedule(total_steps, [0.1] * total_steps, accum_steps)
    train(model, loss_fn, SeededViews(Points(), noisy_view), build_adamw(param_groups(model, 0)), schedule,
          CPU, LoopOptions(batch_size=8 // accum_steps, log_every=log_every), **run_records(tmp_path))
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


@pytest.fixture
def group_of_one():
    """A gloo process group of one process on an in-memory store: DDP without a second process or a port."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_gradients_are_all_reduced_once_per_optimizer_step_under_accumulation(group_of_one):
    """DDP syncs on the last of the accum_steps micro-batches only (``no_sync`` on the others), and what it
    all-reduces then is the step's whole gradient: the mean over its micro-batches. The step believes in 2
    processes (so it wraps the model in DDP); the group has one, so the all-reduce keeps what it is given."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    reference = nn.Linear(4, 1)
    reference.load_state_dict(model.state_dict())
    world = World(rank=0, size=2, device=torch.device("cpu"))
    step = OptimizerStep(model, regression_loss, build_adamw(param_groups(model, 0)),
                         Schedule(2, [0.1, 0.1], accum_steps=3), world, last_checkpoint=lambda: None)
    assert isinstance(step.forward, DistributedDataParallel)
    reduced = []

    def counting_allreduce(state, bucket):
        reduced.append(bucket.buffer().clone())
        return default_hooks.allreduce_hook(state, bucket)

    step.forward.register_comm_hook(None, counting_allreduce)
    batches = [{"image": torch.randn(2, 4), "label": torch.tensor([0, 1])} for _ in range(6)]
    step(0, iter(batches[:3]))
    assert len(reduced) == 1  # one bucket (a Linear's 5 numbers), once: not once per micro-batch
    sum(regression_loss(reference, b)[0] for b in batches[:3]).div(3).backward()
    whole = torch.cat([reference.weight.grad.flatten(), reference.bias.grad])
    torch.testing.assert_close(reduced[0].sort().values, whole.sort().values)  # bucket order is DDP's own
    step(1, iter(batches[3:]))
    assert len(reduced) == 2


@pytest.mark.parametrize("accum_steps, clip_grad", [(1, None), (3, None), (1, 1e-3), (3, 1e-3)])
def test_a_step_moves_by_the_mean_gradient_of_its_micro_batches_clipped_when_asked(accum_steps, clip_grad):
    """Under plain SGD at lr 1 the update is the gradient itself: the mean over the micro-batches (not their
    sum), scaled down to ``clip_grad`` in norm when set; the norm returned is the one before clipping."""
    torch.manual_seed(0)
    model, reference = nn.Linear(4, 1), nn.Linear(4, 1)
    reference.load_state_dict(model.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    step = OptimizerStep(model, regression_loss, torch.optim.SGD(model.parameters(), lr=0.0),
                         Schedule(1, [1.0], accum_steps, clip_grad), CPU, last_checkpoint=lambda: None)
    batches = [{"image": torch.randn(2, 4), "label": torch.tensor([0, 1])} for _ in range(accum_steps)]
    values = step(0, iter(batches))
    sum(regression_loss(reference, b)[0] for b in batches).div(accum_steps).backward()
    gradient = torch.cat([p.grad.flatten() for p in reference.parameters()])
    torch.testing.assert_close(values["grad_norm"], gradient.norm())
    if clip_grad is not None:
        gradient = gradient * clip_grad / gradient.norm()
    moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters(), strict=True)])
    torch.testing.assert_close(moved, gradient)
    assert all(p.grad is None for p in model.parameters())  # nothing carried into the next step


BATCH = {"image": torch.randn(2, 4), "label": torch.tensor([0, 1])}


def one_step(model, loss_fn=regression_loss, world=CPU, last_checkpoint=None) -> OptimizerStep:
    """An `OptimizerStep` of one step at lr 0.1 under AdamW."""
    return OptimizerStep(model, loss_fn, build_adamw(param_groups(model, 0)), Schedule(1, [0.1]), world,
                         last_checkpoint=lambda: last_checkpoint)


@pytest.mark.parametrize("flags, message", [([True, False], "another process's loss is not finite at step 1"),
                                            ([False, True], "gradient norm is")])
def test_a_process_whose_values_are_finite_stops_with_the_others_and_says_why(monkeypatch, flags, message):
    """Every process stops when any one's loss or gradient norm is not finite (`any_rank_each`, here as if
    another process had reported it); this one names the other's loss, not its own finite one."""
    monkeypatch.setattr(step_module, "any_rank_each", lambda values, world: flags)
    model = nn.Linear(4, 1)
    before = model.weight.detach().clone()
    with pytest.raises(NonFiniteLoss, match=f"{message}.*last checkpoint: step 7"):
        one_step(model, last_checkpoint=7)(0, iter([BATCH]))
    assert torch.equal(model.weight, before)


def test_a_gpu_step_runs_under_bf16_autocast_and_a_cpu_step_in_float32():
    """The precision the engine line announces (`mimkit.train.loop.describe_engine`): bf16 autocast on a GPU
    (float16 would need a gradient scaler), none on a CPU."""
    dtypes = []

    def recording_loss(model, batch):
        loss, metrics = regression_loss(model, batch)
        dtypes.append(model(batch["image"]).dtype)
        return loss, metrics

    one_step(nn.Linear(4, 1), recording_loss)(0, iter([BATCH]))
    assert dtypes == [torch.float32]
    with warnings.catch_warnings():  # "CUDA is not available": on a machine without a GPU, only made
        warnings.simplefilter("ignore")
        on_gpu = one_step(nn.Linear(4, 1), world=World(rank=0, size=1, device=torch.device("cuda", 0)))
    assert on_gpu.autocast.device == "cuda" and on_gpu.autocast.fast_dtype == torch.bfloat16
