"""The training engine on a toy problem: schedules, parameter groups, the resumable loader, the loop."""

import signal

import pytest
import torch
from torch import nn

from mimkit.config import TrainConfig
from mimkit.data.loader import EpochBatches, SeededViews, sample_seed
from mimkit.errors import MimkitError
from mimkit.train.checkpoint_files import Checkpoints
from mimkit.train.distributed import World
from mimkit.train.loop import Evaluation, LoopOptions, describe_engine, train
from mimkit.train.metrics_log import read_metrics
from mimkit.train.optim import build_adamw, layer_id, param_groups
from mimkit.train.schedule import Schedule, cosine_schedule
from mimkit.train.step import NonFiniteLoss
from tests.conftest import Points, noisy_view, regression_loss, run_records

CPU = World(rank=0, size=1, device=torch.device("cpu"))


def toy_run(run_dir, total_steps=6, accum_steps=1, checkpoint_every=100, keep_last=2,
            loss_fn=regression_loss, **hooks):
    """A dropout MLP trained on `Points` (4 steps an epoch); ``hooks``: `train`'s evaluation, after_step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 1))  # dropout: global RNG
    optimizer = build_adamw(param_groups(model, 0.05))
    schedule = Schedule(total_steps, cosine_schedule(1e-2, 1e-4, total_steps, 2), accum_steps)
    options = LoopOptions(batch_size=8 // accum_steps, checkpoint_every=checkpoint_every, keep_last=keep_last,
                          log_every=1)
    summary = train(model, loss_fn, SeededViews(Points(), noisy_view), optimizer, schedule, CPU, options,
                    **run_records(run_dir), **hooks)
    return model, summary


def test_cosine_schedule_warms_up_then_decays():
    values = cosine_schedule(1.0, 0.1, total_steps=10, warmup_steps=4)
    assert len(values) == 10
    assert values[:4] == [0.0, 0.25, 0.5, 0.75]
    assert values[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False))
    assert values[-1] == pytest.approx(0.1)


def test_param_groups_skip_decay_on_biases_norms_and_tokens():
    from mimkit.models.vit import build_vit

    vit = build_vit("vit_mini", img_size=16, patch_size=8, in_chans=1, depth=2)
    groups = param_groups(vit, weight_decay=0.05)
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert {"cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.1.attn.qkv.bias"} <= no_decay
    assert "blocks.0.attn.qkv.weight" not in no_decay and "patch_embed.proj.weight" not in no_decay


def test_layer_ids_follow_depth():
    assert layer_id("encoder.cls_token", 12) == 0
    assert layer_id("encoder.patch_embed.proj.weight", 12) == 0
    assert layer_id("encoder.rel_pos_bias.relative_position_bias_table", 12) == 0  # BEiT's shared bias
    assert layer_id("encoder.blocks.0.attn.qkv.weight", 12) == 1
    assert layer_id("blocks.11.mlp.fc2.bias", 12) == 12
    assert layer_id("head.weight", 12) == 13


def test_epoch_batches_shard_one_global_batch():
    whole = [b for b in EpochBatches(32, 8, seed=3)]
    halves = [EpochBatches(32, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for b, (left, right) in enumerate(zip(*halves, strict=True)):
        assert left + right == whole[b]
    resumed = EpochBatches(32, 8, seed=3)
    resumed.set_position(0, 2)
    assert list(resumed) == whole[2:]
    next_epoch = EpochBatches(32, 8, seed=3)
    next_epoch.set_position(1, 0)
    assert list(next_epoch) != whole


def indices(batches) -> list[int]:
    return [index for batch in batches for index, _ in batch]


def test_each_epoch_visits_the_data_in_a_new_order_and_a_resume_repeats_it():
    """The order of the images (not only their augmentation seeds) changes from epoch to epoch; each epoch is
    a permutation of the data; an epoch started at a later batch continues the same permutation."""
    batches = EpochBatches(32, 8, seed=3)
    epochs = []
    for epoch in range(3):
        batches.set_position(epoch, 0)
        epochs.append(indices(batches))
    assert all(sorted(order) == list(range(32)) for order in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    resumed = EpochBatches(32, 8, seed=3)
    resumed.set_position(1, 2)
    assert indices(resumed) == epochs[1][16:]
    other_seed = EpochBatches(32, 8, seed=4)
    assert indices(other_seed) != epochs[0]


def test_every_sample_draws_its_own_augmentation_seed():
    """A sample's crop, flip and mask come from a seed of its own: no two positions of an epoch, nor of two
    epochs, share one (a seed per batch would give every image of a batch the same crop and mask)."""
    batches = EpochBatches(32, 8, seed=3)
    seeds = []
    for epoch in range(2):
        batches.set_position(epoch, 0)
        seeds += [seed for batch in batches for _, seed in batch]
    assert len(seeds) == len(set(seeds)) == 64


class Numbered(torch.utils.data.Dataset):
    """Item i is the image [i, 0, 0, 0] with label 0."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.tensor([i, 0, 0, 0], dtype=torch.uint8), 0


