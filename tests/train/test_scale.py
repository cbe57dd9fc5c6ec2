"""Training at scale: shards and HF datasets resume exactly and split across processes like folders;
Slurm's variables launch the process group; gradient checkpointing changes memory, not results."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mimkit.cli import main
from mimkit.models.beit import create_beitv2
from mimkit.models.cae import create_cae
from mimkit.models.mae import create_mae
from mimkit.models.maskfeat import create_maskfeat
from mimkit.models.simmim import create_simmim
from mimkit.runs import latest_weights
from mimkit.train.checkpoint_files import Checkpoints
from mimkit.train.distributed import (
    World,
    any_rank,
    barrier,
    expand_nodelist,
    gather_objects,
    init_world,
    slurm_environment,
)
from tests.conftest import torchrun

TINY = ["--model", "vit_mini", "--set", "model.kwargs.depth=2", "--set", "model.kwargs.decoder_depth=1",
        "--set", "data.img_size=32", "--set", "model.patch_size=8", "--set", "optim.warmup_epochs=0"]


def make_data(kind: str, root) -> str:
    """24 labeled 36x40 JPEGs as tar shards or as a saved HF dataset; returns the --data spec."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)) for _ in range(24)]
    if kind == "shards":
        for i, image in enumerate(images):
            (root / "images" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
            image.save(root / "images" / "ab"[i % 2] / f"{i:03d}.jpg", quality=90)
        assert main(["data", "pack", str(root / "images"), "--out", str(root / "shards"),
                     "--shard-size", "10KB"]) == 0
        return f"shards:{root / 'shards'}"
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(24)]}).cast_column(
        "image", datasets.Image()).save_to_disk(str(root / "hf"))
    return f"hf:{root / 'hf'}"


def assert_same_weights(a, b, exact: bool) -> None:
    one, two = load_file(a), load_file(b)
    assert one.keys() == two.keys()
    for name in one:
        if exact:
            assert torch.equal(one[name], two[name]), name
        else:
            torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shards", "hf"])
