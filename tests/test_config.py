"""Configuration: recipes, dotted overrides, typed coercion and one-line errors."""

import dataclasses
import shutil
import types
import typing

import pytest
import torch
import yaml

import mimkit.eval.config as eval_config
from mimkit.config import (
    DataConfig,
    PretrainConfig,
    TrainConfig,
    check_crop_scale,
    check_range,
    differences,
    from_dict,
    load_recipe,
    merge,
    parse_overrides,
    pretrain_from_dict,
    read_yaml,
    recipe_names,
    save_config,
    to_dict,
)
from mimkit.errors import MimkitError
from mimkit.eval.config import (
    FinetuneConfig,
    FinetuneOptimConfig,
    KnnConfig,
    LinprobeConfig,
    ProbeConfig,
    SegmentConfig,
    SegmentOptimConfig,
)
from mimkit.methods import METHODS
from mimkit.registry import method_of, read_config, registered
from mimkit.runs import config_path, keep_config, load_config, load_encoder, load_run


@pytest.mark.parametrize("name", [n for n in recipe_names() if n.split("_")[0] in METHODS])
def test_every_pretraining_recipe_resolves(name):
    recipe = load_recipe(name)
    config = read_config(recipe)
    assert config.train.batch_size > 0 and config.optim.base_lr > 0


def test_mae_in1k_recipe_has_the_paper_hyperparameters():
    config = read_config(load_recipe("mae_in1k"))
    assert (config.model.name, config.model.patch_size, config.data.img_size) == ("vit_base", 16, 224)
    assert config.optim.base_lr == 1.5e-4 and config.optim.weight_decay == 0.05
    assert config.optim.betas == (0.9, 0.95) and config.optim.warmup_epochs == 40
    assert config.settings.mask_ratio == 0.75 and config.settings.norm_pix_loss


def test_overrides_are_parsed_as_yaml_and_nested():
    assert parse_overrides(["optim.base_lr=1e-3", "train.compile=true", "model.kwargs.depth=2"]) == {
        "optim": {"base_lr": "1e-3"}, "train": {"compile": True}, "model": {"kwargs": {"depth": 2}}}
    config = read_config(parse_overrides(["optim.base_lr=1e-3", "optim.betas=[0.9, 0.999]"]))
    assert config.optim.base_lr == 1e-3 and config.optim.betas == (0.9, 0.999)


@pytest.mark.parametrize("values, message", [
    ({"optim": {"lrr": 1}}, "unknown config key 'optim.lrr'"),
    ({"train": {"epochs": "many"}}, "'train.epochs' must be int"),
    ({"optim": {"base_lr": "fast"}}, "'optim.base_lr' must be a number"),
    ({"optim": {"base_lr": True}}, "'optim.base_lr' must be a number, got True"),  # not 1.0
    ({"train": {"epochs": True}}, "'train.epochs' must be int, got True"),
    ({"train": {"log_every": 0}}, "'train.log_every' must be at least 1, got 0"),  # it divides the step
    ({"optim": {"betas": [0.9]}}, r"'optim.betas' must be a list of 2 values, got \[0.9\]"),
    ({"train": 3}, "'train' must be a mapping"),
    ({"mae": {"mask_ratoi": 0.5}}, "unknown config key 'mae.mask_ratoi'; known: mask_ratio, norm_pix_loss"),
    ({"method": "beit", "beit": 3}, "'beit' must be a mapping"),
    ({"settings": {"mask_ratio": 0.5}}, "unknown config key 'settings'; the mae method's own settings go "
                                        "under 'mae'"),
    ({"method": "sparkle"}, "method 'sparkle' is unknown"),
])
def test_bad_values_name_the_key(values, message):
    with pytest.raises(MimkitError, match=message):
        read_config(values)


@pytest.mark.parametrize("check, message", [
    (lambda: check_range("--n", 0, 1), "--n must be at least 1, got 0"),
    (lambda: check_range("x", 0.0, 0, low_open=True), "x must be above 0, got 0.0"),
    (lambda: check_range("x", 1.0, 0, 1, high_open=True), r"x must be in \[0, 1\), got 1.0"),
    (lambda: check_range("x", 0.0, 0, 1, low_open=True), r"x must be in \(0, 1\], got 0.0"),
    (lambda: check_range("x", float("inf"), 0), "x must be a finite number at least 0, got inf"),
    (lambda: check_crop_scale("simmim", (0.5, 0.4)),
     r"config 'simmim.crop_scale' must be 0 < low <= high <= 1, got \[0.5, 0.4\]"),
    (lambda: check_crop_scale("simmim", (0.5, 1.5)),
     r"config 'simmim.crop_scale' must be 0 < low <= high <= 1, got \[0.5, 1.5\]"),
])
def test_a_number_out_of_range_is_refused_saying_what_is_allowed(check, message):
    with pytest.raises(MimkitError, match=f"^{message}$"):
        check()


