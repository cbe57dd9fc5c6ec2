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
"""

import json
from pathlib import Path

import timm
from safetensors.torch import save_file
from torch import nn

import mimkit.methods  # noqa: F401  (registers the methods whose runs this loads)
from mimkit.config import PretrainConfig
from mimkit.errors import MimkitError, explain_write_errors
from mimkit.interop import beit, mae
from mimkit.interop.hf import image_processor_config, write_hf_folder
from mimkit.interop.keymaps import to_foreign
from mimkit.models.beit import BEiT
from mimkit.models.mae import MAE
from mimkit.models.vit import ENCODER_ARCHS
from mimkit.runs import load_run

TARGETS = ("timm", "hf")


def timm_export(model: nn.Module) -> tuple[str, dict, dict]:
    """(timm model name, its kwargs, the encoder's state dict in timm's names) for an MAE or a BEiT."""
    if isinstance(model, MAE):
        kwargs = mae.timm_vit_kwargs(model)
        named = next((n for n, a in ENCODER_ARCHS.items()
                      if (a["embed_dim"], a["depth"], a["num_heads"]) ==
                      (kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"])), "vit_base")
        name = f"{named}_patch16_224" if timm.is_model(f"{named}_patch16_224") else "vit_base_patch16_224"
        return name, kwargs, to_foreign(model.state_dict(), mae.TIMM_VIT)[0]
    if isinstance(model, BEiT):
        state = to_foreign(model.state_dict(), beit.TIMM_BEIT)[0]
        return "beit_base_patch16_224", beit.timm_beit_kwargs(model), state
    raise MimkitError(f"cannot export a {type(model).__name__} to timm")


def hf_export(model: nn.Module, config: PretrainConfig, encoder_only: bool) -> tuple[str, dict, dict]:
    """(transformers architecture, its config fields, its state dict: saved names, no base prefix)."""
    if isinstance(model, MAE):
        if encoder_only:
            return "ViTModel", mae.hf_vit_config(model), to_foreign(model.state_dict(), mae.HF_VIT)[0]
        return ("ViTMAEForPreTraining", mae.hf_vitmae_config(model, config.mae.mask_ratio),
                to_foreign(model.state_dict(), mae.HF_VITMAE)[0])
    if isinstance(model, BEiT):
        if encoder_only:
            encoder = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
            return "BeitModel", beit.hf_beit_config(model, head=False), to_foreign(encoder, beit.HF_BEIT)[0]
        return ("BeitForMaskedImageModeling", beit.hf_beit_config(model, head=True),
                to_foreign(model.state_dict(), beit.HF_BEIT)[0])
    raise MimkitError(f"cannot export a {type(model).__name__} to Hugging Face")


def _check_out(out: Path, force: bool) -> None:
    """Refuse to write into a file, or into a folder that already holds something unless ``force``."""
    if out.exists() and not out.is_dir():
        raise MimkitError(f"export --out '{out}' is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MimkitError(f"export --out '{out}' is not empty; choose a new folder, or pass --force to "
                          "overwrite the files of the same names in it")


def export_model(model: nn.Module, config: PretrainConfig, to: str, out: str | Path,
                 encoder_only: bool = False, force: bool = False) -> list[Path]:
    """Export an MAE or a BEiT.

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
    name, kwargs, state = timm_export(model)
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
    from mimkit.eval.segment import is_segmentation_run, load_segmenter
    from mimkit.interop.segmentation import export_segmenter

    _check_out(Path(out), force)  # before loading anything
    if is_segmentation_run(run_dir):
        if to != "hf" or encoder_only:
            raise MimkitError("a segmentation run exports to Hugging Face whole: --to hf without "
                              "--encoder-only")
        segmenter, seg_config = load_segmenter(run_dir)
        data = seg_config.data
        return export_segmenter(segmenter, seg_config.seg.crop_size, data.mean, data.std, out)
    model, config = load_run(run_dir)
    return export_model(model, config, to, out, encoder_only, force)
