"""CAE: the Context Autoencoder, which predicts the latents of masked patches from the visible ones and
decodes those latents into the masked patches' visual tokens.

Four parts, as in the authors' ``ContextAutoencoderViT`` (``models/modeling_cae.py``):

- the **encoder**, a plain timm `Beit` (``model.encoder``; its state dict loads into timm's `Beit` with
  ``strict=True``): query and value biases, layer scale, and a fixed 2-D sin-cos absolute position table
  (CAE's own layout: the row's half first, `cae_sincos_pos_embed`), no relative position bias. It sees the
  visible patches and [CLS] only.
- the **latent contextual regressor**: blocks of cross-attention whose queries are the masked patches'
  (a shared mask token plus their sin-cos positions) and whose keys and values are the visible latents
  and the queries themselves (without [CLS]); layer scale 0.1, a LayerNorm after the attention branch.
- the **alignment**: the encoder itself, its weights as they are at this step and without gradients, encodes
  the masked patches; the regressor's outputs regress onto those latents (MSE). The authors keep a second
  encoder whose parameters are made the very tensors of the first (``alignment_parameter_update``), so it
  always holds the current weights: one encoder run twice is the same computation.
- the **decoder**: BEiT blocks over the regressed latents (plus their positions) and a linear layer over
  the tokenizer's codebook; cross-entropy against the masked patches' token ids.

The loss is ``CE + align_weight * MSE`` (2 in the paper). With a ``decoder_embed_dim`` other than the
encoder's, a linear layer and a LayerNorm take the encoder's latents (and the alignment targets) to the
regressor's width, as in the authors' code.

**CAE v2** (`CAEv2`, the authors' ``--model_type caev2``) keeps the encoder and the regressor and drops the
rest: no alignment branch, no decoder blocks, no final norm in the regressor. One LayerNorm and one linear
head (``decoder_norm``, ``lm_head``: the authors' ``decoder.norm`` and ``decoder.head``) map every latent, the
encoder's [CLS] and visible ones and the regressor's masked ones, to a frozen teacher's width (CLIP's 512),
and the loss is ``1 - cos`` against the teacher's features of the whole image at those same tokens, [CLS]
included, averaged over all of them: the visible tokens are supervised as well as the masked ones.

- CAE: Chen et al., Context Autoencoder for Self-Supervised Representation Learning, 2022 (IJCV 2023),
  arXiv:2202.03026 (code: github.com/Atten4Vis/CAE)
- CAE v2: Zhang et al., CAE v2: Context Autoencoder with CLIP Latent Alignment, TMLR 2023,
  arXiv:2211.09799 (code: github.com/Atten4Vis/CAE, ``project/CAEv2``)
"""

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm, Mlp, calculate_drop_path_rates, trunc_normal_
from timm.models.beit import Beit, Block
from torch import nn

from mimkit.errors import MimkitError
from mimkit.models.vit import check_patch_grid, encoder_arch, run_blocks, sincos_pos_embed_2d

INIT_STD = 0.02  # the authors' truncated normal, cut at one standard deviation


def cae_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """CAE's fixed 2-D sin-cos position table: MAE's (`sincos_pos_embed_2d`) with its halves swapped, the
    patch's row in the first half and its column in the second (the authors' ``meshgrid`` of (w, h) in
    ``ij`` order), a zero row in front for [CLS].

    Returns:
        float32 (1, 1 + grid_size**2, embed_dim).
    """
    table = sincos_pos_embed_2d(embed_dim, grid_size, cls_token=True)
    half = embed_dim // 2
    return torch.cat([table[..., half:], table[..., :half]], dim=-1)


def _layer_scale(dim: int, init: float) -> nn.Parameter:
    """A per-channel scale starting at ``init``; 0 gives the authors' fixed ones (no layer scale)."""
    return nn.Parameter(torch.full((dim,), init if init > 0 else 1.0), requires_grad=init > 0)


class CrossAttention(nn.Module):
    """Multi-head attention of queries over separate keys and values: three bias-free projections, a bias
    on the queries and the values only (the key bias would shift every score of a query alike)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise MimkitError(f"width {dim} is not divisible by {num_heads} attention heads")
        self.num_heads = num_heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        return x.view(B, N, self.num_heads, D // self.num_heads).transpose(1, 2)  # [B, heads, N, D / heads]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query (B, Nq, D), key and value (B, Nk, D) -> (B, Nq, D)."""
        q = self._heads(F.linear(query, self.q.weight, self.q_bias))
        k = self._heads(self.k(key))
        v = self._heads(F.linear(value, self.v.weight, self.v_bias))
        x = F.scaled_dot_product_attention(q, k, v)  # [B, heads, Nq, D / heads]
        return self.proj(x.transpose(1, 2).flatten(2))


