"""The BEiT v2 stages of the Fashion-MNIST quality table: a VQ-KD tokenizer distilled from the MAE run's
encoder (so no labels are used anywhere), then BEiT v2 pretraining on its codes. The BEiT v2 run directory
is evaluated like the MAE run (linprobe, knn, finetune take it as is; the aggregation head is not part of
the encoder they load).

For ``benchmarks/fmnist_quality.py``, after its MAE step (the script's folder is on ``sys.path``)::

    from beitv2_chain import beitv2_steps, tokenizer_summary
    chain = beitv2_steps(out, out / "mae", args.data, args.beitv2_epochs, args.tokenizer_epochs)
    steps += chained(chain, after=("mae",))   # VQ-KD reads the MAE run, BEiT v2 the VQ-KD run
    encoder = out / "beitv2"                  # probes and fine-tuning, as for out / "mae"
    usage = tokenizer_summary(out / "vqkd")   # {"val_usage", "val_perplexity", "val_cosine"}

By hand, the same two commands::

    mimkit tokenizer train vqkd --teacher runs/q/mae --data fashion-mnist --config vqkd_fmnist \\
        --out runs/q/vqkd --epochs 1
    mimkit pretrain beitv2 --tokenizer runs/q/vqkd --data fashion-mnist --config beitv2_fmnist \\
        --model vit_mini --out runs/q/beitv2 --epochs 3
"""

import json
from pathlib import Path


def beitv2_steps(out: Path, mae: Path, data: str, epochs: int = 3, tokenizer_epochs: int = 1,
                 model: str = "vit_mini", quick: bool = False) -> list[tuple[str, list[str]]]:
    """``(name, mimkit arguments)`` of the two stages, in order; runs go to ``out / name``.

    Args:
        out: the benchmark's folder.
        mae: the MAE run directory whose encoder is the teacher.
        data: the data spec, e.g. "fashion-mnist".
        epochs: BEiT v2 pretraining epochs.
        tokenizer_epochs: VQ-KD training epochs.
        model: the BEiT v2 encoder (the MAE row's arch, vit_mini).
        quick: 20 steps per stage and a small held-out set, to try the chain.
    """
    def length(n: int) -> list[str]:
        return ["--max-steps", "20"] if quick else ["--epochs", str(n)]

    held_out = ["--set", "vqkd.eval_images=64"] if quick else []
    return [
        ("vqkd", ["tokenizer", "train", "vqkd", "--teacher", str(mae), "--data", data, "--config",
                  "vqkd_fmnist", "--out", str(out / "vqkd"), *length(tokenizer_epochs), *held_out]),
        ("beitv2", ["pretrain", "beitv2", "--tokenizer", str(out / "vqkd"), "--data", data, "--config",
                    "beitv2_fmnist", "--model", model, "--out", str(out / "beitv2"), *length(epochs)]),
    ]


def tokenizer_summary(run: Path) -> dict[str, float]:
    """The tokenizer's last held-out evaluation: codebook usage, perplexity, cosine to the teacher."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    last = [r for r in records if "val_usage" in r][-1]
    return {k: last[k] for k in ("val_usage", "val_perplexity", "val_cosine")}
