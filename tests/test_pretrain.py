"""A pretraining run's set-up (`mimkit.pretrain`): the data fields left to the source; the job handed to the
runner (its method's hooks, the library call's defaults, the data settings that reach its source, the seeded
initial weights, the start-up summary), taken as `tests.test_job_settings.job_of` takes it, so nothing trains;
and what ``mimkit visualize`` draws of a run: the test images the seed picks, from ``data.root``, in the run's
channels, a folder's training images when it has no test split."""

from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

import mimkit.pretrain as pretrain
from mimkit.cli import main
from mimkit.config import PretrainConfig
from mimkit.data.source_info import SourceInfo
from mimkit.data.sources import build_source
from mimkit.errors import MimkitError
from mimkit.pretrain import resolve_data, visualize_pretraining
from mimkit.registry import method_of, read_config
from mimkit.runs import load_config, load_run, load_trained
from mimkit.train.checkpoint_files import Checkpoints
from tests.conftest import TINY_MAE_KWARGS, jpeg, photo, write_idx
from tests.test_job_settings import MAE_MODEL, job_of

# 32-px tiles are drawn 3x (`mimkit.viz.image_grid`), 4 px from the left, under an 18-px header
SCALE, LEFT, TOP = 3, 4, 22


def first_tile(picture) -> torch.Tensor:
    """The first drawn image (the original, MAE's first column) at its own size, as (C, H, W) pixels."""
    drawn = np.array(Image.open(picture).convert("RGB"))
    side = 32 * SCALE
    return torch.tensor(drawn[TOP:TOP + side, LEFT:LEFT + side][::SCALE, ::SCALE]).permute(2, 0, 1).int()


def test_the_sources_size_channels_and_normalization_fill_only_what_the_config_leaves():
    info = SourceInfo("folder", 3, 48, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 0, [])
    filled = resolve_data(PretrainConfig(), info).data
    assert (filled.img_size, filled.channels, filled.mean, filled.std) == (48, 3, [0.1, 0.2, 0.3],
                                                                          [0.4, 0.5, 0.6])
    config = PretrainConfig()
    config = replace(config, data=replace(config.data, img_size=32, mean=[0.5] * 3, std=[0.25] * 3))
    kept = resolve_data(config, info).data
    assert (kept.img_size, kept.mean, kept.std) == (32, [0.5] * 3, [0.25] * 3)
    with pytest.raises(MimkitError, match="differ in size; set one with --set data.img_size=224$"):
        resolve_data(PretrainConfig(), replace(info, image_size=None))


@pytest.mark.parametrize("seed", [0, 3])
def test_visualize_draws_the_test_images_the_seed_picks(mae_run, tmp_path, seed):
    """``mimkit visualize`` on a pretraining run (its kind's `visualize_pretraining`)."""
    config = load_config(mae_run)
    picture = tmp_path / "recon.png"
    assert main(["visualize", str(mae_run), "--out", str(picture), "--n", "2", "--seed", str(seed)]) == 0
    test = build_source(config.data.source, "test")
    first = int(torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[0])
    assert (first_tile(picture) - test[first][0].int()).abs().max() <= 1


def test_visualize_draws_a_folders_training_images_when_it_has_no_test_split(mae_run, tmp_path):
    """A folder without splits is drawn from its training images, in the run's channels (grey files, a
    3-channel run)."""
    folder = tmp_path / "images"
    folder.mkdir()
    values = (40, 200)
    for i, value in enumerate(values):
        Image.fromarray(np.full((32, 32), value, np.uint8)).save(folder / f"{i}.png")
    config = load_config(mae_run)
    config = replace(config, data=replace(config.data, source=str(folder), channels=3))
    picture = tmp_path / "recon.png"
    visualize_pretraining(config, mae_run, picture, 1, 0)
    first = int(torch.randperm(2, generator=torch.Generator().manual_seed(0))[0])
    assert (first_tile(picture) - values[first]).abs().max() <= 1



