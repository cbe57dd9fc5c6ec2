"""ViT and MAE layouts: timm, the MAE reference code, and Hugging Face transformers.

mimkit's MAE is ``encoder.*`` (a timm `VisionTransformer`) plus the decoder under the reference code's
own names, so the reference layout and timm's are prefix changes. Hugging Face's names are those its
``save_pretrained`` writes (the layout of the published checkpoints); `mimkit.interop.hf` maps the
names of in-memory transformers 5 modules onto them first. MAE's method record (`mimkit.methods.mae`) names
the reader, architecture inference and export functions here; they read the models alone.

- ViT: Dosovitskiy et al., 2020, arXiv:2010.11929
- MAE: He et al., 2021, arXiv:2111.06377
"""

import math
from collections.abc import Collection
from pathlib import Path

import timm
import torch

from mimkit.config import PretrainConfig
from mimkit.errors import MimkitError
from mimkit.interop.foreign import IMAGENET_MEAN, IMAGENET_STD, REFERENCE_NORM, Foreign, convert, unknown_name
from mimkit.interop.keymaps import block_count, identity, nest, to_foreign
from mimkit.models.mae import MAE
from mimkit.models.vit import ENCODER_ARCHS
from mimkit.safe_load import load_checkpoint

VIT_BLOCK_KEYS = (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
)
TIMM_VIT_KEYS = (
    "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
    *(f"blocks.{{i}}.{k}" for k in VIT_BLOCK_KEYS), "norm.weight", "norm.bias",
)
MAE_DECODER_KEYS = (
    "decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed",
    *(f"decoder_blocks.{{j}}.{k}" for k in VIT_BLOCK_KEYS),
    "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias",
)

# A timm VisionTransformer state dict (num_classes=0).
TIMM_VIT = identity(TIMM_VIT_KEYS, ours="encoder.")
# The MAE reference code's `model` dict: the encoder-only pretrain files hold the first part.
OFFICIAL_MAE = TIMM_VIT | identity(MAE_DECODER_KEYS)

_QKV = ("query", "key", "value")
# timm Block -> transformers ViTLayer (and ViTMAE's decoder layers).
HF_VIT_BLOCK = {
    "norm1.weight": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "attn.qkv.weight": tuple(f"attention.attention.{x}.weight" for x in _QKV),
    "attn.qkv.bias": tuple(f"attention.attention.{x}.bias" for x in _QKV),
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "norm2.weight": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
    "mlp.fc1.weight": "intermediate.dense.weight",
    "mlp.fc1.bias": "intermediate.dense.bias",
    "mlp.fc2.weight": "output.dense.weight",
    "mlp.fc2.bias": "output.dense.bias",
}
HF_VIT_EMBED = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
# transformers ViTModel / ViTMAEModel, without the "vit." of the models with heads.
HF_VIT = nest(HF_VIT_EMBED, "encoder.") | nest(HF_VIT_BLOCK, "encoder.blocks.{i}.", "encoder.layer.{i}.")
HF_VITMAE_DECODER = {
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
} | nest(HF_VIT_BLOCK, "decoder_blocks.{j}.", "decoder.decoder_layers.{j}.")
# transformers ViTMAEForPreTraining, "vit." removed.
HF_VITMAE = HF_VIT | HF_VITMAE_DECODER

# Parts a checkpoint may lack as a whole; they then keep the fresh initialization of a new MAE.
MAE_OPTIONAL_PARTS = {"decoder": ("decoder_", "mask_token")}
MAE_POS_TABLES = ("encoder.pos_embed", "decoder_pos_embed")

ENCODER_HEAD_DIM = 64  # the head width of every ViT in the ViT and MAE papers but ViT-H (80)
DECODER_HEAD_DIM = 32  # MAE's 512-wide decoder has 16 heads

# The MAE reference code's model names (models_mae.py; models_vit.py for its fine-tuned encoders) and the
# dimensions each fixes, attention heads among them.
_MAE_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
_VIT_B = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
_VIT_L = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
_VIT_H = dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16)
OFFICIAL_MAE_MODELS = {
    "mae_vit_base_patch16": _VIT_B | _MAE_DECODER, "mae_vit_base_patch16_dec512d8b": _VIT_B | _MAE_DECODER,
    "mae_vit_large_patch16": _VIT_L | _MAE_DECODER, "mae_vit_large_patch16_dec512d8b": _VIT_L | _MAE_DECODER,
    "mae_vit_huge_patch14": _VIT_H | _MAE_DECODER, "mae_vit_huge_patch14_dec512d8b": _VIT_H | _MAE_DECODER,
    "vit_base_patch16": _VIT_B, "vit_large_patch16": _VIT_L, "vit_huge_patch14": _VIT_H,
}


