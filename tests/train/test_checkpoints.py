"""A run's checkpoints: what a resume restores (`mimkit.train.training_state.Checkpointer`: the newest
checkpoint, each process's own random stream, on a CPU and a GPU, checkpoints older than the world size and
global batch records, imported weights without an optimizer, who warns about a forced resume and who cleans
up at start) and the files (`mimkit.train.checkpoint_files`: the room a save checks for, the best weights,
weights that do not fit in one line). The bit-for-bit resume of a run is `test_loop.py`'s; damaged, partial
and old-named checkpoints are `tests/test_reliability_data.py`'s."""

import math
import shutil
import types

import pytest
import torch
from torch import nn

from mimkit.errors import MimkitError
from mimkit.train.checkpoint_files import Checkpoints, load_weights
from mimkit.train.distributed import World
from mimkit.train.optim import build_adamw, param_groups
from mimkit.train.training_state import Checkpointer


def streams(n: int) -> list[torch.Tensor]:
    """``n`` different CPU RNG states."""
    states = []
    for seed in range(n):
        torch.manual_seed(100 + seed)
        states.append(torch.get_rng_state())
    return states


def saved_run(run_dir, **state) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A checkpoint at step 2 of a linear model whose state holds ``state`` (step and optimizer added)."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = build_adamw(param_groups(model, 0))
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    Checkpoints(run_dir).save(2, model, {"step": 2, "optimizer": optimizer.state_dict(), **state})
    return model, optimizer


def checkpointer(run_dir, rank=0, size=1, global_batch=8, device="cpu") -> Checkpointer:
    """Of a fresh model and optimizer, as process ``rank`` of ``size``."""
    model = nn.Linear(2, 1)
    world = World(rank=rank, size=size, device=torch.device(device))
    return Checkpointer(Checkpoints(run_dir), model, build_adamw(param_groups(model, 0)), world, global_batch)


def resume(run_dir, rank=0, size=1, global_batch=8, force=False) -> int | None:
    return checkpointer(run_dir, rank, size, global_batch).resume(force)


@pytest.mark.parametrize("rank, size, stream", [(0, 2, 0), (1, 2, 1), (2, 3, 0)],
                         ids=["rank 0", "rank 1", "a rank the run did not have"])
def test_each_process_resumes_its_own_random_stream(tmp_path, rank, size, stream):
    """Dropout, drop path and augmentation draw from it; a process the run did not have (a forced resume
    with more processes) takes the first process's."""
    saved = streams(2)
    saved_run(tmp_path, rng={"cpu": saved, "cuda": [torch.empty(0)] * 2}, world_size=2, global_batch=8)
    torch.manual_seed(7)
    assert resume(tmp_path, rank, size, force=size != 2) == 2
    assert torch.equal(torch.get_rng_state(), saved[stream])


def test_a_resume_loads_the_weights_and_the_optimizer(tmp_path):
    saved_model, saved_optimizer = saved_run(tmp_path, rng={"cpu": streams(1), "cuda": [torch.empty(0)]})
    resumed = checkpointer(tmp_path)
    assert resumed.resume() == 2
    assert torch.equal(resumed.model.weight, saved_model.weight)
    moments = [o.state_dict()["state"][0]["exp_avg"] for o in (resumed.optimizer, saved_optimizer)]
    assert torch.equal(*moments)


def test_a_checkpoint_older_than_its_world_records_resumes_as_it_is(tmp_path):
    """Checkpoints saved before the world size and global batch were recorded resume without a word."""
    saved_run(tmp_path, rng={"cpu": streams(1), "cuda": [torch.empty(0)]})
    assert resume(tmp_path, global_batch=16) == 2


def test_imported_weights_resume_with_a_fresh_optimizer_and_the_current_random_stream(tmp_path):
    """An import's step-0 state holds no optimizer and no RNG state: training starts from the weights."""
    torch.manual_seed(0)
    imported = nn.Linear(2, 1)
    Checkpoints(tmp_path).save(0, imported, {"step": 0, "source": "elsewhere"})
    resumed = checkpointer(tmp_path)
    expected = torch.get_rng_state()
    assert resumed.resume() == 0 and torch.equal(resumed.model.weight, imported.weight)
    assert resumed.optimizer.state_dict()["state"] == {}
    assert torch.equal(torch.get_rng_state(), expected)


def test_another_world_is_refused_unless_forced_and_the_main_process_warns(tmp_path, caplog):
    saved_run(tmp_path, rng={"cpu": streams(2), "cuda": [torch.empty(0)] * 2}, world_size=2, global_batch=8)
    refusal = ("trained by 2 process.es. with global batch 8; this run has 1 with global batch 4: resume it "
               "as it was trained, or pass --force-config")
    with pytest.raises(MimkitError, match=refusal):
        checkpointer(tmp_path, global_batch=4).resume()  # unforced by default
    with caplog.at_level("WARNING", logger="mimkit.train.training_state"):
        assert resume(tmp_path, rank=1, size=4, force=True) == 2
        assert not caplog.records
        assert resume(tmp_path, rank=0, size=4, force=True) == 2
    assert "--force-config: checkpoint step 2 was trained by 2" in caplog.text


