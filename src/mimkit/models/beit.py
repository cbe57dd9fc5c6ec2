"""BEiT pretraining: predict the visual tokens of masked patches.

The encoder is a plain timm `Beit` (relative position bias, layer scale, no absolute position
embedding, no classifier head) held as `model.encoder`, so its state dict loads into timm's `Beit`
with `strict=True`. Pretraining adds a learnable mask token that replaces the embeddings of masked
patches before the blocks, and a linear head over the tokenizer's codebook, applied to masked
positions only and trained with cross-entropy.

`BEiTv2` adds BEiT v2's [CLS] aggregation head: the final [CLS] token over the patch tokens of an
earlier block, two more blocks, and the same norm and codebook head, trained with a second
cross-entropy; it lives outside `model.encoder`, so exports and fine-tuning never see it.

- BEiT: Bao et al., 2021, arXiv:2106.08254
- BEiT v2: Peng et al., 2022, arXiv:2208.06366
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import calculate_drop_path_rates, trunc_normal_
from timm.models.beit import Beit, Block
from torch import nn

from mimkit.errors import MimkitError
from mimkit.models.vit import check_patch_grid, embed_with_mask_token, encoder_arch, run_blocks


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

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (timm's switch,
        `Beit.set_grad_checkpointing`; BEiT v2's aggregation blocks follow it)."""
        self.encoder.set_grad_checkpointing(enable)

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
        x = enc.pos_drop(embed_with_mask_token(enc, imgs, bool_masked_pos, self.mask_token))  # [B, 1 + L, D]
        shared_bias = enc.rel_pos_bias() if enc.rel_pos_bias is not None else None  # timm's layout
        hidden = []
        for i, block in enumerate(enc.blocks, start=1):
            x = run_blocks([block], x, enc.grad_checkpointing, shared_rel_pos_bias=shared_bias)
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


