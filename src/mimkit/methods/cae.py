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

- CAE: Chen et al., 2022, arXiv:2202.03026
"""

from dataclasses import dataclass

import torch

import mimkit.interop.cae as layouts
from mimkit.config import PretrainConfig, check_model_kwargs, check_range
from mimkit.interop.beit import timm_export
from mimkit.methods.beit import BEiTConfig, resolve_config, tokenizer_task, tokenizer_views
from mimkit.models.cae import CAE, CAE_MODELS, create_cae
from mimkit.registry import Export, Images, Import, LossFn, Method, View, register
from mimkit.viz import token_predictions


@dataclass
class CAEConfig(BEiTConfig):
    """A CAE run's own settings (``config.settings``; ``cae:`` in YAML): BEiT's, at the authors' values,
    and the alignment's weight."""

    mask_ratio: float = 0.5  # share of patches masked block-wise (the authors: 98 of 196)
    color_jitter: float = 0.0  # the authors' scripts: --color_jitter 0
    align_weight: float = 2.0  # weight of the latent alignment's MSE beside the token cross-entropy

    def __post_init__(self):
        check_range("config 'cae.mask_ratio'", self.mask_ratio, 0, 1, low_open=True, high_open=True)
        check_range("config 'cae.align_weight'", self.align_weight, 0)
        check_range("config 'cae.color_jitter'", self.color_jitter, 0)
        check_range("config 'cae.min_block'", self.min_block, 1)


def build_model(config: PretrainConfig) -> CAE:
    check_model_kwargs(CAE, config.model.kwargs)
    return create_cae(config.model.name, img_size=config.data.img_size, patch_size=config.model.patch_size,
                      in_chans=config.data.channels, **config.model.kwargs)


def build_task(config: PretrainConfig, model: CAE) -> tuple[View, LossFn]:
    weight = config.settings.align_weight
    return tokenizer_task(config, model,
                          lambda model, batch, ids: model(batch["image"], batch["mask"], ids, weight))


def describe(config: PretrainConfig) -> str:
    """The start-up summary's note: the share masked and the alignment's weight."""
    cae = config.settings
    return f", {cae.mask_ratio:.0%} masked block-wise, alignment weight {cae.align_weight:g}"


@torch.no_grad()
def pictures(model: CAE, config: PretrainConfig, images: Images, generator: torch.Generator) -> dict:
    """What CAE predicts at block-masked patches (the decoder's most likely ids), drawn through the dVAE's
    decoder beside the tokenizer's own ids and the original."""
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

register(Method("cae", "pretraining", build_model, build_task, settings=CAEConfig,
                resolve_config=resolve_config, describe=describe, tokenizer="dvae", pictures=pictures,
                importing=IMPORT, export=Export(timm=timm_export, hf=layouts.hf_export)))
