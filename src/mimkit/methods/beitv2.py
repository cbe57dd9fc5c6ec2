"""BEiT v2 pretraining: BEiT's block masking and encoder, targets from a frozen VQ-KD tokenizer that reads
the same view as the ViT, and the [CLS] aggregation head with its extra cross-entropy.

The tokenizer is not part of the checkpointed model: it runs inside the loss under ``no_grad`` in eval
mode; its vocabulary size is written into the run's configuration (`resolve_config`), so the run rebuilds
without it. The aggregation head (``agg_blocks``) is outside ``model.encoder``, so evaluation, fine-tuning
and export never see it; ``model.kwargs.agg_layer`` / ``agg_depth`` choose its input block and depth.

- BEiT v2: Peng et al., 2022, arXiv:2208.06366
"""

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

import mimkit.interop.beit as layouts
from mimkit.config import PretrainConfig, check_model_kwargs
from mimkit.errors import MimkitError
from mimkit.methods.beit import EXPORT, MODEL_KWARGS, BEiTConfig, masked_view
from mimkit.methods.vqkd import load_vqkd_tokenizer, tokenizer_config
from mimkit.models.beit import BEIT_MODELS, BEiTv2, create_beitv2
from mimkit.registry import Images, Import, LossFn, Method, View, register
from mimkit.viz import beitv2_predictions, block_masks


@dataclass
class BEiTv2Config(BEiTConfig):
    """A BEiT v2 run's own settings (``beitv2:`` in YAML): BEiT's masking and crops; the tokenizer is a VQ-KD
    run that reads the ViT's own view."""

    tokenizer: str | None = None  # a VQ-KD run directory (`mimkit tokenizer train vqkd`)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # BEiT v2's min_crop_scale
    SECTION: ClassVar[str] = "beitv2"


def resolve_config(config: PretrainConfig) -> PretrainConfig:
    """Fill in the codebook size (``model.kwargs.vocab_size``) and the tokenizer's view (the ViT's own,
    ``beitv2.tokenizer_size``); refuse a tokenizer made for other images or another patch grid."""
    section = config.settings
    if not section.tokenizer:
        raise MimkitError("beitv2 pretraining needs a VQ-KD tokenizer: --tokenizer runs/vqkd (train one "
                          "with: mimkit tokenizer train vqkd --teacher runs/mae --data ... --out runs/vqkd)")
    tokenizer = tokenizer_config(section.tokenizer)
    data, ours = tokenizer.data, (config.data.img_size, config.model.patch_size, config.data.channels)
    if (data.img_size, tokenizer.model.patch_size, data.channels) != ours:
        raise MimkitError(f"tokenizer '{section.tokenizer}' reads {data.img_size} px {data.channels}-channel "
                          f"images in {tokenizer.model.patch_size} px patches; this run has {ours[0]} px "
                          f"{ours[2]}-channel images in {ours[1]} px patches")
    vocab_size = tokenizer.settings.vocab_size
    if config.model.kwargs.get("vocab_size", vocab_size) != vocab_size:
        raise MimkitError(f"model.kwargs.vocab_size={config.model.kwargs['vocab_size']} differs from the "
                          f"tokenizer's {vocab_size} codes")
    model = replace(config.model, kwargs={**config.model.kwargs, "vocab_size": vocab_size})
    return replace(config, model=model, settings=replace(section, tokenizer_size=config.data.img_size))


def build_model(config: PretrainConfig) -> BEiTv2:
    check_model_kwargs(BEiTv2, config.model.kwargs)
    return create_beitv2(config.model.name, img_size=config.data.img_size, patch_size=config.model.patch_size,
                         in_chans=config.data.channels, **config.model.kwargs)


def build_task(config: PretrainConfig, model: BEiTv2) -> tuple[View, LossFn]:
    tokenizer, tokenizer_run = load_vqkd_tokenizer(config.settings.tokenizer)
    tokenizer = tokenizer.to(next(model.parameters()).device)
    data = tokenizer_run.data
    view = masked_view(config, model, config.data.img_size, data.mean, data.std)

    def loss_fn(model: BEiTv2, batch: dict):
        target_ids = tokenizer.tokenize(batch["tokenizer_image"])  # [B, h, w]; no_grad, codebook untouched
        return model(batch["image"], batch["mask"], target_ids)

    return view, loss_fn


def pictures(model: BEiTv2, config: PretrainConfig, images: Images, generator: torch.Generator) -> dict:
    """BEiT v2's most likely codes at block-masked patches beside its VQ-KD tokenizer's, as token maps."""
    tokenizer, tokenizer_run = load_vqkd_tokenizer(config.settings.tokenizer)
    data, tokenizer_data = config.data, tokenizer_run.data
    shown = images(data.img_size, data.mean, data.std)
    tokenizer_images = images(data.img_size, tokenizer_data.mean, tokenizer_data.std)
    mask = block_masks(config.settings, data.img_size // config.model.patch_size, len(shown), generator)
    return beitv2_predictions(model, tokenizer, shown, tokenizer_images, mask, data.mean, data.std)


IMPORT = Import(
    arch=layouts.beitv2_arch, model_names=BEIT_MODELS,
    model_kwargs=MODEL_KWARGS + ("agg_layer", "agg_depth", "shared_lm_head"), guesses=layouts.beitv2_defaults,
    optional_parts=layouts.BEITV2_OPTIONAL_PARTS, reference=layouts.read_official_beitv2,
)

register(Method("beitv2", "pretraining", build_model, build_task, settings=BEiTv2Config,
                resolve_config=resolve_config, tokenizer="vqkd", pictures=pictures, importing=IMPORT,
                export=EXPORT))
