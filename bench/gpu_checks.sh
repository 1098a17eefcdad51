#!/usr/bin/env bash
# Every GPU check that needs no training, in one run of about 8 minutes on a CUDA machine: the GPU
# tests, then the benchmarks that have never run on a GPU or that a change since should move. Each step has its own time limit and a failing step does not
# stop the next; the table at the end says what ran.
#
#   bash bench/gpu_checks.sh OUT_DIR          (BUDGET_S=<seconds> caps the whole run)
#
# Writes at most 7 files to OUT_DIR, so the results are few and easy to copy off the machine: checks.log, gpu_tests.log,
# host-cd.json, host-dro-at.json, consistency.json, kernels.json, engine.json.
set -uo pipefail
out=${1:?usage: bench/gpu_checks.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
exec > >(tee "$out/checks.log") 2>&1

source "$(dirname "$0")/_steps.sh"

nvidia-smi -L
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
"$py" -c "import pydantic, pydantic_settings, safetensors, tqdm" 2>/dev/null \
  || echo "missing Python packages: carry them as wheels (.library/device/README.md, Notes)"

step gpu-tests 240 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/models \
  > "$out/gpu_tests.log" 2>&1
tail -3 "$out/gpu_tests.log"
step host-cd 60 "$py" bench/bench_host.py --device cuda --repeats 200 \
  --checkpoint models/weights/fmnist-cd.safetensors --out "$out/host-cd.json"
step host-dro-at 60 "$py" bench/bench_host.py --device cuda --repeats 100 \
  --checkpoint models/weights/fmnist-dro-at.safetensors --out "$out/host-dro-at.json"
step consistency 90 "$py" bench/bench_consistency.py --mode gpu \
  --cm models/weights/fmnist-cd.safetensors --out "$out/consistency.json"
step kernels 60 "$py" bench/bench_kernels.py --out "$out/kernels.json"
step engine 150 "$py" bench/bench_engine.py --no-diffusers --repeats 3 --out "$out/engine.json"

print_summary
