"""BEiT v2: the [CLS] aggregation head (shared MIM head, layer-l patch tokens, absent from the encoder), the
loss falling on Fashion-MNIST, and the MAE -> VQ-KD -> BEiT v2 chain through the command line."""

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.models.beit import Beit
from torch import nn

from mimkit.cli import main
from mimkit.config import load_recipe
from mimkit.data.sources import build_source
from mimkit.data.transforms import denormalize
from mimkit.errors import MimkitError
from mimkit.interop.export import export_run
from mimkit.masking import block_mask, count_for_ratio
from mimkit.methods.vqkd import load_vqkd_tokenizer, tokenizer_config
from mimkit.models.beit import BEiT, BEiTv2, create_beitv2, default_agg_layer
from mimkit.registry import method_of, read_config
from mimkit.runs import load_encoder, load_run
from mimkit.tokenizers.vqkd import create_vqkd
from mimkit.train.metrics_log import read_metrics
from mimkit.viz import codebook_usage_plot, token_maps
from tests.conftest import assert_two_views_normalized, grid_size

VOCAB = 40  # no other layer of the tiny models is 40 wide


def tiny(**kwargs) -> BEiTv2:
    dims = dict(img_size=28, patch_size=4, in_chans=1, vocab_size=VOCAB, embed_dim=32, depth=3, num_heads=2,
                drop_path_rate=0.0)
    return create_beitv2("vit_mini", **{**dims, **kwargs})


def masks(batch: int) -> torch.Tensor:
    return torch.stack([block_mask(7, 7, 20, generator=torch.Generator().manual_seed(i)).flatten()
                        for i in range(batch)])


def test_default_agg_layer_follows_the_paper_and_scales_down():
    assert default_agg_layer(12) == 9 and default_agg_layer(24) == 21  # BEiT v2 base and large
    assert [default_agg_layer(d) for d in (1, 2, 3, 6, 32)] == [1, 1, 2, 5, 29]


@pytest.mark.parametrize("shared", [False, True], ids=["per_layer_bias", "shared_bias"])
@pytest.mark.parametrize("agg_layer, shared_lm_head", [(1, True), (2, True), (2, False)])
def test_head_reads_the_final_cls_and_layer_l_patch_tokens(agg_layer, shared_lm_head, shared):
    torch.manual_seed(0)
    model = tiny(agg_layer=agg_layer, shared_rel_pos_bias=shared, shared_lm_head=shared_lm_head).eval()
    seen = {}
    model.encoder.blocks[agg_layer - 1].register_forward_hook(lambda m, i, o: seen.update(early=o))
    model.encoder.blocks[-1].register_forward_hook(lambda m, i, o: seen.update(last=o))
    model.agg_blocks[0].register_forward_pre_hook(lambda m, a: seen.update(head_in=a[0]))
    model.agg_blocks[-1].register_forward_hook(lambda m, i, o: seen.update(head_out=o))
    imgs, mask, targets = torch.randn(2, 1, 28, 28), masks(2), torch.randint(0, VOCAB, (2, 49))
    with torch.no_grad():
        loss, metrics = model(imgs, mask, targets)
    assert torch.equal(seen["head_in"][:, 0], seen["last"][:, 0])  # the final [CLS]
    assert torch.equal(seen["head_in"][:, 1:], seen["early"][:, 1:])  # layer l's patches
    # the head's logits come from the encoder's norm and lm_head, the same modules as the MIM logits, or
    # from its own when unshared
    norm, head = (model.encoder.norm, model.lm_head) if shared_lm_head else (model.agg_norm, model.agg_head)
    agg_logits = head(norm(seen["head_out"]))[:, 1:][mask]
    agg_loss = nn.functional.cross_entropy(agg_logits, targets[mask])
    torch.testing.assert_close(metrics["agg_loss"], agg_loss)
    torch.testing.assert_close(loss, metrics["mim_loss"] + agg_loss)
    accuracy = (agg_logits.argmax(-1) == targets[mask]).float().mean()
    assert "mim_acc" in metrics and torch.equal(metrics["agg_acc"], accuracy)
    tables = [block.attn.relative_position_bias_table for block in (*model.encoder.blocks, *model.agg_blocks)]
    assert all((table is None) == shared for table in tables)  # per-block tables: the head's blocks too


