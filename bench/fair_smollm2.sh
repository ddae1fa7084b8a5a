#!/usr/bin/env bash
# Issue 17's fair test on the real-knowledge benchmark (SmolLM2-135M-Instruct: forget Asia's capitals, keep
# Europe's): the equal grid on `other_capitals` (never reported; every method the same lr x retain-weight
# points, Sophia calibrated to 30% unclipped, the benchmark's 60-step budget and forget-known stop), then the
# quality table on the forget split with every method at its pick and the relearning attack on every row.
# Resumable: the grid's points and the table's cells keep what they finished. Lanes run side by side, one CPU
# thread each (the grid: one per retain weight; the table: two by method), then the page from every cell.
#
#   bash bench/fair_smollm2.sh [SEEDS=1]
#
# GAMMAS="5 20" and LRS=1e-5,1e-4 set the grid (bench/tune_equal.py's SmolLM2 defaults).
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-1}
PY=${PY:-.venv/bin/python}
GAMMAS=${GAMMAS:-5 20}
LRS=${LRS:-1e-5,1e-4}
TUNED=bench/results/tuning_equal_smollm2.json
OUT=results/fair_smollm2
export HF_HUB_OFFLINE=1

run_lanes() {  # run_lanes NAME CMD... : each CMD in the background, logged to results/NAME_<i>.log; fail if one fails
    local name=$1 pids=() logs=() failed=0
    shift
    for cmd in "$@"; do
        logs+=("results/${name}_${#pids[@]}.log")
        bash -c "$cmd" > "${logs[-1]}" 2>&1 &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || { echo "lane $i of $name failed: see ${logs[$i]}" >&2; failed=1; }
    done
    return "$failed"
}

lanes=() parts=()
for gamma in $GAMMAS; do
    parts+=("bench/results/tuning/equal_smollm2_g$gamma.json")
    lanes+=("$PY bench/tune_equal.py --benchmark smollm2 --lrs $LRS --gammas $gamma --threads 1 --out ${parts[-1]}")
done
run_lanes tune_smollm2 "${lanes[@]}"
$PY bench/tune_equal.py --benchmark smollm2 --merge "$(IFS=,; echo "${parts[*]}")" --out "$TUNED"

table="$PY -m simu_core bench quality --benchmark smollm2 --seeds $SEEDS --threads 1 --tuned $TUNED --relearn --out $OUT"
run_lanes fair_smollm2 "$table --methods simu_paper,so_graddiff,simu" "$table --methods random_mask_paper,fo_graddiff,random_mask"
$table --methods simu,random_mask,simu_paper,random_mask_paper,so_graddiff,fo_graddiff --stored-only
