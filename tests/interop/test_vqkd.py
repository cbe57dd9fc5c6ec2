"""BEiT v2's reference VQ-KD tokenizer checkpoints: the published key names, the same codes and decoded
features. The reference ViT is timm's `Beit` with absolute positions and average pooling (timm's port of
the same code), so the reference computation runs on real modules."""

import pytest
import torch
import torch.nn.functional as F
from timm.models.beit import Beit, Block
from torch import nn

from mimkit.cli import main
from mimkit.interop.importer import load_foreign, read_checkpoint
from mimkit.interop.vqkd import read_official_vqkd, vqkd_arch
from mimkit.runs import load_config
from mimkit.tokenizers.vqkd import VQKD
from mimkit.train.checkpoint_files import Checkpoints

BLOCK = ("norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight", "attn.proj.weight",
         "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
         "mlp.fc2.bias")
VIT = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "fc_norm.weight",
       "fc_norm.bias")
# modeling_vqkd.VQKD with a 2-block encoder, a 1-block decoder and its CLIP teacher's leftovers.
OFFICIAL_KEYS = {
    *(f"encoder.{k}" for k in VIT), *(f"encoder.blocks.{i}.{k}" for i in range(2) for k in BLOCK),
    *(f"decoder.{k}" for k in VIT), *(f"decoder.blocks.0.{k}" for k in BLOCK),
    *(f"{m}.{n}.{p}" for m in ("encode_task_layer", "decode_task_layer") for n in (0, 2)
      for p in ("weight", "bias")),
    "quantize.embedding.weight", "quantize.embedding.cluster_size", "quantize.embedding.embed_avg",
    "quantize.embedding.initted", "quantize.cluster_size", "scaling_layer.shift", "scaling_layer.scale",
    "teacher_model.visual.proj",
}


def reference_vit(img_size, patch_size, in_chans, depth):
    vit = Beit(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=32, depth=depth,
               num_heads=2, num_classes=0, use_abs_pos_emb=True, use_rel_pos_bias=False, init_values=None,
               global_pool="avg")
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return vit.eval()


def patch_tokens(vit, x):
    """The reference's ``return_patch_tokens``: fc_norm over the patch tokens of the last block."""
    return vit.fc_norm(vit.forward_features(x)[:, 1:])


def reference_tokenizer(path):
    """A VQ-KD checkpoint as the reference code saves it (32 px, 8 px patches, 16 codes of 8 dims)."""
    torch.manual_seed(0)
    encoder, decoder = reference_vit(32, 8, 3, 2), reference_vit(4, 1, 8, 1)
    encode = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))
    decode = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 12))
    codebook = F.normalize(torch.randn(16, 8), dim=-1)
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state |= {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    state |= {f"encode_task_layer.{k}": v for k, v in encode.state_dict().items()}
    state |= {f"decode_task_layer.{k}": v for k, v in decode.state_dict().items()}
    state |= {"quantize.embedding.weight": codebook, "quantize.embedding.cluster_size": torch.rand(16),
              "quantize.embedding.embed_avg": codebook.clone(), "quantize.embedding.initted": torch.ones(1),
              "quantize.cluster_size": torch.rand(16), "scaling_layer.shift": torch.zeros(1, 3, 1, 1),
              "scaling_layer.scale": torch.ones(1, 3, 1, 1), "teacher_model.visual.proj": torch.randn(32, 12)}
    assert set(state) == OFFICIAL_KEYS
    torch.save({"model": state}, path)
    return encoder, decoder, encode, decode, codebook


def test_reference_tokenizer_gives_the_same_codes_and_features(tmp_path):
    encoder, decoder, encode, decode, codebook = reference_tokenizer(tmp_path / "vqkd.pth")
    foreign = read_checkpoint(tmp_path / "vqkd.pth", "vqkd")
    assert foreign.notes == ["dropped the reference's frozen teacher (3 tensors) and EMA statistics"]
    model = VQKD(**(vqkd_arch(foreign.state) | {"num_heads": 2})).eval()  # heads do not show in weights
    assert load_foreign(model, foreign) == ["dead-code counters: not in the checkpoint; freshly initialized"]
    assert bool(model.quantize.initialized)

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        z = F.normalize(encode(patch_tokens(encoder, x)), dim=-1)  # [B, L, d]
        ids = (z @ codebook.T).argmax(-1)  # nearest unit code
        grid = codebook[ids].transpose(1, 2).reshape(2, 8, 4, 4)
        features = decode(patch_tokens(decoder, grid))
        assert torch.equal(model.tokenize(x).flatten(1), ids)
        torch.testing.assert_close(model.forward_decoder(codebook[ids]), features, rtol=0, atol=0)


def test_imported_tokenizer_drives_beitv2_pretraining_of_an_imported_beitv2(tmp_path):
    """Both reference checkpoints become runs; BEiT v2 pretraining continues with the imported tokenizer."""
    reference_tokenizer(tmp_path / "vqkd.pth")
    torch.manual_seed(0)
    beit = Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1, global_pool="token")
    state = beit.state_dict() | {"mask_token": torch.randn(1, 1, 32), "lm_head.weight": torch.randn(16, 32),
                                 "lm_head.bias": torch.randn(16)}
    for k in range(2):
        block = Block(32, 2, qkv_bias=True, init_values=0.1, window_size=(4, 4))
        state |= {f"cls_pt_layers.{k}.{n}": v for n, v in block.state_dict().items()}
    torch.save({"model": state}, tmp_path / "beitv2.pth")
    data = ["--set", "data.source=synthetic:64", "--set", "data.num_workers=0"]
    assert main(["import", str(tmp_path / "vqkd.pth"), "--format", "vqkd", "--out", str(tmp_path / "vqkd"),
                 "--set", "model.kwargs.num_heads=2", *data]) == 0
    assert main(["import", str(tmp_path / "beitv2.pth"), "--format", "beitv2", "--out", str(tmp_path / "v2"),
                 *data]) == 0
    assert load_config(tmp_path / "vqkd").settings.teacher_dim == 12
    assert main(["pretrain", "beitv2", "--out", str(tmp_path / "v2"), "--tokenizer", str(tmp_path / "vqkd"),
                 "--max-steps", "1", "--batch-size", "8"]) == 0
    assert Checkpoints(tmp_path / "v2").latest() == 1


@pytest.mark.parametrize("key", ["teacher_model.visual.proj", "scaling_layer.shift", "loss.weight",
                                 "quantize.cluster_size", "quantize.embedding.embed_avg"])
def test_the_references_teacher_loss_and_ema_statistics_are_dropped_unread(tmp_path, key):
    """Each part of a reference tokenizer that is no part of mimkit's is dropped, none reported unexpected."""
    state = {"quantize.embedding.weight": torch.randn(4, 2), key: torch.ones(1)}
    torch.save({"model": state}, tmp_path / "v.pth")
    foreign = read_official_vqkd(tmp_path / "v.pth")
    assert foreign.unexpected == [] and set(foreign.state) == {"quantize.codebook", "quantize.initialized"}
