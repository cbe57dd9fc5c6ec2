"""Reliability of a run: bad numbers end at once with one line, a folder that is not a run is never written
into, a trained run keeps its configuration, one process per run directory, no silent change of the
number of processes, non-finite values never step or get saved, and the CLI's thread defaults."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from mimkit.cli import main
from mimkit.cpus import set_thread_defaults, usable_cpus
from mimkit.data.loader import SeededViews
from mimkit.errors import MimkitError
from mimkit.runs import LOCK
from mimkit.train.checkpoint_files import Checkpoints, load_weights
from mimkit.train.distributed import World
from mimkit.train.loop import LoopOptions, train
from mimkit.train.metrics_log import read_metrics
from mimkit.train.optim import build_adamw, param_groups
from mimkit.train.schedule import Schedule
from mimkit.train.step import NonFiniteLoss
from tests.conftest import Points, noisy_view, regression_loss, run_records, torchrun

CPU = World(rank=0, size=1, device=torch.device("cpu"))
TINY = ["--data", "synthetic", "--batch-size", "8", "--set", "model.kwargs.depth=2",
        "--set", "model.kwargs.decoder_depth=1", "--set", "data.num_workers=0"]
CLI = [sys.executable, "-m", "mimkit.cli"]
QUIET_ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def pretrain(out, *extra):
    return main(["pretrain", "mae", "--out", str(out), *TINY, *extra])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


# 1, 4, 7: every number checked where it is parsed
@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "'train.batch_size' (--batch-size) must be at least 1, got 0"),
    (["--max-steps", "0"], "'train.max_steps' (--max-steps) must be at least 1, got 0"),
    (["--max-steps", "-5"], "'train.max_steps' (--max-steps) must be at least 1, got -5"),
    (["--epochs", "0"], "'train.epochs' (--epochs) must be at least 1, got 0"),
    (["--set", "train.accum_steps=0"], "'train.accum_steps' must be at least 1"),
    (["--set", "train.checkpoint_every=0"], "'train.checkpoint_every' must be at least 1"),
    (["--set", "train.log_every=-1"], "'train.log_every' must be at least 1"),
    (["--set", "train.keep_last=0"], "'train.keep_last' must be at least 1"),
    (["--set", "train.keep_last=-1"], "'train.keep_last' must be at least 1"),
    (["--set", "data.num_workers=-2"], "'data.num_workers' must be at least 0"),
    (["--set", "data.img_size=0"], "'data.img_size' must be at least 1"),
    (["--set", "data.mean=[0.5,0.5]"], "'data.mean' has 2 values for 3 channels"),
    (["--set", "data.mean=[0.5]", "--set", "data.std=[0.2,0.3,0.4]"],
     "'data.mean' has 1 values and 'data.std' 3"),
    (["--set", "data.std=[0.5,0,0.5]"], "'data.std' must be positive"),
    (["--set", "data.mean=0.5"], "'data.mean' must be a list"),
    (["--set", "optim.betas=[0.9]"], "'optim.betas' must be a list of 2 values"),
    (["--set", "optim.betas=[0.9,1.5]"], "'optim.betas' must lie in [0, 1)"),
    (["--set", "optim.betas=[0.9,1.0]"], "'optim.betas' must lie in [0, 1)"),  # 1 never forgets a gradient
    (["--set", "optim.base_lr=nan"], "'optim.base_lr' must be a finite number above 0, got nan"),
    (["--set", "optim.base_lr=inf"], "'optim.base_lr' must be a finite number above 0, got inf"),
    (["--set", "optim.base_lr=0"], "'optim.base_lr' must be above 0, got 0"),
    (["--set", "optim.clip_grad=.nan"], "'optim.clip_grad' must be a finite number above 0"),
    (["--set", "optim.warmup_epochs=.inf"], "'optim.warmup_epochs' must be a finite number at least 0"),
    (["--set", "model.kwargs.foo=1"], "'model.kwargs.foo' is not an argument of MAE"),
])
def test_bad_numbers_are_one_line_errors(tmp_path, capsys, args, message):
    length = [] if {"--epochs", "--max-steps"} & set(args) else ["--max-steps", "2"]
    assert pretrain(tmp_path / "run", *length, *args) == 2
    assert message in one_line_error(capsys)
    assert Checkpoints(tmp_path / "run").latest() is None


@pytest.mark.parametrize("args, message", [
    (["linprobe", "--batch-size", "-4"], "--batch-size must be at least 1, got -4"),
    (["linprobe", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["linprobe", "--lr", "nan"], "--lr must be a finite number above 0, got nan"),
    (["linprobe", "--lr", "-1"], "--lr must be above 0, got -1"),
    (["linprobe", "--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["linprobe", "--weight-decay", "-0.1"], "--weight-decay must be at least 0, got -0.1"),
    (["linprobe", "--weight-decay", "inf"], "--weight-decay must be a finite number at least 0, got inf"),
    (["linprobe", "--val-fraction", "-0.1"], "(--val-fraction) must be in [0, 1), got -0.1"),
    (["linprobe", "--label-fraction", "nan"], "(--label-fraction) must be a finite number in (0, 1]"),
    (["knn", "--label-fraction", "0"], "(--label-fraction) must be in (0, 1], got 0.0"),  # not all labels
    (["knn", "--k", "0"], "--k must be at least 1, got 0"),
    (["knn", "--temperature", "inf"], "--temperature must be a finite number above 0, got inf"),
    (["knn", "--num-workers", "-1"], "--num-workers must be at least 0, got -1"),
])
def test_probes_check_their_numbers_like_the_trainers(mae_run, tmp_path, capsys, args, message):
    command, *flags = args
    out = tmp_path / "probe"
    assert main([command, str(mae_run), "--data", "synthetic", "--out", str(out), *flags]) == 2
    assert message in one_line_error(capsys)
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("command", [["tokenizer", "train", "dvae"], ["finetune", "no-such-run"]])
def test_tokenizer_and_finetune_check_their_numbers_too(tmp_path, capsys, command):
    args = [*command, "--data", "synthetic", "--out", str(tmp_path / "run"), "--max-steps", "0"]
    assert main(args) == 2
    assert "'train.max_steps' (--max-steps) must be at least 1" in one_line_error(capsys)


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("batch_size", ["0", "-2"])
def test_predict_and_evaluate_check_their_batch_size(tmp_path, capsys, command, batch_size):
    """Checked before anything is read (the run given here does not exist): one line naming the flag."""
    where = ["--images", str(tmp_path)] if command == "predict" else []
    args = [command, str(tmp_path / "no-such-run"), *where, "--out", str(tmp_path / "out")]
    assert main([*args, "--batch-size", batch_size]) == 2
    assert f"--batch-size must be at least 1, got {batch_size}" in one_line_error(capsys)


@pytest.mark.slow
def test_negative_batch_size_ends_at_once(tmp_path):
    """It used to loop forever over empty epochs, at full CPU, deaf to SIGTERM."""
    command = [*CLI, "pretrain", "mae", "--out", str(tmp_path / "run"), *TINY, "--batch-size", "-4",
               "--max-steps", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=QUIET_ENV)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "'train.batch_size' (--batch-size) must be at least 1, got -4" in done.stderr


def test_keep_last_below_one_is_refused_by_the_library(tmp_path):
    for keep_last in (0, -1):
        with pytest.raises(MimkitError, match="keep_last must be at least 1"):
            Checkpoints(tmp_path, keep_last)


# 3: a folder that is not a run, and a trained run's configuration
def test_folder_that_is_not_a_run_is_never_written_into(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    (mine / "config.yaml").write_text("data:\n  img_size: 28\n")  # only known keys
    assert pretrain(mine, "--max-steps", "1") == 2
    assert "not a mimkit run" in one_line_error(capsys)
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "notes.txt"]
    assert (mine / "config.yaml").read_text() == "data:\n  img_size: 28\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert pretrain(empty, "--max-steps", "1") == 0  # an empty folder is fine


@pytest.mark.parametrize("command, other", [("linprobe", "knn"), ("knn", "linprobe")])
def test_probes_write_only_into_a_folder_they_made_unless_forced(mae_run, tmp_path, capsys, command, other):
    def probe(name: str, out, *extra: str) -> int:
        epochs = ["--epochs", "1"] if name == "linprobe" else []
        return main([name, str(mae_run), "--data", "synthetic", "--out", str(out), "--num-workers", "0",
                     "--features-cache", str(tmp_path / "cache"), *epochs, *extra])

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text("keep\n")
    (mine / "metrics.jsonl").write_text("keep\n")
    assert probe(command, mine) == 2
    assert f"files mimkit {command} did not write (metrics.jsonl, results.json); choose a new --out, or " \
           "--force" in one_line_error(capsys)
    assert (mine / "results.json").read_text() == (mine / "metrics.jsonl").read_text() == "keep\n"
    assert probe(other, tmp_path / "other") == 0
    capsys.readouterr()
    assert probe(command, tmp_path / "other") == 2
    assert f"holds the output of mimkit {other}" in one_line_error(capsys)
    assert probe(command, tmp_path / "own") == probe(command, tmp_path / "own") == 0  # its own: run again
    assert probe(command, mine, "--force") == 0
    assert json.loads((mine / "results.json").read_text())["protocol"] == command


def test_visualize_names_a_picture_in_a_folder_or_without_an_extension(mae_run, tmp_path, capsys):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for _ in range(2):
        assert main(["visualize", str(mae_run), "--out", str(pictures), "--n", "1"]) == 0
    assert sorted(p.name for p in pictures.iterdir()) == ["recon-2.png", "recon.png"]
    assert "is a folder: the picture is named recon-2.png" in capsys.readouterr().out
    assert main(["visualize", str(mae_run), "--out", str(tmp_path / "plain"), "--n", "1"]) == 0
    assert "has no picture extension: .png added" in capsys.readouterr().out
    assert (tmp_path / "plain.png").is_file()


def test_trained_run_keeps_its_config_unless_forced(tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(run, "--max-steps", "1") == 0
    saved = (run / "config.yaml").read_text()
    for change in (["--set", "optim.base_lr=1e-2"], ["--batch-size", "4"], ["--data", "synthetic:300"],
                   ["--set", "model.kwargs.decoder_depth=2"]):
        capsys.readouterr()
        assert pretrain(run, "--max-steps", "2", *change) == 2, change
        err = one_line_error(capsys)
        assert "trained to step 1 with other settings" in err and "--force-config" in err
        assert (run / "config.yaml").read_text() == saved and Checkpoints(run).latest() == 1
    assert pretrain(run, "--max-steps", "2", "--set", "optim.base_lr=1e-2") == 2
    assert "optim.base_lr 0.0015 -> 0.01" in one_line_error(capsys)

    # the run's length and upkeep may change: extending a finished run is normal
    assert pretrain(run, "--max-steps", "3", "--set", "train.log_every=1", "--set", "train.keep_last=3") == 0
    assert Checkpoints(run).latest() == 3 and (run / "config.yaml").read_text() == saved

    assert pretrain(run, "--max-steps", "4", "--set", "optim.base_lr=1e-2", "--force-config") == 0
    assert "--force-config: resuming step 3 with optim.base_lr" in capsys.readouterr().out
    assert "base_lr: 0.01" in (run / "config.yaml").read_text() and Checkpoints(run).latest() == 4


@pytest.mark.slow
def test_finetune_run_keeps_its_config(tmp_path, capsys):
    encoder = tmp_path / "mae"
    assert pretrain(encoder, "--max-steps", "1") == 0
    quick = ["--data", "synthetic", "--batch-size", "32", "--set", "data.num_workers=0",
             "--set", "eval_batch_size=128"]
    ft = tmp_path / "ft"
    assert main(["finetune", str(encoder), "--out", str(ft), "--max-steps", "1", *quick]) == 0
    saved = (ft / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["finetune", str(encoder), "--out", str(ft), "--max-steps", "2", "--label-fraction", "0.5",
                 *quick]) == 2
    assert "labels.fraction 1.0 -> 0.5" in one_line_error(capsys)
    assert (ft / "config.yaml").read_text() == saved


# 5: one process per run directory
@pytest.mark.slow
def test_second_process_on_a_run_directory_is_refused_until_the_first_dies(tmp_path, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen([*CLI, "pretrain", "mae", "--out", str(run), *TINY, "--max-steps", "100000",
                              "--set", "train.log_every=1", "--set", "train.checkpoint_every=2"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=QUIET_ENV)
    try:
        deadline = time.monotonic() + 120
        while Checkpoints(run).latest() is None:
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not get going"
            time.sleep(0.2)
        config = (run / "config.yaml").read_text()
        records = len(read_metrics(run))
        assert pretrain(run, "--max-steps", "100000", "--set", "optim.base_lr=1e-2", "--force-config") == 2
        err = one_line_error(capsys)
        assert f"being trained by another process (PID {first.pid})" in err
        assert (run / "config.yaml").read_text() == config
        assert first.poll() is None and len(read_metrics(run)) >= records  # the first run goes on
        first.send_signal(signal.SIGKILL)  # a killed holder leaves no lock behind
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    step = Checkpoints(run).latest()
    assert pretrain(run, "--max-steps", str(step + 1)) == 0
    assert Checkpoints(run).latest() == step + 1 and (run / LOCK).read_text() == ""


# 6: the number of processes and the global batch are part of a checkpoint
@pytest.mark.slow
def test_resuming_two_processes_with_one_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    torchrun("pretrain", "mae", "--out", str(run), *TINY, "--batch-size", "4", "--max-steps", "1")
    state = Checkpoints(run).load_state(1)
    assert (state["world_size"], state["global_batch"]) == (2, 8)
    assert pretrain(run, "--batch-size", "4", "--max-steps", "2") == 2
    err = one_line_error(capsys)
    assert "trained by 2 process(es) with global batch 8; this run has 1 with global batch 4" in err
    assert Checkpoints(run).latest() == 1
    assert pretrain(run, "--batch-size", "4", "--max-steps", "2", "--force-config") == 0
    assert Checkpoints(run).latest() == 2


def test_force_config_resumes_with_another_global_batch(tmp_path, capsys):
    """One process, batch 8 then 4: refused as another global batch, resumed with --force-config (which the
    runner passes to the loop's resume as well as to the configuration check)."""
    run = tmp_path / "run"
    assert pretrain(run, "--max-steps", "1") == 0
    capsys.readouterr()
    assert pretrain(run, "--batch-size", "4", "--max-steps", "2") == 2
    assert "batch_size 8 -> 4" in one_line_error(capsys)
    assert pretrain(run, "--batch-size", "4", "--max-steps", "2", "--force-config") == 0
    assert Checkpoints(run).latest() == 2


def test_checkpoint_state_records_world_size_and_global_batch(tmp_path):
    model, optimizer, schedule = toy(total_steps=2, accum_steps=2)
    train(model, regression_loss, SeededViews(Points(), noisy_view), optimizer, schedule, CPU,
          LoopOptions(batch_size=4), **run_records(tmp_path))
    state = Checkpoints(tmp_path).load_state(2)
    assert (state["world_size"], state["global_batch"]) == (1, 8)
    model, optimizer, schedule = toy(total_steps=3)
    with pytest.raises(MimkitError, match="global batch 8; this run has 1 with global batch 4"):
        train(model, regression_loss, SeededViews(Points(), noisy_view), optimizer, schedule, CPU,
              LoopOptions(batch_size=4), **run_records(tmp_path))


# 8: non-finite values never reach the weights, the optimizer or a checkpoint
def toy(total_steps=6, accum_steps=1, lr=1e-2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = build_adamw(param_groups(model, 0.05))
    return model, optimizer, Schedule(total_steps, [lr] * total_steps, accum_steps)


def fails_at_call(n, fault):
    """A loss function whose ``n``-th call returns ``fault(model, loss)`` instead of the loss."""
    calls = [0]

    def loss_fn(model, batch):
        calls[0] += 1
        loss, metrics = regression_loss(model, batch)
        return (fault(model, loss) if calls[0] == n else loss), metrics

    return loss_fn


def infinite_loss(model, loss):
    return loss * float("inf")


def infinite_gradient(model, loss):
    """Finite (the loss plus 0), but its gradient is infinite: d sqrt(x) / dx at 0."""
    weight = model[0].weight
    return loss + torch.sqrt(weight - weight.detach()).sum()


@pytest.mark.parametrize("accum_steps", [1, 2])
@pytest.mark.parametrize("fault, message", [(infinite_loss, "loss is inf at step 3"),
                                            (infinite_gradient, "gradient norm is inf at step 3")])
def test_non_finite_values_stop_before_the_optimizer_step(tmp_path, fault, message, accum_steps):
    model, optimizer, schedule = toy(accum_steps=accum_steps)
    # the fault comes with the last micro-batch of step 3: earlier ones have already added gradients
    loss_fn = fails_at_call(3 * accum_steps, fault)
    with pytest.raises(NonFiniteLoss, match=message):
        train(model, loss_fn, SeededViews(Points(), noisy_view), optimizer, schedule, CPU,
              LoopOptions(batch_size=8 // accum_steps, checkpoint_every=1), **run_records(tmp_path))
    checkpoints = Checkpoints(tmp_path)
    assert checkpoints.latest() == 2
    saved_model, _, _ = toy()
    load_weights(saved_model, checkpoints.weights_path(2))
    before = saved_model.state_dict()
    for name, now in model.state_dict().items():
        assert torch.equal(now, before[name]), name
    saved = checkpoints.load_state(2)["optimizer"]["state"]
    now = optimizer.state_dict()["state"]
    assert saved.keys() == now.keys()
    for index in saved:
        for key in saved[index]:
            assert torch.equal(now[index][key], saved[index][key]), (index, key)


def test_non_finite_weights_are_never_saved(tmp_path):
    model, optimizer, schedule = toy(total_steps=3, lr=float("inf"))  # finite loss and gradients
    with pytest.raises(NonFiniteLoss, match="is not finite after step 1; not saved"):
        train(model, regression_loss, SeededViews(Points(), noisy_view), optimizer, schedule, CPU,
              LoopOptions(batch_size=8, checkpoint_every=1), **run_records(tmp_path))
    assert Checkpoints(tmp_path).latest() is None


# 18: the CLI shares the CPUs politely
@pytest.mark.parametrize("cpu_max, expected", [("150000 100000\n", 2), ("50000 100000\n", 1),
                                               ("max 100000\n", None), (None, None)])
def test_usable_cpus_follow_affinity_and_cgroup_quota(tmp_path, cpu_max, expected):
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(path) == min(affinity, expected or affinity)


@pytest.mark.parametrize("cpu_count, expected", [(6, 6), (None, 1)])
def test_usable_cpus_without_an_affinity_mask_are_the_cpu_count_or_one(tmp_path, monkeypatch, cpu_count,
                                                                       expected):
    """macOS and Windows have no ``sched_getaffinity``: the CPU count, 1 when unknown (no quota file)."""
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: cpu_count)
    assert usable_cpus(tmp_path / "no-cpu.max") == expected


def test_usable_cpus_are_this_processs_affinity_not_another_processs(tmp_path, monkeypatch):
    """``taskset -c 0-2 mimkit ...``: this process (pid 0 to ``sched_getaffinity``) may use 3 CPUs, whatever
    init's mask holds."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2} if pid == 0 else set(range(64)))
    assert usable_cpus(tmp_path / "no-cpu.max") == 3


def test_thread_defaults_leave_what_the_user_set():
    environ = {}
    set_thread_defaults(environ, cpus=1)
    assert environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert environ.get("OMP_NUM_THREADS") == ("1" if os.cpu_count() > 1 else None)
    environ = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "4"}
    set_thread_defaults(environ, cpus=1)
    assert environ == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "4"}
    environ = {}
    set_thread_defaults(environ, cpus=os.cpu_count())  # every CPU usable: OpenMP's own default is right
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.slow
def test_cli_sets_thread_defaults_before_torch_loads(tmp_path):
    probe = ("import os, sys; from mimkit.cli import main; loaded = 'torch' in sys.modules; "
             f"main(['visualize', {str(tmp_path / 'none')!r}, '--out', 'x.png']); import torch; "
             "print(loaded, os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    assert out.stdout.split() == ["False", "PASSIVE", "1"]
