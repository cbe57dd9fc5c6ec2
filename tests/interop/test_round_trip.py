"""Every exporting method's model, at widths no default gives, goes to each target and back unchanged.

The fresh planted sets found exports and imports right at the defaults only: an MLP written 4x wide, a
config naming three channels, the run's mask ratio replaced by 0.75. Each test here builds a method's
model one way no default or convention matches (48 wide with three 16-wide heads, an MLP ratio of 2, one
channel of 24 px images in 8 px patches, a non-default stochastic depth and mask ratio), exports it, and
asserts that the target library builds from the folder alone a model of exactly these dimensions that gives
the encoder's features, and that `mimkit import` reads the folder back into a run of the same architecture
and weights.
"""

import json

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file

from mimkit.interop.export import export_model
from mimkit.interop.importer import import_checkpoint
from mimkit.registry import method_of, read_config
from mimkit.runs import load_run
from tests.conftest import perturb

ENCODER = {"embed_dim": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 2.0}
DATA = {"source": "synthetic:8", "img_size": 24, "channels": 1, "mean": [0.4], "std": [0.3]}
# what each method's model needs beyond the encoder; a drop-path rate where the model takes one
OWN_KWARGS = {"beit": {"vocab_size": 24, "drop_path_rate": 0.1},
              "beitv2": {"vocab_size": 24, "drop_path_rate": 0.05},
              "cae": {"vocab_size": 24, "drop_path_rate": 0.1}, "simmim": {"drop_path_rate": 0.1},
              "maskdistill": {"drop_path_rate": 0.1}, "data2vec": {"drop_path_rate": 0.1}}
# non-default settings, those an export carries among them (MAE's mask ratio and target)
SETTINGS = {"mae": {"mask_ratio": 0.6, "norm_pix_loss": False}, "simmim": {"mask_patch_size": 8},
            "maskdistill": {"teacher_dim": 16}, "data2vec": {"top_k": 2}}
CARRIED = {("mae", "hf"): ("mask_ratio", "norm_pix_loss")}  # (method, target) -> settings read back
EXPORTING = ["mae", "beit", "beitv2", "simmim", "cae", "data2vec", "maskfeat", "maskdistill"]
TARGETS = [("timm", False), ("hf", False), ("hf", True)]
# the transformers config fields of the encoder, each with the value the model above must give
HF_FIELDS = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 96,
             "num_channels": 1, "image_size": 24, "patch_size": 8}


def odd_model(method: str):
    """``method``'s model of `ENCODER` on `DATA` in 8 px patches, its weights perturbed, and its config."""
    config = read_config({"method": method, "data": DATA,
                          "model": {"name": "vit_mini", "patch_size": 8,
                                    "kwargs": ENCODER | OWN_KWARGS.get(method, {})},
                          method: SETTINGS.get(method, {})})
    torch.manual_seed(0)
    return perturb(method_of(method).build_model(config)).eval(), config


def encoder_features(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encoder.forward_features(x)


def loaded_by_its_library(folder, to: str) -> tuple[torch.nn.Module, dict]:
    """The model the target library builds from ``folder`` alone, loaded strictly, and the folder's config."""
    config = json.loads((folder / "config.json").read_text())
    if to == "timm":
        model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
        model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
        return model.eval(), config
    architecture = getattr(transformers, config["architectures"][0])
    extra = {"add_pooling_layer": False} if architecture.__name__ in ("ViTModel", "BeitModel") else {}
    model, info = architecture.from_pretrained(folder, output_loading_info=True, **extra)
    assert not any(info.values()), info  # no key missing, unexpected or of another shape
    return model.eval(), config


def library_features(model, to: str, x: torch.Tensor) -> torch.Tensor:
    """The encoder's final normalized tokens of the library's model (a head model's base model for hf)."""
    with torch.no_grad():
        if to == "timm":
            return model.forward_features(x)
        base = getattr(model, model.base_model_prefix, model)
        if hasattr(base.embeddings, "random_masking"):  # ViTMAE masks inside: keep every patch, in order
            base.config.mask_ratio = 0.0
            patches = (x.shape[-2] // 8) * (x.shape[-1] // 8)
            noise = torch.arange(patches, dtype=torch.float)[None].repeat(len(x), 1)
            return base(pixel_values=x, noise=noise).last_hidden_state
        hidden = base(pixel_values=x).last_hidden_state
        return model.layernorm(hidden) if hasattr(model, "layernorm") and base is not model else hidden


@pytest.mark.parametrize("to, encoder_only", TARGETS, ids=["timm", "hf", "hf-encoder"])
@pytest.mark.parametrize("method", EXPORTING)
def test_an_export_at_odd_widths_is_built_by_its_library_and_gives_the_encoders_features(method, to,
                                                                                        encoder_only,
                                                                                        tmp_path):
    model, config = odd_model(method)
    export_model(model, config, to, tmp_path / "out", encoder_only)
    loaded, folder_config = loaded_by_its_library(tmp_path / "out", to)
    if to == "hf":
        assert {k: folder_config[k] for k in HF_FIELDS} == HF_FIELDS
        if "drop_path_rate" in folder_config:
            assert folder_config["drop_path_rate"] == config.model.kwargs.get("drop_path_rate", 0.0)
        for name in CARRIED.get((method, to), ()) if not encoder_only else ():
            assert folder_config[name] == getattr(config.settings, name)
    else:
        assert folder_config["pretrained_cfg"]["input_size"] == [1, 24, 24]
    x = torch.randn(2, 1, 24, 24)
    torch.testing.assert_close(library_features(loaded, to, x), encoder_features(model, x), rtol=0, atol=2e-6)


@pytest.mark.parametrize("to, encoder_only", TARGETS, ids=["timm", "hf", "hf-encoder"])
@pytest.mark.parametrize("method", ["mae", "beit", "data2vec", "maskfeat", "simmim"])
def test_an_export_at_odd_widths_imports_back_to_the_same_architecture_and_weights(method, to, encoder_only,
                                                                                   tmp_path):
    """The import reads every dimension from the folder (heads from its config, not the 64-wide convention;
    the MLP ratio and channels from the weights) and the settings the export carries."""
    model, config = odd_model(method)
    export_model(model, config, to, tmp_path / "out", encoder_only)
    import_checkpoint(tmp_path / "out", to, tmp_path / "back")
    back, back_config = load_run(tmp_path / "back")
    kwargs = back_config.model.kwargs
    assert {k: kwargs[k] for k in ENCODER} == ENCODER
    data = back_config.data
    assert (data.img_size, data.channels, back_config.model.patch_size) == (24, 1, 8)
    assert (data.mean, data.std) == (DATA["mean"], DATA["std"])
    for name in CARRIED.get((method, to), ()) if not encoder_only else ():
        assert getattr(back_config.settings, name) == getattr(config.settings, name)
    x = torch.randn(2, 1, 24, 24)
    torch.testing.assert_close(encoder_features(back.eval(), x), encoder_features(model, x), rtol=0, atol=0)
