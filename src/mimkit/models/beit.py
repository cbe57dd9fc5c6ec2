"""BEiT pretraining: predict the visual tokens of masked patches.

The encoder is a plain timm `Beit` (relative position bias, layer scale, no absolute position
embedding, no classifier head) held as `model.encoder`, so its state dict loads into timm's `Beit`
with `strict=True`. Pretraining adds a learnable mask token that replaces the embeddings of masked
patches before the blocks, and a linear head over the tokenizer's codebook, applied to masked
positions only and trained with cross-entropy.

- BEiT: Bao et al., 2021, arXiv:2106.08254
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch import nn

from mimkit.errors import MimkitError
from mimkit.models.vit import check_patch_grid, encoder_arch


class BEiT(nn.Module):
    """BEiT masked image modeling over a discrete visual vocabulary (BEiT, arXiv:2106.08254).

    Args:
        img_size: square input size in pixels.
        patch_size: square patch size in pixels; must divide `img_size`.
        in_chans: image channels.
        vocab_size: codebook size of the tokenizer whose ids are the targets (8192 for DALL-E's dVAE).
        embed_dim, depth, num_heads, mlp_ratio: the ViT's dimensions.
        layer_scale_init: initial value of the per-channel layer scale (0.1 for ViT-B, 1e-5 for ViT-L
            in the paper).
        shared_rel_pos_bias: one relative position bias table shared by all blocks (the paper's
            pretraining setting) instead of one per block.
        drop_path_rate: stochastic depth at the last block (0.1 in the paper).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        vocab_size: int = 8192,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        layer_scale_init: float = 0.1,
        shared_rel_pos_bias: bool = False,
        drop_path_rate: float = 0.1,
    ):
        super().__init__()
        check_patch_grid(img_size, patch_size)
        # Everything timm needs to rebuild this encoder, e.g. to load an export with strict=True.
        # global_pool="token" keeps the final LayerNorm over all tokens (`norm`, no `fc_norm`), which
        # pretraining uses; `encoder(imgs)` then returns the normalized [CLS] token.
        self.encoder_kwargs = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
            init_values=layer_scale_init, use_abs_pos_emb=False, use_rel_pos_bias=not shared_rel_pos_bias,
            use_shared_rel_pos_bias=shared_rel_pos_bias, global_pool="token", drop_path_rate=drop_path_rate,
        )
        self.encoder = Beit(**self.encoder_kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.lm_head = nn.Linear(embed_dim, vocab_size)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)

    def forward_features(
        self, imgs: torch.Tensor, bool_masked_pos: torch.Tensor, layers: Sequence[int] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encodes all patches, masked ones replaced by the mask token.

        Args:
            imgs: (B, C, H, W) normalized images.
            bool_masked_pos: bool (B, L) or (B, h, w), True where a patch is masked.
            layers: 1-based block numbers whose outputs to return as well (BEiT v2's aggregation head
                reads the output of block 9 of 12).

        Returns:
            x: (B, 1 + L, D) final-norm tokens, [CLS] first.
            hidden: the (B, 1 + L, D) un-normalized outputs of the blocks in `layers`, in block order.
        """
        enc = self.encoder
        if any(not 1 <= i <= len(enc.blocks) for i in layers):
            raise MimkitError(f"layers {tuple(layers)} must be block numbers in 1..{len(enc.blocks)}")
        x = enc.patch_embed(imgs)  # [B, L, D]
        x = torch.where(bool_masked_pos.flatten(1)[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat([enc.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1 + L, D]
        x = enc.pos_drop(x)
        shared_bias = enc.rel_pos_bias() if enc.rel_pos_bias is not None else None  # timm's layout
        hidden = []
        for i, block in enumerate(enc.blocks, start=1):
            x = block(x, shared_rel_pos_bias=shared_bias)
            if i in layers:
                hidden.append(x)
        return enc.norm(x), hidden

    def forward_head(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Codebook logits at the masked positions.

        Args:
            x: (B, 1 + L, D) tokens from `forward_features`.
            bool_masked_pos: bool (B, L) or (B, h, w).

        Returns:
            logits: (N, vocab_size), N = number of masked patches in the batch, row-major per image.
        """
        return self.lm_head(x[:, 1:][bool_masked_pos.flatten(1)])

    def forward_loss(
        self, logits: torch.Tensor, target_ids: torch.Tensor, bool_masked_pos: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy against the tokenizer's ids at masked positions, and the accuracy.

        Args:
            logits: (N, vocab_size) from `forward_head`.
            target_ids: long (B, L) or (B, h, w), the tokenizer's ids for every patch.
            bool_masked_pos: bool (B, L) or (B, h, w).

        Returns:
            loss: scalar mean cross-entropy over masked patches.
            metrics: {"mim_acc": top-1 accuracy over masked patches (detached)}.
        """
        targets = target_ids.flatten(1)[bool_masked_pos.flatten(1)]  # [N]
        loss = F.cross_entropy(logits, targets)
        acc = (logits.detach().argmax(-1) == targets).float().mean()
        return loss, {"mim_acc": acc}

    def forward(
        self, imgs: torch.Tensor, bool_masked_pos: torch.Tensor, target_ids: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One pretraining step's loss.

        Args:
            imgs: (B, C, H, W) normalized images.
            bool_masked_pos: bool (B, L) or (B, h, w), True where masked.
            target_ids: long (B, L) or (B, h, w), the tokenizer's ids (e.g. `DVAE.tokenize`).

        Returns:
            loss, metrics: as `forward_loss`.
        """
        x, _ = self.forward_features(imgs, bool_masked_pos)
        return self.forward_loss(self.forward_head(x, bool_masked_pos), target_ids, bool_masked_pos)


def _beit(arch: str, layer_scale_init: float, **kwargs) -> BEiT:
    dims = encoder_arch(arch)
    return BEiT(**{**dims, "layer_scale_init": layer_scale_init, **kwargs})


def beit_vit_mini(**kwargs) -> BEiT:
    """BEiT on ViT-Mini (128 wide, 6 blocks, 4 heads)."""
    return _beit("vit_mini", 0.1, **kwargs)


def beit_vit_tiny(**kwargs) -> BEiT:
    """BEiT on ViT-Tiny (192 wide, 12 blocks, 3 heads)."""
    return _beit("vit_tiny", 0.1, **kwargs)


def beit_vit_small(**kwargs) -> BEiT:
    """BEiT on ViT-Small (384 wide, 12 blocks, 6 heads)."""
    return _beit("vit_small", 0.1, **kwargs)


def beit_vit_base(**kwargs) -> BEiT:
    """BEiT on ViT-Base (768 wide, 12 blocks, 12 heads); layer scale 0.1 as in the paper."""
    return _beit("vit_base", 0.1, **kwargs)


def beit_vit_large(**kwargs) -> BEiT:
    """BEiT on ViT-Large (1024 wide, 24 blocks, 16 heads); layer scale 1e-5 as in the paper."""
    return _beit("vit_large", 1e-5, **kwargs)


BEIT_MODELS = {
    "vit_mini": beit_vit_mini,
    "vit_tiny": beit_vit_tiny,
    "vit_small": beit_vit_small,
    "vit_base": beit_vit_base,
    "vit_large": beit_vit_large,
}


def create_beit(name: str, **kwargs) -> BEiT:
    """A BEiT model by encoder name, e.g. `create_beit("vit_tiny", img_size=28, patch_size=4, in_chans=1)`.

    Args:
        name: a key of `BEIT_MODELS`.
        **kwargs: `BEiT` arguments; they override the arch's, so `depth=2` gives a 2-block model.
    """
    if name not in BEIT_MODELS:
        raise MimkitError(f"unknown BEiT model {name!r}; choose one of: {', '.join(BEIT_MODELS)}")
    return BEIT_MODELS[name](**kwargs)