def test_visualize_reads_the_test_images_from_data_root(mae_run, tmp_path, tiny_mnist):
    """A run's MNIST test images from its ``data.root`` (not its training images, which a source without a
    test split would give)."""
    write_idx(tiny_mnist / "t10k-images-idx3-ubyte.gz", np.full((4, 8, 8), 200, np.uint8))
    config = load_config(mae_run)
    config = replace(config, data=replace(config.data, source="mnist", root=str(tiny_mnist), channels=3))
    picture = tmp_path / "recon.png"
    visualize_pretraining(config, mae_run, picture, 1, 0)
    assert (first_tile(picture) - 200).abs().max() <= 1



@pytest.fixture(scope="module")
def grey_run(tmp_path_factory):
    """A tiny MAE trained one step on 1-channel synthetic images."""
    run = tmp_path_factory.mktemp("grey") / "mae"
    tiny = [arg for kv in TINY_MAE_KWARGS for arg in ("--set", f"model.kwargs.{kv}")]
    assert main(["pretrain", "mae", "--data", "synthetic:16", "--out", str(run), "--max-steps", "1",
                 "--batch-size", "8", "--set", "data.num_workers=0", "--set", "data.channels=1", *tiny]) == 0
    return run


def test_visualize_reads_the_images_in_the_runs_channels(grey_run, tmp_path):
    """A 1-channel run draws the 3-channel test images of its data, and a colour folder's, as grey."""
    assert main(["visualize", str(grey_run), "--out", str(tmp_path / "test.png"), "--n", "1"]) == 0
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(photo(32, 32)).save(folder / "colour.png")
    config = load_config(grey_run)
    picture = tmp_path / "folder.png"
    visualize_pretraining(replace(config, data=replace(config.data, source=str(folder))), grey_run, picture,
                          1, 0)
    tile = first_tile(picture)
    assert torch.equal(tile[0], tile[1]) and torch.equal(tile[1], tile[2])
    grey = torch.tensor(np.array(Image.fromarray(photo(32, 32)).convert("L"))).int()
    assert (tile[0] - grey).abs().max() <= 1


TINY_VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2}
# method -> (its settings, its model): the methods whose record has a hook the job must carry
HOOKED = {
    "data2vec": ({"top_k": 1}, {"kwargs": TINY_VIT}),  # after_step: the EMA teacher
    "dvae": ({"hidden": 4, "vocab_size": 16}, {"kwargs": {}}),  # schedule_values: the Gumbel temperature
    "vqkd": ({"vocab_size": 16, "decoder_depth": 1, "kmeans_iters": 0, "eval_images": 4},  # resolve_config,
             {"kwargs": TINY_VIT}),  # build_evaluate
}


@pytest.mark.parametrize("method", HOOKED)
def test_a_pretraining_job_carries_its_methods_hooks(monkeypatch, tmp_path, mae_run, method):
    """`pretraining_job` hands the runner the method's extras, built on the job's own (resolved)
    configuration and model: the teacher the config names fills ``vqkd.teacher_dim``, the temperature is in
    the plan, the teacher moves after each step, the held-out evaluation runs on the model."""
    settings, model = HOOKED[method]
    settings = {**settings, "teacher": str(mae_run)} if method == "vqkd" else settings
    values = {"method": method, "data": {"source": "synthetic:16", "num_workers": 0}, "model": model,
              "train": {"batch_size": 4, "max_steps": 6}, method: settings}
    job = job_of(monkeypatch, pretrain, pretrain.run_pretraining, read_config(values), tmp_path / "run")
    assert job.kind == ("pretraining" if method == "data2vec" else "tokenizer")  # what its config.yaml says
    record = method_of(method)
    if record.schedule_values:
        assert job.plan.schedule.values == record.schedule_values(job.config, 6)
        assert job.plan.schedule.values["temperature"][0] != job.plan.schedule.values["temperature"][-1]
    else:
        assert job.plan.schedule.values == {}
    if record.after_step:
        before = [t.clone() for t in job.model.teacher.state_dict().values()]
        with torch.no_grad():
            for p in job.model.parameters():
                p.add_(1.0)
        job.after_step(1)
        after = list(job.model.teacher.state_dict().values())
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    else:
        assert job.after_step is None
    if record.build_evaluate:
        assert job.config.settings.teacher_dim == 32  # the MAE run's width, resolved before the model
        assert set(job.evaluation.evaluate(job.model)) == {"val_usage", "val_perplexity", "val_cosine"}
    else:
        assert job.evaluation is None


