"""A DALL-E-style discrete VAE: BEiT's visual tokenizer.

A convolutional encoder maps an image to logits over K codes at each cell of a grid equal to the
ViT's patch grid; training relaxes the categorical with Gumbel-softmax (temperature annealed by the
caller) and decodes the relaxed one-hot through a codebook embedding and a convolutional decoder.
The loss is a reconstruction term plus a weighted KL divergence of the code posterior from the
uniform prior. Pretraining needs the encoder alone (`mimkit.methods.dvae.load_tokenizer_encoder`); the
decoder serves tokenizer training and visualization.

- DALL-E dVAE: Ramesh et al., 2021, arXiv:2102.12092
- Gumbel-softmax: Jang et al., 2016, arXiv:1611.01144; Maddison et al., 2016, arXiv:1611.00712
- BEiT: Bao et al., 2021, arXiv:2106.08254
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mimkit.errors import MimkitError

DVAE_FILE = "dvae.safetensors"
_RECON_LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), width kept."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(), nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _res_blocks(channels: int, num_res: int) -> list[nn.Module]:
    return [ResBlock(channels) for _ in range(num_res)]


class DVAEEncoder(nn.Module):
    """Image -> logits over the codebook at each grid cell; what pretraining keeps.

    Each of `num_down` stages runs `num_res` residual blocks, then halves the resolution and doubles
    the width with a stride-2 convolution.

    Args:
        in_chans: image channels.
        vocab_size: K, codebook size.
        hidden: width of the first stage.
        num_down: number of halvings; the grid is the image size / 2**num_down.
        num_res: residual blocks per stage.
    """

    def __init__(self, in_chans: int, vocab_size: int, hidden: int, num_down: int, num_res: int):
        super().__init__()
        layers = [nn.Conv2d(in_chans, hidden, 3, padding=1)]
        width = hidden
        for _ in range(num_down):
            layers += [*_res_blocks(width, num_res), nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)]
            width *= 2
        layers += [*_res_blocks(width, num_res), nn.ReLU(), nn.Conv2d(width, vocab_size, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalized images -> (B, K, h, w) code logits."""
        return self.net(imgs)

    @torch.no_grad()
    def tokenize(self, imgs: torch.Tensor) -> torch.Tensor:
        """The most likely code of each cell (argmax, no sampling), without gradients.

        Args:
            imgs: (B, C, H, W) normalized images.

        Returns:
            ids: long (B, h, w).
        """
        return self(imgs).argmax(1)


def codebook_stats(ids: torch.Tensor, vocab_size: int) -> dict[str, torch.Tensor]:
    """How much of the codebook a batch of ids uses.

    Args:
        ids: long tensor of any shape, values in [0, vocab_size).
        vocab_size: K.

    Returns:
        {"usage": fraction of the K codes that occur, "perplexity": exp(entropy) of the code
        histogram (1 = one code, K = all codes equally often)}; 0-dim tensors.
    """
    counts = torch.bincount(ids.flatten(), minlength=vocab_size).float()
    p = counts / counts.sum()
    return {"usage": (counts > 0).float().mean(), "perplexity": torch.exp(-torch.special.xlogy(p, p).sum())}


