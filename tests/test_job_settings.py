"""Every setting of a pretraining, fine-tuning and segmentation run reaches the job the runner trains: a
non-default value gives another plan (length, lr schedule, accumulation, clipping), optimizer groups or
betas, training images and samples, loss or trained state, or evaluation than the default does.

`job_of` runs a command's library entry point with the runner replaced by one that keeps the `Job` it is
given, so nothing trains; `outcome` takes what the runner would use of the job, a training step on two of
its samples, and (segmentation) the evaluation after it. A setting that the config holds but the job does
not use (the run's value dropped for a default) leaves the outcome equal. The methods' own settings are
`tests/methods/test_settings_reach.py`'s. Settings that only the runner or the loop read (``train.log_every``,
``checkpoint_every``, ``keep_last``, ``compile``, ``grad_checkpointing``) are the loop's tests'.
"""

from functools import partial, reduce

import pytest
import torch

import mimkit.eval.finetune as finetune
import mimkit.eval.segment as segment
import mimkit.pretrain as pretrain
from mimkit.config import from_dict, merge
from mimkit.eval.config import FinetuneConfig, SegmentConfig
from mimkit.registry import read_config
from tests.conftest import TINY_MAE_KWARGS, same_outcomes
from tests.eval.test_segment import write_layout

DATA = {"source": "synthetic:64", "num_workers": 0}  # 32 px, 3 channels, 10 classes
TRAIN = {"batch_size": 4, "epochs": 2}  # 32 steps
OPTIM = {"warmup_epochs": 0.5}  # (the defaults warm up longer than the run: its min_lr never reached)
MAE_MODEL = {"name": "vit_mini", "kwargs": {k: int(v) for k, v in (kv.split("=") for kv in TINY_MAE_KWARGS)}}

# (dotted key, value) of the sections every kind has
COMMON = [("optim.base_lr", 1e-3), ("optim.min_lr", 1e-4), ("optim.weight_decay", 0.2),
          ("optim.betas", (0.8, 0.9)), ("optim.warmup_epochs", 2.0), ("optim.clip_grad", 1.0),
          ("train.max_steps", 30), ("train.batch_size", 2), ("train.accum_steps", 2), ("train.seed", 3)]
PRETRAIN = [*COMMON, ("train.epochs", 3), ("data.img_size", 16), ("data.mean", [0.4] * 3),
            ("data.std", [0.3] * 3)]
FINETUNE = [*COMMON, ("train.epochs", 3), ("data.mean", [0.4] * 3), ("data.std", [0.3] * 3),
            ("optim.layer_decay", 0.5), ("classifier.pool", "cls"), ("classifier.drop_path", 0.5),
            ("classifier.init", "random"), ("classifier.num_classes", 12),
            ("augment.crop_scale", (0.2, 0.4)), ("augment.auto_augment", None), ("augment.reprob", 0.0),
            ("augment.mixup", 0.0), ("augment.cutmix", 0.0), ("augment.mixup_switch_prob", 0.0),
            ("augment.mixup_prob", 0.0), ("augment.label_smoothing", 0.3),
            ("labels.fraction", 0.5), ("labels.val_fraction", 0.25), ("ema_decay", 0.5), ("eval_every", 2)]
# (dotted key, value, the base it changes): settings that matter only beside another's value
FINETUNE_BESIDE = [("augment.remode", "const", {"augment": {"reprob": 1.0}}),
                   ("labels.seed", 1, {"labels": {"fraction": 0.5}})]


SEGMENT = [*COMMON, ("train.epochs", 3), ("optim.layer_decay", 0.5), ("labels.fraction", 0.5),
           ("eval_every", 2), ("eval_images", 2), ("data.mean", [0.4] * 3), ("data.std", [0.3] * 3),
           *[(f"seg.{name}", value) for name, value in
             (("head", "linear"), ("init", "random"), ("freeze_encoder", True), ("crop_size", 16),
              ("scale", (64, 48)), ("ratio_range", (1.0, 1.5)), ("cat_max_ratio", 0.3),
              ("photometric", False), ("blocks", [0, 0, 1, 1]), ("channels", 16), ("aux_channels", 8),
              ("aux_weight", 1.0),
              ("drop_path", 0.5), ("rel_pos_bias", True), ("eval_flip", True), ("eval_scale", (64, 48)),
              ("eval_scales", [0.5, 1.0]))]]
SEGMENT_BESIDE = [("labels.seed", 1, {"labels": {"fraction": 0.5}}),
                  ("seg.eval_mode", "slide", {"seg": {"crop_size": 16}}),  # a 16 px window on 32 px images
                  ("seg.eval_stride", 8, {"seg": {"eval_mode": "slide", "crop_size": 16}})]
