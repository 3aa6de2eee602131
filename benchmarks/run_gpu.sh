#!/usr/bin/env bash
# GPU benchmark (needs a CUDA device): every method through PyTorch on the GPU, results into benchmarks/results/.
# Usage: bash benchmarks/run_gpu.sh [PROFILE]
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-loihi-like}"
out="benchmarks/results/gpu-${profile}"
python -m neuroinit.cli bench --device cuda --profile "$profile" --hidden 256,1024 --batch 1,64 --repeats 5 \
    --steps 100 --recalibrate --json "$out.json" > "$out.txt" 2> "$out.log"
python benchmarks/render.py "$out.json" > "$out.md"
