"""The ``mimkit`` command.

    mimkit pretrain mae --data fashion-mnist --model vit_mini --out runs/mae [--epochs N | --max-steps N]
    mimkit tokenizer train dvae --data fashion-mnist --out runs/dvae [--epochs N | --max-steps N]
    mimkit pretrain beit --tokenizer runs/dvae --data fashion-mnist --model vit_tiny --out runs/beit
    mimkit tokenizer train vqkd --teacher runs/mae --data fashion-mnist --out runs/vqkd
    mimkit pretrain beitv2 --tokenizer runs/vqkd --data fashion-mnist --model vit_tiny --out runs/beitv2
    mimkit visualize runs/mae --out recon.png [--n 8]
    mimkit finetune runs/mae --data fashion-mnist --out runs/ft [--label-fraction 0.1] [--init random]
    mimkit linprobe runs/mae --data fashion-mnist --out runs/lp     (knn: the same arguments)
    mimkit segment runs/mae --data fmnist-scenes --out runs/seg [--head linear] [--init random]
    mimkit segment runs/mae --data MY_VOC_FOLDER --out runs/seg --auto-size   (sized to small images)
    mimkit evaluate runs/seg --out runs/seg-eval [--tta ms]   (a split's scores and confusion matrix)
    mimkit predict runs/seg --images DIR --out DIR [--tta flip]   (a fine-tuning run too: predictions.csv)
    mimkit knn runs/mae --data fashion-mnist --out runs/knn-depth --layer all   (--layer N: block N)
    mimkit import mae_pretrain_vit_base.pth --format mae --out runs/mae-b   (mae|beit|beitv2|vqkd|timm|hf)
    mimkit export runs/mae --to hf --out exported/   (--to timm; --encoder-only)
    mimkit data pack images/ --out shards/ --shard-size 1GB   (then --data shards:shards/)
    mimkit kinds   (the kinds of run: pretraining, tokenizer, finetune, segment, linprobe, knn, plug-ins)

Bad input ends with a one-line ``error:`` message and exit status 2, never a traceback.

Each subcommand parses its flags, builds its configuration and calls its kind's runner (`mimkit.runner`) or
function; what a run does lives with its kind (`mimkit.kinds`). This module imports only what loads no torch
at its top, and every handler imports the rest inside itself: OpenMP reads its thread settings once, when
torch loads, so `main` must set them (`mimkit.cpus.set_thread_defaults`) before anything imports torch. That
is why the imports below sit in functions; it is said here once, not at each of them.
"""

import argparse
import gc
import logging
import sys
from pathlib import Path

from mimkit.config import (
    PretrainConfig,
    check_range,
    from_dict,
    load_recipe,
    merge,
    parse_overrides,
    to_dict,
)
from mimkit.cpus import set_thread_defaults
from mimkit.errors import Interrupted, MimkitError

BUILTIN_DATA = ("fashion-mnist", "mnist", "synthetic")
SMALL_DATA_IMAGES = 100_000  # a folder with fewer images gets the method's small-data recipe, when it has one
SMALL_SEGMENTATION_IMAGES = 10_000  # a segmentation folder with fewer training images gets segment_small


def choose_recipe(method: str, data: str) -> tuple[str, str]:
    """The packaged recipe for a method, and why: the Fashion-MNIST one for the built-in small data sets;
    for a folder of fewer than `SMALL_DATA_IMAGES` images the small-data one (``mae_small``) when the method
    has one; the paper's ImageNet one for everything else."""
    from mimkit.config import recipe_names
    from mimkit.data.sources import count_images

    if data.split(":")[0] in BUILTIN_DATA:
        return f"{method}_fmnist", "the recipe of the built-in data sets"
    if f"{method}_small" in recipe_names() and Path(data).expanduser().is_dir():
        count = count_images(data, stop_after=SMALL_DATA_IMAGES)
        if count < SMALL_DATA_IMAGES:
            return f"{method}_small", (f"{count} images, fewer than {SMALL_DATA_IMAGES:,} ({method}_in1k is "
                                       "for ImageNet-sized folders; --config NAME picks another)")
        return f"{method}_in1k", f"{SMALL_DATA_IMAGES:,} images or more"
    return f"{method}_in1k", "the paper's ImageNet-1K recipe"


def default_recipe(method: str, data: str) -> str:
    """The name of `choose_recipe`'s recipe."""
    return choose_recipe(method, data)[0]