def default_agg_layer(depth: int) -> int:
    """The block whose patch tokens BEiT v2's aggregation head reads: 9 of 12 and 21 of 24 as in the
    paper, i.e. the last quarter of the blocks (at most 3, at least 1) is skipped; 1 of 2, 5 of 6."""
    return max(1, depth - min(3, max(1, depth // 4)))


class BEiTv2(BEiT):
    """BEiT with BEiT v2's [CLS] patch-aggregation head (BEiT v2, arXiv:2208.06366).

    The final block's [CLS] token is put in front of the patch tokens of block `agg_layer`, and
    `agg_depth` more blocks run over them; the encoder's final norm and `lm_head` (the same modules,
    shared) then predict the masked tokens again. The [CLS] token alone carries the information the
    deep blocks add, so pretraining teaches it to summarise the image. The extra cross-entropy is added
    to the MIM loss. The head's blocks (`agg_blocks`) are not part of `encoder`.

    Args:
        agg_layer: 1-based block whose patch tokens the head reads; `default_agg_layer(depth)` when None.
        agg_depth: blocks of the head (2 in the paper).
        shared_lm_head: the head ends in the encoder's norm and `lm_head` (the paper's setting); False
            gives it its own LayerNorm and codebook layer (`agg_norm`, `agg_head`), the reference code's
            ``--shared_lm_head False``.
        *args, **kwargs: `BEiT`'s.
    """

    def __init__(self, *args, agg_layer: int | None = None, agg_depth: int = 2, shared_lm_head: bool = True,
                 **kwargs):
        super().__init__(*args, **kwargs)
        kw = self.encoder_kwargs
        depth = kw["depth"]
        self.shared_lm_head = shared_lm_head
        if not shared_lm_head:
            self.agg_norm = nn.LayerNorm(kw["embed_dim"], eps=1e-6)
            self.agg_head = nn.Linear(kw["embed_dim"], self.lm_head.out_features)
            trunc_normal_(self.agg_head.weight, std=0.02)
            nn.init.zeros_(self.agg_head.bias)
        self.agg_layer = default_agg_layer(depth) if agg_layer is None else agg_layer
        if not 1 <= self.agg_layer <= depth:
            raise MimkitError(f"agg_layer {self.agg_layer} must be a block number in 1..{depth}")
        # As in the reference code, the head's blocks continue the encoder's after block agg_layer: their
        # stochastic depth and their init rescaling are those of blocks agg_layer + 1, agg_layer + 2, ...
        dpr = calculate_drop_path_rates(kw["drop_path_rate"], depth)
        window = self.encoder.patch_embed.grid_size if kw["use_rel_pos_bias"] else None
        self.agg_blocks = nn.ModuleList([
            Block(kw["embed_dim"], kw["num_heads"], qkv_bias=True, mlp_ratio=kw["mlp_ratio"],
                  drop_path=dpr[min(self.agg_layer + i, depth - 1)], init_values=kw["init_values"],
                  window_size=window)
            for i in range(agg_depth)
        ])
        for module in self.agg_blocks.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        with torch.no_grad():
            for i, block in enumerate(self.agg_blocks):
                scale = math.sqrt(2.0 * (self.agg_layer + i + 1))
                block.attn.proj.weight.div_(scale)
                block.mlp.fc2.weight.div_(scale)

    def forward_aggregation(self, last: torch.Tensor, early: torch.Tensor,
                            bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Codebook logits of the aggregation head at the masked positions.

        Args:
            last: (B, 1 + L, D) un-normalized output of the final block (its [CLS] is used).
            early: (B, 1 + L, D) un-normalized output of block `agg_layer` (its patch tokens are used).
            bool_masked_pos: bool (B, L) or (B, h, w).

        Returns:
            logits: (N, vocab_size) from the encoder's norm and `lm_head` (or the head's own, unshared).
        """
        enc = self.encoder
        x = torch.cat([last[:, :1], early[:, 1:]], dim=1)  # [B, 1 + L, D]
        shared_bias = enc.rel_pos_bias() if enc.rel_pos_bias is not None else None
        x = run_blocks(self.agg_blocks, x, enc.grad_checkpointing, shared_rel_pos_bias=shared_bias)
        norm, head = (enc.norm, self.lm_head) if self.shared_lm_head else (self.agg_norm, self.agg_head)
        return head(norm(x)[:, 1:][bool_masked_pos.flatten(1)])

    def forward(
        self, imgs: torch.Tensor, bool_masked_pos: torch.Tensor, target_ids: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One pretraining step's loss: MIM cross-entropy plus the aggregation head's.

        Args:
            imgs: (B, C, H, W) normalized images.
            bool_masked_pos: bool (B, L) or (B, h, w), True where masked.
            target_ids: long (B, L) or (B, h, w), the tokenizer's ids (e.g. `VQKD.tokenize`).

        Returns:
            loss: scalar, the sum of both cross-entropies.
            metrics: "mim_loss", "agg_loss" and their accuracies "mim_acc", "agg_acc" (detached).
        """
        depth = self.encoder_kwargs["depth"]
        x, hidden = self.forward_features(imgs, bool_masked_pos, layers=sorted({self.agg_layer, depth}))
        mim_logits = self.forward_head(x, bool_masked_pos)
        mim_loss, metrics = self.forward_loss(mim_logits, target_ids, bool_masked_pos)
        agg_logits = self.forward_aggregation(hidden[-1], hidden[0], bool_masked_pos)
        agg_loss, agg_metrics = self.forward_loss(agg_logits, target_ids, bool_masked_pos)
        return mim_loss + agg_loss, {"mim_loss": mim_loss.detach(), "agg_loss": agg_loss.detach(), **metrics,
                                     "agg_acc": agg_metrics["mim_acc"]}


def _beit(arch: str, default_layer_scale: float, cls: type[BEiT] = BEiT, **kwargs) -> BEiT:
    """The arch's dimensions and layer scale, overridden by ``kwargs`` (e.g. ``layer_scale_init``)."""
    dims = encoder_arch(arch)
    return cls(**{**dims, "layer_scale_init": default_layer_scale, **kwargs})


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


def create_beitv2(name: str, **kwargs) -> BEiTv2:
    """A BEiT v2 model by encoder name: `create_beit`'s arch with the aggregation head.

    Args:
        name: a key of `BEIT_MODELS`.
        **kwargs: `BEiTv2` arguments, e.g. `agg_layer=5, depth=6`.
    """
    return create_beit(name, cls=BEiTv2, **kwargs)
