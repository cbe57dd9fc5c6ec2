"""BEiT interop against the real libraries: transformers BEiT, timm Beit, and the BEiT reference code's
published key names; BEiT's relative position tables at another grid."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.beit import Beit, Block
from transformers import BeitConfig, BeitForMaskedImageModeling, BeitModel
from transformers.models.beit.modeling_beit import BeitRelativePositionBias

from mimkit.config import DataConfig, PretrainConfig
from mimkit.errors import MimkitError
from mimkit.interop.beit import beit_arch, beitv2_arch
from mimkit.interop.export import export_model
from mimkit.interop.hf import strip_base
from mimkit.interop.importer import load_foreign, read_checkpoint
from mimkit.models.beit import BEiT, BEiTv2
from tests.conftest import perturb

TINY = dict(img_size=32, patch_size=8, in_chans=3, vocab_size=24, embed_dim=32, depth=2, num_heads=2,
            drop_path_rate=0.0)
CONFIG = PretrainConfig(method="beit",
                        data=DataConfig(img_size=32, channels=3, mean=[0.5] * 3, std=[0.5] * 3))

# The BEiT reference code's pretraining `model` dict (modeling_pretrain.py), shared relative position bias.
BLOCK = ("gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight",
         "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
         "mlp.fc2.weight", "mlp.fc2.bias")
OFFICIAL_KEYS = {
    "cls_token", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
    "rel_pos_bias.relative_position_bias_table", "rel_pos_bias.relative_position_index",
    "norm.weight", "norm.bias", "lm_head.weight", "lm_head.bias",
    *(f"blocks.{i}.{n}" for i in range(2) for n in BLOCK),
}
# BEiT v2's (beit2/modeling_pretrain.py, `_cls_pt` models): a table per block, and the aggregation blocks.
PER_BLOCK = (*BLOCK, "attn.relative_position_bias_table", "attn.relative_position_index")
OFFICIAL_V2_KEYS = {
    "cls_token", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
    "lm_head.weight", "lm_head.bias", *(f"{blocks}.{i}.{n}" for blocks in ("blocks", "cls_pt_layers")
                                        for i in range(2) for n in PER_BLOCK),
}


def tiny_beit(shared: bool = False, **kw) -> BEiT:
    torch.manual_seed(0)
    return perturb(BEiT(**{**TINY, "shared_rel_pos_bias": shared, **kw}))


def load_into_new(foreign, **kw) -> tuple[BEiT, list[str]]:
    arch = beit_arch(foreign.state) | kw
    model = BEiT(**{**arch, "drop_path_rate": 0.0}).eval()
    return model, load_foreign(model, foreign)


def masks(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 16, generator=torch.Generator().manual_seed(3)) < 0.4


def hf_config(**kw) -> BeitConfig:
    dims = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                image_size=32, patch_size=8, vocab_size=24, layer_norm_eps=1e-6, use_mask_token=True,
                layer_scale_init_value=0.1)
    return BeitConfig(**{**dims, **kw})


@pytest.mark.parametrize("shared", [False, True])
def test_hf_beit_to_mimkit(tmp_path, shared):
    torch.manual_seed(0)
    hf = perturb(BeitForMaskedImageModeling(hf_config(use_relative_position_bias=not shared,
                                                      use_shared_relative_position_bias=shared)))
    hf.save_pretrained(tmp_path / "hf")
    model, notes = load_into_new(read_checkpoint(tmp_path / "hf", "hf"))
    assert notes == [] and beit_arch(model.state_dict())["shared_rel_pos_bias"] == shared
    x, mask = torch.randn(2, 3, 32, 32), masks()
    with torch.no_grad():
        logits = hf(pixel_values=x, bool_masked_pos=mask).logits  # [B, L, vocab]
        ours = model.forward_head(model.forward_features(x, mask)[0], mask)
    # float32 rounding of another order of operations: 4.8e-7 measured on this CPU
    torch.testing.assert_close(ours, logits[mask], rtol=0, atol=1e-6)


@pytest.mark.parametrize("shared", [False, True])
def test_a_published_hf_beit_holding_its_relative_position_indices_imports(tmp_path, shared):
    """Folders that transformers wrote before the index became a non-persistent buffer (the hub's
    microsoft/beit-*) carry each table's `relative_position_index`: derived from the grid, dropped unread."""
    torch.manual_seed(0)
    hf = perturb(BeitForMaskedImageModeling(hf_config(use_relative_position_bias=not shared,
                                                      use_shared_relative_position_bias=shared)))
    hf.save_pretrained(tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    state = load_file(file)
    tables = [key for key in state if key.endswith("relative_position_bias_table")]
    assert len(tables) == (1 if shared else 2)
    index = BeitRelativePositionBias.generate_relative_position_index((4, 4))  # (17, 17) int64
    save_file(state | {key.replace("_bias_table", "_index"): index.clone() for key in tables}, file,
              metadata={"format": "pt"})
    model, notes = load_into_new(read_checkpoint(tmp_path / "hf", "hf"))
    assert notes == []
    x, mask = torch.randn(2, 3, 32, 32), masks()
    with torch.no_grad():
        logits = hf(pixel_values=x, bool_masked_pos=mask).logits
        ours = model.forward_head(model.forward_features(x, mask)[0], mask)
    torch.testing.assert_close(ours, logits[mask], rtol=0, atol=1e-6)


@pytest.mark.parametrize("in_memory, published", [
    ("beit.shared_position_bias.relative_position_bias_table",
     "encoder.relative_position_bias.relative_position_bias_table"),
    ("beit.layers.3.relative_position_bias.relative_position_bias_table",
     "encoder.layer.3.attention.attention.relative_position_bias.relative_position_bias_table"),
    ("beit.layers.0.attention.k_proj.weight", "encoder.layer.0.attention.attention.key.weight"),
    ("beit.layers.1.mlp.fc2.bias", "encoder.layer.1.output.dense.bias"),
])
def test_transformers_5_in_memory_beit_names_are_read_as_the_published_ones(in_memory, published):
    assert list(strip_base({in_memory: torch.ones(1)})) == [published]


def test_hf_beit_with_two_final_norms_is_refused(tmp_path):
    """use_mean_pooling=False in a BeitForMaskedImageModeling normalizes twice; mimkit's BEiT cannot."""
    hf = BeitForMaskedImageModeling(hf_config(use_mean_pooling=False, use_relative_position_bias=True))
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(MimkitError, match="two final LayerNorms"):
        read_checkpoint(tmp_path / "hf", "hf")


@pytest.mark.parametrize("shared, layer_scale", [(False, 0.1), (True, 0.1), (False, 0.0)],
                         ids=["per-block-bias", "shared-bias", "no-layer-scale"])
def test_mimkit_to_hf_and_back_is_bit_identical(tmp_path, shared, layer_scale):
    model = tiny_beit(shared, layer_scale_init=layer_scale)
    export_model(model, CONFIG, "hf", tmp_path / "hf")
    hf = BeitForMaskedImageModeling.from_pretrained(tmp_path / "hf").eval()
    published = {"beit", "layernorm", "lm_head"}  # microsoft/beit-base-patch16-224-pt22k's top-level names
    assert {key.split(".")[0] for key in load_file(tmp_path / "hf" / "model.safetensors")} == published
    x, mask = torch.randn(2, 3, 32, 32), masks()
    with torch.no_grad():
        logits = hf(pixel_values=x, bool_masked_pos=mask).logits
        ours = model.forward_head(model.forward_features(x, mask)[0], mask)
    # float32 rounding of another order of operations: 4.8e-7 measured on this CPU
    torch.testing.assert_close(ours, logits[mask], rtol=0, atol=1e-6)

    back, _ = load_into_new(read_checkpoint(tmp_path / "hf", "hf"))
    original, returned = model.state_dict(), back.state_dict()
    assert original.keys() == returned.keys() and all(torch.equal(original[k], returned[k]) for k in original)


def test_encoder_exports_as_beit_model(tmp_path):
    model = tiny_beit()
    export_model(model, CONFIG, "hf", tmp_path / "hf", encoder_only=True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["BeitModel"]
    hf = BeitModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, model.encoder.forward_features(x),
                                   rtol=0, atol=0)
    encoder_only, notes = load_into_new(read_checkpoint(tmp_path / "hf", "hf"), vocab_size=24)
    assert notes == ["mask token: not in the checkpoint; freshly initialized",
                     "codebook head: not in the checkpoint; freshly initialized"]


def test_mimkit_to_timm_and_back_is_bit_identical(tmp_path):
    model = tiny_beit(shared=True)
    export_model(model, CONFIG, "timm", tmp_path / "timm")
    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    strict = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"]).eval()
    strict.load_state_dict(load_file(tmp_path / "timm" / "model.safetensors"), strict=True)
    local = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for loaded in (strict, local):
            torch.testing.assert_close(loaded(x), model.encoder(x), rtol=0, atol=0)

    back, _ = load_into_new(read_checkpoint(tmp_path / "timm", "timm"), vocab_size=24)
    original, returned = model.encoder.state_dict(), back.encoder.state_dict()
    assert all(torch.equal(original[k], returned[k]) for k in original)


def test_official_layout(tmp_path):
    torch.manual_seed(0)
    beit = perturb(Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                        use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                        init_values=0.1, global_pool="token"))
    state = beit.state_dict() | {"mask_token": torch.randn(1, 1, 32), "lm_head.weight": torch.randn(24, 32),
                                 "lm_head.bias": torch.randn(24)}
    state["rel_pos_bias.relative_position_index"] = beit.rel_pos_bias.relative_position_index  # a buffer
    assert set(state) == OFFICIAL_KEYS
    torch.save({"model": state}, tmp_path / "beit_pt.pth")
    model, _ = load_into_new(read_checkpoint(tmp_path / "beit_pt.pth", "beit"))
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.forward_features(x), beit.forward_features(x), rtol=0,
                                   atol=0)


