"""MAE pretraining throughput: mimkit's MAE against transformers' ViTMAEForPreTraining, same configuration.

One training step is forward + backward + AdamW step on a fixed batch with fixed masking noise. Both
models are timed in the same process, interleaved round by round (the order alternates), so that load
from other processes on a shared machine hits both alike. Reported per model: the median and the best
round (the least disturbed), and the process CPU time per image (less sensitive to waiting for a core).

Activation memory is the size of the distinct tensors autograd saves for backward in one forward
(exact, load-independent). Peak memory is measured separately, each model in a fresh subprocess: on
CPU the growth of the peak resident set size (ru_maxrss) over the resident size just before the first
step, on CUDA the growth of torch.cuda.max_memory_allocated over the allocated memory before it.

FLOPs of one step are counted with torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions and
attention, forward and backward; elementwise ops are not counted): the model FLOPs per image. They are
compared with the speed of a large matmul timed here and, as MFU (model FLOPs utilization), with the
device's dense peak for the dtype: the data sheet's bf16 dense peak for known GPUs (`--peak-tflops` to
give another), else the timed matmul. On CUDA both models step with fused AdamW.

    .venv/bin/python benchmarks/pretrain_throughput.py    # ViT-Tiny/4 on 28x28x1, batch 256, 2 threads
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mimkit.models.mae import MAE

MODELS = ("mimkit", "transformers")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--embed-dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--decoder-embed-dim", type=int, default=128)
    p.add_argument("--decoder-depth", type=int, default=4)
    p.add_argument("--decoder-num-heads", type=int, default=4)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--raw-pix-loss", action="store_true", help="regress raw pixels instead of norm-pix")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, as mimkit trains on GPUs")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (compile time untimed)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (eager: tracing only)")
    p.add_argument("--peak-tflops", type=float, help="dense peak of the device for MFU (default: known GPUs' "
                   "bf16/fp32 data sheet value, else the timed matmul)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the first round")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-of", choices=MODELS, help=argparse.SUPPRESS)  # internal: one model's memory
    return p.parse_args(argv)


def build(name: str, a: argparse.Namespace) -> torch.nn.Module:
    """The model `name` at the benchmark configuration, in training mode, on `a.device`, compiled on ask."""
    model = _build(name, a)
    if a.compile:
        model.compile(backend=a.compile_backend)
    return model


def _build(name: str, a: argparse.Namespace) -> torch.nn.Module:
    if name == "mimkit":
        model = MAE(
            a.img_size, a.patch_size, a.in_chans, a.embed_dim, a.depth, a.num_heads,
            a.decoder_embed_dim, a.decoder_depth, a.decoder_num_heads, 4.0, not a.raw_pix_loss,
        )
        return model.train().to(a.device)
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(
        hidden_size=a.embed_dim, num_hidden_layers=a.depth, num_attention_heads=a.num_heads,
        intermediate_size=4 * a.embed_dim, image_size=a.img_size, patch_size=a.patch_size,
        num_channels=a.in_chans, decoder_hidden_size=a.decoder_embed_dim,
        decoder_num_hidden_layers=a.decoder_depth, decoder_num_attention_heads=a.decoder_num_heads,
        decoder_intermediate_size=4 * a.decoder_embed_dim, layer_norm_eps=1e-6,
        norm_pix_loss=not a.raw_pix_loss, mask_ratio=a.mask_ratio,
    )
    return ViTMAEForPreTraining(cfg).train().to(a.device)


def forward_fn(name: str, model: torch.nn.Module, a: argparse.Namespace, imgs, noise):
    """A closure computing the model's loss on the batch."""
    if name == "mimkit":
        return lambda: model(imgs, a.mask_ratio, noise)[0]
    return lambda: model(pixel_values=imgs, noise=noise).loss


def step_fn(name: str, model: torch.nn.Module, a: argparse.Namespace, imgs, noise):
    """A closure running one training step (the same AdamW for both models) and returning the loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.5e-4, weight_decay=0.05,
                            fused=a.device.startswith("cuda"))
    forward = forward_fn(name, model, a, imgs, noise)

    def step():
        with torch.autocast(torch.device(a.device).type, dtype=torch.bfloat16, enabled=a.bf16):
            loss = forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def inputs(a: argparse.Namespace):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(a.batch_size, a.in_chans, a.img_size, a.img_size, generator=g)
    noise = torch.rand(a.batch_size, (a.img_size // a.patch_size) ** 2, generator=g)
    return imgs.to(a.device), noise.to(a.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def peak_kib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def memory_of(name: str, a: argparse.Namespace) -> dict:
    """Peak memory growth (MiB) over warmup + one round of steps, measured in this (fresh) process."""
    step = step_fn(name, build(name, a), a, *inputs(a))
    before = torch.cuda.memory_allocated() / 1024 if a.device.startswith("cuda") else rss_kib()
    for _ in range(a.warmup + a.steps):
        step()
    sync(a.device)
    growth = peak_kib(a.device) - before
    return {"model": name, "before_mib": before / 1024, "peak_growth_mib": growth / 1024}


def matmul_peak_gflops(device: str, dtype: torch.dtype, reps: int = 5) -> float:
    """GFLOP/s of the best of `reps` square matmuls: the practical peak of this device, dtype and threads."""
    n = 8192 if device.startswith("cuda") else 512  # bf16 on a CPU without bf16 units: 2048 took minutes
    x, y = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    x @ y
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        x @ y
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets, (bf16, tf32), most specific name first.
GPU_PEAK_TFLOPS = (
    ("GH200", 989.4, 494.7), ("H200", 989.4, 494.7), ("H100 PCIe", 756.0, 378.0), ("H100 NVL", 835.0, 417.5),
    ("H100", 989.4, 494.7), ("B200", 2250.0, 1100.0), ("A100", 312.0, 156.0), ("L40S", 362.1, 183.0),
    ("L4", 121.0, 60.0), ("A10G", 70.0, 35.0), ("A10", 125.0, 62.5),
)


def dense_peak_tflops(a: argparse.Namespace, measured_gflops: float) -> tuple[float, str]:
    """The peak MFU is measured against, and where it comes from."""
    if a.peak_tflops:
        return a.peak_tflops, "--peak-tflops"
    if a.device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, bf16, tf32 in GPU_PEAK_TFLOPS:
            if key in name:
                return (bf16, f"{key} bf16 dense, data sheet") if a.bf16 else (tf32, f"{key} tf32 dense")
    return measured_gflops / 1e3, "the timed matmul (no data sheet value for this device)"


def saved_activations_mib(forward) -> float:
    """MiB of the distinct storages autograd keeps for backward during one call of `forward`."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values()) / 2**20


