#!/usr/bin/env bash
# Seed B and seed A at 32x32 (the `fmnist` preset, full-size Fashion-MNIST) over several training
# seeds, paired, in one run of at most BUDGET_S seconds (default 540) on one GPU: the GPU version of
# the 16x16 CPU experiments (`robustdiff bench images16`, docs/RESULTS.md). Steps run in priority
# order, each under its own limit; a step whose limit no longer fits the budget is skipped.
#
#   bash bench/gpu_seeds.sh OUT_DIR
#
# 1. seed-b (limit 270 s): pre-train standard on clean data in 250-update chunks until FD@10 changes
#    by < 3% over a chunk, 2,000 updates, or 90 s; then fine-tune from that one checkpoint for 20
#    minibatches per arm: standard (20 updates), standard-equal-updates (60) and dro-at (m = 3: 60),
#    4 seeds, FD/KID at NFE 5 and 10 and the exposure bias per step, paired.
# 2. seed-a (the rest of the budget, at least 240 s): 90% of the training images + N(0, 0.2^2)
#    (unclamped), standard vs equivariant-at adversarial and random (lambda 1, r_max 0.5, the
#    paper's radius), 75 updates each from scratch, 3 seeds planned; more seeds while time is left.
#
# Sizes, from the one GPU rate measured (docs/BENCHMARKS.md "Training on the GPU", MODEL_CARDS.md):
# on a shared H100 the 1.62M-parameter fmnist-cpu network trained at 5.7 updates/s (standard, batch
# 128) with the GPU nearly idle and the host cores oversubscribed. The `fmnist` preset (6.5M) has the
# same depth (levels 1-2-2, 2 res blocks, attention at 8x8), so the same number of kernel launches
# per update; alone on a GPU it should run at least that fast. Sized at R = 6 updates/s for standard
# and dro-at updates, and 2.6x / 2.0x the cost for equivariant adversarial / random (the CPU ratios
# of docs/BENCHMARKS.md "Training"). Batch 256, twice the served configs' 128: the fmnist preset costs
# 8.6 GFLOP per image forward + backward (torch's FLOP counter), 2.2 TFLOP per update, 13 TFLOP/s at
# R = 6: under 2% of an H100/H200's bf16 peak, so kernel launches, not the batch, set the rate.
# Evaluation ~4 s per fine-tuned model, ~3 s per seed-A model (500 samples at NFE 5 + 10, FD/KID
# with 30 bootstrap rounds, measured on the CPU), ~20 s to start a step:
#   seed-b: 20 s + <= 90 s pre-training + 4 seeds x (140 updates / 6 + 3 x 4 s = 35 s) = 250 s < 270 s
#   seed-a: 20 s + 3 seeds x (75 x (1 + 2.6 + 2.0) / 6 + 3 x 3 s = 79 s) = 257 s <= 540 - 270 s
# The time caps (pre-training seconds, --time-limit before each seed) turn a faster GPU into more
# pre-training and more seed-A seeds; the update counts stay fixed so that seeds pair. This script
# has not run on a GPU yet: read the rates in the log (train_s in the JSON) before sizing a rerun.
#
# On a GPU machine without the data set, copy it next to the checkout first (mkdir -p
# .carry/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .carry/fashion-mnist/;
# .carry is git-ignored); DATA names another IDX folder. Every size is an environment variable
# (DEVICE, SIZE, PRESET, BATCH, PRETRAIN, ..., below), so a test runs this script on the CPU at a tiny size.
# Writes at most 5 files to OUT_DIR, few and easy to copy off the machine: seeds.log, seed_b.json,
# seed_b.png, seed_a.json, seed_a.png (each JSON rewritten after every trained model).
set -uo pipefail
out=${1:?usage: bench/gpu_seeds.sh OUT_DIR}
mkdir -p "$out"
work=${WORK_DIR:-$(mktemp -d)}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
BUDGET_S=${BUDGET_S:-540}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-32}
PRESET=${PRESET:-fmnist}
BATCH=${BATCH:-256}
LR=${LR:-1e-3}                     # images16's default, as in the 16x16 runs
FINETUNE_LR=${FINETUNE_LR:-2e-4}
PRETRAIN=${PRETRAIN:-2000}         # most pre-training updates
PRETRAIN_CHUNK=${PRETRAIN_CHUNK:-250}
PRETRAIN_S=${PRETRAIN_S:-90}       # no pre-training chunk that would end past this
FINETUNE=${FINETUNE:-20}           # minibatches per fine-tuning arm
M=${M:-3}
SEEDS_B=${SEEDS_B:-4}
UPDATES_A=${UPDATES_A:-75}
SEEDS_A=${SEEDS_A:-8}              # at most; --time-limit stops before a seed that would not finish
N=${N:-500}
N_EXPOSURE=${N_EXPOSURE:-200}
N_REAL=${N_REAL:-2000}
NFE=${NFE:-5,10}
LIMIT_B=${LIMIT_B:-270}
LIMIT_A=${LIMIT_A:-240}            # seed-a's least limit: it gets the whole rest of the budget
data=${DATA:-.carry/fashion-mnist}
[[ -d $data ]] || data=/usr/share/datasets/fashion-mnist
exec > >(tee "$out/seeds.log") 2>&1

source "$(dirname "$0")/_steps.sh"

nvidia-smi -L || true
"$py" -c "import importlib.util as u, sys; m = [n for n in sys.argv[1:] if u.find_spec(n) is None]; \
sys.exit(f'missing Python packages {m}: install them (pip wheels) before this script' if m else 0)" \
  torch pydantic pydantic_settings safetensors scipy matplotlib || exit 1

common=(--size "$SIZE" --preset "$PRESET" --device "$DEVICE" --data "$data" --batch "$BATCH"
  --n "$N" --n-real "$N_REAL" --nfe "$NFE" --work "$work")

step seed-b "$LIMIT_B" "$py" bench/images16.py seed-b "${common[@]}" --lr "$LR" \
  --pretrain "$PRETRAIN" --pretrain-chunk "$PRETRAIN_CHUNK" --pretrain-seconds "$PRETRAIN_S" \
  --plateau 0.03 --finetune "$FINETUNE" --m "$M" --finetune-lr "$FINETUNE_LR" --seeds "$SEEDS_B" \
  --n-exposure "$N_EXPOSURE" --time-limit "$((LIMIT_B - 15))" --out "$out/seed_b"

rest=$((budget_end - $(date +%s) - 5))
limit_a=$((rest > LIMIT_A ? rest : LIMIT_A))
step seed-a "$limit_a" "$py" bench/images16.py seed-a "${common[@]}" --lr "$LR" \
  --updates "$UPDATES_A" --sigma 0.2 --sweep none --chosen 1:0.5 --arms-a standard,adversarial,random \
  --seeds "$SEEDS_A" --time-limit "$((limit_a - 15))" --out "$out/seed_a"

print_summary
