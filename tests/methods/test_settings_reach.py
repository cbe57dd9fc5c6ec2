"""Every setting of every method reaches what it changes: a non-default value gives another view, loss,
scheduled value or trained state than the default does.

The fresh planted sets found settings dropped on their way (a run's ``data2vec.loss_beta`` not handed to the
model, whose own default was the method's): the config held the value, no result showed it. `run_once`
does what a pretraining run does with a method (`mimkit.pretrain.pretraining_job`: resolve the settings,
build the model and its view, then a training step on two seeded samples and the method's ``after_step``)
and returns everything that step gives. Each case changes one setting (on top of a base that makes it
matter: a teacher decay anneals only with ``teacher_anneal_steps``) and asserts the outcome differs.
"""

import pytest
import torch

from mimkit.cli import main
from mimkit.errors import MimkitError
from mimkit.registry import method_of, read_config
from mimkit.tokenizers.dvae import dvae_for, save_dvae
from tests.conftest import same_outcomes

DATA = {"source": "synthetic:64", "img_size": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3}
VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2}
MODEL = {  # 4-px patches (an 8x8 grid) unless the method's case needs 8-px ones (a 4x4 grid)
    "mae": {"kwargs": VIT | {"decoder_depth": 1, "decoder_embed_dim": 32, "decoder_num_heads": 2}},
    "cae": {"kwargs": VIT | {"regressor_depth": 1}},  # CAE v2 takes no decoder_depth
    "maskfeat": {"patch_size": 8},
    "maskdistill": {"patch_size": 8},
    "dvae": {"kwargs": {}},  # its size is its own settings'
}
CROP = (0.2, 0.4)  # a crop scale none of the methods has by default

CASES = [
    ("mae", {}, "mask_ratio", 0.5), ("mae", {}, "norm_pix_loss", False),
    ("simmim", {"mask_patch_size": 8}, "mask_ratio", 0.3),
    ("simmim", {"mask_patch_size": 8}, "mask_patch_size", 16),
    ("simmim", {"mask_patch_size": 8}, "crop_scale", CROP),
    *[("maskfeat", {"hog_cell": 4}, name, value) for name, value in
      (("mask_ratio", 0.6), ("min_block", 4), ("hog_bins", 6), ("hog_cell", 2), ("hog_window", 0),
       ("crop_scale", CROP))],
    *[("data2vec", {"top_k": 2}, name, value) for name, value in
      (("mask_ratio", 0.4), ("min_block", 4), ("top_k", 1), ("block_norm", "instance"),
       ("target_norm", "none"), ("loss_beta", 0.0), ("teacher_decay_end", 0.5), ("crop_scale", CROP),
       ("color_jitter", 0.0))],
    ("data2vec", {"top_k": 2, "teacher_anneal_steps": 10}, "teacher_decay_start", 0.5),
    ("data2vec", {"top_k": 2, "teacher_decay_start": 0.0}, "teacher_anneal_steps", 10),
    *[("dvae", {"hidden": 4, "vocab_size": 32}, name, value) for name, value in
      (("vocab_size", 16), ("hidden", 8), ("num_res", 2), ("recon_loss", "l1"), ("tokenizer_size", 64),
       ("temperature", (0.5, 0.1)), ("temperature_anneal", 0.2), ("kl_weight", 0.5), ("kl_warmup", 0.5),
       ("crop_scale", CROP))],
    *[("beit", {"tokenizer": "DVAE"}, name, value) for name, value in
      (("mask_ratio", 0.6), ("min_block", 4), ("crop_scale", CROP), ("color_jitter", 0.0))],
    *[("beitv2", {"tokenizer": "VQKD"}, name, value) for name, value in
      (("mask_ratio", 0.6), ("min_block", 4), ("crop_scale", CROP), ("color_jitter", 0.0))],
    *[("cae", {"tokenizer": "DVAE"}, name, value) for name, value in
      (("mask_ratio", 0.3), ("min_block", 12), ("crop_scale", CROP), ("color_jitter", 0.4),
       ("align_weight", 0.5))],
    *[("cae", {"target": "teacher", "teacher": "MAE", "align_weight": 0.0}, name, value) for name, value in
      (("mask_ratio", 0.3), ("min_block", 12), ("crop_scale", CROP), ("color_jitter", 0.4))],  # CAE v2
    *[("maskdistill", {"teacher": "MAE"}, name, value) for name, value in
      (("loss", "cosine"), ("smooth_l1_beta", 0.1), ("target_norm", False), ("mask_ratio", 0.6),
       ("min_block", 4), ("crop_scale", CROP), ("color_jitter", 0.0))],
    *[("vqkd", {"teacher": "MAE", "vocab_size": 32, "decoder_depth": 1}, name, value) for name, value in
      (("vocab_size", 16), ("code_dim", 8), ("decoder_depth", 2), ("decay", 0.5), ("commitment", 0.5),
       ("kmeans_iters", 0), ("crop_scale", CROP))],
    ("vqkd", {"teacher": "MAE", "vocab_size": 32, "decoder_depth": 1, "kmeans_iters": 0}, "dead_after", 1),
]


