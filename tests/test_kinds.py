"""A new kind of run is its own module, nothing else: a throwaway denoising fine-tune, registered here, trains
with the one runner, resumes, writes its results, is read back by its ``kind:`` and is listed by the CLI;
and runs saved before ``config.yaml`` said its kind are still recognised."""

import importlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn

import mimkit.kinds as kinds
from mimkit.cli import main
from mimkit.config import DataConfig, OptimConfig, TrainConfig
from mimkit.data.loader import SeededViews
from mimkit.data.sources import build_source
from mimkit.data.transforms import eval_view
from mimkit.errors import MimkitError
from mimkit.eval.scores import write_results
from mimkit.kinds import Kind, kind_of, register_kind, registered_kinds
from mimkit.runner import Job, open_run, run_job
from mimkit.runs import config_path, kind_name, load_encoder, read_run
from mimkit.train.checkpoint_files import Checkpoints
from mimkit.train.optim import param_groups
from mimkit.train.schedule import plan_run
from tests.conftest import TINY_MAE_KWARGS


@dataclass
class DenoiseConfig:
    encoder: str = ""
    noise: float = 0.2  # std of the Gaussian noise added to the normalized image
    data: DataConfig = field(default_factory=lambda: DataConfig(source="synthetic", num_workers=0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_epochs=0.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=2, batch_size=8))


class Denoiser(nn.Module):
    """An encoder and a linear head that predicts each patch's clean pixels from a noisy image."""

    def __init__(self, encoder: nn.Module, pixels_per_patch: int):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.embed_dim, pixels_per_patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(images)[:, self.encoder.num_prefix_tokens:]
        return self.head(tokens)  # [B, L, p*p*C]


def patches(images: torch.Tensor, p: int) -> torch.Tensor:
    return images.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)


def run_denoise(config: DenoiseConfig, run_dir: Path) -> dict:
    with open_run(run_dir) as run:
        encoder = load_encoder(config.encoder)
        spec, p = encoder.spec.data, encoder.spec.model.patch_size
        source = build_source(config.data.source, "train", channels=spec.channels)
        torch.manual_seed(config.train.seed)
        model = Denoiser(encoder.model, p * p * spec.channels).to(run.world.device)

        def loss_fn(model, batch):
            clean = batch["image"]
            return F.mse_loss(model(clean + config.noise * torch.randn_like(clean)), patches(clean, p)), {}

        plan = plan_run(len(source), run.world.size, config.train, config.optim)
        job = Job("denoise", config, model, loss_fn,
                  SeededViews(source, eval_view(spec.img_size, spec.mean, spec.std)),
                  param_groups(model, config.optim.weight_decay), config.optim.betas, plan, 0, 0, "denoise",
                  [f"denoise {spec.img_size} px images, noise {config.noise}"], checkpointed=encoder.model)
        summary = run_job(run, job)
        if not summary["interrupted"]:
            write_results(run.dir, {"protocol": "denoise", "steps": summary["step"]})
        return summary


register_kind(Kind("denoise", DenoiseConfig, "a test's denoising fine-tune"))


