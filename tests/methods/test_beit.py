"""BEiT through the command line: dVAE tokenizer training, BEiT pretraining on its ids, resume, pictures,
one-line errors; the two-view transform and the recipes."""

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.models.beit import Beit

from mimkit.cli import main
from mimkit.config import load_recipe
from mimkit.data.loader import SeededViews
from mimkit.data.sources import build_source
from mimkit.data.transforms import BEiTView
from mimkit.errors import MimkitError
from mimkit.masking import count_for_ratio
from mimkit.methods.beit import tokenizer_views
from mimkit.methods.dvae import find_tokenizer, load_tokenizer_encoder, schedule_values
from mimkit.registry import method_of, read_config
from mimkit.runs import latest_weights, load_run
from mimkit.tokenizers.dvae import dvae_for, save_dvae
from mimkit.train.checkpoint_files import Checkpoints
from mimkit.train.metrics_log import read_metrics
from tests.conftest import assert_two_views_normalized, grid_size

COMMON = ["--data", "synthetic:64", "--batch-size", "8", "--set", "data.num_workers=0"]  # 32 px, 3 channels
TINY_DVAE = ["--set", "dvae.hidden=4", "--set", "dvae.vocab_size=32"]
TINY_BEIT = ["--model", "vit_mini", "--set", "model.kwargs.depth=2", "--set", "model.kwargs.embed_dim=64",
             "--set", "model.kwargs.num_heads=2"]


@pytest.fixture(scope="module")
def dvae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "dvae"
    assert main(["tokenizer", "train", "dvae", "--out", str(run), "--max-steps", "3", *COMMON, *TINY_DVAE,
                 "--set", "train.log_every=1"]) == 0
    return run


def beit(out, tokenizer, *extra):
    return main(["pretrain", "beit", "--tokenizer", str(tokenizer), "--out", str(out), *COMMON, *TINY_BEIT,
                 *extra])


