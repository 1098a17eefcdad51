"""CPU engine options, one process, 1 torch thread: CPU time per image at batch 32 and batch 1, start-up,
DDIM-10 error against fp32 and bitwise batch invariance, per option given on the command line
(fp32 bf16 cl pad compile bf16compile).

    OMP_NUM_THREADS=1 python bench/bench_cpu_options.py fp32 bf16 cl pad
"""

import os
import statistics
import sys
import time

import torch

from models.pipeline import CpuOptions, Pipeline

torch.set_num_threads(1)

ck = "models/weights/fmnist-dro-at.safetensors"
which = sys.argv[1:]
P = {}
for name in which:
    kw = dict(
        cl=dict(channels_last=True),
        bf16=dict(dtype="bfloat16"),
        fp32=dict(),
        compile=dict(compile=True),
        bf16compile=dict(dtype="bfloat16", compile=True),
        pad=dict(pad=True),
    )[name]
    t0 = time.perf_counter()
    p = Pipeline.from_checkpoint(ck, cpu=CpuOptions(**kw))
    p.warmup()
    print(name, "startup+warmup", round(time.perf_counter() - t0, 1), "s", flush=True)
    P[name] = p
X = torch.randn(64, 1, 32, 32)
T = torch.rand(64) * 999
res = {}
with torch.inference_mode():
    for _round in range(3):
        for k, p in P.items():
            t0 = time.process_time()
            p.forward(X[:32], T[:32])
            res.setdefault(k, []).append((time.process_time() - t0) / 32)
            t0 = time.process_time()
            p.forward(X[:1], T[:1])
            res.setdefault(k + "-b1", []).append(time.process_time() - t0)
for k, v in res.items():
    print(k, f"{1000 * statistics.median(v):.2f} ms/img cpu", flush=True)
ref = P.get("fp32") or Pipeline.from_checkpoint(ck)
a = ref.sample(list(range(8)), sampler="ddim", steps=10)
for k, p in P.items():
    b = p.sample(list(range(8)), sampler="ddim", steps=10)
    print(k, "DDIM-10 rel L2 vs fp32", ((a - b).norm() / a.norm()).item())
    # invariance
    with torch.inference_mode():
        full = p.forward(X[:20], T[:20])
        ok = all(torch.equal(full[i : i + 1], p.forward(X[i : i + 1], T[i : i + 1])) for i in (0, 7, 16, 19))
    print(k, "bitwise invariant", ok, flush=True)
print(os.getloadavg())
