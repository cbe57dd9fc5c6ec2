"""Data loader workers end with the process that started them, however it ends."""

import os
import signal
import subprocess
import sys
import time

import pytest

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
