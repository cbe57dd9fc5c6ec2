"""What pretraining is worth for segmentation: mIoU on fmnist-scenes, run by hand (not part of the tests).

The encoders are those of the quality benchmark (``benchmarks/fmnist_quality.py``: ``ENCODERS/mae``,
``ENCODERS/beit``, ``ENCODERS/simmim``, ... : a run of each method that exists). At 100% and 10% of the
10,000 training scenes (the same seeded subset everywhere), each encoder is trained with

- UperNet, end to end (the papers' protocol, `segment_fmnist` recipe), and
- the linear head on its frozen last block (the cheap protocol for comparing encoders),

beside the MAE run's ViT from scratch with UperNet (no layer-wise lr decay) and frozen at its random
initialization with the linear head. Every run has the same number of steps; each scores the first 500
validation scenes (made from the Fashion-MNIST test images). Steps run ``--jobs`` at a time; finished
steps are skipped and every run resumes from its checkpoints, so an interrupted benchmark continues where
it stopped when run again (`fmnist_quality.run_chain`). The table goes to ``OUT/table.md`` and
``OUT/summary.json``.

    .venv/bin/python benchmarks/segment_fmnist.py --encoders runs/fmnist-quality-all --out runs/seg-bench
    .venv/bin/python benchmarks/segment_fmnist.py --encoders /tmp/q --quick --out /tmp/seg-q   # smoke

``--fractions`` and ``--heads`` pick a part of the table (e.g. a longer run of the UperNet rows at 10%:
``--steps 600 --fractions 0.1 --heads upernet``).
"""

import argparse
import json
import sys
from pathlib import Path

from fmnist_quality import TITLES, Step, folder_label, pct, run_chain

BASELINES = {"upernet": ("scratch", "UperNet, end to end"), "linear": ("random", "linear, frozen encoder")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", required=True,
                        help="the quality benchmark's output folder (its mae/, beit/, ... runs)")
    parser.add_argument("--out", default="runs/segment-fmnist")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of every run (batch 32)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, sharing the cores")
    parser.add_argument("--fractions", default="1,0.1", help="fractions of the scenes, comma-separated")
    parser.add_argument("--heads", default="upernet,linear", help="heads to train: upernet, linear or both")
    parser.add_argument("--quick", action="store_true", help="a few steps on a few scenes, to try the chain")
    args = parser.parse_args()
    encoders_dir, out = Path(args.encoders), Path(args.out)
    encoders = {m: encoders_dir / m for m in TITLES if (encoders_dir / m / "config.yaml").is_file()}
    if "mae" not in encoders:
        sys.exit(f"no MAE run in {encoders_dir}/mae (the baselines use its architecture); run "
                 "benchmarks/fmnist_quality.py first")
    if args.steps < 1 or args.jobs < 1:
        sys.exit("--steps and --jobs must be at least 1")
    try:
        fractions = tuple(float(f) for f in args.fractions.split(","))
    except ValueError:
        sys.exit(f"--fractions {args.fractions!r}: expected numbers like 1,0.1")
    heads = tuple(args.heads.split(","))
    if not all(0 < f <= 1 for f in fractions) or not set(heads) <= set(BASELINES):
        sys.exit(f"--fractions must lie in (0, 1] and --heads be among {', '.join(BASELINES)}")

    def budget(fraction: float) -> list[str]:
        if args.quick:
            return ["--max-steps", "2", "--batch-size", "8", "--set", "eval_images=16"]
        warmup = 0.1 * args.steps * 32 / (10000 * fraction)  # a tenth of the run, in epochs of the subset
        return ["--max-steps", str(args.steps), "--set", f"optim.warmup_epochs={warmup:g}"]

    frozen_linear = ["--head", "linear", "--set", "seg.freeze_encoder=true"]
    head_flags = {"upernet": [], "linear": frozen_linear}
    runs = [(m, run, "pretrained", head, head_flags[head]) for m, run in encoders.items() for head in heads]
    baseline_flags = {"upernet": ["--set", "optim.layer_decay=1.0"], "linear": frozen_linear}
    runs += [(BASELINES[head][0], encoders["mae"], "random", head, baseline_flags[head]) for head in heads]
    steps, cells = [], []
    for fraction in fractions:
        for method, run, init, head, extra in runs:
            name = f"seg-{method}-{head}-{folder_label(fraction)}"
            command = ["segment", str(run), "--data", "fmnist-scenes", "--config", "segment_fmnist",
                       "--label-fraction", str(fraction), "--init", init, *extra, *budget(fraction),
                       "--out", str(out / name)]
            steps.append(Step(name, command))
            cells.append((method, head, fraction, name))

    timings = run_chain(steps, out, args.jobs)

    scores = {name: json.loads((out / name / "results.json").read_text()) for *_, name in cells}
    miou = {(m, h, f): scores[name]["mIoU"] for m, h, f, name in cells}
    lines = ["| head | scenes | " + " | ".join(TITLES[m] for m in encoders) + " | baseline |",
             "|---|---|" + "---|" * (len(encoders) + 1)]
    for head in heads:
        baseline, title = BASELINES[head]
        for fraction in fractions:
            base = miou[(baseline, head, fraction)]
            row = " | ".join(f"{miou[(m, head, fraction)]:.2f} ({miou[(m, head, fraction)] - base:+.2f})"
                             for m in encoders)
            lines.append(f"| {title} | {pct(fraction)} | {row} | {base:.2f} |")
    per_step = ", ".join(f"{s.name} {timings.wall(s.name) / 60:.1f}" for s in steps)
    length = "2 steps of 8 (quick)" if args.quick else f"{args.steps} steps of 32 scenes"
    lines += ["", f"mIoU (%) on the first {scores[steps[0].name]['val_images']} validation scenes, gain over "
              "the baseline in brackets. Baselines: the MAE run's ViT from scratch (UperNet, no layer decay) "
              f"and frozen at its random initialization (linear). Every run: {length}. Wall time: "
              f"{timings.data['chain_s'] / 60:.0f} min, {args.jobs} runs at a time (minutes per run: "
              f"{per_step})."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    summary = {"args": vars(args), "miou": {name: scores[name]["mIoU"] for *_, name in cells},
               "timings": timings.data}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
