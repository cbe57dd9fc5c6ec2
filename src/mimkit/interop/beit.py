"""BEiT layouts: timm, the BEiT reference code, and Hugging Face transformers.

mimkit's BEiT is ``encoder.*`` (a timm `Beit`) plus ``mask_token`` and ``lm_head``, the reference code's
own names, so the reference layout and timm's are prefix changes; BEiT v2 adds the aggregation head's
blocks. The reference code also saves each attention's ``relative_position_index``, a buffer derived from
the grid; it is dropped on import. Exports hold the encoder (and for Hugging Face the mask token and
codebook head): BEiT v2's aggregation head serves pretraining only. The BEiT and BEiT v2 method records
(`mimkit.methods.beit`, `mimkit.methods.beitv2`) name the readers, architecture inference and export
functions here.

- BEiT: Bao et al., 2021, arXiv:2106.08254
- BEiT v2: Peng et al., 2022, arXiv:2208.06366
"""

from collections.abc import Collection
from pathlib import Path

from mimkit.config import PretrainConfig
from mimkit.errors import MimkitError
from mimkit.interop.foreign import HALF, IMAGENET_MEAN, IMAGENET_STD, REFERENCE_NORM, Foreign, convert
from mimkit.interop.keymaps import block_count, identity, nest, to_foreign
from mimkit.interop.mae import BEIT_SIGNATURE, HF_VIT_BLOCK
from mimkit.models.beit import BEiT, default_agg_layer
from mimkit.models.posembed import abs_grid, rel_grid
from mimkit.safe_load import load_checkpoint, load_tensors

BEIT_BLOCK_KEYS = (
    "gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias",
    "attn.relative_position_bias_table", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
)
TIMM_BEIT_KEYS = (
    "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
    "rel_pos_bias.relative_position_bias_table", *(f"blocks.{{i}}.{k}" for k in BEIT_BLOCK_KEYS),
    "norm.weight", "norm.bias",
)
BEIT_HEAD_KEYS = ("mask_token", "lm_head.weight", "lm_head.bias")
DERIVED = (r"relative_position_index$",)  # buffers rebuilt from the grid, never loaded

# A timm Beit state dict (num_classes=0, no fc_norm).
TIMM_BEIT = identity(TIMM_BEIT_KEYS, ours="encoder.")
# The BEiT reference code's pretraining `model` dict (VisionTransformerForMaskedImageModeling).
OFFICIAL_BEIT = TIMM_BEIT | identity(BEIT_HEAD_KEYS)
# The BEiT v2 reference code's (VisionTransformerForMaskedImageModelingCLS): BEiT's plus the [CLS]
# aggregation blocks, mimkit's `BEiTv2.agg_blocks`, and with ``--shared_lm_head False`` the head's own norm
# and codebook layer.
OFFICIAL_BEITV2 = (OFFICIAL_BEIT | nest(identity(BEIT_BLOCK_KEYS), "agg_blocks.{k}.", "cls_pt_layers.{k}.")
                   | {"agg_norm.weight": "cls_pt_norm.weight", "agg_norm.bias": "cls_pt_norm.bias",
                      "agg_head.weight": "cls_pt_lm_head.weight", "agg_head.bias": "cls_pt_lm_head.bias"})

_REL_TABLE = "relative_position_bias.relative_position_bias_table"
# timm Beit Block -> transformers BeitLayer: no key bias (timm keeps a zero buffer), layer scale "lambda".
HF_BEIT_BLOCK = {k: v for k, v in HF_VIT_BLOCK.items() if k != "attn.qkv.bias"} | {
    "gamma_1": "lambda_1",
    "gamma_2": "lambda_2",
    "attn.q_bias": "attention.attention.query.bias",
    "attn.v_bias": "attention.attention.value.bias",
    "attn.relative_position_bias_table": f"attention.attention.{_REL_TABLE}",
}
HF_BEIT_EMBED = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "rel_pos_bias.relative_position_bias_table": f"encoder.{_REL_TABLE}",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
# transformers BeitModel / BeitForMaskedImageModeling, "beit." removed.
HF_BEIT = (nest(HF_BEIT_EMBED, "encoder.") | nest(HF_BEIT_BLOCK, "encoder.blocks.{i}.", "encoder.layer.{i}.")
           | {"mask_token": "embeddings.mask_token", "lm_head.weight": "lm_head.weight",
              "lm_head.bias": "lm_head.bias"})

