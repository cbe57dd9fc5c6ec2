"""dVAE tokenizer training (BEiT's visual vocabulary), driven by the same loop as pretraining.

The run directory is the tokenizer: its configuration rebuilds the dVAE and its newest checkpoint
holds the weights, so an interrupted tokenizer run resumes like any run and ``--tokenizer runs/dvae``
reads whatever it reached. The Gumbel-softmax temperature and the KL weight are per-step schedules
(`schedule_values`); the loop hands them to the loss in the batch and logs them with codebook usage
and perplexity.

- DALL-E dVAE: Ramesh et al., 2021, arXiv:2102.12092 (appendix A.2: temperature 1 -> 1/16 and KL
  weight 0 -> beta, both cosine schedules)
- BEiT: Bao et al., 2021, arXiv:2106.08254
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from mimkit.config import PretrainConfig, at_least, check_crop_scale, check_range, config_key
from mimkit.data.transforms import crop_view
from mimkit.errors import MimkitError
from mimkit.registry import Images, LossFn, Method, View, register
from mimkit.runs import CONFIG, config_path, load_config
from mimkit.tokenizers.dvae import DVAE, DVAE_FILE, DVAEEncoder, dvae_for, saved_dvae_config
from mimkit.train.checkpoint_files import Checkpoints, load_weights
from mimkit.train.schedule import cosine_schedule
from mimkit.viz import dvae_reconstructions


@dataclass
class DVAEConfig:
    """A dVAE tokenizer run's own settings (``config.settings``; ``dvae:`` in YAML)."""

    vocab_size: int = 8192
    hidden: int = 64
    num_res: int = 1
    recon_loss: str = "mse"
    tokenizer_size: int | None = None  # side of the images the dVAE sees; None: data.img_size. Its code
    # grid is the ViT's patch grid, data.img_size / model.patch_size
    temperature: tuple[float, float] = (1.0, 1 / 16)  # Gumbel-softmax temperature: start, end (DALL-E)
    temperature_anneal: float = 0.5  # share of the run over which it falls (cosine), then stays
    kl_weight: float = 0.05  # weight of KL(q || uniform), reached after kl_warmup
    kl_warmup: float = 0.1  # share of the run over which the KL weight rises from 0 (cosine)
    crop_scale: tuple[float, float] = (0.08, 1.0)

    def __post_init__(self):
        at_least(1, "dvae", vocab_size=self.vocab_size, hidden=self.hidden,
                 tokenizer_size=self.tokenizer_size)
        at_least(0, "dvae", num_res=self.num_res, kl_weight=self.kl_weight)
        for name in ("temperature_anneal", "kl_warmup"):  # shares of the run
            check_range(config_key("dvae", name), getattr(self, name), 0, 1)
        for end in self.temperature:
            check_range(config_key("dvae", "temperature"), end, 0, low_open=True)
        check_crop_scale("dvae", self.crop_scale)


def build_model(config: PretrainConfig) -> DVAE:
    d = config.settings
    if config.model.kwargs:
        key = next(iter(config.model.kwargs))
        raise MimkitError(f"config 'model.kwargs.{key}' does not apply to the dVAE: its size is set by "
                          "dvae.hidden, dvae.num_res and dvae.vocab_size")
    return dvae_for(config.data.img_size, config.model.patch_size, config.data.channels, d.vocab_size,
                    d.hidden, d.num_res, d.recon_loss, d.tokenizer_size)


def build_task(config: PretrainConfig, model: DVAE) -> tuple[View, LossFn]:
    d, data = config.settings, config.data
    view = crop_view(d.tokenizer_size or data.img_size, data.mean, data.std, d.crop_scale)

    def loss_fn(model: DVAE, batch: dict):
        loss, metrics, _ = model(batch["image"], batch["temperature"], batch["kl_weight"])
        return loss, metrics

    return view, loss_fn


def _ramp(start: float, end: float, share: float, total_steps: int) -> list[float]:
    """Cosine from ``start`` to ``end`` over the first ``share`` of ``total_steps``, then ``end``."""
    steps = min(total_steps, round(share * total_steps))
    return cosine_schedule(start, end, steps) + [end] * (total_steps - steps)


