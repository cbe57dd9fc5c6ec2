"""The loop under DistributedDataParallel (2 gloo processes on CPU): gradient accumulation across
processes trains the model one process trains on the global batch, a 2-process run resumes
bit for bit, and a non-finite loss in one process stops both before the optimizer step."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mimkit.cli import leave_process_group
from mimkit.data.loader import SeededViews
from mimkit.train.checkpoint_files import Checkpoints
from mimkit.train.distributed import World
from mimkit.train.loop import LoopOptions, train
from mimkit.train.metrics_log import read_metrics
from mimkit.train.optim import build_adamw, param_groups
from mimkit.train.schedule import Schedule, cosine_schedule
from mimkit.train.step import NonFiniteLoss
from tests.conftest import Points, noisy_view, regression_loss, run_records


def toy_train(run_dir, world: World, *, batch_size: int, accum_steps: int = 1, total_steps: int = 6,
              checkpoint_every: int = 100, dropout: float = 0.0, rng_seed: int = 0,
              loss_fn=regression_loss) -> dict:
    """The engine's toy regression: the weights after ``total_steps`` (resuming from ``run_dir``).

    The global RNG (dropout's) is seeded with ``rng_seed`` after the model is built. Gradients are
    clipped at a norm they never reach, so that ``grad_norm`` is logged at every step.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 1))
    torch.manual_seed(rng_seed)
    optimizer = build_adamw(param_groups(model, 0.05))
    schedule = Schedule(total_steps, cosine_schedule(1e-2, 1e-4, total_steps, 2), accum_steps, clip_grad=1e3)
    train(model, loss_fn, SeededViews(Points(), noisy_view), optimizer, schedule, world,
          LoopOptions(batch_size=batch_size, checkpoint_every=checkpoint_every, keep_last=3, log_every=1),
          **run_records(run_dir, world.is_main))
    return {k: v.clone() for k, v in model.state_dict().items()}


def nan_at_call(n: int):
    calls = [0]

    def loss_fn(model, batch):
        calls[0] += 1
        loss, metrics = regression_loss(model, batch)
        return (loss * float("nan") if calls[0] == n else loss), metrics

    return loss_fn


def _worker(rank: int, tmp: str):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    torch.set_num_threads(1)
    world = World(rank=rank, size=2, device=torch.device("cpu"))
    results = {"accumulated": toy_train(f"{tmp}/accum", world, batch_size=2, accum_steps=2)}
    # dropout draws from each rank's own global RNG: the resume must restore every rank's own state
    rank_rng = dict(dropout=0.2, rng_seed=rank)
    results["straight"] = toy_train(f"{tmp}/straight", world, batch_size=4, total_steps=7, **rank_rng)
    toy_train(f"{tmp}/cut", world, batch_size=4, total_steps=7, checkpoint_every=3, **rank_rng)  # 3, 6, 7
    if world.is_main:  # as if killed just after step 3, mid-epoch (4 steps per epoch)
        checkpoints = Checkpoints(f"{tmp}/cut")
        for step in (6, 7):
            checkpoints.weights_path(step).unlink()
            checkpoints.state_path(step).unlink()
    dist.barrier()
    results["resumed"] = toy_train(f"{tmp}/cut", world, batch_size=4, total_steps=7, **rank_rng)
    try:  # rank 1's loss is NaN at step 2: both ranks stop before its optimizer step
        toy_train(f"{tmp}/nan", world, batch_size=4, checkpoint_every=1,
                  loss_fn=nan_at_call(2) if rank == 1 else regression_loss)
    except NonFiniteLoss as err:
        results["stopped"] = str(err)
    torch.save(results, f"{tmp}/rank{rank}.pt")
    leave_process_group()  # the DDP models of the runs above are freed first, as a command frees them


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp),), nprocs=2)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)], tmp


@pytest.mark.slow
def test_two_processes_accumulating_match_one_process_on_the_global_batch(two_ranks, tmp_path):
    """2 processes x batch 2 x 2 accumulation steps == 1 process x batch 8, on every rank: the weights
    and the gradient norm of every step (AdamW's update is blind to a gradient's scale; the norm is not)."""
    ranks, tmp = two_ranks
    one = toy_train(tmp_path, World(rank=0, size=1, device=torch.device("cpu")), batch_size=8)
    initial = toy_train(tmp_path / "none", World(rank=0, size=1, device=torch.device("cpu")), batch_size=8,
                        total_steps=0)
    for name, value in one.items():
        assert not torch.equal(value, initial[name]), name  # the comparison is of trained weights
        for rank in ranks:
            # the same sums in another order: float32 rounding, 3.0e-8 measured on this CPU
            torch.testing.assert_close(rank["accumulated"][name], value, rtol=0, atol=1e-7, msg=name)
    one_norms, two_norms = ([r["grad_norm"] for r in read_metrics(run) if "grad_norm" in r]
                            for run in (tmp_path, tmp / "accum"))
    assert len(one_norms) == 6 and two_norms == pytest.approx(one_norms, rel=1e-6)


@pytest.mark.slow
def test_two_process_run_resumes_bit_for_bit(two_ranks):
    ranks, tmp = two_ranks
    assert Checkpoints(tmp / "cut").steps() == [3, 7]
    for rank in ranks:
        for name, value in rank["straight"].items():
            assert torch.equal(rank["resumed"][name], value), name
    state = torch.load(Checkpoints(tmp / "cut").state_path(3), weights_only=True)
    assert len(state["rng"]["cpu"]) == 2  # each rank's RNG state is kept


@pytest.mark.slow
def test_a_non_finite_loss_in_one_process_stops_every_process_before_the_step(two_ranks):
    ranks, tmp = two_ranks
    assert ranks[1]["stopped"].startswith("loss is nan at step 2; stopped before the optimizer step")
    assert ranks[0]["stopped"].startswith("another process's loss is not finite at step 2")
    assert Checkpoints(tmp / "nan").steps() == [1]