def test_a_kind_registered_in_a_test_trains_resumes_writes_results_and_is_listed(mae_run, tmp_path, capsys):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    config = DenoiseConfig(encoder=str(mae_run),
                           train=TrainConfig(max_steps=4, batch_size=8, checkpoint_every=2, keep_last=3))
    assert run_denoise(config, straight) == {"step": 4, "interrupted": False, "resumed_from": None}
    cut_at(straight, cut, 4)
    assert run_denoise(config, cut) == {"step": 4, "interrupted": False, "resumed_from": 2}
    a, b = (load_file(Checkpoints(run).weights_path(4)) for run in (straight, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((cut / "results.json").read_text()) == {"protocol": "denoise", "steps": 4}
    assert yaml.safe_load(config_path(cut).read_text())["kind"] == "denoise"
    kind, saved = read_run(cut)
    assert kind is kind_of("denoise") and saved == config
    assert main(["kinds"]) == 0
    assert "denoise      a test's denoising fine-tune" in capsys.readouterr().out


def cut_at(run: Path, copy: Path, step: int) -> None:
    """``copy``: ``run`` as it was before its checkpoint of ``step`` (and its results) were written."""
    shutil.copytree(run, copy)
    checkpoints = Checkpoints(copy)
    for path in (checkpoints.weights_path(step), checkpoints.state_path(step), copy / "results.json"):
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("values, kind", [
    ({"method": "mae", "data": {}}, "pretraining"),
    ({"method": "dvae"}, "tokenizer"),
    ({"encoder": "runs/mae", "encoder_config": {"method": "mae"}, "classifier": {}}, "finetune"),
    ({"encoder": "runs/mae", "encoder_config": {"method": "mae"}, "seg": {}}, "segment"),
    ({"kind": "segment", "method": "mae"}, "segment"),  # a new run: what it says wins
])
def test_runs_saved_before_config_said_their_kind_are_recognised(values, kind):
    assert kind_name(values) == kind


TINY = [arg for kv in TINY_MAE_KWARGS for arg in ("--set", f"model.kwargs.{kv}")]


@pytest.mark.parametrize("kind", ["pretraining", "finetune"])
def test_a_run_saved_without_its_kind_resumes_bit_for_bit(kind, mae_run, tmp_path):
    """A run directory made before config.yaml said its kind (its config.yaml as such runs wrote it) resumes
    exactly where a run that never stopped goes, and its config.yaml is left as it was."""
    if kind == "pretraining":
        argv = ["pretrain", "mae", "--data", "synthetic", *TINY]
    else:
        argv = ["finetune", str(mae_run), "--data", "synthetic", "--set", "eval_batch_size=256"]
    argv += ["--batch-size", "8", "--max-steps", "4", "--set", "data.num_workers=0", "--set",
             "train.checkpoint_every=2", "--set", "train.keep_last=3"]
    straight, old = tmp_path / "straight", tmp_path / "old"
    assert main(argv + ["--out", str(straight)]) == 0
    cut_at(straight, old, 4)
    values = yaml.safe_load(config_path(old).read_text())
    assert values.pop("kind") == kind
    config_path(old).write_text(yaml.safe_dump(values, sort_keys=False))  # the old format
    assert read_run(old)[0].name == kind
    assert main(argv + ["--out", str(old)]) == 0
    a, b = (load_file(Checkpoints(run).weights_path(4)) for run in (straight, old))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "kind" not in yaml.safe_load(config_path(old).read_text())


def test_a_run_of_another_kind_or_encoder_is_never_resumed(mae_run, tmp_path, capsys):
    other = shutil.copytree(mae_run, tmp_path / "pretrained")
    argv = ["--data", "synthetic", "--max-steps", "1", "--batch-size", "8", "--set", "data.num_workers=0",
            "--set", "eval_batch_size=256"]
    assert main(["finetune", str(mae_run), "--out", str(other), *argv, "--force-config"]) == 2
    assert "holds another run (a pretraining run of mae)" in capsys.readouterr().err
    ft = tmp_path / "ft"
    assert main(["finetune", str(mae_run), "--out", str(ft), *argv]) == 0
    assert main(["finetune", str(other), "--out", str(ft), *argv, "--force-config"]) == 2
    assert f"holds another run (a finetune run of {mae_run})" in capsys.readouterr().err



def test_listing_the_kinds_loads_the_built_in_ones(monkeypatch):
    """``registered_kinds`` imports the built-in kinds' modules itself: a process that has imported none of
    them (``mimkit kinds`` at start-up) still lists all of them."""
    imported = []
    monkeypatch.setattr(kinds, "_KINDS", {})
    monkeypatch.setattr(kinds.importlib, "import_module", imported.append)
    registered_kinds()
    assert imported == list(kinds.BUILTIN_KINDS)



def test_the_built_in_modules_register_the_six_built_in_kinds(monkeypatch):
    """A process that has imported none of the kinds' modules (``mimkit kinds`` at start-up) gets every
    built-in kind from `BUILTIN_KINDS`, in the order ``mimkit kinds`` lists them: none of them is left out."""
    monkeypatch.setattr(kinds, "_KINDS", {})
    for name in kinds.BUILTIN_KINDS:  # imported afresh, then put back as they were
        parent, _, child = name.rpartition(".")
        monkeypatch.setattr(importlib.import_module(parent), child, sys.modules[name])
        monkeypatch.delitem(sys.modules, name)
    assert list(registered_kinds()) == ["pretraining", "tokenizer", "finetune", "segment", "linprobe", "knn"]


def test_an_unknown_kind_is_looked_for_among_the_built_in_ones_and_a_name_is_registered_once(monkeypatch):
    """``kind_of`` loads the built-in kinds before it refuses a name it does not know (one line, listing the
    known); a second kind under a name taken is refused."""
    monkeypatch.setattr(kinds, "_KINDS", dict(registered_kinds()))
    imported = []
    monkeypatch.setattr(kinds.importlib, "import_module", imported.append)
    pretraining = kind_of("pretraining")
    assert pretraining.name == "pretraining" and imported == []
    with pytest.raises(MimkitError, match=r"run kind .nonsense. is unknown \(kinds: .*pretraining, "):
        kind_of("nonsense")
    assert imported == list(kinds.BUILTIN_KINDS)
    with pytest.raises(ValueError, match="run kind 'pretraining' is registered twice"):
        register_kind(pretraining)
    toy = Kind("toy", dict)
    assert register_kind(toy) is toy and kind_of("toy") is toy  # a module may keep the record it registers
