"""BEiT pretraining throughput with the tokenizer included and excluded, and the tokenizer's share.

One training step is what the loop runs for BEiT: the frozen dVAE encoder tokenizes the tokenizer's view
(``no_grad``, eval mode), then BEiT's forward, backward and an AdamW step on a fixed batch with fixed
block masks. "without tokenizer" runs the same step on ids computed once beforehand; "tokenizer alone"
times the tokenization by itself. The three are timed in the same process, interleaved round by round
(the order rotates), so that load from other processes on a shared machine hits them alike; reported
per variant: the median and the best round (the least disturbed), in ms per step and images per second,
and the median process CPU time per step (all threads; less sensitive to waiting for a core).

    .venv/bin/python benchmarks/beit_throughput.py    # ViT-Tiny/4 on 28x28x1, dvae_fmnist's dVAE, batch 64
    .venv/bin/python benchmarks/beit_throughput.py --device cuda --bf16 --img-size 224 --patch-size 16 \\
        --in-chans 3 --model vit_base --tokenizer-size 112 --vocab-size 8192 --dvae-hidden 64 --dvae-res 2 \\
        --batch-size 128
"""

import argparse
import json
import statistics
import time

import torch

from mimkit.config import load_recipe
from mimkit.masking import block_mask, count_for_ratio
from mimkit.models.beit import create_beit
from mimkit.tokenizers.dvae import dvae_for

VARIANTS = ("with tokenizer", "without tokenizer", "tokenizer alone")


def parse_args(argv=None) -> argparse.Namespace:
    dvae = load_recipe("dvae_fmnist")["dvae"]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_tiny")
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--tokenizer-size", type=int, help="side of the tokenizer's view (default: img size)")
    p.add_argument("--vocab-size", type=int, default=dvae["vocab_size"])
    p.add_argument("--dvae-hidden", type=int, default=dvae["hidden"])
    p.add_argument("--dvae-res", type=int, default=dvae["num_res"])
    p.add_argument("--mask-ratio", type=float, default=0.4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, as the loop does on CUDA")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the first round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    return p.parse_args(argv)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def variants(a: argparse.Namespace) -> dict:
    """Closures for the three timed variants, on one model, tokenizer and batch."""
    torch.manual_seed(0)
    model = create_beit(a.model, img_size=a.img_size, patch_size=a.patch_size, in_chans=a.in_chans,
                        vocab_size=a.vocab_size).train().to(a.device)
    tokenizer_size = a.tokenizer_size or a.img_size
    tokenizer = dvae_for(a.img_size, a.patch_size, a.in_chans, a.vocab_size, a.dvae_hidden, a.dvae_res,
                         tokenizer_size=tokenizer_size).encoder.eval().requires_grad_(False).to(a.device)
    grid = a.img_size // a.patch_size
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(a.batch_size, a.in_chans, a.img_size, a.img_size, generator=g).to(a.device)
    small = torch.randn(a.batch_size, a.in_chans, tokenizer_size, tokenizer_size, generator=g).to(a.device)
    num_masked = count_for_ratio(grid * grid, a.mask_ratio)
    mask = torch.stack([block_mask(grid, grid, num_masked, generator=g).flatten()
                        for _ in range(a.batch_size)]).to(a.device)
    autocast = torch.autocast(torch.device(a.device).type, dtype=torch.bfloat16, enabled=a.bf16)
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-3, betas=(0.9, 0.999), weight_decay=0.05)
    with autocast:
        fixed_ids = tokenizer.tokenize(small)

    def tokenize():
        with autocast:
            return tokenizer.tokenize(small)

    def step(ids=None):
        with autocast:
            loss, _ = model(imgs, mask, tokenizer.tokenize(small) if ids is None else ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"with tokenizer": step, "without tokenizer": lambda: step(fixed_ids), "tokenizer alone": tokenize}


def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    runs = variants(a)
    for run in runs.values():
        for _ in range(a.warmup):
            run()
    times = {name: [] for name in VARIANTS}
    cpu = {name: [] for name in VARIANTS}
    for r in range(a.rounds):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
        for name in order:
            sync(a.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(a.steps):
                runs[name]()
            sync(a.device)
            times[name].append((time.perf_counter() - start) / a.steps * 1e3)
            cpu[name].append((time.process_time() - start_cpu) / a.steps * 1e3)
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU, {a.threads} threads"
    print(f"BEiT {a.model}/{a.patch_size} {a.img_size}px x{a.in_chans}, tokenizer "
          f"{a.tokenizer_size or a.img_size}px {a.vocab_size} codes, batch {a.batch_size}, {device}"
          f"{', bf16' if a.bf16 else ''}, torch {torch.__version__}; {a.rounds} rounds x {a.steps} steps")
    results = {}
    for name in VARIANTS:
        median, best, cpu_ms = statistics.median(times[name]), min(times[name]), statistics.median(cpu[name])
        speed = a.batch_size / median * 1e3
        results[name] = {"median_ms": median, "best_ms": best, "images_per_s": speed, "cpu_ms": cpu_ms}
        print(f"  {name:18s} median {median:8.1f} ms  best {best:8.1f} ms  {speed:8.1f} img/s  "
              f"CPU {cpu_ms:8.1f} ms")
    share = {key: results["tokenizer alone"][key] / results["with tokenizer"][key]
             for key in ("median_ms", "best_ms", "cpu_ms")}
    print("  tokenizer share of the step (tokenizer alone / with tokenizer): "
          f"median {share['median_ms']:.1%}, best {share['best_ms']:.1%}, CPU {share['cpu_ms']:.1%}")
    print(json.dumps({"args": vars(a), "results": results, "tokenizer_share": share}))


if __name__ == "__main__":
    main()