def test_head_shares_the_mim_head_tensor():
    torch.manual_seed(0)
    model = tiny()
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == VOCAB]
    assert heads == [model.lm_head]  # one codebook classifier: no copy for the aggregation head
    imgs, mask, targets = torch.randn(2, 1, 28, 28), masks(2), torch.randint(0, VOCAB, (2, 49))
    _, hidden = model.forward_features(imgs, mask, layers=(model.agg_layer, 3))
    logits = model.forward_aggregation(hidden[-1], hidden[0], mask)
    agg_loss = nn.functional.cross_entropy(logits, targets[mask])
    weight_grad, = torch.autograd.grad(agg_loss, model.lm_head.weight)
    assert weight_grad.abs().sum() > 0  # the aggregation loss trains the shared head
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # one tensor: the aggregation logits follow
        assert not torch.allclose(model.forward_aggregation(hidden[-1], hidden[0], mask), logits)


def test_head_is_absent_from_the_encoder():
    model = tiny()
    assert any(k.startswith("agg_blocks.") for k in model.state_dict())
    encoder_keys = model.encoder.state_dict().keys()
    assert not any("agg" in k for k in encoder_keys)
    dims = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")
    plain = BEiT(**{k: model.encoder_kwargs[k] for k in dims}, vocab_size=VOCAB, drop_path_rate=0.0)
    assert encoder_keys == plain.encoder.state_dict().keys()
    Beit(**model.encoder_kwargs).load_state_dict(model.encoder.state_dict(), strict=True)


def test_drop_path_and_layer_scale_reach_every_block_and_the_head_continues_the_encoders_schedule():
    """Stochastic depth grows to ``drop_path_rate`` at the last block and the head's blocks take the rates
    (and the init rescaling by sqrt(2 * block number)) of the blocks after ``agg_layer``, as in the reference
    code; ``layer_scale_init`` overrides the arch's default in every block, the head's too."""
    torch.manual_seed(0)
    model = tiny(depth=4, agg_layer=2, embed_dim=64, drop_path_rate=0.3, layer_scale_init=0.05)
    blocks = [*model.encoder.blocks, *model.agg_blocks]
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.2, 0.3])
    gammas = torch.cat([block.gamma_1 for block in blocks])
    assert torch.equal(gammas, torch.full_like(gammas, 0.05))
    for number, block in enumerate(model.agg_blocks, start=3):  # blocks 3 and 4 after agg_layer 2
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert weight.std().item() == pytest.approx(0.02 / (2 * number) ** 0.5, rel=0.1)
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_bad_agg_layer_is_a_one_line_error():
    with pytest.raises(MimkitError, match="agg_layer 4 must be a block number in 1..3"):
        tiny(agg_layer=4)


