#!/usr/bin/env bash
# Train the GPU-made Fashion-MNIST models on one GPU, all runs of a phase side by side.
#
#   bench/gpu_train.sh diffusion MINUTES    served diffusion models, seed A/B comparison models, classifier
#   bench/gpu_train.sh consistency UPDATES  fmnist-cd / fmnist-cd-at from the served teachers
#
# Diffusion runs share their GPU, so their speed is only known once they all run. Each run first
# trains 200 updates; the measured rates then fix one update budget per comparison group (seed B:
# standard, dro-at, input-perturbation; seed A and the served equivariant-at: the equivariant runs
# and their noisy-data baseline) so that the slowest run of the group ends in MINUTES, and every
# run is resumed to its group's budget (resuming is exact, so this equals one run of that length:
# `robustdiff train models/train/configs/NAME.toml --set updates=U`). Budgets are printed and kept
# in runs/gpu_train_budgets.json; a run still going at 1.2 x MINUTES stops there and exports.
set -euo pipefail
phase=${1:?usage: bench/gpu_train.sh diffusion MINUTES | consistency UPDATES}
arg=${2:?usage: bench/gpu_train.sh diffusion MINUTES | consistency UPDATES}
rd=${ROBUSTDIFF:-robustdiff}
cfg=models/train/configs
mkdir -p runs/logs runs/experiments

group_b=(fmnist-standard fmnist-dro-at fmnist-input-perturbation)
group_a=(fmnist-equivariant-at fmnist-noisy-standard fmnist-noisy-equivariant-random fmnist-noisy-equivariant-adversarial)

# Where each run's served file goes: a training run writes under runs/NAME only, so the served file
# is named here with --export (and --force, since it replaces the committed one).
served() {
  case $1 in
  fmnist-standard | fmnist-dro-at | fmnist-equivariant-at | fmnist-cd | fmnist-cd-at) echo "models/weights/$1.safetensors" ;;
  *) echo "runs/experiments/$1.safetensors" ;;
  esac
}

wait_all() {
  local failed=0
  for pid in "$@"; do wait "$pid" || failed=1; done
  return $failed
}

case $phase in
diffusion)
  pids=()
  for name in "${group_b[@]}" "${group_a[@]}"; do
    $rd train "$cfg/$name.toml" --set updates=200 --set progress=false >"runs/logs/$name.probe.log" 2>&1 &
    pids+=($!)
  done
  wait_all "${pids[@]}"
  budgets=$(python3 - "$arg" "${group_b[*]}" "${group_a[*]}" <<'EOF'
import json, sys
minutes, groups = float(sys.argv[1]), [g.split() for g in sys.argv[2:]]
out = {}
for group in groups:
    rates = {}
    for name in group:
        rows = [json.loads(l) for l in open(f"runs/{name}/metrics.jsonl")]
        rates[name] = [r for r in rows if "updates_per_s" in r][-1]["updates_per_s"]
    budget = max(int(min(rates.values()) * 60 * minutes) // 100 * 100, 300)
    out.update({name: {"probe_updates_per_s": round(rates[name], 2), "updates": budget} for name in group})
json.dump(out, open("runs/gpu_train_budgets.json", "w"), indent=1)
print(" ".join(f"{k}={v['updates']}" for k, v in out.items()))
EOF
)
  echo "budgets: $budgets"
  backstop=$(awk "BEGIN {print $arg * 1.2}")  # a run that falls behind stops (and exports) here
  pids=()
  for pair in $budgets; do
    name=${pair%%=*}
    $rd train --resume "runs/$name" --set "updates=${pair#*=}" --set progress=false \
      --set "max_minutes=$backstop" --export "$(served "$name")" --force >"runs/logs/$name.log" 2>&1 &
    pids+=($!)
  done
  wait_all "${pids[@]}"
  ;;
consistency)
  pids=()
  for name in fmnist-cd fmnist-cd-at; do
    $rd train "$cfg/$name.toml" --set "updates=$arg" --set progress=false --export "$(served "$name")" --force \
      >"runs/logs/$name.log" 2>&1 &
    pids+=($!)
  done
  wait_all "${pids[@]}"
  ;;
*)
  echo "unknown phase $phase" >&2
  exit 2
  ;;
esac