MAE_PATCH = 8  # the folder jobs' patch size, which --auto-size changes for 16-px images


def image_folder(folder, side: int, count: int):
    """``count`` JPEG photographs of ``side`` px, unlabeled, in ``folder``."""
    folder.mkdir(exist_ok=True)
    for i in range(count):
        (folder / f"{i}.jpg").write_bytes(jpeg(photo(side, side, seed=i)))
    return folder


def folder_job(monkeypatch, folder, out, img_size: int, **options):
    values = {"method": "mae", "data": {"source": str(folder), "img_size": img_size, "num_workers": 0},
              "model": MAE_MODEL | {"patch_size": MAE_PATCH}, "train": {"batch_size": 2, "max_steps": 1}}
    values |= options.pop("values", {})
    run = partial(pretrain.run_pretraining, **options)
    return job_of(monkeypatch, pretrain, run, read_config(values), out)


def test_a_library_call_neither_resizes_nor_lists_the_folder_again_unless_asked(monkeypatch, tmp_path):
    """`run_pretraining`'s defaults: images much smaller than ``data.img_size`` are trained at that size
    (``auto_size=True`` fits them), and a run directory's stored file list is read (``rescan=True`` lists
    the folder again)."""
    folder, out = image_folder(tmp_path / "images", 16, 4), tmp_path / "run"
    job = folder_job(monkeypatch, folder, out, 64)
    assert job.config.data.img_size == 64 and not job.facts["auto_size"]
    assert job.summary[-1].startswith("hint      images (median 16x16) are much smaller than 64 px")
    (folder / "new.jpg").write_bytes(jpeg(photo(16, 16, seed=9)))
    assert len(folder_job(monkeypatch, folder, out, 64).dataset) == 4
    assert len(folder_job(monkeypatch, folder, out, 64, rescan=True).dataset) == 5
    fitted = folder_job(monkeypatch, folder, tmp_path / "auto", 64, auto_size=True)
    assert fitted.config.data.img_size == 16 and fitted.facts["auto_size"]
    assert fitted.config.model.patch_size == fitted.facts["size_hint"]["model.patch_size"] != MAE_PATCH


def test_auto_size_is_refused_for_a_run_with_checkpoints_and_said_only_where_it_applies(monkeypatch,
                                                                                       tmp_path):
    folder, out = image_folder(tmp_path / "images", 16, 4), tmp_path / "run"
    Checkpoints(out).save(1, folder_job(monkeypatch, folder, out, 64).model, {"step": 1})
    with pytest.raises(MimkitError, match="--auto-size would change the image and patch size of the run in "
                                          ".*which has checkpoints"):
        folder_job(monkeypatch, folder, out, 64, auto_size=True)
    fits = folder_job(monkeypatch, folder, tmp_path / "fits", 16, auto_size=True)  # nothing to fit
    assert fits.config.data.img_size == 16 and not fits.facts["size_hint"] and not fits.facts["auto_size"]
    assert not any(line.startswith("auto-size") for line in fits.summary)


def test_a_large_jpeg_is_decoded_at_three_times_the_image_size_and_data_max_image_pixels_applies(
        monkeypatch, tmp_path):
    """A 256-px JPEG trained at 32 px is decoded at the smallest DCT scale that keeps 3 x 32 = 96 px (128,
    not 32: every crop keeps its detail); a configured pixel limit below its 65,536 pixels refuses it."""
    folder = image_folder(tmp_path / "images", 256, 2)
    job = folder_job(monkeypatch, folder, tmp_path / "run", 32)
    assert job.dataset.source.load(0).shape == (3, 128, 128)
    job = folder_job(monkeypatch, folder, tmp_path / "limited", 32,
                     values={"data": {"source": str(folder), "img_size": 32, "num_workers": 0,
                                      "max_image_pixels": 60_000}})
    with pytest.raises(ValueError):
        job.dataset.source.load(0)


