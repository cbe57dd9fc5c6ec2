"""Pretraining's worth at a small budget: MAE + UperNet against scratch on textured-scenes, run by hand.

The question (issue #22, item 8): a user with a few thousand images of their own and an hour on a 2-core
machine; does MAE pretraining on those images make a better segmenter than training from scratch? The goal
is ``MAE + UperNet >= scratch + 3 mIoU`` at 10% of the scenes, after at most 45 minutes of pretraining and
300 segmentation steps. One resumable command:

1. generates textured-scenes (``benchmarks/textured_scenes.py``: 5,000 train + 1,000 val 64-px scenes of
   overlapping textured shapes, Pascal VOC layout) into ``OUT/textured-scenes`` unless it is there;
2. times a short MAE run alone on the machine (``timing-pretrain``, 100 steps) and turns ``--minutes`` of
   pretraining at that speed into a number of epochs, so the run's cosine schedule ends within the budget
   (not cut short with its lr still high); the numbers go to ``OUT/budget.json``;
3. pretrains MAE on the set's train images with what a folder of this size gets by default (the
   ``mae_small`` recipe, ``--auto-size``), for those epochs;
4. trains UperNet end to end at ``--fraction`` of the train scenes for ``--seg-steps`` steps with the
   pretrained encoder and with the same ViT from scratch, and the linear head on each frozen encoder
   (pretrained, and at its random initialization), with one segmentation recipe for both arms
   (``SEG_SETTINGS``; the scratch arm without layer-wise lr decay, which is only meant for pretrained
   layers);
5. writes ``OUT/table.md`` and ``OUT/summary.json``.

Steps run ``--jobs`` at a time as soon as what they read is finished, and finished steps are skipped
(``fmnist_quality.run_chain``); every run resumes from its checkpoints, so an interrupted benchmark
continues where it stopped when run again. On a machine other work shares, give ``--images-per-s`` (the
speed measured alone, in a quiet moment) instead of the timing run: the pretraining is then matched by
steps, not by wall time.

    .venv/bin/python benchmarks/segment_small_budget.py --out runs/small-budget            # ~1 h 15 min
    .venv/bin/python benchmarks/segment_small_budget.py --quick --out /tmp/sb              # smoke
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import yaml
from compute_match import median_speed
from fmnist_quality import TIMING_STEPS, Step, pct, run_chain
from textured_scenes import write_scenes

SCENES = {"train": 5000, "val": 1000}
QUICK_SCENES = {"train": 64, "val": 16}
SEG_BATCH = 32
WARMUP_SHARE = 0.05  # of the pretraining's epochs (at least one): short, or a short run is mostly warmup
SEG_WARMUP_SHARE = 0.1  # of the segmentation steps
# The segmentation recipe, the same for both arms: segment_fmnist's CPU-sized UperNet (32 wide, auxiliary
# head 64, drop path 0.1, layer decay 0.75) on whole 64-px scenes: crops of the scene's size after the
# 0.5-2x random rescale, and whole-image evaluation of all validation scenes at their own size.
SEG_SETTINGS = ["--config", "segment_fmnist", "--set", "seg.crop_size=64", "--set", "seg.scale=[64,64]",
                "--set", "seg.eval_mode=whole", "--set", "seg.eval_scale=null", "--set", "eval_images=null",
                "--set", "data.num_workers=1", "--batch-size", str(SEG_BATCH)]
FROZEN_LINEAR = ["--head", "linear", "--set", "seg.freeze_encoder=true"]
ARMS = {  # run name: (encoder init, flags)
    "mae-upernet": ("pretrained", []),
    "scratch-upernet": ("random", ["--set", "optim.layer_decay=1.0"]),
    "mae-linear": ("pretrained", FROZEN_LINEAR),
    "random-linear": ("random", FROZEN_LINEAR),
}
PAIRS = (("UperNet, end to end", "mae-upernet", "scratch-upernet"),
         ("linear head, frozen encoder", "mae-linear", "random-linear"))
SCORES = ("mIoU", "aAcc", "mAcc")
GOAL = 3.0  # mIoU points of MAE + UperNet over scratch + UperNet


def pretraining_budget(out: Path, minutes: float, speed: float | None) -> dict:
    """The MAE run's epochs: ``minutes`` at ``speed`` images/s (or, when None, the timing run's median
    speed), in whole epochs of the timing run's batch over the train images, at least one."""
    timing = out / "timing-pretrain"
    config = yaml.safe_load((timing / "config.yaml").read_text())
    images = json.loads((timing / "data.json").read_text())["train_images"]
    batch = config["train"]["batch_size"] * config["train"].get("accum_steps", 1)
    measured = "given (--images-per-s)" if speed else f"median of {timing.name}"
    speed = speed or median_speed(timing)
    steps_per_epoch = images // batch  # the loader drops the last partial batch
    epochs = max(1, math.floor(minutes * 60 * speed / (steps_per_epoch * batch)))
    return {"minutes": minutes, "images_per_s": round(speed, 1), "measured": measured,
            "train_images": images, "batch": batch, "epochs": epochs,
            "steps": epochs * steps_per_epoch, "warmup_epochs": max(1, round(WARMUP_SHARE * epochs)),
            "load_at_start": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/small-budget")
    parser.add_argument("--minutes", type=float, default=45.0,
                        help="pretraining budget, alone on the machine")
    parser.add_argument("--images-per-s", type=float, default=None,
                        help="pretraining speed measured alone; skips the timing run (for a shared machine)")
    parser.add_argument("--seg-steps", type=int, default=300, help="steps of every segmentation run")
    parser.add_argument("--fraction", type=float, default=0.1,
                        help="share of the train scenes segmentation sees")
    parser.add_argument("--jobs", type=int, default=2, help="segmentation runs at once, sharing the cores")
    parser.add_argument("--quick", action="store_true", help="a few scenes and steps, to try the chain")
    args = parser.parse_args()
    if args.minutes <= 0 or args.seg_steps < 1 or args.jobs < 1 or not 0 < args.fraction <= 1:
        sys.exit("--minutes, --seg-steps and --jobs must be positive and --fraction in (0, 1]")
    out = Path(args.out)
    data = out / "textured-scenes"
    counts = QUICK_SCENES if args.quick else SCENES
    if not data.is_dir():
        write_scenes(data, counts)

    quick = ["--batch-size", "8", "--set", "data.num_workers=0"] if args.quick else []
    timing_length = ["--max-steps", "4" if args.quick else str(TIMING_STEPS)]
    steps = [Step("timing-pretrain", ["pretrain", "mae", "--data", str(data), "--auto-size", *quick,
                                      *timing_length, "--out", str(out / "timing-pretrain")], alone=True)]

    def pretraining() -> list[str]:
        budget = pretraining_budget(out, args.minutes, args.images_per_s)
        (out / "budget.json").write_text(json.dumps(budget, indent=2))
        length = ["--max-steps", "8"] if args.quick else ["--epochs", str(budget["epochs"]), "--set",
                                                           f"optim.warmup_epochs={budget['warmup_epochs']}"]
        return ["pretrain", "mae", "--data", str(data), "--auto-size", *quick, *length,
                "--out", str(out / "mae")]

    steps.append(Step("mae", pretraining, ("timing-pretrain",), alone=True))
    # warmup: a share of the steps, in epochs of the subset the runs train on
    warmup = SEG_WARMUP_SHARE * args.seg_steps * SEG_BATCH / (counts["train"] * args.fraction)
    seg_length = (["--max-steps", "2", "--batch-size", "4"] if args.quick else
                  ["--max-steps", str(args.seg_steps), "--set", f"optim.warmup_epochs={warmup:g}",
                   "--set", f"eval_every={args.seg_steps}"])
    for name, (init, flags) in ARMS.items():
        steps.append(Step(name, ["segment", str(out / "mae"), "--data", str(data), *SEG_SETTINGS,
                                 "--label-fraction", str(args.fraction), "--init", init, *flags, *seg_length,
                                 "--out", str(out / name)], ("mae",)))

    timings = run_chain(steps, out, args.jobs)

    budget = json.loads((out / "budget.json").read_text())
    scores = {name: json.loads((out / name / "results.json").read_text()) for name in ARMS}
    lines = ["| protocol | pretrained | baseline | gain | " + " | ".join(
        f"{s} pretrained / baseline" for s in SCORES[1:]) + " |", "|---|---|---|---|---|---|"]
    for title, pretrained, baseline in PAIRS:
        ours, base = scores[pretrained], scores[baseline]
        others = " | ".join(f"{ours[s]:.2f} / {base[s]:.2f}" for s in SCORES[1:])
        gain = ours["mIoU"] - base["mIoU"]
        lines.append(f"| {title} | {ours['mIoU']:.2f} | {base['mIoU']:.2f} | {gain:+.2f} | {others} |")
    gain = scores["mae-upernet"]["mIoU"] - scores["scratch-upernet"]["mIoU"]
    wall = timings.wall("mae") / 60
    mae = scores["mae-upernet"]
    pretrained = yaml.safe_load((out / "mae" / "config.yaml").read_text())
    model = (f"{pretrained['model']['name']}/{pretrained['model']['patch_size']} at "
             f"{pretrained['data']['img_size']} px, mask {pretrained['mae']['mask_ratio']:g}, lr "
             f"{pretrained['optim']['base_lr']:g} x batch / 256")
    lines += ["", f"mIoU, aAcc, mAcc (%) on the {mae['val_images']} validation scenes after {mae['steps']} "
              f"steps of {SEG_BATCH if not args.quick else 4} at {pct(args.fraction)} of the train scenes "
              f"({mae['train_images']}). Baselines: "
              "the same ViT from scratch (UperNet, no layer decay) and frozen at its random initialization "
              f"(linear). Pretraining: MAE {model}, {budget['epochs']} epochs = "
              f"{budget['steps']} steps of {budget['batch']}, planned as {budget['minutes']:g} min at "
              f"{budget['images_per_s']} images/s ({budget['measured']}), {wall:.0f} min of wall time here.",
              "", f"Goal: MAE + UperNet >= scratch + {GOAL:g} mIoU. Gain {gain:+.2f}: "
              f"{'reached' if gain >= GOAL else 'not reached'}."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    summary = {"args": vars(args), "budget": budget, "scores": {n: {s: r[s] for s in SCORES} for n, r in
                                                                 scores.items()}, "timings": timings.data}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