def _require(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise MimkitError(f"cannot infer the architecture: the checkpoint has no {key!r} (in mimkit's names)")
    return state[key]


def model_name_fields(name: str | None, known: dict[str, dict]) -> tuple[dict, dict[str, str]]:
    """The dimensions a reference model name (a checkpoint's ``args.model``) fixes, with their origin.

    Args:
        name: the name, or None when the checkpoint has no ``args.model``.
        known: name -> dimensions, e.g. `OFFICIAL_MAE_MODELS`.

    Returns:
        ``{field: value}`` (empty for an unknown name) and ``{field: origin}``.
    """
    fields = dict(known.get(name, {}))
    return fields, dict.fromkeys(fields, f"args.model {name!r}")


def official_mae_args(args: dict) -> tuple[dict, dict[str, str]]:
    """What an MAE reference checkpoint's training arguments fix that its weights do not show: the
    dimensions of a released model name (`OFFICIAL_MAE_MODELS`, heads included), the target
    (``norm_pix_loss``; absent, the reference code's default, False) and ``mask_ratio``.

    Returns:
        ``{field: value}`` and ``{field: origin}``.
    """
    fields, origin = model_name_fields(args.get("model"), OFFICIAL_MAE_MODELS)
    for key in ("norm_pix_loss", "mask_ratio"):
        if key in args:
            fields[key], origin[key] = args[key], f"args.{key}"
    if "norm_pix_loss" not in fields:
        fields["norm_pix_loss"] = False
        origin["norm_pix_loss"] = "default: the reference code's (the checkpoint has no args.norm_pix_loss)"
    return fields, origin


def guess_heads(width: int, head_dim: int) -> tuple[int | None, str]:
    """Attention heads of ``head_dim`` width, the released models' convention, and how that was decided
    (None when ``head_dim`` does not divide ``width``)."""
    if width % head_dim:
        return None, f"unknown: {width} is not a multiple of {head_dim}-wide heads"
    return width // head_dim, f"guessed: {head_dim}-wide heads, the convention of the released models"


def encoder_heads(embed_dim: int, depth: int, mlp_ratio: float) -> tuple[int | None, str]:
    """A guess at a ViT encoder's attention heads (weights do not show them): the named arch with these
    dimensions (`ENCODER_ARCHS`: ViT-B/L/H are the released shapes), else 64-wide heads; with its origin."""
    for name, arch in ENCODER_ARCHS.items():
        if (arch["embed_dim"], arch["depth"], arch["mlp_ratio"]) == (embed_dim, depth, mlp_ratio):
            return arch["num_heads"], f"guessed: {name}'s, the named ViT of this shape"
    return guess_heads(embed_dim, ENCODER_HEAD_DIM)


def vit_arch(state: dict, prefix: str = "encoder.") -> dict:
    """Image size, patch size, channels and encoder dims of a timm ViT held under ``prefix``.

    Returns:
        ``img_size, patch_size, in_chans, embed_dim, depth, mlp_ratio`` (heads do not show in the weights).
    """
    proj = _require(state, prefix + "patch_embed.proj.weight")  # [D, C, p, p]
    embed_dim, in_chans, patch_size = proj.shape[0], proj.shape[1], proj.shape[-1]
    depth = block_count(state, prefix + "blocks.")
    mlp_ratio = _require(state, prefix + "blocks.0.mlp.fc1.weight").shape[0] / embed_dim
    grid = math.isqrt(_require(state, prefix + "pos_embed").shape[1] - 1)
    return dict(img_size=grid * patch_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                depth=depth, mlp_ratio=mlp_ratio)


def mae_arch(state: dict) -> dict:
    """`MAE` constructor arguments read off a mimkit-layout MAE state dict: `vit_arch`'s, and the decoder's
    width and depth when the state dict holds a decoder. Attention heads do not show (`mae_head_guesses`)."""
    arch = vit_arch(state)
    if "decoder_embed.weight" in state:
        arch |= dict(decoder_embed_dim=state["decoder_embed.weight"].shape[0],
                     decoder_depth=block_count(state, "decoder_blocks."))
    return arch


def mae_head_guesses(arch: dict) -> dict[str, tuple[int | None, str]]:
    """Guesses, with their origin, at the heads ``arch`` leaves open: the encoder's (`encoder_heads`) and,
    with a decoder, the decoder's (32-wide heads, as MAE's 512-wide decoder)."""
    guesses = {"num_heads": encoder_heads(arch["embed_dim"], arch["depth"], arch["mlp_ratio"])}
    if "decoder_embed_dim" in arch:
        guesses["decoder_num_heads"] = guess_heads(arch["decoder_embed_dim"], DECODER_HEAD_DIM)
    return guesses


def timm_vit_kwargs(model: MAE) -> dict:
    """`timm.models.vision_transformer.VisionTransformer` arguments that rebuild ``model.encoder``."""
    enc = model.encoder
    return dict(img_size=model.img_size, patch_size=model.patch_size, in_chans=model.in_chans, num_classes=0,
                embed_dim=enc.embed_dim, depth=len(enc.blocks), num_heads=enc.blocks[0].attn.num_heads,
                mlp_ratio=enc.blocks[0].mlp.fc1.out_features / enc.embed_dim)


def hf_vit_config(model: MAE) -> dict:
    """transformers `ViTConfig` fields of ``model.encoder`` (timm's LayerNorm eps, 1e-6, not HF's 1e-12)."""
    kw = timm_vit_kwargs(model)
    return dict(
        model_type="vit", hidden_size=kw["embed_dim"], num_hidden_layers=kw["depth"],
        num_attention_heads=kw["num_heads"], intermediate_size=model.encoder.blocks[0].mlp.fc1.out_features,
        hidden_act="gelu", layer_norm_eps=1e-6, image_size=kw["img_size"], patch_size=kw["patch_size"],
        num_channels=kw["in_chans"], qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def hf_vitmae_config(model: MAE, mask_ratio: float) -> dict:
    """transformers `ViTMAEConfig` fields of ``model`` (encoder and decoder)."""
    block = model.decoder_blocks[0]
    return hf_vit_config(model) | dict(
        model_type="vit_mae", decoder_hidden_size=model.decoder_embed.out_features,
        decoder_num_hidden_layers=len(model.decoder_blocks), decoder_num_attention_heads=block.attn.num_heads,
        decoder_intermediate_size=block.mlp.fc1.out_features, mask_ratio=mask_ratio,
        norm_pix_loss=model.norm_pix_loss,
    )


def arch_from_hf_config(config: dict) -> dict:
    """What a transformers ViT / ViTMAE config says that weights do not: heads, MAE's target."""
    arch = dict(num_heads=config.get("num_attention_heads"))
    if config.get("model_type") == "vit_mae":
        arch |= dict(decoder_num_heads=config.get("decoder_num_attention_heads"),
                     norm_pix_loss=config.get("norm_pix_loss", False),
                     mask_ratio=config.get("mask_ratio", 0.75))
    return {k: v for k, v in arch.items() if v is not None}


def read_official_mae(path: Path) -> Foreign:
    """A checkpoint of the MAE reference code (``{"model": …, "args": …}``; encoder-only pretrain files
    too); its ``args`` give the model name's dims and heads, ``norm_pix_loss`` and ``mask_ratio``."""
    state, args = load_checkpoint(path)
    hints, origin = official_mae_args(args)
    return convert("mae", state, OFFICIAL_MAE, "MAE reference checkpoint", hints=hints,
                   origin=origin | {"normalization": f"{REFERENCE_NORM} (ImageNet)"}, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD, notes=unknown_name(args, OFFICIAL_MAE_MODELS))


BEIT_SIGNATURE = ("attn.q_bias", "relative_position_bias_table")  # key endings of a timm Beit, never a ViT


def is_timm_vit(keys: Collection[str]) -> bool:
    """Whether a timm state dict is a `VisionTransformer`'s: a patch embedding, and neither relative position
    tables nor separate query biases (`BEIT_SIGNATURE`, a `Beit`'s)."""
    return "patch_embed.proj.weight" in keys and not any(k.endswith(BEIT_SIGNATURE) for k in keys)


def timm_export(model: MAE) -> tuple[str, dict, dict]:
    """(timm model name, its kwargs, the encoder's state dict in timm's names) of an MAE's encoder."""
    kwargs = timm_vit_kwargs(model)
    named = next((n for n, a in ENCODER_ARCHS.items()
                  if (a["embed_dim"], a["depth"], a["num_heads"]) ==
                  (kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"])), "vit_base")
    name = f"{named}_patch16_224" if timm.is_model(f"{named}_patch16_224") else "vit_base_patch16_224"
    return name, kwargs, to_foreign(model.state_dict(), TIMM_VIT)[0]


def hf_export(model: MAE, config: PretrainConfig, encoder_only: bool) -> tuple[str, dict, dict]:
    """(transformers architecture, its config fields, its state dict): ``ViTMAEForPreTraining`` with the
    decoder (the run's mask ratio in its config), or ``ViTModel`` for the encoder alone."""
    if encoder_only:
        return "ViTModel", hf_vit_config(model), to_foreign(model.state_dict(), HF_VIT)[0]
    return ("ViTMAEForPreTraining", hf_vitmae_config(model, config.settings.mask_ratio),
            to_foreign(model.state_dict(), HF_VITMAE)[0])
