"""The one runner (`mimkit.runner`) gives every training kind every engine feature: gradient checkpointing,
the compile flag, a stop request that saves and exits 130 and an exact resume, and the halt on a non-finite
loss. Each test runs over the kinds (`KINDS`) through the command line, with the runner's loop wrapped."""

import os
import signal
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import mimkit.runner
import mimkit.runs
from mimkit.cli import main
from mimkit.config import PretrainConfig, TrainConfig
from mimkit.errors import MimkitError
from mimkit.runner import Job
from mimkit.runs import LOCK
from mimkit.train.checkpoint_files import Checkpoints
from mimkit.train.distributed import World
from mimkit.train.optim import param_groups
from tests.conftest import TINY_MAE_KWARGS
from tests.eval.test_segment import QUICK as QUICK_SEGMENT
from tests.eval.test_segment import write_layout

TINY = [arg for kv in TINY_MAE_KWARGS for arg in ("--set", f"model.kwargs.{kv}")]
COMMON = ["--batch-size", "8", "--set", "data.num_workers=0"]


def command(kind: str, mae_run, tmp_path) -> list[str]:
    """The command line that trains a run of ``kind`` (without ``--out`` and its length)."""
    if kind == "pretraining":
        return ["pretrain", "mae", "--data", "synthetic", *TINY, *COMMON]
    if kind == "finetune":
        return ["finetune", str(mae_run), "--data", "synthetic", *COMMON, "--set", "eval_batch_size=256"]
    data = tmp_path / "scenes"
    if not data.exists():
        write_layout(data, "generic")
    return ["segment", str(mae_run), "--data", str(data), *QUICK_SEGMENT, "--batch-size", "4"]


KINDS = ("pretraining", "finetune", "segment")


class Captured:
    """Replaces the runner's loop: keeps what the runner hands it and ends the run as interrupted."""

    def __init__(self, monkeypatch):
        self.calls, self.arguments = [], []
        monkeypatch.setattr(mimkit.runner, "train", self)

    def __call__(self, model, loss_fn, dataset, *args, **kwargs):
        self.calls.append((model, loss_fn, dataset))
        self.arguments.append((args, kwargs))
        return {"step": 0, "interrupted": True, "resumed_from": None}


def first_batch(dataset, n: int = 2) -> dict:
    items = [dataset[(index, index)] for index in range(n)]
    return {key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in items[0]}


def loss_and_saved(model, loss_fn, batch) -> tuple[torch.Tensor, int]:
    """The loss of one batch (same random draws each time) and the elements autograd kept for backward."""
    saved = []
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = loss_fn(model, batch)[0]
    return loss.detach(), sum(saved)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_checkpoints_gradients_when_asked(kind, mae_run, tmp_path, monkeypatch, capsys):
    captured = Captured(monkeypatch)
    argv = command(kind, mae_run, tmp_path) + ["--max-steps", "2", "--out", str(tmp_path / kind)]
    assert main(argv + ["--set", "train.grad_checkpointing=true"]) == 130
    assert "gradient checkpointing on" in capsys.readouterr().out  # the summary's engine line
    model, loss_fn, dataset = captured.calls[0]
    switched = [m for m in model.modules() if getattr(m, "grad_checkpointing", False)]
    assert switched, "no module of the model checkpoints its blocks"
    model.train()
    batch = first_batch(dataset)
    checked_loss, checked_saved = loss_and_saved(model, loss_fn, batch)
    for module in switched:
        module.set_grad_checkpointing(False)
    plain_loss, plain_saved = loss_and_saved(model, loss_fn, batch)
    torch.testing.assert_close(checked_loss, plain_loss, rtol=1e-6, atol=0)
    assert checked_saved < plain_saved  # the point: fewer activations kept for backward


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_compiles_when_asked(kind, mae_run, tmp_path, monkeypatch, capsys):
    captured = Captured(monkeypatch)
    argv = command(kind, mae_run, tmp_path) + ["--max-steps", "2"]
    assert main(argv + ["--out", str(tmp_path / "plain")]) == 130
    assert main(argv + ["--out", str(tmp_path / "compiled"), "--set", "train.compile=true"]) == 130
    plain, compiled = (model for model, _, _ in captured.calls)
    assert plain._compiled_call_impl is None and compiled._compiled_call_impl is not None
    assert "compile on" in capsys.readouterr().out


