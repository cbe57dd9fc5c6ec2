"""data2vec (vision): a student with a mask token regresses, at the masked patches, what an EMA teacher of
itself computes from the whole image: the average of its top K blocks' outputs, each normalized.

The student is BEiT's pretraining model (`mimkit.models.beit.BEiT`): a timm `Beit` (one relative position
table shared by all blocks, layer scale, no absolute positions) held as ``model.encoder``, a mask token that
replaces the embeddings of masked patches, and a linear head (``lm_head``, ``embed_dim`` wide, the authors'
name) on the final-norm tokens. The teacher (``model.teacher``) is a copy of the encoder that is never
trained: after every optimizer step its weights move towards the student's (`Data2Vec.update_teacher`). It
runs in eval mode (no stochastic depth, no attention dropout) on the unmasked image, under ``no_grad``; its
blocks' outputs (after the residual, before any norm; [CLS] left out) are the targets. It lives in the
state dict, so a checkpoint resumes with it.

This is the authors' released vision code (``facebookresearch/data2vec_vision``, ``beit/modeling_cyclical.py``
and ``engine_for_cyclical.py``): targets ``layer_results='end'``, each block's output layer-normalized
without affine weights (``target_layer_norm_last``), averaged, layer-normalized again
(``--post_target_layer_norm``), and a smooth-L1 loss (``--l1_beta 2.0``) averaged over the masked patches'
features. Per-token instance normalization over the patches (fairseq's ``instance_norm_target_layer``) is
the other choice for either step. The weights start as the authors' do: truncated normals of std 0.02 cut
at one standard deviation for every linear and convolution weight (the head's included), the [CLS] and mask
tokens, each block's output projections divided by sqrt(2 * block number); the teacher starts as a copy.

- data2vec: Baevski et al., data2vec: A General Framework for Self-supervised Learning in Speech, Vision
  and Language, 2022, arXiv:2202.03555
"""

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.errors import MimkitError
from mimkit.models.beit import BEiT
from mimkit.models.simmim import reference_trunc_normal_
from mimkit.models.vit import encoder_arch

NORMS = ("layer", "instance", "none")  # how targets are normalized (per block, and after the average)


def normalize_targets(x: torch.Tensor, norm: str) -> torch.Tensor:
    """(B, L, D) features normalized without learned weights, in float32.

    Args:
        x: (B, L, D) patch tokens.
        norm: ``layer``: each token over its D features; ``instance``: each feature over the L tokens of its
            image; ``none``: unchanged.
    """
    x = x.float()
    if norm == "layer":
        return F.layer_norm(x, x.shape[-1:])
    if norm == "instance":
        return F.instance_norm(x.transpose(1, 2)).transpose(1, 2)
    return x


def teacher_decay(step: int, start: float, end: float, anneal_steps: int) -> float:
    """The teacher's EMA decay at optimizer step ``step`` (0-based): ``start`` rising linearly to ``end`` over
    the first ``anneal_steps`` steps, ``end`` from then on (the authors' ``ema_decay_init`` -> ``ema_decay``
    over ``ema_start_at`` updates; 0 steps: ``end`` throughout, as their ViT-B run)."""
    if step >= anneal_steps:
        return end
    return start + step * (end - start) / anneal_steps


