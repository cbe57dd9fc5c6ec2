"""The loaders: the training loader leaves the training's random stream alone, an evaluation loader reads
every item once in order, errors end the workers with their own line, and workers end with the process
that started them, however it ends."""

import ctypes
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from mimkit.data.loader import (
    EpochBatches,
    SeededViews,
    build_loader,
    die_with_parent,
    eval_loader,
    evaluation_batches,
    workers_end_with_errors,
)
from mimkit.errors import MimkitError
from tests.conftest import Points, noisy_view


def test_the_loader_leaves_the_training_random_stream_alone():
    """Neither a loader's epochs (its workers' base seed) nor the items' views (seeded per sample) move the
    global RNG that dropout and drop path draw from: a resumed run would drift from an uninterrupted one."""
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    batches = EpochBatches(32, 8, seed=1)
    for epoch in range(2):
        batches.set_position(epoch, 0)
        assert len(list(build_loader(SeededViews(Points(), noisy_view), batches))) == 4
    assert torch.equal(torch.rand(4), expected)


def test_an_evaluation_loader_reads_every_item_once_in_order_in_batches_of_its_size():
    points = Points(5)
    batches = list(eval_loader(points, lambda image: {"image": image.float().flatten()}, batch_size=2))
    assert [len(batch["label"]) for batch in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([batch["image"] for batch in batches]), points.x.float().flatten(1))
    assert torch.cat([batch["label"] for batch in batches]).tolist() == [0, 1, 0, 1, 0]


def test_an_error_shuts_the_workers_down_and_passes_on_unless_it_is_a_workers_message():
    shut = []
    loader = SimpleNamespace(_iterator=SimpleNamespace(_shutdown_workers=lambda: shut.append(True)))
    for error in (ValueError("not ours"), MimkitError("ours, raised in this process")):
        with pytest.raises(type(error)) as raised, workers_end_with_errors(loader):
            raise error
        assert raised.value is error
    assert shut == [True, True]


def test_evaluation_batches_end_their_workers_when_the_loop_leaves_early():
    loader = eval_loader(Points(8), noisy_view, batch_size=2, num_workers=1)
    with evaluation_batches(loader) as batches:
        assert len(next(batches)["label"]) == 2
    assert batches._shutdown and not any(worker.is_alive() for worker in batches._workers)


# a trainer whose workers are busy decoding when it is killed: torch's own check for a dead parent only runs
# between items, so without the parent-death signal they would live on for the rest of a slow item
TRAINER = """
import os, sys, time, torch
from mimkit.data.loader import EpochBatches, SeededViews, build_loader
from tests.conftest import Points, noisy_view

class SlowPoints(Points):
    def __getitem__(self, i):
        if i not in first:
            time.sleep(60)
        return super().__getitem__(i)

batches = EpochBatches(32, 4, 0)
first = {i for i, _ in next(iter(batches))}
batches = iter(build_loader(SeededViews(SlowPoints(), noisy_view), batches, num_workers=2))
next(batches)
print(" ".join(str(w.pid) for w in batches._workers), flush=True)
time.sleep(60)
"""


def _death_signal() -> int:
    """This process's parent-death signal (prctl PR_GET_PDEATHSIG); 0 when none is set."""
    number = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(2, ctypes.byref(number))
    return number.value


def where_it_ran(image):
    """A view that reports its process: PID, Ctrl-C and SIGTERM ignored or not, the parent-death signal."""
    ignored = [int(signal.getsignal(s) == signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)]
    return {"image": torch.tensor([os.getpid(), *ignored, _death_signal()])}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_training_workers_run_apart_ignore_stop_signals_and_die_with_the_trainer():
    """The fast check of what the slow tests see: the loader starts the workers asked for, and each leaves
    Ctrl-C and SIGTERM to the trainer and has the kernel SIGKILL it when the trainer dies."""
    # as in a terminal: a job started in the background (`cmd &`) may inherit Ctrl-C ignored already
    previous = {s: signal.signal(s, handler) for s, handler in ((signal.SIGINT, signal.default_int_handler),
                                                               (signal.SIGTERM, signal.SIG_DFL))}
    loader = build_loader(SeededViews(Points(8), where_it_ran), EpochBatches(8, 4, seed=0), num_workers=1)
    try:
        facts = torch.cat([batch["image"] for batch in loader])
    finally:
        loader._iterator._shutdown_workers()
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert (facts[:, 0] != os.getpid()).all()
    assert facts[:, 1:].tolist() == [[1, 1, signal.SIGKILL]] * 8


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_worker_whose_trainer_is_already_gone_ends_at_once():
    child = os.fork()
    if child == 0:
        try:
            die_with_parent(-1)  # not its parent: as if the trainer had died before the signal was set
            os._exit(0)
        except BaseException:
            os._exit(99)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper is dead
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_workers_die_when_their_trainer_is_killed_outright():
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER], stdout=subprocess.PIPE, text=True,
                               cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        workers = [int(pid) for pid in trainer.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers)
    finally:
        trainer.kill()
