"""Set up and run a pretraining job from a resolved configuration; the ``pretraining`` and ``tokenizer`` run
kinds (`mimkit.kinds`), whose methods are the registry's (`mimkit.registry`)."""

import logging
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

from mimkit.config import PretrainConfig
from mimkit.cpus import data_workers, usable_cpus
from mimkit.data.decode import MAX_IMAGE_PIXELS
from mimkit.data.filelist import train_source
from mimkit.data.loader import SeededViews
from mimkit.data.source_info import SourceInfo
from mimkit.data.sources import build_source
from mimkit.data.survey import held_out_count, size_hint, survey
from mimkit.errors import MimkitError
from mimkit.kinds import Kind, register_kind
from mimkit.registry import method_of, read_config
from mimkit.runner import Job, OpenedRun, open_run, run_job
from mimkit.runs import load_run, pretrained_encoder
from mimkit.train.loop import Evaluation
from mimkit.train.metrics_log import read_metrics
from mimkit.train.optim import param_groups
from mimkit.train.schedule import RunPlan, plan_run
from mimkit.viz import codebook_usage_plot, image_grid, run_panels, save_picture

logger = logging.getLogger(__name__)


def resolve_data(config: PretrainConfig, info: SourceInfo) -> PretrainConfig:
    """Fill the data fields left to the source (size, channels, normalization)."""
    img_size = config.data.img_size or info.image_size
    if img_size is None:
        raise MimkitError("the images in this folder differ in size; set one with --set data.img_size=224")
    data = replace(config.data, img_size=img_size, channels=info.channels,
                   mean=config.data.mean or list(info.mean), std=config.data.std or list(info.std))
    return replace(config, data=data)


def summary_lines(config: PretrainConfig, facts: dict, plan: RunPlan) -> list[str]:
    """The start-up summary's lines of a pretraining job, one short line per subject (the runner adds how it
    computes: `mimkit.runner.engine_line`)."""
    f = facts
    model, data = config.model, config.data
    grid = data.img_size // model.patch_size
    lines = [f"data      {f['data']}"]
    lines += [f"          {f['file_list']}"] if f["file_list"] else []
    lines += [f"recipe    {f['recipe']}"] if f["recipe"] else []
    describe = method_of(config.method).describe
    masked = describe(config) if describe else ""  # MAE's mask ratio
    lines += [f"model     {config.method} {model.name}, {data.img_size} px in {model.patch_size}-px "
              f"patches ({grid}x{grid} grid){masked}",
              f"run       {plan.describe()}"]
    if f["size_hint"] and not f["auto_size"] and f["resumed_from"] is None:  # too late for a resumed run
        fit = " ".join(f"--set {k}={v}" for k, v in f["size_hint"].items())
        lines.append(f"hint      images (median {f['median_size']}) are much smaller than "
                     f"{data.img_size} px: {fit} fits them (or --auto-size)")
    elif f["auto_size"]:
        lines.append(f"auto-size {' '.join(f'{k}={v}' for k, v in f['size_hint'].items())} "
                     f"fits images of median {f['median_size']}")
    return lines


def _auto_sized(config: PretrainConfig, hint: dict) -> PretrainConfig:
    data = replace(config.data, img_size=hint["data.img_size"])
    return replace(config, data=data, model=replace(config.model, patch_size=hint["model.patch_size"]))