def train_flags(args: argparse.Namespace) -> dict:
    """The ``train`` section that ``--epochs``, ``--max-steps`` and ``--batch-size`` set."""
    train: dict = {}
    if args.epochs is not None:
        train |= {"epochs": args.epochs, "max_steps": None}
    if args.max_steps is not None:
        train["max_steps"] = args.max_steps
    if args.batch_size is not None:
        train["batch_size"] = args.batch_size
    return train


def pretrain_config(args: argparse.Namespace) -> tuple[PretrainConfig, str]:
    """Defaults ← recipe ← command-line flags ← ``--set`` overrides. Without ``--config``, a run directory
    that already holds a configuration (an interrupted or an imported run) is its own recipe.

    Returns:
        The configuration, and one line on which recipe it came from and why.
    """
    from mimkit.registry import read_config
    from mimkit.runs import config_path, is_run_dir, saved_values

    saved = config_path(args.out)
    if args.config:
        recipe, why = load_recipe(args.config), f"{args.config} (--config)"
    elif saved.is_file() and is_run_dir(args.out):
        recipe, why = saved_values(args.out), f"{saved} (the run's own, resumed)"
    else:
        name, reason = choose_recipe(args.method, args.data or "fashion-mnist")
        recipe, why = load_recipe(name), f"{name}: {reason}"
    flags: dict = {"data": {}, "model": {}, "train": train_flags(args)}
    if args.data:
        flags["data"]["source"] = args.data
    if args.model:
        flags["model"]["name"] = args.model
    if args.skip_bad_images:
        flags["data"]["skip_bad_images"] = True
    if args.tokenizer:
        flags[args.method] = {"tokenizer": args.tokenizer}
    if args.teacher:  # beside --tokenizer, not instead: a method may take both (CAE's two targets)
        flags[args.method] = {**flags.get(args.method, {}), "teacher": args.teacher}
    values = merge(merge(recipe, flags), parse_overrides(args.set))
    values["method"] = args.method
    return read_config(values), why


