"""Semantic segmentation on a ViT: multi-level features, a feature pyramid and UperNet, or a linear head.

The papers' protocol (BEiT appendix, MAE section 5, BEiT v2 section 4): the outputs of 4 evenly spaced
blocks (3, 5, 7 and 11 of 12, 0-based) become a 4-level pyramid at strides 4, 8, 16 and 32 (two 2x2
stride-2 transposed convolutions with BatchNorm + GELU between them; one; identity; a 2x2 max pool),
read by UperNet (pyramid pooling at scales 1, 2, 3, 6 on the coarsest level, FPN lateral and output
convolutions, fusion, dropout 0.1, a 1x1 classifier) and by an auxiliary FCN head on the third level.
The linear protocol reads the last block's patch tokens through BatchNorm and a 1x1 convolution.

Module names, norms and layout are those of transformers' `BeitForSemanticSegmentation` (``fpn``,
``decode_head``, ``auxiliary_head``), so a BEiT model exports to it with strict keys
(`mimkit.interop.beit.HF_BEIT_SEGMENTATION`).

- UperNet: Xiao et al., 2018, arXiv:1807.10221
- BEiT: Bao et al., 2021, arXiv:2106.08254; MAE: He et al., 2021, arXiv:2111.06377
- BEiT v2: Peng et al., 2022, arXiv:2208.06366
"""

import copy
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models.beit import Beit
from torch import nn

from mimkit.errors import MimkitError
from mimkit.models.classifier import check_encoder, set_drop_path
from mimkit.models.posembed import resize_abs_pos_embed, resize_rel_pos_table
from mimkit.models.vit import check_patch_grid

HEADS = ("upernet", "linear")
PAPER_BLOCKS = (3, 5, 7, 11)  # of 12, 0-based: the papers' out_indices
POOL_SCALES = (1, 2, 3, 6)


def feature_blocks(depth: int) -> list[int]:
    """The 0-based blocks whose outputs feed the pyramid: 3, 5, 7, 11 of 12, scaled to ``depth`` blocks
    (7, 11, 15, 23 of 24; 1, 2, 3, 5 of 6; 0, 0, 0, 1 of 2)."""
    return [max(0, int((b + 1) * depth / 12 + 0.5) - 1) for b in PAPER_BLOCKS]


def resize_encoder(encoder: nn.Module, img_size: int) -> None:
    """Set a timm ViT/Beit encoder's input size in place, its position tables resized to the new grid.

    Absolute tables: MAE's sin-cos recomputed, learned ones bicubic; BEiT's relative bias tables: BEiT's
    own geometric resize (`mimkit.models.posembed`).
    """
    grid = check_patch_grid(img_size, encoder.patch_embed.patch_size[0])
    if encoder.patch_embed.grid_size[0] == grid:
        return
    old = {k: v.detach().clone() for k, v in encoder.state_dict().items()
           if k.endswith(("pos_embed", "relative_position_bias_table"))}
    with warnings.catch_warnings():  # timm resamples the tables its own way (and warns); replaced below
        warnings.simplefilter("ignore")
        encoder.set_input_size(img_size=(img_size, img_size))
    with torch.no_grad():
        for key, value in old.items():
            if key.endswith("pos_embed"):
                value = resize_abs_pos_embed(value, grid, encoder.num_prefix_tokens)[0]
            else:
                value = resize_rel_pos_table(value, grid)
            encoder.get_parameter(key).copy_(value)


_HEAD = ("norm.", "fc_norm.", "head.")  # what segmentation drops: taken from the new encoder as it is


def _beit_of(encoder: nn.Module, layer_scale: float | None) -> Beit:
    """A timm `Beit` of ``encoder``'s shape (a timm `Beit` or `VisionTransformer`) with a relative position
    bias table in every block (zero), no head; ``layer_scale`` its blocks' initial layer scale (None:
    none)."""
    block, embed = encoder.blocks[0], encoder.patch_embed
    qkv_bias = (block.attn.q_bias if isinstance(encoder, Beit) else block.attn.qkv.bias) is not None
    beit = Beit(img_size=embed.img_size, patch_size=embed.patch_size, in_chans=embed.proj.in_channels,
                num_classes=0, global_pool="token", embed_dim=encoder.embed_dim, depth=len(encoder.blocks),
                num_heads=block.attn.num_heads, qkv_bias=qkv_bias,
                mlp_ratio=block.mlp.fc1.out_features / encoder.embed_dim, init_values=layer_scale,
                use_abs_pos_emb=encoder.pos_embed is not None, use_rel_pos_bias=True)
    for each in beit.blocks:
        nn.init.zeros_(each.attn.relative_position_bias_table)
    return beit