def built(method: str, settings: dict, kwargs: dict | None = None, data: dict | None = None):
    """What a run of ``method`` with ``settings`` builds (as `mimkit.pretrain.pretraining_job` does): its
    record, config, model (seeded 0), view and loss. ``kwargs`` go over the model's arguments (e.g. another
    depth), ``data`` over `DATA` (e.g. another normalization)."""
    record = method_of(method)
    model = {"name": "vit_mini", "kwargs": VIT} | MODEL.get(method, {})
    if kwargs:
        model["kwargs"] = model["kwargs"] | kwargs
    config = read_config({"method": method, "data": DATA | (data or {}), "model": model, method: settings})
    if record.resolve_config:
        config = record.resolve_config(config)
    torch.manual_seed(0)
    model = record.build_model(config)
    return record, config, model, *record.build_task(config, model)


def first_step(method: str, settings: dict, kwargs: dict | None = None):
    """What a run of ``method`` with ``settings`` takes its first step with: its record, config, model, loss
    (`built`), a batch of two seeded samples its view made and the values scheduled for 10 steps."""
    record, config, model, view, loss_fn = built(method, settings, kwargs)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    samples = [view(image) for image in images]
    batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
    scheduled = record.schedule_values(config, 10) if record.schedule_values else {}
    return record, config, model, loss_fn, batch, scheduled


def run_once(method: str, settings: dict) -> list[torch.Tensor]:
    """One training step of ``method`` with ``settings``, as a run takes it: the two samples its view made,
    the loss, the values scheduled for step 3 of 10, and the model's state after the step and after_step."""
    record, config, model, loss_fn, batch, scheduled = first_step(method, settings)
    loss, _ = loss_fn(model, batch | {name: values[3] for name, values in scheduled.items()})
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    if record.after_step:
        record.after_step(config, model, 1)
    state = model.state_dict().values()
    return [*batch.values(), loss.detach(), *map(torch.tensor, scheduled.values()), *state]


def located(settings: dict, dvae_file, mae_run, vqkd_run) -> dict:
    """``settings`` with DVAE, VQKD (tokenizers) and MAE (a teacher) replaced by the fixtures' paths."""
    files = {"DVAE": str(dvae_file), "VQKD": str(vqkd_run), "MAE": str(mae_run)}
    return {key: files.get(v, v) if isinstance(v, str) else v for key, v in settings.items()}


@pytest.fixture(scope="module")
def dvae_file(tmp_path_factory):
    """A tiny untrained dVAE whose 8x8 code grid is the 4-px patch grid of a 32 px image."""
    return save_dvae(dvae_for(32, 4, 3, vocab_size=32, hidden=4), tmp_path_factory.mktemp("dvae") / "dvae.st")


@pytest.fixture(scope="module")
def vqkd_run(mae_run, tmp_path_factory):
    """A VQ-KD tokenizer distilled for one step from the MAE run, reading 32 px images in 4-px patches."""
    run = tmp_path_factory.mktemp("vqkd") / "vqkd"
    dims = {"data.img_size": 32, "data.num_workers": 0, "model.patch_size": 4, "model.kwargs.depth": 1,
            "model.kwargs.embed_dim": 32, "model.kwargs.num_heads": 2, "vqkd.vocab_size": 32,
            "vqkd.decoder_depth": 1, "vqkd.eval_images": 8}
    assert main(["tokenizer", "train", "vqkd", "--teacher", str(mae_run), "--out", str(run), "--data",
                 "synthetic:64", "--max-steps", "1", "--batch-size", "8",
                 *[arg for key, value in dims.items() for arg in ("--set", f"{key}={value}")]]) == 0
    return run


@pytest.mark.parametrize("method, base, name, value", CASES,
                         ids=[f"{method}.{name}" for method, _, name, _ in CASES])
def test_a_non_default_setting_changes_what_a_training_step_gives(method, base, name, value, dvae_file,
                                                                   mae_run, vqkd_run):
    base = located(base, dvae_file, mae_run, vqkd_run)
    assert value != getattr(method_of(method).settings(), name)
    assert not same_outcomes(run_once(method, base), run_once(method, base | {name: value}))


