"""What pretraining is worth on Fashion-MNIST: one table, run by hand (not part of the test suite).

MAE (and, with ``--methods``, BEiT and BEiT v2) pretrains the CPU-sized ViT (vit_mini, patch 4) on the
60,000 training images without their labels. Then, at 100%, 10% and 1% of the labels (stratified,
seeded, the same subset everywhere):

- linear probe and k-NN on the frozen encoder, beside the same probes on a randomly initialized one;
- fine-tuning, beside the same ViT trained from scratch with the same budget (same epochs, recipe
  and subset; no layer-wise lr decay, which only makes sense for pretrained layers).

Every step is a ``mimkit`` command whose output goes to ``OUT/logs/``; finished steps are recorded in
``OUT/timings.json`` and skipped, and every step resumes from its checkpoints, so an interrupted
benchmark continues where it stopped when run again. The table goes to ``OUT/table.md`` and
``OUT/summary.json``.

    .venv/bin/python benchmarks/fmnist_quality.py --out runs/fmnist-quality     # MAE: ~95 min on 2 idle cores
    .venv/bin/python benchmarks/fmnist_quality.py --quick --data synthetic:512 --out /tmp/q   # smoke
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

FRACTIONS = (1.0, 0.1, 0.01)


def mimkit(args: list[str], log: Path) -> float:
    """Run one ``mimkit`` command with its output in ``log``; returns its wall time in seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # Idle OpenMP threads sleep instead of spinning: on a shared machine spinning threads slow every
    # process down many times over; alone, the cost is small.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    with log.open("w") as f:
        done = subprocess.run([sys.executable, "-m", "mimkit.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                              env=env)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        sys.exit(f"failed ({done.returncode}): mimkit {' '.join(args)}\n" + "\n".join(tail))
    return time.perf_counter() - start


def pct(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/fmnist-quality")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--methods", default="mae",
                        help="pretrained encoders to compare: mae[,beit][,beitv2] (BEiT: dVAE, then BEiT, "
                        "benchmarks/beit_chain.py; BEiT v2: VQ-KD from the MAE run, then BEiT v2, "
                        "benchmarks/beitv2_chain.py)")
    parser.add_argument("--pretrain-epochs", type=int, default=15, help="MAE and BEiT v2 pretraining epochs")
    parser.add_argument("--beit-epochs", type=int, default=5, help="BEiT pretraining epochs (a BEiT epoch "
                        "encodes every patch, about three MAE epochs of compute)")
    parser.add_argument("--finetune-epochs", default="3,15,60",
                        help="fine-tuning epochs at 100%%, 10%% and 1%% of the labels")
    parser.add_argument("--pool", default="avg", choices=("avg", "cls"), help="features of the probes")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage, to try the chain")
    args = parser.parse_args()
    out = Path(args.out)
    epochs = dict(zip(FRACTIONS, (int(e) for e in args.finetune_epochs.split(",")), strict=True))
    methods = args.methods.split(",")
    if unknown := set(methods) - {"mae", "beit", "beitv2"}:
        sys.exit(f"unknown methods {sorted(unknown)}; choose among mae, beit, beitv2")
    timings_path = out / "timings.json"  # wall time of each step, kept across interrupted invocations
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    steps: list[dict] = []

    def step(name: str, command: list[str]) -> dict:
        if name not in timings:
            timings[name] = round(mimkit(command, out / "logs" / f"{name}.log"), 1)
            timings_path.write_text(json.dumps(timings, indent=2))
        results = out / name / "results.json"
        record = {"name": name, **(json.loads(results.read_text()) if results.exists() else {}),
                  "wall_s": timings[name]}
        steps.append(record)
        print(f"{name}: {record.get('test_top1', 'done')}  ({timings[name] / 60:.1f} min)", flush=True)
        return record

    # pretraining: MAE always (its run is the baselines' architecture and BEiT v2's teacher)
    length = ["--epochs", str(args.pretrain_epochs)]
    if args.quick:
        length = ["--max-steps", "20", "--batch-size", "32"]
    step("mae", ["pretrain", "mae", "--data", args.data, "--config", "mae_fmnist", "--out", str(out / "mae"),
                 *length])
    encoders, notes = {"mae": out / "mae"}, []
    if "beit" in methods:
        from beit_chain import beit_steps, tokenizer_summary
        for name, command in beit_steps(out, args.data, args.beit_epochs, quick=args.quick):
            step(name, command)
        encoders["beit"] = out / "beit"
        notes.append(f"dVAE tokenizer: {tokenizer_summary(out / 'dvae')}")
    if "beitv2" in methods:
        from beitv2_chain import beitv2_steps, tokenizer_summary
        chain = beitv2_steps(out, out / "mae", args.data, args.pretrain_epochs, quick=args.quick)
        for name, command in chain:
            step(name, command)
        encoders["beitv2"] = out / "beitv2"
        notes.append(f"VQ-KD tokenizer: {tokenizer_summary(out / 'vqkd')}")
    encoders = {m: encoders[m] for m in methods}

    # evaluation: every encoder, and the baselines (the MAE run's ViT, randomly initialized)
    table: dict[tuple[str, float], dict[str, float]] = {}
    for fraction in FRACTIONS:
        n = epochs[fraction]
        budget = ["--max-steps", "10", "--batch-size", "8"] if args.quick else [
            "--epochs", str(n), "--set", f"optim.warmup_epochs={0.05 * n:g}",
            "--set", f"eval_every={max(1, n // 2)}"]
        runs = [(m, run, "pretrained") for m, run in encoders.items()] + [("baseline", out / "mae", "random")]
        for method, run, init in runs:
            scratch = ["--set", "optim.layer_decay=1.0"] if init == "random" else []
            for verb, extra in (("linprobe", ["--pool", args.pool, "--num-workers", "1"]),
                                ("knn", ["--pool", args.pool, "--num-workers", "1"]),
                                ("finetune", budget + scratch)):
                name = f"{verb}-{method}-{pct(fraction).rstrip('%')}"
                record = step(name, [verb, str(run), "--data", args.data, "--label-fraction", str(fraction),
                                     "--init", init, *extra, "--out", str(out / name)])
                table.setdefault((verb, fraction), {})[method] = record["test_top1"]

    titles = {"mae": "MAE", "beit": "BEiT", "beitv2": "BEiT v2"}
    lines = ["| protocol | labels | budget | " + " | ".join(titles[m] for m in encoders) + " | baseline |",
             "|---|---|---|" + "---|" * (len(encoders) + 1)]
    for verb, name in (("linprobe", f"linear probe, {args.pool}"), ("knn", f"k-NN k=20 T=0.07, {args.pool}"),
                       ("finetune", "fine-tuning")):
        for fraction in FRACTIONS:
            row = table[(verb, fraction)]
            budget = f"{epochs[fraction]} epochs" if not args.quick else "10 steps"
            budget = budget if verb == "finetune" else "frozen"
            cells = " | ".join(f"{row[m]:.2f} ({row[m] - row['baseline']:+.2f})" for m in encoders)
            lines.append(f"| {name} | {pct(fraction)} | {budget} | {cells} | {row['baseline']:.2f} |")
    total = sum(s["wall_s"] for s in steps)
    per_step = ", ".join(f"{s['name']} {s['wall_s'] / 60:.1f}" for s in steps)
    pretraining = "20 steps" if args.quick else f"{args.pretrain_epochs} epochs"
    lines += ["", "Top-1 test accuracy (%), gain over the baseline in brackets. Baselines: the MAE run's ViT "
              "randomly initialized and frozen (probes), trained from scratch with the same budget "
              f"(fine-tuning). MAE pretraining: {pretraining}. Wall time: {total / 60:.0f} min in all "
              f"(minutes: {per_step}).",
              *notes]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    summary = {"args": vars(args), "table": {f"{v} {pct(f)}": row for (v, f), row in table.items()},
               "steps": steps}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