@pytest.mark.parametrize("kind", KINDS)
def test_the_loop_gets_the_runs_upkeep_records_and_evaluation(kind, mae_run, tmp_path, monkeypatch):
    """What ``train`` asks of the loop reaches it: seed, log and checkpoint intervals, checkpoints kept, the
    data workers, ``--force-config`` (also to the check of a trained run's configuration); the run's records
    (written by the main process) and, for the kinds that evaluate, their evaluation."""
    captured = Captured(monkeypatch)
    kept = []  # (run, config, kind, step, force) of each configuration check
    monkeypatch.setattr(mimkit.runs, "keep_config", lambda *args: kept.append(args))
    upkeep = [f"train.{key}" for key in ("seed=3", "log_every=2", "checkpoint_every=3", "keep_last=4")]
    workers = 1 if kind == "pretraining" else 0  # the others' evaluation loaders would start them
    argv = command(kind, mae_run, tmp_path) + ["--max-steps", "2", "--out", str(tmp_path / kind),
                                                "--set", f"data.num_workers={workers}", "--force-config"]
    assert main(argv + [arg for kv in upkeep for arg in ("--set", kv)]) == 130
    (_, _, _, options), records = captured.arguments[0]
    assert (options.seed, options.log_every, options.checkpoint_every, options.keep_last) == (3, 2, 3, 4)
    assert (options.num_workers, options.force_resume) == (workers, True)
    assert [(run, kept_kind, force) for run, _, kept_kind, _, force in kept] == [
        (tmp_path / kind, kind, True)]
    assert records["metrics"].enabled and records["checkpoints"].dir.parent == tmp_path / kind
    assert (records["evaluation"] is not None) == (kind != "pretraining")
    assert (tmp_path / kind / "data.json").is_file() == (kind == "pretraining")  # its start-up facts


@pytest.mark.parametrize("kind", KINDS)
def test_the_optimizer_takes_the_configured_betas_and_weight_decay(kind, mae_run, tmp_path, monkeypatch):
    """Both of each kind's ``optim`` settings that reach the optimizer itself, at values no default has:
    the betas of every group, the weight decay of those that decay (biases, norms and tokens at 0)."""
    captured = Captured(monkeypatch)
    argv = command(kind, mae_run, tmp_path) + ["--max-steps", "2", "--out", str(tmp_path / kind)]
    assert main(argv + ["--set", "optim.betas=[0.5,0.75]", "--set", "optim.weight_decay=0.125"]) == 130
    (optimizer, *_), _ = captured.arguments[0]
    assert {group["betas"] for group in optimizer.param_groups} == {(0.5, 0.75)}
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.0, 0.125}


def test_finetunes_eval_every_counts_epochs(mae_run, tmp_path, monkeypatch):
    """``eval_every`` of a fine-tuning run is in epochs (of several steps here), a segmentation run's in
    steps."""
    captured = Captured(monkeypatch)
    for epochs in (1, 2):
        argv = command("finetune", mae_run, tmp_path) + ["--max-steps", "2", "--out",
                                                         str(tmp_path / f"e{epochs}")]
        assert main(argv + ["--set", f"eval_every={epochs}"]) == 130
    one, two = (kwargs["evaluation"].every for _, kwargs in captured.arguments)
    assert one > 1 and two == 2 * one


def wrap_loss(monkeypatch, fault) -> None:
    """Run the runner's loop with ``fault(loss_fn)`` in place of each job's loss."""
    real = mimkit.runner.train
    monkeypatch.setattr(mimkit.runner, "train",
                        lambda model, loss_fn, *args, **kwargs: real(model, fault(loss_fn), *args, **kwargs))


def at_call(n: int, action):
    """A loss wrapper that calls ``action(loss)`` on the ``n``-th call and returns what it gives."""
    def fault(loss_fn):
        calls = [0]

        def wrapped(model, batch):
            calls[0] += 1
            loss, metrics = loss_fn(model, batch)
            return (action(loss) if calls[0] == n else loss), metrics
        return wrapped
    return fault