def check_run_dir(out: Path, config: PretrainConfig, must_resume: bool) -> None:
    """Refuse to mix two different runs in one directory."""
    from mimkit.runs import load_config
    from mimkit.train.checkpoint_files import Checkpoints

    has_checkpoint = Checkpoints(out).latest() is not None
    if must_resume and not has_checkpoint:
        raise MimkitError(f"--resume: '{out}' holds no checkpoint to resume from")
    if has_checkpoint:
        saved = load_config(out)
        if (saved.method, saved.model.name) != (config.method, config.model.name):
            raise MimkitError(f"'{out}' holds a {saved.method} {saved.model.name} run; "
                              f"choose another --out for {config.method} {config.model.name}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from mimkit.pretrain import run_pretraining
    from mimkit.registry import registered

    config, recipe = pretrain_config(args)
    out = Path(args.out)
    check_run_dir(out, config, args.resume)
    summary = run_pretraining(config, out, report=lambda lines: print("\n".join(lines), flush=True),
                              recipe=recipe, rescan=args.rescan, auto_size=args.auto_size,
                              force_config=args.force_config)
    if summary["interrupted"]:
        raise Interrupted
    held_out = {key.removeprefix("val_"): value for key, value in summary.items() if key.startswith("val_")}
    if held_out:  # the method's evaluation (a VQ-KD tokenizer's codebook usage on held-out images)
        print("held-out images: " + ", ".join(f"{key} {value:.4g}" for key, value in held_out.items()))
    user = next((name for name, m in registered("pretraining").items() if m.tokenizer == config.method), None)
    use = f"; use it: mimkit pretrain {user} --tokenizer {out}" if user else ""
    print(f"run directory: {out}  (step {summary['step']}; "
          f"try: mimkit visualize {out} --out recon.png{use})")


def cmd_visualize(args: argparse.Namespace) -> None:
    from mimkit.runs import read_run
    from mimkit.viz import picture_path

    if args.n < 1:
        raise MimkitError("--n must be at least 1")
    kind, config = read_run(args.run)
    if kind.visualize is None:
        raise MimkitError(f"'{args.run}' is a {kind.name} run: mimkit visualize draws nothing of it")
    out, note = picture_path(args.out, kind.picture)
    if note:
        print(note)
    for path in kind.visualize(config, Path(args.run), out, args.n, args.seed):
        print(f"wrote {path}")


def choose_segment_recipe(data: str) -> tuple[str, str]:
    """The packaged segmentation recipe for a data set, and why: ``segment_fmnist`` for fmnist-scenes; for a
    folder, ``segment_small`` below `SMALL_SEGMENTATION_IMAGES` training images, else the papers'
    ``segment_ade20k``."""
    from mimkit.data.sources import count_images

    if data == "fmnist-scenes":
        return "segment_fmnist", "the recipe of fmnist-scenes"
    if not Path(data).expanduser().is_dir():  # reading the data refuses it in one line
        return "segment_ade20k", "the papers' ADE20K recipe"
    count = count_images(data, stop_after=SMALL_SEGMENTATION_IMAGES)
    if count < SMALL_SEGMENTATION_IMAGES:
        return "segment_small", (f"{count} training images, fewer than {SMALL_SEGMENTATION_IMAGES:,} "
                                 "(segment_ade20k is the papers' ADE20K recipe; --config NAME picks another)")
    return "segment_ade20k", (f"{SMALL_SEGMENTATION_IMAGES:,} training images or more: the papers' ADE20K "
                              "recipe")


def segment_config(args: argparse.Namespace):
    """Defaults ← recipe (and its ``per_method`` part for the encoder's method) ← flags ← ``--set``, for
    ``mimkit segment``.

    Returns:
        The configuration, and one line on which recipe it came from and why.
    """
    from mimkit.eval.config import SegmentConfig
    from mimkit.runs import read_run, split_weights_path

    name, why = (args.config, "--config") if args.config else choose_segment_recipe(args.data)
    recipe = load_recipe(name)
    per_method = recipe.pop("per_method", {})
    kind, saved = read_run(split_weights_path(args.run)[0])
    method = kind.spec(saved).method if kind.spec else None  # a fine-tuning run's is its encoder's
    values = merge(merge(to_dict(SegmentConfig()), recipe), per_method.get(method, {}))
    flags: dict = {"encoder": args.run, "data": {"source": args.data}, "seg": {"init": args.init},
                   "labels": {}, "train": train_flags(args)}
    if args.head:
        flags["seg"]["head"] = args.head
    if args.label_fraction is not None:
        flags["labels"]["fraction"] = args.label_fraction
    return from_dict(SegmentConfig, merge(merge(values, flags), parse_overrides(args.set))), f"{name}: {why}"


def cmd_segment(args: argparse.Namespace) -> None:
    from mimkit.eval.segment import run_segment

    config, recipe = segment_config(args)
    out = Path(args.out)
    results = run_segment(config, out, args.force_config, recipe=recipe, auto_size=args.auto_size)
    if results.get("interrupted"):
        raise Interrupted
    if "mIoU" in results:
        print(f"run directory: {out}  mIoU {results['mIoU']:.2f}  aAcc {results['aAcc']:.2f}  "
              f"mAcc {results['mAcc']:.2f}  (results: {out / 'results.json'}; try: mimkit visualize {out} "
              "--out seg.png)")


def cmd_predict(args: argparse.Namespace) -> None:
    from mimkit.runs import read_run, split_weights_path

    check_range("--batch-size", args.batch_size, 1)
    kind, config = read_run(split_weights_path(args.run)[0])
    if kind.predict is None:
        raise MimkitError(f"'{args.run}' is a {kind.name} run: predict needs a segmentation run (mimkit "
                          "segment) or a fine-tuned classifier (mimkit finetune)")
    print(kind.predict(config, Path(args.run), args.images, args.out, args.tta, args.batch_size, args.force))


def cmd_evaluate(args: argparse.Namespace) -> None:
    import signal

    from mimkit.eval.seg_evaluate import evaluate_run
    from mimkit.eval.seg_metrics import format_table

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stops at once, as Ctrl-C (exit 130)
    check_range("--batch-size", args.batch_size, 1)
    results = evaluate_run(args.run, args.out, args.split, args.data, args.tta, args.batch_size)
    print(format_table(results))
    print(f"{args.split} of {results['data']}: mIoU {results['mIoU']:.2f}  (results: "
          f"{Path(args.out) / 'results.json'}, confusion matrix: {Path(args.out) / 'confusion.png'})")


def add_tta(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--tta", choices=("flip", "ms"),
                     help="test-time augmentation: flip, or ms (scales 0.5-1.75 with flip, the papers' "
                     "multi-scale test); default: as the run evaluates")


def add_segment_commands(commands) -> None:
    """``segment`` and ``predict``: dense prediction on a pretrained encoder, and using a trained model."""
    segment = commands.add_parser("segment", help="train a pretrained encoder for semantic segmentation")
    segment.add_argument("run", help="a pretraining or fine-tuning run directory, or a .safetensors "
                         "checkpoint")
    segment.add_argument("--data", required=True, help="fmnist-scenes | a folder in ADE20K, Pascal VOC 2012 "
                         "or images/ + masks/ layout")
    segment.add_argument("--out", required=True, help="run directory (resumed when it holds a checkpoint)")
    segment.add_argument("--head", choices=("upernet", "linear"),
                         help="upernet: feature pyramid + UperNet + auxiliary FCN (default); linear: "
                         "BatchNorm + 1x1 convolution on the last block")
    segment.add_argument("--init", choices=("pretrained", "random"), default="pretrained",
                         help="random: the same architecture freshly initialized (the baseline)")
    segment.add_argument("--label-fraction", type=float,
                         help="train on a seeded subset of the training images, e.g. 0.1")
    length = segment.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int)
    length.add_argument("--max-steps", type=int)
    segment.add_argument("--batch-size", type=int, help="per-process batch")
    segment.add_argument("--config", help="a packaged recipe name or a YAML file (default: segment_fmnist "
                         "for fmnist-scenes, segment_small for a folder of fewer than 10,000 training "
                         "images, segment_ade20k otherwise)")
    segment.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="dotted override (repeatable), e.g. seg.num_classes=6, "
                         "'seg.class_names=[bg,cat]', seg.crop_size=64, 'seg.scale=[64,64]', "
                         "seg.eval_mode=whole|slide, seg.channels=48 (UperNet's width), seg.eval_flip=true, "
                         "'seg.eval_scales=[0.5,1.0,1.5]'")
    segment.add_argument("--auto-size", action="store_true",
                         help="for images at most half of the crop: crop and scale from the images, "
                         "whole-image evaluation, UperNet a quarter of the encoder's width, a batch that "
                         "fits the split (the start-up summary prints what it applies)")
    add_force_config(segment)
    segment.set_defaults(handler=cmd_segment)

    evaluate = commands.add_parser("evaluate", help="score a trained segmentation run on a split (per-class "
                                   "table, confusion matrix)")
    evaluate.add_argument("run", help="a segmentation run directory (its best weights are scored)")
    evaluate.add_argument("--out", required=True,
                          help="a new folder for results.json and the confusion matrix")
    evaluate.add_argument("--split", choices=("val", "train"), default="val",
                          help="the split scored (default val)")
    evaluate.add_argument("--data", help="another folder with the run's classes (default: the run's data)")
    add_tta(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=1,
                          help="images of one size scored together: 1 for folders of mixed sizes (default 1)")
    evaluate.set_defaults(handler=cmd_evaluate)

    predict = commands.add_parser("predict", help="run a segmentation or fine-tuned classification run on "
                                  "images")
    predict.add_argument("run", help="a segmentation run (label maps) or a fine-tuning run (predictions.csv)")
    predict.add_argument("--images", required=True, help="a folder of images (searched recursively, every "
                         "split; of a segmentation folder its images, not its masks)")
    predict.add_argument("--out", required=True, help="folder to write (new, empty, or one predict wrote)")
    add_tta(predict)
    predict.add_argument("--batch-size", type=int, default=16,
                         help="images of one size predicted together (default 16)")
    predict.add_argument("--force", action="store_true",
                         help="write into an --out folder that holds other files (same names are replaced)")
    predict.set_defaults(handler=cmd_predict)


