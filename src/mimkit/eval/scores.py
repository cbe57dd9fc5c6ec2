"""The scores of an evaluation (top-k accuracy, the confusion matrix, accuracy by depth) and the
``results.json`` every evaluation run leaves. (The training log's ``metrics.jsonl`` is
`mimkit.train.metrics_log`.)"""

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mimkit.data.loader import evaluation_batches
from mimkit.errors import explain_write_errors
from mimkit.files import write_text_atomically


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """How many rows of ``scores`` (N, C) have their label among the top k, for each k (capped at C)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # [N, k_max]
    hits = top == labels[:, None].to(top.device)
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


@torch.inference_mode()
def classification_accuracy(model: nn.Module, loader: DataLoader, device: torch.device,
                            desc: str = "eval") -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) of a classifier over a loader of ``{"image", "label"}`` batches.

    The progress bar shows the running top-1. The model is left in eval mode.
    """
    model.eval()
    top1 = top5 = seen = 0
    with evaluation_batches(loader) as batches:
        bar = tqdm(batches, desc=desc, total=len(loader), leave=False, dynamic_ncols=True, unit="batch")
        for batch in bar:
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
            with autocast:
                logits = model(batch["image"].to(device, non_blocking=True))
            c1, c5 = topk_correct(logits.float(), batch["label"], (1, 5))
            top1, top5, seen = top1 + c1, top5 + c5, seen + len(logits)
            bar.set_postfix(top1=f"{100 * top1 / seen:.2f}")
    return {"top1": 100 * top1 / seen, "top5": 100 * top5 / seen}


def prefixed(prefix: str, metrics: dict) -> dict:
    """``{"top1": 90.1}`` -> ``{"<prefix>_top1": 90.1}``."""
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def write_results(run_dir: str | Path, results: dict) -> Path:
    """Write ``<run>/results.json`` (indented, keys in insertion order)."""
    path = Path(run_dir) / "results.json"
    with explain_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(results, indent=2) + "\n")
    return path


def write_segmentation_results(run_dir: str | Path, results: dict, scores: dict) -> Path:
    """Write a segmentation run's ``results.json`` (`write_results`), its confusion matrix (``scores
    ["confusion"]``, rows truth) with its class names to ``<run>/confusion.json``, and the matrix's picture to
    ``<run>/confusion.png`` (`mimkit.viz.confusion_plot`).

    Returns:
        The picture's path.
    """
    from mimkit.viz import confusion_plot, save_picture

    run_dir = write_results(run_dir, results).parent
    names = [row["class"] for row in scores["per_class"]]
    (run_dir / "confusion.json").write_text(json.dumps({"classes": names, "rows_truth_columns_prediction":
                                                        scores["confusion"]}) + "\n")
    return save_picture(confusion_plot(scores["confusion"], names), run_dir / "confusion.png")


def depth_results(run_dir: str | Path, protocol: str, rows: list[dict]) -> dict:
    """The ``results.json`` fields of a probe run at several blocks, and its plot.

    Args:
        run_dir: where ``accuracy_by_depth.png`` is written.
        protocol: "linprobe" or "knn", for the plot's title.
        rows: one per block, in block order: {"layer": N, "test_top1": ..., ...}.

    Returns:
        ``by_layer`` (the rows), ``best_layer`` (highest test top-1, for reading the curve; a model chosen
        by it would be chosen on the test split) and ``plot`` (the file name); the top-level accuracies are
        the last block's, the encoder's usual features.
    """
    from mimkit.viz import accuracy_by_depth_plot, save_picture

    plot = save_picture(accuracy_by_depth_plot(rows, f"{protocol} top-1 (%) by block"),
                        Path(run_dir) / "accuracy_by_depth.png")
    best = max(rows, key=lambda r: r["test_top1"])["layer"]
    return {"by_layer": rows, "best_layer": best, "plot": plot.name}