def test_random_streams_cross_between_a_gpu_and_a_cpu(tmp_path, monkeypatch):
    """A checkpoint of a GPU run (a CUDA stream per process) resumes each process's CUDA stream on its GPU
    (`torch.cuda.set_rng_state`, recorded here), and on a CPU its CPU stream only; a CPU run saves no CUDA
    stream, which a GPU resume then leaves alone."""
    saved, cuda = streams(2), [torch.full((16,), rank, dtype=torch.uint8) for rank in range(2)]
    saved_run(tmp_path, rng={"cpu": saved, "cuda": cuda}, world_size=2, global_batch=8)
    set_on_gpu = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: set_on_gpu.append((state, device)))
    assert checkpointer(tmp_path, rank=1, size=2, device=torch.device("cuda", 1)).resume() == 2
    [(state, device)] = set_on_gpu
    assert torch.equal(state, cuda[1]) and device == torch.device("cuda", 1)
    assert resume(tmp_path, rank=1, size=2) == 2 and torch.equal(torch.get_rng_state(), saved[1])
    assert len(set_on_gpu) == 1
    checkpointer(tmp_path / "cpu").save(1)
    assert Checkpoints(tmp_path / "cpu").load_state(1)["rng"]["cuda"][0].numel() == 0


@pytest.mark.parametrize("other, reason", [
    (nn.Linear(3, 1), r"do not fit the model: .*size mismatch for weight"),
    (nn.Linear(2, 1, bias=False), r"do not fit the model: missing \[\], unexpected \['bias'\]"),
    (nn.Sequential(nn.Linear(2, 1)), r"do not fit the model: missing \['0.bias', '0.weight'\], unexpected "
                                     r"\['bias', 'weight'\]"),
], ids=["another shape", "a key too many", "other names"])
def test_weights_that_do_not_fit_the_model_are_a_one_line_error(tmp_path, other, reason):
    saved_run(tmp_path)
    with pytest.raises(MimkitError, match=reason) as refused:
        load_weights(other, Checkpoints(tmp_path).weights_path(2))
    assert "\n" not in str(refused.value) and "step-2.safetensors" in str(refused.value)


def test_the_main_process_removes_what_a_killed_save_left_when_it_starts(tmp_path):
    saved_run(tmp_path)
    leftovers = [tmp_path / "checkpoints" / name for name in ("step-4.pt", "step-4.safetensors.tmp")]
    for path in leftovers:
        path.write_bytes(b"half")
    checkpointer(tmp_path, rank=1, size=2)
    assert all(path.exists() for path in leftovers)  # another process's files are not its to touch
    checkpointer(tmp_path)
    assert not any(path.exists() for path in leftovers) and Checkpoints(tmp_path).steps() == [2]


def test_a_resume_takes_the_newest_checkpoint(tmp_path):
    store, model = Checkpoints(tmp_path, keep_last=3), nn.Linear(2, 1)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(step)
        store.save(step, model, {"step": step})
    resumed = nn.Linear(2, 1)
    assert store.resume(resumed)["step"] == 3 and torch.equal(resumed.weight, torch.full((1, 2), 3.0))


@pytest.mark.parametrize("free, saved", [(31, True), (30, False)])
def test_a_save_needs_the_room_its_tensors_take_or_writes_nothing(tmp_path, monkeypatch, free, saved):
    """The weights (a 2->1 linear layer: 3 float32, 12 bytes) and the state's tensors wherever they are nested
    (16 + 3 bytes here; the step and other plain values count for nothing)."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(free=free))
    state = {"step": 1, "optimizer": {"state": {0: {"exp_avg": torch.zeros(2, dtype=torch.float64)}}},
             "rng": [torch.zeros(3, dtype=torch.uint8), "plain"]}
    store = Checkpoints(tmp_path)
    if saved:
        store.save(1, nn.Linear(2, 1), state)
    else:
        with pytest.raises(MimkitError, match="the disk is full .checked before writing"):
            store.save(1, nn.Linear(2, 1), state)
    assert store.steps() == ([1] if saved else []) and len(list(store.dir.iterdir())) == 2 * saved


def test_the_best_weights_are_kept_with_their_step_metric_and_value_in_a_new_folder(tmp_path):
    store, model = Checkpoints(tmp_path / "new" / "run"), nn.Linear(2, 1)
    store.save_best(3, model, "val_top1", 0.5)
    assert store.best() == {"step": 3, "metric": "val_top1", "value": 0.5} and store.steps() == []
    kept = nn.Linear(2, 1)
    load_weights(kept, store.best_path)
    assert torch.equal(kept.weight, model.weight) and torch.equal(kept.bias, model.bias)


def test_when_no_checkpoint_loads_the_error_names_the_newest_ones_failure(tmp_path):
    store = Checkpoints(tmp_path)
    for step in (1, 2):
        store.save(step, nn.Linear(2, 1), {"step": step})
        store.weights_path(step).write_bytes(b"damaged")
    newest = r"none of the 2 checkpoints .*\(newest: cannot read weights '.*step-2\.safetensors'"
    with pytest.warns(UserWarning, match="skipping checkpoint"), pytest.raises(MimkitError, match=newest):
        store.resume(nn.Linear(2, 1))


def test_a_run_without_best_weights_has_no_best_value_yet(tmp_path):
    """Not 0: a metric that is never positive (a negated loss) must still keep its first value as the best."""
    assert checkpointer(tmp_path).best_value() == -math.inf


def test_checkpoints_are_ordered_by_step_number_not_as_text(tmp_path):
    """Steps 9, 10 and 100 (as text: 10, 100, 9): the newest is 100 and pruning to two keeps 10 and 100."""
    store, model = Checkpoints(tmp_path, keep_last=2), nn.Linear(2, 1)
    for step in (9, 10, 100):
        store.save(step, model, {"step": step})
    assert store.steps() == [10, 100] and store.latest() == 100


def test_a_skipped_checkpoints_warning_points_at_the_caller_of_resume(tmp_path):
    store = Checkpoints(tmp_path, keep_last=2)
    for step in (1, 2):
        store.save(step, nn.Linear(2, 1), {"step": step})
    store.weights_path(2).write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="skipping checkpoint step 2, it does not load") as caught:
        assert store.resume(nn.Linear(2, 1))["step"] == 1
    assert [w.filename for w in caught] == [__file__]
