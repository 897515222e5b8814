#!/usr/bin/env bash
# The `large` preset (~1 M cells) end to end on this machine, each stage timed with its peak
# memory (GNU time): simulate -> ingest -> info --verify -> the loader's read rates (store
# larger than the cache) -> train (a few steps, cache smaller than the store) -> embed ->
# evaluate. Figures for docs/scaling.md's projection. PYTHON: the interpreter with scbd-cells.
#
#   bash benchmarks/large_end_to_end.sh WORK_DIR [TRAIN_STEPS]
#
# WORK_DIR must be new (about 14 GB: the simulated crops, the store, the embeddings).
# Writes WORK_DIR/stages.md (a markdown table) and WORK_DIR/<stage>.log.
set -euo pipefail
work=${1:?usage: large_end_to_end.sh WORK_DIR [TRAIN_STEPS]}
steps=${2:-10}
cli=${SCBD_CELLS:-scbd-cells}
mkdir "$work"
table="$work/stages.md"
printf '| stage | wall s | peak RSS GiB |\n|---|---|---|\n' > "$table"

stage() {  # stage NAME COMMAND...
    local name=$1; shift
    echo "$(date -u +%H:%M:%S) $name: $*" >&2
    /usr/bin/time -f "%e %M" -o "$work/$name.time" "$@" > "$work/$name.log" 2>&1
    read -r wall kib < "$work/$name.time"
    printf '| %s | %s | %.2f |\n' "$name" "$wall" "$(echo "$kib / 1048576" | bc -l)" >> "$table"
}

stage simulate "$cli" simulate "$work/screen" --preset large --seed 0 --workers 2
stage ingest "$cli" ingest "$work/screen/cells.csv" --out "$work/screen.zarr" \
    --perturbation-column gene --guide-column guide --control nontargeting --resize 32 \
    --workers 2
stage verify "$cli" info "$work/screen.zarr" --verify
du -sb "$work/screen.zarr" | awk '{printf "store: %.2f GiB on disk\n", $1 / 2^30}' >> "$work/sizes.txt"
# the loader alone, store larger than its cache: segment and row reads against in memory
stage loader "${PYTHON:-python}" "$(dirname "$0")/loader.py" --store "$work/screen.zarr" --repeats 2
stage train "$cli" train "$work/screen.zarr" --out "$work/run" --steps "$steps" \
    --val-every "$steps" --cache-gb 0.25 --device cpu
stage embed "$cli" embed "$work/run" "$work/screen.zarr" --out "$work/cells.h5ad" --aggregate
du -sb "$work/cells.h5ad" | awk '{printf "cells.h5ad: %.2f GiB\n", $1 / 2^30}' >> "$work/sizes.txt"
stage evaluate "$cli" evaluate "$work/cells.h5ad" --corum "$work/screen/complexes.txt" \
    --out "$work/report" --no-umap
cat "$table" "$work/sizes.txt"
