#!/usr/bin/env bash
# One-shot check on a CUDA machine: the CLI's GPU path end to end (bf16 autocast, workers, checkpoint,
# resume, visualize, torch.compile), then MAE ViT-B/16 at 224 px, bf16, batch 256 per GPU, against
# transformers' ViTMAE at the same configuration, eager and with torch.compile, fused AdamW: images/s,
# model FLOPs per image (torch.utils.flop_counter) and MFU against the GPU's bf16 dense peak.
#
# Usage: [DATA=fashion-mnist] [MIMKIT_DATA=<dir with its IDX files>] OUT=<dir> bash benchmarks/gpu_check.sh
#        bash benchmarks/gpu_check.sh --dry-run    # the same steps on CPU at tiny shapes (the test suite runs it)
# DATA defaults to fashion-mnist (use DATA=synthetic:60000 on a machine without it).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
mimkit() { "$PY" -m mimkit.cli "$@"; }
last() { tr '\r' '\n' < "$1" | grep -v '^\s*$' | tail -n "${2:-2}"; }
status=0
check() { echo "exit $1"; [ "$1" = 0 ] || status=1; }

if [ "${1:-}" = "--dry-run" ]; then
    DRY=1 DATA=synthetic:64 WORKERS=1 STEPS=4 MORE=6 LOG=2
    TINY=(--set model.kwargs.depth=1 --set model.kwargs.decoder_depth=1 --batch-size 8)
    VITB=(--device cpu --bf16 --img-size 32 --patch-size 8 --in-chans 3 --embed-dim 32 --depth 1 --num-heads 2
          --decoder-embed-dim 32 --decoder-depth 1 --decoder-num-heads 2 --batch-size 4 --threads 1
          --warmup 0 --rounds 1 --steps 1 --skip-memory)
    COMPILE=(--compile --compile-backend eager)  # dynamo's tracing without code generation: seconds on CPU
    echo "dry run: CPU, tiny shapes"
else
    DRY="" DATA=${DATA:-fashion-mnist} WORKERS=8 STEPS=300 MORE=350 COMPILED_STEPS=60 LOG=50
    TINY=()
    VITB=(--device cuda --bf16 --img-size 224 --patch-size 16 --in-chans 3 --embed-dim 768 --depth 12
          --num-heads 12 --decoder-embed-dim 512 --decoder-depth 8 --decoder-num-heads 16 --batch-size 256
          --rounds 3 --steps 5)
    COMPILE=(--compile --skip-memory)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PY" -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)"

echo "== pretrain mae vit_tiny on $DATA, $STEPS steps (bf16 autocast on CUDA)"
mimkit pretrain mae --data "$DATA" --model vit_tiny --out "$OUT/run" --max-steps "$STEPS" "${TINY[@]}" \
    --set data.num_workers=$WORKERS --set train.log_every=$LOG >"$OUT/pretrain.log" 2>&1; check $?
last "$OUT/pretrain.log" 3
grep "\"step\": $STEPS" "$OUT/run/metrics.jsonl"
echo "== resume to $MORE steps"
mimkit pretrain mae --data "$DATA" --model vit_tiny --out "$OUT/run" --max-steps "$MORE" "${TINY[@]}" \
    --set data.num_workers=$WORKERS >"$OUT/resume.log" 2>&1; check $?
grep -o "resuming from step [0-9]*" "$OUT/resume.log"
mimkit visualize "$OUT/run" --out "$OUT/recon.png" --n 6; check $?
if [ -z "$DRY" ]; then  # inductor's code generation takes minutes on a CPU: the dry run traces only, below
    echo "== torch.compile path, $COMPILED_STEPS steps"
    mimkit pretrain mae --data "$DATA" --model vit_tiny --out "$OUT/compiled" --max-steps "$COMPILED_STEPS" \
        --set train.compile=true --set data.num_workers=$WORKERS --set train.log_every=50 >"$OUT/compile.log" 2>&1
    check $?
    last "$OUT/compile.log" 2
    grep "\"step\": $COMPILED_STEPS" "$OUT/compiled/metrics.jsonl"
fi

echo "== MAE ViT-B/16 224, bf16, batch 256: mimkit vs transformers, eager (images/s, GFLOP/img, MFU)"
"$PY" benchmarks/pretrain_throughput.py "${VITB[@]}" 2>&1 | tee "$OUT/throughput.txt"; check "${PIPESTATUS[0]}"
echo "== the same with torch.compile"
"$PY" benchmarks/pretrain_throughput.py "${VITB[@]}" "${COMPILE[@]}" 2>&1 | tee "$OUT/throughput-compiled.txt"
check "${PIPESTATUS[0]}"
grep -h "MFU" "$OUT/throughput.txt" "$OUT/throughput-compiled.txt"
exit $status
