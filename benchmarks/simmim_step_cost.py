"""SimMIM's step cost against MAE's: images per second of forward + backward for the ``simmim_fmnist`` and
``mae_fmnist`` recipes' models (ViT-Mini/4 on 28x28x1), in one process, back to back.

Each model is built from its recipe by its method's record, with the loss function its training task uses,
on the same batch of random images (a fresh mask per sample: MAE's noise, SimMIM's mask-patch mask); 3
warm-up steps, then ``--steps`` timed steps each. On a shared machine the load moves both numbers: the
ratio is the measurement, and the script prints the load average before and after.

    PYTHONPATH=src .venv/bin/python benchmarks/simmim_step_cost.py    # batch 256 (the recipes'), 2 threads
"""

import argparse
import os
import time

import torch

from mimkit.config import load_recipe
from mimkit.methods.simmim import mask_geometry
from mimkit.models.simmim import simmim_mask
from mimkit.registry import method_of, read_config

SIDE, CHANNELS = 28, 1  # Fashion-MNIST


def build(method: str):
    """(model in train mode, loss_fn, batch maker) of a method's Fashion-MNIST recipe."""
    values = load_recipe(f"{method}_fmnist")
    values["data"] |= {"img_size": SIDE, "channels": CHANNELS, "mean": [0.5], "std": [0.5]}
    config = read_config(values)
    record = method_of(method)
    model = record.build_model(config).train()
    _, loss_fn = record.build_task(config, model)

    def batch(images: torch.Tensor, g: torch.Generator) -> dict:
        n = len(images)
        if method == "mae":
            return {"image": images, "noise": torch.rand(n, model.num_patches, generator=g)}
        grid, scale, masked = mask_geometry(config)
        return {"image": images, "mask": torch.stack([simmim_mask(grid, scale, masked, g).flatten()
                                                      for _ in range(n)])}

    return model, loss_fn, batch


def images_per_second(model, loss_fn, batch: dict, steps: int) -> float:
    """Forward + backward, ``steps`` times after 3 warm-up steps."""
    for i in range(3 + steps):
        if i == 3:
            start = time.perf_counter()
        loss, _ = loss_fn(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return steps * len(batch["image"]) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, CHANNELS, SIDE, SIDE)
    print(f"load average before: {os.getloadavg()}")
    rates = {}
    for method in ("mae", "simmim"):
        model, loss_fn, make = build(method)
        rates[method] = images_per_second(model, loss_fn, make(images, torch.Generator().manual_seed(0)),
                                          args.steps)
        print(f"{method}: {rates[method]:.0f} images/s (forward + backward, batch {args.batch_size}, "
              f"{args.threads} threads)")
    print(f"simmim / mae: {rates['simmim'] / rates['mae']:.2f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
