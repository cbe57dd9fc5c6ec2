"""VQ-KD: BEiT v2's visual tokenizer, trained to reconstruct a frozen teacher's patch features.

A ViT encoder's patch tokens are projected to a low dimension (32), l2-normalized and replaced by the
nearest code of an l2-normalized EMA codebook (`NormEMAQuantizer`); the gradient goes straight through
the quantization to the encoder. A few ViT blocks decode the code grid and a projection maps it to the
teacher's feature width; the loss is `1 - cos` against the teacher's features plus the commitment term.
Pretraining needs the encoder, its projection and the codebook (`VQKD.tokenize`); the decoder only
serves tokenizer training.

- BEiT v2: Peng et al., 2022, arXiv:2208.06366
"""

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.models.vit import build_vit, check_patch_grid, encoder_arch
from mimkit.tokenizers.quantizer import NormEMAQuantizer


def _task_layer(embed_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> tanh -> linear, the reference code's projection into and out of the code space."""
    return nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(), nn.Linear(embed_dim, out_dim))


class VQKD(nn.Module):
    """Vector-quantized knowledge distillation tokenizer (BEiT v2, arXiv:2208.06366).

    Args:
        img_size: square input size in pixels; the code grid is `img_size // patch_size` per side, the
            patch grid of the ViT being pretrained.
        patch_size: square patch size in pixels.
        in_chans: image channels.
        teacher_dim: width of the teacher's features that the decoder regresses.
        vocab_size: K, codebook size (8192 in BEiT v2).
        code_dim: d, code width (32 in BEiT v2).
        embed_dim, depth, num_heads: the encoder ViT; the decoder has the same width and heads.
        decoder_depth: decoder blocks (3 in BEiT v2's released tokenizers).
        decay, commitment, kmeans_iters, dead_after: see `NormEMAQuantizer`.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, teacher_dim: int = 512,
                 vocab_size: int = 8192, code_dim: int = 32, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, decoder_depth: int = 3, decay: float = 0.99, commitment: float = 1.0,
                 kmeans_iters: int = 10, dead_after: int | None = 100):
        super().__init__()
        self.grid = check_patch_grid(img_size, patch_size)
        # Everything needed to rebuild the model, e.g. from a run's configuration.
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                           teacher_dim=teacher_dim, vocab_size=vocab_size, code_dim=code_dim,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads, decoder_depth=decoder_depth,
                           decay=decay, commitment=commitment, kmeans_iters=kmeans_iters,
                           dead_after=dead_after)
        self.vocab_size = vocab_size
        arch = dict(embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=4.0)
        self.encoder = build_vit({**arch, "depth": depth}, img_size, patch_size, in_chans)
        self.encode_task_layer = _task_layer(embed_dim, code_dim)
        self.quantize = NormEMAQuantizer(vocab_size, code_dim, decay, commitment, kmeans_iters, dead_after)
        # The decoder reads the code grid as a code_dim-channel image with 1-pixel patches.
        self.decoder = build_vit({**arch, "depth": decoder_depth}, self.grid, 1, code_dim)
        self.decode_task_layer = _task_layer(embed_dim, teacher_dim)

    def forward_encoder(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalized images -> (B, L, code_dim) code-space features, not yet normalized."""
        tokens = self.encoder.forward_features(imgs)[:, self.encoder.num_prefix_tokens:]  # [B, L, D]
        return self.encode_task_layer(tokens)

    def forward_decoder(self, quantized: torch.Tensor) -> torch.Tensor:
        """(B, L, code_dim) codes -> (B, L, teacher_dim) predicted teacher features."""
        b = quantized.shape[0]
        grid = quantized.transpose(1, 2).reshape(b, -1, self.grid, self.grid)  # [B, d, h, w]
        tokens = self.decoder.forward_features(grid)[:, self.decoder.num_prefix_tokens:]  # [B, L, D]
        return self.decode_task_layer(tokens)

    @torch.no_grad()
    def tokenize(self, imgs: torch.Tensor) -> torch.Tensor:
        """The nearest code of each patch, without gradients and without touching the codebook.

        Args:
            imgs: (B, C, H, W) normalized images.

        Returns:
            ids: long (B, h, w).
        """
        with torch.autocast(imgs.device.type, enabled=False):
            z = F.normalize(self.forward_encoder(imgs.float()), dim=-1)  # [B, L, d]
            return self.quantize.nearest(z.flatten(0, 1)).reshape(-1, self.grid, self.grid)

    def forward(self, imgs: torch.Tensor, target: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """One training step's loss; in training mode the codebook moves (see `NormEMAQuantizer`).

        Args:
            imgs: (B, C, H, W) normalized images.
            target: (B, L, teacher_dim) the teacher's patch features on the code grid.

        Returns:
            loss: scalar, mean(1 - cos(prediction, target)) + commitment.
            metrics: 0-dim detached tensors "cosine" (mean cosine similarity to the teacher),
                "commitment", and the quantizer's "usage", "perplexity" (and "restarted" in training).
            ids: long (B, h, w), the codes of the batch.
        """
        quantized, ids, commitment, metrics = self.quantize(self.forward_encoder(imgs))
        pred = self.forward_decoder(quantized)
        cosine = F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()
        metrics = {"cosine": cosine.detach(), "commitment": commitment.detach(), **metrics}
        return 1 - cosine + commitment, metrics, ids.reshape(-1, self.grid, self.grid)


def create_vqkd(name: str, **kwargs) -> VQKD:
    """A VQ-KD whose encoder is a named ViT, e.g. `create_vqkd("vit_base", teacher_dim=768)`.

    Args:
        name: a key of `mimkit.models.vit.ENCODER_ARCHS`.
        **kwargs: `VQKD` arguments; they override the arch's, so `depth=2` gives a 2-block encoder.
    """
    dims = encoder_arch(name)
    dims.pop("mlp_ratio")
    return VQKD(**{**dims, **kwargs})

