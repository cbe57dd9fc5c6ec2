"""VQ-KD layouts: the BEiT v2 reference code's tokenizer checkpoints.

The reference VQ-KD is two BEiT-style ViTs (encoder on image patches, decoder on the code grid), the
projections into and out of the code space (``encode_task_layer``, ``decode_task_layer``, the same names
in mimkit) and an EMA codebook. Its ViTs differ from timm's in three names: the query and value biases are
separate (``attn.q_bias``, ``attn.v_bias``; there is no key bias, which timm's fused ``attn.qkv.bias`` holds
as zeros) and the final LayerNorm is ``fc_norm`` (the reference applies it to the patch tokens, as timm's
``norm``). The codebook is ``quantize.embedding.weight``; the reference's EMA statistics, its frozen
teacher (``teacher_model``, ``scaling_layer``) and its loss modules are not part of a mimkit tokenizer and
are dropped on import. The VQ-KD method record (`mimkit.methods.vqkd`) names the reader and architecture
inference here.

- BEiT v2: Peng et al., 2022, arXiv:2208.06366
"""

from pathlib import Path

import torch

from mimkit.errors import MimkitError
from mimkit.interop.foreign import HALF, REFERENCE_NORM, Foreign, convert, unknown_name
from mimkit.interop.keymaps import block_count, identity, nest
from mimkit.interop.mae import VIT_BLOCK_KEYS, encoder_heads, model_name_fields
from mimkit.safe_load import load_checkpoint

# A timm ViT (mimkit's VQ-KD encoder and decoder) -> the reference code's ViT with use_mean_pooling.
REFERENCE_VIT = {
    "cls_token": "cls_token",
    "pos_embed": "pos_embed",
    "patch_embed.proj.weight": "patch_embed.proj.weight",
    "patch_embed.proj.bias": "patch_embed.proj.bias",
    "norm.weight": "fc_norm.weight",
    "norm.bias": "fc_norm.bias",
} | nest({k: k for k in VIT_BLOCK_KEYS if k != "attn.qkv.bias"}
         | {"attn.qkv.bias": ("attn.q_bias", None, "attn.v_bias")}, "blocks.{i}.", "blocks.{i}.")
TASK_LAYER_KEYS = tuple(f"{layer}.{n}.{p}" for layer in ("encode_task_layer", "decode_task_layer")
                        for n in (0, 2) for p in ("weight", "bias"))
OFFICIAL_VQKD = (nest(REFERENCE_VIT, "encoder.", "encoder.") | nest(REFERENCE_VIT, "decoder.", "decoder.")
                 | identity(TASK_LAYER_KEYS) | {"quantize.codebook": "quantize.embedding.weight"})
VQKD_DROPPED = (
    r"^teacher_model\.", r"^scaling_layer\.", r"^loss\.",  # the teacher and loss: not the tokenizer
    r"^quantize\.cluster_size$", r"^quantize\.embedding\.(cluster_size|embed_avg|initted)$",  # EMA state
)
# A codebook trained elsewhere needs no k-means start; dead-code counters begin at zero.
VQKD_OPTIONAL_PARTS = {"dead-code counters": ("quantize.unused_steps",)}


# The BEiT v2 reference code's released tokenizer names (modeling_vqkd.py): a ViT-B encoder and a
# decoder of N blocks, 768 wide, 12 heads.
OFFICIAL_VQKD_MODELS = {
    f"vqkd_encoder_base_decoder_{n}x768x12_{teacher}": dict(patch_size=16, embed_dim=768, depth=12,
                                                            num_heads=12, decoder_depth=n)
    for n, teacher in ((1, "clip"), (3, "clip"), (1, "dino"))
}


def official_vqkd_args(args: dict) -> tuple[dict, dict[str, str]]:
    """What a VQ-KD reference checkpoint's ``args.model`` fixes (`OFFICIAL_VQKD_MODELS`), with its origin."""
    return model_name_fields(args.get("model"), OFFICIAL_VQKD_MODELS)


def vqkd_arch(state: dict) -> dict:
    """`VQKD` constructor arguments read off a mimkit-layout VQ-KD state dict (heads do not show:
    `vqkd_head_guesses`)."""
    for key in ("encoder.patch_embed.proj.weight", "encoder.pos_embed", "quantize.codebook",
                "decode_task_layer.2.weight"):
        if key not in state:
            raise MimkitError(f"cannot infer the VQ-KD architecture: the checkpoint has no {key!r}")
    proj = state["encoder.patch_embed.proj.weight"]  # [D, C, p, p]
    embed_dim, patch_size = proj.shape[0], proj.shape[-1]
    grid = round((state["encoder.pos_embed"].shape[1] - 1) ** 0.5)
    vocab_size, code_dim = state["quantize.codebook"].shape
    return dict(img_size=grid * patch_size, patch_size=patch_size, in_chans=proj.shape[1],
                teacher_dim=state["decode_task_layer.2.weight"].shape[0], vocab_size=vocab_size,
                code_dim=code_dim, embed_dim=embed_dim, depth=block_count(state, "encoder.blocks."),
                decoder_depth=block_count(state, "decoder.blocks."))


def vqkd_head_guesses(arch: dict) -> dict[str, tuple[int | None, str]]:
    """A guess, with its origin, at the heads of the encoder and decoder (`encoder_heads`, MLP ratio 4)."""
    return {"num_heads": encoder_heads(arch["embed_dim"], arch["depth"], 4.0)}


def read_official_vqkd(path: Path) -> Foreign:
    """A tokenizer checkpoint of the BEiT v2 reference code (VQ-KD: encoder, codebook, decoder). It saw
    images scaled to [-1, 1]."""
    raw, args = load_checkpoint(path)
    hints, origin = official_vqkd_args(args)
    foreign = convert("vqkd", raw, OFFICIAL_VQKD, "VQ-KD reference checkpoint", VQKD_DROPPED, hints=hints,
                      origin=origin | {"normalization": f"{REFERENCE_NORM} ([-1, 1])"}, mean=HALF, std=HALF,
                      notes=unknown_name(args, OFFICIAL_VQKD_MODELS))
    if "quantize.codebook" in foreign.state:
        foreign.state["quantize.initialized"] = torch.tensor(True)  # trained: no k-means start
    teacher = sum(k.startswith(("teacher_model.", "scaling_layer.")) for k in raw)
    if teacher:
        foreign.notes.append(f"dropped the reference's frozen teacher ({teacher} tensors) and EMA statistics")
    return foreign
