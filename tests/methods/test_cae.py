"""CAE through the command line: pretraining on a dVAE's ids and resuming, the picture, exports to timm and
transformers, the evaluation commands, one-line refusals of bad settings, the authors' checkpoints
imported (built here from a tiny model in their key names, with their ``args``), and the recipes. CAE v2
(``--config caev2_fmnist``, an MAE run as its teacher): its run and loss, resuming, the cosine picture,
exports and every evaluation command, its refusals and its recipes."""

import json
from argparse import Namespace
from functools import partial

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.models.beit import Beit
from transformers import BeitModel

from mimkit.cli import main
from mimkit.config import load_recipe
from mimkit.errors import MimkitError
from mimkit.interop.cae import OFFICIAL_CAE, cae_guesses, read_official_cae
from mimkit.interop.export import export_model
from mimkit.interop.importer import resolve_arch, run_config
from mimkit.interop.keymaps import to_foreign
from mimkit.methods.dvae import find_tokenizer, load_tokenizer
from mimkit.methods.vqkd import teacher_of
from mimkit.models.cae import CAE, CAEv2
from mimkit.registry import method_of, read_config
from mimkit.runs import latest_weights, load_encoder, load_run
from mimkit.train.checkpoint_files import Checkpoints
from tests.conftest import every_evaluation_command, grid_size, perturb

COMMON = ["--data", "synthetic:64", "--batch-size", "8", "--set", "data.num_workers=0"]  # 32 px, 3 channels
TINY_DVAE = ["--set", "dvae.hidden=4", "--set", "dvae.vocab_size=32"]
TINY = ["--model", "vit_mini", "--set", "model.kwargs.depth=2", "--set", "model.kwargs.embed_dim=32",
        "--set", "model.kwargs.num_heads=2", "--set", "model.kwargs.regressor_depth=1",
        "--set", "model.kwargs.decoder_depth=1"]  # 8x8 grid of 4-px patches


@pytest.fixture(scope="module")
def dvae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "dvae"
    assert main(["tokenizer", "train", "dvae", "--out", str(run), "--max-steps", "2", *COMMON,
                 *TINY_DVAE]) == 0
    return run


def pretrain(out, *extra, tokenizer) -> int:
    return main(["pretrain", "cae", "--tokenizer", str(tokenizer), "--out", str(out), *COMMON, *TINY, *extra])


