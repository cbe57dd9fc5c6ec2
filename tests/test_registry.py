"""A method carries its own extras: a method registered from outside the package (a throwaway one here, as a
new ``methods/x.py`` would) is trained, imported, drawn and exported by the commands from its record alone,
and no generic module spells a built-in method's name."""

import ast
import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import mimkit
from mimkit import registry
from mimkit.cli import main
from mimkit.config import save_config
from mimkit.data.transforms import crop_view
from mimkit.errors import MimkitError
from mimkit.interop.export import export_model
from mimkit.interop.foreign import convert
from mimkit.interop.keymaps import to_foreign
from mimkit.methods import METHODS
from mimkit.registry import Export, HFLayout, Import, Method, read_config
from mimkit.runs import config_path, keep_config, load_run
from mimkit.safe_load import load_tensors
from mimkit.train.checkpoint_files import Checkpoints
from tests.conftest import grid_size


class Toy(nn.Module):
    """A patch embedding and a position table: the smallest model with an architecture to read back."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.pos = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2, embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2) + self.pos  # (B, L, D)


@dataclass
class ToySettings:
    """The toy's own settings: ``config.settings``, ``toy:`` in YAML."""

    loss_scale: float = 1.0


def build_model(config):
    return Toy(config.data.img_size, config.model.patch_size, config.data.channels,
               config.model.kwargs["embed_dim"])


def build_task(config, model):
    def loss_fn(model, batch):
        return config.settings.loss_scale * model(batch["image"]).pow(2).mean(), {}

    return crop_view(config.data.img_size, config.data.mean, config.data.std), loss_fn


def pictures(model, config, images, generator):
    shown = images(config.data.img_size, config.data.mean, config.data.std)
    return {"original": shown, "upside down": shown.flip(-2)}


# the toy's foreign names (mimkit -> theirs): its reference checkpoints, timm and transformers use them alike
THEIRS = {"proj.weight": "patchify.kernel", "proj.bias": "patchify.bias", "pos": "positions"}


def arch(state):
    d, c, p, _ = state["proj.weight"].shape
    return dict(embed_dim=d, in_chans=c, patch_size=p, img_size=round(state["pos"].shape[1] ** 0.5) * p)


def timm_export(model):
    return "toy_patchify", {"embed_dim": model.proj.out_channels}, to_foreign(model.state_dict(), THEIRS)[0]


def hf_export(model, config, encoder_only):
    return "ToyModel", {"model_type": "toy"}, to_foreign(model.state_dict(), THEIRS)[0]


TOY = Method(
    "toy", "pretraining", build_model, build_task, settings=ToySettings, pictures=pictures,
    importing=Import(arch, model_names=("vit_mini",), model_kwargs=("embed_dim",),
                     reference=lambda path: convert("toy", load_tensors(path), THEIRS, "toy checkpoint"),
                     hf={"toy": HFLayout(THEIRS)}),
    export=Export(timm=timm_export, hf=hf_export),
)


@pytest.fixture
def toy(monkeypatch):
    """The toy method registered for one test, after the built-in ones (the registry as it was afterwards)."""
    monkeypatch.setitem(registry._METHODS, "toy", TOY)


def same_weights(a: Path, b: Path) -> bool:
    (model_a, _), (model_b, _) = load_run(a), load_run(b)
    return all(torch.equal(v, model_b.state_dict()[k]) for k, v in model_a.state_dict().items())


def pretrain_toy(tmp_path: Path, *flags: str) -> Path:
    """A toy run of 2 steps (16 px synthetic images, 4 px patches, 8 wide) through ``mimkit pretrain``."""
    recipe, run = tmp_path / "toy.yaml", tmp_path / "run"
    recipe.write_text("data: {source: 'synthetic:32', img_size: 16, num_workers: 0}\n"
                      "model: {patch_size: 4, kwargs: {embed_dim: 8}}\n")
    assert main(["pretrain", "toy", "--config", str(recipe), "--out", str(run), "--max-steps", "2",
                 "--batch-size", "8", *flags]) == 0
    return run


