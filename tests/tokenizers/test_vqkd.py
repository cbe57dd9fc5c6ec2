"""VQ-KD: shapes, the loss, the straight-through gradient, and a short Fashion-MNIST run that fills the
codebook and moves toward the teacher."""

from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from mimkit.config import load_recipe, merge, parse_overrides
from mimkit.data.sources import build_source
from mimkit.data.transforms import eval_view
from mimkit.errors import MimkitError
from mimkit.methods import vqkd as vqkd_method
from mimkit.methods.vqkd import build_model
from mimkit.registry import method_of, read_config
from mimkit.runs import save_run_config
from mimkit.tokenizers.dvae import codebook_stats
from mimkit.tokenizers.quantizer import spherical_kmeans
from mimkit.tokenizers.teachers import Teacher, TimmFeatures
from mimkit.tokenizers.vqkd import VQKD, create_vqkd


def tiny(**kwargs) -> VQKD:
    dims = dict(img_size=28, patch_size=4, in_chans=1, teacher_dim=24, vocab_size=64, embed_dim=32, depth=2,
                num_heads=2, decoder_depth=1)
    return create_vqkd("vit_mini", **{**dims, **kwargs})


def test_shapes_ids_and_loss():
    torch.manual_seed(0)
    model = tiny()
    imgs, target = torch.randn(3, 1, 28, 28), torch.randn(3, 49, 24)
    loss, metrics, ids = model(imgs, target)
    assert loss.shape == () and ids.shape == (3, 7, 7) and ids.dtype == torch.long
    assert {"cosine", "commitment", "usage", "perplexity", "restarted"} <= metrics.keys()
    model.eval()
    loss, metrics, ids = model(imgs, target)
    # the loss is 1 - cos(decoder output, teacher) + commitment
    quantized, _, commitment, _ = model.quantize(model.forward_encoder(imgs))
    pred = model.forward_decoder(quantized)
    torch.testing.assert_close(loss, 1 - F.cosine_similarity(pred, target, dim=-1).mean() + commitment)
    assert torch.equal(model.tokenize(imgs), ids)


def test_the_decoder_sees_each_patchs_code_at_the_patchs_place_on_the_grid():
    """The decoder's input is a code_dim-channel image of the patch grid: pixel (r, c) holds the code of
    patch r * grid + c (row-major, as the encoder numbers its patches), the code's dims as channels."""
    torch.manual_seed(0)
    model = tiny()
    seen = []
    model.decoder.patch_embed.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    quantized = torch.randn(2, 49, 32)
    model.forward_decoder(quantized)
    expected = quantized.reshape(2, 7, 7, 32).permute(0, 3, 1, 2)  # [B, d, rows, cols]
    assert torch.equal(seen[0], expected)


def test_each_patchs_code_feature_comes_from_its_own_token_not_the_class_token():
    """With the blocks' residual branches zeroed, a patch token depends on its own pixels only: changing
    the top-left patch changes the first code feature and no other (the class token is left out)."""
    torch.manual_seed(0)
    model = tiny()
    with torch.no_grad():
        for block in model.encoder.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()
    x = torch.randn(1, 1, 28, 28)
    changed = x.clone()
    changed[..., :4, :4] += 1.0
    with torch.no_grad():
        moved = (model.forward_encoder(changed) - model.forward_encoder(x)).abs().sum(-1)[0]  # [L]
    assert moved.shape == (49,) and moved[0] > 0 and (moved[1:] == 0).all()


def test_explicit_sizes_override_the_named_arch():
    model = create_vqkd("vit_mini", img_size=16, patch_size=4, in_chans=1, teacher_dim=8, vocab_size=8,
                        embed_dim=32, depth=1, num_heads=2, decoder_depth=1)
    assert (model.encoder.embed_dim, len(model.encoder.blocks), model.encoder.blocks[0].attn.num_heads) == (
        32, 1, 2)
    assert len(create_vqkd("vit_mini", img_size=16, patch_size=4, teacher_dim=8).encoder.blocks) == 6


def test_tokenize_never_moves_the_codebook():
    model = tiny().train()
    before = model.quantize.codebook.clone()
    ids = model.tokenize(torch.randn(2, 1, 28, 28))
    assert ids.shape == (2, 7, 7) and torch.equal(model.quantize.codebook, before)
    assert not model.quantize.initialized  # k-means waits for the first training batch


