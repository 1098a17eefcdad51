#!/usr/bin/env bash
# Seed B and seed A at 32x32 (the `fmnist` preset, full-size Fashion-MNIST) over several training
# seeds, paired, in one run of at most BUDGET_S seconds (default 540) on one GPU: the GPU version of
# the 16x16 CPU experiments (`robustdiff bench images16`, docs/RESULTS.md). Every training is its own
# process, up to JOBS (8) side by side on the one GPU (all on $DEVICE: CUDA_VISIBLE_DEVICES as
# given, OMP_NUM_THREADS=1 each), longest first; the reports are merged at the end.
#
#   bash bench/gpu_seeds.sh OUT_DIR
#
# - seed B: one process pre-trains standard on clean data (`images16 seed-b --pretrain-only`) in
#   250-update chunks until FD@10 changes by < 3% over a chunk, 2,000 updates, or PRETRAIN_S (150) s;
#   then one process per (arm, seed) fine-tunes from that checkpoint (`--init`) for 200 minibatches:
#   standard (200 updates), standard-equal-updates (600) and dro-at (m = 3: 600), 4 seeds, FD/KID at
#   NFE 5 and 10 and the exposure bias per step. These start as soon as the checkpoint exists.
# - seed A: one process per (arm, seed) from the start, beside the pre-training: 90% of the training
#   images + N(0, 0.2^2) (unclamped), standard vs equivariant-at adversarial and random (lambda 1,
#   r_max 0.5, the paper's radius), 800 updates each from scratch, 3 seeds.
# - `images16 merge` joins each experiment's parts and recomputes the paired comparisons. A process
#   that fails or is cut at the deadline costs only its own run: the merge takes what finished and
#   lists the missing runs (`missing` in the JSON), and the summary gives each process's exit code.
#
# Sizing. Rate, from the one GPU rate measured (docs/BENCHMARKS.md "Training on the GPU",
# MODEL_CARDS.md): seven training runs and a classifier side by side on one H100 each trained the
# 1.62M-parameter fmnist-cpu network at 3-7 updates/s (5.7 for standard, batch 128), with the GPU
# nearly idle and the 16 host cores oversubscribed. The `fmnist` preset (6.5M) has the same depth
# (levels 1-2-2, 2 res blocks, attention at 8x8), so the same number of kernel launches per update;
# sized at RATE = 6 updates/s for standard and dro-at updates, and 2.6x / 2.0x that cost for
# equivariant adversarial / random (the CPU ratios of docs/BENCHMARKS.md "Training"). Batch 256: the
# fmnist preset costs 8.6 GFLOP per image forward + backward (torch's FLOP counter), 2.2 TFLOP per
# update, 13 TFLOP/s at 6 updates/s (bf16 autocast): under 2% of an H100/H200's bf16 dense peak (989
# TFLOP/s), so kernel launches and host work, not the GPU, set the rate. Side by side: ASSUMED that
# each of up to 8 processes keeps about that single-process rate, since the GPU is > 95% idle under
# one and the 16 host cores give each process its own (one torch thread each, unlike the
# oversubscribed H100 run); 8 processes need ~105 TFLOP/s in all, ~11% of the peak, which small
# kernels, time-sliced between processes, may or may not reach. Not measured: the first GPU run must
# check it from train_s per run in the JSON and the updates/s per arm that each merge prints (and
# lower JOBS or BATCH if the rate falls). Per process: START_S = 20 s to start and end (imports, data,
# the classifier's reference features, interpreter exit), EVAL = 3 s per seed-A model and 5 s per
# fine-tuned model (500 samples at NFE 5 + 10, FD/KID with 30 bootstrap rounds, ~3-4 s measured on
# the CPU; seed B also the exposure bias):
#   seed-A adversarial 20 + 800 x 2.6 / 6 + 3 = 370 s, random 20 + 800 x 2.0 / 6 + 3 = 290 s,
#   standard 20 + 800 / 6 + 3 = 157 s; pre-training 20 + 150 = 170 s;
#   seed-B dro-at and standard-equal-updates 20 + 600 / 6 + 5 = 125 s, standard 20 + 200 / 6 + 5 = 59 s
#   (each rounded up). Longest first on 8 slots: at 0 s pre-training, 3 adversarial, 3 random and
#   standard s0; standard s1 at 157 s, s2 at 170 s (pre-training done: the 12 fine-tunes join the
#   queue); dro-at at 290 (x3) and 314 s, standard-equal-updates at 327 and 370 (x3) s, standard
#   fine-tunes at 415 (x3) and 439 s; the last ends at 498 s, with 3,857 of the 8 x 498 slot-seconds
#   busy (97%). MERGE_S = 30 s is kept for the two merges (~10 s each): 498 + 30 = 528 <= 540.
#   Fewer, longer processes do not fit: one per seed-A seed (its arms one after another) needs
#   20 + 800 x 5.6 / 6 + 9 = 776 s, and one per seed-B seed (7 x 200 updates) moves the end to 583 s.
# Each process runs under a limit that ends at the deadline (BUDGET_S - MERGE_S); one whose expected
# time (at RATE) no longer fits before it is skipped, not started. The update counts are fixed so
# that seeds pair: if the rate is lower, the longest runs are cut (their arm goes missing), and the
# next run's sizes (FINETUNE, UPDATES_A, SEEDS_*, JOBS, RATE, ...) should come from the measured one.
# This script has not run on a GPU yet.
#
# On a GPU machine without the data set, copy it next to the checkout first (mkdir -p
# .carry/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .carry/fashion-mnist/;
# .carry is git-ignored); DATA names another IDX folder. Every size is an environment variable
# (below), so a test runs this script on the CPU at a tiny size. Writes at most 5 files to OUT_DIR,
# few and easy to copy off the machine: seeds.log (every process's log, prefixed with its name),
# seed_b.json, seed_b.png, seed_a.json, seed_a.png; the per-process reports stay in WORK_DIR.
set -uo pipefail
out=${1:?usage: bench/gpu_seeds.sh OUT_DIR}
mkdir -p "$out"
work=${WORK_DIR:-$(mktemp -d)}
logs=$work/logs parts=$work/parts
mkdir -p "$logs" "$parts"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
BUDGET_S=${BUDGET_S:-540}
MERGE_S=${MERGE_S:-30}             # kept at the end for the two merges
JOBS=${JOBS:-8}                    # processes side by side
RATE=${RATE:-6}                    # assumed standard updates/s per process (sizing and skipping only)
COST_ADVERSARIAL=${COST_ADVERSARIAL:-2.6}
COST_RANDOM=${COST_RANDOM:-2.0}
START_S=${START_S:-20}
EVAL_A_S=${EVAL_A_S:-3}
EVAL_B_S=${EVAL_B_S:-5}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-32}
PRESET=${PRESET:-fmnist}
BATCH=${BATCH:-256}
LR=${LR:-1e-3}                     # images16's default, as in the 16x16 runs
FINETUNE_LR=${FINETUNE_LR:-2e-4}
PRETRAIN=${PRETRAIN:-2000}         # most pre-training updates
PRETRAIN_CHUNK=${PRETRAIN_CHUNK:-250}
PRETRAIN_S=${PRETRAIN_S:-150}      # no pre-training chunk that would end past this
FINETUNE=${FINETUNE:-200}          # minibatches per fine-tuning arm
M=${M:-3}
SEEDS_B=${SEEDS_B:-4}
ARMS_B=${ARMS_B:-dro-at,standard-equal-updates,standard}
UPDATES_A=${UPDATES_A:-800}
SEEDS_A=${SEEDS_A:-3}
ARMS_A=${ARMS_A:-adversarial,random,standard}
N=${N:-500}
N_EXPOSURE=${N_EXPOSURE:-200}
N_REAL=${N_REAL:-2000}
NFE=${NFE:-5,10}
data=${DATA:-.carry/fashion-mnist}
[[ -d $data ]] || data=/usr/share/datasets/fashion-mnist
exec > >(tee "$out/seeds.log") 2>&1

