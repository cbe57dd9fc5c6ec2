"""Hugging Face model folders: ``config.json`` + weights (+ ``preprocessor_config.json``), read and written
without transformers.

Key maps (`mimkit.interop.mae`, `mimkit.interop.beit`) use the names ``save_pretrained`` writes, which are
those of the published checkpoints, with the base model's prefix (``vit.``, ``beit.``) removed. A model
with a head keeps the base model under that prefix and its head parts at the top level (`HF_ARCHS`).
transformers 5 renames modules in memory (``layers.0.attention.q_proj``) and its ``save_pretrained`` writes
ViTMAE's decoder layers as ``decoder.decoder_encoder.layer.N``; `NAME_VARIANTS` maps both back to the
published names.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from mimkit.errors import MimkitError
from mimkit.interop.keymaps import rename
from mimkit.safe_load import load_sharded, read_json

# Architecture -> (prefix of the base model's keys, top-level key prefixes that stay outside it).
HF_ARCHS = {
    "ViTModel": ("", ()),
    "ViTMAEForPreTraining": ("vit.", ("decoder.",)),
    "BeitModel": ("", ()),
    "BeitForMaskedImageModeling": ("beit.", ("layernorm.", "lm_head.")),
    "BeitForSemanticSegmentation": ("beit.", ("fpn.", "decode_head.", "auxiliary_head.")),
}
BASE_PREFIXES = ("vit.", "beit.")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# Names transformers 5 uses -> the published ones, applied in order (published names pass unchanged).
NAME_VARIANTS = (
    (r"^decoder\.decoder_encoder\.layer\.", "decoder.decoder_layers."),
    (r"^layers\.(\d+)\.relative_position_bias\.",
     r"encoder.layer.\1.attention.attention.relative_position_bias."),
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
    (r"^shared_position_bias\.", "encoder.relative_position_bias."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)


def strip_base(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the base model's prefix and use the published names (`NAME_VARIANTS`)."""
    out = {}
    for key, value in state.items():
        prefix = next((p for p in BASE_PREFIXES if key.startswith(p)), "")
        if key.removeprefix(prefix) in out:
            raise MimkitError(f"'{key}' is both in the base model and its head (e.g. BEiT with "
                              "use_mean_pooling=false and two final LayerNorms); mimkit cannot hold both")
        out[key.removeprefix(prefix)] = value
    return rename(out, NAME_VARIANTS)


def add_base(state: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    """Put the base model's keys under ``architecture``'s prefix (the inverse of `strip_base`); an
    architecture `HF_ARCHS` does not list keeps its keys as given (a base model's)."""
    prefix, top_level = HF_ARCHS.get(architecture, ("", ()))
    return {(k if k.startswith(top_level) else prefix + k): v for k, v in state.items()}


def read_hf_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """A Hugging Face model folder.

    Args:
        folder: holds ``config.json`` and ``model.safetensors`` (or shards, or ``pytorch_model.bin``, read
            with ``weights_only=True``).

    Returns:
        (config, state dict with the base prefix removed and saved names, preprocessing config or {}).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise MimkitError(f"'{folder}' is not a Hugging Face model folder (no config.json)")
    config = read_json(folder / "config.json")
    preprocessing = folder / "preprocessor_config.json"
    return (config, strip_base(load_sharded(folder, WEIGHT_FILES)),
            read_json(preprocessing) if preprocessing.is_file() else {})


def write_hf_folder(folder: str | Path, architecture: str, config: dict, state: dict[str, torch.Tensor],
                    image_processor: dict) -> list[Path]:
    """Write what ``from_pretrained`` reads: ``config.json``, ``model.safetensors`` and
    ``preprocessor_config.json``.

    Args:
        folder: created if needed.
        architecture: the transformers class (`add_base` puts a head model's base under its prefix).
        config: the model's config fields (``model_type`` included).
        state: saved names without the base prefix (`strip_base`'s form).
        image_processor: the image processor's fields.

    Returns:
        The files written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / "config.json", folder / "model.safetensors", folder / "preprocessor_config.json"]
    files[0].write_text(json.dumps({"architectures": [architecture], **config}, indent=2) + "\n")
    save_file(add_base(state, architecture), files[1], metadata={"format": "pt"})
    files[2].write_text(json.dumps(image_processor, indent=2) + "\n")
    return files


def image_processor_config(img_size: int, mean: list[float], std: list[float]) -> dict:
    """A ``preprocessor_config.json`` for ``ViTImageProcessor``: resize to ``img_size`` (bicubic), scale to
    [0, 1], normalize."""
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": img_size, "width": img_size}, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean), "image_std": list(std)}