def ema_step(codebook: torch.Tensor, z: torch.Tensor, decay: float) -> torch.Tensor:
    """One EMA step by hand: each code that unit vectors z chose moves to l2(decay * code + (1 - decay) *
    l2(their sum)); the others stay."""
    ids = (z @ codebook.T).argmax(1)
    moved = codebook.clone()
    for k in ids.unique():
        mean = F.normalize(z[ids == k].sum(0), dim=0)
        moved[k] = F.normalize(decay * codebook[k] + (1 - decay) * mean, dim=0)
    return moved


def test_the_first_batch_sets_the_codebook_by_kmeans():
    """VQ-KD's first training step: spherical k-means (10 rounds, the default) over the batch's l2-normalized
    projected patch features becomes the codebook, which then takes that step's EMA update; from the second
    step on, EMA updates only."""
    torch.manual_seed(0)
    model = tiny(vocab_size=8, decay=0.9, dead_after=None).train()
    batches = [(torch.randn(4, 1, 28, 28), torch.randn(4, 49, 24)) for _ in range(2)]
    with torch.no_grad():
        z = [F.normalize(model.forward_encoder(x), dim=-1).flatten(0, 1) for x, _ in batches]  # [B*L, d]
    torch.manual_seed(1)
    centers = spherical_kmeans(z[0], 8, iters=10)
    torch.manual_seed(1)
    one_round = spherical_kmeans(z[0], 8, iters=1)
    assert not torch.allclose(centers, one_round, atol=1e-3)  # the rounds after the first one matter here
    torch.manual_seed(1)  # the draw of k-means' first centers
    model(*batches[0])
    assert model.quantize.initialized
    after_first = ema_step(centers, z[0], 0.9)
    torch.testing.assert_close(model.quantize.codebook, after_first)
    model(*batches[1])
    torch.testing.assert_close(model.quantize.codebook, ema_step(after_first, z[1], 0.9))


