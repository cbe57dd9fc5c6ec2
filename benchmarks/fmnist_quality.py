"""What pretraining is worth on Fashion-MNIST: one table, run by hand (not part of the test suite).

MAE (and, with ``--methods``, BEiT, BEiT v2 or any other registered pretraining method) pretrains the
CPU-sized ViT (vit_mini, patch 4) on the 60,000 training images without their labels. BEiT and BEiT v2 run
their chains for set epochs; every other method pretrains for MAE's wall-clock: a timing step, alone on
the machine, runs the method's training step back to back with MAE's (``method_step_cost.py``), and
the method trains for MAE's images times its speed over MAE's (``OUT/wallclock_match.json``). Then, at
100%, 10% and 1% of the labels (stratified, seeded, the same subset everywhere):

- linear probe and k-NN on the frozen encoder, beside the same probes on a randomly initialized one;
- fine-tuning, beside the same ViT trained from scratch with the same budget (same epochs, recipe
  and subset; no layer-wise lr decay, which only makes sense for pretrained layers);
- at 100% and 10% of the labels, the scratch ViT trained for the compute of MAE pretraining + fine-tuning
  together (`compute_match.py`: the per-image costs come from two short timing runs made alone on the
  machine, not from the long runs' logs, which depend on what shared the cores with them);
- the same probes on each other encoder's own architecture at random init: most recipes add layer scale and
  relative positions to MAE's ViT, which change what a random encoder's features are worth;
- each encoder's linear probe and k-NN at every block (``--layer all``, 10% of the labels): accuracy by
  depth, in a second table; with BEiT v2, the linear probe of its teacher (the MAE run) beside its rows.

Every step is a ``mimkit`` command whose output goes to ``OUT/logs/``. Steps run ``--jobs`` at a time as
soon as the runs they read are finished (BEiT's chain beside MAE's, evaluations beside pretraining), the
cores shared among them (a step that runs alone gets them all): on the 2-core VM two one-thread processes
train vit_mini MAE at 177 + 177 images/s where one two-thread process reaches 285. Wall times (of each
step, added up over interrupted attempts, and of the whole chain) are kept in ``OUT/timings.json``;
finished steps are skipped and every step resumes from its checkpoints, so an interrupted benchmark
continues where it stopped when run again. The table goes to ``OUT/table.md`` and ``OUT/summary.json``.

    .venv/bin/python benchmarks/fmnist_quality.py --out runs/fmnist-quality   # MAE: ~1 h 45 min
    .venv/bin/python benchmarks/fmnist_quality.py --methods mae,beit,beitv2 --pretrain-epochs 10 \
        --finetune-epochs 2,10,40 --out runs/fmnist-quality-all                 # all three: ~2 h
    .venv/bin/python benchmarks/fmnist_quality.py --methods mae,simmim,maskfeat --pretrain-epochs 10 \
        --finetune-epochs 2,10,40 --out runs/fmnist-quality-all   # more methods into the same folder
    .venv/bin/python benchmarks/fmnist_quality.py --quick --data synthetic:512 --out /tmp/q   # smoke

Runs made by an earlier version are reused (finished steps are skipped); the steps this version adds
(``timing-*``, ``finetune-scratch-matched-*``, ``*-depth-*``) run on the next invocation.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from mimkit.config import load_recipe
from mimkit.errors import MimkitError
from mimkit.registry import method_of

FRACTIONS = (1.0, 0.1, 0.01)
MATCHED_FRACTIONS = (1.0, 0.1)  # the compute-matched scratch rows
DEPTH_FRACTION = 0.1  # the accuracy-by-depth probes
CHAINED = ("mae", "beit", "beitv2")  # pretrained by their own chains, for set epochs
TITLES = {"mae": "MAE", "beit": "BEiT", "beitv2": "BEiT v2", "cae": "CAE", "simmim": "SimMIM",
          "maskfeat": "MaskFeat", "maskdistill": "MaskDistill", "data2vec": "data2vec"}
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Step:
    """One ``mimkit`` command; its run directory is ``OUT/name``. A callable command is built when the step
    starts, from the runs it reads (the compute-matched scratch run's length)."""
    name: str
    command: list[str] | Callable[[], list[str]]
    after: tuple[str, ...] = ()  # steps whose runs this one reads
    alone: bool = False  # a timing run: the steps before it finish first, and none start beside it
    script: Path | None = None  # a Python script run with the command's arguments instead of ``mimkit``


class Timings:
    """``OUT/timings.json``: each step's wall time summed over attempts and whether it finished, and the
    chain's wall time summed over invocations of the script. Thread-safe; written after every change."""

    def __init__(self, path: Path):
        self.path, self.lock = path, threading.Lock()
        self.data = json.loads(path.read_text()) if path.exists() else {"chain_s": 0.0, "steps": {}}

    def done(self, name: str) -> bool:
        return self.data["steps"].get(name, {}).get("done", False)

    def wall(self, name: str) -> float:
        return self.data["steps"][name]["wall_s"]

    def add(self, name: str | None, seconds: float, done: bool = False) -> None:
        with self.lock:
            if name is None:
                self.data["chain_s"] = round(self.data["chain_s"] + seconds, 1)
            else:
                entry = self.data["steps"].setdefault(name, {"wall_s": 0.0, "done": False})
                entry["wall_s"] = round(entry["wall_s"] + seconds, 1)
                entry["done"] = done
            self.path.write_text(json.dumps(self.data, indent=2))


_RECORDS_LOCK = threading.Lock()  # steps start in worker threads: one read-modify-write of a record at a time


def add_record(path: Path, key: str, value: dict) -> None:
    """Add ``key: value`` to the JSON record at ``path`` (``OUT/wallclock_match.json``,
    ``compute_match.json``): under a lock, since two steps may start at once, and replaced in one rename, so a
    reader never sees it half written."""
    with _RECORDS_LOCK:
        records = json.loads(path.read_text()) if path.exists() else {}
        partial = path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(records | {key: value}, indent=2))
        partial.replace(path)


