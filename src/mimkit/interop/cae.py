"""CAE layouts: the authors' checkpoints (``Atten4Vis/CAE``), timm and Hugging Face transformers.

mimkit's CAE is ``encoder.*`` (a timm `Beit` with an absolute position table), whose names are the
authors' encoder's, plus the regressor, decoder and mask token under names of its own. A checkpoint of the
authors' ``tools/run_pretraining.py`` is ``{"model": ..., "args": ...}``: the model holds a second copy of the
encoder (``alignment_encoder.*``, whose parameters the authors make the encoder's own tensors every step,
so it saves the encoder's values again) and the regressor's sin-cos table (``rd_pos_embed``), both derived
and not read. The weights show the widths and depths; the ``args`` give what they do not (heads through
the model name and ``--decoder_num_heads``, the masking, the alignment weight); without ``args`` the heads
are guessed and reported as such. Exports hold the encoder: to timm a `Beit`, to transformers a
``BeitModel`` with absolute position embeddings.

- CAE: Chen et al., 2022, arXiv:2202.03026
"""

from pathlib import Path

from mimkit.config import PretrainConfig
from mimkit.errors import MimkitError
from mimkit.interop.beit import BEIT_BLOCK_KEYS, DERIVED, HF_BEIT, TIMM_BEIT, hf_beit_fields
from mimkit.interop.foreign import IMAGENET_MEAN, IMAGENET_STD, REFERENCE_NORM, Foreign, convert, unknown_name
from mimkit.interop.keymaps import block_count, identity, nest, to_foreign
from mimkit.interop.mae import encoder_heads, guess_heads, model_name_fields, vit_arch
from mimkit.models.cae import CAE
from mimkit.safe_load import load_checkpoint

_LN = ("weight", "bias")
REGRESSOR_BLOCK_KEYS = (
    *(f"{n}.{p}" for n in ("norm1_q", "norm1_k", "norm1_v", "norm2_cross") for p in _LN),
    "cross_attn.q.weight", "cross_attn.k.weight", "cross_attn.v.weight", "cross_attn.q_bias",
    "cross_attn.v_bias", "cross_attn.proj.weight", "cross_attn.proj.bias", "mlp_cross.fc1.weight",
    "mlp_cross.fc1.bias", "mlp_cross.fc2.weight", "mlp_cross.fc2.bias", "gamma_1_cross", "gamma_2_cross",
)
_DECODER_BLOCK_KEYS = tuple(k for k in BEIT_BLOCK_KEYS if "relative_position" not in k)

# The authors' pretraining `model` dict (ContextAutoencoderViT), mimkit -> theirs.
OFFICIAL_CAE = (
    nest(TIMM_BEIT, theirs="encoder.")  # the authors' encoder has timm Beit's names
    | {"mask_token": "mask_token", "to_latent.0.weight": "encoder_to_regresser.weight",
       "to_latent.0.bias": "encoder_to_regresser.bias",
       "to_latent.1.weight": "encoder_to_regresser_norm.weight",
       "to_latent.1.bias": "encoder_to_regresser_norm.bias", "regressor_norm.weight": "regresser.norm.weight",
       "regressor_norm.bias": "regresser.norm.bias", "decoder_norm.weight": "decoder.norm.weight",
       "decoder_norm.bias": "decoder.norm.bias", "lm_head.weight": "decoder.head.weight",
       "lm_head.bias": "decoder.head.bias"}
    | nest(identity(REGRESSOR_BLOCK_KEYS), "regressor_blocks.{r}.", "regresser.regressor_blocks.{r}.")
    | nest(identity(_DECODER_BLOCK_KEYS), "decoder_blocks.{d}.", "decoder.decoder_blocks.{d}.")
)
# Derived in the authors' checkpoints: the alignment copy of the encoder and the regressor's sin-cos table.
OFFICIAL_DERIVED = (*DERIVED, r"^alignment_encoder\.", r"^rd_pos_embed$")
# Parts an encoder-only file lacks as a whole; they keep a fresh CAE's initialization.
CAE_OPTIONAL_PARTS = {"mask token": ("mask_token",), "latent projection": ("to_latent.",),
                      "regressor": ("regressor_",), "decoder": ("decoder_", "lm_head.")}

# The authors' model names (models/modeling_cae.py) and the encoder heads each fixes.
OFFICIAL_CAE_MODELS = {
    f"cae_{size}_patch16_224_8k_vocab": dict(patch_size=16, embed_dim=width, depth=depth, num_heads=heads)
    for size, width, depth, heads in (("tiny", 192, 12, 12), ("small", 384, 12, 12), ("base", 768, 12, 12),
                                      ("large", 1024, 24, 16))
}
# The authors' training arguments -> mimkit's fields (an architecture field or a cae setting).
OFFICIAL_CAE_ARGS = {"decoder_num_heads": "decoder_num_heads", "layer_scale_init_value": "layer_scale_init",
                     "decoder_layer_scale_init_value": "decoder_layer_scale_init",
                     "drop_path": "drop_path_rate", "align_loss_weight": "align_weight"}
