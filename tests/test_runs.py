"""The run lock: held by the process that trains, never by the processes it forks."""

import os
import time

from mimkit.runs import hold_run_dir


def test_a_forked_child_does_not_keep_the_run_locked(tmp_path):
    run = tmp_path / "run"
    ready, tell = os.pipe()
    with hold_run_dir(run):
        child = os.fork()
        if child == 0:  # a data worker's place: it outlives its trainer's hold on the run
            os.write(tell, b"!")  # os.fork has returned here: the fork hooks have run
            time.sleep(5)
            os._exit(0)
        assert os.read(ready, 1) == b"!"
    try:
        with hold_run_dir(run):  # free, though the child is alive with the file descriptors it inherited
            pass
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
        os.close(ready)
        os.close(tell)