@pytest.mark.parametrize("method", sorted({method for method, *_ in CASES}))
def test_two_runs_with_the_same_settings_give_the_same(method, dvae_file, mae_run, vqkd_run):
    """What the test above compares is deterministic: otherwise every setting would seem to reach."""
    base = located(next(base for m, base, *_ in CASES if m == method), dvae_file, mae_run, vqkd_run)
    assert same_outcomes(run_once(method, base), run_once(method, base))


@pytest.mark.parametrize("method", sorted({method for method, *_ in CASES}))
def test_every_methods_view_mirrors_about_half_its_samples_and_all_their_images_at_once(method, dvae_file,
                                                                                     mae_run, vqkd_run):
    """Every method's pretraining view flips horizontally at random, as each paper's does: on an image that
    brightens from left to right (which a crop, a resize, a colour jitter and the normalization all keep
    brightening), some of 40 samples come out darkening to the right and some not; a sample's images (BEiT's
    tokenizer input beside its own) turn together."""
    base = located(next(base for m, base, *_ in CASES if m == method), dvae_file, mae_run, vqkd_run)
    view = built(method, base)[3]
    ramp = torch.linspace(0, 255, 40).round().to(torch.uint8).expand(3, 40, 40).contiguous()
    mirrored = []
    for seed in range(40):
        torch.manual_seed(seed)
        images = [v for v in view(ramp).values() if v.is_floating_point() and v.dim() == 3]
        turned = {bool(image[..., -2:].mean() < image[..., :2].mean()) for image in images}
        assert images and len(turned) == 1, f"seed {seed}: the sample's images turned apart"
        mirrored += turned
    assert 8 <= sum(mirrored) <= 32, f"{sum(mirrored)} of 40 samples mirrored"


def test_a_dvae_of_its_own_size_trains_on_crops_of_that_size():
    """``dvae.tokenizer_size`` is the side the dVAE sees (BEiT's 112 px beside 224 px images): its training
    crops come out at that side, not at the data's 32 px."""
    view = built("dvae", {"hidden": 4, "vocab_size": 32, "tokenizer_size": 64})[3]
    assert view(torch.zeros(3, 40, 40, dtype=torch.uint8))["image"].shape == (3, 64, 64)


@pytest.mark.parametrize("method", ["mae", "simmim", "maskfeat", "data2vec"])
def test_the_model_is_built_for_the_datas_channels_and_size(method):
    """A run of one-channel 24 px images: its model embeds one channel at 24 px, and a training step on its
    view's samples gives a finite loss (a pixel target of three channels would not fit)."""
    record = method_of(method)
    data = DATA | {"img_size": 24, "channels": 1, "mean": [0.5], "std": [0.5]}
    own = {"data2vec": {"top_k": 2}, "simmim": {"mask_patch_size": 8}}.get(method, {})
    config = read_config({"method": method, "data": data, "model": {"name": "vit_mini", "kwargs": VIT}
                          | MODEL.get(method, {}), method: own})
    torch.manual_seed(0)
    model = record.build_model(config)
    view, loss_fn = record.build_task(config, model)
    samples = [view(torch.randint(0, 256, (1, 30, 30), dtype=torch.uint8)) for _ in range(2)]
    loss, _ = loss_fn(model, {key: torch.stack([s[key] for s in samples]) for key in samples[0]})
    embed = model.encoder.patch_embed
    assert (embed.proj.in_channels, embed.img_size) == (1, (24, 24)) and torch.isfinite(loss)


@pytest.mark.parametrize("method", ["mae", "simmim", "maskfeat", "data2vec", "beit", "beitv2", "cae",
                                    "maskdistill"])
def test_a_model_argument_the_model_does_not_take_is_a_one_line_error(method):
    own = {"maskdistill": {"teacher_dim": 32}}.get(method, {})
    model = {"name": "vit_mini", "kwargs": {"wings": 2}}
    config = read_config({"method": method, "data": DATA, "model": model, method: own})
    with pytest.raises(MimkitError, match=r"^config 'model.kwargs.wings' is not an argument of \w+; "):
        method_of(method).build_model(config)


@pytest.mark.parametrize("method, own", [("maskdistill", {}),
                                         ("cae", {"target": "teacher", "align_weight": 0.0})])
def test_a_teachers_width_left_unresolved_is_a_one_line_error(method, own):
    """``teacher_dim`` is the run's teacher's, written in when training starts: a model built before is
    refused in one line (not a ``TypeError`` from inside the model)."""
    config = read_config({"method": method, "data": DATA, "model": {"name": "vit_mini", "kwargs": VIT},
                          method: own | {"teacher": "runs/mae"}})
    with pytest.raises(MimkitError, match=rf"^{method}.teacher_dim is unset: the run's teacher fills it in"):
        method_of(method).build_model(config)