def test_resumed_run_is_bit_identical(tmp_path, kind):
    """A copy of a straight run cut back to step 3 (its later checkpoints deleted) and resumed ends
    bit-identical to the straight run, with a data worker reading the shards or rows."""
    data = make_data(kind, tmp_path)
    args = ["pretrain", "mae", "--data", data, *TINY, "--batch-size", "4", "--max-steps", "5",
            "--set", "data.num_workers=1", "--set", "train.checkpoint_every=1", "--set", "train.keep_last=10"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    shutil.copytree(tmp_path / "straight", tmp_path / "cut")
    cut = Checkpoints(tmp_path / "cut")
    for step in (4, 5):
        cut.weights_path(step).unlink()
        cut.state_path(step).unlink()
    assert Checkpoints(tmp_path / "cut").latest() == 3
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    assert_same_weights(latest_weights(tmp_path / "straight"), latest_weights(tmp_path / "cut"), exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shards", "hf"])
def test_two_processes_match_one(tmp_path, kind):
    """torchrun with 2 gloo processes x batch 4 ends where 1 process x batch 8 does."""
    data = make_data(kind, tmp_path)
    common = ["pretrain", "mae", "--data", data, *TINY, "--max-steps", "2", "--set", "data.num_workers=0"]
    assert main([*common, "--out", str(tmp_path / "one"), "--batch-size", "8"]) == 0
    torchrun(*common, "--out", str(tmp_path / "two"), "--batch-size", "4")
    assert_same_weights(latest_weights(tmp_path / "one"), latest_weights(tmp_path / "two"), exact=False)


# ---------------------------------------------------------------------------------------------------------
# Slurm


def test_expand_nodelist():
    assert expand_nodelist("node[01-04,07]") == ["node01", "node02", "node03", "node04", "node07"]
    assert expand_nodelist("gpu5") == ["gpu5"]
    assert expand_nodelist("a[8-10],b,c[1]") == ["a8", "a9", "a10", "b", "c1"]
    assert expand_nodelist("r[1-2]-n[09-10]") == ["r1-n09", "r1-n10", "r2-n09", "r2-n10"]
    for bad in ("n[a-b]", "n[1-b]", "n[a-3]"):  # either end not a number
        with pytest.raises(ValueError, match="bad range"):
            expand_nodelist(bad)


SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
         "SLURM_JOB_NODELIST": "node[07-08]"}


def test_slurm_variables_become_torchrun_variables():
    env = slurm_environment(SLURM)
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node07",
                   "MASTER_PORT": str(15000 + 4242)}
    assert slurm_environment(SLURM | {"SLURM_JOB_ID": "4243"})["MASTER_PORT"] == str(15000 + 4243)
    # srun inside a larger allocation: the step's own task count and nodes
    step = slurm_environment(SLURM | {"SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "node08"})
    assert (step["WORLD_SIZE"], step["MASTER_ADDR"]) == ("4", "node08")
    # the user's rendezvous wins; torchrun's variables switch Slurm's off; no Slurm, nothing
    assert slurm_environment(SLURM | {"MASTER_ADDR": "head", "MASTER_PORT": "29500"}).keys() == {
        "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # any one of torchrun's
        assert slurm_environment(SLURM | {name: "0"}) == {}
    assert slurm_environment({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}) == {}
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):  # not a task of srun without any one
        assert slurm_environment({key: value for key, value in SLURM.items() if key != name}) == {}
    no_job_id = {name: value for name, value in SLURM.items() if name != "SLURM_JOB_ID"}
    assert slurm_environment(no_job_id)["MASTER_PORT"] == "15000"


def test_a_large_slurm_job_id_still_gives_a_valid_port():
    """Job ids grow past 50 000 on a busy cluster: the port wraps into 15000..29999, below 65536."""
    for job, port in (("7654321", 15000 + 7654321 % 15000), ("15000", 15000), ("14999", 29999)):
        assert slurm_environment(SLURM | {"SLURM_JOB_ID": job})["MASTER_PORT"] == str(port)


@pytest.mark.slow
def test_two_srun_tasks_train_as_one_process_group(tmp_path):
    """Two processes given only Slurm's variables (as srun starts them) join one gloo group."""
    common = ["pretrain", "mae", "--data", "synthetic:16", *TINY[:6], "--max-steps", "1", "--batch-size", "4",
              "--set", "data.num_workers=0", "--out", str(tmp_path / "run")]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    slurm = {"SLURM_NTASKS": "2", "SLURM_JOB_ID": str(os.getpid()), "SLURM_JOB_NODELIST": "localhost",
             "OMP_NUM_THREADS": "1"}
    tasks = [subprocess.Popen([sys.executable, "-m", "mimkit.cli", *common], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=base | slurm | {"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)})
             for r in range(2)]
    outputs = [task.communicate(timeout=300)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs
    assert "global batch 8" in outputs[0]  # 2 processes x 4


# ---------------------------------------------------------------------------------------------------------
# Gradient checkpointing


def loss_and_grads(model, inputs, checkpointed: bool) -> tuple[torch.Tensor, dict]:
    model.set_grad_checkpointing(checkpointed)
    model.zero_grad()
    torch.manual_seed(0)  # drop path draws the same numbers in both runs
    loss = model(*inputs)[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def half_masked() -> torch.Tensor:
    """bool (2, 16): 8 of a 4x4 grid's patches masked in each image, other ones in each."""
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, ::2], mask[1, 1::2] = True, True
    return mask


# what each model is built with and called with (a 4x4 grid of 8-px patches, 2 images)
CHECKPOINTED = {
    "mae": lambda: (create_mae("vit_mini", img_size=32, patch_size=8, depth=2, decoder_depth=2),
                    (torch.randn(2, 3, 32, 32), 0.75, torch.rand(2, 16))),
    "beitv2": lambda: (create_beitv2("vit_mini", img_size=32, patch_size=8, depth=4, vocab_size=16,
                                     drop_path_rate=0.2),
                       (torch.randn(2, 3, 32, 32), torch.rand(2, 16) < 0.4, torch.randint(0, 16, (2, 16)))),
    "simmim": lambda: (create_simmim("vit_mini", img_size=32, patch_size=8, depth=4),
                       (torch.randn(2, 3, 32, 32), half_masked())),
    "maskfeat": lambda: (create_maskfeat("vit_mini", img_size=32, patch_size=8, depth=4, hog_cell=4),
                         (torch.randn(2, 3, 32, 32), half_masked())),
    "cae": lambda: (create_cae("vit_mini", img_size=32, patch_size=8, depth=4, vocab_size=16,
                               regressor_depth=2, decoder_depth=2),
                    (torch.randn(2, 3, 32, 32), half_masked(), torch.randint(0, 16, (2, 16)))),
}


@pytest.mark.parametrize("build", sorted(CHECKPOINTED))
def test_grad_checkpointing_gives_the_same_loss_and_gradients(build):
    torch.manual_seed(0)
    model, inputs = CHECKPOINTED[build]()
    model.train()
    plain_loss, plain = loss_and_grads(model, inputs, checkpointed=False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        checked_loss, checked = loss_and_grads(model, inputs, checkpointed=True)
    assert torch.equal(plain_loss, checked_loss)
    assert plain.keys() == checked.keys()
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(-t.numel()) or t, lambda t: t):
        loss_and_grads(model, inputs, checkpointed=False)
    kept_checkpointed = sum(n for n in saved if n > 0)
    kept_plain = -sum(n for n in saved if n < 0)
    assert kept_checkpointed < kept_plain / 2  # the point: far fewer activations kept for backward


def test_a_one_task_srun_step_joins_as_a_world_of_one_and_publishes_its_rendezvous(monkeypatch):
    """`init_world` puts the variables a Slurm task stands for into the environment, where
    ``init_process_group`` reads them, and reads its rank and size from them."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NUM_TASKS",
                 "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (SLURM | {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    world = init_world()
    assert world == World(rank=0, size=1, device=torch.device("cpu")) and world.is_main
    published = {name: os.environ[name] for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    assert published == {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "node07", "MASTER_PORT": "19242"}


def test_a_plain_launch_is_a_world_of_one_main_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", *SLURM):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    world = init_world()
    assert world == World(rank=0, size=1, device=torch.device("cpu")) and world.is_main
    assert not World(rank=1, size=2, device=torch.device("cpu")).is_main
    barrier(world)  # no process group to wait for
    assert gather_objects({"a": 1}, world) == [{"a": 1}]
    assert (any_rank(True, world), any_rank(False, world)) == (True, False)
