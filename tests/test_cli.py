"""The command line on real Fashion-MNIST and synthetic data: pretrain, resume, visualize, bad input."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mimkit.cli import main
from mimkit.data.sources import build_source
from mimkit.methods import METHODS
from mimkit.runs import latest_weights, load_config, load_run
from mimkit.train.checkpoint_files import Checkpoints
from mimkit.train.metrics_log import read_metrics
from tests.conftest import grid_size, torchrun

TINY = ["--set", "model.kwargs.depth=2", "--set", "model.kwargs.decoder_depth=1",
        "--set", "data.num_workers=0"]


def pretrain(out, *extra):
    return main(["pretrain", "mae", "--out", str(out), *TINY, *extra])


@pytest.mark.slow
def test_pretrain_resume_and_visualize_on_fashion_mnist(tmp_path, capsys):
    run = tmp_path / "mae"
    assert pretrain(run, "--data", "fashion-mnist", "--batch-size", "32", "--max-steps", "3") == 0
    assert Checkpoints(run).latest() == 3
    assert (run / "config.yaml").exists() and read_metrics(run)
    model, config = load_run(run)
    assert config.data.img_size == 28 and config.data.channels == 1 and config.model.name == "vit_mini"
    assert len(model.encoder.blocks) == 2

    assert pretrain(run, "--data", "fashion-mnist", "--batch-size", "32", "--max-steps", "5") == 0
    captured = capsys.readouterr()
    assert "resuming from step 3" in captured.out + captured.err
    assert Checkpoints(run).latest() == 5

    picture = tmp_path / "recon.png"
    assert main(["visualize", str(run), "--out", str(picture), "--n", "3"]) == 0
    drawn = Image.open(picture).convert("L")
    assert drawn.size == grid_size(4, 3, 28)  # original, masked, reconstruction, pasted; 3 images
    # the first tile is the first test image the seed picks (28 px drawn 4x, under the 18 px header)
    test = build_source("fashion-mnist", "test")
    first = int(torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[0])
    tile = torch.tensor(np.array(drawn.crop((4, 22, 4 + 112, 22 + 112)))).int()[::4, ::4]
    assert (tile - test[first][0][0].int()).abs().max() <= 1


@pytest.mark.slow
def test_mae_learns_on_fashion_mnist(tmp_path):
    run = tmp_path / "mae"
    pretrain(run, "--data", "fashion-mnist", "--batch-size", "64", "--max-steps", "40",
             "--set", "optim.base_lr=4e-3", "--set", "optim.warmup_epochs=0", "--set", "train.log_every=1")
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/dir"], "does not exist"),
    (["--data", "synthetic", "--model", "vit_nope"], "unknown MAE model"),
    (["--data", "synthetic", "--set", "model.patch_size=5"], "multiple of patch_size"),
    (["--data", "synthetic", "--set", "mae.mask_ratio=1.5"], "mask"),
    (["--data", "synthetic", "--set", "mae.mask_ratio=0.99"], "mask"),
    (["--data", "synthetic", "--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["--data", "synthetic", "--config", "no_such_recipe"], "unknown recipe"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, args, message):
    assert pretrain(tmp_path / "bad", "--max-steps", "1", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_run_dir_of_another_model_is_refused(tmp_path, capsys):
    run = tmp_path / "mae"
    pretrain(run, "--data", "synthetic", "--batch-size", "8", "--max-steps", "1")
    assert pretrain(run, "--data", "synthetic", "--model", "vit_tiny", "--max-steps", "1") == 2
    assert "holds a mae vit_mini run" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_whole_job_saves_a_checkpoint_and_the_run_resumes(tmp_path, capsys, signum):
    """Ctrl-C in a terminal (SIGINT), Slurm and ``kill -- -PGID`` (SIGTERM) signal every process of the
    job, data workers included: the run still saves the step it reached, exits with status 130 (not 0:
    it is not finished), leaves no worker behind, and the same command resumes from that step."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "mimkit.cli", "pretrain", "mae", "--data", "synthetic",
               "--out", str(out), *TINY, "--set", "data.num_workers=1", "--set", "train.log_every=1",
               "--batch-size", "8", "--max-steps", "100000"]
    job = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while len(read_metrics(out)) < 3:
            assert job.poll() is None and time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.2)
        os.killpg(job.pid, signum)
        output = job.communicate(timeout=120)[0]
    finally:  # never leave a 100000-step run behind when the test fails
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    step = Checkpoints(out).latest()
    assert job.returncode == 130, output
    assert step is not None and step >= 3
    assert f"checkpoint saved at step {step}" in output
    deadline = time.monotonic() + 30
    while True:  # every process of the job has exited
        try:
            os.killpg(job.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "a data worker outlived the run"
        time.sleep(0.2)
    assert main(command[3:-2] + ["--max-steps", str(step + 1)]) == 0
    assert f"resuming from step {step}" in "".join(capsys.readouterr())
    assert Checkpoints(out).latest() == step + 1


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    """torchrun with 2 gloo processes x batch 4 ends where 1 process x batch 8 does."""
    common = ["pretrain", "mae", "--data", "synthetic", "--max-steps", "3", *TINY,
              "--set", "optim.warmup_epochs=0"]
    assert main([*common, "--out", str(tmp_path / "one"), "--batch-size", "8"]) == 0
    torchrun(*common, "--out", str(tmp_path / "two"), "--batch-size", "4")
    one, two = load_file(latest_weights(tmp_path / "one")), load_file(latest_weights(tmp_path / "two"))
    assert one.keys() == two.keys()
    for name in one:
        # the same sums split another way, through 3 AdamW steps: 2.3e-6 measured on this CPU
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=5e-6, msg=name)
    config = load_config(tmp_path / "one")
    torch.manual_seed(config.train.seed)
    initial = METHODS["mae"].build_model(config).state_dict()
    qkv = "encoder.blocks.0.attn.qkv.weight"
    assert not torch.equal(initial[qkv], one[qkv])


def test_leaving_the_process_group_frees_a_ddp_model_kept_by_a_reference_cycle_first(monkeypatch):
    """A DDP model that outlives its run in a reference cycle (a DDP object is one itself where
    torch._dynamo is not loaded, as in the DDP tests' workers) keeps the gloo group alive past
    `destroy_process_group`, to be freed with its threads at the interpreter's exit, where a rank can abort
    (SIGABRT, "terminate called without an active exception": 2 of 20 two-rank runs, 0 of 40 with the
    collection first). Leaving the group collects such cycles before destroying it."""
    import gc
    import weakref

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mimkit.cli import leave_process_group

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    destroy, alive_at_destroy = dist.destroy_process_group, []
    monkeypatch.setattr(dist, "destroy_process_group", lambda: (alive_at_destroy.append(alive() is not None),
                                                                destroy()))
    was_enabled = gc.isenabled()
    gc.disable()  # only an explicit collection may free the cycle
    try:
        model = DistributedDataParallel(torch.nn.Linear(4, 1))
        model(torch.randn(2, 4)).sum().backward()
        holder = [model]
        holder.append(holder)
        alive = weakref.ref(model)
        del model, holder
        assert alive() is not None  # the cycle holds it
        leave_process_group()
        assert alive_at_destroy == [False] and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            destroy()
        if was_enabled:
            gc.enable()