CASES = [*[("pretrain", key, value, {}) for key, value in PRETRAIN],
         *[("finetune", key, value, {}) for key, value in FINETUNE],
         *[("finetune", *case) for case in FINETUNE_BESIDE],
         *[("segment", key, value, {}) for key, value in SEGMENT],
         *[("segment", *case) for case in SEGMENT_BESIDE]]
# kind -> (its module, entry point, config reader, (encoder, scenes) -> the configuration the cases change)
KINDS = {
    "pretrain": (pretrain, pretrain.run_pretraining, read_config,
                 lambda encoder, scenes: {"method": "mae", "data": DATA, "model": MAE_MODEL, "train": TRAIN,
                                          "optim": OPTIM, "mae": {"mask_ratio": 0.5}}),
    "finetune": (finetune, finetune.run_finetune, partial(from_dict, FinetuneConfig),
                 lambda encoder, scenes: {"encoder": encoder, "data": DATA, "train": TRAIN, "optim": OPTIM,
                                          "eval_batch_size": 8}),
    "segment": (segment, segment.run_segment, partial(from_dict, SegmentConfig),
                lambda encoder, scenes: {"encoder": encoder, "data": {"source": scenes, "num_workers": 0},
                                         "train": TRAIN, "optim": OPTIM}),
}


def nested(key: str, value) -> dict:
    """``("optim.base_lr", 1e-3)`` -> ``{"optim": {"base_lr": 1e-3}}``."""
    *sections, name = key.split(".")
    return reduce(lambda inner, section: {section: inner}, reversed(sections), {name: value})


def job_of(monkeypatch, module, run, *args):
    """The `Job` that ``module``'s entry point ``run`` hands the runner."""
    jobs = []
    monkeypatch.setattr(module, "run_job", lambda run, job, *rest: jobs.append(job) or {"interrupted": True})
    run(*args)
    return jobs[0]


def outcome(job) -> list:
    """What the runner uses of ``job``, and a training step on two of its samples (seeded as the loader
    seeds them) with the job's own after_step; a segmentation job's evaluation after it."""
    groups = [{k: v for k, v in group.items() if k != "params"} | {"size": len(group["params"])}
              for group in job.param_groups]
    evaluation = job.evaluation and (job.evaluation.every, job.evaluation.keep_best)
    torch.manual_seed(0)
    samples = [job.dataset[(index, 5 + index)] for index in range(2)]
    batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
    torch.manual_seed(1)
    loss, _ = job.loss_fn(job.model, batch)
    loss.backward()
    torch.optim.SGD(job.model.parameters(), lr=0.5).step()
    if job.after_step:
        job.after_step(1)
    images = list(getattr(job.dataset.source, "indices", range(len(job.dataset))))  # the images it trains on
    scores = job.evaluation.evaluate(job.model) if job.kind == "segment" else None  # a few small images
    described = [repr(job.plan), job.betas, groups, evaluation, images, scores]
    return [*described, *batch.values(), loss.detach(), *job.model.state_dict().values()]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_layout(tmp_path_factory.mktemp("scenes"), "generic")


_BASE_OUTCOMES: dict[str, list] = {}  # each kind's and base's outcome, computed once


@pytest.mark.parametrize("kind, key, value, base", CASES, ids=[f"{kind}:{k}" for kind, k, *_ in CASES])
def test_a_non_default_setting_changes_the_job(monkeypatch, tmp_path, mae_run, scenes, kind, key, value,
                                                base):
    module, entry, read, configuration = KINDS[kind]
    assert reduce(getattr, key.split("."), read({})) != value, "the case must leave the default"
    values = configuration(str(mae_run), str(scenes))

    def run(change: dict) -> list:
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        return outcome(job_of(monkeypatch, module, entry, read(merge(values, change)), out))

    name = f"{kind} {base}"
    if name not in _BASE_OUTCOMES:
        _BASE_OUTCOMES[name] = run(base)
    assert not same_outcomes(_BASE_OUTCOMES[name], run(merge(base, nested(key, value))))


@pytest.mark.parametrize("kind", KINDS)
def test_two_jobs_of_the_same_configuration_give_the_same(monkeypatch, tmp_path, mae_run, scenes, kind):
    """What the test above compares is deterministic: otherwise every setting would seem to reach the job."""
    module, entry, read, configuration = KINDS[kind]
    values = configuration(str(mae_run), str(scenes))
    first, second = (outcome(job_of(monkeypatch, module, entry, read(values), tmp_path / name))
                     for name in ("a", "b"))
    assert same_outcomes(first, second)