@pytest.fixture(scope="module")
def run(dvae_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("cae") / "run"
    assert pretrain(out, "--max-steps", "2", tokenizer=dvae_run) == 0
    return out


def assert_resumes_bit_for_bit(train, tmp_path):
    """``train(out, *flags)`` 4 steps straight, and 4 steps stopped after step 2's checkpoint and resumed: the
    same weights. Returns the straight run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(straight, "--max-steps", "4") == 0
    assert train(resumed, "--max-steps", "4", "--set", "train.checkpoint_every=2") == 0
    checkpoints = Checkpoints(resumed)
    checkpoints.weights_path(4).unlink()  # as if stopped after the checkpoint of step 2
    checkpoints.state_path(4).unlink()
    assert train(resumed, "--max-steps", "4") == 0
    a, b = load_file(latest_weights(straight)), load_file(latest_weights(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return straight


@pytest.mark.slow
def test_pretrains_on_the_tokenizers_ids_and_resumes_bit_for_bit(dvae_run, tmp_path):
    straight = assert_resumes_bit_for_bit(partial(pretrain, tokenizer=dvae_run), tmp_path)
    _, config = load_run(straight)
    assert config.model.kwargs["vocab_size"] == 32 and config.settings.tokenizer_size == 32
    logged = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert any({"mim_acc", "loss_tokens", "loss_align"} <= r.keys() for r in logged)


@pytest.mark.slow
def test_visualize_draws_original_masked_tokens_and_prediction(run, tmp_path):
    assert main(["visualize", str(run), "--out", str(tmp_path / "cae.png"), "--n", "2"]) == 0
    assert Image.open(tmp_path / "cae.png").size == grid_size(4, 2, 32)


def test_the_picture_decodes_the_decoders_ids_at_the_hidden_patches_and_the_tokenizers_elsewhere(run):
    model, config = load_run(run)
    torch.manual_seed(0)
    images = {}  # the pictured images at each size asked for

    def draw(size, mean, std):
        return images.setdefault(size, torch.randn(2, 3, size, size))

    panels = method_of("cae").pictures(model, config, draw, torch.Generator().manual_seed(0))
    shown = images[config.data.img_size]
    hidden = (panels["masked"] == 0).all(1)[:, ::4, ::4]  # [2, 8, 8]: the 4-px patches it masked
    assert hidden.any() and not hidden.all()
    tokenizer = load_tokenizer(find_tokenizer(config.settings.tokenizer))
    ids = tokenizer.tokenize(images[config.settings.tokenizer_size])
    with torch.no_grad():
        flat = hidden.flatten(1)
        predicted_latents = model.forward_regressor(model.forward_encoder(shown, flat), flat)
        logits = model.forward_decoder(predicted_latents, flat)
    predicted = ids.clone()
    predicted[hidden] = logits.argmax(-1).flatten()
    assert not torch.equal(predicted, ids)
    torch.testing.assert_close(panels["tokens"], tokenizer.decode(ids))
    torch.testing.assert_close(panels["prediction"], tokenizer.decode(predicted))


@pytest.mark.slow
def test_exports_load_in_timm_and_transformers(run, tmp_path):
    model, _ = load_run(run)
    imgs = torch.randn(2, 3, 32, 32)
    assert main(["export", str(run), "--to", "timm", "--out", str(tmp_path / "timm")]) == 0
    timm_model = Beit(**json.loads((tmp_path / "timm" / "config.json").read_text())["model_args"]).eval()
    timm_model.load_state_dict(load_file(tmp_path / "timm" / "model.safetensors"), strict=True)
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = BeitModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        ours = model.encoder.forward_features(imgs)
        torch.testing.assert_close(timm_model.forward_features(imgs), ours)
        torch.testing.assert_close(hf(imgs).last_hidden_state, ours, atol=1e-5, rtol=1e-4)
        # nothing masked: CAE's own encoder pass is the exported encoder's
        torch.testing.assert_close(model.forward_encoder(imgs, torch.zeros(2, 64, dtype=torch.bool)), ours)


@pytest.mark.slow
def test_evaluation_commands_take_a_cae_run(run, tmp_path):
    every_evaluation_command(run, tmp_path)


@pytest.mark.parametrize("setting, message", [
    ("cae.align_weight=-1", "config 'cae.align_weight' must be at least 0, got -1"),
    ("cae.mask_ratio=1.0", "config 'cae.mask_ratio' must be in (0, 1), got 1.0"),
    ("cae.mask_ratio=0", "config 'cae.mask_ratio' must be in (0, 1), got 0"),
    ("cae.min_block=0", "config 'cae.min_block' must be at least 1"),
])
def test_bad_setting_is_a_one_line_error(dvae_run, setting, message, tmp_path, capsys):
    assert pretrain(tmp_path / "bad", "--max-steps", "1", "--set", setting, tokenizer=dvae_run) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err


def test_the_runs_alignment_weight_reaches_the_loss(dvae_run):
    data = {"source": "synthetic:64", "img_size": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3}
    values = load_recipe("cae_fmnist") | {"data": data,
                                          "model": {"name": "vit_mini", "patch_size": 4,
                                                    "kwargs": {"depth": 1, "regressor_depth": 1,
                                                               "decoder_depth": 1}}}
    losses = {}
    for weight in (0.0, 3.0):
        values["cae"] = {"tokenizer": str(dvae_run), "align_weight": weight}
        config = method_of("cae").resolve_config(read_config(values))
        torch.manual_seed(0)
        model = method_of("cae").build_model(config)
        view, loss_fn = method_of("cae").build_task(config, model)
        torch.manual_seed(0)
        samples = [view(torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)) for _ in range(2)]
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        with torch.no_grad():
            losses[weight] = loss_fn(model.eval(), batch)
    (plain, metrics), (weighted, _) = losses[0.0], losses[3.0]
    torch.testing.assert_close(plain, metrics["loss_tokens"])
    torch.testing.assert_close(weighted, metrics["loss_tokens"] + 3.0 * metrics["loss_align"])


def test_without_a_tokenizer_the_error_says_how_to_get_one(tmp_path, capsys):
    assert main(["pretrain", "cae", "--out", str(tmp_path / "bad"), *COMMON, *TINY, "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cae pretraining needs a tokenizer: --tokenizer" in err and "mimkit tokenizer train dvae" in err
    assert "\n" not in err


def tiny_cae(layer_scale_init: float = 0.1) -> CAE:
    """A tiny CAE (8x8 grid of 4-px patches) whose weights are off their initialization."""
    return perturb(CAE(img_size=32, patch_size=4, in_chans=3, vocab_size=32, embed_dim=32, depth=2,
                       num_heads=2, decoder_embed_dim=16, decoder_num_heads=2, regressor_depth=2,
                       decoder_depth=1, drop_path_rate=0.0, layer_scale_init=layer_scale_init))


def authors_checkpoint(path, layer_scale_init: float = 0.1, **args) -> CAE:
    """A tiny CAE saved as the authors' ``tools/run_pretraining.py`` saves one: its state dict in their names
    with the alignment encoder's copy and the regressor's position table, and their ``args``."""
    model = tiny_cae(layer_scale_init)
    state, left = to_foreign(model.state_dict(), OFFICIAL_CAE)
    assert left == []
    state |= {k.replace("encoder.", "alignment_encoder.", 1): v for k, v in state.items()
              if k.startswith("encoder.")}
    state["rd_pos_embed"] = model.latent_pos_embed
    saved = {"model": state, "optimizer": {}, "epoch": 299}
    if args:
        saved["args"] = Namespace(**args)
    torch.save(saved, path)
    return model


AUTHORS_ARGS = dict(model="cae_tiny_32px", model_type="cae", decoder_num_heads=2, num_mask_patches=32,
                    align_loss_weight=1.5, layer_scale_init_value=0.1, decoder_layer_scale_init_value=0.1,
                    drop_path=0.0)


@pytest.mark.slow
def test_authors_checkpoint_imports_from_its_weights_and_args(dvae_run, tmp_path, capsys):
    model = authors_checkpoint(tmp_path / "checkpoint-299.pth", **AUTHORS_ARGS)
    out = tmp_path / "run"
    assert main(["import", str(tmp_path / "checkpoint-299.pth"), "--format", "cae", "--out", str(out),
                 "--set", "model.kwargs.num_heads=2", "--set", "data.source=synthetic:64",
                 "--set", "data.num_workers=0"]) == 0
    printed = capsys.readouterr().out
    assert "read from args.num_mask_patches (32 of 8x8): mask_ratio" in printed
    assert "alignment_encoder.*: the encoder's own weights" in printed and "guessed" not in printed
    imported, config = load_run(out)
    assert (config.settings.mask_ratio, config.settings.align_weight) == (0.5, 1.5)
    assert config.model.kwargs["decoder_num_heads"] == 2 and config.model.kwargs["decoder_embed_dim"] == 16
    theirs, ours = model.state_dict(), imported.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert main(["pretrain", "cae", "--tokenizer", str(dvae_run), "--out", str(out), *COMMON,
                 "--max-steps", "1"]) == 0  # continues from the imported weights


def test_authors_weights_without_args_get_reported_guesses(tmp_path):
    authors_checkpoint(tmp_path / "bare.pth")
    arch, origin = resolve_arch(read_official_cae(tmp_path / "bare.pth"))
    assert (arch["regressor_depth"], arch["decoder_depth"], arch["vocab_size"]) == (2, 1, 32)
    assert origin["num_heads"].startswith(("guessed", "unknown"))
    assert origin["decoder_num_heads"].startswith(("guessed", "unknown", "default"))


@pytest.mark.parametrize("width, heads, why", [(768, 12, "default"), (128, 2, "guessed"),
                                               (40, None, "unknown")])
def test_the_decoder_heads_are_the_authors_12_where_12_divide_the_width_else_64_wide(width, heads, why):
    guesses = cae_guesses(dict(embed_dim=32, depth=1, mlp_ratio=4.0, decoder_embed_dim=width))
    assert guesses["decoder_num_heads"][0] == heads and guesses["decoder_num_heads"][1].startswith(why)


def test_authors_args_give_the_heads_layer_scales_drop_path_weight_and_mask_ratio(tmp_path):
    authors_checkpoint(tmp_path / "ckpt.pth", **AUTHORS_ARGS | {"drop_path": 0.05})
    arch, origin = resolve_arch(read_official_cae(tmp_path / "ckpt.pth"))
    assert {k: arch[k] for k in ("decoder_num_heads", "layer_scale_init", "decoder_layer_scale_init",
                                 "drop_path_rate", "align_weight", "mask_ratio")} == {
        "decoder_num_heads": 2, "layer_scale_init": 0.1, "decoder_layer_scale_init": 0.1,
        "drop_path_rate": 0.05, "align_weight": 1.5, "mask_ratio": 0.5}
    assert origin["drop_path_rate"] == "args.drop_path"
    assert origin["mask_ratio"] == "args.num_mask_patches (32 of 8x8)"
    values = run_config("cae", arch, None, None, None)  # what the imported run's configuration holds
    assert values["cae"] == {"mask_ratio": 0.5, "align_weight": 1.5}
    kwargs = values["model"]["kwargs"]
    assert (kwargs["regressor_depth"], kwargs["decoder_depth"], kwargs["drop_path_rate"]) == (2, 1, 0.05)


def test_authors_weights_without_layer_scale_import_without_it(tmp_path):
    authors_checkpoint(tmp_path / "bare.pth", layer_scale_init=0.0)
    arch, origin = resolve_arch(read_official_cae(tmp_path / "bare.pth"))
    assert arch["layer_scale_init"] == 0.0 and origin["layer_scale_init"] == "weights"


@pytest.mark.parametrize("layer_scale_init", [0.1, 0.0])
def test_the_encoder_exports_as_a_transformers_beit_model_giving_its_features(layer_scale_init, tmp_path):
    """A model exported without a run (the CLI's export of a run is a slow test): transformers loads the
    folder as a BeitModel that gives the encoder's tokens, with and without layer scale."""
    model = tiny_cae(layer_scale_init)
    config = read_config({"method": "cae", "data": {"img_size": 32, "channels": 3, "mean": [0.5] * 3,
                                                    "std": [0.5] * 3}})
    export_model(model, config, "hf", tmp_path / "hf")
    hf = BeitModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.layer_scale_init_value == layer_scale_init
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(imgs).last_hidden_state, model.encoder.forward_features(imgs),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("args, message", [
    ({"model_type": "caev2"}, "a caev2 checkpoint"),
    ({"model": "cae_base_patch16_224_8k_vocab"}, "says embed_dim=768, the weights 32"),
])
def test_authors_checkpoints_mimkit_cannot_hold_are_refused(tmp_path, args, message):
    authors_checkpoint(tmp_path / "ckpt.pth", **args)
    with pytest.raises(MimkitError, match=message):
        resolve_arch(read_official_cae(tmp_path / "ckpt.pth"))


def test_recipes_quote_the_authors_vit_b_setting_and_size_fmnist_for_a_cpu():
    in1k = read_config(load_recipe("cae_in1k"))
    kwargs = in1k.model.kwargs
    assert (in1k.model.name, kwargs["regressor_depth"], kwargs["decoder_depth"]) == ("vit_base", 4, 4)
    assert (in1k.settings.mask_ratio, in1k.settings.align_weight, in1k.optim.clip_grad) == (0.5, 2.0, 3.0)
    fmnist = read_config(load_recipe("cae_fmnist"))
    assert fmnist.model.name == "vit_mini" and fmnist.settings.color_jitter == 0.0


# CAE v2: the caev2_fmnist recipe at the size of TINY, the regressor narrower than the encoder (the authors'
# ViT-Tiny's projection to the regressor's width)
V2_KWARGS = ("depth=2", "embed_dim=32", "num_heads=2", "decoder_embed_dim=16", "decoder_num_heads=2")
TINY_V2 = ["--model", "vit_mini", *(arg for kv in V2_KWARGS for arg in ("--set", f"model.kwargs.{kv}"))]


def pretrain_v2(out, *extra, teacher) -> int:
    return main(["pretrain", "cae", "--config", "caev2_fmnist", "--teacher", str(teacher), "--out", str(out),
                 *COMMON, *TINY_V2, *extra])


@pytest.fixture(scope="module")
def v2_run(mae_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("caev2") / "run"
    assert pretrain_v2(out, "--max-steps", "2", teacher=mae_run) == 0
    return out


def v2_batch(config, model):
    view, loss_fn = method_of("cae").build_task(config, model)
    samples = [view(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)) for _ in range(2)]
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}, loss_fn


def test_a_caev2_run_regresses_its_teachers_class_and_patch_features_of_the_whole_image(v2_run, mae_run):
    model, config = load_run(v2_run)
    teacher_width = load_encoder(mae_run).model.embed_dim
    assert isinstance(model, CAEv2) and config.settings.target == "teacher"
    assert config.settings.teacher == str(mae_run) and config.settings.teacher_dim == teacher_width == 32
    assert model.lm_head.out_features == teacher_width and len(model.decoder_blocks) == 0
    batch, loss_fn = v2_batch(config, model.eval())
    assert torch.equal(batch["image"], batch["tokenizer_image"])  # the teacher's view is the ViT's image
    with torch.no_grad():
        loss, metrics = loss_fn(model, batch)
        teacher = teacher_of(config).forward_with_class(batch["image"])  # [B, 1 + 64, 32]
        expected, _ = model(batch["image"], batch["mask"], teacher)
    torch.testing.assert_close(loss, expected)
    assert {"cosine", "cosine_visible"} <= metrics.keys()


def test_the_start_up_summary_names_the_alignment_weight_or_the_caev2_teacher(run, v2_run, mae_run):
    _, config = load_run(run)
    assert method_of("cae").describe(config) == ", 50% masked block-wise, alignment weight 2"
    _, config = load_run(v2_run)
    expected = (f", {config.settings.mask_ratio:.0%} masked block-wise, CAE v2: cosine to the 32-d "
                f"features of teacher '{mae_run}' at every token")
    assert method_of("cae").describe(config) == expected


@pytest.mark.slow
def test_caev2_pretrains_and_resumes_bit_for_bit(v2_run, mae_run, tmp_path):
    # v2_run first: a process's first load of a teacher draws from the run's seeded random stream, later ones
    # come from the cache (MaskDistill's and VQ-KD's runs alike), so both runs here start from a loaded one
    assert_resumes_bit_for_bit(partial(pretrain_v2, teacher=mae_run), tmp_path)


@pytest.mark.slow
def test_caev2_visualize_draws_the_image_the_masked_input_and_the_cosine_map(v2_run, tmp_path):
    assert main(["visualize", str(v2_run), "--out", str(tmp_path / "cos.png"), "--n", "2"]) == 0
    assert Image.open(tmp_path / "cos.png").size == grid_size(3, 2, 32)


def test_the_caev2_pictures_cosine_is_each_patchs_prediction_against_its_normalized_target(v2_run):
    model, config = load_run(v2_run)
    shown = torch.randn(2, 3, 32, 32)
    panels = method_of("cae").pictures(model, config, lambda size, mean, std: shown,
                                       torch.Generator().manual_seed(0))
    hidden = (panels["masked"][:, 0, ::4, ::4] != shown[:, 0, ::4, ::4]).flatten(1)  # [2, 64]
    assert hidden.any() and not hidden.all()
    pixels = hidden.view(2, 8, 8).repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]  # [2, 1, 32, 32]
    torch.testing.assert_close(panels["masked"], shown * ~pixels)  # hidden patches blank
    with torch.no_grad():
        latent = model.forward_encoder(shown, hidden)
        pred = model.forward_head(latent, model.forward_regressor(latent, hidden))  # [CLS], visible, masked
        teacher = torch.nn.functional.normalize(teacher_of(config).forward_with_class(shown), dim=-1)
    drawn = panels["cosine"][:, 0, ::4, ::4].flatten(1) * config.data.std[0] + config.data.mean[0]
    for b in range(2):
        order = [*(~hidden[b]).nonzero().flatten(), *hidden[b].nonzero().flatten()]  # the patches in pred
        cosine = torch.nn.functional.cosine_similarity(pred[b, 1:], teacher[b, 1:][order], dim=-1)
        torch.testing.assert_close(drawn[b, order], cosine.clamp(0, 1))


