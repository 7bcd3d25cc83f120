#!/usr/bin/env bash
# Trains the default model shipped in IDEALSegment/Resources/Models with the IDEAL pipeline:
# dense contrastive pretraining on every ACDC training slice, then two-stream finetuning on the
# labels of all 70 training patients with the unlabelled consistency term on, selected on val.list;
# then a second, lower-learning-rate cycle that continues the whole model (--init-from) with the
# largest-heart-component postprocessing on (chosen on val.list), validating every 250 iterations.
# (The shipped 1.1.0 ran cycle 2 without it and chose among its checkpoints 1500-3500 with it
# afterwards; the card's training.checkpoint_selection says so.)
# Usage: benchmarks/train_default_model.sh [OUT_DIR]   (IDEAL_DATA must point at the shared data)
# The CPU schedule below took about 1 h 15 min (cycle 1, the shipped 1.0.0) plus 45 min (cycle 2,
# 1.1.0) on 2 cores; on a GPU use the published scale: ITERATIONS=30000 PRETRAIN_ITERATIONS=10000 SIZE=256.
set -euo pipefail
DATA="${IDEAL_DATA:?set IDEAL_DATA to the shared data folder}/acdc"
OUT="${1:-runs/default_model}"
SIZE="${SIZE:-192}"
PRETRAIN_ITERATIONS="${PRETRAIN_ITERATIONS:-800}"
ITERATIONS="${ITERATIONS:-4500}"
CYCLE2_ITERATIONS="${CYCLE2_ITERATIONS:-3500}"
IDEALTRAIN="${IDEALTRAIN:-idealtrain}"
mkdir -p "$OUT"
resume_if() { [ -d "$1" ] && [ -n "$(ls -A "$1" 2>/dev/null)" ] && echo --resume || true; }
common=(--labeled "ssl4mis:$DATA" --unlabeled-includes-labeled --val "ssl4mis:$DATA" --validate-every 500
        --batch-size 8 --unlabeled-batch-size 4 --rotation 180 --scale-range 0.7 1.4 --checkpoint-every 250
        --progress-json --id idealsegment-acdc --half --overwrite)

if [ ! -f "$OUT/pretrained/card.json" ]; then
  $IDEALTRAIN pretrain --data "ssl4mis:$DATA" --iterations "$PRETRAIN_ITERATIONS" --size "$SIZE" \
    --batch-size 16 --out "$OUT/pretrained" --checkpoint-dir "$OUT/pretrain-state" --checkpoint-every 200 \
    $(resume_if "$OUT/pretrain-state") --progress-json --id idealsegment-acdc-encoder --version 1.0.0 --overwrite
fi
if [ ! -f "$OUT/model/card.json" ]; then
  $IDEALTRAIN finetune "${common[@]}" --pretrained "$OUT/pretrained" --iterations "$ITERATIONS" --lr 0.03 \
    --checkpoint-dir "$OUT/finetune-state" $(resume_if "$OUT/finetune-state") --version 1.0.0 --out "$OUT/model"
fi
if [ ! -f "$OUT/model-cycle2/card.json" ]; then
  $IDEALTRAIN finetune "${common[@]}" --init-from "$OUT/model" --iterations "$CYCLE2_ITERATIONS" --lr 0.01 \
    --largest-component on --validate-every 250 --checkpoint-dir "$OUT/cycle2-state" $(resume_if "$OUT/cycle2-state") \
    --version 1.1.0 --out "$OUT/model-cycle2"
fi