def step_flops(step) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else "unknown CPU"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.memory_of:
        print(json.dumps(memory_of(a.memory_of, a)))
        return

    torch.manual_seed(0)
    imgs, noise = inputs(a)
    models = {name: _build(name, a) for name in MODELS}
    steps = {name: step_fn(name, m, a, imgs, noise) for name, m in models.items()}
    params = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()}
    # counted before compiling: compiled kernels no longer pass through the FLOP counter's dispatch
    flops = {name: step_flops(steps[name]) for name in MODELS}
    saved = {name: saved_activations_mib(forward_fn(name, m, a, imgs, noise)) for name, m in models.items()}
    if a.compile:
        for model in models.values():
            model.compile(backend=a.compile_backend)  # in place: the step closures now run compiled
    for name in MODELS:
        for _ in range(a.warmup):
            steps[name]()

    rates = {name: [] for name in MODELS}  # images per wall-clock second, one entry per round
    cpu_ms = {name: [] for name in MODELS}  # process CPU milliseconds (all threads) per image
    for r in range(a.rounds):
        for name in MODELS if r % 2 == 0 else MODELS[::-1]:
            sync(a.device)
            t, c = time.perf_counter(), time.process_time()
            for _ in range(a.steps):
                steps[name]()
            sync(a.device)
            rates[name].append(a.steps * a.batch_size / (time.perf_counter() - t))
            cpu_ms[name].append(1e3 * (time.process_time() - c) / (a.steps * a.batch_size))
    peak = matmul_peak_gflops(a.device, torch.bfloat16 if a.bf16 else torch.float32)

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {machine(a.device)}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, load average {load}")
    print(f"config: {vars(a)}")
    print(f"{'bf16' if a.bf16 else 'fp32'} matmul peak: {peak:.1f} GFLOP/s")
    peak_tflops, peak_source = dense_peak_tflops(a, peak)
    print(f"MFU against {peak_tflops:.1f} TFLOP/s ({peak_source}); "
          f"{'fused' if a.device.startswith('cuda') else 'plain'} AdamW, "
          f"{'torch.compile (' + a.compile_backend + ')' if a.compile else 'eager'}")
    median = {name: statistics.median(rates[name]) for name in MODELS}
    best = {name: max(rates[name]) for name in MODELS}
    cpu = {name: statistics.median(cpu_ms[name]) for name in MODELS}
    for name in MODELS:
        achieved = flops[name] / 1e9 * best[name] / a.batch_size
        print(f"{name:>12}: {median[name]:7.1f} img/s median, {best[name]:7.1f} best of {a.rounds} rounds "
              f"(all: {', '.join(f'{x:.0f}' for x in rates[name])}); {cpu[name]:.2f} CPU ms/img; "
              f"params {params[name] / 1e6:.2f} M; step {flops[name] / 1e9:.1f} GFLOP, at the best round "
              f"{achieved:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of peak")
    print(f"speed ratio mimkit / transformers: {median['mimkit'] / median['transformers']:.2f} median "
          f"rounds, {best['mimkit'] / best['transformers']:.2f} best rounds, "
          f"{cpu['transformers'] / cpu['mimkit']:.2f} CPU time per image")
    for name in MODELS:
        per_image = flops[name] / a.batch_size
        mfu = per_image * best[name] / (peak_tflops * 1e12)
        print(f"{name:>12}: {best[name]:.1f} img/s, {per_image / 1e9:.4g} GFLOP/img (forward + backward), "
              f"MFU {100 * mfu:.1f}%")
    for name in MODELS:
        print(f"{name:>12}: {saved[name]:.0f} MiB of activations saved for backward")
    if not a.skip_memory:
        what = "allocated" if a.device.startswith("cuda") else "RSS"
        for name in MODELS:
            cmd = [sys.executable, __file__, *argv, "--memory-of", name]
            mem = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            print(f"{name:>12}: peak {what} growth {mem['peak_growth_mib']:.0f} MiB "
                  f"(over {mem['before_mib']:.0f} MiB before the first step; own subprocess)")


if __name__ == "__main__":
    main()