source "$(dirname "$0")/_steps.sh"
deadline=$((budget_end - MERGE_S))
((JOBS >= 1)) || { echo "JOBS=$JOBS: at least 1 process at a time" && exit 2; }

nvidia-smi -L || true
"$py" -c "import importlib.util as u, sys; m = [n for n in sys.argv[1:] if u.find_spec(n) is None]; \
sys.exit(f'missing Python packages {m}: install them (pip wheels) before this script' if m else 0)" \
  torch pydantic pydantic_settings safetensors scipy matplotlib || exit 1

common=(--size "$SIZE" --preset "$PRESET" --device "$DEVICE" --data "$data" --batch "$BATCH"
  --n "$N" --n-real "$N_REAL" --nfe "$NFE" --no-plot)
checkpoint=$work/b-pretrain/seed_b/pretrain.safetensors

seconds() {  # seconds UPDATES COST EVAL_S: a process's expected time at RATE
  awk -v u="$1" -v c="$2" -v e="$3" -v r="$RATE" -v s="$START_S" 'BEGIN { printf "%d", s + u * c / r + e + 0.999 }'
}

start_a() {  # start_a ARM SEED
  local name=a-$1-s$2 cost=1
  [[ $1 == adversarial ]] && cost=$COST_ADVERSARIAL
  [[ $1 == random ]] && cost=$COST_RANDOM
  job "$name" "$(seconds "$UPDATES_A" "$cost" "$EVAL_A_S")" "$py" bench/images16.py seed-a "${common[@]}" \
    --lr "$LR" --updates "$UPDATES_A" --sigma 0.2 --sweep none --chosen 1:0.5 --arms-a "$1" \
    --first-seed "$2" --seeds 1 --work "$work/$name" --out "$parts/$name"
}