def finetune_config(args: argparse.Namespace):
    """Defaults ← recipe ← command-line flags ← ``--set`` overrides, for ``mimkit finetune``."""
    from mimkit.eval.config import FinetuneConfig

    recipe = load_recipe(args.config or default_recipe("finetune", args.data))
    values = merge(to_dict(FinetuneConfig()), recipe)
    flags: dict = {"encoder": args.run, "data": {"source": args.data}, "classifier": {"init": args.init},
                   "labels": {}, "train": train_flags(args)}
    if args.pool:
        flags["classifier"]["pool"] = args.pool
    if args.label_fraction is not None:
        flags["labels"]["fraction"] = args.label_fraction
    if args.val_fraction is not None:
        flags["labels"]["val_fraction"] = args.val_fraction
    return from_dict(FinetuneConfig, merge(merge(values, flags), parse_overrides(args.set)))


def cmd_finetune(args: argparse.Namespace) -> None:
    from mimkit.eval.finetune import run_finetune

    config = finetune_config(args)
    out = Path(args.out)
    results = run_finetune(config, out, args.force_config)
    if results.get("interrupted"):
        raise Interrupted
    if "test_top1" in results:
        print(f"run directory: {out}  test top-1 {results['test_top1']:.2f}%  "
              f"(results: {out / 'results.json'})")