def per_block_relative_positions(encoder: Beit) -> Beit:
    """A BEiT encoder whose shared relative position bias table is copied into every block, each then
    trained on its own at its block's lr, as the released BEiT and BEiT v2 segmentation code loads a
    pretrained checkpoint (a table per block; the pretraining's one shared table)."""
    scaled = getattr(encoder.blocks[0], "gamma_1", None) is not None
    beit = _beit_of(encoder, layer_scale=1.0 if scaled else None)
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith(("rel_pos_bias.", *_HEAD))}
    shared = encoder.rel_pos_bias.relative_position_bias_table.detach()
    state |= {f"blocks.{i}.attn.relative_position_bias_table": shared for i in range(len(encoder.blocks))}
    state |= {k: v for k, v in beit.state_dict().items() if k.endswith("relative_position_index")
              or k.startswith(_HEAD)}
    beit.load_state_dict(state)
    return beit


def vit_with_relative_positions(encoder: nn.Module) -> Beit:
    """A ViT encoder as a timm `Beit` that computes the same function and has a zero-initialised relative
    position bias in every block and a layer scale of 1, as mmsegmentation's MAE segmentation backbone
    (``use_rel_pos_bias``, ``init_values=1.0``). The key bias of the attention is dropped: adding one vector
    to every key shifts each query's scores by a constant, which the softmax ignores."""
    if getattr(encoder, "num_reg_tokens", 0) or getattr(encoder, "cls_token", None) is None:
        raise MimkitError("seg.rel_pos_bias takes a ViT with a class token and no register tokens")
    beit = _beit_of(encoder, layer_scale=1.0)
    dim = encoder.embed_dim
    state = {k: v for k, v in encoder.state_dict().items()
             if not k.startswith((*_HEAD, "norm_pre.")) and ".attn.qkv.bias" not in k
             and ".ls1." not in k and ".ls2." not in k}
    for i, block in enumerate(encoder.blocks):
        if block.attn.qkv.bias is not None:
            state |= {f"blocks.{i}.attn.q_bias": block.attn.qkv.bias[:dim],
                      f"blocks.{i}.attn.v_bias": block.attn.qkv.bias[2 * dim:]}
        for mine, theirs in (("ls1", "gamma_1"), ("ls2", "gamma_2")):
            scale = getattr(getattr(block, mine, None), "gamma", None)
            state[f"blocks.{i}.{theirs}"] = scale if scale is not None else torch.ones(dim)
    state |= {k: v for k, v in beit.state_dict().items()
              if k.endswith(("relative_position_bias_table", "relative_position_index", "k_bias"))
              or k.startswith(_HEAD)}
    beit.load_state_dict(state)
    return beit


def segmentation_encoder(encoder: nn.Module, img_size: int, drop_path: float = 0.0,
                         rel_pos_bias: bool = False) -> nn.Module:
    """A trainable copy of ``encoder`` for segmentation at ``img_size``: no head and no final norm (the
    pyramid reads raw block outputs), stochastic depth rising to ``drop_path``. A BEiT encoder's shared
    relative position table becomes one per block (`per_block_relative_positions`); with ``rel_pos_bias``
    a ViT gains zero-initialised ones (`vit_with_relative_positions`)."""
    check_encoder(encoder)
    if isinstance(encoder, Beit) and encoder.rel_pos_bias is not None:
        encoder = per_block_relative_positions(encoder)
    elif rel_pos_bias and not isinstance(encoder, Beit):
        encoder = vit_with_relative_positions(encoder)
    encoder = copy.deepcopy(encoder).requires_grad_(True)
    encoder.reset_classifier(0)
    encoder.norm, encoder.fc_norm = nn.Identity(), nn.Identity()
    set_drop_path(encoder, drop_path)
    resize_encoder(encoder, img_size)
    return encoder


class ConvNormAct(nn.Module):
    """Convolution (no bias) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__()
        self.convolution = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                                     bias=False)
        self.normalization = nn.BatchNorm2d(out_channels)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.normalization(self.convolution(x)))


class Upsample4(nn.Module):
    """x4: transposed convolution 2x2 s2 -> BatchNorm -> GELU -> transposed convolution 2x2 s2."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_transpose1 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.normalization = nn.BatchNorm2d(dim)
        self.activation = nn.GELU()
        self.conv_transpose2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_transpose2(self.activation(self.normalization(self.conv_transpose1(x))))


