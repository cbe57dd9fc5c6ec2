"""Export a run's model for timm or Hugging Face transformers.

- timm: ``model.safetensors`` (the encoder's state dict) and ``config.json`` in timm's own folder format
  (``architecture``, ``model_args``, ``pretrained_cfg``), so both of these load it strictly:
  ``timm.create_model(cfg["architecture"], **cfg["model_args"]).load_state_dict(load_file(...))`` and
  ``timm.create_model("local-dir:<folder>", pretrained=True)``.
- Hugging Face: a ``from_pretrained`` folder (``config.json``, ``model.safetensors``,
  ``preprocessor_config.json``) for ``ViTMAEForPreTraining`` (MAE with its decoder), ``ViTModel`` (the MAE
  encoder), ``BeitForMaskedImageModeling`` (BEiT with mask token and codebook head) or ``BeitModel``.
  LayerNorm eps is timm's 1e-6 in every exported config (transformers' default is 1e-12). A ``ViTModel``
  export has no pooler (MAE has none): load it with ``add_pooling_layer=False``, or transformers adds a
  randomly initialized one.

Each method's record says how its model is written (`mimkit.registry.Export`, the functions beside its key
maps: `mimkit.interop.mae`, `mimkit.interop.beit`); this module writes the folders.
"""

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from mimkit.config import PretrainConfig
from mimkit.errors import MimkitError, explain_write_errors
from mimkit.files import remove_temporaries
from mimkit.interop.hf import image_processor_config, write_hf_folder
from mimkit.registry import Export, method_of
from mimkit.runs import load_run, load_trained, run_kind

TARGETS = ("timm", "hf")


def _hooks(config: PretrainConfig) -> Export:
    """The export hooks of ``config``'s method (`mimkit.registry.Export`; none: an empty one)."""
    return method_of(config.method).export or Export()


def timm_export(model: nn.Module, config: PretrainConfig) -> tuple[str, dict, dict]:
    """(timm model name, its kwargs, the encoder's state dict in timm's names): the method's hook."""
    hook = _hooks(config).timm
    if hook is None:
        raise MimkitError(f"cannot export a {type(model).__name__} to timm")
    return hook(model)


def hf_export(model: nn.Module, config: PretrainConfig, encoder_only: bool) -> tuple[str, dict, dict]:
    """(transformers architecture, its config fields, its state dict: saved names, no base prefix): the
    method's hook."""
    hook = _hooks(config).hf
    if hook is None:
        raise MimkitError(f"cannot export a {type(model).__name__} to Hugging Face")
    return hook(model, config, encoder_only)


def _check_out(out: Path, force: bool) -> None:
    """Refuse to write into a file, or into a folder that already holds something unless ``force``; what an
    export killed midway left there (a half-written weights file) is removed."""
    if out.exists() and not out.is_dir():
        raise MimkitError(f"export --out '{out}' is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MimkitError(f"export --out '{out}' is not empty; choose a new folder, or pass --force to "
                          "overwrite the files of the same names in it")
    if out.is_dir():
        with explain_write_errors(out):
            remove_temporaries(out)


def export_model(model: nn.Module, config: PretrainConfig, to: str, out: str | Path,
                 encoder_only: bool = False, force: bool = False) -> list[Path]:
    """Export a model whose method has export hooks (`mimkit.registry.Export`: MAE, BEiT, BEiT v2).

    Args:
        model: the model of ``config``'s method.
        config: gives the input (``data.img_size``, ``channels``, ``mean``, ``std``) and MAE's mask ratio.
        to: "timm" (the encoder) or "hf".
        out: the folder to write (created if needed).
        encoder_only: for "hf", export the encoder alone (``ViTModel`` / ``BeitModel``); timm exports are
            always the encoder.
        force: write into a folder that is not empty (files of the same names are replaced).

    Returns:
        The files written.
    """
    if to not in TARGETS:
        raise MimkitError(f"unknown export target {to!r}; choose one of: {', '.join(TARGETS)}")
    out = Path(out)
    _check_out(out, force)
    with explain_write_errors(out):
        return _write(model, config, to, out, encoder_only)


def _write(model: nn.Module, config: PretrainConfig, to: str, out: Path, encoder_only: bool) -> list[Path]:
    """The files of one export target, written into ``out``."""
    data = config.data
    if to == "hf":
        architecture, hf_config, state = hf_export(model, config, encoder_only)
        processor = image_processor_config(data.img_size, data.mean, data.std)
        return write_hf_folder(out, architecture, hf_config, state, processor)
    name, kwargs, state = timm_export(model, config)
    out.mkdir(parents=True, exist_ok=True)
    pretrained_cfg = {"input_size": [data.channels, data.img_size, data.img_size], "mean": data.mean,
                      "std": data.std, "interpolation": "bicubic", "crop_pct": 1.0, "num_classes": 0,
                      "fixed_input_size": True}
    files = [out / "model.safetensors", out / "config.json"]
    save_file(state, files[0])
    timm_config = {"architecture": name, "num_classes": 0, "num_features": kwargs["embed_dim"],
                   "model_args": kwargs, "pretrained_cfg": pretrained_cfg}
    files[1].write_text(json.dumps(timm_config, indent=2) + "\n")
    return files


def export_run(run_dir: str | Path, to: str, out: str | Path, encoder_only: bool = False,
               force: bool = False) -> list[Path]:
    """Export the newest weights of a run (see `export_model`); a BEiT segmentation run's best weights go to
    transformers' ``BeitForSemanticSegmentation`` (`mimkit.interop.segmentation`)."""
    from mimkit.interop.segmentation import export_segmenter

    _check_out(Path(out), force)  # before loading anything
    if run_kind(run_dir).name == "segment":
        if to != "hf" or encoder_only:
            raise MimkitError("a segmentation run exports to Hugging Face whole: --to hf without "
                              "--encoder-only")
        segmenter, seg_config = load_trained(run_dir)
        data = seg_config.data
        return export_segmenter(segmenter, seg_config.seg.crop_size, data.mean, data.std,
                                seg_config.seg.classes, seg_config.seg.aux_weight, out)
    model, config = load_run(run_dir)
    return export_model(model, config, to, out, encoder_only, force)
