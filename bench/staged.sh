#!/usr/bin/env bash
# The trade-off bench on the two-stage built-in (issue 17): for each base-model replicate (train seed), build
# it (pretrain, then fine-tune full and the held-out sets' references), then run every method on forget10b
# and forget10c with optimiser seed 1. Resumable (the builds and bench_tradeoff keep what they finished).
# Replicates run side by side, one CPU thread each. Afterwards, pool them:
#   .venv/bin/python bench/bench_tradeoff.py --pool "$(ls bench/results/tradeoff_staged-tiny-seed*_forget10?.json | paste -sd,)"
#
#   bash bench/staged.sh [SIZE=tiny] [TRAIN_SEEDS="1 2 3"] [STEPS=250]
#
# With TUNED=FILE (bench/tune_equal.py's picks), every method runs at its pick from the equal grid instead
# of its preset, each run ends once both readings are reached, and the files get the suffix _tuned.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-tiny}
SEEDS=${2:-1 2 3}
STEPS=${3:-250}
PY=${PY:-.venv/bin/python}
TUNED=${TUNED:-}
EXTRA=() SUFFIX=""
if [ -n "$TUNED" ]; then EXTRA=(--tuned "$TUNED" --stop-read) SUFFIX=_tuned; fi
HOME_DIR=$($PY -c "from simu_core.config import simu_home; print(simu_home())")

lane() {
    local seed=$1 name="staged-$SIZE-seed$1"
    $PY -m simu_core build-staged --size "$SIZE" --train-seed "$seed" --parts full,retain10b,retain10c --threads 1
    for split in forget10b forget10c; do
        $PY bench/bench_tradeoff.py --root "$HOME_DIR/$name" --split "$split" --steps "$STEPS" --seeds 1 \
            --methods simu,random_mask,simu_paper,random_mask_paper,so_graddiff,fo_graddiff \
            "${EXTRA[@]}" --out "bench/results/tradeoff_${name}_$split$SUFFIX.json" \
            --html "results/tradeoff/curves_${name}_$split$SUFFIX.html"
    done
}

for seed in $SEEDS; do lane "$seed" > "results/staged-$SIZE-seed$seed$SUFFIX.log" 2>&1 & done
wait
