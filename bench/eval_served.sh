#!/usr/bin/env bash
# Reduced-budget evaluation of one served model on a small CPU: sample quality (DDIM 5/10/20,
# DPM-Solver++ 5/10), purification robustness (L-inf, PGD-EOT and the weaker attacks) and
# corruption removal (Gaussian noise, salt-and-pepper).
# The budgets are far below the protocol (>= 100 PGD steps, EOT >= 8, n >= 500): the
# defaults fit a few minutes per model on a shared 2-core CPU. Override them through the
# environment, e.g. N_QUALITY=2000 N_ROBUST=512 ATTACK_STEPS=25,50,100 EOT=8 DRAWS=16 on a GPU.
#
# usage: bench/eval_served.sh models/weights/fmnist-dro-at.safetensors [out_root]
set -euo pipefail

MODEL=${1:?usage: bench/eval_served.sh MODEL.safetensors [out_root]}
NAME=$(basename "$MODEL" .safetensors)
OUT=${2:-bench/results/eval}/$NAME
N_QUALITY=${N_QUALITY:-200}
N_ROBUST=${N_ROBUST:-32}
EPS=${EPS:-0.0314,0.1}
ATTACKS=${ATTACKS:-none,classifier-only,bpda-eot,pgd-eot}
ATTACK_STEPS=${ATTACK_STEPS:-10,20}
EOT=${EOT:-2}
DRAWS=${DRAWS:-4}
T_STAR=${T_STAR:-0.1}
PURIFY_STEPS=${PURIFY_STEPS:-2}
SANITY_N=${SANITY_N:-16}
NICE=${NICE:-10}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # on a loaded CPU one thread per process beats two that spin-wait
RUN="nice -n $NICE robustdiff eval"

if [[ ${SKIP_QUALITY:-0} != 1 ]]; then
    $RUN quality --model "$MODEL" --sampler ddim --steps 5,10,20 --n "$N_QUALITY" --out "$OUT/quality-ddim"
    $RUN quality --model "$MODEL" --sampler dpm-solver++ --steps 5,10 --n "$N_QUALITY" --out "$OUT/quality-dpmpp"
fi
if [[ ${SKIP_ROBUST:-0} != 1 ]]; then
    $RUN robust --model "$MODEL" --threat linf --eps "$EPS" --attacks "$ATTACKS" --attack-steps "$ATTACK_STEPS" \
        --eot "$EOT" --draws "$DRAWS" --n "$N_ROBUST" --t-star "$T_STAR" --sampler ddim --steps "$PURIFY_STEPS" \
        --sanity-n "$SANITY_N" --batch-size 32 --out "$OUT/robust-linf"
fi
if [[ ${SKIP_CORRUPTION:-0} != 1 ]]; then
    $RUN corruption --model "$MODEL" --t-star 0.05,0.1,0.2 --sampler ddim --steps 5 --sigma 0.2 --amount 0.1 \
        --n "${N_CORRUPTION:-128}" --out "$OUT/corruption"
fi
