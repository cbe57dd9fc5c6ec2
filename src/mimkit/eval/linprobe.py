"""Linear probing: a linear classifier on frozen, cached encoder features (the MAE protocol).

The head is BatchNorm without affine parameters followed by a linear layer: the norm only rescales
the features (it is foldable into the linear layer), which makes one learning rate fit encoders with
very different feature scales. SGD with momentum or LARS, linear warmup then cosine decay, no weight
decay by default.

- MAE: He et al., 2021, arXiv:2111.06377, appendix A.3
"""

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from torch import nn
from tqdm import tqdm

from mimkit.errors import MimkitError
from mimkit.eval.config import LinprobeConfig
from mimkit.eval.features import probe_data, probe_layers
from mimkit.eval.lars import LARS
from mimkit.eval.scores import depth_results, prefixed, topk_correct, write_results
from mimkit.files import write_atomically
from mimkit.kinds import Kind, register_kind
from mimkit.runs import Encoder, claim_out_dir, save_run_config
from mimkit.train.metrics_log import MetricsLog
from mimkit.train.schedule import cosine_schedule

OPTIMIZERS = ("sgd", "lars")


class LinearProbe(nn.Sequential):
    """features (B, D) -> logits (B, C): ``BatchNorm1d(D, affine=False)`` then ``Linear(D, C)``.

    Args:
        dim: feature width D.
        num_classes: C.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


@contextlib.contextmanager
def single_thread():
    """Run tiny matrix products on one thread: faster, and no spin-waiting when the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def probe_accuracy(probe: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) of a probe on features (N, D) with labels (N,)."""
    probe.eval()
    top1, top5 = topk_correct(probe(features), labels, (1, 5))
    return {"top1": 100 * top1 / len(labels), "top5": 100 * top5 / len(labels)}


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                       epochs: int = 100, batch_size: int = 256, base_lr: float = 0.1, optimizer: str = "sgd",
                       weight_decay: float = 0.0, warmup_epochs: int = 10, seed: int = 0,
                       evaluate: Callable[[nn.Module], dict] | None = None, eval_every: int = 10,
                       log: MetricsLog | None = None, desc: str = "linprobe") -> LinearProbe:
    """Fit a `LinearProbe` on in-memory features.

    Args:
        features: (N, D) training features.
        labels: (N,) their classes.
        num_classes: C.
        epochs: passes over the features.
        batch_size: capped at N; incomplete batches are dropped (BatchNorm needs > 1 sample).
        base_lr: lr = base_lr x batch / 256, warmed up over ``warmup_epochs``, then cosine to 0.
        optimizer: ``sgd`` (momentum 0.9) or ``lars``.
        weight_decay: L2 on the linear weights.
        seed: the probe's initialization and the data order.
        evaluate: called on the probe every ``eval_every`` epochs and at the end; its numbers are
            logged and the first one shown on the progress bar.
        log: where the per-epoch loss and the evaluations go (``step`` is the epoch).

    Returns:
        The trained probe, in eval mode.
    """
    if optimizer not in OPTIMIZERS:
        raise MimkitError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if len(features) < 2 or epochs < 1:
        raise MimkitError(f"a linear probe needs at least 2 training images and 1 epoch, got "
                          f"{len(features)} and {epochs}")
    batch_size = min(batch_size, len(features))
    steps_per_epoch = len(features) // batch_size
    lr = base_lr * batch_size / 256
    schedule = cosine_schedule(lr, 0.0, epochs * steps_per_epoch, warmup_epochs * steps_per_epoch)
    with torch.random.fork_rng(devices=[]):  # the init from `seed` alone: the same probe whatever ran before
        torch.manual_seed(seed)
        probe = LinearProbe(features.shape[1], num_classes)
    weights, biases = [probe[1].weight], [probe[1].bias]
    groups = [{"params": weights, "weight_decay": weight_decay}, {"params": biases, "weight_decay": 0.0}]
    opt = LARS(groups) if optimizer == "lars" else torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    step, shown = 0, {}
    bar = tqdm(range(1, epochs + 1), desc=desc, leave=False, dynamic_ncols=True, unit="epoch")
    with single_thread():
        for epoch in bar:
            probe.train()
            order = torch.randperm(len(features), generator=g)
            total, correct = 0.0, 0
            for b in range(steps_per_epoch):
                batch = order[b * batch_size:(b + 1) * batch_size]
                for group in opt.param_groups:
                    group["lr"] = schedule[step]
                logits = probe(features[batch])
                loss = F.cross_entropy(logits, labels[batch])
                correct += int((logits.argmax(1) == labels[batch]).sum())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                total += loss.item()
            record = {"loss": total / steps_per_epoch, "lr": schedule[step - 1],
                      "train_top1": 100 * correct / (steps_per_epoch * batch_size)}
            if evaluate and (epoch % eval_every == 0 or epoch == epochs):
                results = evaluate(probe)
                record |= results
                shown = {k: f"{v:.2f}" for k, v in list(results.items())[:1]}
            bar.set_postfix(loss=f"{record['loss']:.4f}", train_top1=f"{record['train_top1']:.2f}", **shown)
            if log:
                log.write(epoch, **record)
    return probe.eval()


def run_linprobe(encoder: Encoder, config: LinprobeConfig, out: str | Path, force: bool = False) -> dict:
    """The linear-probe protocol end to end: cached features, probe training, accuracy, ``results.json``.

    The probe is evaluated on the held-out validation part while it trains (when ``val_fraction`` > 0)
    and on the test split once, at the end. ``out`` receives ``metrics.jsonl``, ``probe.safetensors``
    and ``results.json``; it must be new, empty or an earlier linprobe's (`mimkit.runs.claim_out_dir`).

    Args:
        encoder: from `mimkit.runs.load_encoder` (``config.encoder`` loaded).
        config: the protocol's settings. ``config.layer`` is the block whose features the probe reads
            (`probe_layers`): None, the final features; N, block N; ``"all"``, one probe per block from one
            feature pass: ``probe-blockN.safetensors``, one ``metrics.jsonl`` record per block (step =
            block), the table ``by_layer`` in ``results.json`` and ``accuracy_by_depth.png``.
        out: the output folder; its ``config.yaml`` says the kind (``linprobe``) and the settings.
        force: write into an ``out`` folder that another command made, or that holds other files.

    Returns:
        The results written to ``results.json``.
    """
    start = time.perf_counter()
    c = config
    layers = probe_layers(c.layer, len(encoder.model.blocks))
    out = claim_out_dir(out, "linprobe", force)
    save_run_config(out, "linprobe", config)
    features = probe_data(encoder, c.data, c.pool, root=c.root, label_fraction=c.label_fraction,
                          val_fraction=c.val_fraction, seed=c.seed, cache_dir=c.cache_dir,
                          num_workers=c.num_workers, layers=layers)
    log = MetricsLog(out)
    every_block = c.layer == "all"
    rows = []
    for block, part in features.per_layer():
        evaluate = (lambda p, part=part: prefixed("val", probe_accuracy(p, *part.val))) if part.val else None
        probe = train_linear_probe(*part.train, part.num_classes, epochs=c.epochs, batch_size=c.batch_size,
                                   base_lr=c.base_lr, optimizer=c.optimizer, weight_decay=c.weight_decay,
                                   seed=c.seed,
                                   evaluate=evaluate, log=None if every_block else log,
                                   desc="linprobe" if block is None else f"linprobe block {block}")
        final = (evaluate(probe) if evaluate else {}) | prefixed("test", probe_accuracy(probe, *part.test))
        log.write(block if every_block else c.epochs, **final)
        name = f"probe-block{block}.safetensors" if every_block else "probe.safetensors"
        write_atomically(out / name, lambda tmp, probe=probe: save_model(probe, str(tmp)))
        rows.append({"layer": block, **final})
    log.close()
    results = {"protocol": "linprobe", "encoder": encoder.origin, "data": c.data, "pool": c.pool,
               "layer": c.layer, "label_fraction": c.label_fraction, "val_fraction": c.val_fraction,
               "seed": c.seed, "train_images": len(features.train[1]),
               "feature_dim": features.train[0].shape[-1],
               "optimizer": c.optimizer, "epochs": c.epochs, "base_lr": c.base_lr,
               "weight_decay": c.weight_decay,
               **{k: v for k, v in rows[-1].items() if k != "layer"},
               **(depth_results(out, "linprobe", rows) if every_block else {}),
               "wall_s": round(time.perf_counter() - start, 1)}
    write_results(out, results)
    return results


register_kind(Kind("linprobe", LinprobeConfig, "mimkit linprobe RUN: a linear classifier on an encoder's "
                   "frozen features"))