def test_bad_override_syntax():
    with pytest.raises(MimkitError, match="key=value"):
        parse_overrides(["optim.base_lr"])


def test_saved_config_round_trips(tmp_path):
    config = read_config(parse_overrides(["data.img_size=32", "optim.clip_grad=3.0", "mae.mask_ratio=0.6"]))
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path) == config
    assert (tmp_path / "config.yaml").read_text().startswith("method: mae\ndata:")  # in its fields' order


OWN_SECTION = {"mae": {"mask_ratio": 0.6}, "beit": {"mask_ratio": 0.3}, "beitv2": {"mask_ratio": 0.5},
               "dvae": {"vocab_size": 64}, "vqkd": {"vocab_size": 64, "teacher_dim": 16}}


@pytest.mark.parametrize("method", METHODS)
def test_saved_config_holds_its_method_section_only_and_round_trips(tmp_path, method):
    config = read_config({"method": method, method: OWN_SECTION.get(method, {})})  # a new method: defaults
    assert isinstance(config.settings, method_of(method).settings)
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert set(saved) == {"method", "data", "model", "optim", "train", method}
    assert saved[method] == to_dict(config)[method]
    assert load_config(tmp_path) == config


def test_fine_tuning_config_saves_its_encoder_method_section_only(tmp_path):
    beit = read_config({"method": "beit"})
    save_config(FinetuneConfig(encoder_config=to_dict(beit)), tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["encoder_config"]
    assert set(saved) == {"method", "data", "model", "optim", "train", "beit"}
    assert read_config(saved) == beit


def test_run_saved_with_every_section_still_loads_and_resumes(mae_run, tmp_path):
    """Runs saved before the trim hold every method's section; they load as before (the other methods'
    sections dropped), and a section of another method that differs from its defaults does not block
    resuming."""
    run = shutil.copytree(mae_run, tmp_path / "old")
    config = load_config(run)
    others = {m: to_dict(method_of(m).settings()) for m in METHODS if m != "mae"}
    everything = to_dict(config) | others | {"beit": others["beit"] | {"mask_ratio": 0.3}}
    config_path(run).write_text(yaml.safe_dump(everything, sort_keys=False))
    assert set(METHODS) <= set(yaml.safe_load(config_path(run).read_text()))

    old = load_config(run)
    assert old == config
    model, _ = load_run(run)
    reference, _ = load_run(mae_run)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 reference.state_dict().values(), strict=True))
    assert load_encoder(run).spec == old
    # step 2 trained: compared, not rewritten, and nothing of MAE's changed
    keep_config(run, config, "pretraining", 2)
    assert yaml.safe_load(config_path(run).read_text()) == everything


@pytest.mark.parametrize("method", ["mae", "beit", "beitv2", "vqkd"])  # the dVAE: the test below
def test_model_kwargs_typo_is_a_one_line_error_naming_the_key(method):
    config = read_config({"method": method, "data": {"img_size": 32, "channels": 3},
                          "model": {"kwargs": {"dpeth": 2}}, "vqkd": {"teacher_dim": 16}})
    message = r"^config 'model.kwargs.dpeth' is not an argument of \w+; it takes: .*\bdepth\b"
    with pytest.raises(MimkitError, match=message):
        method_of(method).build_model(config)


def test_model_kwargs_given_to_the_dvae_are_refused_naming_its_own_settings():
    config = read_config({"method": "dvae", "data": {"img_size": 32, "channels": 3},
                          "model": {"kwargs": {"depth": 2}}})
    message = r"^config 'model.kwargs.depth' does not apply to the dVAE: .*dvae.hidden"
    with pytest.raises(MimkitError, match=message):
        method_of("dvae").build_model(config)


def test_an_override_value_may_hold_an_equals_sign():
    """``--set KEY=VALUE`` splits at the first ``=``: a path or a timm spec may hold more."""
    assert parse_overrides(["data.source=runs/a=b", "x==1"]) == {"data": {"source": "runs/a=b"}, "x": "=1"}


@pytest.mark.parametrize("value", [3, "all", None])
def test_a_union_setting_keeps_the_first_type_its_value_is(value):
    """``layer: int | str | None``: 3 stays the int 3 (not refused as no str), ``all`` a str, None None."""
    assert from_dict(ProbeConfig, {"layer": value}).layer == value


def test_the_defaults_ask_for_nothing_the_user_did_not():
    """A run without settings trains in one process step by step, seed 0, nothing compiled or recomputed,
    a bad image an error; one data loader worker."""
    train, data = TrainConfig(), DataConfig()
    assert (train.accum_steps, train.seed, train.compile, train.grad_checkpointing) == (1, 0, False, False)
    assert (data.num_workers, data.skip_bad_images) == (1, False)


