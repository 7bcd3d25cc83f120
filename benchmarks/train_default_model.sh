#!/usr/bin/env bash
# Trains the default model shipped in IDEALSegment/Resources/Models with the IDEAL pipeline:
# dense contrastive pretraining on every ACDC training slice, then two-stream finetuning on the
# labels of all 70 training patients with the unlabelled consistency term on, selected on val.list.
# Usage: benchmarks/train_default_model.sh [OUT_DIR]   (IDEAL_DATA must point at the shared data)
# The CPU schedule below took about 1 h 15 min on 2 cores (the shipped 1.0.0); on a GPU use the
# published scale: ITERATIONS=30000 PRETRAIN_ITERATIONS=10000 SIZE=256.
set -euo pipefail
DATA="${IDEAL_DATA:?set IDEAL_DATA to the shared data folder}/acdc"
OUT="${1:-runs/default_model}"
SIZE="${SIZE:-192}"
PRETRAIN_ITERATIONS="${PRETRAIN_ITERATIONS:-800}"
ITERATIONS="${ITERATIONS:-4500}"
IDEALTRAIN="${IDEALTRAIN:-idealtrain}"
mkdir -p "$OUT"
resume_if() { [ -d "$1" ] && [ -n "$(ls -A "$1" 2>/dev/null)" ] && echo --resume || true; }

if [ ! -f "$OUT/pretrained/card.json" ]; then
  $IDEALTRAIN pretrain --data "ssl4mis:$DATA" --iterations "$PRETRAIN_ITERATIONS" --size "$SIZE" \
    --batch-size 16 --out "$OUT/pretrained" --checkpoint-dir "$OUT/pretrain-state" --checkpoint-every 200 \
    $(resume_if "$OUT/pretrain-state") --progress-json --id idealsegment-acdc-encoder --version 1.0.0 --overwrite
fi
$IDEALTRAIN finetune --labeled "ssl4mis:$DATA" --unlabeled-includes-labeled --pretrained "$OUT/pretrained" \
  --val "ssl4mis:$DATA" --validate-every 500 --iterations "$ITERATIONS" --batch-size 8 --unlabeled-batch-size 4 \
  --lr 0.03 --rotation 180 --scale-range 0.7 1.4 --checkpoint-dir "$OUT/finetune-state" --checkpoint-every 250 \
  $(resume_if "$OUT/finetune-state") --progress-json --id idealsegment-acdc --version 1.0.0 --half --out "$OUT/model" --overwrite
