"""Every flag of ``mimkit linprobe`` and ``mimkit knn`` reaches the step it sets: a non-default value changes
what the feature pass is asked for (`probe_data`) or what the probe is trained and scored with
(`train_linear_probe`, `knn_accuracy`), each called through a spy that records its arguments.

The probes' numbers are accuracies, which a dropped setting often leaves unchanged on separable features
(the fifth fresh set's linear probe lr survived so); the arguments it reached do not.
"""

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import mimkit.eval.knn as knn
import mimkit.eval.linprobe as linprobe
from mimkit.cli import main
from tests.conftest import same_outcomes

COMMON = [("--init", "random"), ("--pool", "avg"), ("--label-fraction", "0.5"), ("--val-fraction", "0.25"),
          ("--seed", "1"), ("--features-cache", "OTHER"), ("--num-workers", "1"), ("--layer", "1")]
CASES = [*[("linprobe", *flag) for flag in COMMON], *[("knn", *flag) for flag in COMMON],
         ("linprobe", "--epochs", "3"), ("linprobe", "--batch-size", "16"), ("linprobe", "--lr", "0.05"),
         ("linprobe", "--optimizer", "lars"), ("linprobe", "--weight-decay", "0.05"), ("knn", "--k", "5"),
         ("knn", "--temperature", "0.5")]
# command -> its module, the functions spied there, and its flags of every run
SPIED = {"linprobe": (linprobe, ("probe_data", "train_linear_probe"), ["--epochs", "2"]),
         "knn": (knn, ("probe_data", "knn_accuracy"), [])}


def flat(value) -> list:
    """The tensors and plain values in nested calls' arguments, in order: a module by its state, a dataclass
    (the `mimkit.runs.Encoder`) by its fields, any other object (the metrics log, a callback) by its type."""
    if isinstance(value, nn.Module):
        return flat(value.state_dict())
    if dataclasses.is_dataclass(value):
        return flat({field.name: getattr(value, field.name) for field in dataclasses.fields(value)})
    if isinstance(value, dict):
        return [item for key in value for item in [key, *flat(value[key])]]
    if isinstance(value, (list, tuple)):
        return [item for v in value for item in flat(v)]
    plain = value is None or isinstance(value, (torch.Tensor, int, float, str, Path))
    return [value if plain else type(value).__name__]


def spied_run(monkeypatch, tmp_path, run, command: str, *flags: str) -> list:
    """The arguments each spied function of ``command`` on the encoder of ``run`` was called with, in
    order; ``OTHER`` in ``flags``: another folder."""
    module, names, always = SPIED[command]
    calls = []

    def spy(name: str):
        real = getattr(module, name)

        def recorded(*args, **kwargs):
            calls.append((name, args, kwargs))
            return real(*args, **kwargs)
        return recorded

    for name in names:
        monkeypatch.setattr(module, name, spy(name))
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    flags = [str(tmp_path / "other") if flag == "OTHER" else flag for flag in flags]
    assert main([command, str(run), "--data", "synthetic:64", "--out", str(out), "--num-workers", "0",
                 "--features-cache", str(tmp_path / "cache"), *always, *flags]) == 0
    return flat(calls)


@pytest.mark.parametrize("command, flag, value", CASES, ids=[f"{c} {f}" for c, f, _ in CASES])
def test_a_non_default_flag_reaches_the_probe(monkeypatch, tmp_path, mae_run, command, flag, value):
    default = spied_run(monkeypatch, tmp_path, mae_run, command)
    assert not same_outcomes(default, spied_run(monkeypatch, tmp_path, mae_run, command, flag, value))


def test_the_seed_reaches_the_linear_probe_itself(monkeypatch, tmp_path, mae_run):
    """``--seed`` draws the probe's initialisation and data order, not only the label split: with only
    `train_linear_probe` spied (the whole labels, so the features it gets are the same), the seed still tells
    the two runs apart."""
    monkeypatch.setitem(SPIED, "linprobe", (linprobe, ("train_linear_probe",), ["--epochs", "2"]))
    default = spied_run(monkeypatch, tmp_path, mae_run, "linprobe")
    assert not same_outcomes(default, spied_run(monkeypatch, tmp_path, mae_run, "linprobe", "--seed", "1"))


@pytest.mark.parametrize("command", SPIED)
def test_two_runs_with_the_same_flags_record_the_same(monkeypatch, tmp_path, mae_run, command):
    """What the test above compares is deterministic: otherwise every flag would seem to reach the probe."""
    first = spied_run(monkeypatch, tmp_path, mae_run, command)
    assert same_outcomes(first, spied_run(monkeypatch, tmp_path, mae_run, command))