def pretraining_job(config: PretrainConfig, run: OpenedRun, *, recipe: str = "", rescan: bool = False,
                    auto_size: bool = False) -> Job:
    """Set up a pretraining job: its data (the stored file list when resuming), model, plan and the facts of
    its start-up summary. Writes a folder's file list (`mimkit.runs.HeldRun.file_list`).

    Args:
        config: the resolved configuration.
        run: the opened run directory (resumed when it holds a checkpoint).
        recipe: one line on which recipe the configuration came from and why, for the summary.
        rescan: list a folder again instead of reading the stored file list (`mimkit.data.filelist`).
        auto_size: when the images are at most half of ``data.img_size``, train at the image and patch size
            that fit them (`mimkit.data.survey.size_hint`); refused for a run that has checkpoints.
    """
    world = run.world
    torch.manual_seed(config.train.seed)  # identical initial weights on every rank
    data = config.data
    source, list_note = train_source(data.source, run.held.file_list, root=data.root,
                                     channels=data.channels,
                                     skip_bad_images=data.skip_bad_images, max_bad_images=data.max_bad_images,
                                     rescan=rescan, store=world.is_main,
                                     max_image_pixels=data.max_image_pixels or MAX_IMAGE_PIXELS,
                                     # a large file is decoded at a reduced size that still gives every crop
                                     # of the view its full detail
                                     decode_min_side=3 * data.img_size if data.img_size else None)
    found = survey(source, held_out_count(data.source, data.root))
    hint = size_hint(data.img_size, found)
    resumed_from = run.checkpoints.latest()
    if auto_size and hint:
        if resumed_from is not None:
            raise MimkitError(f"--auto-size would change the image and patch size of the run in '{run.dir}', "
                              "which has checkpoints; use a new --out")
        config = _auto_sized(config, hint)
    config = resolve_data(config, source.info)
    method = method_of(config.method)
    if method.resolve_config:  # fields left to something outside the run, e.g. a tokenizer
        config = method.resolve_config(config)
    model = method.build_model(config).to(world.device)
    view, loss_fn = method.build_task(config, model)
    # evaluated at each epoch end and at the end, e.g. a tokenizer's codebook usage on held-out images
    evaluate = method.build_evaluate(config, model) if method.build_evaluate else None
    # more values scheduled per step, e.g. the dVAE's Gumbel temperature
    values_fn = partial(method.schedule_values, config) if method.schedule_values else None
    plan = plan_run(len(source), world.size, config.train, config.optim, values_fn)
    workers = data_workers(config.data.num_workers)
    facts = {"data": found.describe(), **asdict(found), "median_size": "x".join(map(str, found.median)),
             "file_list": list_note, "recipe": recipe, "size_hint": hint,
             "auto_size": bool(auto_size and hint),
             "num_workers": workers, "usable_cpus": usable_cpus(),
             "torch_threads": torch.get_num_threads(), "run": plan.describe(), "resumed_from": resumed_from}
    return Job(method.kind, config, model, loss_fn, SeededViews(source, view),
               param_groups(model, config.optim.weight_decay), config.optim.betas, plan, workers,
               config.data.num_workers, f"pretrain {config.method}", summary_lines(config, facts, plan),
               checkpointed=model, evaluation=Evaluation(evaluate) if evaluate else None, facts=facts,
               after_step=partial(method.after_step, config, model) if method.after_step else None)


def run_pretraining(config: PretrainConfig, run_dir: str | Path,
                    report: Callable[[list[str]], None] | None = None, *, force_config: bool = False,
                    **options) -> dict:
    """Pretrain ``config.method`` into ``run_dir`` (resuming when it holds a checkpoint) with the one runner
    (`mimkit.runner`), holding the run directory's lock meanwhile.

    Args:
        report: receives the start-up summary's lines (main process); None logs them (`logging`).
        force_config: resume a trained run whose configuration, number of processes or global batch differ
            from this one's (otherwise refused; `mimkit.runs.keep_config`).
        options: `pretraining_job`'s keyword arguments.

    Returns:
        The training loop's summary (final step, whether it was interrupted, where it resumed from).
    """
    with open_run(run_dir, force_config) as run:
        return run_job(run, pretraining_job(config, run, **options), report)


def visualize_pretraining(config: PretrainConfig, run_dir: Path, out: Path, n: int, seed: int) -> list[Path]:
    """``mimkit visualize RUN``: the method's pictures (`mimkit.registry.Method.pictures`) of ``n`` test
    images (training images for folders without a test split); a tokenizer run's codebook usage over training
    beside them (``<out>-usage.png``)."""
    model, _ = load_run(run_dir)
    data = config.data
    try:
        source = build_source(data.source, split="test", root=data.root, channels=data.channels)
    except MimkitError:  # folders without a test split
        source = build_source(data.source, split="train", root=data.root, channels=data.channels)
    picks = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:n]
    panels = run_panels(model, config, source, picks.tolist(), seed)
    written = [save_picture(image_grid(panels, data.mean, data.std), out)]
    if method_of(config.method).kind == "tokenizer":  # its codebook over training as well
        usage = out.with_name(f"{out.stem}-usage.png")
        written.append(save_picture(codebook_usage_plot(read_metrics(run_dir)), usage))
    return written


for _name, _summary in (("pretraining", "mimkit pretrain METHOD: an encoder pretrained by a MIM method"),
                        ("tokenizer", "mimkit tokenizer train METHOD: a visual tokenizer")):
    register_kind(Kind(_name, PretrainConfig, _summary, read=read_config, spec=lambda config: config,
                       encoder=pretrained_encoder, load=lambda config, run_dir: load_run(run_dir)[0],
                       visualize=visualize_pretraining))