def test_the_evaluation_defaults_are_the_papers_recipes():
    """Without a recipe: MAE's and BEiT's fine-tuning augmentation and AdamW, BEiT's UperNet recipe (auxiliary
    weight 0.4, layer decay 0.65), DINO's k-NN (k 20, temperature 0.07), the linear probe (lr 0.1, SGD)."""
    ft = FinetuneConfig()
    assert dataclasses.asdict(ft.augment) == {
        "crop_scale": (0.08, 1.0), "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "remode": "pixel",
        "mixup": 0.8, "cutmix": 1.0, "mixup_switch_prob": 0.5, "mixup_prob": 1.0, "label_smoothing": 0.1}
    assert (ft.optim.base_lr, ft.optim.betas, ft.optim.warmup_epochs, ft.optim.layer_decay) == (
        5e-4, (0.9, 0.999), 5.0, 0.75)
    assert (ft.classifier.pool, ft.classifier.drop_path, ft.train.epochs) == ("avg", 0.1, 100)
    seg = SegmentConfig()
    assert (seg.seg.aux_weight, seg.seg.aux_channels, seg.seg.ratio_range, seg.seg.cat_max_ratio) == (
        0.4, 256, (0.5, 2.0), 0.75)
    assert (seg.optim.base_lr, seg.optim.betas, seg.optim.layer_decay, seg.optim.min_lr) == (
        6.4e-3, (0.9, 0.999), 0.65, 0.0)
    assert (KnnConfig().k, KnnConfig().temperature) == (20, 0.07)
    linprobe = LinprobeConfig()
    assert (linprobe.base_lr, linprobe.optimizer, linprobe.epochs, linprobe.weight_decay) == (
        0.1, "sgd", 100, 0.0)


def test_the_evaluation_defaults_turn_on_nothing_the_user_did_not_ask_for():
    """Seed 0 for every subset, every label, no hold-out; evaluated every epoch; the whole encoder trained
    from its pretrained weights; no test-time flip, no relative position biases added, the probes' features
    read in this process from the [CLS] token of the final block."""
    ft, seg = FinetuneConfig(), SegmentConfig()
    assert dataclasses.asdict(ft.labels) == {"fraction": 1.0, "val_fraction": 0.0, "seed": 0}
    classifier = ft.classifier
    assert (classifier.init, classifier.num_classes, ft.ema_decay, ft.eval_every, ft.eval_batch_size) == (
        "pretrained", None, None, 1, 256)
    assert ft.optim.min_lr == 1e-6 and ft.data == DataConfig()
    assert dataclasses.asdict(seg.labels) == {"fraction": 1.0, "seed": 0}
    head = seg.seg
    assert (head.head, head.init, head.freeze_encoder, head.photometric, head.rel_pos_bias) == (
        "upernet", "pretrained", False, True, False)
    assert (head.drop_path, head.eval_mode, head.eval_flip, head.eval_scales) == (0.1, "whole", False, [])
    assert (seg.eval_every, seg.eval_batch_size, seg.eval_images) == (None, 1, None)
    assert (seg.data.source, seg.train.epochs, seg.train.batch_size) == ("fmnist-scenes", 10, 16)
    probe = ProbeConfig()
    assert (probe.init, probe.pool, probe.label_fraction, probe.val_fraction, probe.seed, probe.num_workers,
            probe.layer) == ("pretrained", "cls", 1.0, 0.0, 0, 0, None)


@pytest.mark.parametrize("optim", [FinetuneOptimConfig, SegmentOptimConfig])
@pytest.mark.parametrize("values, message", [
    ({"base_lr": 0.0}, "optim.base_lr"), ({"betas": (0.9, 1.0)}, "betas"),
    ({"warmup_epochs": -1.0}, "warmup")])
def test_the_evaluations_optimizer_sections_keep_the_pretraining_checks(optim, values, message):
    with pytest.raises(MimkitError, match=message):
        optim(**values)


def test_differences_are_listed_leaf_by_leaf_and_merge_goes_deep():
    old = {"optim": {"lr": 1, "betas": [0.9, 0.95]}, "train": {"epochs": 2}, 3: "a", "gone": 1}
    new = {"optim": {"lr": 2, "betas": [0.9, 0.95], "eps": 1e-8}, "train": 5, 3: "b", "added": 0}
    assert differences(old, new) == {"optim.lr": (1, 2), "optim.eps": (None, 1e-8),
                                     "train": ({"epochs": 2}, 5), "3": ("a", "b"), "gone": (1, None),
                                     "added": (None, 0)}  # a key only one side has is a change too
    assert merge(old, {"optim": {"lr": 3}, "train": {"seed": 1}, 3: {"x": 1}}) == {
        "optim": {"lr": 3, "betas": [0.9, 0.95]}, "train": {"epochs": 2, "seed": 1}, 3: {"x": 1}, "gone": 1}
    assert merge({"train": 5}, {"train": {"seed": 1}}) == {"train": {"seed": 1}}
    assert old["optim"]["lr"] == 1  # the base is left as it was