def chained(pairs: list[tuple[str, list[str]]], after: tuple[str, ...]) -> list[Step]:
    """Steps from ``(name, command)`` pairs, each reading the run before it; the first reads ``after``."""
    steps = []
    for name, command in pairs:
        steps.append(Step(name, command, after))
        after = (name,)
    return steps


def mimkit(args: list[str], log: Path, threads: int, script: Path | None = None) -> int:
    """Run one ``mimkit`` command (or ``script``) with ``threads`` CPU threads, its output in ``log``; its
    exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    # Idle OpenMP threads sleep instead of spinning: on a shared machine spinning threads slow every
    # process down many times over; alone, the cost is small.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "OMP_NUM_THREADS": str(threads)}
    with log.open("a") as f:
        entry = [str(script)] if script else ["-m", "mimkit.cli"]
        done = subprocess.run([sys.executable, *entry, *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    return done.returncode


def run_steps(steps: list[Step], out: Path, timings: Timings, jobs: int) -> list[str]:
    """Run the unfinished steps, ``jobs`` at a time, each once the steps it reads have finished (earlier in
    ``steps`` first), with the cores shared among the steps that can run at that moment (MAE alone gets
    all of them). A step marked ``alone`` waits for the running ones to finish, gets every core, and
    nothing starts until it is done. A failed step is reported and its dependents are skipped; returns the
    failed names."""
    cores = os.cpu_count() or 1

    def attempt(step: Step, threads: int) -> bool:
        start, log = time.perf_counter(), out / "logs" / f"{step.name}.log"
        status = 1
        try:
            status = mimkit(step.command() if callable(step.command) else step.command, log, threads,
                            step.script)
        finally:
            timings.add(step.name, time.perf_counter() - start, done=status == 0)
        outcome = "done" if status == 0 else "interrupted" if status == 130 else f"FAILED (see {log})"
        print(f"{step.name}: {outcome}  ({timings.wall(step.name) / 60:.1f} min)", flush=True)
        return status == 0

    pending = [s for s in steps if not timings.done(s.name)]
    finished = {s.name for s in steps if timings.done(s.name)}
    failed: list[str] = []
    running = {}
    with ThreadPoolExecutor(jobs) as pool:
        while pending or running:
            ready = [s for s in pending if set(s.after) <= finished]
            threads = max(1, cores // min(jobs, len(running) + len(ready) or 1))
            starting = ready[:jobs - len(running)]
            if any(s.alone for s in [*ready, *running.values()]):
                alone = [s for s in ready if s.alone]
                starting = alone[:1] if not running else []
                threads = cores
            for step in starting:
                pending.remove(step)
                running[pool.submit(attempt, step, threads)] = step
            blocked = [s for s in pending if set(s.after) & set(failed)]
            for step in blocked:
                pending.remove(step)
                failed.append(step.name)
            if not running:
                break
            completed, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in completed:
                step = running.pop(future)
                if future.result():
                    finished.add(step.name)
                else:
                    failed.append(step.name)
    return failed


def run_chain(steps: list[Step], out: Path, jobs: int) -> Timings:
    """`run_steps` over a benchmark's whole chain, its wall time added to ``OUT/timings.json``; exits with a
    message when interrupted (the same command continues where it stopped) or when a step failed or was
    skipped.

    Returns:
        The chain's timings.
    """
    timings = Timings(out / "timings.json")
    start = time.perf_counter()
    try:
        failed = run_steps(steps, out, timings, jobs)
    except KeyboardInterrupt:  # the running steps got the signal too and saved their checkpoints
        sys.exit("interrupted; the same command continues where it stopped")
    finally:
        timings.add(None, time.perf_counter() - start)
    if failed:
        sys.exit(f"failed or skipped: {', '.join(failed)}")
    return timings


def epochs_per_fraction(text: str) -> dict[float, int]:
    """``--finetune-epochs``: one positive whole number per label fraction, e.g. ``3,15,60``."""
    parts = text.split(",")
    if len(parts) != len(FRACTIONS) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        fractions = ", ".join(pct(f) for f in FRACTIONS)
        raise argparse.ArgumentTypeError(f"expected {len(FRACTIONS)} positive epoch counts (at {fractions} "
                                         f"of the labels), got {text!r}")
    return dict(zip(FRACTIONS, (int(p) for p in parts), strict=True))


def pct(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def folder_label(fraction: float) -> str:
    """A label fraction as it ends a step's folder name: ``10`` for 0.1 (``finetune-mae-10``)."""
    return pct(fraction).rstrip("%")


