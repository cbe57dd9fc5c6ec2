"""Run directories: the lock (held by the process that trains, never by the processes it forks, and gone
with a run refused before it wrote anything), and the weights an evaluation reads."""

import os
import time

import torch

from mimkit.cli import main
from mimkit.runs import LOCK, best_weights, hold_run_dir, load_encoder, split_weights_path
from mimkit.train.checkpoint_files import Checkpoints


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


def test_the_best_weights_are_the_kept_best_not_the_newest(tmp_path):
    """A run that kept its best weights (fine-tuning, segmentation) is evaluated with those, not its newest;
    a run without them, with its newest."""
    model, files = torch.nn.Linear(2, 2), Checkpoints(tmp_path)
    files.save(1, model, {"step": 1})
    files.save_best(1, model, "val_top1", 50.0)
    files.save(2, model, {"step": 2})
    assert best_weights(tmp_path) == files.best_path
    files.best_path.unlink()
    assert best_weights(tmp_path) == files.weights_path(2)


def test_a_run_refused_before_writing_anything_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new"
    refused = ["pretrain", "mae", "--data", "synthetic:16", "--set", "mae.mask_ratio=2", "--out"]
    assert main([*refused, str(out)]) == 2
    assert "mask_ratio" in capsys.readouterr().err and not out.exists()  # neither the folder nor its lock
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*refused, str(empty)]) == 2
    assert empty.is_dir() and not any(empty.iterdir())  # the user's empty folder stays, empty


def test_the_lock_holds_this_process_pid_alone(tmp_path):
    """A lock file left by a process with a longer PID is rewritten whole: the message naming the holder of
    a busy run reads this PID, not its digits over the old one's."""
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text("123456789\n")
    with hold_run_dir(run):
        assert (run / LOCK).read_text() == f"{os.getpid()}\n"


def test_a_weights_file_beside_the_config_belongs_to_that_run(tmp_path):
    """A checkpoint inside ``checkpoints/`` belongs to the folder above; one beside ``config.yaml`` (copied
    there, or an imported file) to the folder it is in."""
    (tmp_path / "config.yaml").write_text("method: mae\n")
    (tmp_path / "checkpoints").mkdir()
    for path in (tmp_path / "chosen.safetensors", tmp_path / "checkpoints" / "step-1.safetensors"):
        path.write_bytes(b"")
        assert split_weights_path(path) == (tmp_path, path)


def test_a_random_encoder_follows_its_seed(mae_run):
    """``--init random`` draws the encoder from ``--seed``: two seeds give two encoders, one seed the same."""
    def weights(seed):
        return load_encoder(mae_run, "random", seed=seed).model.state_dict()["patch_embed.proj.weight"]
    assert torch.equal(weights(1), weights(1)) and not torch.equal(weights(0), weights(1))
