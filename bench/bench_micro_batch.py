"""CPU time per image of one network evaluation against the micro-batch size (1 torch thread), and the
plain batched network (torch's own kernel choice) for comparison.

    OMP_NUM_THREADS=1 python bench/bench_micro_batch.py
"""

import os
import statistics
import time

import torch

from models.pipeline import CpuOptions, Pipeline

torch.set_num_threads(1)

P = {
    m: Pipeline.from_checkpoint("models/weights/fmnist-dro-at.safetensors", cpu=CpuOptions(micro_batch=m))
    for m in [1, 2, 4, 8, 16, 32, 64]
}
old = Pipeline.from_checkpoint("models/weights/fmnist-dro-at.safetensors", batch_invariant=False)
X = torch.randn(128, 1, 32, 32)
T = torch.rand(128) * 999
res = {}
with torch.inference_mode():
    for _round in range(3):
        for m, p in P.items():
            p.forward(X[:64], T[:64])
            t0 = time.process_time()
            p.forward(X[:64], T[:64])
            dt = time.process_time() - t0
            res.setdefault(m, []).append(dt / 64)
        for b in [1, 8, 32]:
            t0 = time.process_time()
            old.net(X[:b], T[:b])
            res.setdefault(f"plain{b}", []).append((time.process_time() - t0) / b)
for k, v in res.items():
    print(k, f"{1000 * statistics.median(v):.2f} ms/img (cpu time)", flush=True)
print(os.getloadavg())