def schedule_values(config: PretrainConfig, total_steps: int) -> dict[str, list[float]]:
    """The per-step Gumbel temperature and KL weight (DALL-E anneals both with cosine schedules)."""
    d = config.settings
    return {"temperature": _ramp(*d.temperature, d.temperature_anneal, total_steps),
            "kl_weight": _ramp(0.0, d.kl_weight, d.kl_warmup, total_steps)}


@dataclass
class Tokenizer:
    """Where a dVAE tokenizer lives and what it expects.

    Attributes:
        path: what the user gave: a tokenizer run directory or a `save_dvae` file or folder.
        dvae: the `DVAE` constructor arguments (``in_chans``, ``vocab_size``, ``num_down``, …).
        img_size: side of the images it was trained on; None when unknown (a `save_dvae` file).
        mean, std: the normalization it was trained with; None when unknown.
        weights: the safetensors file with its weights (a run's newest checkpoint).
    """

    path: str
    dvae: dict
    img_size: int | None
    mean: list[float] | None
    std: list[float] | None
    weights: Path


def find_tokenizer(path: str | Path) -> Tokenizer:
    """Describe the tokenizer at ``path`` without loading its weights.

    Args:
        path: a run directory of ``mimkit tokenizer train dvae`` (its newest checkpoint is used), or a
            file or folder written by `mimkit.tokenizers.dvae.save_dvae`.
    """
    path = Path(path)
    if not path.exists():
        raise MimkitError(f"tokenizer '{path}' does not exist; train one with: "
                          f"mimkit tokenizer train dvae --data ... --out {path}")
    if not config_path(path).is_file():  # a save_dvae file or folder
        file = path if path.is_file() else path / DVAE_FILE
        if not file.is_file():
            raise MimkitError(f"'{path}' is neither a tokenizer run directory (no {CONFIG}) nor a dVAE "
                              "file (save_dvae)")
        return Tokenizer(str(path), saved_dvae_config(file), None, None, None, file)
    config = load_config(path)
    if config.method != "dvae":
        raise MimkitError(f"'{path}' holds a {config.method} run, not a dVAE tokenizer")
    step = Checkpoints(path).latest()
    if step is None:
        raise MimkitError(f"tokenizer run '{path}' has no checkpoint yet")
    with torch.device("meta"):  # the constructor arguments, without allocating or drawing weights
        dvae = build_model(config).config
    size, data = config.settings.tokenizer_size or config.data.img_size, config.data
    return Tokenizer(str(path), dvae, size, data.mean, data.std, Checkpoints(path).weights_path(step))


def load_tokenizer_encoder(tokenizer: Tokenizer) -> DVAEEncoder:
    """The dVAE's encoder alone, frozen and in eval mode; only its tensors are read."""
    d = tokenizer.dvae
    encoder = DVAEEncoder(d["in_chans"], d["vocab_size"], d["hidden"], d["num_down"], d["num_res"])
    with safe_open(str(tokenizer.weights), framework="pt") as f:
        encoder.load_state_dict({k.removeprefix("encoder."): f.get_tensor(k) for k in f.keys()
                                 if k.startswith("encoder.")})
    return encoder.eval().requires_grad_(False)


def load_tokenizer(tokenizer: Tokenizer) -> DVAE:
    """The whole dVAE (encoder, codebook, decoder) in eval mode, e.g. to draw tokens as pixels."""
    model = DVAE(**tokenizer.dvae)
    load_weights(model, tokenizer.weights)
    return model.eval()


def pictures(model: DVAE, config: PretrainConfig, images: Images, generator: torch.Generator) -> dict:
    """Images at the tokenizer's size beside their reconstructions from the argmax tokens."""
    data = config.data
    size = config.settings.tokenizer_size or data.img_size
    return dvae_reconstructions(model, images(size, data.mean, data.std))


register(Method("dvae", "tokenizer", build_model, build_task, settings=DVAEConfig,
                schedule_values=schedule_values, pictures=pictures))