def probe_config(args: argparse.Namespace):
    """The settings of ``mimkit linprobe`` or ``mimkit knn`` from their flags."""
    from mimkit.eval.config import KnnConfig, LinprobeConfig

    common = dict(encoder=args.run, init=args.init, data=args.data, pool=args.pool or "cls",
                  label_fraction=1.0 if args.label_fraction is None else args.label_fraction,
                  val_fraction=args.val_fraction or 0.0, seed=args.seed, cache_dir=args.features_cache,
                  num_workers=args.num_workers, layer=args.layer)
    if args.command == "linprobe":
        return LinprobeConfig(**common, epochs=args.epochs, batch_size=args.batch_size, base_lr=args.lr,
                              optimizer=args.optimizer, weight_decay=args.weight_decay)
    return KnnConfig(**common, k=args.k, temperature=args.temperature)


def cmd_probe(args: argparse.Namespace) -> None:
    from mimkit.eval.knn import run_knn
    from mimkit.eval.linprobe import run_linprobe
    from mimkit.runs import load_encoder

    config = probe_config(args)
    encoder = load_encoder(config.encoder, config.init, config.seed)
    run = run_linprobe if args.command == "linprobe" else run_knn
    results = run(encoder, config, args.out, args.force)
    for row in results.get("by_layer", ()):
        print(f"  block {row['layer']:>2}: test top-1 {row['test_top1']:.2f}%")
    at = "" if args.layer in (None, "all") else f" at block {args.layer}"
    print(f"{args.command}: test top-1 {results['test_top1']:.2f}%{at}  "
          f"(results: {Path(args.out) / 'results.json'}"
          + (f", plot: {Path(args.out) / results['plot']})" if "plot" in results else ")"))


def block_number(value: str) -> int | str:
    """``--layer``: a block number, or ``all``."""
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a block number nor 'all'") from None


def add_eval_commands(commands) -> None:
    """``finetune``, ``linprobe`` and ``knn``: what a pretrained encoder is worth."""

    def evaluation(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("run", help="a pretraining or fine-tuning run directory, or a .safetensors "
                         "checkpoint")
        sub.add_argument("--data", required=True, help="labelled data: fashion-mnist | mnist | synthetic | "
                         "a folder with one sub-folder per class (or train/, val/, test/ folders of them)")
        sub.add_argument("--out", required=True, help="run directory for metrics and results.json")
        sub.add_argument("--label-fraction", type=float,
                         help="train on a stratified, seeded subset of the labels, e.g. 0.01")
        sub.add_argument("--val-fraction", type=float,
                         help="hold out this part of the train split for validation (for data without one)")
        sub.add_argument("--init", choices=("pretrained", "random"), default="pretrained",
                         help="random: the same architecture freshly initialized (the baseline)")
        sub.add_argument("--pool", choices=("avg", "cls"),
                         help="features: mean of the patch tokens or the [CLS] token")
        return sub

    finetune = evaluation("finetune", "fine-tune a pretrained encoder into a classifier")
    length = finetune.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int)
    length.add_argument("--max-steps", type=int)
    finetune.add_argument("--batch-size", type=int, help="per-process batch")
    finetune.add_argument("--config", help="a packaged recipe name or a YAML file (default: finetune_fmnist "
                          "for the built-in data, finetune_in1k otherwise)")
    finetune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="dotted override, e.g. optim.layer_decay=0.65 (repeatable)")
    add_force_config(finetune)
    finetune.set_defaults(handler=cmd_finetune)

    for name, help in (("linprobe", "linear probe on frozen features"), ("knn", "k-NN on frozen features")):
        probe = evaluation(name, help)
        probe.add_argument("--seed", type=int, default=0,
                           help="seed of the label subset, hold-out, probe and random init")
        probe.add_argument("--features-cache", help="where features are cached (default: RUN/features)")
        probe.add_argument("--num-workers", type=int, default=1, help="data loader processes for extraction")
        probe.add_argument("--layer", type=block_number, metavar="N|all",
                           help="read block N's features (1-based; default: the encoder's final ones), or "
                           "'all': one feature pass, a probe per block, accuracy by depth (table and plot)")
        probe.add_argument("--force", action="store_true",
                           help="write into an --out folder that another command made or that holds other "
                           "files (files of the same names are replaced)")
        if name == "linprobe":
            probe.add_argument("--epochs", type=int, default=100)
            probe.add_argument("--batch-size", type=int, default=256)
            probe.add_argument("--lr", type=float, default=0.1, help="base lr, scaled by batch / 256")
            probe.add_argument("--optimizer", choices=("sgd", "lars"), default="sgd")
            probe.add_argument("--weight-decay", type=float, default=0.0,
                               help="on the linear weights, never the bias (MAE's probe: 0)")
        else:
            probe.add_argument("--k", type=int, default=20)
            probe.add_argument("--temperature", type=float, default=0.07)
        probe.set_defaults(handler=cmd_probe)


