#!/usr/bin/env bash
# Issue 17's fair quality table on the two-stage built-in, one table per base-model replicate, then pooled
# over them: for each train seed, build the base (pretrain, fine-tune full and the held-out sets' references),
# run `bench quality` on forget10b and forget10c (every method at its pick from the equal grid, MUSE's stop,
# the relearning attack; seeds 1-3), and finally `bench pool` (paired differences per (base, split) block,
# t-interval over the blocks). Resumable: the builds and the tables keep what they finished. Replicates run
# side by side, one CPU thread each.
#
#   bash bench/fair_staged.sh [SIZE=tiny] [TRAIN_SEEDS="1 2 3"]
#
# TUNED=FILE picks the tuning file (default: bench/tune_equal.py's on base 1 of that size,
# bench/results/tuning_equal_staged-SIZE-seed1.json; run that first for a new size). REPORT_SEEDS=N optimiser
# seeds per split (default 3; with 1, each split's differences are paired item by item instead of over seeds).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-tiny}
SEEDS=${2:-1 2 3}
REPORT_SEEDS=${REPORT_SEEDS:-3}
PY=${PY:-.venv/bin/python}
TUNED=${TUNED:-bench/results/tuning_equal_staged-$SIZE-seed1.json}
METHODS=simu,random_mask,simu_paper,random_mask_paper,so_graddiff,fo_graddiff
if [ ! -f "$TUNED" ]; then
    echo "No tuning file $TUNED: run bench/tune_equal.py --root <base 1 of size $SIZE> first, or set TUNED=FILE." >&2
    exit 2
fi
HOME_DIR=$($PY -c "from simu_core.config import simu_home; print(simu_home())")

lane() {
    local name="staged-$SIZE-seed$1"
    $PY -m simu_core build-staged --size "$SIZE" --train-seed "$1" --parts full,retain10b,retain10c --threads 1
    $PY -m simu_core bench quality --root "$HOME_DIR/$name" --splits forget10b,forget10c --seeds "$REPORT_SEEDS" --threads 1 \
        --methods "$METHODS" --tuned "$TUNED" --stop muse --relearn --out "results/fair_$name"
}

tables=() pids=()
for seed in $SEEDS; do
    lane "$seed" > "results/fair_staged-$SIZE-seed$seed.log" 2>&1 &
    pids+=($!) tables+=("results/fair_staged-$SIZE-seed$seed")
done
failed=0
for i in "${!pids[@]}"; do  # a failed lane may leave an older page behind: never pool it
    wait "${pids[$i]}" || { echo "lane ${tables[$i]} failed: see ${tables[$i]}.log" >&2; failed=1; }
done
[ "$failed" = 0 ] || exit 1
$PY -m simu_core bench pool --tables "$(IFS=,; echo "${tables[*]}")" --out "results/fair_staged-$SIZE"