def test_a_pretraining_run_is_loaded_as_its_kind_loads_it(mae_run):
    """`load_trained` gives the run's model with its weights (`mimkit.kinds.Kind.load`)."""
    model, config = load_trained(mae_run)
    reference, _ = load_run(mae_run)
    assert config == load_config(mae_run)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(),
                                                   strict=True))


def test_a_library_call_resumes_only_under_the_runs_own_configuration_unless_forced(monkeypatch, tmp_path):
    """`run_pretraining` opens the run with ``force_config`` False unless given (the runner then refuses a
    trained run's other configuration: `mimkit.runs.keep_config`)."""
    forced = []
    monkeypatch.setattr(pretrain, "run_job", lambda run, job, *rest: forced.append(run.force_config) or {})
    config = read_config({"method": "mae", "data": {"source": "synthetic:8", "num_workers": 0},
                          "model": MAE_MODEL, "train": {"batch_size": 2}})
    pretrain.run_pretraining(config, tmp_path / "a")
    pretrain.run_pretraining(config, tmp_path / "b", force_config=True)
    assert forced == [False, True]


class _Plan:
    def describe(self) -> str:
        return "10 steps"


@pytest.mark.parametrize("auto_size, resumed_from, last", [
    (False, None, "hint      images (median 16x16) are much smaller than 64 px: --set data.img_size=16 "
                  "--set model.patch_size=2 fits them (or --auto-size)"),
    (False, 3, "run       10 steps"),  # too late to change a resumed run's size
    (True, None, "auto-size data.img_size=16 model.patch_size=2 fits images of median 16x16"),
])
def test_the_summary_names_the_data_list_recipe_model_plan_and_the_size_that_fits(auto_size, resumed_from,
                                                                                    last):
    config = read_config({"method": "mae", "data": {"img_size": 64}, "model": {"patch_size": 8}})
    facts = {"data": "folder: 4 images", "file_list": "file list: stored", "recipe": "mae_small: why",
             "size_hint": {"data.img_size": 16, "model.patch_size": 2}, "median_size": "16x16",
             "auto_size": auto_size, "resumed_from": resumed_from}
    lines = pretrain.summary_lines(config, facts, _Plan())
    assert lines[:4] == ["data      folder: 4 images", "          file list: stored",
                         "recipe    mae_small: why",
                         "model     mae vit_mini, 64 px in 8-px patches (8x8 grid), 75% masked"]
    assert lines[-1] == last and lines[4] == "run       10 steps"
    facts |= {"file_list": "", "recipe": "", "size_hint": {}, "auto_size": False}  # as the job says it
    assert len(pretrain.summary_lines(config, facts, _Plan())) == 3


def test_a_job_reads_its_data_from_data_root_in_data_channels(monkeypatch, tmp_path, tiny_mnist):
    values = {"method": "mae", "data": {"source": "mnist", "root": str(tiny_mnist), "channels": 3,
                                        "num_workers": 0},
              "model": MAE_MODEL | {"patch_size": 4}, "train": {"batch_size": 2}}
    job = job_of(monkeypatch, pretrain, pretrain.run_pretraining, read_config(values), tmp_path / "run")
    assert len(job.dataset) == 10 and job.dataset.source[0][0].shape == (3, 8, 8)
    assert (job.config.data.img_size, job.config.data.channels) == (8, 3)
    assert "10 images for training, 4 held out" in job.facts["data"]
    assert job.checkpointed is job.model  # what train.grad_checkpointing turns on


def test_the_initial_weights_follow_train_seed_and_nothing_else(monkeypatch, tmp_path):
    """Every process of a run starts from the same weights: those ``train.seed`` draws, whatever was drawn
    before the job was set up."""
    def initial(seed: int) -> list[torch.Tensor]:
        torch.rand(seed + 1)  # the global generator's state before the job differs from call to call
        values = {"method": "mae", "data": {"source": "synthetic:8", "num_workers": 0}, "model": MAE_MODEL,
                  "train": {"batch_size": 2, "seed": seed}}
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        job = job_of(monkeypatch, pretrain, pretrain.run_pretraining, read_config(values), out)
        return list(job.model.state_dict().values())

    first, again, other = initial(0), initial(0), initial(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
