"""Parameter groups and the optimizer.

Weight decay skips biases, norms, position embeddings and special tokens (every 1-D tensor, and the
names in ``no_weight_decay()`` that timm models declare). Layer-wise lr decay scales each transformer
block's lr by ``decay ** (num_layers - layer_id)`` (BEiT, MAE fine-tuning).
"""

import re

import torch
from torch import nn

_BLOCK_ID = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBEDDING_NAMES = ("cls_token", "mask_token", "pos_embed", "patch_embed", "rel_pos_bias", "reg_token")


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that get no weight decay."""
    declared = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            declared |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return {name for name, p in model.named_parameters()
            if p.ndim <= 1 or name in declared or name.endswith(("pos_embed", "cls_token", "mask_token"))}


def layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter: 0 for embeddings, i+1 for block i, ``num_layers + 1`` for everything after.

    Args:
        name: parameter name, e.g. ``encoder.blocks.3.attn.qkv.weight``.
        num_layers: number of transformer blocks.
    """
    block = _BLOCK_ID.search(name)
    if block:
        return int(block.group(1)) + 1
    if any(part in name for part in _EMBEDDING_NAMES):
        return 0
    return num_layers + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 num_layers: int = 0) -> list[dict]:
    """AdamW parameter groups with weight-decay exclusions and optional layer-wise lr decay.

    Each group carries ``lr_scale``; the training loop multiplies the scheduled lr by it.

    Args:
        model: the module being trained; frozen parameters are left out.
        weight_decay: decay for matrices.
        layer_decay: per-layer lr factor (1.0 = off). Block ``i`` gets ``layer_decay ** (num_layers - i)``.
        num_layers: number of transformer blocks (needed when ``layer_decay != 1``).
    """
    skip = no_decay_names(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = layer_id(name, num_layers) if layer_decay != 1.0 else num_layers + 1
        decay = name not in skip
        group = groups.setdefault((depth, decay), {
            "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_layers + 1 - depth)})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def build_adamw(groups: list[dict], betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over prepared groups; the lr is set every step by the loop."""
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} | {"lr": 0.0} for g in groups],
                             betas=betas)
