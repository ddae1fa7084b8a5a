#!/usr/bin/env bash
# Issue 18's GPU numbers and checks in one command (under 10 minutes on one H100/H200):
#   1. SIMU vs SOUL step time and peak memory, optimiser-state bytes, entries changed outside the trained
#      slices, forward+backward MFU and attribution time on a 1B-shaped Llama and a SmolLM2-135M-shaped
#      one -> $GPU_OUT/gpu.json (bench/bench_scale.py);
#   2. the user's path end to end: `unlearn` with the SIMU and SOUL presets on the default built-in, the
#      device picked by the code itself -> $GPU_OUT/gpu_unlearn_<method>.json (the CLI's summary);
#   3. with SIMU_GPU_QUALITY=1, the large built-in's quality table -> results/large/ (longer: the build
#      trains an 82M model on 1000 authors).
# Usage: bench/gpu.sh            (from the repository root; uses .venv if there is one)
#        bench/gpu.sh --steps 10 (extra arguments go to bench/bench_scale.py)
# GPU_OUT: folder for the JSON (default bench/results).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT_DIR=${GPU_OUT:-bench/results}
export HF_HUB_OFFLINE=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible: bench/gpu.sh needs one (CPU dry run: $PY bench/bench_scale.py --device cpu --quick)')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
mkdir -p "$OUT_DIR"
timeout 540 "$PY" bench/bench_scale.py --device cuda --out "$OUT_DIR/gpu.json" "$@"
runs=$(mktemp -d)
for method in simu so_graddiff; do
  "$PY" -m simu_core unlearn --method "$method" --runs-dir "$runs" --json | tail -1 > "$OUT_DIR/gpu_unlearn_$method.json"
  cat "$OUT_DIR/gpu_unlearn_$method.json"
done
rm -rf "$runs"
if [ "${SIMU_GPU_QUALITY:-0}" = "1" ]; then
  "$PY" -m simu_core bench quality --size large --splits forget10 --seeds 1 --device cuda --out results/large --json
fi
