"""The BEiT stages of the Fashion-MNIST quality table: a dVAE tokenizer trained on the training images
(no labels), then BEiT pretraining on its ids. The BEiT run directory is evaluated like the MAE run
(linprobe, knn, finetune take it as is; its encoder is a timm `Beit`, the tokenizer is not needed).

For ``benchmarks/fmnist_quality.py`` (the script's folder is on ``sys.path``)::

    from beit_chain import beit_steps, tokenizer_summary
    chain = beit_steps(out, args.data, args.beit_epochs, args.tokenizer_epochs)
    steps += chained(chain, after=())         # BEiT reads the dVAE run
    encoder = out / "beit"                    # probes and fine-tuning, as for out / "mae"
    codes = tokenizer_summary(out / "dvae")   # {"recon", "usage", "perplexity"} of its last logged step

By hand, the same two commands::

    mimkit tokenizer train dvae --data fashion-mnist --config dvae_fmnist --out runs/q/dvae --epochs 1
    mimkit pretrain beit --tokenizer runs/q/dvae --data fashion-mnist --config beit_fmnist \\
        --model vit_mini --out runs/q/beit --epochs 4

A BEiT step encodes all 49 patches where MAE's encodes 12 but has no decoder: with one thread per
process on the 2-core VM, BEiT trains vit_mini at ~158 images/s and MAE at ~199, so the 4 BEiT epochs
cost about as much as 5 MAE epochs.
"""

import json
from pathlib import Path


def beit_steps(out: Path, data: str, epochs: int = 4, tokenizer_epochs: int = 1, model: str = "vit_mini",
               quick: bool = False) -> list[tuple[str, list[str]]]:
    """``(name, mimkit arguments)`` of the two stages, in order; runs go to ``out / name``.

    Args:
        out: the benchmark's folder.
        data: the data spec, e.g. "fashion-mnist".
        epochs: BEiT pretraining epochs.
        tokenizer_epochs: dVAE training epochs.
        model: the BEiT encoder (the MAE row's arch, vit_mini).
        quick: 20 steps of batch 32 per stage, to try the chain.
    """
    def length(n: int) -> list[str]:
        return ["--max-steps", "20", "--batch-size", "32"] if quick else ["--epochs", str(n)]

    return [
        ("dvae", ["tokenizer", "train", "dvae", "--data", data, "--config", "dvae_fmnist",
                  "--out", str(out / "dvae"), *length(tokenizer_epochs)]),
        ("beit", ["pretrain", "beit", "--tokenizer", str(out / "dvae"), "--data", data, "--config",
                  "beit_fmnist", "--model", model, "--out", str(out / "beit"), *length(epochs)]),
    ]


def tokenizer_summary(run: Path) -> dict[str, float]:
    """The dVAE's last logged training step: reconstruction MSE (normalized pixels), codebook usage in
    the batch, perplexity of the batch's codes."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    last = [r for r in records if "usage" in r][-1]
    return {k: last[k] for k in ("recon", "usage", "perplexity")}
