"""An l2-normalized vector quantizer whose codebook moves by exponential moving averages.

Inputs and codes live on the unit sphere, so the nearest code is the one of highest cosine similarity.
The codebook is not trained by gradients: each training forward moves every code that was assigned
vectors toward the l2-normalized mean of those vectors, `c <- l2(decay * c + (1 - decay) * l2(mean))`,
and leaves the others where they are. The first training batch initialises the codebook by spherical
k-means; a code that no vector chose for `dead_after` training steps is restarted at a vector of the
current batch. Under DDP the assignment counts and sums are all-reduced, and the k-means result and the
restart vectors are broadcast from rank 0, so every rank holds the same codebook.

- BEiT v2 (VQ-KD): Peng et al., 2022, arXiv:2208.06366
- EMA codebook updates: van den Oord et al., 2017, arXiv:1711.00937 (appendix); Razavi et al., 2019,
  arXiv:1906.00446
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mimkit.errors import MimkitError
from mimkit.tokenizers.dvae import codebook_stats


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (a no-op in a single process)."""
    if _distributed():
        dist.all_reduce(t)
    return t


def _from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's value on every rank, in place (a no-op in a single process)."""
    if _distributed():
        dist.broadcast(t, src=0)
    return t


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """k-means under cosine similarity; centers start at k vectors of `x` drawn without replacement
    (with replacement when `x` has fewer than k rows). A center that loses all its vectors stays put.

    Args:
        x: (N, d) unit vectors.
        k: number of centers.
        iters: assignment/update rounds.
        generator: CPU source of the initial draw; the global RNG when None.

    Returns:
        centers: (k, d) unit vectors.
    """
    n = x.shape[0]
    if n >= k:
        pick = torch.randperm(n, generator=generator)[:k]
    else:
        pick = torch.randint(n, (k,), generator=generator)
    centers = x[pick.to(x.device)]
    for _ in range(iters):
        ids = (x @ centers.T).argmax(1)  # [N]
        sums = torch.zeros_like(centers).index_add_(0, ids, x)
        hit = torch.bincount(ids, minlength=k) > 0
        centers = torch.where(hit[:, None], F.normalize(sums, dim=1), centers)
    return centers


class NormEMAQuantizer(nn.Module):
    """Nearest-code quantization on the unit sphere with an EMA codebook (BEiT v2, arXiv:2208.06366).

    Args:
        num_codes: K, codebook size (8192 in BEiT v2).
        code_dim: d, code width (32 in BEiT v2).
        decay: EMA decay of the code updates (0.99 in BEiT v2).
        commitment: beta, the weight of the commitment loss `beta * mean((l2(z) - sg(code))^2)`, the
            squared error averaged over the vectors and their d dims, as the released BEiT v2 quantizer
            takes it (`mse_loss`, beta = 1.0).
        kmeans_iters: k-means rounds on the first training batch; 0 keeps the random initialisation.
        dead_after: a code that no vector chose for this many training forwards is restarted at a vector
            of the current batch; None never restarts.

    Buffers (saved with the model): `codebook` (K, d) unit vectors, `initialized` (whether k-means
    ran), `unused_steps` (K,) training forwards since each code was last chosen or restarted.
    """

    def __init__(self, num_codes: int = 8192, code_dim: int = 32, decay: float = 0.99,
                 commitment: float = 1.0, kmeans_iters: int = 10, dead_after: int | None = 100):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise MimkitError(f"quantizer decay {decay} must be in [0, 1)")
        if dead_after is not None and dead_after < 1:
            raise MimkitError(f"dead_after {dead_after} must be a positive number of steps, or None (never)")
        self.num_codes, self.code_dim = num_codes, code_dim
        self.decay, self.commitment = decay, commitment
        self.kmeans_iters, self.dead_after = kmeans_iters, dead_after
        self.register_buffer("codebook", F.normalize(torch.randn(num_codes, code_dim), dim=1))
        self.register_buffer("initialized", torch.tensor(kmeans_iters == 0))
        self.register_buffer("unused_steps", torch.zeros(num_codes, dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, code_dim={self.code_dim}, decay={self.decay}, "
                f"dead_after={self.dead_after}")

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Ids of the nearest codes of (N, d) unit vectors: (N,) long."""
        return (z @ self.codebook.T).argmax(1)

    @torch.no_grad()
    def init_codebook(self, z: torch.Tensor) -> None:
        """Spherical k-means on (N, d) unit vectors (rank 0's under DDP) becomes the codebook."""
        self.codebook.copy_(_from_rank0(spherical_kmeans(z, self.num_codes, self.kmeans_iters)))
        self.initialized.fill_(True)

    @torch.no_grad()
    def update(self, z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One EMA step of the codebook and the dead-code restarts, from a batch and its assignment.

        Args:
            z: (N, d) unit vectors.
            ids: (N,) their codes.

        Returns:
            restarted: 0-dim float, the number of codes restarted.
        """
        counts = _all_reduce(torch.bincount(ids, minlength=self.num_codes))  # [K]
        sums = _all_reduce(torch.zeros_like(self.codebook).index_add_(0, ids, z))  # [K, d]
        hit = counts > 0
        moved = F.normalize(self.decay * self.codebook + (1 - self.decay) * F.normalize(sums, dim=1), dim=1)
        self.codebook.copy_(torch.where(hit[:, None], moved, self.codebook))
        self.unused_steps.add_(1).masked_fill_(hit, 0)
        if self.dead_after is None:
            return torch.zeros(())
        dead = (self.unused_steps >= self.dead_after).nonzero().flatten()
        fresh = _from_rank0(z[torch.randint(len(z), (len(dead),), device=z.device)].contiguous())
        self.codebook[dead] = fresh
        self.unused_steps[dead] = 0
        return torch.tensor(float(len(dead)))

    def forward(self, z: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Quantize; in training mode also initialise (first call) and update the codebook.

        The codebook is read before it is updated, so the codes returned are the ones the batch chose.

        Args:
            z: (..., d) encoder outputs, any scale (they are l2-normalized here).

        Returns:
            quantized: (..., d) the chosen unit codes in the forward pass, with the gradient of the
                normalized input (straight-through: the decoder's input gradient reaches the encoder).
            ids: (...) long, the chosen codes.
            commitment: scalar `commitment * mean((l2(z) - sg(code))^2)` over the vectors and dims.
            metrics: 0-dim detached tensors "usage" (fraction of the K codes this batch chose),
                "perplexity" (exp entropy of this batch's code histogram) and, in training,
                "restarted" (codes restarted by this step).
        """
        shape = z.shape[:-1]
        with torch.autocast(z.device.type, enabled=False):  # distances and EMA in float32
            flat = F.normalize(z.float().reshape(-1, self.code_dim), dim=1)  # [N, d]
            if self.training and not self.initialized:
                self.init_codebook(flat.detach())
            ids = self.nearest(flat.detach())
            codes = self.codebook[ids]  # [N, d]; a copy, so the update below leaves it as chosen
            commitment = self.commitment * F.mse_loss(flat, codes)
            quantized = flat + (codes - flat).detach()
            metrics = codebook_stats(ids, self.num_codes)
            if self.training:
                metrics["restarted"] = self.update(flat.detach(), ids)
        return quantized.reshape(*shape, self.code_dim), ids.reshape(shape), commitment, metrics