def test_a_registered_method_trains_imports_draws_and_exports_with_no_edit_elsewhere(toy, tmp_path):
    run = pretrain_toy(tmp_path)

    picture = tmp_path / "toy.png"
    assert main(["visualize", str(run), "--out", str(picture), "--n", "3"]) == 0
    assert Image.open(picture).size == grid_size(2, 3, 16)  # the toy's two columns

    assert main(["export", str(run), "--to", "timm", "--out", str(tmp_path / "timm")]) == 0
    timm_config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert timm_config["architecture"] == "toy_patchify"
    assert set(load_file(tmp_path / "timm" / "model.safetensors")) == set(THEIRS.values())

    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    back = tmp_path / "from-hf"
    assert main(["import", str(tmp_path / "hf"), "--format", "hf", "--out", str(back)]) == 0
    assert load_run(back)[1].method == "toy" and same_weights(run, back)

    save_file(load_file(tmp_path / "timm" / "model.safetensors"), tmp_path / "toy.safetensors")
    reference = tmp_path / "from-reference"
    assert main(["import", str(tmp_path / "toy.safetensors"), "--format", "toy", "--out", str(reference),
                 "--set", "data.source=synthetic:32"]) == 0
    _, config = load_run(reference)
    assert (config.data.img_size, config.model.patch_size, config.model.kwargs) == (16, 4, {"embed_dim": 8})
    assert same_weights(run, reference)


def test_a_timm_export_writes_timms_folder_config_and_a_target_without_a_hook_is_refused(toy, monkeypatch,
                                                                                          tmp_path):
    """The timm folder's config.json, whole: the hook's name and kwargs, no classifier, the encoder's width
    as its features, and the run's preprocessing (what timm's `local-dir:` loader and the hub read). A
    method whose record leaves a target out is refused for it in one line."""
    run = pretrain_toy(tmp_path)
    model, config = load_run(run)
    export_model(model, config, "timm", tmp_path / "timm")
    assert json.loads((tmp_path / "timm" / "config.json").read_text()) == {
        "architecture": "toy_patchify", "num_classes": 0, "num_features": 8, "model_args": {"embed_dim": 8},
        "pretrained_cfg": {"input_size": [3, 16, 16], "mean": config.data.mean, "std": config.data.std,
                           "interpolation": "bicubic", "crop_pct": 1.0, "num_classes": 0,
                           "fixed_input_size": True}}
    monkeypatch.setitem(registry._METHODS, "toy", replace(TOY, export=Export()))
    for to, name in (("timm", "timm"), ("hf", "Hugging Face")):
        with pytest.raises(MimkitError, match=f"^cannot export a Toy to {name}$"):
            export_model(model, config, to, tmp_path / f"no-{to}")


def test_a_registered_methods_settings_are_set_saved_and_read_back_under_its_name(toy, tmp_path, capsys):
    run = pretrain_toy(tmp_path, "--set", "toy.loss_scale=0.5")
    assert yaml.safe_load(config_path(run).read_text())["toy"] == {"loss_scale": 0.5}
    assert load_run(run)[1].settings == ToySettings(loss_scale=0.5)
    assert main(["pretrain", "toy", "--config", str(tmp_path / "toy.yaml"), "--out", str(tmp_path / "typo"),
                 "--set", "toy.loss_scael=2"]) == 2
    assert "unknown config key 'toy.loss_scael'; known: loss_scale" in capsys.readouterr().err