REFERENCE_DECODER_HEADS = 12  # tools/run_pretraining.py's --decoder_num_heads default


def cae_arch(state: dict) -> dict:
    """`CAE` constructor arguments read off a mimkit-layout CAE state dict: the encoder's (`vit_arch`:
    size, patch, channels, width, depth, MLP ratio), whether it has layer scale, and with a regressor its
    width and depth, the decoder's depth and the codebook size. Heads do not show (`cae_guesses`)."""
    arch = vit_arch(state)
    if "encoder.blocks.0.gamma_1" not in state:
        arch["layer_scale_init"] = 0.0
    if "regressor_norm.weight" in state:
        arch |= dict(decoder_embed_dim=state["regressor_norm.weight"].shape[0],
                     regressor_depth=block_count(state, "regressor_blocks."),
                     decoder_depth=block_count(state, "decoder_blocks."))
    if "lm_head.weight" in state:
        arch["vocab_size"] = state["lm_head.weight"].shape[0]
    return arch


def official_cae_args(args: dict, grid: int) -> tuple[dict, dict[str, str]]:
    """What an authors' checkpoint's ``args`` fix that the weights do not: the heads of a released model
    name, ``--decoder_num_heads``, the layer scales' start, stochastic depth, the alignment weight and the
    mask ratio (``num_mask_patches`` of the ``grid x grid`` patches); a CAE v2 checkpoint is refused.

    Returns:
        ``{field: value}`` and ``{field: origin}``.
    """
    if args.get("model_type", "cae") != "cae":
        raise MimkitError(f"a {args['model_type']} checkpoint (args.model_type): mimkit's cae reads CAE "
                          "(v1) checkpoints")
    fields, origin = model_name_fields(args.get("model"), OFFICIAL_CAE_MODELS)
    for theirs, ours in OFFICIAL_CAE_ARGS.items():
        if theirs in args:
            fields[ours], origin[ours] = args[theirs], f"args.{theirs}"
    if "num_mask_patches" in args:
        fields["mask_ratio"] = args["num_mask_patches"] / grid**2
        origin["mask_ratio"] = f"args.num_mask_patches ({args['num_mask_patches']} of {grid}x{grid})"
    return fields, origin


def cae_guesses(arch: dict) -> dict[str, tuple[int | None, str]]:
    """The heads nothing read decides, with how each was decided: the encoder's (`encoder_heads`), and
    the regressor's and decoder's (the authors' default, 12, where it divides their width)."""
    guesses = {"num_heads": encoder_heads(arch["embed_dim"], arch["depth"], arch["mlp_ratio"])}
    if "decoder_embed_dim" in arch:
        width = arch["decoder_embed_dim"]
        heads = REFERENCE_DECODER_HEADS if width % REFERENCE_DECODER_HEADS == 0 else None
        guesses["decoder_num_heads"] = ((heads, "default: the authors' --decoder_num_heads") if heads
                                        else guess_heads(width, 64))
    return guesses


def read_official_cae(path: Path) -> Foreign:
    """A pretraining checkpoint of the authors' code (``{"model", "args", ...}``, or a bare state dict);
    its ``args`` give the heads and the settings the weights do not show."""
    state, args = load_checkpoint(path)
    pos = state.get("encoder.pos_embed")
    grid = round((pos.shape[1] - 1) ** 0.5) if pos is not None else 14
    hints, origin = official_cae_args(args, grid)
    notes = unknown_name(args, OFFICIAL_CAE_MODELS)
    if any(k.startswith("alignment_encoder.") for k in state):
        notes.append("alignment_encoder.*: the encoder's own weights in the authors' code, not read")
    norm = f"{REFERENCE_NORM} (ImageNet)"
    return convert("cae", state, OFFICIAL_CAE, "CAE reference checkpoint", OFFICIAL_DERIVED, hints=hints,
                   origin=origin | {"normalization": norm}, mean=IMAGENET_MEAN, std=IMAGENET_STD, notes=notes)


def hf_export(model: CAE, config: PretrainConfig, encoder_only: bool) -> tuple[str, dict, dict]:
    """(transformers architecture, its config fields, its state dict): the encoder as a ``BeitModel`` with
    absolute position embeddings (transformers has no CAE; the regressor and decoder serve pretraining
    only, so ``encoder_only`` changes nothing)."""
    fields = hf_beit_fields(model.encoder_kwargs, mask_token=False, mean_pooling=False)
    encoder = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    return "BeitModel", fields, to_foreign(encoder, HF_BEIT)[0]

