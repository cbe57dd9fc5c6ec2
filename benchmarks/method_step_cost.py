"""Pretraining step cost of registered methods at their Fashion-MNIST recipes, in one process, back to back.

Each method's model, view and loss come from its registry record and its ``NAME_fmnist`` recipe (a name may
also be a variant's recipe, ``caev2`` for ``caev2_fmnist``, which trains ``cae``); a method that reads a
tokenizer or teacher run gets it with ``--set``, as on the command line (``--set beit.tokenizer=runs/dvae``;
``--set cae.teacher=runs/mae`` for ``caev2``). One batch of Fashion-MNIST training
images goes through each method's own view once (seeded per sample, as in training); a step is forward +
backward + AdamW step on that same batch. After warm-up steps, the methods take turns, ``--block`` steps
each (a method's steps follow each other, as in training), ``--turns`` turns, the order reversed every
other turn, so that a change of the machine's load falls on every method alike; each method's speed is its
batch over its median step time, so that a step slowed by a burst of load does not move it. (Timed by the
mean of 20-step blocks beside test sweeps, the quality benchmark's run of 2026-12-06 gave its methods 0.32x
(CAE) to 2.0x (data2vec) the pretraining that this timing gives them.)
Reported: images/s, the ratio to the first method, the spread of the step times (quartiles), images per
second of process CPU time (all threads; less sensitive to waiting for a core), and the load average
(``os.getloadavg``) before and after; ``--json`` also writes them to a file (the quality benchmark's
wall-clock match reads it: ``fmnist_quality.py``).

    .venv/bin/python benchmarks/method_step_cost.py --methods mae,simmim,maskfeat --batch-size 256 \
        --turns 8 --block 5
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from mimkit.config import load_recipe, merge, parse_overrides
from mimkit.data.loader import SeededViews
from mimkit.data.sources import build_source
from mimkit.pretrain import resolve_data
from mimkit.registry import method_of, read_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="mae,maskfeat", help="comma-separated; the first is the reference")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--block", type=int, default=5, help="timed steps per method per turn")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method before the first turn")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--data", default="fashion-mnist", help="the images of the batch")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override, e.g. beit.tokenizer=runs/dvae (repeatable)")
    p.add_argument("--json", type=Path, help="also write the rates (and the data's image count) here")
    return p.parse_args(argv)


def make_step(name: str, batch_size: int, data: str = "fashion-mnist", overrides: dict | None = None):
    """(step closure, model description, training images) for method ``name`` at its fmnist recipe (with
    ``overrides`` of its own section) on a fixed batch of ``data``."""
    values = load_recipe(f"{name}_fmnist")  # a method's, or a variant's whose recipe names the method (caev2)
    method = method_of(values["method"])
    source = build_source(data)
    own = {key: section for key, section in (overrides or {}).items() if key == method.name}
    values = merge(values, own)
    config = resolve_data(read_config(values), source.info)
    if method.resolve_config is not None:  # the vocabulary of a tokenizer, the width of a teacher
        config = method.resolve_config(config)
    torch.manual_seed(0)
    model = method.build_model(config).train()
    view, loss_fn = method.build_task(config, model)
    items = SeededViews(source, view)
    samples = [items[(i, i)] for i in range(batch_size)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)

    def step() -> None:
        loss, _ = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if method.after_step:  # what the loop runs after each optimizer step (data2vec's EMA teacher)
            method.after_step(config, model, 1)

    params = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6  # a frozen teacher aside
    return step, f"{config.model.name}/{config.model.patch_size}, {params:.2f}M parameters", len(source)


def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    names = a.methods.split(",")
    overrides = parse_overrides(a.set)
    steps = {}
    for name in names:
        steps[name], about, train_images = make_step(name, a.batch_size, a.data, overrides)
        print(f"{name}: {about}")
        for _ in range(a.warmup):
            steps[name]()
    load_before = os.getloadavg()
    seconds = {name: [] for name in names}
    cpu = dict.fromkeys(names, 0.0)
    for turn in range(a.turns):
        for name in names if turn % 2 == 0 else names[::-1]:
            start_cpu = time.process_time()
            for _ in range(a.block):
                start = time.perf_counter()
                steps[name]()
                seconds[name].append(time.perf_counter() - start)
            cpu[name] += time.process_time() - start_cpu
    load_after = os.getloadavg()
    loads = ", ".join(f"{when} {' / '.join(f'{x:.1f}' for x in load)}"
                      for when, load in (("before", load_before), ("after", load_after)))
    print(f"batch {a.batch_size}, {a.turns} turns of {a.block} steps per method, {a.threads} threads; "
          f"load average (1 / 5 / 15 min): {loads}")
    rates = {name: a.batch_size / statistics.median(seconds[name]) for name in names}
    images = a.turns * a.block * a.batch_size
    for name in names:
        quartiles = " / ".join(f"{q:.3f}" for q in statistics.quantiles(seconds[name], n=4))
        print(f"{name:10s} {rates[name]:7.1f} images/s; {rates[name] / rates[names[0]]:.2f}x {names[0]}; "
              f"step quartiles {quartiles} s; {images / cpu[name]:.1f} images per CPU-second "
              f"({cpu[names[0]] / cpu[name]:.2f}x)")
    if a.json:
        a.json.write_text(json.dumps({
            "images_per_s": rates,
            "images_per_cpu_s": {name: images / cpu[name] for name in names},
            "train_images": train_images, "load_before": load_before, "load_after": load_after}, indent=2))


if __name__ == "__main__":
    main()
