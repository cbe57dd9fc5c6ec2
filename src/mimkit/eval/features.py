"""Frozen-encoder features, extracted once and cached, so a probe trains in seconds.

A cache file holds the pooled features and labels of one split, named by a digest of everything
that determines them: the encoder's weights, the data and split, the view, and the pooling. Running
the linear probe and k-NN at several label fractions reads the same file.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mimkit.data.loader import SeededViews
from mimkit.data.sources import build_source
from mimkit.data.transforms import eval_view
from mimkit.eval.classifier import pooled_features
from mimkit.eval.encoders import Encoder
from mimkit.eval.subsets import make_splits


def eval_loader(source: Dataset, view, batch_size: int = 256, num_workers: int = 0) -> DataLoader:
    """Batches ``{"image", "label"}`` of every item of ``source``, in order, through a deterministic view."""
    items = [(i, 0) for i in range(len(source))]  # (index, seed): the view is deterministic
    return DataLoader(SeededViews(source, view), batch_size, sampler=items, num_workers=num_workers)


@torch.inference_mode()
def extract_features(model: nn.Module, loader: DataLoader, pool: str, device: torch.device,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of every image: (N, D) float32 on CPU, and labels (N,)."""
    model.eval().to(device)
    features, labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, unit="batch"):
        features.append(pooled_features(model, batch["image"].to(device), pool).float().cpu())
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
                    *, batch_size: int = 256, num_workers: int = 0,
                    device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`extract_features`, read from ``cache_dir`` when an identical extraction was done before.

    Args:
        model: the frozen encoder.
        source: the images, e.g. a train or test split.
        view: the deterministic evaluation view (part of the cache key through its ``repr``).
        pool: ``avg`` or ``cls``.
        data_key: names the data and split, e.g. ``"fashion-mnist:test"``.
        cache_dir: where cache files live (created if needed).

    Returns:
        features (N, D) float32 and labels (N,), in source order.
    """
    key = hashlib.sha256("\n".join([weights_digest(model), data_key, str(len(source)), repr(view), pool])
                         .encode()).hexdigest()[:16]
    safe_name = "".join(c if c.isalnum() or c in "-_" else "_" for c in data_key)
    path = Path(cache_dir) / f"{safe_name}-{pool}-{key}.safetensors"
    if path.exists():
        cached = load_file(str(path))
        return cached["features"], cached["labels"]
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = eval_loader(source, view, batch_size, num_workers)
    features, labels = extract_features(model, loader, pool, device, desc=f"features {data_key}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"features": features.contiguous(), "labels": labels.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return features, labels


@dataclass
class ProbeData:
    """Features of the three parts of a probe evaluation (each ``(features (N, D), labels (N,))``).

    Attributes:
        train: the label-fraction subset of the train split (after any hold-out).
        val: the held-out part of the train split, or None without ``val_fraction``.
        test: the test split, for the final number only.
        num_classes: classes of the data.
    """

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor] | None
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int


def probe_data(encoder: Encoder, data: str, pool: str, *, root: str | None = None,
               label_fraction: float = 1.0, val_fraction: float = 0.0, seed: int = 0,
               cache_dir: str | Path | None = None,
               batch_size: int = 256, num_workers: int = 0) -> ProbeData:
    """Frozen features of ``data`` for a linear probe or k-NN, through the encoder's evaluation view.

    The whole train and test splits are extracted once (cached in ``cache_dir``, by default the
    encoder run's ``features/``); the label-fraction subset and the hold-out (`make_splits`) index them.

    Args:
        encoder: from `mimkit.eval.encoders.load_encoder`.
        data: a source spec (``fashion-mnist``, a folder, ...).
        pool: ``avg`` or ``cls``.
        root, label_fraction, val_fraction, seed: see `build_source` and `make_splits`.
    """
    spec = encoder.spec.data
    view = eval_view(spec.img_size, spec.mean, spec.std)
    cache_dir = Path(cache_dir) if cache_dir else encoder.run_dir / "features"

    def split_features(split: str):
        source = build_source(data, split, root=root, channels=spec.channels)
        return source, cached_features(encoder.model, source, view, pool, f"{data}:{split}", cache_dir,
                                       batch_size=batch_size, num_workers=num_workers)

    train_source, (x, y) = split_features("train")
    splits = make_splits(train_source, label_fraction, val_fraction, seed)
    _, test = split_features("test")
    val = (x[splits.val], y[splits.val]) if splits.val else None
    return ProbeData(train=(x[splits.train], y[splits.train]), val=val, test=test,
                     num_classes=train_source.info.num_classes)
