"""Configuration: recipes, dotted overrides, typed coercion and one-line errors."""

import pytest

from mimkit.config import (
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
from mimkit.methods import METHODS
from mimkit.runs import load_config


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