def cmd_import(args: argparse.Namespace) -> None:
    from mimkit.interop.importer import import_checkpoint

    report = import_checkpoint(args.checkpoint, args.format, args.out, img_size=args.img_size,
                               allow_mismatch=args.allow_mismatch, overrides=parse_overrides(args.set),
                               force=args.force)
    for line in report.summary():
        print(line)
    for note in report.notes:
        print(f"  {note}")
    print(f"run directory: {report.run_dir}  (try: mimkit visualize {report.run_dir} --out recon.png)")


def cmd_export(args: argparse.Namespace) -> None:
    from mimkit.interop.export import export_run

    files = export_run(args.run, args.to, args.out, encoder_only=args.encoder_only, force=args.force)
    print(f"wrote {', '.join(str(f) for f in files)}")


def add_interop_commands(commands) -> None:
    """``import`` and ``export``: checkpoints of the reference code, timm and Hugging Face, both ways."""
    from mimkit.interop.export import TARGETS
    from mimkit.interop.importer import formats

    imp = commands.add_parser("import", help="make a run directory from an MAE/BEiT/timm/HF checkpoint")
    imp.add_argument("checkpoint", help="a checkpoint file (.pth, .safetensors, …) or a timm/HF model folder")
    references = [name for name in formats() if name not in ("timm", "hf")]
    imp.add_argument("--format", required=True, choices=formats(),
                     help=f"{', '.join(references)}: the reference code's checkpoints of that method; "
                     "timm: a VisionTransformer or Beit state dict or folder; hf: a transformers ViTMAE, ViT "
                     "or BEiT folder")
    imp.add_argument("--out", required=True, help="run directory to create")
    imp.add_argument("--img-size", type=int, help="image size of the run (position tables are resized)")
    imp.add_argument("--allow-mismatch", action="store_true",
                     help="load what matches instead of refusing missing or unexpected keys (both listed)")
    imp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="configuration of the run, e.g. model.kwargs.num_heads=2 or data.source=DIR")
    imp.add_argument("--force", action="store_true",
                     help="write the run into an --out folder that holds other files (its config.yaml and "
                     "checkpoints/ are replaced)")
    imp.set_defaults(handler=cmd_import)

    exp = commands.add_parser("export", help="write a run's model for timm or Hugging Face transformers")
    exp.add_argument("run", help="run directory")
    exp.add_argument("--to", required=True, choices=TARGETS)
    exp.add_argument("--out", required=True, help="folder to write")
    exp.add_argument("--encoder-only", action="store_true",
                     help="hf: the encoder alone (ViTModel / BeitModel); timm exports are always the encoder")
    exp.add_argument("--force", action="store_true",
                     help="write into an --out folder that is not empty (files of the same names are "
                     "replaced)")
    exp.set_defaults(handler=cmd_export)


def add_force_config(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--force-config", action="store_true",
                     help="resume a trained run in --out although its data, model, batch, lr or number of "
                     "processes differ from this command's (refused otherwise; its saved configuration is "
                     "replaced)")