@pytest.mark.parametrize("seed", [0, 5])
def test_the_loop_reads_a_new_order_each_epoch(tmp_path, seed):
    """The order is the run seed's (`EpochBatches`), epoch after epoch."""
    seen = []

    def recording_loss(model, batch):
        seen.extend(batch["image"][:, 0].round().int().tolist())
        return regression_loss(model, batch)

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    train(model, recording_loss, SeededViews(Numbered(), lambda image: {"image": image.float()}),
          build_adamw(param_groups(model, 0)), Schedule(6, [0.1] * 6), CPU,
          LoopOptions(batch_size=4, seed=seed, log_every=100), **run_records(tmp_path))  # 1.5 epochs
    expected = EpochBatches(16, 4, seed=seed)
    first = indices(expected)
    expected.set_position(1, 0)
    assert seen == first + indices(expected)[:8]
    assert sorted(seen[:16]) == list(range(16)) and seen[16:] != first[:8]


def test_seeded_views_repeat_exactly():
    views = SeededViews(Points(), noisy_view)
    assert torch.equal(views[(3, 77)]["image"], views[(3, 77)]["image"])
    assert not torch.equal(views[(3, 77)]["image"], views[(3, 78)]["image"])


def test_loop_trains_logs_and_keeps_last_checkpoints(tmp_path):
    _, summary = toy_run(tmp_path, total_steps=8, checkpoint_every=2)
    assert summary["step"] == 8 and not summary["interrupted"]
    assert Checkpoints(tmp_path).steps() == [6, 8]
    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["loss"] < records[0]["loss"]
    assert {"lr", "images_per_s", "mean_pred", "epoch"} <= set(records[0])
    state = torch.load(Checkpoints(tmp_path).state_path(8), weights_only=True)
    assert state["step"] == 8


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_resume_mid_epoch_is_bitwise_identical(tmp_path, accum_steps):
    straight, _ = toy_run(tmp_path / "straight", total_steps=7, accum_steps=accum_steps)
    # saves steps 3, 6 and 7
    toy_run(tmp_path / "cut", total_steps=7, accum_steps=accum_steps, checkpoint_every=3, keep_last=3)
    checkpoints = Checkpoints(tmp_path / "cut")
    for step in (6, 7):  # as if killed just after step 3 (mid-epoch: 4 steps per epoch)
        checkpoints.weights_path(step).unlink(missing_ok=True)
        checkpoints.state_path(step).unlink(missing_ok=True)
    resumed, summary = toy_run(tmp_path / "cut", total_steps=7, accum_steps=accum_steps)
    assert summary["resumed_from"] == 3
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # the records logged after step 3 were forgotten and written again: each step once, the same losses
    losses = [[(r["step"], r["loss"]) for r in read_metrics(tmp_path / run)] for run in ("straight", "cut")]
    assert losses[1] == losses[0] and [step for step, _ in losses[1]] == list(range(1, 8))


def test_named_per_step_values_reach_the_loss_and_the_log(tmp_path):
    seen = []

    def loss_with_temperature(model, batch):
        seen.append(batch["temperature"])
        return regression_loss(model, batch)

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    schedule = Schedule(4, [0.1] * 4, values={"temperature": [1.0, 0.5, 0.25, 0.125]})
    optimizer = build_adamw(param_groups(model, 0))
    train(model, loss_with_temperature, SeededViews(Points(), noisy_view), optimizer, schedule, CPU,
          LoopOptions(batch_size=8, log_every=1), **run_records(tmp_path))
    assert seen == [1.0, 0.5, 0.25, 0.125]
    assert [r["temperature"] for r in read_metrics(tmp_path) if "loss" in r] == seen


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path):
    def explodes_at_third_call(model, batch, calls=[0]):  # noqa: B006 - a counter across calls
        calls[0] += 1
        loss, metrics = regression_loss(model, batch)
        return (loss * float("nan") if calls[0] == 3 else loss), metrics

    stopped = r"at step 3; stopped before the optimizer step \(last checkpoint: step 2\)"
    with pytest.raises(NonFiniteLoss, match=stopped):
        toy_run(tmp_path, loss_fn=explodes_at_third_call, checkpoint_every=1)
    assert Checkpoints(tmp_path).latest() == 2


def test_too_little_data_for_one_batch_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    with pytest.raises(MimkitError, match="fewer than one global batch"):
        train(model, regression_loss, SeededViews(Points(4), noisy_view), build_adamw(param_groups(model, 0)),
              Schedule(2, [0.1, 0.1]), CPU, LoopOptions(batch_size=8),
              **run_records(tmp_path))