def test_config_files_and_recipes_are_one_line_errors(tmp_path):
    with pytest.raises(MimkitError, match="config file '.*missing.yaml' does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))
    with pytest.raises(MimkitError, match="config file '.*missing.yml' does not exist"):
        load_recipe(str(tmp_path / "missing.yml"))
    with pytest.raises(MimkitError, match="unknown recipe 'mae_fmnsit'; packaged recipes: .*mae_fmnist"):
        load_recipe("mae_fmnsit")
    bad = tmp_path / "bad"
    bad.write_text("train: [1\n")
    with pytest.raises(MimkitError, match=r"config file '.*bad' is not valid YAML: while parsing a flow "
                                          r"sequence$"):
        load_recipe(str(bad))
    bad.write_text("- 1\n")
    with pytest.raises(MimkitError, match="config file '.*bad' must hold a mapping"):
        read_yaml(bad)
    bad.write_text("train:\n  epochs: 3\n")  # a file without a YAML suffix is read too
    assert load_recipe(str(bad)) == {"train": {"epochs": 3}}
    bad.write_text("")
    assert read_yaml(bad) == {}


def test_a_method_without_settings_of_its_own_refuses_a_section_under_its_name():
    config = pretrain_from_dict({"method": "plain", "train": {"seed": 3}}, settings=None)
    assert config.method == "plain" and config.train.seed == 3 and config.settings is None
    with pytest.raises(MimkitError, match="unknown config key 'plain': the plain method has no settings"):
        pretrain_from_dict({"method": "plain", "plain": {"mask_ratio": 0.5}}, settings=None)


def test_one_normalization_value_serves_every_channel():
    data = DataConfig(channels=3, mean=[0.5], std=[0.25])  # the same for each channel
    assert (data.mean, data.std) == ([0.5], [0.25])
    with pytest.raises(MimkitError, match="'data.std' has 2 values for 3 channels"):
        DataConfig(channels=3, std=[0.25, 0.25])
    with pytest.raises(MimkitError, match="'data.std' must be positive"):
        DataConfig(std=[0.25, 0.0, 0.25])  # a zero divides by zero


def setting_classes() -> list[type]:
    """Every dataclass of settings a run reads: the pretraining sections, each method's own, each
    evaluation's, and the sections they nest."""
    found: dict[str, type] = {}

    def walk(cls):
        if cls.__qualname__ not in found:
            found[cls.__qualname__] = cls
            for hint in typing.get_type_hints(cls).values():
                if dataclasses.is_dataclass(hint):
                    walk(hint)

    roots = [PretrainConfig, *(m.settings for m in registered().values() if m.settings)]
    for cls in roots + [v for v in vars(eval_config).values() if dataclasses.is_dataclass(v)]:
        walk(cls)
    return sorted(found.values(), key=lambda cls: cls.__qualname__)


WRONG_TYPED = (True, 3, 0.5, "fast", ["fast"], {"a": 1})  # one value of each YAML type


def takes(hint, value) -> bool:
    """Whether a setting annotated ``hint`` may hold ``value`` (an int where a number goes; YAML's true
    is no number)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(takes(choice, value) for choice in typing.get_args(hint))
    if typing.get_origin(hint) in (list, tuple):
        items = typing.get_args(hint)
        if not isinstance(value, list) or (typing.get_origin(hint) is tuple and len(items) != len(value)):
            return False
        return all(takes(items[0], v) for v in value)
    if dataclasses.is_dataclass(hint):  # a section: a mapping (its own settings are checked on their own)
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) and hint is not type(None) else value is None


@pytest.mark.parametrize("cls", setting_classes(), ids=lambda cls: cls.__qualname__)
def test_every_setting_refuses_every_value_of_another_type(cls):
    """Each setting of each section, given a value of each YAML type it does not take (a bool setting 1 or
    'fast', an int 0.5, a number 'fast', a list a mapping ...), is a one-line error naming its key, never
    taken as it is (``train.compile: 1`` must not turn compiling on)."""
    hints = typing.get_type_hints(cls)
    accepted = []
    for setting in dataclasses.fields(cls):
        hint = hints[setting.name]
        if hint is typing.Any:
            continue
        for value in (v for v in WRONG_TYPED if not takes(hint, v)):
            try:
                from_dict(cls, {setting.name: value})
            except MimkitError as err:
                assert f"config '{setting.name}' must be" in str(err), (setting.name, value, str(err))
            else:
                accepted.append((setting.name, value))
    assert not accepted, f"{cls.__qualname__} took values of another type: {accepted}"