def add_run_arguments(sub: argparse.ArgumentParser) -> None:
    """The flags of every training run: data, run directory, length, batch, recipe and overrides."""
    sub.add_argument("--data", help="fashion-mnist | mnist | synthetic | a folder of images | shards:DIR "
                     "(tar shards from mimkit data pack) | hf:PATH[:split] (a Hugging Face dataset on disk)")
    sub.add_argument("--out", required=True, help="run directory (resumed when it holds a checkpoint)")
    length = sub.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int)
    length.add_argument("--max-steps", type=int)
    sub.add_argument("--batch-size", type=int, help="per-process batch")
    sub.add_argument("--config", help="a packaged recipe name or a YAML file")
    sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="dotted override, e.g. optim.base_lr=1e-3 (repeatable)")
    sub.add_argument("--resume", action="store_true", help="require a checkpoint in --out to resume from")
    sub.add_argument("--skip-bad-images", action="store_true",
                     help="warn about and skip unreadable images instead of stopping")
    sub.add_argument("--rescan", action="store_true",
                     help="list the data folder (or shards) again instead of reading the file list stored in "
                     "--out: a resumed run goes on from its checkpoint on the files there are now (its data "
                     "order changes)")
    sub.add_argument("--auto-size", action="store_true",
                     help="for images at most half of data.img_size, train at the image and patch size that "
                     "fit them (the start-up summary prints the --set it applies)")
    add_force_config(sub)


def cmd_kinds(args: argparse.Namespace) -> None:
    from mimkit.kinds import registered_kinds

    for name, kind in registered_kinds().items():
        print(f"{name:<12} {kind.summary}")


