"""MaskDistill pretraining: a ViT with a mask token regresses a frozen teacher's normalized features at the
masked patches.

The student is BEiT's (`mimkit.models.beit.BEiT`: a timm `Beit` held as ``model.encoder``, relative position
bias, layer scale, a learnable mask token replacing the masked patches' embeddings before the blocks), and
its MIM head is one linear layer from each final-norm token to the teacher's width, BEiT's ``lm_head``
(a codebook classifier there, a regressor here). The target is the teacher's patch feature passed through
a LayerNorm without affine parameters (each feature vector to zero mean and unit variance over its
channels); the loss is the Smooth-L1 distance at the masked patches, averaged over their channels. This is
BEiT v2 without the quantizer: the features a VQ-KD tokenizer would have quantized are the targets
themselves. The teacher is not part of the model: the method runs it under ``no_grad`` in the loss.

The paper's unified view (teacher, normalization, student, head, loss) also gives EVA and MILAN: a CLIP
teacher's raw features regressed with a cosine loss, ``2 - 2 cos`` = the squared distance of the
L2-normalized vectors (mmpretrain's ``CosineSimilarityLoss(shift_factor=2, scale_factor=2)``); that is
``loss="cosine", target_norm=False`` here.

- MaskDistill: Peng et al., A Unified View of Masked Image Modeling, 2022, arXiv:2210.10615
- EVA: Fang et al., 2022, arXiv:2211.07636; MILAN: Hou et al., 2022, arXiv:2208.06049
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.errors import MimkitError
from mimkit.models.beit import BEiT, create_beit

TARGET_NORM_EPS = 1e-6  # the LayerNorm eps of BEiT's (and timm's Beit's) norms


def smooth_l1_distance(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """(N, D), (N, D) -> (N,): Smooth-L1 (Huber with threshold ``beta``) averaged over the channels."""
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="none").mean(-1)


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, D), (N, D) -> (N,): ``2 - 2 cos``, the squared distance of the unit vectors."""
    return 2 - 2 * F.cosine_similarity(pred, target, dim=-1)


LOSSES = ("smooth_l1", "cosine")


class MaskDistill(BEiT):
    """Masked distillation of a frozen teacher's features (MaskDistill, arXiv:2210.10615).

    Args:
        img_size: square input size in pixels.
        patch_size: square patch size in pixels; must divide `img_size`.
        in_chans: image channels.
        teacher_dim: width of the teacher's features, the head's output.
        embed_dim, depth, num_heads, mlp_ratio: the ViT's dimensions.
        layer_scale_init: initial value of the per-channel layer scale (0.1 for ViT-B).
        shared_rel_pos_bias: one relative position bias table shared by all blocks (BEiT v2's pretraining
            setting) instead of one per block.
        drop_path_rate: stochastic depth at the last block.
        loss: ``smooth_l1`` (the paper's) or ``cosine`` (EVA's and MILAN's ``2 - 2 cos``).
        smooth_l1_beta: the Smooth-L1 threshold between its squared and its linear part.
        target_norm: LayerNorm without affine over each teacher feature (the paper's); False regresses the
            raw features (EVA, MILAN).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        teacher_dim: int = 768,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        layer_scale_init: float = 0.1,
        shared_rel_pos_bias: bool = True,
        drop_path_rate: float = 0.1,
        loss: str = "smooth_l1",
        smooth_l1_beta: float = 1.0,
        target_norm: bool = True,
    ):
        if loss not in LOSSES:
            raise MimkitError(f"unknown MaskDistill loss {loss!r}; choose one of: {', '.join(LOSSES)}")
        super().__init__(img_size, patch_size, in_chans, vocab_size=teacher_dim, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         layer_scale_init=layer_scale_init, shared_rel_pos_bias=shared_rel_pos_bias,
                         drop_path_rate=drop_path_rate)
        smooth_l1 = partial(smooth_l1_distance, beta=smooth_l1_beta)
        self.distance = smooth_l1 if loss == "smooth_l1" else cosine_distance
        self.target_norm = (nn.LayerNorm(teacher_dim, eps=TARGET_NORM_EPS, elementwise_affine=False)
                            if target_norm else nn.Identity())

    def forward_target(self, teacher_features: torch.Tensor) -> torch.Tensor:
        """(B, L, teacher_dim) teacher features -> the regression targets, normalized, float32."""
        with torch.autocast(teacher_features.device.type, enabled=False):
            return self.target_norm(teacher_features.float())

    def forward_loss(self, pred: torch.Tensor, target: torch.Tensor,
                     bool_masked_pos: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The distance between the predictions and the targets at the masked patches.

        Args:
            pred: (N, teacher_dim) from `forward_head`: the batch's N masked patches, row-major per image.
            target: (B, L, teacher_dim) from `forward_target`.
            bool_masked_pos: bool (B, L) or (B, h, w), True where masked.

        Returns:
            loss: scalar, the mean distance over the masked patches.
            metrics: {"cosine": the mean cosine similarity of prediction and target there (detached)}.
        """
        target = target[bool_masked_pos.flatten(1)]  # [N, teacher_dim]
        pred = pred.float()
        loss = self.distance(pred, target).mean()
        return loss, {"cosine": F.cosine_similarity(pred.detach(), target, dim=-1).mean()}

    def forward(self, imgs: torch.Tensor, bool_masked_pos: torch.Tensor,
                teacher_features: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One pretraining step's loss.

        Args:
            imgs: (B, C, H, W) normalized images, masked patches still in them (the mask token replaces
                their embeddings).
            bool_masked_pos: bool (B, L) or (B, h, w), True where masked.
            teacher_features: (B, L, teacher_dim) the teacher's features of the unmasked images, on the
                student's patch grid (`mimkit.tokenizers.teachers.Teacher`).

        Returns:
            loss, metrics: as `forward_loss`.
        """
        x, _ = self.forward_features(imgs, bool_masked_pos)
        pred = self.forward_head(x, bool_masked_pos)
        return self.forward_loss(pred, self.forward_target(teacher_features), bool_masked_pos)


def create_maskdistill(name: str, **kwargs) -> MaskDistill:
    """A MaskDistill by encoder name (`mimkit.models.beit.BEIT_MODELS`: BEiT's dimensions and layer scale),
    e.g. ``create_maskdistill("vit_mini", img_size=28, patch_size=4, in_chans=1, teacher_dim=128)``.

    Args:
        name: a key of `mimkit.models.beit.BEIT_MODELS`.
        **kwargs: `MaskDistill` arguments; they override the arch's, so ``depth=2`` gives a 2-block model.
    """
    return create_beit(name, cls=MaskDistill, **kwargs)
