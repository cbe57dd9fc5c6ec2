"""A BEiT segmentation model (`mimkit.models.segmentation.Segmenter`) as transformers'
`BeitForSemanticSegmentation` folder.

The heads already carry transformers' names (``fpn``, ``decode_head``, ``auxiliary_head``); the encoder
is renamed as BEiT's (`mimkit.interop.beit.HF_BEIT`). The encoder has no final norm (the pyramid reads
raw block outputs), so the config sets ``use_mean_pooling`` and transformers builds none either.

transformers picks its 4 feature maps as ``hidden_states[i - 1]`` for each ``i`` of ``out_indices``, where
``hidden_states[0]`` is the embedding output: ``i`` reads 0-based block ``i - 2``. The papers' last
feature block (11 of 12) would need ``i = 13``, past what its config accepts, so only models whose blocks
all stop short of the last two export (e.g. ``--set seg.blocks=[2,4,6,9]`` on 12 blocks). Its UperNet is as
wide as the encoder (``seg.channels`` null, the papers' setting).
"""

from pathlib import Path

from torch import nn

from mimkit.errors import MimkitError
from mimkit.interop.beit import HF_BEIT
from mimkit.interop.hf import image_processor_config, write_hf_folder
from mimkit.interop.keymaps import to_foreign
from mimkit.models.segmentation import POOL_SCALES, Segmenter

ARCHITECTURE = "BeitForSemanticSegmentation"


def hf_out_indices(blocks: list[int], depth: int) -> list[int]:
    """transformers' ``out_indices`` that read the 0-based ``blocks`` (see the module's note)."""
    indices = [b + 2 for b in blocks]
    if max(indices) > depth:
        raise MimkitError(f"transformers' BeitForSemanticSegmentation reads block i-2 for out_index i, up to "
                          f"block {depth - 2} of {depth}; this model reads blocks {blocks}. Train with "
                          f"--set seg.blocks=[...] below {depth - 1} to export it")
    return indices


def hf_segmentation_config(model: Segmenter, img_size: int, classes: list[str], aux_weight: float) -> dict:
    """transformers `BeitConfig` fields of a BEiT `Segmenter` with the UperNet head, its classes named
    (``id2label``, ``label2id``) and its auxiliary loss weighted as it was trained (``seg.aux_weight``)."""
    enc = model.encoder
    if not hasattr(enc, "rel_pos_bias") or model.auxiliary_head is None:
        raise MimkitError("only a BEiT encoder with the UperNet head exports to BeitForSemanticSegmentation")
    width = model.decode_head.classifier.in_channels
    if width != enc.embed_dim:
        raise MimkitError(f"transformers' UperNet is as wide as the encoder ({enc.embed_dim}); this one is "
                          f"{width}: train with --set seg.channels=null to export it")
    block = enc.blocks[0]
    layer_scale = getattr(block, "gamma_1", None)
    return dict(
        model_type="beit", hidden_size=enc.embed_dim, num_hidden_layers=len(enc.blocks),
        num_attention_heads=block.attn.num_heads, intermediate_size=block.mlp.fc1.out_features,
        hidden_act="gelu", layer_norm_eps=1e-6, image_size=img_size, patch_size=enc.patch_embed.patch_size[0],
        num_channels=enc.patch_embed.proj.in_channels, use_mask_token=False,
        use_absolute_position_embeddings=enc.pos_embed is not None,
        use_relative_position_bias=block.attn.relative_position_bias_table is not None,
        use_shared_relative_position_bias=enc.rel_pos_bias is not None,
        layer_scale_init_value=0.1 if layer_scale is not None else 0.0, drop_path_rate=0.0,
        use_mean_pooling=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        out_indices=hf_out_indices(model.blocks, len(enc.blocks)), pool_scales=list(POOL_SCALES),
        use_auxiliary_head=True, auxiliary_loss_weight=aux_weight,
        auxiliary_channels=model.auxiliary_head.classifier.in_channels,
        auxiliary_num_convs=len(model.auxiliary_head.convs), auxiliary_concat_input=False,
        semantic_loss_ignore_index=255, num_labels=model.decode_head.classifier.out_channels,
        id2label={str(i): name for i, name in enumerate(classes)},
        label2id={name: i for i, name in enumerate(classes)},
    )


def hf_segmentation_state(model: nn.Module) -> dict:
    """The state dict in transformers' saved names (no base prefix): encoder renamed, heads as they are."""
    state = model.state_dict()
    encoder = {k: v for k, v in state.items() if k.startswith("encoder.")}
    renamed, unnamed = to_foreign(encoder, HF_BEIT)
    if unnamed:
        raise MimkitError(f"no transformers name for {', '.join(unnamed[:3])}")
    return renamed | {k: v for k, v in state.items() if not k.startswith("encoder.")}


def export_segmenter(model: Segmenter, img_size: int, mean: list[float], std: list[float], classes: list[str],
                     aux_weight: float, out: str | Path) -> list[Path]:
    """Write a ``BeitForSemanticSegmentation.from_pretrained`` folder; returns the files written."""
    return write_hf_folder(out, ARCHITECTURE, hf_segmentation_config(model, img_size, classes, aux_weight),
                           hf_segmentation_state(model), image_processor_config(img_size, mean, std))
