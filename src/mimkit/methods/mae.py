"""MAE pretraining: random 75% masking drawn per sample in the data view, pixel regression loss.

- He et al., Masked Autoencoders Are Scalable Vision Learners, 2021, arXiv:2111.06377
"""

from dataclasses import dataclass

import torch

import mimkit.interop.mae as layouts
from mimkit.config import PretrainConfig, check_model_kwargs
from mimkit.data.transforms import mae_view
from mimkit.interop.foreign import IMAGENET_MEAN, IMAGENET_STD
from mimkit.models.mae import MAE, MAE_MODELS, create_mae, num_kept
from mimkit.registry import Export, HFLayout, Images, Import, LossFn, Method, TimmLayout, View, register
from mimkit.viz import mae_reconstructions


@dataclass
class MAEConfig:
    """An MAE run's own settings (``config.settings``; ``mae:`` in YAML)."""

    mask_ratio: float = 0.75
    norm_pix_loss: bool = True


def build_model(config: PretrainConfig) -> MAE:
    check_model_kwargs(MAE, config.model.kwargs)
    return create_mae(config.model.name, img_size=config.data.img_size, patch_size=config.model.patch_size,
                      in_chans=config.data.channels, norm_pix_loss=config.settings.norm_pix_loss,
                      **config.model.kwargs)


def build_task(config: PretrainConfig, model: MAE) -> tuple[View, LossFn]:
    mask_ratio = config.settings.mask_ratio
    num_kept(model.num_patches, mask_ratio)  # refuse an impossible ratio before training starts
    view = mae_view(config.data.img_size, config.data.mean, config.data.std, config.model.patch_size)

    def loss_fn(model: MAE, batch: dict):
        loss, _, _ = model(batch["image"], mask_ratio=mask_ratio, noise=batch["noise"])
        return loss, {}

    return view, loss_fn


def describe(config: PretrainConfig) -> str:
    """The start-up summary's note: the share of patches hidden."""
    return f", {config.settings.mask_ratio:.0%} masked"


def pictures(model: MAE, config: PretrainConfig, images: Images, generator: torch.Generator) -> dict:
    """Original, masked, reconstruction and pasted images at the run's mask ratio."""
    data = config.data
    shown = images(data.img_size, data.mean, data.std)
    noise = torch.rand(len(shown), model.num_patches, generator=generator)
    return mae_reconstructions(model, shown, config.settings.mask_ratio, noise)


IMPORT = Import(
    arch=layouts.mae_arch, model_names=MAE_MODELS,
    model_kwargs=("embed_dim", "depth", "num_heads", "mlp_ratio", "decoder_embed_dim", "decoder_depth",
                  "decoder_num_heads"),
    section_fields=("norm_pix_loss", "mask_ratio"), guesses=layouts.mae_head_guesses,
    optional_parts=layouts.MAE_OPTIONAL_PARTS, reference=layouts.read_official_mae,
    timm=TimmLayout("VisionTransformer", layouts.TIMM_VIT, layouts.is_timm_vit, IMAGENET_MEAN, IMAGENET_STD),
    hf={"vit_mae": HFLayout(layouts.HF_VITMAE, layouts.arch_from_hf_config),
        "vit": HFLayout(layouts.HF_VIT, layouts.arch_from_hf_config)},
)

register(Method("mae", "pretraining", build_model, build_task, settings=MAEConfig, describe=describe,
                pictures=pictures, importing=IMPORT,
                export=Export(timm=layouts.timm_export, hf=layouts.hf_export)))