def finetune_budget(epochs: int, quick: bool) -> list[str]:
    """The length flags of a fine-tuning step of ``epochs`` (warmup 5% of it, two evaluations)."""
    if quick:
        return ["--max-steps", str(epochs), "--batch-size", "8"]
    return ["--epochs", str(epochs), "--set", f"optim.warmup_epochs={0.05 * epochs:g}",
            "--set", f"eval_every={max(1, epochs // 2)}"]


QUICK_FINETUNE_STEPS = 10


TIMING_STEPS = 100  # of each timing run: ten logged windows


def timing_steps(out: Path, data: str, pretraining: list[str], quick: bool) -> list[Step]:
    """The two short runs whose speeds give the compute match its per-image costs: ``pretraining`` (the MAE
    step's command without its length and output), then fine-tuning from it, each alone on the machine
    (``compute_match.py``)."""
    length = ["--max-steps", str(QUICK_FINETUNE_STEPS if quick else TIMING_STEPS)]
    finetuning = ["finetune", str(out / "mae"), "--data", data, "--label-fraction", "1.0", "--init",
                  "random", "--set", "optim.layer_decay=1.0", *(["--batch-size", "8"] if quick else [])]
    return [Step("timing-pretrain", [*pretraining, *length, "--out", str(out / "timing-pretrain")], ("mae",),
                 alone=True),
            Step("timing-finetune", [*finetuning, *length, "--out", str(out / "timing-finetune")],
                 ("timing-pretrain",), alone=True)]


