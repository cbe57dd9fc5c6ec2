"""Frozen-encoder features, extracted once and cached, so a probe trains in seconds.

A cache file holds the pooled features of one split, named by a digest of everything that determines
them: the encoder's weights, the data and split, the view, the pooling and the blocks read. The linear
probe and k-NN, at every label fraction, read the same file. Probes read the encoder's final features by
default, or those of any block (``layer``): ``"all"`` caches every block in one pass over the images.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from mimkit.data.loader import eval_loader, evaluation_batches
from mimkit.data.sources import build_source
from mimkit.data.transforms import eval_view
from mimkit.errors import MimkitError, explain_write_errors
from mimkit.eval.subsets import make_splits
from mimkit.files import write_atomically
from mimkit.models.classifier import block_features, pooled_features
from mimkit.runs import Encoder


def probe_layers(layer: int | str | None, depth: int) -> tuple[int, ...] | None:
    """The blocks a probe reads: None for the encoder's final features, ``N`` for block N (1-based; N =
    depth is the final features too), ``"all"`` for every block."""
    if layer is None:
        return None
    if layer == "all":
        return tuple(range(1, depth + 1))
    if isinstance(layer, str) and layer.isdigit():
        layer = int(layer)
    if not isinstance(layer, int) or not 1 <= layer <= depth:
        raise MimkitError(f"--layer {layer!r}: pass a block number in 1..{depth} or 'all'")
    return (layer,)


@torch.inference_mode()
def extract_features(model: nn.Module, loader: DataLoader, pool: str, device: torch.device,
                     desc: str = "features", layers: Sequence[int] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of every image, float32 on CPU: (N, D) final features (`pooled_features`), or
    (N, K, D) of K ``layers`` (`block_features`); and labels (N,)."""
    model.eval().to(device)
    features, labels = [], []
    with evaluation_batches(loader) as batches:
        for batch in tqdm(batches, desc=desc, total=len(loader), leave=False, dynamic_ncols=True,
                          unit="batch"):
            images = batch["image"].to(device)
            pooled = (pooled_features(model, images, pool) if layers is None
                      else block_features(model, images, pool, layers))
            features.append(pooled.float().cpu())
            labels.append(batch["label"])
    return torch.cat(features), torch.cat(labels)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a module's state (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cached_features(model: nn.Module, source: Dataset, view, pool: str, data_key: str, cache_dir: str | Path,
                    indices: Sequence[int] | None = None, *, layers: Sequence[int] | None = None,
                    batch_size: int = 256, num_workers: int = 0, device: torch.device | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`extract_features` of some items of ``source``, computing only those no earlier call cached.

    The cache file of a (model, source, view, pool) holds a row per item and a mask of the rows
    filled so far, so probing 1% of the labels extracts 1% of the images, and 10% later adds the rest.

    Args:
        model: the frozen encoder.
        source: the images, e.g. a train or test split, with ``.labels``.
        view: the deterministic evaluation view (part of the cache key through its ``repr``).
        pool: ``avg`` or ``cls``.
        data_key: names the data and split, e.g. ``"fashion-mnist:test"``.
        cache_dir: where cache files live (created if needed).
        indices: items wanted, in this order; None for all.
        layers: the blocks read (`extract_features`); None for the final features.

    Returns:
        features (n, D) float32, or (n, K, D) of K ``layers``, and labels (n,) of the wanted items.
    """
    parts = [weights_digest(model), data_key, str(len(source)), repr(view), pool]
    parts += [] if layers is None else [f"blocks {list(layers)}"]  # final features keep their old files
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    safe_name = "".join(c if c.isalnum() or c in "-_" else "_" for c in data_key)
    path = Path(cache_dir) / f"{safe_name}-{pool}-{key}.safetensors"
    cached = load_file(str(path)) if path.exists() else {}
    labels = torch.as_tensor(source.labels)
    have = cached["have"].bool() if cached else torch.zeros(len(source), dtype=torch.bool)
    features = cached.get("features")
    wanted = torch.arange(len(source)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    missing = wanted[~have[wanted]].unique()
    if len(missing):
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        loader = eval_loader(Subset(source, missing.tolist()), view, batch_size, num_workers)
        new, _ = extract_features(model, loader, pool, device, desc=f"features {data_key}", layers=layers)
        if features is None:
            features = torch.zeros(len(source), *new.shape[1:])
        features[missing], have[missing] = new, True
        with explain_write_errors(path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"features": features, "labels": labels, "have": have.to(torch.uint8)}
        write_atomically(path, lambda tmp: save_file(tensors, str(tmp)))
    return features[wanted], labels[wanted]


@dataclass
class ProbeData:
    """Features of the three parts of a probe evaluation (each ``(features, labels (N,))``; features
    (N, D), or (N, K, D) with ``layers``).

    Attributes:
        train: the label-fraction subset of the train split (after any hold-out).
        val: the held-out part of the train split, or None without ``val_fraction``.
        test: the test split, for the final number only.
        num_classes: classes of the data.
        layers: the K blocks the features come from; None for the final features.
    """

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor] | None
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    layers: tuple[int, ...] | None = None

    def per_layer(self) -> list[tuple[int | None, "ProbeData"]]:
        """(block, the (N, D) features of that block) for each block read; [(None, self)] for the final
        features."""
        if self.layers is None:
            return [(None, self)]

        def pick(part, k):
            return None if part is None else (part[0][:, k], part[1])

        return [(block, replace(self, train=pick(self.train, k), val=pick(self.val, k),
                                test=pick(self.test, k), layers=(block,)))
                for k, block in enumerate(self.layers)]


def probe_data(encoder: Encoder, data: str, pool: str, *, root: str | None = None,
               label_fraction: float = 1.0, val_fraction: float = 0.0, seed: int = 0,
               cache_dir: str | Path | None = None, layers: Sequence[int] | None = None,
               batch_size: int = 256, num_workers: int = 0) -> ProbeData:
    """Frozen features of ``data`` for a linear probe or k-NN, through the encoder's evaluation view.

    Features are cached in ``cache_dir`` (by default the encoder run's ``features/``): each image is
    encoded once, whatever the label fraction or the protocol that asks for it.

    Args:
        encoder: from `mimkit.runs.load_encoder`.
        data: a source spec (``fashion-mnist``, a folder, ...).
        pool: ``avg`` or ``cls``.
        root, label_fraction, val_fraction, seed: see `build_source` and `make_splits`.
        layers: the blocks to read (`probe_layers`); None for the final features.
    """
    spec = encoder.spec.data
    view = eval_view(spec.img_size, spec.mean, spec.std)
    cache_dir = Path(cache_dir) if cache_dir else encoder.run_dir / "features"

    def features(split: str, source: Dataset, indices: list[int] | None = None):
        return cached_features(encoder.model, source, view, pool, f"{data}:{split}", cache_dir, indices,
                               layers=layers, batch_size=batch_size, num_workers=num_workers)

    train_source = build_source(data, "train", root=root, channels=spec.channels)
    splits = make_splits(train_source, label_fraction, val_fraction, seed)
    return ProbeData(train=features("train", train_source, splits.train),
                     val=features("train", train_source, splits.val) if splits.val else None,
                     test=features("test", build_source(data, "test", root=root, channels=spec.channels)),
                     num_classes=train_source.info.num_classes,
                     layers=None if layers is None else tuple(layers))