def test_loss_falls_on_fashion_mnist():
    source = build_source("fashion-mnist", split="train")
    imgs = torch.stack([source[i][0] for i in range(512)]).float() / 255
    imgs = (imgs - source.info.mean[0]) / source.info.std[0]
    torch.manual_seed(0)
    tokenizer = create_vqkd("vit_mini", img_size=28, patch_size=4, in_chans=1, teacher_dim=8,
                            vocab_size=VOCAB, embed_dim=32, depth=1, num_heads=2, decoder_depth=1,
                            kmeans_iters=0).eval()
    targets = tokenizer.tokenize(imgs)  # a fixed function of each image: something to learn
    model = tiny(depth=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        pick = torch.randint(0, len(imgs), (32,), generator=g)
        loss, _ = model(imgs[pick], masks(32), targets[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


COMMON = ["--data", "synthetic:64", "--batch-size", "8", "--set", "data.num_workers=0"]  # 32 px, 3 channels
TINY_VIT = ["--set", "model.kwargs.depth=2", "--set", "model.kwargs.embed_dim=32", "--set",
            "model.kwargs.num_heads=2"]
TINY_MAE = [*TINY_VIT, "--set", "model.kwargs.decoder_depth=1", "--set", "model.kwargs.decoder_embed_dim=16",
            "--set", "model.kwargs.decoder_num_heads=2"]
TINY_VQKD = [*TINY_VIT, "--set", f"vqkd.vocab_size={VOCAB}", "--set", "vqkd.decoder_depth=1", "--set",
             "vqkd.eval_images=16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An MAE run, the VQ-KD tokenizer distilled from it, and a BEiT v2 run on that tokenizer."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["pretrain", "mae", "--model", "vit_mini", "--out", str(root / "mae"), "--max-steps", "1",
                 *COMMON, *TINY_MAE]) == 0
    assert main(["tokenizer", "train", "vqkd", "--teacher", str(root / "mae"), "--out", str(root / "vqkd"),
                 "--max-steps", "3", "--set", "train.log_every=1", *COMMON, *TINY_VQKD]) == 0
    assert main(["pretrain", "beitv2", "--tokenizer", str(root / "vqkd"), "--model", "vit_mini", "--out",
                 str(root / "b2"), "--max-steps", "2", *COMMON, *TINY_VIT]) == 0
    return root


def test_vqkd_run_logs_codebook_usage_and_is_a_tokenizer(runs, capsys):
    records = read_metrics(runs / "vqkd")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all({"usage", "perplexity", "cosine", "commitment"} <= r.keys() for r in steps)
    held_out = [r for r in records if "val_usage" in r]
    assert len(held_out) == 1
    used = held_out[0]["val_usage"] * VOCAB  # codes hit on the held-out images, of VOCAB
    assert used == pytest.approx(round(used), abs=1e-4) and 1 <= held_out[0]["val_perplexity"] <= used + 1e-4
    assert held_out[0]["val_cosine"] != steps[-1]["cosine"]  # held-out images, not the last batch
    tokenizer, config = load_vqkd_tokenizer(runs / "vqkd")
    assert config.settings.teacher_dim == 32 and tokenizer.quantize.initialized  # the MAE encoder's width
    assert not tokenizer.training and not any(p.requires_grad for p in tokenizer.parameters())
    assert tokenizer.tokenize(torch.randn(2, 3, 32, 32)).shape == (2, 8, 8)


def test_beitv2_run_rebuilds_and_exports_its_encoder_only(runs, tmp_path):
    model, config = load_run(runs / "b2")
    assert isinstance(model, BEiTv2) and config.model.kwargs["vocab_size"] == VOCAB
    assert config.settings.tokenizer_size == 32 and model.agg_layer == 1
    assert [r for r in read_metrics(runs / "b2") if "agg_loss" in r]
    encoder = load_encoder(runs / "b2")  # what fine-tuning and the probes take
    assert isinstance(encoder.model, Beit) and not any("agg" in k for k in encoder.model.state_dict())
    files = export_run(runs / "b2", "timm", tmp_path / "timm")
    assert not any("agg" in k for k in load_file(files[0]))


def test_the_tokenizers_images_are_normalized_as_its_run_was_not_as_this_run(runs):
    """A BEiT v2 run whose data is normalized otherwise than its VQ-KD run's: the ViT's view is the run's, the
    tokenizer's view (in training and in the pictures) the VQ-KD run's own."""
    tokenizer_data = tokenizer_config(runs / "vqkd").data
    data = {"source": "synthetic:8", "img_size": 32, "channels": 3, "mean": [0.2] * 3, "std": [0.3] * 3}
    assert tokenizer_data.mean != data["mean"] and tokenizer_data.std != data["std"]
    tiny = {"name": "vit_mini", "kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}}
    config = read_config({"method": "beitv2", "data": data, "model": tiny,
                          "beitv2": {"tokenizer": str(runs / "vqkd"), "color_jitter": 0.0}})
    config = method_of("beitv2").resolve_config(config)
    model = method_of("beitv2").build_model(config).eval()
    view, _ = method_of("beitv2").build_task(config, model)
    assert_two_views_normalized(view, (data["mean"], data["std"]), (tokenizer_data.mean, tokenizer_data.std))
    asked = []
    method_of("beitv2").pictures(model, config, lambda size, mean, std: asked.append((list(mean), list(std)))
                                 or torch.zeros(1, 3, size, size), torch.Generator())
    assert asked == [(data["mean"], data["std"]), (tokenizer_data.mean, tokenizer_data.std)]


@pytest.mark.parametrize("args, message", [
    (["pretrain", "beitv2"], "needs a VQ-KD tokenizer: --tokenizer"),
    (["pretrain", "beitv2", "--tokenizer", "{runs}/mae"], "holds a mae run, not a VQ-KD tokenizer"),
    (["pretrain", "beitv2", "--tokenizer", "{runs}/nothing"], "is not a run directory"),
    (["pretrain", "beitv2", "--tokenizer", "{runs}/vqkd", "--set", "model.patch_size=8"],
     "reads 32 px 3-channel images in 4 px patches; this run has 32 px 3-channel images in 8 px"),
    (["pretrain", "beitv2", "--tokenizer", "{runs}/vqkd", "--set", "data.channels=1"],
     "reads 32 px 3-channel images in 4 px patches; this run has 32 px 1-channel images in 4 px"),
    (["pretrain", "beitv2", "--tokenizer", "{runs}/vqkd", "--set", "model.kwargs.vocab_size=7"],
     f"model.kwargs.vocab_size=7 differs from the tokenizer's {VOCAB} codes"),
    (["tokenizer", "train", "vqkd"], "needs a teacher: --teacher"),
    (["tokenizer", "train", "vqkd", "--teacher", "{runs}/nothing"], "does not exist"),
])
def test_bad_input_is_a_one_line_error(runs, tmp_path, capsys, args, message):
    args = [a.format(runs=runs) for a in args]
    assert main([*args, "--out", str(tmp_path / "bad"), "--max-steps", "1", *COMMON, *TINY_VIT]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("error:")


def test_visualize_draws_token_maps_and_the_codebook_over_training(runs, tmp_path):
    assert main(["visualize", str(runs / "vqkd"), "--out", str(tmp_path / "vqkd.png"), "--n", "2"]) == 0
    assert Image.open(tmp_path / "vqkd.png").size == grid_size(2, 2, 32)  # original, tokens
    assert Image.open(tmp_path / "vqkd-usage.png").size == (720, 300)
    assert main(["visualize", str(runs / "b2"), "--out", str(tmp_path / "b2.png"), "--n", "2"]) == 0
    # original, masked, tokens, prediction
    assert Image.open(tmp_path / "b2.png").size == grid_size(4, 2, 32)
    assert not (tmp_path / "b2-usage.png").exists()
    # one shade per code, patch-sized, in the images' normalization
    ids = torch.tensor([[[0, 1], [1, 0]]])
    maps = denormalize(token_maps(ids, 4, 3, 1, [0.5], [0.25]), [0.5], [0.25])
    assert maps.shape == (1, 1, 6, 6) and torch.equal(maps[0, 0, :3, :3], maps[0, 0, 3:, 3:])
    assert maps[0, 0, 0, 0] != maps[0, 0, 0, 3] and maps.unique().numel() == 2
    with pytest.raises(MimkitError, match="no codebook usage"):
        codebook_usage_plot([{"step": 1, "loss": 1.0}])


def test_in1k_recipes_have_the_paper_hyperparameters():
    tokenizer = read_config(load_recipe("vqkd_in1k"))
    v = tokenizer.settings
    assert (v.vocab_size, v.code_dim, v.decoder_depth, v.decay) == (8192, 32, 3, 0.99)
    assert tokenizer.optim.base_lr * 512 / 256 == pytest.approx(2e-4) and tokenizer.optim.betas == (0.9, 0.99)
    model = tokenizer.model
    assert (model.name, model.patch_size, tokenizer.data.img_size) == ("vit_base", 16, 224)
    beitv2 = read_config(load_recipe("beitv2_in1k"))
    assert beitv2.optim.base_lr * 2048 / 256 == pytest.approx(1.5e-3) and beitv2.optim.clip_grad == 3.0
    assert count_for_ratio(196, beitv2.settings.mask_ratio) == 75 and beitv2.settings.crop_scale == (0.2, 1.0)
    kwargs = beitv2.model.kwargs
    assert (kwargs["agg_layer"], kwargs["agg_depth"], kwargs["layer_scale_init"]) == (9, 2, 0.1)
