#!/usr/bin/env bash
# One-shot check on a CUDA machine: the CLI's GPU path end to end (bf16 autocast, workers, checkpoint,
# resume, visualize, torch.compile) and MAE ViT-B/16 throughput against transformers under bf16.
# Usage: MIMKIT_DATA=<dir with the Fashion-MNIST IDX files> OUT=<dir> bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
mimkit() { python3 -m mimkit.cli "$@"; }
last() { tr '\r' '\n' < "$1" | grep -v '^\s*$' | tail -n "${2:-2}"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)"

echo "== pretrain mae vit_tiny on Fashion-MNIST, CUDA, bf16 autocast, 300 steps"
mimkit pretrain mae --data fashion-mnist --model vit_tiny --out "$OUT/run" --max-steps 300 \
    --set data.num_workers=8 --set train.log_every=50 >"$OUT/pretrain.log" 2>&1; echo "exit $?"
last "$OUT/pretrain.log" 3
grep '"step": 300' "$OUT/run/metrics.jsonl"
echo "== resume to 350 steps"
mimkit pretrain mae --data fashion-mnist --model vit_tiny --out "$OUT/run" --max-steps 350 \
    --set data.num_workers=8 >"$OUT/resume.log" 2>&1; echo "exit $?"
grep -o "resuming from step [0-9]*" "$OUT/resume.log"
mimkit visualize "$OUT/run" --out "$OUT/recon.png" --n 6
echo "== MAE ViT-B/16 224, batch 128, bf16: mimkit vs transformers"
python3 benchmarks/pretrain_throughput.py --device cuda --bf16 --img-size 224 --patch-size 16 --in-chans 3 \
    --embed-dim 768 --depth 12 --num-heads 12 --decoder-embed-dim 512 --decoder-depth 8 \
    --decoder-num-heads 16 --batch-size 128 --rounds 3 --steps 5 2>&1 | tee "$OUT/throughput.txt"
echo "== torch.compile path, 60 steps"
mimkit pretrain mae --data fashion-mnist --model vit_tiny --out "$OUT/compiled" --max-steps 60 \
    --set train.compile=true --set data.num_workers=8 --set train.log_every=20 >"$OUT/compile.log" 2>&1; echo "exit $?"
last "$OUT/compile.log" 2
grep '"step": 60' "$OUT/compiled/metrics.jsonl"
