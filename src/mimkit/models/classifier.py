"""A ViT classifier made from a pretrained encoder, and the pooled features every protocol reads.

The classifier is the encoder's own timm class (`VisionTransformer`, `Beit`) with a linear head, so a
fine-tuned model loads anywhere timm does. Two poolings, as in the papers:

- ``avg``: the mean of the patch tokens, then a LayerNorm (MAE fine-tuning; BEiT too). The encoder's
  final norm moves after the pooling (``norm`` -> ``fc_norm``) and keeps its pretrained weights.
- ``cls``: the normalized [CLS] token (ViT; the MAE linear-probe default).

- MAE fine-tuning recipe: He et al., 2021, arXiv:2111.06377, appendix A.2
- BEiT fine-tuning recipe: Bao et al., 2021, arXiv:2106.08254, appendix
"""

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.utils import ModelEmaV3
from torch import nn

from mimkit.errors import MimkitError

POOLS = ("avg", "cls")


def check_encoder(model: nn.Module) -> None:
    """Raise `MimkitError` unless ``model`` is a timm ViT-style encoder the protocols can read."""
    needed = ("blocks", "norm", "fc_norm", "num_prefix_tokens", "forward_features", "reset_classifier")
    if missing := [name for name in needed if not hasattr(model, name)]:
        raise MimkitError(f"{type(model).__name__} is not a timm ViT-style encoder (it lacks "
                          f"{', '.join(missing)}); evaluation takes timm VisionTransformer or Beit encoders")


def _check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise MimkitError(f"pool {pool!r} is not one of {', '.join(POOLS)}")


def place_norm(model: nn.Module, pool: str) -> None:
    """Put the final LayerNorm where ``pool`` wants it: after the pooling for ``avg``, before it for ``cls``.

    The module (and its weights) moves between ``model.norm`` and ``model.fc_norm``; the other becomes
    `nn.Identity`. A no-op when it is already in place.
    """
    _check_pool(pool)
    if pool == "avg" and isinstance(model.fc_norm, nn.Identity):
        model.norm, model.fc_norm = nn.Identity(), model.norm
    elif pool == "cls" and isinstance(model.norm, nn.Identity):
        model.norm, model.fc_norm = model.fc_norm, nn.Identity()


def pooled_features(model: nn.Module, images: torch.Tensor, pool: str) -> torch.Tensor:
    """The representation a probe reads: images (B, C, H, W) -> (B, D).

    ``avg`` averages the patch tokens, ``cls`` takes the [CLS] token; the model's final norm applies
    wherever it sits (`place_norm`), so a pretrained encoder and a fine-tuned classifier both give
    normalized features.
    """
    _check_pool(pool)
    tokens = model.forward_features(images)  # [B, N, D]
    return model.fc_norm(_pool(tokens, pool, model.num_prefix_tokens))


def _pool(tokens: torch.Tensor, pool: str, num_prefix_tokens: int) -> torch.Tensor:
    """(B, N, D) tokens -> (B, D): the mean of the patch tokens (``avg``) or the [CLS] token (``cls``)."""
    return tokens[:, num_prefix_tokens:].mean(dim=1) if pool == "avg" else tokens[:, 0]


def block_features(model: nn.Module, images: torch.Tensor, pool: str, layers: Sequence[int]) -> torch.Tensor:
    """The representation a probe reads at each of some blocks, in one forward pass: images (B, C, H, W)
    -> (B, K, D) for K ``layers``.

    Block ``len(model.blocks)`` gives `pooled_features` (the encoder's final norm). An earlier block's
    tokens are pooled the same way and normalized by a LayerNorm without parameters: the final norm's
    scale and shift are fit to the last block's statistics, not to the earlier blocks'.

    Args:
        model: a timm ViT-style encoder (`check_encoder`).
        images: (B, C, H, W).
        pool: ``avg`` or ``cls``.
        layers: 1-based block numbers, increasing.
    """
    _check_pool(pool)
    depth = len(model.blocks)
    if list(layers) != sorted(set(layers)) or not all(1 <= i <= depth for i in layers):
        raise MimkitError(f"layers {list(layers)} must be increasing block numbers in 1..{depth}")
    outputs = model.forward_intermediates(images, indices=[i - 1 for i in layers], norm=False,
                                          return_prefix_tokens=True, stop_early=True, output_fmt="NLC",
                                          intermediates_only=True)
    features = []
    for layer, (patches, prefix) in zip(layers, outputs, strict=True):
        if layer == depth:
            tokens = model.norm(torch.cat([prefix, patches], dim=1))
            features.append(model.fc_norm(_pool(tokens, pool, model.num_prefix_tokens)))
        else:
            pooled = patches.mean(dim=1) if pool == "avg" else prefix[:, 0]
            features.append(F.layer_norm(pooled, pooled.shape[-1:], eps=1e-6))
    return torch.stack(features, dim=1)  # [B, K, D]


def set_drop_path(model: nn.Module, drop_path: float) -> None:
    """Stochastic depth in place: block i of n drops its residual branches at ``drop_path * i / (n - 1)``."""
    rates = torch.linspace(0, drop_path, len(model.blocks)).tolist()
    for block, rate in zip(model.blocks, rates, strict=True):
        block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()


def build_classifier(encoder: nn.Module, num_classes: int, pool: str = "avg",
                     drop_path: float = 0.0) -> nn.Module:
    """A copy of ``encoder`` with a classification head, ready to fine-tune.

    Every encoder weight is kept (the final norm may move to ``fc_norm``, see `place_norm`) and every
    parameter is trainable (MAE's fixed sin-cos position table included, as in MAE's fine-tuning). The
    head is initialized with std 2e-5, as in MAE.

    Args:
        encoder: a timm `VisionTransformer` or `Beit`, with or without a head.
        num_classes: outputs of the new head.
        pool: ``avg`` or ``cls``.
        drop_path: stochastic depth rate of the last block; block i of n gets ``drop_path * i / (n - 1)``.

    Returns:
        The classifier: images (B, C, H, W) -> logits (B, num_classes).
    """
    check_encoder(encoder)
    if num_classes < 1:
        raise MimkitError(f"a classifier needs at least one class, got {num_classes}")
    model = copy.deepcopy(encoder).requires_grad_(True)
    set_drop_path(model, drop_path)
    place_norm(model, pool)
    model.reset_classifier(num_classes, "avg" if pool == "avg" else "token")
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return model


class FineTuned(nn.Module):
    """What a fine-tuning run trains and checkpoints: the classifier and, optionally, an EMA of it.

    Args:
        classifier: from `build_classifier`.
        ema_decay: decay of the weights' exponential moving average; None keeps no EMA (`nn.Identity`).
    """

    def __init__(self, classifier: nn.Module, ema_decay: float | None = None):
        super().__init__()
        self.classifier = classifier
        self.ema = (ModelEmaV3(classifier, decay=ema_decay).requires_grad_(False) if ema_decay
                    else nn.Identity())

    def update_ema(self, step: int) -> None:
        """Move the EMA towards the current weights (called after each optimizer step)."""
        self.ema.update(self.classifier, step)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> logits (B, num_classes)."""
        return self.classifier(images)
