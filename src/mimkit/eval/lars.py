"""LARS: SGD with momentum whose step for each weight matrix is scaled to that matrix's norm.

Used by MAE for linear probing with very large batches. One-dimensional parameters (biases, norm
scales) take plain momentum-SGD steps without weight decay or scaling, as in MAE's use.

- You, Gitman and Ginsburg, Large Batch Training of Convolutional Networks, 2017, arXiv:1708.03888
"""

import torch


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling.

    For a weight ``w`` with gradient ``g``: ``d = g + weight_decay * w``, scaled by
    ``trust_coefficient * |w| / |d|`` (1 when either norm is 0), accumulated with ``momentum``.

    Args:
        params: parameters or groups.
        lr: learning rate (the training loop usually sets it every step).
        weight_decay: L2 term added to matrix gradients.
        momentum: heavy-ball momentum.
        trust_coefficient: eta of the paper.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = p.norm(), d.norm()
                    one = torch.ones_like(p_norm)
                    trust = torch.where((p_norm > 0) & (d_norm > 0),
                                        group["trust_coefficient"] * p_norm / d_norm, one)
                    d = d.mul(trust)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss
