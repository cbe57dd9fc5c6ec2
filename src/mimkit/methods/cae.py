"""CAE pretraining: block-wise masking of about half the patches, drawn per sample in BEiT's two-resolution
view; the encoder on the visible patches, the latent regressor and the alignment, and a decoder to the
masked patches' dVAE ids (cross-entropy), the tokenizer frozen as in BEiT (``--tokenizer``).

The view and the tokenizer's handling are BEiT's (`mimkit.methods.beit`): a run's ``cae`` section holds
BEiT's settings (tokenizer, its view size, mask ratio, smallest block, crop, color jitter) plus the
alignment's weight; its vocabulary and tokenizer view size are written into the run's configuration. The
authors' defaults: 98 of 196 patches masked in blocks of at least 16, crops of 8-100% of the image, no
color jitter, the alignment weighted 2. Pictures: the dVAE's decoding of the tokenizer's ids and of CAE's
predictions at the hidden patches. ``mimkit import --format cae`` reads the authors' checkpoints
(`mimkit.interop.cae`); exports hold the encoder (timm `Beit`, transformers ``BeitModel``).

``cae.target: teacher`` is CAE v2 (`mimkit.models.cae.CAEv2`; recipes ``caev2_fmnist``, ``caev2_in1k``):
a frozen teacher (``--teacher``, any that VQ-KD and MaskDistill take; the authors' is CLIP ViT-B/16) sees
the unmasked image in the view's second resize at the ViT's size, as MaskDistill's does, and the model
regresses its L2-normalized [CLS] and patch features at every token with ``1 - cos``. No tokenizer, no
alignment (``align_weight`` 0). The teacher's width is written into the run (``cae.teacher_dim``), so the
run rebuilds without it; the picture is MaskDistill's per-patch cosine map.

- CAE: Chen et al., 2022, arXiv:2202.03026
- CAE v2: Zhang et al., TMLR 2023, arXiv:2211.09799
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

import mimkit.interop.cae as layouts
from mimkit.config import PretrainConfig, check_model_kwargs, check_range
from mimkit.errors import MimkitError
from mimkit.interop.beit import timm_export
from mimkit.methods.beit import BEiTConfig, masked_view, tokenizer_task, tokenizer_views
from mimkit.methods.beit import resolve_config as resolve_tokenizer
from mimkit.methods.maskdistill import patch_map
from mimkit.methods.vqkd import resolve_config as resolve_teacher_dim
from mimkit.methods.vqkd import teacher_of
from mimkit.models.cae import CAE, CAE_MODELS, CAEv2, create_cae, in_image_order
from mimkit.models.simmim import pixel_mask
from mimkit.registry import Export, Images, Import, LossFn, Method, View, register
from mimkit.viz import block_masks, token_predictions

TARGETS = ("tokens", "teacher")  # a dVAE's ids (CAE), a teacher's features (CAE v2)


@dataclass
class CAEConfig(BEiTConfig):
    """A CAE run's own settings (``config.settings``; ``cae:`` in YAML): BEiT's, at the authors' values,
    the alignment's weight, and the target: the tokenizer's ids, or (CAE v2) a teacher's features."""

    mask_ratio: float = 0.5  # share of patches masked block-wise (the authors: 98 of 196)
    color_jitter: float = 0.0  # the authors' scripts: --color_jitter 0
    align_weight: float = 2.0  # weight of the latent alignment's MSE beside the token cross-entropy
    target: str = "tokens"  # tokens: the dVAE's ids (CAE); teacher: the teacher's features (CAE v2)
    teacher: str | None = None  # CAE v2's: a mimkit run or checkpoint, timm:NAME:FILE, or hf:DIR (CLIP)
    teacher_dim: int | None = None  # None: the teacher's feature width, filled in when the run starts
    SECTION: ClassVar[str] = "cae"

    def __post_init__(self):
        super().__post_init__()
        check_range("config 'cae.align_weight'", self.align_weight, 0)
        check_range("config 'cae.teacher_dim'", self.teacher_dim, 1)
        if self.target not in TARGETS:
            raise MimkitError(f"config 'cae.target' must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.target == "tokens" and self.teacher:
            raise MimkitError("a teacher is CAE v2's target: set cae.target=teacher (the recipes "
                              "caev2_fmnist and caev2_in1k do), or drop --teacher for CAE's dVAE ids")
        if self.target == "teacher" and self.tokenizer:
            raise MimkitError("cae.target=teacher (CAE v2) regresses the teacher's features and takes no "
                              "tokenizer: drop --tokenizer")
        if self.target == "teacher" and self.align_weight:
            raise MimkitError(f"cae.target=teacher (CAE v2) has no alignment branch, but "
                              f"cae.align_weight={self.align_weight:g}: set it to 0 (the recipes "
                              "caev2_fmnist and caev2_in1k do)")


def resolve_config(config: PretrainConfig) -> PretrainConfig:
    """What is left to outside the run: the tokenizer's vocabulary and view size (BEiT's), or CAE v2's
    teacher's width."""
    resolve = resolve_teacher_dim if config.settings.target == "teacher" else resolve_tokenizer
    return resolve(config)


def build_model(config: PretrainConfig) -> CAE:
    settings, data = config.settings, config.data
    extra = {}
    if settings.target == "teacher":
        if settings.teacher_dim is None:
            raise MimkitError("cae.teacher_dim is unset: the run's teacher fills it in when training starts")
        extra = {"cls": CAEv2, "teacher_dim": settings.teacher_dim}
    check_model_kwargs(extra.get("cls", CAE), config.model.kwargs)
    return create_cae(config.model.name, img_size=data.img_size, patch_size=config.model.patch_size,
                      in_chans=data.channels, **extra, **config.model.kwargs)


def build_task(config: PretrainConfig, model: CAE) -> tuple[View, LossFn]:
    if config.settings.target == "teacher":
        teacher = teacher_of(config).to(next(model.parameters()).device)
        data = config.data
        view = masked_view(config, model, data.img_size, data.mean, data.std)

        def loss_fn(model: CAEv2, batch: dict):  # the teacher's image: the second resize, at the ViT's size
            return model(batch["image"], batch["mask"], teacher.forward_with_class(batch["tokenizer_image"]))

        return view, loss_fn
    weight = config.settings.align_weight
    return tokenizer_task(config, model,
                          lambda model, batch, ids: model(batch["image"], batch["mask"], ids, weight))


def describe(config: PretrainConfig) -> str:
    """The start-up summary's note: the share masked, and the alignment's weight or CAE v2's teacher."""
    cae = config.settings
    if cae.target == "teacher":
        return (f", {cae.mask_ratio:.0%} masked block-wise, CAE v2: cosine to the {cae.teacher_dim}-d "
                f"features of teacher '{cae.teacher}' at every token")
    return f", {cae.mask_ratio:.0%} masked block-wise, alignment weight {cae.align_weight:g}"


@torch.no_grad()
def teacher_pictures(model: CAEv2, config: PretrainConfig, images: Images,
                     generator: torch.Generator) -> dict:
    """CAE v2's: the image, what the encoder saw (block-masked), and per patch the cosine between the
    prediction (the encoder's at visible patches, the regressor's at masked ones) and the teacher's feature:
    white where they agree, black at 0 or below."""
    data, p = config.data, config.model.patch_size
    shown = images(data.img_size, data.mean, data.std)
    mask = block_masks(config.settings, data.img_size // p, len(shown), generator)  # [B, h, w]
    flat = mask.flatten(1)
    latent = model.forward_encoder(shown, flat)
    pred = model.forward_head(latent, model.forward_regressor(latent, flat))
    target = model.forward_target(teacher_of(config).forward_with_class(shown), flat)
    cosine = in_image_order(F.cosine_similarity(pred, target, dim=-1), flat).clamp(0, 1)  # [B, L]
    return {"original": shown, "masked": shown * (1 - pixel_mask(mask, p)),
            "cosine": patch_map(cosine, p, data.channels, data.mean, data.std)}


@torch.no_grad()
def pictures(model: CAE, config: PretrainConfig, images: Images, generator: torch.Generator) -> dict:
    """What CAE predicts at block-masked patches (the decoder's most likely ids), drawn through the dVAE's
    decoder beside the tokenizer's own ids and the original; CAE v2's `teacher_pictures`."""
    if config.settings.target == "teacher":
        return teacher_pictures(model, config, images, generator)
    tokenizer, shown, tokenizer_images, mask = tokenizer_views(config, images, generator)
    flat = mask.flatten(1)
    logits = model.forward_decoder(model.forward_regressor(model.forward_encoder(shown, flat), flat), flat)
    return token_predictions(tokenizer, shown, tokenizer_images, mask, logits.argmax(-1).flatten())


MODEL_KWARGS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "vocab_size", "layer_scale_init",
                "drop_path_rate", "decoder_embed_dim", "decoder_num_heads", "regressor_depth",
                "decoder_depth", "decoder_layer_scale_init")
IMPORT = Import(
    arch=layouts.cae_arch, model_names=CAE_MODELS, model_kwargs=MODEL_KWARGS,
    section_fields=("mask_ratio", "align_weight"), guesses=layouts.cae_guesses,
    optional_parts=layouts.CAE_OPTIONAL_PARTS, reference=layouts.read_official_cae,
)

# Not `teacher=True`: that says every run of the method distils a teacher (the quality benchmark hands one
# to each); CAE's default target is the tokenizer's ids, and --teacher reaches `CAEConfig.teacher` all the
# same.
register(Method("cae", "pretraining", build_model, build_task, settings=CAEConfig,
                resolve_config=resolve_config, describe=describe, tokenizer="dvae", pictures=pictures,
                importing=IMPORT, export=Export(timm=timm_export, hf=layouts.hf_export)))
