"""MaskDistill pretraining: BEiT's block masking and student, a frozen teacher's features of the unmasked
image as targets (normalized by a LayerNorm without affine), Smooth-L1 at the masked patches.

The teacher is any that VQ-KD takes (`mimkit.tokenizers.teachers`: a mimkit run such as an MAE, which
needs no labels; a timm model and its weights; a CLIP or DINOv2 folder: the paper's teacher is CLIP). It is
not part of the checkpointed model: the loss runs it under ``no_grad`` in eval mode on the view's second
resize of the same crop (BEiT v2's tokenizer input; at the ViT's size it is the ViT's image), and its width
is written into the run's configuration (``maskdistill.teacher_dim``), so the run rebuilds without it. The
pictures need it again: a per-patch map of the cosine between the prediction and the target.

The loss and the target's normalization are settings: ``loss: cosine`` with ``target_norm: false`` is EVA's
and MILAN's objective on BEiT's student (theirs see the visible patches only, MAE's way, and add a decoder).

- MaskDistill: Peng et al., A Unified View of Masked Image Modeling, 2022, arXiv:2210.10615
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mimkit.config import PretrainConfig, check_crop_scale, check_model_kwargs, check_range
from mimkit.errors import MimkitError
from mimkit.methods.beit import EXPORT, masked_view
from mimkit.methods.vqkd import resolve_config as resolve_teacher_dim
from mimkit.methods.vqkd import teacher_of
from mimkit.models.maskdistill import LOSSES, MaskDistill, create_maskdistill
from mimkit.models.simmim import pixel_mask
from mimkit.registry import Images, LossFn, Method, View, register
from mimkit.viz import block_masks


@dataclass
class MaskDistillConfig:
    """A MaskDistill run's own settings (``config.settings``; ``maskdistill:`` in YAML)."""

    teacher: str | None = None  # a mimkit run or checkpoint, timm:NAME:FILE, or hf:DIR (CLIP: the paper's)
    teacher_dim: int | None = None  # None: the teacher's feature width, filled in when the run starts
    loss: str = "smooth_l1"  # smooth_l1 (the paper's) or cosine (2 - 2 cos: EVA's, MILAN's)
    smooth_l1_beta: float = 1.0  # Smooth-L1's threshold between its squared and linear parts
    target_norm: bool = True  # LayerNorm without affine over each teacher feature (the paper's)
    mask_ratio: float = 0.4  # share of patches masked block-wise (the paper: 40%)
    min_block: int | None = None  # smallest block in patches; None: 16 at 14x14, scaled by grid area
    crop_scale: tuple[float, float] = (0.2, 1.0)  # random resized crop (BEiT v2's min_crop_scale 0.2)
    color_jitter: float = 0.4  # brightness, contrast and saturation jitter; 0 turns it off

    def __post_init__(self):
        check_range("config 'maskdistill.mask_ratio'", self.mask_ratio, 0, 1, low_open=True, high_open=True)
        if self.loss not in LOSSES:
            raise MimkitError(f"config 'maskdistill.loss' must be one of {', '.join(LOSSES)}, "
                              f"got {self.loss!r}")
        check_range("config 'maskdistill.smooth_l1_beta'", self.smooth_l1_beta, 0)
        check_range("config 'maskdistill.min_block'", self.min_block, 1)
        check_range("config 'maskdistill.color_jitter'", self.color_jitter, 0)
        check_range("config 'maskdistill.teacher_dim'", self.teacher_dim, 1)
        check_crop_scale("maskdistill", self.crop_scale)


def build_model(config: PretrainConfig) -> MaskDistill:
    s = config.settings
    if s.teacher_dim is None:
        raise MimkitError("maskdistill.teacher_dim is unset: the run's teacher fills it in when training "
                          "starts")
    check_model_kwargs(MaskDistill, config.model.kwargs)
    return create_maskdistill(config.model.name, img_size=config.data.img_size,
                              patch_size=config.model.patch_size, in_chans=config.data.channels,
                              teacher_dim=s.teacher_dim, loss=s.loss, smooth_l1_beta=s.smooth_l1_beta,
                              target_norm=s.target_norm, **config.model.kwargs)


def build_task(config: PretrainConfig, model: MaskDistill) -> tuple[View, LossFn]:
    teacher = teacher_of(config).to(next(model.parameters()).device)
    data = config.data
    view = masked_view(config, model, data.img_size, data.mean, data.std)

    def loss_fn(model: MaskDistill, batch: dict):
        return model(batch["image"], batch["mask"], teacher(batch["tokenizer_image"]))  # teacher: no_grad

    return view, loss_fn


def describe(config: PretrainConfig) -> str:
    """The start-up summary's note: the masking, the loss and the teacher."""
    s = config.settings
    target = "normalized features" if s.target_norm else "features"
    return (f", {s.mask_ratio:.0%} masked block-wise, {s.loss} to the {s.teacher_dim}-d {target} of teacher "
            f"'{s.teacher}'")


def patch_map(values: torch.Tensor, patch_size: int, channels: int, mean, std) -> torch.Tensor:
    """(B, L) values in [0, 1] on a square patch grid -> (B, channels, H, W) gray images, each patch one
    shade (0 black, 1 white), normalized like the images so that `mimkit.viz.image_grid` shows them."""
    gray = pixel_mask(values, patch_size).expand(-1, channels, -1, -1)  # [B, C, H, W]
    shape = (1, -1, 1, 1)
    return (gray - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


@torch.no_grad()
def pictures(model: MaskDistill, config: PretrainConfig, images: Images, generator: torch.Generator) -> dict:
    """The image, what the student saw (block-masked), and per patch the cosine between the student's
    prediction and the teacher's (normalized) feature: white where they agree, black at 0 or below."""
    data = config.data
    shown = images(data.img_size, data.mean, data.std)
    grid = data.img_size // config.model.patch_size
    mask = block_masks(config.settings, grid, len(shown), generator)  # [B, h, w]
    x, _ = model.forward_features(shown, mask)
    pred = model.forward_head(x, torch.ones_like(mask)).view(len(shown), grid * grid, -1)  # every patch
    target = model.forward_target(teacher_of(config)(shown))
    cosine = F.cosine_similarity(pred.float(), target, dim=-1).clamp(0, 1)  # [B, L]
    p = config.model.patch_size
    return {"original": shown, "masked": shown * (1 - pixel_mask(mask, p)),
            "cosine": patch_map(cosine, p, data.channels, data.mean, data.std)}


register(Method("maskdistill", "pretraining", build_model, build_task, settings=MaskDistillConfig,
                resolve_config=resolve_teacher_dim, teacher=True, describe=describe, pictures=pictures,
                export=EXPORT))