class Data2Vec(BEiT):
    """data2vec pretraining of a BEiT encoder against an EMA teacher (data2vec, arXiv:2202.03555).

    Args:
        top_k: blocks whose outputs are averaged into the targets (the top ones; 6 of 12 for ViT-B).
        block_norm: how each block's output is normalized before the average (`NORMS`; the authors': layer).
        target_norm: how the average is normalized (`NORMS`; the authors': layer).
        loss_beta: smooth-L1's beta, where the loss turns from quadratic to linear (2.0); 0: squared error.
        attn_drop_rate: attention dropout of the student in pretraining (0.05 in the authors' ViT-B run); the
            encoder has none outside `forward`.
        layer_scale_init: initial layer scale (the authors': 1e-4 for ViT-B, 1e-5 for ViT-L).
        shared_rel_pos_bias: one relative position table for all blocks (the authors' setting).
        drop_path_rate: stochastic depth at the last block (0.25 for ViT-B).
        **kwargs: `BEiT`'s dimensions (img_size, patch_size, in_chans, embed_dim, depth, num_heads,
            mlp_ratio); the head is ``embed_dim`` wide.
    """

    def __init__(self, top_k: int = 6, block_norm: str = "layer", target_norm: str = "layer",
                 loss_beta: float = 2.0, attn_drop_rate: float = 0.0, layer_scale_init: float = 1e-4,
                 shared_rel_pos_bias: bool = True, drop_path_rate: float = 0.25, **kwargs):
        embed_dim = kwargs.get("embed_dim", 768)
        super().__init__(vocab_size=embed_dim, layer_scale_init=layer_scale_init,
                         shared_rel_pos_bias=shared_rel_pos_bias, drop_path_rate=drop_path_rate, **kwargs)
        depth = self.encoder_kwargs["depth"]
        if not 1 <= top_k <= depth:
            raise MimkitError(f"data2vec.top_k={top_k} must be a number of blocks in 1..{depth} (the depth)")
        for name, norm in (("block_norm", block_norm), ("target_norm", target_norm)):
            if norm not in NORMS:
                raise MimkitError(f"data2vec.{name}={norm!r} must be one of: {', '.join(NORMS)}")
        if loss_beta < 0:
            raise MimkitError(f"data2vec.loss_beta={loss_beta} must be at least 0")
        self.top_k, self.loss_beta = top_k, loss_beta
        self.block_norm, self.target_norm = block_norm, target_norm
        self.attn_drop_rate = attn_drop_rate  # pretraining's only (`student_attention_dropout`)
        self._init_like_reference()
        self.teacher = copy.deepcopy(self.encoder).requires_grad_(False).eval()

    def _init_like_reference(self) -> None:
        """The authors' init (see the module docstring); timm's cuts its normals at +-2 (absolute)."""
        for module in [self.encoder, self.lm_head]:
            for m in module.modules():
                if isinstance(m, nn.Linear | nn.Conv2d):
                    reference_trunc_normal_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        reference_trunc_normal_(self.encoder.cls_token)
        reference_trunc_normal_(self.mask_token)
        self.encoder.fix_init_weight()

    @contextlib.contextmanager
    def student_attention_dropout(self) -> Iterator[None]:
        """The student's attention dropout (``attn_drop_rate``) within the block, none outside it: the
        encoder that evaluations and exports take has none, as the authors fine-tune without."""
        drops = [block.attn.attn_drop for block in self.encoder.blocks]
        for drop in drops:
            drop.p = self.attn_drop_rate
        try:
            yield
        finally:
            for drop in drops:
                drop.p = 0.0

    def train(self, mode: bool = True) -> "Data2Vec":
        """The student follows ``mode``; the teacher stays in eval mode (the authors' EMA model)."""
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def update_teacher(self, decay: float) -> None:
        """One EMA step: teacher = decay * teacher + (1 - decay) * student, parameter by parameter (the
        buffers are derived from the grid and equal)."""
        student = [p.detach() for p in self.encoder.parameters()]
        torch._foreach_lerp_(list(self.teacher.parameters()), student, 1.0 - decay)

    @torch.no_grad()
    def forward_targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """The teacher's targets for every patch.

        Args:
            imgs: (B, C, H, W) normalized images, unmasked.

        Returns:
            (B, L, D) float32: the top ``top_k`` blocks' outputs (patch tokens), each normalized by
            ``block_norm``, averaged, then normalized by ``target_norm``. The teacher runs in float32 under
            any autocast, as the authors' (their targets are computed outside it).
        """
        with torch.autocast(imgs.device.type, enabled=False):
            blocks = self.teacher.forward_intermediates(  # top_k x [B, L, D]
                imgs.float(), indices=self.top_k, norm=False, output_fmt="NLC", intermediates_only=True)
        mean = sum(normalize_targets(x, self.block_norm) for x in blocks) / len(blocks)
        return normalize_targets(mean, self.target_norm)

    def forward_loss(self, pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Smooth-L1 (squared error when ``loss_beta`` is 0) averaged over the masked patches' features.

        Args:
            pred: (N, D) student predictions at the N masked patches of the batch.
            targets: (N, D) teacher targets there.
        """
        if self.loss_beta == 0:
            return F.mse_loss(pred.float(), targets)
        return F.smooth_l1_loss(pred.float(), targets, beta=self.loss_beta)

    def forward(self, imgs: torch.Tensor, bool_masked_pos: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One pretraining step's loss.

        Args:
            imgs: (B, C, H, W) normalized images.
            bool_masked_pos: bool (B, L) or (B, h, w), True where the student sees the mask token.

        Returns:
            loss: scalar, `forward_loss` at the masked patches.
            metrics: ``target_std`` and ``pred_std``, the features' standard deviation over the masked
                patches averaged over features (the authors' ``target_var``/``pred_var``: a collapse shows).
        """
        targets = self.forward_targets(imgs)[bool_masked_pos.flatten(1)]  # [N, D]
        with self.student_attention_dropout():
            x, _ = self.forward_features(imgs, bool_masked_pos)
        pred = self.forward_head(x, bool_masked_pos)  # [N, D]
        metrics = {"target_std": targets.std(0).mean(), "pred_std": pred.detach().float().std(0).mean()}
        return self.forward_loss(pred, targets), metrics


def _data2vec(arch: str, default_layer_scale: float, **kwargs) -> Data2Vec:
    """The arch's dimensions and layer scale, overridden by ``kwargs``."""
    return Data2Vec(**{**encoder_arch(arch), "layer_scale_init": default_layer_scale, **kwargs})


def data2vec_vit_mini(**kwargs) -> Data2Vec:
    """data2vec on ViT-Mini (128 wide, 6 blocks, 4 heads)."""
    return _data2vec("vit_mini", 1e-4, **kwargs)


def data2vec_vit_tiny(**kwargs) -> Data2Vec:
    """data2vec on ViT-Tiny (192 wide, 12 blocks, 3 heads)."""
    return _data2vec("vit_tiny", 1e-4, **kwargs)


def data2vec_vit_small(**kwargs) -> Data2Vec:
    """data2vec on ViT-Small (384 wide, 12 blocks, 6 heads)."""
    return _data2vec("vit_small", 1e-4, **kwargs)


def data2vec_vit_base(**kwargs) -> Data2Vec:
    """data2vec on ViT-Base (768 wide, 12 blocks, 12 heads); layer scale 1e-4 as the authors' run."""
    return _data2vec("vit_base", 1e-4, **kwargs)


def data2vec_vit_large(**kwargs) -> Data2Vec:
    """data2vec on ViT-Large (1024 wide, 24 blocks, 16 heads); layer scale 1e-5 as the authors' run."""
    return _data2vec("vit_large", 1e-5, **kwargs)


DATA2VEC_MODELS = {
    "vit_mini": data2vec_vit_mini,
    "vit_tiny": data2vec_vit_tiny,
    "vit_small": data2vec_vit_small,
    "vit_base": data2vec_vit_base,
    "vit_large": data2vec_vit_large,
}


def create_data2vec(name: str, **kwargs) -> Data2Vec:
    """A data2vec model by encoder name, e.g. ``create_data2vec("vit_mini", img_size=28, patch_size=4,
    in_chans=1, top_k=3)``.

    Args:
        name: a key of `DATA2VEC_MODELS`.
        **kwargs: `Data2Vec` arguments; they override the arch's, so ``depth=2`` gives a 2-block model.
    """
    if name not in DATA2VEC_MODELS:
        raise MimkitError(f"unknown data2vec model {name!r}; choose one of: {', '.join(DATA2VEC_MODELS)}")
    return DATA2VEC_MODELS[name](**kwargs)