def stop_request(loss):
    os.kill(os.getpid(), signal.SIGTERM)  # as Slurm or kill: the loop finishes this step, saves, exits 130
    return loss


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_stops_on_sigterm_with_130_and_resumes_exactly(kind, mae_run, tmp_path, monkeypatch,
                                                                  capsys):
    argv = command(kind, mae_run, tmp_path) + ["--max-steps", "3"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main(argv + ["--out", str(straight)]) == 0
    with monkeypatch.context() as patch:
        wrap_loss(patch, at_call(2, stop_request))
        assert main(argv + ["--out", str(cut)]) == 130
    assert Checkpoints(cut).latest() == 2
    capsys.readouterr()
    assert main(argv + ["--out", str(cut)]) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    a, b = (load_file(Checkpoints(run).weights_path(3)) for run in (straight, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_halts_on_a_non_finite_loss(kind, mae_run, tmp_path, monkeypatch, capsys):
    wrap_loss(monkeypatch, at_call(2, lambda loss: loss * float("nan")))
    out = tmp_path / kind
    assert main(command(kind, mae_run, tmp_path) + ["--max-steps", "3", "--out", str(out)]) == 2
    assert "loss is nan at step 2" in capsys.readouterr().err
    assert Checkpoints(out).latest() is None  # step 1 was no checkpoint, and the bad step 2 is never saved


@pytest.mark.parametrize("kind", ["finetune", "segment"])
def test_a_run_directory_enters_each_module_once(kind, mae_run, tmp_path):
    """The measure of the opened run: followed from ``mimkit segment`` (and ``finetune``), the run directory
    is handed from one module into another (as an argument) at most once per module, and never up a layer: the
    loop and what lies below it get the opened run's parts (`mimkit.runner.OpenedRun`: its checkpoints and
    metric records), not the path again. (``mimkit pretrain`` reads a run's saved recipe and checkpoints
    before it opens it, to resume it with its own recipe: `mimkit.cli.pretrain_config`.)"""
    from tests.test_architecture import _layer

    out = tmp_path / "run"
    paths = {str(out), str(out.resolve())}
    entries: dict[str, set] = {}

    def record(frame, event, arg):
        module = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
        if event != "call" or not module.startswith("mimkit") or caller == module:
            return
        code = frame.f_code
        for name in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]:
            value = frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and str(value) in paths:
                entries.setdefault(module, set()).add((caller, code.co_name))

    argv = command(kind, mae_run, tmp_path) + ["--max-steps", "1", "--out", str(out)]
    sys.setprofile(record)
    try:
        assert main(argv) == 0
    finally:
        sys.setprofile(None)
    assert entries, "the tracer saw nothing"
    climbs = [(caller, module) for module, calls in entries.items() for caller, _ in calls
              if caller.startswith("mimkit") and _layer(module) > _layer(caller)]
    assert climbs == []
    assert {module: sorted(calls) for module, calls in entries.items() if len(calls) > 1} == {}


def test_only_the_main_process_holds_the_run_and_writes_its_records(tmp_path, monkeypatch):
    """`mimkit.runner.open_run`: the main process locks the run directory (made for it) and writes its
    records; another process of a distributed job neither makes, locks nor writes into it."""
    with mimkit.runner.open_run(tmp_path / "main") as run:
        assert (run.dir / LOCK).read_text() == f"{os.getpid()}\n" and run.metrics.enabled
        assert not run.force_config
    other_rank = World(rank=1, size=2, device=torch.device("cpu"))
    monkeypatch.setattr(mimkit.runner, "init_world", lambda: other_rank)
    with mimkit.runner.open_run(tmp_path / "other", force_config=True) as run:
        assert run.dir == tmp_path / "other" and run.force_config and not run.metrics.enabled
        assert not run.dir.exists()  # (a run that wrote nothing leaves nothing: checked while it is held)


@pytest.mark.parametrize("checkpointed", [None, torch.nn.Linear(2, 2)], ids=["none", "no ViT blocks"])
def test_gradient_checkpointing_of_a_job_without_vit_blocks_is_one_line(checkpointed):
    """A kind whose job names no module to checkpoint, or one that cannot, refuses
    ``train.grad_checkpointing`` before anything is built or written."""
    config = SimpleNamespace(train=TrainConfig(grad_checkpointing=True))
    job = Job("test", config, torch.nn.Linear(2, 2), None, None, [], (0.9, 0.95), None, 0, 0, "a test job",
              [], checkpointed=checkpointed)
    with pytest.raises(MimkitError, match="^train.grad_checkpointing is not available for a test job; it "
                                          "checkpoints ViT blocks$"):
        mimkit.runner.run_job(None, job)


def tiny_job() -> Job:
    """A pretraining job of a linear model, for the runner's own steps (its loop is `Captured`), using 1 data
    worker of the 3 it asked for."""
    model = torch.nn.Linear(2, 2)
    return Job("pretraining", PretrainConfig(), model, None, None, param_groups(model, 0), (0.9, 0.95),
               SimpleNamespace(schedule=None), 1, 3, "a test job", ["data      two points"])


def test_the_summary_and_its_engine_line_go_to_the_given_report_only(tmp_path, monkeypatch, caplog):
    Captured(monkeypatch)
    reports = []
    with caplog.at_level("INFO", logger="mimkit"), mimkit.runner.open_run(tmp_path / "run") as run:
        mimkit.runner.run_job(run, tiny_job(), reports.append)
    assert len(reports) == 1 and reports[0][0] == "data      two points"
    assert reports[0][1].startswith("engine    cpu, 1 process, fp32") and not caplog.records
    assert ", 1 data worker (asked 3; " in reports[0][1]  # the workers used, then those asked for


def test_a_trained_runs_configuration_is_checked_at_its_newest_step(tmp_path, monkeypatch):
    Captured(monkeypatch)
    job = tiny_job()
    mimkit.runs.save_run_config(tmp_path, job.kind, job.config)
    Checkpoints(tmp_path).save(3, job.model, {"step": 3})
    kept = []  # (run, config, kind, step, force) of each configuration check
    monkeypatch.setattr(mimkit.runs, "keep_config", lambda *args: kept.append(args))
    with mimkit.runner.open_run(tmp_path) as run:
        mimkit.runner.run_job(run, job, lambda lines: None)
    assert [(kind, step) for _, _, kind, step, _ in kept] == [("pretraining", 3)]
