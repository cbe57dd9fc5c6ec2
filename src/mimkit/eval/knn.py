"""Weighted k-nearest-neighbour classification on frozen features (the DINO protocol).

Features are L2-normalized; each query's k most cosine-similar training features vote for their
class with weight ``exp(similarity / T)``.

- DINO: Caron et al., 2021, arXiv:2104.14294, section 4.1 (k = 20, T = 0.07)
- Wu et al., 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"
"""

import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mimkit.errors import MimkitError
from mimkit.eval.config import KnnConfig
from mimkit.eval.features import probe_data, probe_layers
from mimkit.eval.scores import depth_results, prefixed, topk_correct, write_results
from mimkit.kinds import Kind, register_kind
from mimkit.runs import Encoder, claim_out_dir, save_run_config
from mimkit.train.metrics_log import MetricsLog


@torch.no_grad()
def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
               num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class votes of each query.

    Args:
        train_features: (N, D) features of the labelled set.
        train_labels: (N,) their classes in [0, num_classes).
        query_features: (M, D) features to classify.
        num_classes: C.
        k: neighbours per query (capped at N).
        temperature: T of the ``exp(cos / T)`` vote weight.
        chunk: queries scored at a time (bounds memory at chunk x N similarities).

    Returns:
        (M, C) summed vote weights; the argmax is the prediction.
    """
    if k < 1 or temperature <= 0:
        raise MimkitError(f"k-NN needs k >= 1 and a positive temperature, got k={k}, T={temperature}")
    train = F.normalize(train_features.float(), dim=1)
    k = min(k, len(train))
    scores = []
    for start in range(0, len(query_features), chunk):
        query = F.normalize(query_features[start:start + chunk].float(), dim=1)
        similarity, neighbours = (query @ train.T).topk(k, dim=1)  # [m, k]
        weights = (similarity / temperature).exp()
        votes = torch.zeros(len(query), num_classes)
        scores.append(votes.scatter_add_(1, train_labels[neighbours], weights))  # [m, C]
    return torch.cat(scores)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                 query_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024, desc: str = "k-NN") -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) of `knn_scores` on labelled queries, with a progress bar."""
    top1 = top5 = 0
    bar = tqdm(range(0, len(query_features), chunk), desc=desc, leave=False, dynamic_ncols=True, unit="chunk")
    for start in bar:
        scores = knn_scores(train_features, train_labels, query_features[start:start + chunk], num_classes,
                            k, temperature, chunk)
        c1, c5 = topk_correct(scores, query_labels[start:start + chunk], (1, 5))
        top1, top5 = top1 + c1, top5 + c5
        bar.set_postfix(top1=f"{100 * top1 / min(start + chunk, len(query_features)):.2f}")
    n = len(query_features)
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n}


def run_knn(encoder: Encoder, config: KnnConfig, out: str | Path, force: bool = False) -> dict:
    """The k-NN protocol end to end: cached features, neighbours among the label-fraction subset,
    accuracy on the held-out part (with ``val_fraction``) and on the test split; ``metrics.jsonl`` and
    ``results.json`` in ``out``, which must be new, empty or an earlier knn's (`mimkit.runs.claim_out_dir`).

    Args:
        encoder: from `mimkit.runs.load_encoder` (``config.encoder`` loaded).
        config: the protocol's settings. ``config.layer`` is the block whose features are compared
            (`probe_layers`): None, the final features; N, block N; ``"all"``, every block from one feature
            pass: one ``metrics.jsonl`` record per block (step = block), the table ``by_layer`` in
            ``results.json`` and ``accuracy_by_depth.png``.
        out: the output folder; its ``config.yaml`` says the kind (``knn``) and the settings.
        force: write into an ``out`` folder that another command made, or that holds other files.

    Returns:
        The results written to ``results.json``.
    """
    start = time.perf_counter()
    c, k = config, config.k
    layers = probe_layers(c.layer, len(encoder.model.blocks))
    out = claim_out_dir(out, "knn", force)
    save_run_config(out, "knn", config)
    features = probe_data(encoder, c.data, c.pool, root=c.root, label_fraction=c.label_fraction,
                          val_fraction=c.val_fraction, seed=c.seed, cache_dir=c.cache_dir,
                          num_workers=c.num_workers, layers=layers)
    train_images = len(features.train[1])
    if k > train_images:  # knn_scores caps k there: record the k that ran
        warnings.warn(f"k={k} is more than the {train_images} training images; k={train_images} is used",
                      stacklevel=2)
        k = train_images
    log = MetricsLog(out)
    rows = []
    for block, part in features.per_layer():
        parts = {"val": part.val, "test": part.test} if part.val else {"test": part.test}
        where = "" if block is None else f" block {block}"
        final = {}
        for name, (x, y) in parts.items():
            final |= prefixed(name, knn_accuracy(*part.train, x, y, part.num_classes, k, c.temperature,
                                                 desc=f"k-NN {name}{where}"))
        log.write(block or 0, **final)
        rows.append({"layer": block, **final})
    log.close()
    results = {"protocol": "knn", "encoder": encoder.origin, "data": c.data, "pool": c.pool, "layer": c.layer,
               "label_fraction": c.label_fraction, "val_fraction": c.val_fraction, "seed": c.seed,
               "train_images": train_images, "k": k, "temperature": c.temperature,
               **{key: v for key, v in rows[-1].items() if key != "layer"},
               **(depth_results(out, "knn", rows) if c.layer == "all" else {}),
               "wall_s": round(time.perf_counter() - start, 1)}
    write_results(out, results)
    return results


register_kind(Kind("knn", KnnConfig, "mimkit knn RUN: k-nearest-neighbour classification on an encoder's "
                   "frozen features"))