def matched_scratch_step(out: Path, data: str, fraction: float, epochs: int, quick: bool) -> Step:
    """The scratch ViT fine-tuned for the compute of MAE pretraining + fine-tuning at ``fraction``; its length
    is computed when it starts, from the finished MAE, fine-tuning and timing runs, and kept in
    ``OUT/compute_match.json``."""
    from compute_match import matched_scratch

    label = folder_label(fraction)
    name, finetuned = f"finetune-scratch-matched-{label}", out / f"finetune-mae-{label}"
    timing = (out / "timing-pretrain", out / "timing-finetune")

    def command() -> list[str]:
        if quick:
            match = matched_scratch(out / "mae", finetuned, timing, max_steps=QUICK_FINETUNE_STEPS,
                                    batch_size=8)
            length = finetune_budget(match["max_steps"], quick)
        else:
            match = matched_scratch(out / "mae", finetuned, timing, epochs=epochs)
            length = finetune_budget(match["epochs"], quick)
        add_record(out / "compute_match.json", label, match)
        return ["finetune", str(out / "mae"), "--data", data, "--label-fraction", str(fraction), "--init",
                "random", "--set", "optim.layer_decay=1.0", *length, "--out", str(out / name)]

    return Step(name, command, ("mae", f"finetune-mae-{label}", "timing-finetune"))


def wallclock_steps(out: Path, data: str, methods: list[str], mae_epochs: int, quick: bool,
                    with_dvae: bool) -> list[Step]:
    """Each method of ``methods`` pretrained for the wall-clock of MAE's ``mae_epochs``: a timing step alone
    on the machine per method (``method_step_cost.py``: its training step back to back with MAE's, in one
    process, ``OUT/timing-METHOD.json``), then each method's run, its step count computed when it starts
    and kept in ``OUT/wallclock_match.json``. A method that reads a dVAE tokenizer gets ``OUT/dvae``: BEiT's
    chain's first step, added here unless ``with_dvae`` says the chain is run. A method that distils a
    teacher gets the MAE run (``OUT/mae``, as BEiT v2's VQ-KD does): its timing waits for that run."""
    tokenized = [m for m in methods if method_of(m).tokenizer is not None]
    taught = [m for m in methods if method_of(m).teacher]
    steps, after = [], ("dvae",) if tokenized else ()

    def reads(method: str) -> dict[str, Path]:
        """The runs ``method`` reads, by the name of its setting and flag."""
        return (({"tokenizer": out / "dvae"} if method in tokenized else {})
                | ({"teacher": out / "mae"} if method in taught else {}))
    if tokenized and not with_dvae:
        from beit_chain import beit_steps
        name, command = beit_steps(out, data, quick=quick)[0]
        steps.append(Step(name, command))

    def timing(method: str) -> Step:
        cost = ["--methods", f"mae,{method}", "--data", data, "--json", str(out / f"timing-{method}.json"),
                *(["--batch-size", "16", "--turns", "2", "--block", "1", "--warmup", "1"] if quick else []),
                *[arg for name, run in reads(method).items() for arg in ("--set", f"{method}.{name}={run}")]]
        waits = after + (("mae",) if method in taught else ())
        return Step(f"timing-{method}", cost, waits, alone=True, script=HERE / "method_step_cost.py")

    def pretraining(method: str) -> Callable[[], list[str]]:
        def command() -> list[str]:
            speeds = json.loads((out / f"timing-{method}.json").read_text())
            images = mae_epochs * speeds["train_images"] * speeds["images_per_s"][method] / speeds[
                "images_per_s"]["mae"]
            batch = 32 if quick else load_recipe(f"{method}_fmnist")["train"]["batch_size"]
            max_steps = 20 if quick else math.ceil(images / batch)
            add_record(out / "wallclock_match.json", method, {"images": round(images), "batch_size": batch,
                                                              "max_steps": max_steps, "speeds": speeds})
            extra = [arg for name, run in reads(method).items() for arg in (f"--{name}", str(run))]
            return ["pretrain", method, "--data", data, "--config", f"{method}_fmnist", *extra,
                    "--max-steps", str(max_steps), *(["--batch-size", "32"] if quick else []),
                    "--out", str(out / method)]
        return command

    steps += [timing(m) for m in methods]
    return steps + [Step(m, pretraining(m), (f"timing-{m}",)) for m in methods]


def own_init_name(verb: str, method: str, fraction: float) -> str:
    """The folder of a probe of ``method``'s architecture at random init (``linprobe-data2vec-random-10``)."""
    return f"{verb}-{method}-random-{folder_label(fraction)}"


