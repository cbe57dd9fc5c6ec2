"""Configuration: recipes, dotted overrides, typed coercion and one-line errors."""

import shutil
from dataclasses import replace

import pytest
import torch
import yaml

from mimkit.config import (
    METHOD_SECTIONS,
    PretrainConfig,
    from_dict,
    load_recipe,
    merge,
    parse_overrides,
    recipe_names,
    save_config,
    to_dict,
)
from mimkit.errors import MimkitError
from mimkit.eval.config import FinetuneConfig
from mimkit.methods import METHODS
from mimkit.registry import method_of
from mimkit.runs import config_path, keep_config, load_config, load_encoder, load_run


@pytest.mark.parametrize("name", [n for n in recipe_names() if n.split("_")[0] in METHODS])
def test_every_pretraining_recipe_resolves(name):
    recipe = load_recipe(name)
    config = from_dict(PretrainConfig, merge(to_dict(PretrainConfig(method=recipe["method"])), recipe))
    assert config.train.batch_size > 0 and config.optim.base_lr > 0


def test_mae_in1k_recipe_has_the_paper_hyperparameters():
    config = from_dict(PretrainConfig, load_recipe("mae_in1k"))
    assert (config.model.name, config.model.patch_size, config.data.img_size) == ("vit_base", 16, 224)
    assert config.optim.base_lr == 1.5e-4 and config.optim.weight_decay == 0.05
    assert config.optim.betas == (0.9, 0.95) and config.optim.warmup_epochs == 40
    assert config.mae.mask_ratio == 0.75 and config.mae.norm_pix_loss


def test_overrides_are_parsed_as_yaml_and_nested():
    assert parse_overrides(["optim.base_lr=1e-3", "train.compile=true", "model.kwargs.depth=2"]) == {
        "optim": {"base_lr": "1e-3"}, "train": {"compile": True}, "model": {"kwargs": {"depth": 2}}}
    config = from_dict(PretrainConfig, parse_overrides(["optim.base_lr=1e-3", "optim.betas=[0.9, 0.999]"]))
    assert config.optim.base_lr == 1e-3 and config.optim.betas == (0.9, 0.999)


@pytest.mark.parametrize("values, message", [
    ({"optim": {"lrr": 1}}, "unknown config key 'optim.lrr'"),
    ({"train": {"epochs": "many"}}, "'train.epochs' must be int"),
    ({"optim": {"base_lr": "fast"}}, "'optim.base_lr' must be a number"),
    ({"train": 3}, "'train' must be a mapping"),
])
def test_bad_values_name_the_key(values, message):
    with pytest.raises(MimkitError, match=message):
        from_dict(PretrainConfig, values)


def test_bad_override_syntax():
    with pytest.raises(MimkitError, match="key=value"):
        parse_overrides(["optim.base_lr"])


def test_saved_config_round_trips(tmp_path):
    config = from_dict(PretrainConfig, parse_overrides(["data.img_size=32", "optim.clip_grad=3.0"]))
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path) == config


OWN_SECTION = {"mae": {"mask_ratio": 0.6}, "beit": {"mask_ratio": 0.3}, "beitv2": {"mask_ratio": 0.5},
               "dvae": {"vocab_size": 64}, "vqkd": {"vocab_size": 64, "teacher_dim": 16}}


@pytest.mark.parametrize("method", METHOD_SECTIONS)
def test_saved_config_holds_its_method_section_only_and_round_trips(tmp_path, method):
    config = from_dict(PretrainConfig, {"method": method, method: OWN_SECTION[method]})
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert set(saved) == {"method", "data", "model", "optim", "train", method}
    assert saved[method] == to_dict(config)[method]
    assert load_config(tmp_path) == config


def test_fine_tuning_config_saves_its_encoder_method_section_only(tmp_path):
    config = FinetuneConfig(encoder_config=to_dict(PretrainConfig(method="beit")))
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["encoder_config"]
    assert set(saved) == {"method", "data", "model", "optim", "train", "beit"}
    assert from_dict(PretrainConfig, saved) == PretrainConfig(method="beit")


def test_run_saved_with_every_section_still_loads_and_resumes(mae_run, tmp_path):
    """Runs saved before the trim hold every method's section; they load as before, and a section of
    another method that differs from today's defaults does not block resuming."""
    run = shutil.copytree(mae_run, tmp_path / "old")
    config = load_config(run)
    everything = to_dict(config) | {"beit": {**to_dict(config)["beit"], "mask_ratio": 0.3}}
    config_path(run).write_text(yaml.safe_dump(everything, sort_keys=False))
    assert set(METHOD_SECTIONS) <= set(yaml.safe_load(config_path(run).read_text()))

    old = load_config(run)
    assert old.beit.mask_ratio == 0.3 and replace(old, beit=config.beit) == config
    model, _ = load_run(run)
    reference, _ = load_run(mae_run)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 reference.state_dict().values(), strict=True))
    assert load_encoder(run).spec == old
    keep_config(run, config)  # step 2 trained: compared, not rewritten, and nothing of MAE's changed
    assert yaml.safe_load(config_path(run).read_text()) == everything


@pytest.mark.parametrize("method", ["mae", "beit", "beitv2", "vqkd"])  # the dVAE: the test below
def test_model_kwargs_typo_is_a_one_line_error_naming_the_key(method):
    config = from_dict(PretrainConfig, {"method": method, "data": {"img_size": 32, "channels": 3},
                                        "model": {"kwargs": {"dpeth": 2}}, "vqkd": {"teacher_dim": 16}})
    message = r"^config 'model.kwargs.dpeth' is not an argument of \w+; it takes: .*\bdepth\b"
    with pytest.raises(MimkitError, match=message):
        method_of(method).build_model(config)


def test_model_kwargs_given_to_the_dvae_are_refused_naming_its_own_settings():
    config = from_dict(PretrainConfig, {"method": "dvae", "data": {"img_size": 32, "channels": 3},
                                        "model": {"kwargs": {"depth": 2}}})
    message = r"^config 'model.kwargs.depth' does not apply to the dVAE: .*dvae.hidden"
    with pytest.raises(MimkitError, match=message):
        method_of("dvae").build_model(config)