start_b() {  # start_b ARM SEED
  local name=b-$1-s$2 updates=$FINETUNE
  [[ $1 == standard ]] || updates=$((FINETUNE * M))
  job "$name" "$(seconds "$updates" 1 "$EVAL_B_S")" "$py" bench/images16.py seed-b "${common[@]}" \
    --init "$checkpoint" --pretrain-report "$work/b-pretrain.json" --finetune "$FINETUNE" --m "$M" \
    --finetune-lr "$FINETUNE_LR" --n-exposure "$N_EXPOSURE" --arms-b "$1" --first-seed "$2" --seeds 1 \
    --work "$work/$name" --out "$parts/$name"
}

queue=()  # "a|b ARM SEED", longest first
for arm in ${ARMS_A//,/ }; do
  for ((k = 0; k < SEEDS_A; k++)); do queue+=("a $arm $k"); done
done
job b-pretrain "$((START_S + ${PRETRAIN_S%.*}))" "$py" bench/images16.py seed-b "${common[@]}" \
  --lr "$LR" --pretrain "$PRETRAIN" --pretrain-chunk "$PRETRAIN_CHUNK" --pretrain-seconds "$PRETRAIN_S" \
  --plateau 0.03 --pretrain-only --work "$work/b-pretrain" --out "$work/b-pretrain" ||
  echo "== seed B: pre-training did not start, so no fine-tuning either"
while ((${#queue[@]} + ${#running[@]})); do
  if ((${#queue[@]})) && ((${#running[@]} < JOBS)); then
    read -r kind arm k <<<"${queue[0]}"
    queue=("${queue[@]:1}")
    "start_$kind" "$arm" "$k"
    continue
  fi
  reap
  if [[ $ended == b-pretrain ]]; then
    if ((ended_rc == 0)) && [[ -f $checkpoint ]]; then
      for arm in ${ARMS_B//,/ }; do
        for ((k = 0; k < SEEDS_B; k++)); do queue+=("b $arm $k"); done
      done
    else
      echo "== seed B: no pre-trained checkpoint (b-pretrain rc=$ended_rc), so no fine-tuning"
    fi
  fi
done

shopt -s nullglob
merge() {  # merge NAME OUT MERGE_OPTIONS... -- PARTS...: what finished, under the budget left
  local name=$1 dest=$2 left=$((budget_end - $(date +%s))) options=()
  shift 2
  while [[ $1 != -- ]]; do options+=("$1") && shift; done
  shift
  if (($# == 0)); then
    echo "== $name: no finished part to merge"
    summary+=("$name nothing-to-merge 0s")
  elif ((left < 5)); then
    echo "== $name skipped: ${left}s of budget left"
    summary+=("$name skipped 0s")
  else
    step "$name" "$left" "$py" bench/images16.py merge --out "$dest" "${options[@]}" "$@"
  fi
}
merge merge-b "$out/seed_b" --arms-b "$ARMS_B" --seeds "$SEEDS_B" -- "$parts"/b-*.json
merge merge-a "$out/seed_a" --arms-a "$ARMS_A" --seeds "$SEEDS_A" -- "$parts"/a-*.json

print_summary