def own_init_steps(out: Path, data: str, encoders: dict[str, Path], pool: str) -> list[Step]:
    """Each encoder's own architecture randomly initialized, probed as the encoder is (linear probe, k-NN, at
    every label fraction): the baseline of an architecture that is not the MAE run's (data2vec's layer scale
    of 1e-4 leaves its random blocks near the identity, and its random features far below the MAE ViT's).
    MAE's is the baseline column already."""
    steps = []
    for method, run in encoders.items():
        if method == "mae":
            continue
        for fraction in FRACTIONS:
            for verb in ("linprobe", "knn"):
                name = own_init_name(verb, method, fraction)
                steps.append(Step(name, [verb, str(run), "--data", data, "--label-fraction", str(fraction),
                                         "--init", "random", "--pool", pool, "--num-workers", "1",
                                         "--out", str(out / name)], (method,)))
    return steps


def own_init_table(out: Path, table: dict[tuple[str, float], dict[str, float]], encoders: dict[str, Path],
                   titles: dict[str, str]) -> list[str]:
    """Markdown lines: each encoder's probes beside its own architecture's at random init (`own_init_steps`),
    the gain in brackets; ``table``: the encoders' own top-1 by (verb, fraction), then method."""
    others = [m for m in encoders if m != "mae"]
    if not others:
        return []
    lines = ["| probe | labels | " + " | ".join(titles[m] for m in others) + " |",
             "|---|---|" + "---|" * len(others)]
    for verb, protocol in (("linprobe", "linear probe"), ("knn", "k-NN")):
        for fraction in FRACTIONS:
            cells = []
            for method in others:
                random = json.loads((out / own_init_name(verb, method, fraction) / "results.json")
                                    .read_text())["test_top1"]
                cells.append(f"{random:.2f} ({table[(verb, fraction)][method] - random:+.2f})")
            lines.append(f"| {protocol} | {pct(fraction)} | " + " | ".join(cells) + " |")
    return lines + ["", "Top-1 test accuracy (%) of each encoder's architecture randomly initialized and "
                    "frozen; in brackets, what its pretraining gained over it."]