def test_a_method_without_extras_is_refused_by_each_command(toy, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(registry._METHODS, "toy", Method("toy", "pretraining", build_model, build_task,
                                                         settings=ToySettings))
    run = pretrain_toy(tmp_path)
    assert main(["visualize", str(run), "--out", str(tmp_path / "toy.png")]) == 2
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert main(["export", str(run), "--to", "timm", "--out", str(tmp_path / "timm")]) == 2
    errors = capsys.readouterr().err
    assert "visualize has no pictures for toy runs" in errors
    assert "cannot export a Toy to Hugging Face" in errors and "cannot export a Toy to timm" in errors


@dataclass
class TaughtSettings(ToySettings):
    """A toy that takes a teacher: the flag's value lands in its settings' ``teacher``."""

    teacher: str | None = None


def test_a_method_that_takes_a_teacher_gets_the_flag_from_its_record(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(registry._METHODS, "toy", Method("toy", "pretraining", build_model, build_task,
                                                         settings=TaughtSettings, teacher=True))
    run = pretrain_toy(tmp_path, "--teacher", "runs/mae")
    assert load_run(run)[1].settings.teacher == "runs/mae"
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "toy: the frozen teacher" in " ".join(capsys.readouterr().out.split())


# Where a method may be named: its own modules (methods/, the models, the tokenizers, the per-method layouts
# of interop: interop/NAME.py for a method NAME), the recipes, and the configuration (the default method).
OWN = ("methods", "models", "tokenizers", "recipes", "config.py")


def is_own(where: str) -> bool:
    """Whether a module (its path in the package) is some method's own."""
    return where.startswith(OWN) or (where.startswith("interop/") and Path(where).stem in METHODS)


def test_no_generic_module_spells_a_method_name():
    """A string that is exactly a built-in method's name (a lookup key, a comparison) outside a method's own
    modules; transformers' ``model_type`` values (its names, e.g. "beit") are not ours."""
    package = Path(mimkit.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        where = path.relative_to(package).as_posix()
        if is_own(where):
            continue
        tree = ast.parse(path.read_text())
        theirs = {id(k.value) for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg == "model_type"}
        found += [f"{where}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value in METHODS and id(node) not in theirs]
    assert found == [], "generic modules name methods: " + "; ".join(found)


def test_a_run_resumes_with_its_methods_own_resumable_settings_changed(tmp_path):
    """VQ-KD's record lets ``vqkd.eval_images`` change on resume; its other settings stay refused."""
    config = read_config({"method": "vqkd"})
    Checkpoints(tmp_path).save(1, nn.Linear(1, 1), {"step": 1})
    save_config(config, config_path(tmp_path))
    keep_config(tmp_path, replace(config, settings=replace(config.settings, eval_images=7)), "tokenizer", 1)
    with pytest.raises(MimkitError, match=r"vqkd.vocab_size 8192 -> 16"):
        keep_config(tmp_path, replace(config, settings=replace(config.settings, vocab_size=16)), "tokenizer",
                    1)


def test_a_method_name_is_registered_once():
    with pytest.raises(ValueError, match="method 'mae' is registered twice"):
        registry.register(registry.method_of("mae"))
    assert registry.method_of("mae") is METHODS["mae"]


def test_the_built_in_methods_are_loaded_on_first_use_and_a_registered_record_is_listed_by_kind(monkeypatch):
    """``method_of`` imports the built-in methods only for a name it does not know (then refuses it in one
    line, listing the known ones); ``registered`` imports them first; a record registers as it is given."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry.registered()))
    imported = []
    monkeypatch.setattr(registry.importlib, "import_module", imported.append)
    assert registry.method_of("mae").name == "mae" and imported == []
    with pytest.raises(MimkitError, match=r"^method 'sparkle' is unknown \(methods: dvae, beit, "):
        registry.method_of("sparkle")
    assert imported == [registry.BUILTIN_METHODS]
    toy = Method("toy", "tokenizer", build_model=lambda config: nn.Identity(),
                 build_task=lambda config, model: (None, None))
    assert registry.register(toy) is toy
    tokenizers, pretraining = registry.registered("tokenizer"), registry.registered("pretraining")
    assert imported == [registry.BUILTIN_METHODS] * 3
    assert tokenizers["toy"] is toy and "toy" not in pretraining
    assert set(tokenizers) == {"dvae", "vqkd", "toy"}


def test_only_the_methods_whose_record_says_so_take_a_teacher():
    """Those that always distil one (CAE takes ``--teacher`` for CAE v2 only: not in its record)."""
    assert sorted(name for name, m in registry.registered().items() if m.teacher) == ["maskdistill", "vqkd"]
