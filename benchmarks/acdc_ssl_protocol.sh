#!/usr/bin/env bash
# Issue 16's ACDC semi-supervised protocol, one command for one GPU (sized for an H200):
# supervised-only, finetuning without pretraining and full IDEAL, 3 and 7 labelled patients,
# seeds 0 1 2 (18 runs), 10,000 finetuning iterations of 8 labelled + 8 unlabelled slices at 128 px,
# one encoder pretrained for 4,000 iterations (32 slices) shared by every IDEAL run, bf16 where the
# device runs it (--precision auto). The claim is judged on the report half of val.list (see
# benchmarks/README.md, "Select and report halves").
#
# Resumable: --resume skips the runs already in the result file (its budget must match, or it stops
# with exit 2), and every run checkpoints every 500 iterations under WORK/states, so a run cut off
# by a time limit continues from its last checkpoint. Just run the same command again. On a fresh
# machine bring WORK/pretrained back first (the IDEAL runs must all start from one encoder) and
# WORK/states if it is wanted; the result file holds everything else. SIGTERM (timeout, Ctrl-C)
# stops the runs in progress at a checkpoint. On a lent device machine, where only $OUT comes back:
#   timeout 500 benchmarks/acdc_ssl_protocol.sh; cp benchmarks/results/acdc_ssl_gpu_10k.json "$OUT"/;
#   cp -r runs/acdc_ssl_gpu_10k/pretrained "$OUT"/
#
# Usage: IDEAL_DATA=/path/to/data benchmarks/acdc_ssl_protocol.sh [extra acdc_ssl.py options]
#   Options given here come after the defaults below, so they win (argparse keeps the last).
#   Settings as environment variables: RESULT (the result file), WORK, PARALLEL, LR, PRETRAINED_MIX, DEVICE.
# CPU variant (2 cores; roughly half a day: a 10k-iteration run takes about an hour there):
#   OMP_NUM_THREADS=1 PARALLEL=2 DEVICE=cpu RESULT=benchmarks/results/acdc_ssl_cpu_10k.json WORK=runs/acdc_ssl_cpu_10k \
#     benchmarks/acdc_ssl_protocol.sh
# Smoke check of the wiring (seconds):
#   benchmarks/acdc_ssl_protocol.sh --iterations 4 --pretrain-iterations 2 --checkpoint-every 2 --seeds 0 \
#     --work /tmp/h16/work --out /tmp/h16/smoke.json --device cpu --parallel 1
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${IDEAL_DATA:?set IDEAL_DATA to the shared data folder}/acdc"
RESULT="${RESULT:-benchmarks/results/acdc_ssl_gpu_10k.json}"  # not OUT: a device machine sets $OUT
WORK="${WORK:-runs/acdc_ssl_gpu_10k}"
PARALLEL="${PARALLEL:-18}"  # every run at once: 18 small U-Nets fill one H200 far better than one does
LR="${LR:-0.01}"  # SSL4MIS's learning rate
PRETRAINED_MIX="${PRETRAINED_MIX:-0.5}"  # IDEAL starts from half the pretrained encoder (CPU table)
DEVICE="${DEVICE:-auto}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"

exec "$PYTHON" benchmarks/acdc_ssl.py --data "$DATA" --out "$RESULT" --work "$WORK" \
  --labeled-patients 3 7 --methods supervised-only finetune-no-pretraining ideal --seeds 0 1 2 \
  --iterations 10000 --size 128 --batch-size 8 --unlabeled-batch-size 8 --lr "$LR" \
  --pretrain-iterations 4000 --pretrain-batch-size 32 --pretrained-mix "$PRETRAINED_MIX" \
  --precision auto --parallel "$PARALLEL" --device "$DEVICE" --checkpoint-every 500 --resume "$@"
