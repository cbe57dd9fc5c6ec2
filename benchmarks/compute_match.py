"""The compute-matched scratch baseline of the Fashion-MNIST quality table: a ViT trained from scratch for as
long as pretraining and fine-tuning took together, so the pretraining's own cost is not free.

The match is made in image-passes weighted by per-image cost. The costs come from two short timing runs
(``OUT/timing-pretrain``, ``OUT/timing-finetune``: the same pretraining and fine-tuning for a hundred
steps), made one after the other with the machine to themselves and the same threads, and read from the
training loop's own step timings (``images_per_s`` in their ``metrics.jsonl``, logged every ``log_every``
steps) as the median over the run. The long runs' own logs do not serve: they shared the cores with
whatever else ran at the time (on the 2-core VM MAE's pretraining logged 98 images/s beside the BEiT
chain, against 335 alone), so their ratio says as much about the load as about the work. Alone, the ratio
still drifted by about 10% within an hour on the VM (benchmarks/RESULTS.md), the precision of the match.
Then, at a label fraction with ``N`` training images and ``E`` fine-tuning epochs:

    pretraining, in fine-tuning images = pretraining images x (fine-tuning speed / pretraining speed)
    scratch epochs = E + ceil(that / N)

The scratch run has the fine-tuning recipe (no layer-wise lr decay), so its per-image cost is the
fine-tuning one and the match holds in seconds at the measured speeds. The speeds, the image counts and
the resulting epochs are written to ``OUT/compute_match.json``.

For ``benchmarks/fmnist_quality.py`` (the script's folder is on ``sys.path``)::

    from compute_match import matched_scratch
    budget = matched_scratch(out / "mae", out / "finetune-mae-10", (out / "timing-pretrain",
                             out / "timing-finetune"), epochs=15)  # {"epochs": ..., ...}
"""

import json
import math
import statistics
from pathlib import Path

import yaml


def median_speed(run: Path) -> float:
    """Median training images per second of a run's logged steps (the first window, warm-up, left out when
    there are others)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["images_per_s"] for r in records if "images_per_s" in r]
    if not speeds:
        raise SystemExit(f"{run}: no images_per_s in metrics.jsonl; is it a finished training run?")
    return statistics.median(speeds[1:] or speeds)


def trained_images(run: Path) -> int:
    """Images a finished training run passed through its model: its last step x its global batch."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = max(r["step"] for r in records if "images_per_s" in r)
    return steps * config["train"]["batch_size"] * config["train"].get("accum_steps", 1)


def matched_scratch(pretraining: Path, finetuning: Path, timing: tuple[Path, Path], epochs: int | None = None,
                    max_steps: int | None = None, batch_size: int | None = None) -> dict:
    """The scratch run's length that matches pretraining + fine-tuning at one label fraction.

    Args:
        pretraining: the finished pretraining run (e.g. ``OUT/mae``).
        finetuning: its finished fine-tuning run at this fraction (e.g. ``OUT/finetune-mae-10``).
        timing: the short pretraining and fine-tuning runs whose speeds give the per-image costs.
        epochs: that fine-tuning's epochs; the scratch run gets ``epochs`` + the pretraining's share.
        max_steps, batch_size: instead of ``epochs`` (the ``--quick`` chain), its steps and batch.

    Returns:
        ``epochs`` (or ``max_steps``) of the scratch run, and the numbers behind them.
    """
    pre_speed, ft_speed = (median_speed(run) for run in timing)
    pre_images = trained_images(pretraining)
    as_finetuning = pre_images * ft_speed / pre_speed  # fine-tuning images that cost what pretraining did
    facts = {"pretraining_images": pre_images, "pretraining_images_per_s": round(pre_speed, 1),
             "finetuning_images_per_s": round(ft_speed, 1),
             "pretraining_in_finetuning_images": round(as_finetuning)}
    if epochs is not None:
        train_images = json.loads((finetuning / "results.json").read_text())["train_images"]
        return facts | {"train_images": train_images, "finetune_epochs": epochs,
                        "epochs": epochs + math.ceil(as_finetuning / train_images)}
    return facts | {"finetune_steps": max_steps,
                    "max_steps": max_steps + math.ceil(as_finetuning / batch_size)}