class DVAE(nn.Module):
    """Discrete VAE with a Gumbel-softmax relaxation (DALL-E, arXiv:2102.12092; BEiT's tokenizer).

    Args:
        in_chans: image channels.
        vocab_size: K, codebook size (8192 in DALL-E and BEiT; a few hundred suit small data).
        hidden: encoder width of the first stage; the codebook vectors are hidden * 2**num_down wide.
        num_down: halvings from image to grid (2 for 28 px -> 7x7, 4 for 224 px -> 14x14).
        num_res: residual blocks per stage, in the encoder and in the decoder.
        recon_loss: "mse" or "l1", on normalized images.
    """

    def __init__(self, in_chans: int = 3, vocab_size: int = 8192, hidden: int = 64, num_down: int = 4,
                 num_res: int = 1, recon_loss: str = "mse"):
        super().__init__()
        if recon_loss not in _RECON_LOSSES:
            raise MimkitError(f"unknown recon_loss {recon_loss!r}; choose one of: {', '.join(_RECON_LOSSES)}")
        # Everything needed to rebuild the model from a saved file.
        self.config = dict(in_chans=in_chans, vocab_size=vocab_size, hidden=hidden, num_down=num_down,
                           num_res=num_res, recon_loss=recon_loss)
        self.vocab_size = vocab_size
        self.recon_fn = _RECON_LOSSES[recon_loss]
        self.encoder = DVAEEncoder(in_chans, vocab_size, hidden, num_down, num_res)
        width = hidden * 2**num_down
        self.codebook = nn.Embedding(vocab_size, width)
        layers = []
        for _ in range(num_down):
            up = nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1)  # doubles the resolution
            layers += [*_res_blocks(width, num_res), up]
            width //= 2
        layers += [*_res_blocks(width, num_res), nn.ReLU(), nn.Conv2d(width, in_chans, 3, padding=1)]
        self.decoder = nn.Sequential(*layers)

    def forward(
        self, imgs: torch.Tensor, temperature: float, kl_weight: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """One training step's loss on a relaxed sample of the codes.

        Args:
            imgs: (B, C, H, W) normalized images.
            temperature: Gumbel-softmax temperature (DALL-E anneals 1 -> 1/16).
            kl_weight: weight of KL(q || uniform). The KL is in nats per grid cell and the
                reconstruction a per-pixel mean, so useful weights are small: 0.05 lifts codebook
                usage on Fashion-MNIST (tests/tokenizers/test_dvae.py); 0 lets few codes take over.

        Returns:
            loss: scalar, recon + kl_weight * kl.
            metrics: 0-dim detached tensors "recon", "kl", "usage" and "perplexity" (of the argmax
                codes, `codebook_stats`).
            recon: (B, C, H, W) reconstruction from the relaxed codes.
        """
        logits = self.encoder(imgs).float()  # [B, K, h, w]; float: Gumbel noise is too coarse in bf16
        soft_one_hot = F.gumbel_softmax(logits, tau=temperature, dim=1)
        recon = self.decoder(torch.einsum("bkhw,kc->bchw", soft_one_hot, self.codebook.weight))
        rec = self.recon_fn(recon, imgs)
        log_q = logits.log_softmax(dim=1)
        kl = (log_q.exp() * log_q).sum(dim=1).mean() + math.log(self.vocab_size)  # KL(q || U(K)) per cell
        metrics = {"recon": rec.detach(), "kl": kl.detach(),
                   **codebook_stats(logits.argmax(1), self.vocab_size)}
        return rec + kl_weight * kl, metrics, recon

    def tokenize(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalized images -> long (B, h, w) ids (argmax, no gradients); see `DVAEEncoder`."""
        return self.encoder.tokenize(imgs)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Images from hard codes, without gradients.

        Args:
            ids: long (B, h, w).

        Returns:
            (B, C, H, W) normalized images.
        """
        return self.decoder(self.codebook(ids).permute(0, 3, 1, 2))


def dvae_for(img_size: int, patch_size: int, in_chans: int, vocab_size: int = 8192, hidden: int = 64,
             num_res: int = 1, recon_loss: str = "mse", tokenizer_size: int | None = None) -> DVAE:
    """A dVAE whose code grid equals a ViT's patch grid.

    Args:
        img_size: the ViT's input size in pixels.
        patch_size: the ViT's patch size; the grid is img_size // patch_size per side.
        in_chans: image channels.
        vocab_size, hidden, num_res, recon_loss: see `DVAE`.
        tokenizer_size: size of the tokenizer's own view (BEiT feeds DALL-E 112 px for a 224 px ViT);
            `img_size` when None. tokenizer_size / grid must be a power of two.

    Returns:
        `DVAE` with `num_down = log2(tokenizer_size / grid)`.
    """
    if img_size % patch_size:
        raise MimkitError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    grid = img_size // patch_size
    size = tokenizer_size or img_size
    factor = size // grid
    if size % grid or factor & (factor - 1):
        raise MimkitError(f"tokenizer size {size} must be the patch grid side {grid} times a power of two "
                          f"(e.g. {grid * 2}, {grid * 4})")
    return DVAE(in_chans, vocab_size, hidden, factor.bit_length() - 1, num_res, recon_loss)


def _dvae_file(path: str | Path) -> Path:
    """`path` itself if it names a .safetensors file, else the `dvae.safetensors` inside the folder."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / DVAE_FILE


def save_dvae(model: DVAE, path: str | Path) -> Path:
    """Write the weights and the constructor arguments to one safetensors file.

    Args:
        model: the dVAE.
        path: a `.safetensors` file, or a folder (created if needed) to hold `dvae.safetensors`.

    Returns:
        The file written.
    """
    path = _dvae_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "mimkit-dvae", "config": json.dumps(model.config)})
    return path


def saved_dvae_config(file: Path) -> dict:
    """The `DVAE` constructor arguments stored in a `save_dvae` file, read from its header alone (a pickle or
    any other file is refused unread)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # safetensors raises its own error types
        metadata = {}
    if metadata.get("format") != "mimkit-dvae":
        raise MimkitError(f"'{file}' is not a dVAE saved by mimkit (save_dvae, a safetensors file); "
                          "nothing in it was loaded")
    return json.loads(metadata["config"])