def test_dvae_run_is_a_loadable_tokenizer_with_codebook_metrics(dvae_run):
    assert Checkpoints(dvae_run).latest() == 3
    records = [r for r in read_metrics(dvae_run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    logged = {"usage", "perplexity", "recon", "kl", "temperature", "kl_weight"}
    assert all(logged <= r.keys() for r in records)
    for r in records:  # a share of the 32 codes; exp(entropy) is at most the number of codes used
        used = r["usage"] * 32
        assert used == pytest.approx(round(used), abs=1e-4) and used >= 1
        assert 1 <= r["perplexity"] <= used + 1e-4
    assert records[0]["temperature"] == 1.0 and records[-1]["temperature"] < records[0]["temperature"]

    tokenizer = find_tokenizer(dvae_run)
    assert tokenizer.dvae["vocab_size"] == 32 and tokenizer.img_size == 32
    encoder = load_tokenizer_encoder(tokenizer)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    weights = load_file(latest_weights(dvae_run))
    assert torch.equal(encoder.net[0].weight, weights["encoder.net.0.weight"])
    ids = encoder.tokenize(torch.randn(2, 3, 32, 32))
    assert ids.shape == (2, 8, 8) and ids.max() < 32


def test_schedules_anneal_the_temperature_and_ramp_the_kl_weight():
    config = read_config({"method": "dvae", "dvae": {"temperature": [1.0, 0.0625],
                                        "temperature_anneal": 0.5, "kl_weight": 0.2, "kl_warmup": 0.1}})
    values = schedule_values(config, 100)
    temperature, kl_weight = values["temperature"], values["kl_weight"]
    assert len(temperature) == len(kl_weight) == 100
    assert temperature[0] == 1.0 and temperature[49] == temperature[-1] == 0.0625
    assert all(a >= b for a, b in zip(temperature, temperature[1:], strict=False))
    assert kl_weight[0] == 0.0 and kl_weight[9] == kl_weight[-1] == 0.2
    assert all(a <= b for a, b in zip(kl_weight, kl_weight[1:], strict=False))
    # a share that is not a whole number of steps is rounded to the nearest: 0.1 of 7 steps is 1 step of
    # warmup (the KL weight starts at 0, not at its full value), 0.5 of 7 is 4 steps of annealing, not 3
    short = schedule_values(read_config({"method": "dvae", "dvae": {"kl_warmup": 0.1, "kl_weight": 0.2,
                                                                    "temperature_anneal": 0.5}}), 7)
    assert short["kl_weight"][:2] == [0.0, 0.2]
    assert short["temperature"][2] > short["temperature"][3] == short["temperature"][-1] == 1 / 16


@pytest.mark.slow
def test_beit_pretrains_on_the_tokenizer_and_resumes_bit_for_bit(dvae_run, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert beit(straight, dvae_run, "--max-steps", "4", "--set", "train.log_every=1") == 0
    assert beit(resumed, dvae_run, "--max-steps", "4", "--set", "train.checkpoint_every=2") == 0
    checkpoints = Checkpoints(resumed)
    checkpoints.weights_path(4).unlink()  # as if stopped after the checkpoint of step 2
    checkpoints.state_path(4).unlink()
    capsys.readouterr()
    assert beit(resumed, dvae_run, "--max-steps", "4") == 0
    assert "resuming from step 2" in "".join(capsys.readouterr())

    records = [r for r in read_metrics(straight) if "loss" in r]
    assert len(records) == 4
    for r in records:  # a share of the batch's 8 x 26 masked patches (40% of 8x8), not of all 8 x 64
        hits = r["mim_acc"] * 8 * 26
        assert hits == pytest.approx(round(hits), abs=1e-3)
    one, two = load_file(latest_weights(straight)), load_file(latest_weights(resumed))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)

    model, config = load_run(straight)
    assert config.model.kwargs["vocab_size"] == 32 and config.settings.tokenizer_size == 32
    assert model.lm_head.out_features == 32
    timm_beit = Beit(**model.encoder_kwargs)
    timm_beit.load_state_dict(model.encoder.state_dict(), strict=True)


def test_visualize_draws_dvae_and_beit_runs(dvae_run, tmp_path):
    assert main(["visualize", str(dvae_run), "--out", str(tmp_path / "dvae.png"), "--n", "2"]) == 0
    assert Image.open(tmp_path / "dvae.png").size == grid_size(2, 2, 32)  # original, from tokens
    assert beit(tmp_path / "beit", dvae_run, "--max-steps", "1") == 0
    assert main(["visualize", str(tmp_path / "beit"), "--out", str(tmp_path / "beit.png"), "--n", "2"]) == 0
    # original, masked, tokens, prediction
    assert Image.open(tmp_path / "beit.png").size == grid_size(4, 2, 32)


def test_a_save_dvae_file_is_a_tokenizer_too(tmp_path):
    torch.manual_seed(0)
    model = dvae_for(28, 4, 1, vocab_size=16, hidden=4)
    file = save_dvae(model, tmp_path / "tok")
    tokenizer = find_tokenizer(file.parent)
    assert tokenizer.img_size is None and tokenizer.dvae == model.config
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(load_tokenizer_encoder(tokenizer).tokenize(x), model.tokenize(x))



def test_a_tokenizer_halving_three_times_asks_for_views_eight_times_its_code_grid(tmp_path):
    """The view size is 2**num_down pixels per code (the tests' other dVAEs halve twice: 2 * 2 = 2**2)."""
    model = dvae_for(32, 8, 3, vocab_size=16, hidden=4)  # 32 px -> 4x4 codes: three halvings
    assert model.config["num_down"] == 3
    save_dvae(model, tmp_path / "tok")
    data = {"source": "synthetic:8", "img_size": 32, "channels": 3}
    config = read_config({"method": "beit", "data": data, "model": {"name": "vit_mini", "patch_size": 8},
                          "beit": {"tokenizer": str(tmp_path / "tok")}})
    assert method_of("beit").resolve_config(config).settings.tokenizer_size == 32
    config = read_config({"method": "beit", "data": data, "model": {"name": "vit_mini", "patch_size": 4},
                          "beit": {"tokenizer": str(tmp_path / "tok"), "tokenizer_size": 32}})
    with pytest.raises(MimkitError, match=r"4x4 codes from 32 px views, but the patch grid is 8x8 "
                                          r"\(img_size 32 / patch 4\); it needs 64 px views "
                                          r"\(beit.tokenizer_size\) or a tokenizer trained for this patch "
                                          r"grid$"):
        method_of("beit").resolve_config(config)


def test_the_model_is_built_for_the_datas_channels_and_size():
    data = {"source": "synthetic:8", "img_size": 24, "channels": 1, "mean": [0.5], "std": [0.5]}
    kwargs = {"depth": 1, "embed_dim": 32, "num_heads": 2, "vocab_size": 16}  # vocab: as resolved
    config = read_config({"method": "beit", "data": data, "model": {"name": "vit_mini", "patch_size": 8,
                                                                     "kwargs": kwargs}})
    embed = method_of("beit").build_model(config).encoder.patch_embed
    assert (embed.proj.in_channels, embed.img_size, embed.patch_size) == (1, (24, 24), (8, 8))

@pytest.mark.parametrize("extra, message", [
    ([], "needs a tokenizer: --tokenizer"),
    (["--tokenizer", "/no/such/dir"], "tokenizer '/no/such/dir' does not exist"),
    (["--tokenizer", "DVAE", "--set", "model.patch_size=8"], "8x8 codes from 32 px views, but the patch grid "
                                                             "is 4x4"),
    (["--tokenizer", "DVAE", "--set", "data.channels=1"], "takes 3-channel images, the data has 1"),
    (["--tokenizer", "DVAE", "--set", "beit.mask_ratio=0.001"], "beit.mask_ratio=0.001 masks 0 of the 64"),
    (["--tokenizer", "DVAE", "--set", "model.kwargs.vocab_size=99"], "differs from the tokenizer's 32 codes"),
    (["--tokenizer", "DVAE", "--set", "beit.min_block=50"], "beit.min_block=50 is more than the 26 patches"),
    (["--tokenizer", "DVAE", "--set", "beit.min_block=0"], "'beit.min_block' must be at least 1"),
])
def test_bad_beit_input_is_one_line_error(dvae_run, tmp_path, capsys, extra, message):
    extra = [str(dvae_run) if e == "DVAE" else e for e in extra]
    assert main(["pretrain", "beit", "--out", str(tmp_path / "bad"), "--max-steps", "1", *COMMON, *TINY_BEIT,
                 *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_a_run_of_another_method_is_not_a_tokenizer(dvae_run, tmp_path, capsys):
    beit_run = tmp_path / "beit"
    assert beit(beit_run, dvae_run, "--max-steps", "1") == 0
    assert beit(tmp_path / "bad", beit_run, "--max-steps", "1") == 2
    assert "holds a beit run, not a dVAE tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("img_size, tokenizer_size, patch_size", [(28, 28, 4), (32, 16, 8)])
def test_beit_view_masks_exact_counts_reproducibly_on_one_crop(img_size, tokenizer_size, patch_size):
    source = build_source("synthetic:8", channels=3)
    grid = img_size // patch_size
    num_masked = count_for_ratio(grid * grid, 0.4)
    view = BEiTView(img_size, tokenizer_size, [0.5] * 3, [0.5] * 3, [0.5] * 3, [0.5] * 3, grid, num_masked,
                    scale=(0.2, 1.0))
    views = SeededViews(source, view)
    first = [views[(i, 100 + i)] for i in range(8)]
    again = [views[(i, 100 + i)] for i in range(8)]
    for a, b in zip(first, again, strict=True):
        assert a["mask"].shape == (grid * grid,) and a["mask"].dtype == torch.bool
        assert int(a["mask"].sum()) == num_masked
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert a["image"].shape[-1] == img_size and a["tokenizer_image"].shape[-1] == tokenizer_size
        # the tokenizer's view is the same crop: the ViT's view shrunk to its size matches it
        shrunk = torch.nn.functional.interpolate(a["image"][None], size=tokenizer_size, mode="area")[0]
        assert torch.corrcoef(torch.stack([shrunk.flatten(), a["tokenizer_image"].flatten()]))[0, 1] > 0.9
    assert len({tuple(v["mask"].tolist()) for v in first}) > 1  # masks differ between samples


def test_beit_in1k_recipe_has_the_paper_hyperparameters():
    config = read_config(load_recipe("beit_in1k"))
    assert (config.model.name, config.model.patch_size, config.data.img_size) == ("vit_base", 16, 224)
    assert config.optim.base_lr * 2048 / 256 == pytest.approx(1.5e-3)
    assert config.optim.betas == (0.9, 0.999) and config.optim.weight_decay == 0.05
    assert config.optim.warmup_epochs == 10 and config.train.epochs == 800
    assert config.model.kwargs == {"layer_scale_init": 0.1, "drop_path_rate": 0.1,
                                   "shared_rel_pos_bias": True}
    assert count_for_ratio(196, config.settings.mask_ratio) == 75 and config.settings.min_block == 16
    assert config.settings.tokenizer_size == 112
    assert read_config(load_recipe("dvae_in1k")).settings.vocab_size == 8192


@pytest.mark.parametrize("method", ["beit", "cae"])
def test_the_tokenizers_images_are_normalized_as_it_was_trained_not_as_the_run(dvae_run, method):
    """A run whose data is normalized otherwise than its tokenizer's data was: the ViT's view is the run's,
    the tokenizer's view (in training and in the pictures) the tokenizer's own."""
    tokenizer = find_tokenizer(dvae_run)
    data = {"source": "synthetic:8", "img_size": 32, "channels": 3, "mean": [0.2] * 3, "std": [0.3] * 3}
    assert tokenizer.mean != data["mean"] and tokenizer.std != data["std"]
    kwargs = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    kwargs |= {"regressor_depth": 1} if method == "cae" else {}
    config = read_config({"method": method, "data": data, "model": {"name": "vit_mini", "kwargs": kwargs},
                          method: {"tokenizer": str(dvae_run), "color_jitter": 0.0}})
    config = method_of(method).resolve_config(config)
    view, _ = method_of(method).build_task(config, method_of(method).build_model(config))
    assert_two_views_normalized(view, (data["mean"], data["std"]), (tokenizer.mean, tokenizer.std))
    asked = []
    tokenizer_views(config, lambda size, mean, std: asked.append((size, list(mean), list(std)))
                    or torch.zeros(1, 3, size, size), torch.Generator())
    assert asked == [(32, data["mean"], data["std"]),
                     (config.settings.tokenizer_size, tokenizer.mean, tokenizer.std)]


def test_a_tokenizer_trained_on_smaller_views_gives_the_run_its_view_size(tmp_path):
    """A dVAE run trained on 16 px views of 32 px images (one halving to the 8x8 patch grid): its pictures
    and a BEiT run on it feed it 16 px views, as trained."""
    assert main(["tokenizer", "train", "dvae", "--out", str(tmp_path / "dvae"), "--max-steps", "1", *COMMON,
                 *TINY_DVAE, "--set", "dvae.tokenizer_size=16"]) == 0
    assert find_tokenizer(tmp_path / "dvae").img_size == 16
    dvae, dvae_config = load_run(tmp_path / "dvae")
    asked = []
    panels = method_of("dvae").pictures(dvae, dvae_config, lambda size, mean, std: asked.append(size)
                                        or torch.zeros(2, 3, size, size), torch.Generator())
    assert asked == [16] and all(panel.shape == (2, 3, 16, 16) for panel in panels.values())  # as trained
    data = {"source": "synthetic:8", "img_size": 32, "channels": 3}
    config = read_config({"method": "beit", "data": data, "model": {"name": "vit_mini", "patch_size": 4},
                          "beit": {"tokenizer": str(tmp_path / "dvae")}})
    assert method_of("beit").resolve_config(config).settings.tokenizer_size == 16
    # 8 px patches, a 4x4 grid: the tokenizer's halving needs 8 px views, which the run asks for
    config = read_config({"method": "beit", "data": data, "model": {"name": "vit_mini", "patch_size": 8},
                          "beit": {"tokenizer": str(tmp_path / "dvae"), "tokenizer_size": 8}})
    assert method_of("beit").resolve_config(config).settings.tokenizer_size == 8