def test_the_recipe_and_its_overrides_reach_the_quantizer():
    overrides = parse_overrides(["vqkd.teacher_dim=24", "vqkd.vocab_size=16", "vqkd.kmeans_iters=3",
                                 "vqkd.decoder_depth=1", "model.kwargs.depth=1", "data.img_size=28",
                                 "data.channels=1", "vqkd.dead_after=7"])
    model = build_model(read_config(merge(load_recipe("vqkd_fmnist"), overrides)))
    assert model.quantize.kmeans_iters == 3 and not model.quantize.initialized
    assert model.quantize.dead_after == 7
    assert model.quantize.codebook.shape == (16, 32)
    without = build_model(read_config(merge(load_recipe("vqkd_fmnist"), overrides | {
        "vqkd": overrides["vqkd"] | {"kmeans_iters": 0}})))
    assert without.quantize.initialized  # no k-means: the random codebook is the initialisation


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    model = tiny(commitment=0.0)  # the distillation loss alone: only the straight-through path
    loss, _, _ = model(torch.randn(4, 1, 28, 28), torch.randn(4, 49, 24))
    loss.backward()
    for name in ("encoder.patch_embed.proj.weight", "encoder.blocks.0.attn.qkv.weight",
                 "encode_task_layer.2.weight", "decoder.blocks.0.mlp.fc1.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert not any(b.requires_grad for b in model.quantize.buffers())  # the codebook moves by EMA only


def test_config_rebuilds_the_model():
    model = tiny(dead_after=None, decay=0.9, commitment=0.5, kmeans_iters=0)
    rebuilt = VQKD(**model.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in
                                                                      model.state_dict().items()}
    q = rebuilt.quantize  # the quantizer's settings too, none at its default
    assert (q.decay, q.commitment, q.kmeans_iters, q.dead_after) == (0.9, 0.5, 0, None)


@pytest.fixture(scope="module")
def fashion():
    """1536 normalized Fashion-MNIST train images, (1536, 1, 28, 28), and 512 held-out test ones."""
    def load(split, n):
        source = build_source("fashion-mnist", split=split)
        imgs = torch.stack([source[i][0] for i in range(n)]).float() / 255
        return (imgs - source.info.mean[0]) / source.info.std[0], source.info
    train, info = load("train", 1536)
    test, _ = load("test", 512)
    return train, test, info


@pytest.mark.slow
def test_short_fashion_mnist_run_fills_the_codebook_and_approaches_the_teacher(fashion):
    train, test, info = fashion
    torch.manual_seed(0)
    # A frozen random ViT is a teacher too: its patch features are a fixed function of the image.
    vit = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, num_classes=0,
                            embed_dim=48, depth=2, num_heads=2)
    teacher = Teacher(TimmFeatures(vit), 28, 1, info.mean, info.std, info.mean, info.std, 7, "random ViT")
    model = tiny(vocab_size=128, teacher_dim=48, dead_after=20)
    test_targets = teacher(test)

    def held_out():
        model.eval()
        with torch.no_grad():
            _, metrics, ids = model(test, test_targets)
        model.train()
        return {"cosine": metrics["cosine"].item(), **codebook_stats(ids, 128)}

    before = held_out()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.99), weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        batch = train[torch.randint(0, len(train), (64,), generator=g)]
        loss, _, _ = model(batch, teacher(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out()
    assert after["usage"] > 0.5, after  # more than half of the 128 codes used by held-out patches
    assert after["cosine"] > max(0.5, before["cosine"] + 0.3), (before, after)
    assert after["perplexity"] > 32


def held_out_evaluation(monkeypatch, eval_images: int, *overrides: str) -> tuple:
    """A tiny VQ-KD on 28 px grey synthetic images (unless ``overrides`` say otherwise), its teacher a random
    ViT (no run loaded), and its held-out evaluation: (model, teacher, evaluate)."""
    config = read_config(merge(load_recipe("vqkd_fmnist"), parse_overrides([
        "data.source=synthetic:8", "vqkd.teacher_dim=24", "vqkd.vocab_size=16", "vqkd.decoder_depth=1",
        "model.kwargs.depth=1", "data.img_size=28", "data.channels=1", "data.mean=[0.5]", "data.std=[0.5]",
        f"vqkd.eval_images={eval_images}", *overrides])))
    vit = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, num_classes=0,
                            embed_dim=24, depth=1, num_heads=2)
    teacher = Teacher(TimmFeatures(vit), 28, 1, (0.5,), (0.5,), (0.5,), (0.5,), 7, "random ViT")
    monkeypatch.setattr(vqkd_method, "teacher_of", lambda config: teacher)
    model = build_model(config)
    return model, teacher, vqkd_method.build_evaluate(config, model)


def test_the_held_out_evaluation_leaves_the_tokenizer_in_the_mode_it_found(monkeypatch):
    """The evaluation runs in eval mode (the codebook frozen) and hands the tokenizer back training: the
    codebook's EMA must go on moving after it."""
    model, _, evaluate = held_out_evaluation(monkeypatch, 4)
    for training in (True, False):
        model.train(training)
        assert set(evaluate(model)) == {"val_usage", "val_perplexity", "val_cosine"}
        assert model.training == training


def test_the_held_out_evaluation_tokenizes_a_seeded_subset_of_the_val_split(monkeypatch):
    """``vqkd.eval_images`` images of the data's ``val`` split (the same ones at every evaluation), in the
    evaluation view; the held-out cosine is their mean."""
    model, teacher, evaluate = held_out_evaluation(monkeypatch, 3)
    seen = []
    teacher.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    first, second = evaluate(model), evaluate(model)
    assert first == second
    val = build_source("synthetic:8", split="val", channels=1)
    view = eval_view(28, [0.5], [0.5])
    picks = torch.randperm(8, generator=torch.Generator().manual_seed(0))[:3]
    expected = torch.stack([view(val[int(i)][0])["image"] for i in picks])
    torch.testing.assert_close(seen[0], expected)
    with torch.no_grad():
        _, metrics, _ = model.eval()(expected, teacher(expected))
    assert first["val_cosine"] == pytest.approx(metrics["cosine"].item(), abs=1e-6)


def test_the_held_out_numbers_cover_every_picked_image_across_batches(monkeypatch):
    """Three images in batches of two: the cosine is the mean over the three images (not over the batches,
    which would weigh the lone last image as much as the first two), usage and perplexity those of all
    their codes."""
    model, teacher, evaluate = held_out_evaluation(monkeypatch, 3, "train.batch_size=2")
    seen = []
    teacher.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    numbers = evaluate(model)
    assert [len(batch) for batch in seen] == [2, 1]
    images = torch.cat(seen)
    with torch.no_grad():
        _, metrics, ids = model.eval()(images, teacher(images))
    assert numbers["val_cosine"] == pytest.approx(metrics["cosine"].item(), abs=1e-6)
    stats = codebook_stats(ids, 16)
    assert (numbers["val_usage"], numbers["val_perplexity"]) == pytest.approx(
        (stats["usage"].item(), stats["perplexity"].item()))


def test_a_folder_without_a_held_out_split_is_evaluated_on_its_train_images(monkeypatch, tmp_path):
    for i in range(4):
        Image.fromarray(torch.full((28, 28), 60 * i, dtype=torch.uint8).numpy()).save(tmp_path / f"{i}.png")
    model, teacher, evaluate = held_out_evaluation(monkeypatch, 4, f"data.source={tmp_path}")
    seen = []
    teacher.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    evaluate(model)
    means = sorted(torch.cat(seen).mean((1, 2, 3)).tolist())  # each image is one grey level
    assert means == pytest.approx([(60 * i / 255 - 0.5) / 0.5 for i in range(4)], abs=1e-5)


def test_the_teacher_is_told_the_datas_normalization_and_the_patch_grid(monkeypatch):
    """The teacher converts the run's images back to pixels with the data's mean and std (a mean read as
    the std would feed it other images) and resizes its features to the run's patch grid."""
    calls = []

    def load_teacher(spec, grid, mean, std, run_encoder):
        calls.append((spec, grid, mean, std))
        return "a teacher"

    monkeypatch.setattr(vqkd_method, "load_teacher", load_teacher)
    config = read_config(merge(load_recipe("vqkd_fmnist"), parse_overrides([
        "vqkd.teacher=runs/some-mae", "data.img_size=28", "model.patch_size=4", "data.channels=1",
        "data.mean=[0.2]", "data.std=[0.3]"])))
    vqkd_method._load_teacher.cache_clear()
    try:
        assert vqkd_method.teacher_of(config) == "a teacher"
    finally:
        vqkd_method._load_teacher.cache_clear()
    assert calls == [("runs/some-mae", 7, (0.2,), (0.3,))]


@pytest.mark.parametrize("teacher_dim", [None, 24, 32])
def test_the_teachers_width_is_written_into_the_run_and_another_width_refused(monkeypatch, teacher_dim):
    """A new run takes its teacher's width; a resumed run trained on a teacher of another width is refused."""
    monkeypatch.setattr(vqkd_method, "teacher_of", lambda config: SimpleNamespace(dim=24))  # its width only
    given = [f"vqkd.teacher_dim={teacher_dim}"] if teacher_dim else []
    overrides = parse_overrides(["vqkd.teacher=runs/mae", *given])
    config = read_config(merge(load_recipe("vqkd_fmnist"), overrides))
    if teacher_dim == 32:
        with pytest.raises(MimkitError, match="gives 24-d features; this run was trained on a 32-d teacher"):
            vqkd_method.resolve_config(config)
    else:
        assert vqkd_method.resolve_config(config).settings.teacher_dim == 24


@pytest.mark.parametrize("has_val", [True, False])
def test_the_held_out_images_come_from_the_datas_root_with_its_channels(monkeypatch, tmp_path, has_val):
    """``data.root`` and ``data.channels`` reach the held-out source, whether it is the val split or, for
    data without one, the train split."""
    asked = []

    def build_source(spec, split="train", root=None, channels=None):
        asked.append((spec, split, root, channels))
        if split == "val" and not has_val:
            raise MimkitError("no val split")
        return real_build_source("synthetic:8", split=split, channels=channels)

    real_build_source = vqkd_method.build_source
    monkeypatch.setattr(vqkd_method, "build_source", build_source)
    held_out_evaluation(monkeypatch, 2, "data.source=fashion-mnist", f"data.root={tmp_path}")
    expected = [("fashion-mnist", "val", str(tmp_path), 1)] + (
        [] if has_val else [("fashion-mnist", "train", str(tmp_path), 1)])
    assert [(spec, split, str(root), channels) for spec, split, root, channels in asked] == expected


@pytest.mark.parametrize("override, message", [
    ("vqkd.teacher_dim=null", "vqkd.teacher_dim is unset: the run's teacher fills it in"),
    ("model.kwargs.decoder_embed_dim=16", "decoder_embed_dim"),  # an MAE argument, not a VQ-KD one
])
def test_a_model_the_settings_cannot_build_is_a_one_line_error(override, message):
    config = read_config(merge(load_recipe("vqkd_fmnist"), parse_overrides([
        "vqkd.teacher_dim=24", "vqkd.vocab_size=16", "vqkd.decoder_depth=1", "model.kwargs.depth=1",
        override])))
    with pytest.raises(MimkitError, match=message):
        build_model(config)


def test_a_tokenizer_run_without_a_checkpoint_is_a_one_line_error(tmp_path):
    config = read_config(merge(load_recipe("vqkd_fmnist"), parse_overrides(["vqkd.teacher_dim=24"])))
    save_run_config(tmp_path, method_of("vqkd").kind, config)
    with pytest.raises(MimkitError, match="has no checkpoint yet"):
        vqkd_method.load_vqkd_tokenizer(tmp_path)