# Parts a checkpoint may lack as a whole (an encoder-only file); they keep a new BEiT's initialization.
BEIT_OPTIONAL_PARTS = {"mask token": ("mask_token",), "codebook head": ("lm_head.",)}
BEITV2_OPTIONAL_PARTS = BEIT_OPTIONAL_PARTS | {"aggregation head": ("agg_blocks.", "agg_norm.", "agg_head.")}
_SHARED_TABLE = "encoder.rel_pos_bias.relative_position_bias_table"
_BLOCK_TABLE = "encoder.blocks.0.attn.relative_position_bias_table"


def beit_arch(state: dict) -> dict:
    """`BEiT` constructor arguments read off a mimkit-layout BEiT state dict.

    The grid comes from the relative position tables (or an absolute table), the heads from the tables'
    width, the vocabulary from ``lm_head`` when present; layer scale is on iff the blocks have ``gamma_1``.
    """
    if "encoder.patch_embed.proj.weight" not in state:
        raise MimkitError("cannot infer the architecture: the checkpoint has no patch embedding")
    proj = state["encoder.patch_embed.proj.weight"]  # [D, C, p, p]
    embed_dim, patch_size = proj.shape[0], proj.shape[-1]
    table = state.get(_SHARED_TABLE, state.get(_BLOCK_TABLE))
    if table is None:
        raise MimkitError("cannot infer the BEiT grid and heads: the checkpoint has no relative position "
                          "table")
    grid = abs_grid(state["encoder.pos_embed"]) if "encoder.pos_embed" in state else rel_grid(table)
    arch = dict(img_size=grid * patch_size, patch_size=patch_size, in_chans=proj.shape[1],
                embed_dim=embed_dim, depth=block_count(state, "encoder.blocks."), num_heads=table.shape[1],
                mlp_ratio=state["encoder.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
                shared_rel_pos_bias=_SHARED_TABLE in state)
    if "encoder.blocks.0.gamma_1" not in state:
        arch["layer_scale_init"] = 0.0  # timm builds no layer scale for a falsy init value
    if "lm_head.weight" in state:
        arch["vocab_size"] = state["lm_head.weight"].shape[0]
    return arch


def beitv2_arch(state: dict) -> dict:
    """`BEiTv2` constructor arguments: `beit_arch`'s, and with an aggregation head its depth and whether it
    shares the encoder's norm and codebook layer (no ``agg_head``). The block the head reads (``agg_layer``)
    does not show in the weights (`official_beitv2_args`, `beitv2_defaults`)."""
    arch = beit_arch(state)
    agg_depth = block_count(state, "agg_blocks.")
    if agg_depth:
        arch |= {"agg_depth": agg_depth, "shared_lm_head": "agg_head.weight" not in state}
    return arch


# The BEiT v2 reference script's arguments -> `BEiTv2`'s.
OFFICIAL_BEITV2_ARGS = {"early_layers": "agg_layer", "head_layers": "agg_depth",
                        "shared_lm_head": "shared_lm_head"}


def official_beitv2_args(args: dict) -> tuple[dict, dict[str, str]]:
    """What a BEiT v2 reference checkpoint's training arguments fix: the aggregation head's input block
    (``args.early_layers``), depth (``head_layers``) and sharing (``shared_lm_head``).

    Returns:
        ``{field: value}`` and ``{field: origin}``.
    """
    fields = {ours: args[theirs] for theirs, ours in OFFICIAL_BEITV2_ARGS.items() if theirs in args}
    origin = {ours: f"args.{theirs}" for theirs, ours in OFFICIAL_BEITV2_ARGS.items() if theirs in args}
    return fields, origin


def beitv2_defaults(arch: dict) -> dict[str, tuple[int, str]]:
    """The aggregation head's input block when nothing says it, with its origin: `BEiTv2`'s default."""
    return {"agg_layer": (default_agg_layer(arch["depth"]),
                          "default: the last quarter skipped (the reference script's 9 of 12)")}


def timm_beit_kwargs(model: BEiT) -> dict:
    """`timm.models.beit.Beit` arguments that rebuild ``model.encoder``."""
    return dict(model.encoder_kwargs)


def hf_beit_fields(encoder_kwargs: dict, mask_token: bool, mean_pooling: bool) -> dict:
    """transformers `BeitConfig` fields of a timm `Beit` built from ``encoder_kwargs`` (timm's LayerNorm eps,
    1e-6; no dropout): BEiT's, SimMIM's and CAE's encoders are all such a `Beit`.

    Args:
        encoder_kwargs: the `Beit` arguments (position embeddings, relative position biases, layer scale).
        mask_token: the model has ``embeddings.mask_token`` (``BeitModel(pixel_values, bool_masked_pos)``).
        mean_pooling: the final LayerNorm follows a mean pooling (``pooler.layernorm``); without it, the
            base model's own ``layernorm`` is the final norm.
    """
    kw = encoder_kwargs
    return dict(model_type="beit", hidden_size=kw["embed_dim"], num_hidden_layers=kw["depth"],
                num_attention_heads=kw["num_heads"],
                intermediate_size=round(kw["embed_dim"] * kw["mlp_ratio"]), hidden_act="gelu",
                layer_norm_eps=1e-6, image_size=kw["img_size"], patch_size=kw["patch_size"],
                num_channels=kw["in_chans"], use_mask_token=mask_token,
                use_absolute_position_embeddings=kw["use_abs_pos_emb"],
                use_relative_position_bias=kw["use_rel_pos_bias"],
                use_shared_relative_position_bias=kw["use_shared_rel_pos_bias"],
                layer_scale_init_value=kw["init_values"] or 0.0, drop_path_rate=kw["drop_path_rate"],
                use_mean_pooling=mean_pooling, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_beit_config(model: BEiT, head: bool) -> dict:
    """transformers `BeitConfig` fields of ``model``.

    Args:
        model: the BEiT.
        head: for `BeitForMaskedImageModeling` (mask token, codebook head) rather than `BeitModel`. The
            final LayerNorm is the head model's own ``layernorm``, which needs ``use_mean_pooling`` (else
            its base model would add a second one); the base model's is ``layernorm`` without it.
    """
    return hf_beit_fields(model.encoder_kwargs, mask_token=head, mean_pooling=head) | dict(
        vocab_size=model.lm_head.out_features)


def read_official_beit(path: Path) -> Foreign:
    """A pretraining checkpoint of the BEiT reference code (mask token, codebook head included)."""
    return convert("beit", load_tensors(path), OFFICIAL_BEIT, "BEiT reference checkpoint", DERIVED,
                   origin={"normalization": f"{REFERENCE_NORM} ([-1, 1])"}, mean=HALF, std=HALF)


def read_official_beitv2(path: Path) -> Foreign:
    """A pretraining checkpoint of the BEiT v2 reference code (with the [CLS] aggregation blocks, and their
    own norm and codebook layer when it ran with ``--shared_lm_head False``); its ``args`` give the block
    the head reads (``early_layers``)."""
    state, args = load_checkpoint(path)
    hints, origin = official_beitv2_args(args)
    return convert("beitv2", state, OFFICIAL_BEITV2, "BEiT v2 reference checkpoint", DERIVED, hints=hints,
                   origin=origin | {"normalization": f"{REFERENCE_NORM} (ImageNet)"}, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD)


def is_timm_beit(keys: Collection[str]) -> bool:
    """Whether a timm state dict is a `Beit`'s: relative position tables or separate query biases."""
    return any(k.endswith(BEIT_SIGNATURE) for k in keys)


def timm_export(model: BEiT) -> tuple[str, dict, dict]:
    """(timm model name, its kwargs, the encoder's state dict in timm's names) of a BEiT's encoder (BEiT
    v2's too: its aggregation head serves pretraining only)."""
    return "beit_base_patch16_224", timm_beit_kwargs(model), to_foreign(model.state_dict(), TIMM_BEIT)[0]


def hf_export(model: BEiT, config: PretrainConfig, encoder_only: bool) -> tuple[str, dict, dict]:
    """(transformers architecture, its config fields, its state dict): ``BeitForMaskedImageModeling`` (mask
    token, codebook head) or ``BeitModel`` for the encoder alone; ``config`` is not needed."""
    if encoder_only:
        encoder = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
        return "BeitModel", hf_beit_config(model, head=False), to_foreign(encoder, HF_BEIT)[0]
    return ("BeitForMaskedImageModeling", hf_beit_config(model, head=True),
            to_foreign(model.state_dict(), HF_BEIT)[0])