def depth_table(out: Path, encoders: dict[str, Path], titles: dict[str, str]) -> list[str]:
    """Markdown lines: each encoder's linear probe and k-NN top-1 at every block."""
    lines = []
    for verb in ("linprobe", "knn"):
        rows = {m: json.loads((out / f"{verb}-depth-{m}" / "results.json").read_text())["by_layer"]
                for m in encoders}
        depth = max(len(r) for r in rows.values())
        lines += [f"| {verb}, {pct(DEPTH_FRACTION)} labels | " + " | ".join(f"block {i}" for i in
                                                                            range(1, depth + 1)) + " |",
                  "|---|" + "---|" * depth]
        for method, by_layer in rows.items():
            cells = " | ".join(f"{r['test_top1']:.2f}" for r in by_layer)
            lines.append(f"| {titles[method]} | {cells} |")
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/fmnist-quality")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--methods", default="mae",
                        help="pretrained encoders to compare: mae[,beit][,beitv2][,OTHER...] (BEiT: dVAE, "
                        "then BEiT, benchmarks/beit_chain.py; BEiT v2: VQ-KD from the MAE run, then BEiT v2, "
                        "benchmarks/beitv2_chain.py; any other registered pretraining method: MAE's "
                        "wall-clock)")
    parser.add_argument("--pretrain-epochs", type=int, default=20, help="MAE pretraining epochs")
    parser.add_argument("--beit-epochs", type=int, default=4, help="BEiT pretraining epochs")
    parser.add_argument("--beitv2-epochs", type=int, default=3, help="BEiT v2 pretraining epochs")
    parser.add_argument("--tokenizer-epochs", type=int, default=1, help="dVAE and VQ-KD training epochs")
    parser.add_argument("--finetune-epochs", type=epochs_per_fraction, default="3,15,60",
                        help="fine-tuning epochs at 100%%, 10%% and 1%% of the labels")
    parser.add_argument("--pool", default="avg", choices=("avg", "cls"), help="features of the probes")
    parser.add_argument("--jobs", type=int, default=2, help="steps run at once, sharing the cores")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage, to try the chain")
    args = parser.parse_args()
    out = Path(args.out)
    epochs = args.finetune_epochs
    methods = args.methods.split(",")
    matched = [m for m in methods if m not in CHAINED]
    try:
        for m in matched:
            if method_of(m).kind != "pretraining":
                raise MimkitError(f"{m} is a tokenizer, not a pretraining method")
            load_recipe(f"{m}_fmnist")
    except MimkitError as e:
        sys.exit(f"--methods: {e}")
    if args.jobs < 1:
        sys.exit("--jobs must be at least 1")

    # pretraining: MAE always (its run is the baselines' architecture and BEiT v2's teacher); the longest
    # chain (MAE, VQ-KD, BEiT v2) first, so that it starts first
    mae = ["pretrain", "mae", "--data", args.data, "--config", "mae_fmnist",
           *(["--batch-size", "32"] if args.quick else [])]
    length = ["--max-steps", "20"] if args.quick else ["--epochs", str(args.pretrain_epochs)]
    steps = [Step("mae", [*mae, *length, "--out", str(out / "mae")])]
    encoders = {"mae": out / "mae"}
    if "beitv2" in methods:
        from beitv2_chain import beitv2_steps
        chain = beitv2_steps(out, out / "mae", args.data, args.beitv2_epochs, args.tokenizer_epochs,
                             quick=args.quick)
        steps += chained(chain, after=("mae",))
        encoders["beitv2"] = out / "beitv2"
    if "beit" in methods:
        from beit_chain import beit_steps
        chain = beit_steps(out, args.data, args.beit_epochs, args.tokenizer_epochs, quick=args.quick)
        steps += chained(chain, after=())
        encoders["beit"] = out / "beit"
    if matched:
        steps += wallclock_steps(out, args.data, matched, args.pretrain_epochs, args.quick,
                                 with_dvae="beit" in methods)
        encoders |= {m: out / m for m in matched}
    encoders = {m: encoders[m] for m in methods}

    # evaluation: every encoder (after the step of the same name), and the baselines (the MAE run's ViT,
    # randomly initialized); the longest (full fine-tuning) first
    evaluations = []
    runs = [(m, run, "pretrained", m) for m, run in encoders.items()]
    for method, run, init, after in runs + [("baseline", out / "mae", "random", "mae")]:
        scratch = ["--set", "optim.layer_decay=1.0"] if init == "random" else []
        for fraction in FRACTIONS:
            budget = finetune_budget(QUICK_FINETUNE_STEPS if args.quick else epochs[fraction], args.quick)
            for verb, extra in (("finetune", budget + scratch),
                                ("linprobe", ["--pool", args.pool, "--num-workers", "1"]),
                                ("knn", ["--pool", args.pool, "--num-workers", "1"])):
                name = f"{verb}-{method}-{folder_label(fraction)}"
                command = [verb, str(run), "--data", args.data, "--label-fraction", str(fraction),
                           "--init", init, *extra, "--out", str(out / name)]
                evaluations.append((verb, fraction, method, Step(name, command, (after,))))
    steps += sorted((e[3] for e in evaluations),
                    key=lambda s: not (s.name.startswith("finetune-") and s.name.endswith("-100")))
    # the scratch ViT at the compute of MAE pretraining + fine-tuning; every encoder probed at every block
    # (the k-NN after the linear probe: it reads the feature cache the probe wrote)
    steps += timing_steps(out, args.data, mae, args.quick)
    steps += [matched_scratch_step(out, args.data, f, epochs[f], args.quick) for f in MATCHED_FRACTIONS]
    steps += own_init_steps(out, args.data, encoders, args.pool)
    for method, run in encoders.items():
        probe = ["--data", args.data, "--label-fraction", str(DEPTH_FRACTION), "--pool", args.pool,
                 "--num-workers", "1", "--layer", "all"]
        linprobe, knn = f"linprobe-depth-{method}", f"knn-depth-{method}"
        steps += [Step(linprobe, ["linprobe", str(run), *probe, "--out", str(out / linprobe)], (method,)),
                  Step(knn, ["knn", str(run), *probe, "--out", str(out / knn)], (linprobe,))]

    timings = run_chain(steps, out, args.jobs)

    notes = []
    if "beit" in methods:
        from beit_chain import tokenizer_summary
        notes.append(f"dVAE tokenizer: {tokenizer_summary(out / 'dvae')}")
    if "beitv2" in methods:
        from beitv2_chain import tokenizer_summary
        notes.append(f"VQ-KD tokenizer: {tokenizer_summary(out / 'vqkd')}")
    table: dict[tuple[str, float], dict[str, float]] = {}
    titles = TITLES | {m: m for m in methods if m not in TITLES}
    for verb, fraction, method, step in evaluations:
        results = json.loads((out / step.name / "results.json").read_text())
        table.setdefault((verb, fraction), {})[method] = results["test_top1"]

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
    per_step = ", ".join(f"{s.name} {timings.wall(s.name) / 60:.1f}" for s in steps)
    lengths = {"mae": f"{args.pretrain_epochs} epochs", "beit": f"{args.beit_epochs} epochs",
               "beitv2": f"{args.beitv2_epochs} epochs"}
    if matched:
        match = json.loads((out / "wallclock_match.json").read_text())
        lengths |= {m: f"{match[m]['max_steps']} steps of {match[m]['batch_size']} (MAE's wall-clock)"
                    for m in matched}
    pretraining = "20 steps each" if args.quick else ", ".join(
        f"{titles[m]} {lengths[m]}" for m in encoders) + (
        f", tokenizers {args.tokenizer_epochs} epoch(s)" if len(encoders) > 1 else "")
    lines += ["", "Top-1 test accuracy (%), gain over the baseline in brackets. Baselines: the MAE run's ViT "
              "randomly initialized and frozen (probes), trained from scratch with the same budget "
              f"(fine-tuning). Pretraining: {pretraining}. Wall time: {timings.data['chain_s'] / 60:.0f} min "
              f"for the whole chain, {args.jobs} steps at a time (minutes per step: {per_step}).",
              *notes]
    matches = json.loads((out / "compute_match.json").read_text())
    lines += ["", "| labels | MAE pretraining + fine-tuning | scratch, same compute | scratch, same "
              "fine-tuning budget |", "|---|---|---|---|"]
    unit, key = ("steps", "max_steps") if args.quick else ("epochs", "epochs")
    for fraction in MATCHED_FRACTIONS:
        label = folder_label(fraction)
        match = matches[label]
        matched = json.loads((out / f"finetune-scratch-matched-{label}" / "results.json").read_text())
        own = f"{match[f'finetune_{unit}']} {unit}"
        mae, base = table[("finetune", fraction)]["mae"], table[("finetune", fraction)]["baseline"]
        top1 = matched["test_top1"]
        lines.append(f"| {pct(fraction)} | {mae:.2f} ({own}) | {top1:.2f} ({match[key]} {unit}; "
                     f"{top1 - mae:+.2f}) | {base:.2f} ({own}) |")
    lines += ["", "Compute-matched scratch: the ViT from a random init, fine-tuned for the fine-tuning "
              "budget plus the MAE pretraining converted into fine-tuning images at the speeds of two "
              "timing runs made alone on the machine (benchmarks/compute_match.py; its numbers in "
              "compute_match.json)."]
    if "beitv2" in methods:
        lines += ["", "BEiT v2 beside its teacher (the MAE run whose features VQ-KD distils), linear "
                  "probe: " + ", ".join(f"{pct(f)} BEiT v2 {table[('linprobe', f)]['beitv2']:.2f} vs teacher "
                            f"{table[('linprobe', f)]['mae']:.2f}" for f in FRACTIONS) + "."]
    lines += ["", *own_init_table(out, table, encoders, titles)]
    lines += ["", *depth_table(out, encoders, titles),
              "Top-1 test accuracy (%) of the features of each block (--layer all, "
              f"{pct(DEPTH_FRACTION)} of the labels): pooled and normalized without parameters; the last "
              "block's are the encoder's usual features, with its final norm."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    summary = {"args": vars(args), "table": {f"{v} {pct(f)}": row for (v, f), row in table.items()},
               "compute_match": matches, "timings": timings.data}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