def test_official_weights_without_layer_scale_import_without_it(tmp_path):
    torch.manual_seed(0)
    beit = perturb(Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                        use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=None, global_pool="token"))
    torch.save({"model": beit.state_dict()}, tmp_path / "beit_pt.pth")
    foreign = read_checkpoint(tmp_path / "beit_pt.pth", "beit")
    assert beit_arch(foreign.state)["layer_scale_init"] == 0.0
    model, _ = load_into_new(foreign)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.forward_features(x), beit.forward_features(x), rtol=0,
                                   atol=0)


def test_official_beitv2_layout(tmp_path):
    torch.manual_seed(0)
    beit = perturb(Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                        use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1, global_pool="token"))
    agg = [perturb(Block(32, 2, qkv_bias=True, init_values=0.1, window_size=(4, 4))) for _ in range(2)]
    head = {"mask_token": torch.randn(1, 1, 32), "lm_head.weight": torch.randn(24, 32),
            "lm_head.bias": torch.randn(24)}
    state = beit.state_dict() | head
    for blocks, modules in (("blocks", beit.blocks), ("cls_pt_layers", agg)):
        for i, block in enumerate(modules):
            state |= {f"{blocks}.{i}.{k}": v for k, v in block.state_dict().items()}
            state[f"{blocks}.{i}.attn.relative_position_index"] = block.attn.relative_position_index
    assert set(state) == OFFICIAL_V2_KEYS
    torch.save({"model": state}, tmp_path / "beitv2_pt.pth")
    foreign = read_checkpoint(tmp_path / "beitv2_pt.pth", "beitv2")
    model = BEiTv2(**beitv2_arch(foreign.state), agg_layer=1, drop_path_rate=0.0).eval()
    assert load_foreign(model, foreign) == [] and len(model.agg_blocks) == 2

    x, mask = torch.randn(2, 3, 32, 32), masks()
    with torch.no_grad():  # the reference head by hand on the timm modules: block-1 patches, final [CLS]
        h = torch.where(mask[..., None], head["mask_token"], beit.patch_embed(x))
        early = beit.blocks[0](torch.cat([beit.cls_token.expand(2, -1, -1), h], dim=1))
        last = beit.blocks[1](early)
        y = torch.cat([last[:, :1], early[:, 1:]], dim=1)
        for block in agg:
            y = block(y)
        expected = beit.norm(y)[:, 1:][mask] @ head["lm_head.weight"].T + head["lm_head.bias"]
        _, (ours_early, ours_last) = model.forward_features(x, mask, layers=[1, 2])
        ours = model.forward_aggregation(ours_last, ours_early, mask)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_relative_tables_resize_to_a_larger_grid(tmp_path):
    model = tiny_beit()
    export_model(model, CONFIG, "hf", tmp_path / "hf")
    foreign = read_checkpoint(tmp_path / "hf", "hf")
    big, notes = load_into_new(foreign, img_size=48)
    assert "encoder.blocks.0.attn.relative_position_bias_table: BEiT's resize from 4x4 to 6x6" in notes
    x, mask = torch.randn(2, 3, 48, 48), torch.zeros(2, 36, dtype=torch.bool)
    assert big.forward_features(x, mask)[0].isfinite().all()
    with pytest.raises(MimkitError, match="does not fit the inferred model: encoder.patch_embed"):
        load_into_new(foreign, patch_size=4)


@pytest.mark.parametrize("kw", [dict(in_chans=1), dict(patch_size=4, shared_rel_pos_bias=True)])
def test_the_architecture_read_off_the_weights_is_the_models(kw):
    """`beit_arch` gives back a BEiT's settings, a grayscale one's single channel included."""
    settings = {**TINY, "shared_rel_pos_bias": False, **kw}
    arch = beit_arch(BEiT(**settings).state_dict())
    assert {k: arch[k] for k in settings if k != "drop_path_rate"} == {
        k: v for k, v in settings.items() if k != "drop_path_rate"}
