"""What MAE pretraining is worth on Fashion-MNIST: one table, run by hand (not part of the test suite).

MAE pretrains the CPU-sized ViT (vit_mini, patch 4) on the 60,000 training images without their
labels. Then, at 100%, 10% and 1% of the labels (stratified, seeded, the same subset everywhere):

- linear probe and k-NN on the frozen encoder, beside the same probes on a randomly initialized one;
- fine-tuning, beside the same ViT trained from scratch with the same budget (same epochs, recipe
  and subset; no layer-wise lr decay, which only makes sense for pretrained layers).

Every step is a ``mimkit`` command whose output goes to ``OUT/logs/``; finished steps are recorded in
``OUT/timings.json`` and skipped, and every step resumes from its checkpoints, so an interrupted
benchmark continues where it stopped when run again. The table
goes to ``OUT/table.md`` and ``OUT/summary.json``.

    .venv/bin/python benchmarks/fmnist_quality.py --out runs/fmnist-quality            # about 2 hours
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
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", default="3,15,60",
                        help="fine-tuning epochs at 100%%, 10%% and 1%% of the labels")
    parser.add_argument("--pool", default="avg", choices=("avg", "cls"), help="features of the probes")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage, to try the chain")
    args = parser.parse_args()
    out = Path(args.out)
    epochs = dict(zip(FRACTIONS, (int(e) for e in args.finetune_epochs.split(",")), strict=True))
    mae = out / "mae"
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

    length = ["--epochs", str(args.pretrain_epochs)]
    if args.quick:
        length = ["--max-steps", "20", "--batch-size", "32"]
    step("mae", ["pretrain", "mae", "--data", args.data, "--config", "mae_fmnist", "--out", str(mae),
                 *length])

    table = []
    for fraction in FRACTIONS:
        row = {"labels": pct(fraction)}
        n = epochs[fraction]
        budget = ["--max-steps", "10", "--batch-size", "8"] if args.quick else [
            "--epochs", str(n), "--set", f"optim.warmup_epochs={0.05 * n:g}",
            "--set", f"eval_every={max(1, n // 2)}"]
        for init in ("pretrained", "random"):
            scratch = ["--set", "optim.layer_decay=1.0"] if init == "random" else []
            for verb, extra in (("linprobe", ["--pool", args.pool, "--num-workers", "1"]),
                                ("knn", ["--pool", args.pool, "--num-workers", "1"]),
                                ("finetune", budget + scratch)):
                name = f"{verb}-{init}-{pct(fraction).rstrip('%')}"
                row[f"{verb} {init}"] = step(name, [verb, str(mae), "--data", args.data, "--label-fraction",
                                                    str(fraction), "--init", init, *extra,
                                                    "--out", str(out / name)])["test_top1"]
        table.append(row)

    protocols = (("linprobe", f"linear probe, {args.pool} (baseline: random frozen encoder)"),
                 ("knn", f"k-NN k=20 T=0.07, {args.pool} (baseline: random frozen encoder)"),
                 ("finetune", "fine-tuning (baseline: from scratch, same budget)"))
    lines = ["| protocol | labels | budget | MAE pretrained | baseline | gain |", "|---|---|---|---|---|---|"]
    for protocol, name in protocols:
        for fraction, row in zip(FRACTIONS, table, strict=True):
            mine, base = row[f"{protocol} pretrained"], row[f"{protocol} random"]
            budget = f"{epochs[fraction]} epochs" if not args.quick else "10 steps"
            budget = budget if protocol == "finetune" else "frozen"
            lines.append(f"| {name} | {row['labels']} | {budget} | {mine:.2f} | {base:.2f} | "
                         f"{mine - base:+.2f} |")
    total = sum(s["wall_s"] for s in steps)
    per_step = ", ".join(f"{s['name']} {s['wall_s'] / 60:.1f}" for s in steps)
    pretraining = "20 steps" if args.quick else f"{args.pretrain_epochs} epochs"
    lines += ["", f"Top-1 test accuracy (%). MAE pretraining: {pretraining}. Wall time: "
              f"{total / 60:.0f} min in all (minutes: {per_step})."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    summary = {"args": vars(args), "table": table, "steps": steps}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
