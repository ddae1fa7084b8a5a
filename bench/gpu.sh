#!/usr/bin/env bash
# Issue 18's GPU numbers in one command (under 10 minutes on one H100/H200):
#   SIMU vs SOUL step time and peak memory, optimiser-state bytes, forward+backward MFU and attribution
#   time on a 1B-shaped Llama and a SmolLM2-135M-shaped one -> bench/results/gpu.json
#   (then, with SIMU_GPU_QUALITY=1, the large built-in's quality table -> results/large/).
# Usage: bench/gpu.sh            (from the repository root; uses .venv if there is one)
#        bench/gpu.sh --steps 10 (extra arguments go to bench/bench_scale.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible: bench/gpu.sh needs one (CPU dry run: $PY bench/bench_scale.py --device cpu --quick)')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 540 "$PY" bench/bench_scale.py --device cuda "$@"
if [ "${SIMU_GPU_QUALITY:-0}" = "1" ]; then
  "$PY" -m simu_core bench quality --size large --splits forget10 --seeds 1 --device cuda --out results/large --json
fi