def test_a_resumed_epoch_counts_only_the_batches_left():
    """After ``set_position(epoch, 3)`` an epoch of 5 batches has 2 left, as its length says (the
    DataLoader's length, and a progress bar's total, come from it)."""
    batches = EpochBatches(num_samples=10, batch_size=2, seed=0)
    batches.set_position(1, 3)
    assert len(batches) == 2 == len(list(batches))


def test_an_evaluation_runs_when_due_is_logged_and_keeps_the_first_best(tmp_path):
    """Every ``every`` steps and at the last step (here steps 2, 4, 5), its numbers logged and returned; the
    best weights are those of the first step that reached the highest value (a tie keeps the earlier); a
    resumed run compares with the kept best, not afresh."""
    scores = iter([1.0, 3.0, 3.0, 2.0])

    def evaluate(model):
        return {"score": next(scores)}

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    options = LoopOptions(batch_size=8, log_every=100)
    data, evaluation = SeededViews(Points(), noisy_view), Evaluation(evaluate, every=2, keep_best="score")
    summary = train(model, regression_loss, data, build_adamw(param_groups(model, 0)), Schedule(5, [0.1] * 5),
                    CPU, options, **run_records(tmp_path), evaluation=evaluation)
    assert summary == {"step": 5, "interrupted": False, "resumed_from": None, "score": 3.0}
    assert [(r["step"], r["score"]) for r in read_metrics(tmp_path) if "score" in r] == [(2, 1.0), (4, 3.0),
                                                                                          (5, 3.0)]
    assert Checkpoints(tmp_path).best() == {"step": 4, "metric": "score", "value": 3.0}
    train(model, regression_loss, data, build_adamw(param_groups(model, 0)), Schedule(6, [0.1] * 6), CPU,
          options, **run_records(tmp_path), evaluation=evaluation)
    assert Checkpoints(tmp_path).best()["step"] == 4  # 2.0 at step 6 is below the kept 3.0


def test_sample_seeds_never_repeat_across_run_seeds_epochs_and_positions():
    """Two runs of neighbouring --seed values must not see each other's augmentations an epoch apart."""
    seeds = {sample_seed(seed, epoch, position) for seed in range(5) for epoch in range(5)
             for position in range(40)}
    assert len(seeds) == 5 * 5 * 40


def signalling_at(call: int, signum: int = signal.SIGINT, times: int = 1, then=regression_loss):
    """``then``, that sends this process ``signum`` ``times`` during its ``call``-th call (Ctrl-C is SIGINT;
    Slurm and ``kill`` send SIGTERM)."""
    calls = [0]

    def function(*args):
        calls[0] += 1
        for _ in range(times if calls[0] == call else 0):
            signal.raise_signal(signum)
        return then(*args)
    return function


def constant_score(model):
    return {"score": 1.0}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_request_ends_the_run_after_its_step_with_a_checkpoint_and_the_run_resumes(tmp_path, signum,
                                                                                        caplog):
    """The step under way finishes, is saved (although no checkpoint is due) and the run returns, saying
    so; an evaluation before it (step 2) does not make the request raise inside the training step; the
    signal handlers are given back; the same call again resumes from that step."""
    before = signal.getsignal(signum)
    evaluation = Evaluation(constant_score, every=2)
    with caplog.at_level("INFO", logger="mimkit.train.loop"):
        _, summary = toy_run(tmp_path, loss_fn=signalling_at(3, signum), evaluation=evaluation)
    assert summary == {"step": 3, "interrupted": True, "resumed_from": None, "score": 1.0}
    assert Checkpoints(tmp_path).steps() == [3]
    assert "interrupted: checkpoint saved at step 3" in caplog.text
    assert signal.getsignal(signum) is before
    _, summary = toy_run(tmp_path, evaluation=evaluation)
    assert summary == {"step": 6, "interrupted": False, "resumed_from": 3, "score": 1.0}