class RegressorBlock(nn.Module):
    """One block of the latent contextual regressor (the authors' ``RegressorBlock``).

    ``x = q + gamma_1 * attn(norm_q(q + pos_q), norm_k(kv + pos_kv), norm_v(kv))``, then a LayerNorm of ``x``
    and ``x + gamma_2 * mlp(x)``: the positions enter the queries and keys, not the values.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, layer_scale_init: float = 0.1,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1_q, self.norm1_k, self.norm1_v = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2_cross = LayerNorm(dim)
        self.mlp_cross = Mlp(dim, round(dim * mlp_ratio))
        self.gamma_1_cross = _layer_scale(dim, layer_scale_init)
        self.gamma_2_cross = _layer_scale(dim, layer_scale_init)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor, pos: torch.Tensor,
                context_pos: torch.Tensor) -> torch.Tensor:
        """x, pos: (B, Nq, D) queries and their positions; context, context_pos: (B, Nk, D)."""
        query, key = self.norm1_q(x + pos), self.norm1_k(context + context_pos)
        attn = self.cross_attn(query, key, self.norm1_v(context))
        x = self.norm2_cross(x + self.drop_path(self.gamma_1_cross * attn))
        return x + self.drop_path(self.gamma_2_cross * self.mlp_cross(x))


class CAE(nn.Module):
    """Context Autoencoder pretraining over a discrete visual vocabulary (CAE, arXiv:2202.03026).

    Args:
        img_size: square input size in pixels.
        patch_size: square patch size; must divide `img_size`.
        in_chans: image channels.
        vocab_size: codebook size of the tokenizer whose ids are the targets (8192 for DALL-E's dVAE).
        embed_dim, depth, num_heads, mlp_ratio: the encoder's dimensions (the MLP ratio is everyone's).
        layer_scale_init: the encoder blocks' initial layer scale (the authors' 0.1); 0: none.
        drop_path_rate: stochastic depth at the last block of each stack (0.1 in the authors' scripts).
        decoder_embed_dim: width of the regressor and decoder; None: the encoder's (the authors' ViT-B).
        decoder_num_heads: their heads; None: the encoder's.
        regressor_depth, decoder_depth: their blocks (4 and 4 for ViT-B).
        decoder_layer_scale_init: their initial layer scale (0.1).
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
        drop_path_rate: float = 0.1,
        decoder_embed_dim: int | None = None,
        decoder_num_heads: int | None = None,
        regressor_depth: int = 4,
        decoder_depth: int = 4,
        decoder_layer_scale_init: float = 0.1,
    ):
        super().__init__()
        grid = check_patch_grid(img_size, patch_size)
        width, heads = decoder_embed_dim or embed_dim, decoder_num_heads or num_heads
        for w, h in ((embed_dim, num_heads), (width, heads)):
            if h < 1 or w % h:
                raise MimkitError(f"width {w} is not divisible by {h} attention heads")
            if w % 4:
                raise MimkitError(f"CAE's sin-cos positions need a width divisible by 4, got {w}")
        if regressor_depth < 1 or decoder_depth < 0:
            raise MimkitError(f"regressor_depth={regressor_depth} must be at least 1 and "
                              f"decoder_depth={decoder_depth} at least 0")
        self.patch_size, self.in_chans = patch_size, in_chans
        # Everything timm needs to rebuild this encoder; global_pool "token" keeps the final norm over every
        # token (`norm`, no `fc_norm`), as pretraining uses it.
        self.encoder_kwargs = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
            init_values=layer_scale_init or None, use_abs_pos_emb=True, use_rel_pos_bias=False,
            use_shared_rel_pos_bias=False, global_pool="token", drop_path_rate=drop_path_rate,
        )
        self.encoder = Beit(**self.encoder_kwargs)
        self.encoder.pos_embed.requires_grad_(False)
        # encoder width -> regressor width (the authors' encoder_to_regresser and its norm), or nothing
        self.to_latent = (nn.Sequential(nn.Linear(embed_dim, width), LayerNorm(width)) if width != embed_dim
                          else nn.Identity())
        self.register_buffer("latent_pos_embed", cae_sincos_pos_embed(width, grid), persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.regressor_blocks = nn.ModuleList(
            RegressorBlock(width, heads, mlp_ratio, decoder_layer_scale_init, rate)
            for rate in calculate_drop_path_rates(drop_path_rate, regressor_depth))
        self.regressor_norm = LayerNorm(width)
        self.decoder_blocks = nn.ModuleList(
            Block(width, heads, qkv_bias=True, mlp_ratio=mlp_ratio, drop_path=rate,
                  init_values=decoder_layer_scale_init or None)
            for rate in calculate_drop_path_rates(drop_path_rate, decoder_depth))
        self.decoder_norm = LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The authors' init as it ends up: every linear layer xavier-uniform with zero bias (their last
        ``apply`` overrides the truncated normals before it), the patch embedding, [CLS] and mask token
        truncated normals (std 0.02, cut at one std) with a zero bias, LayerNorms 1 and 0, the query and
        value biases 0, the layer scales at their initial value; the encoder's fixed sin-cos table."""
        enc = self.encoder
        with torch.no_grad():
            enc.pos_embed.copy_(cae_sincos_pos_embed(enc.embed_dim, enc.patch_embed.grid_size[0]))
        for table in (enc.patch_embed.proj.weight, enc.cls_token, self.mask_token):
            trunc_normal_(table, std=INIT_STD, a=-INIT_STD, b=INIT_STD)
        nn.init.zeros_(enc.patch_embed.proj.bias)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                nn.init.zeros_(p)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (timm's switch on the encoder, which the
        regressor and decoder follow)."""
        self.encoder.set_grad_checkpointing(enable)

    def forward_encoder(self, imgs: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Encodes the patches that ``hidden`` leaves visible, and [CLS].

        Args:
            imgs: (B, C, H, W) normalized images.
            hidden: bool (B, L) or (B, h, w), True where a patch is left out; the same count in every image.

        Returns:
            (B, 1 + L_visible, D) final-norm tokens, [CLS] first, the visible patches row-major.
        """
        enc = self.encoder
        x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]  # [B, L, D]
        B, _, D = x.shape
        x = x[~hidden.flatten(1)].view(B, -1, D)  # [B, L_visible, D]
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(B, -1, -1)
        x = enc.pos_drop(torch.cat([cls, x], dim=1))
        return enc.norm(run_blocks(enc.blocks, x, enc.grad_checkpointing))

    def forward_target(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The alignment targets: the masked patches encoded by the encoder's current weights, no gradient.

        Args:
            imgs: (B, C, H, W); mask: bool (B, L) or (B, h, w), True where a patch is masked.

        Returns:
            (B, L_masked, D_latent) latents of the masked patches (at the regressor's width), [CLS] dropped.
        """
        with torch.no_grad():
            return self.to_latent(self.forward_encoder(imgs, ~mask.flatten(1))[:, 1:])

    def _positions(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions of the visible patches (B, L_visible, D), of the masked ones (B, L_masked, D))."""
        B, pos = mask.shape[0], self.latent_pos_embed[:, 1:].expand(mask.shape[0], -1, -1)
        return pos[~mask].view(B, -1, pos.shape[-1]), pos[mask].view(B, -1, pos.shape[-1])

    def forward_regressor(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The masked patches' latents predicted from the visible ones.

        Args:
            latent: (B, 1 + L_visible, D) from `forward_encoder` ([CLS] is not used).
            mask: bool (B, L) or (B, h, w), True where a patch is masked.

        Returns:
            (B, L_masked, D_latent) final-norm predicted latents, row-major.
        """
        mask = mask.flatten(1)
        visible = self.to_latent(latent)[:, 1:]  # [B, L_visible, Dl]
        pos_visible, pos_masked = self._positions(mask)
        x = self.mask_token.to(visible.dtype).expand(mask.shape[0], pos_masked.shape[1], -1)
        context_pos = torch.cat([pos_visible, pos_masked], dim=1)
        for block in self.regressor_blocks:  # the queries attend to the visible latents and to themselves
            x = run_blocks([block], x, self.encoder.grad_checkpointing,
                           context=torch.cat([visible, x], dim=1), pos=pos_masked, context_pos=context_pos)
        return self.regressor_norm(x)

    def forward_decoder(self, predicted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """predicted: (B, L_masked, D_latent) from `forward_regressor`, mask (B, L) -> codebook logits
        (B, L_masked, vocab_size) of the masked patches, row-major."""
        x = predicted + self._positions(mask.flatten(1))[1]
        x = run_blocks(self.decoder_blocks, x, self.encoder.grad_checkpointing)
        return self.lm_head(self.decoder_norm(x))

    def forward_loss(self, logits: torch.Tensor, target_ids: torch.Tensor, mask: torch.Tensor,
                     predicted: torch.Tensor, target: torch.Tensor,
                     align_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy over the codebook at masked patches plus ``align_weight`` times the MSE between the
        predicted and the target latents (each a mean, as the authors').

        Args:
            logits: (B, L_masked, V) from `forward_decoder`.
            target_ids: long (B, L) or (B, h, w), the tokenizer's id of every patch.
            mask: bool (B, L) or (B, h, w).
            predicted, target: (B, L_masked, D_latent) from `forward_regressor` and `forward_target`.
            align_weight: the alignment's weight (2 in the paper).

        Returns:
            loss, and {"mim_acc": top-1 token accuracy, "loss_tokens", "loss_align"} (detached).
        """
        targets = target_ids.flatten(1)[mask.flatten(1)]  # [N]
        logits = logits.flatten(0, 1).float()  # [N, V]
        loss_tokens = F.cross_entropy(logits, targets)
        loss_align = F.mse_loss(predicted.float(), target.float())
        metrics = {"mim_acc": (logits.argmax(-1) == targets).float().mean().detach(),
                   "loss_tokens": loss_tokens.detach(), "loss_align": loss_align.detach()}
        return loss_tokens + align_weight * loss_align, metrics

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor, target_ids: torch.Tensor,
                align_weight: float = 2.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One pretraining step's loss.

        Args:
            imgs: (B, C, H, W) normalized images.
            mask: bool (B, L) or (B, h, w), True where a patch is masked; the same count in every image.
            target_ids: long (B, L) or (B, h, w), the tokenizer's ids.
            align_weight: weight of the latent alignment.

        Returns:
            loss (scalar) and the metrics of `forward_loss`.
        """
        mask = mask.flatten(1)
        predicted = self.forward_regressor(self.forward_encoder(imgs, mask), mask)
        target = self.forward_target(imgs, mask)
        logits = self.forward_decoder(predicted, mask)
        return self.forward_loss(logits, target_ids, mask, predicted, target, align_weight)


def class_visible_masked(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 1 + L, D) [CLS] and patch tokens in image order, mask bool (B, L) -> (B, 1 + L, D) in CAE v2's
    order: [CLS], the visible patches, the masked patches (each row-major)."""
    B, D = tokens.shape[0], tokens.shape[-1]
    patches = tokens[:, 1:]
    return torch.cat([tokens[:, :1], patches[~mask].view(B, -1, D), patches[mask].view(B, -1, D)], dim=1)


def in_image_order(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inverse of `class_visible_masked` without [CLS]: (B, 1 + L, ...) -> (B, L, ...) in image order."""
    patches = torch.empty_like(tokens[:, 1:])
    num_visible = int((~mask[0]).sum())
    patches[~mask] = tokens[:, 1:1 + num_visible].flatten(0, 1)
    patches[mask] = tokens[:, 1 + num_visible:].flatten(0, 1)
    return patches


class CAEv2(CAE):
    """CAE v2: the context autoencoder's encoder and regressor aligned with a frozen teacher's features at
    every token (CAE v2, TMLR 2023; the authors' ``--model_type caev2``).

    Args:
        teacher_dim: width of the teacher's features, the head's output (512 for CLIP ViT-B/16).
        **kwargs: `CAE`'s other arguments, except ``vocab_size`` and ``decoder_depth`` (CAE v2 has no token
            decoder: its head maps to the teacher's width).
    """

    def __init__(self, teacher_dim: int = 512, **kwargs):
        decoder = sorted({"vocab_size", "decoder_depth"} & kwargs.keys())
        if decoder:
            raise MimkitError(f"CAEv2 takes no {decoder[0]}: CAE v2 has no token decoder (its head maps to "
                              "the teacher's width)")
        super().__init__(vocab_size=teacher_dim, decoder_depth=0, **kwargs)
        self.regressor_norm = nn.Identity()  # the head's LayerNorm (decoder_norm) is the one after it

    def forward_head(self, latent: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """Every token's predicted teacher feature, L2-normalized.

        Args:
            latent: (B, 1 + L_visible, D) from `forward_encoder`; predicted: (B, L_masked, D_latent) from
                `forward_regressor`.

        Returns:
            (B, 1 + L, teacher_dim) unit vectors: [CLS], the visible patches, the masked patches.
        """
        x = torch.cat([self.to_latent(latent), predicted], dim=1)  # [B, 1 + L, D_latent]
        return F.normalize(self.lm_head(self.decoder_norm(x)).float(), dim=-1)

    def forward_target(self, teacher_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The targets: the teacher's features L2-normalized, in `forward_head`'s order.

        Args:
            teacher_tokens: (B, 1 + L, teacher_dim) the teacher's [CLS] and patch features of the unmasked
                image (`mimkit.tokenizers.teachers.Teacher.forward_with_class`).
            mask: bool (B, L) or (B, h, w), True where a patch is masked.

        Returns:
            float32 (B, 1 + L, teacher_dim): [CLS], the visible patches, the masked patches.
        """
        with torch.no_grad():
            return F.normalize(class_visible_masked(teacher_tokens.float(), mask.flatten(1)), dim=-1)

    def forward_loss(self, pred: torch.Tensor, target: torch.Tensor,
                     mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean of ``1 - cos`` over every token ([CLS], visible and masked patches alike).

        Args:
            pred, target: (B, 1 + L, teacher_dim) from `forward_head` and `forward_target`.
            mask: bool (B, L) or (B, h, w).

        Returns:
            loss, and {"cosine": the mean cosine at the masked patches, "cosine_visible": at [CLS] and the
            visible patches} (detached).
        """
        cosine = (pred * target).sum(-1)  # [B, 1 + L]: unit vectors
        num_visible = 1 + int((~mask.flatten(1)[0]).sum())
        metrics = {"cosine": cosine[:, num_visible:].mean().detach(),
                   "cosine_visible": cosine[:, :num_visible].mean().detach()}
        return (1 - cosine).mean(), metrics

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor,
                teacher_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One pretraining step's loss.

        Args:
            imgs: (B, C, H, W) normalized images.
            mask: bool (B, L) or (B, h, w), True where a patch is masked; the same count in every image.
            teacher_tokens: (B, 1 + L, teacher_dim) the teacher's features of the unmasked images.

        Returns:
            loss (scalar) and the metrics of `forward_loss`.
        """
        mask = mask.flatten(1)
        latent = self.forward_encoder(imgs, mask)
        pred = self.forward_head(latent, self.forward_regressor(latent, mask))
        return self.forward_loss(pred, self.forward_target(teacher_tokens, mask), mask)


def _cae(arch: str, cls: type[CAE] = CAE, **kw) -> CAE:
    return cls(**{**encoder_arch(arch), **kw})


def cae_vit_mini(**kw) -> CAE:
    return _cae("vit_mini", **kw)


def cae_vit_tiny(**kw) -> CAE:
    return _cae("vit_tiny", **kw)


def cae_vit_small(**kw) -> CAE:
    return _cae("vit_small", **kw)


def cae_vit_base(**kw) -> CAE:
    """CAE on ViT-Base (768 wide, 12 blocks, 12 heads): regressor and decoder 768 wide, 4 blocks each."""
    return _cae("vit_base", **kw)


def cae_vit_large(**kw) -> CAE:
    return _cae("vit_large", **kw)


CAE_MODELS = {
    "vit_mini": cae_vit_mini,
    "vit_tiny": cae_vit_tiny,
    "vit_small": cae_vit_small,
    "vit_base": cae_vit_base,
    "vit_large": cae_vit_large,
}


def create_cae(name: str, **kw) -> CAE:
    """A CAE by encoder name, e.g. ``create_cae("vit_mini", img_size=28, patch_size=4, in_chans=1,
    vocab_size=64)``; ``kw`` overrides any constructor argument (``depth=2``); ``cls=CAEv2`` builds CAE v2
    (``teacher_dim=...`` instead of ``vocab_size``)."""
    if name not in CAE_MODELS:
        raise MimkitError(f"unknown CAE model {name!r}; choose one of: {', '.join(CAE_MODELS)}")
    return CAE_MODELS[name](**kw)