def cmd_data_pack(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from mimkit.config import check_range
    from mimkit.data.shards import DEFAULT_PACK_QUALITY, check_new_folder, pack_files, parse_size
    from mimkit.data.source_info import SPLITS
    from mimkit.data.sources import build_source

    folder, out, shard_size = Path(args.folder), Path(args.out), parse_size(args.shard_size)
    if not folder.is_dir():
        raise MimkitError(f"'{folder}' is not a folder of images")
    check_range("--max-side", args.max_side, 1)
    check_range("--quality", args.quality, 1, 100)
    if args.quality is not None and args.max_side is None:
        raise MimkitError("--quality sets the JPEG quality of the images --max-side resizes; give --max-side")
    storing = {"max_side": args.max_side, "quality": args.quality or DEFAULT_PACK_QUALITY,
              "mcu_index": args.mcu_index}
    check_new_folder(out)
    # a folder with train/ (val/, test/) is packed split by split, so out/ keeps the same layout
    splits = [name for name in SPLITS if (folder / name).is_dir()] if (folder / "train").is_dir() else [""]
    sources = {name: build_source(str(folder / name)) for name in splits}
    files = {name: [Path(p) for p in source.paths] for name, source in sources.items()}
    total = sum(p.stat().st_size for paths in files.values() for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="pack") as bar:
        for name, paths in files.items():
            shards = pack_files(paths, folder / name, out / name, shard_size, bar.update, **storing)
            packed = build_source(f"shards:{out / name}")  # indexes the shards and reads a few back
            tqdm.write(f"{out / name}: {len(shards)} shards, {len(packed)} images, "
                       f"{packed.info.num_classes or 'no'} classes"
                       f"{'; ' + packed.info.storage_note if packed.info.storage_note else ''}")
    print(f"train on them: mimkit pretrain mae --data shards:{out}")


def teacher_help(methods: dict) -> str:
    """``--teacher``'s help: the methods that take a teacher (`mimkit.registry.Method.teacher`), its forms."""
    takers = ", ".join(name for name, m in methods.items() if m.teacher)
    return (f"{takers}: the frozen teacher whose features it distills: a mimkit run directory or checkpoint "
            "(e.g. an MAE run: no labels), timm:NAME:FILE, or hf:DIR (a CLIP or DINOv2 folder); nothing is "
            "downloaded")


def build_parser() -> argparse.ArgumentParser:
    from mimkit.registry import registered

    pretraining = registered("pretraining")

    parser = argparse.ArgumentParser(prog="mimkit",
                                     description="Masked image modeling for Vision Transformers.")
    commands = parser.add_subparsers(dest="command", required=True)

    pretrain = commands.add_parser("pretrain", help="pretrain an encoder with a MIM method")
    pretrain.add_argument("method", choices=sorted(pretraining))
    add_run_arguments(pretrain)
    pretrain.add_argument("--model",
                          help="encoder: vit_mini, vit_tiny, vit_small, vit_base, vit_large, vit_huge")
    pretrain.add_argument("--tokenizer", help="; ".join(
        f"{name}: a tokenizer run directory (mimkit tokenizer train {m.tokenizer})"
        for name, m in pretraining.items() if m.tokenizer))
    pretrain.add_argument("--teacher", help=teacher_help(pretraining))
    pretrain.set_defaults(handler=cmd_pretrain)

    tokenizer = commands.add_parser("tokenizer", help="train a visual tokenizer (BEiT's dVAE, BEiT v2's "
                                    "VQ-KD)")
    actions = tokenizer.add_subparsers(dest="action", required=True)
    train = actions.add_parser("train", help="train a tokenizer; its run directory is what --tokenizer takes")
    train.add_argument("method", choices=sorted(registered("tokenizer")))
    add_run_arguments(train)
    train.add_argument("--teacher", help=teacher_help(registered("tokenizer")))
    train.set_defaults(handler=cmd_pretrain, model=None, tokenizer=None)

    visualize = commands.add_parser("visualize", help="draw what a run's model reconstructs (a segmentation "
                                    "run: image | ground truth | prediction)")
    visualize.add_argument("run", help="run directory")
    visualize.add_argument("--out", required=True, help="PNG file to write")
    visualize.add_argument("--n", type=int, default=8, help="number of images (default 8)")
    visualize.add_argument("--seed", type=int, default=0,
                           help="seed of the images (and masks) drawn (default 0)")
    visualize.set_defaults(handler=cmd_visualize)
    kinds = commands.add_parser("kinds", help="list the kinds of run (what a run's config.yaml says under "
                                "kind:)")
    kinds.set_defaults(handler=cmd_kinds)
    add_eval_commands(commands)
    add_segment_commands(commands)
    add_interop_commands(commands)

    data = commands.add_parser("data", help="prepare data for training at scale")
    data_actions = data.add_subparsers(dest="action", required=True)
    pack = data_actions.add_parser("pack", help="write a folder of images (one sub-folder per class, or "
                                   "train/ val/ folders of them) as tar shards read with random access")
    pack.add_argument("folder", help="the image folder, laid out as --data takes it")
    pack.add_argument("--out", required=True,
                      help="a new folder for the shards (train with --data shards:OUT)")
    pack.add_argument("--shard-size", default="1GB", help="bytes per shard, e.g. 512MB or 1GB (default 1GB)")
    pack.add_argument("--max-side", type=int,
                      help="store images with a longer side above N pixels resized to N (upright, "
                      "re-encoded as JPEG): less to read and decode at every epoch; the crops are then cut "
                      "from the resized image (default: every file as it is)")
    pack.add_argument("--quality", type=int,
                      help="JPEG quality of the images --max-side resizes (default 90)")
    pack.add_argument("--mcu-index", action="store_true",
                      help="store sequential JPEGs re-encoded losslessly (the same pixels) with a restart "
                      "marker after every MCU: crop decoding then reads only the MCUs around its box "
                      "(needs mimkit's C extension)")
    pack.set_defaults(handler=cmd_data_pack)
    return parser


class _BetweenBars(logging.Handler):
    """Prints the library's messages (``mimkit.*`` loggers, INFO and up) between progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record))


def show_library_messages() -> None:
    """Let the library's messages through to the user, once per process."""
    logger = logging.getLogger("mimkit")
    if not any(isinstance(handler, _BetweenBars) for handler in logger.handlers):
        logger.addHandler(_BetweenBars())
        logger.setLevel(logging.INFO)


def leave_process_group() -> None:
    """Tear down the DDP process group a command joined (`mimkit.train.distributed.init_world`). A gloo
    process that exits with its group alive can abort in its exit handlers (SIGABRT, "terminate called
    without an active exception"), and torchrun then fails the whole job. So can one whose group outlives
    `destroy_process_group`, held by a DDP model in a reference cycle (an error's traceback, or DDP itself
    where torch._dynamo is not loaded) that only the interpreter's exit would free: such cycles are
    collected first."""
    dist = sys.modules.get("torch.distributed")  # only a command that loaded torch can have joined one
    if dist is not None and dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    set_thread_defaults()  # before anything loads torch
    show_library_messages()
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except MimkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Interrupted:  # the training loop saved and said so
        return 130
    finally:
        leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