def test_a_second_stop_request_stops_at_once(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        toy_run(tmp_path, loss_fn=signalling_at(2, times=2))
    assert Checkpoints(tmp_path).steps() == []
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("checkpoint_every, saved", [(100, [4]), (3, [3, 4])])
def test_a_stop_request_during_an_evaluation_ends_it_at_once_and_saves_the_step(tmp_path, checkpoint_every,
                                                                                 saved):
    """Nothing of the cut evaluation is logged, returned or kept as best; the step it followed (4) is
    saved although no checkpoint was due there."""
    evaluation = Evaluation(signalling_at(1, then=constant_score), every=4, keep_best="score")
    _, summary = toy_run(tmp_path, checkpoint_every=checkpoint_every, evaluation=evaluation)
    assert summary == {"step": 4, "interrupted": True, "resumed_from": None}
    assert Checkpoints(tmp_path).steps() == saved and Checkpoints(tmp_path).best() is None
    assert not [r for r in read_metrics(tmp_path) if "score" in r]


def test_an_evaluation_without_a_period_runs_at_each_epoch_end_and_leaves_the_training_as_it_was(tmp_path,
                                                                                                 caplog):
    """Every 4 steps (an epoch of `Points`) and at the last; its random draws do not shift the training's
    stream (dropout, augmentation): the weights are those of a run without it. It saves no checkpoint
    of its own."""
    steps = []

    def draws(model):
        steps.append(len(steps))
        torch.rand(100)
        return {"score": float(len(steps))}

    plain, _ = toy_run(tmp_path / "plain", total_steps=10)
    with caplog.at_level("INFO", logger="mimkit.train.loop"):
        evaluated, summary = toy_run(tmp_path / "evaluated", total_steps=10, evaluation=Evaluation(draws))
    assert [r["step"] for r in read_metrics(tmp_path / "evaluated") if "score" in r] == [4, 8, 10]
    assert Checkpoints(tmp_path / "evaluated").steps() == [10] and "interrupted" not in caplog.text
    assert summary["score"] == 3.0
    for (name, a), b in zip(plain.state_dict().items(), evaluated.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_after_step_is_called_with_each_new_step_number_before_its_checkpoint(tmp_path):
    calls = []
    toy_run(tmp_path, total_steps=5, checkpoint_every=2,
            after_step=lambda step: calls.append((step, Checkpoints(tmp_path).latest())))
    assert calls == [(1, None), (2, None), (3, 2), (4, 2), (5, 4)]


def test_loop_options_from_config_take_the_train_section():
    train_cfg = TrainConfig(batch_size=3, seed=7, log_every=5, checkpoint_every=11, keep_last=4)
    options = LoopOptions.from_config(train_cfg, num_workers=2, desc="pretrain")
    assert options == LoopOptions(batch_size=3, seed=7, num_workers=2, log_every=5, checkpoint_every=11,
                                  keep_last=4, desc="pretrain")


@pytest.mark.parametrize("device, size, workers, expected", [
    ("cpu", 1, 1, "cpu, 1 process, fp32, compile on, gradient checkpointing off, 1 data worker (asked 3;"),
    ("cuda", 2, 2, "cuda, 2 processes, bf16 autocast, compile on, gradient checkpointing off, 2 data workers "
                   "(asked 3;"),
    ("cpu", 1, 0, "cpu, 1 process, fp32, compile on, gradient checkpointing off, 0 data workers (asked 3;"),
])
def test_the_engine_line_names_device_processes_precision_and_workers(device, size, workers, expected):
    world = World(rank=0, size=size, device=torch.device(device))
    line = describe_engine(world, TrainConfig(compile=True), workers, asked_workers=3)
    assert line.startswith(expected)
    assert line.endswith(f"{torch.get_num_threads()} torch threads")
    assert "gradient checkpointing on" in describe_engine(world, TrainConfig(grad_checkpointing=True), 1, 1)


def test_the_loop_trains_in_train_mode_and_loads_in_the_asked_worker_processes(tmp_path):
    """A model handed over in eval mode (as loading leaves it) is trained in train mode; the views are made
    in ``num_workers`` data loader processes, not in the trainer."""
    modes, workers = [], []

    def recording_view(image):
        workers.append(torch.utils.data.get_worker_info() is not None)
        return noisy_view(image)

    def recording_loss(model, batch):
        modes.append(model.training)
        return regression_loss(model, batch)

    torch.manual_seed(0)
    model = nn.Linear(4, 1).eval()
    train(model, recording_loss, SeededViews(Points(), recording_view), build_adamw(param_groups(model, 0)),
          Schedule(2, [0.1] * 2), CPU, LoopOptions(batch_size=8, num_workers=1), **run_records(tmp_path))
    assert modes == [True, True]
    assert workers == []  # made in the worker: nothing recorded in this process


def test_non_finite_weights_are_never_kept_as_the_best(tmp_path):
    """An evaluation due where no checkpoint is (which would have refused them) keeps no NaN weights."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    schedule = Schedule(3, [float("inf")] * 3)  # finite loss and gradients, infinite weights
    evaluation = Evaluation(constant_score, every=1, keep_best="score")
    with pytest.raises(NonFiniteLoss, match="is not finite after step 1; not saved"):
        train(model, regression_loss, SeededViews(Points(), noisy_view), build_adamw(param_groups(model, 0)),
              schedule, CPU, LoopOptions(batch_size=8), **run_records(tmp_path), evaluation=evaluation)
    assert Checkpoints(tmp_path).best() is None and not Checkpoints(tmp_path).best_path.exists()