@pytest.mark.slow
def test_a_caev2_run_exports_its_encoder_to_timm(v2_run, tmp_path):
    model, _ = load_run(v2_run)
    assert main(["export", str(v2_run), "--to", "timm", "--out", str(tmp_path / "timm")]) == 0
    timm_model = Beit(**json.loads((tmp_path / "timm" / "config.json").read_text())["model_args"]).eval()
    timm_model.load_state_dict(load_file(tmp_path / "timm" / "model.safetensors"), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(timm_model.forward_features(imgs), model.encoder.forward_features(imgs))


@pytest.mark.slow
def test_evaluation_commands_take_a_caev2_run(v2_run, tmp_path):
    every_evaluation_command(v2_run, tmp_path)


@pytest.mark.parametrize("extra, message", [
    ((), "cae training needs a teacher: --teacher"),
    (("--teacher", "{mae}", "--tokenizer", "{dvae}"), "cae.target=teacher (CAE v2) regresses the teacher's "
                                                       "features and takes no tokenizer"),
    (("--teacher", "{mae}", "--set", "cae.align_weight=2"),
     "has no alignment branch, but cae.align_weight=2"),
    (("--teacher", "{mae}", "--set", "cae.target=pixels"),
     "config 'cae.target' must be one of tokens, teacher"),
    (("--teacher", "{mae}", "--set", "model.kwargs.decoder_depth=1"),
     "CAEv2 takes no decoder_depth: CAE v2 has no token decoder"),
    (("--teacher", "{mae}", "--set", "cae.teacher_dim=7"),
     "gives 32-d features; this run was trained on a 7-d"),
])
def test_bad_caev2_settings_are_one_line_errors(extra, message, mae_run, dvae_run, tmp_path, capsys):
    extra = [arg.format(mae=mae_run, dvae=dvae_run) for arg in extra]
    assert main(["pretrain", "cae", "--config", "caev2_fmnist", "--out", str(tmp_path / "bad"), *COMMON,
                 *TINY_V2, "--max-steps", "1", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err


def test_a_teacher_with_the_token_target_says_to_pick_caev2(mae_run, dvae_run, tmp_path, capsys):
    assert pretrain(tmp_path / "bad", "--teacher", str(mae_run), "--max-steps", "1", tokenizer=dvae_run) == 2
    err = capsys.readouterr().err.strip()
    assert "a teacher is CAE v2's target: set cae.target=teacher" in err and "\n" not in err


def test_caev2_recipes_quote_the_authors_vit_b_script_and_size_fmnist_like_their_vit_t():
    in1k = read_config(load_recipe("caev2_in1k"))
    s, kwargs = in1k.settings, in1k.model.kwargs
    assert (s.target, s.align_weight, s.mask_ratio, s.crop_scale, s.color_jitter) == ("teacher", 0.0, 0.5,
                                                                                     (0.4, 1.0), 0.4)
    assert (in1k.model.name, kwargs["regressor_depth"], "decoder_depth" in kwargs) == ("vit_base", 4, False)
    assert (in1k.optim.base_lr * 2048 / 256, in1k.train.epochs, in1k.optim.clip_grad) == (1.5e-3, 300, 3.0)
    fmnist = read_config(load_recipe("caev2_fmnist"))
    assert (fmnist.settings.target, fmnist.settings.mask_ratio, fmnist.model.kwargs["regressor_depth"]) == (
        "teacher", 0.15, 1)