class FeaturePyramid(nn.Module):
    """Four maps of the patch grid (B, D, h, w) -> (B, D, 4h, 4w), (2h, 2w), (h, w), (h/2, w/2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fpn1 = Upsample4(dim)
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, stride=2)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [level(x) for level, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps, strict=True)]


class PoolingBranch(nn.Module):
    """Average-pool to ``scale`` x ``scale``, 1x1 ConvNormAct, bilinear back to the input's size."""

    def __init__(self, scale: int, in_channels: int, channels: int):
        super().__init__()
        self.pooling = nn.AdaptiveAvgPool2d(scale)
        self.conv = ConvNormAct(in_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.conv(self.pooling(x))
        return F.interpolate(pooled, size=x.shape[2:], mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: one `PoolingBranch` per scale."""

    def __init__(self, scales: Sequence[int], in_channels: int, channels: int):
        super().__init__()
        self.blocks = nn.ModuleList(PoolingBranch(s, in_channels, channels) for s in scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [block(x) for block in self.blocks]


class UperHead(nn.Module):
    """UperNet over 4 pyramid levels (finest first) -> logits (B, num_classes, H/4, W/4) at the finest level.

    Args:
        in_channels: width of every level.
        channels: width inside the head (the papers: 768 for ViT-B, the encoder's width).
        num_classes: classes to predict.
        pool_scales: pyramid pooling scales on the coarsest level.
        dropout: 2-D dropout before the classifier (0.1 in the papers).
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int,
                 pool_scales: Sequence[int] = POOL_SCALES, dropout: float = 0.1):
        super().__init__()
        self.psp_modules = PyramidPooling(pool_scales, in_channels, channels)
        self.psp_bottleneck = ConvNormAct(in_channels + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvNormAct(in_channels, channels) for _ in range(3))
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in range(3))
        self.fpn_bottleneck = ConvNormAct(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        coarsest = levels[-1]
        top = self.psp_bottleneck(torch.cat([coarsest, *self.psp_modules(coarsest)], dim=1))
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, levels, strict=False)] + [top]
        for i in range(3, 0, -1):  # top-down: each level adds the upsampled coarser one
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="bilinear", align_corners=False)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=False)] + [laterals[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                            for x in outs[1:]]
        return self.classifier(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """The auxiliary head: a 3x3 ConvNormAct on one pyramid level, dropout, a 1x1 classifier.

    Args:
        in_channels: width of the level.
        channels: width of the convolution (256 in the papers).
        num_classes: classes to predict.
        level: which pyramid level it reads (2: the patch grid, the papers' third level).
        dropout: 2-D dropout before the classifier.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, level: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        self.level = level
        self.convs = nn.ModuleList([ConvNormAct(in_channels, channels, 3)])
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        x = levels[self.level]
        for conv in self.convs:
            x = conv(x)
        return self.classifier(self.dropout(x))


class LinearHead(nn.Module):
    """BatchNorm + 1x1 convolution on the last feature map: (B, D, h, w) -> (B, num_classes, h, w)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.normalization = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.normalization(levels[-1]))


class Segmenter(nn.Module):
    """A ViT encoder with a segmentation head: images (B, C, H, W) -> per-pixel logits.

    Args:
        encoder: a timm `VisionTransformer` or `Beit` prepared by `segmentation_encoder` (its input size is
            the training crop).
        num_classes: classes to predict.
        head: ``upernet`` (simple feature pyramid + UperNet + auxiliary FCN) or ``linear`` (BatchNorm + 1x1
            convolution on the last block).
        blocks: 0-based blocks read for ``upernet`` (default `feature_blocks`); ``linear`` reads the last.
        channels: UperNet's width (default: the encoder's).
        aux_channels: the auxiliary head's width.
        freeze_encoder: keep the encoder's weights fixed (and in eval mode): the linear protocol on frozen
            features.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, head: str = "upernet",
                 blocks: Sequence[int] | None = None, channels: int | None = None, aux_channels: int = 256,
                 freeze_encoder: bool = False):
        super().__init__()
        if head not in HEADS:
            raise MimkitError(f"segmentation head {head!r} is not one of {', '.join(HEADS)}")
        if num_classes < 2:
            raise MimkitError(f"segmentation needs at least 2 classes, got {num_classes}")
        depth, dim = len(encoder.blocks), encoder.embed_dim
        self.encoder = encoder.requires_grad_(not freeze_encoder)
        self.freeze_encoder = freeze_encoder
        if head == "linear":
            self.blocks = [depth - 1]
            self.fpn, self.auxiliary_head = nn.Identity(), None
            self.decode_head = LinearHead(dim, num_classes)
        else:
            self.blocks = list(blocks) if blocks is not None else feature_blocks(depth)
            if len(self.blocks) != 4 or not all(0 <= b < depth for b in self.blocks):
                raise MimkitError(f"UperNet reads 4 blocks in 0..{depth - 1}, got {self.blocks}")
            self.fpn = FeaturePyramid(dim)
            self.decode_head = UperHead(dim, channels or dim, num_classes)
            self.auxiliary_head = FCNHead(dim, aux_channels, num_classes)
        for block in self.encoder.blocks[max(self.blocks) + 1:]:  # they shape no output: no gradient (DDP)
            block.requires_grad_(False)

    def train(self, mode: bool = True) -> "Segmenter":
        super().train(mode)
        if self.freeze_encoder:  # frozen features stay deterministic: no dropout, no drop path
            self.encoder.eval()
        return self

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The chosen blocks' patch tokens as maps: images (B, C, H, W) -> list of (B, D, H/p, W/p)."""
        unique = sorted(set(self.blocks))
        maps = self.encoder.forward_intermediates(images, indices=unique, stop_early=True,
                                                  intermediates_only=True)
        return [maps[unique.index(b)] for b in self.blocks]

    def forward_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each head's logits at its own size: [decode (B, K, h, w), auxiliary (B, K, h', w') if any]."""
        levels = self.fpn(self.forward_features(images))
        heads = [self.decode_head] + ([self.auxiliary_head] if self.auxiliary_head is not None else [])
        return [head(levels) for head in heads]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> logits (B, num_classes, H, W) of the decode head, bilinearly upsampled."""
        logits = self.forward_logits(images)[0]
        return F.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=False)
