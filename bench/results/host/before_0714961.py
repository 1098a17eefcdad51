"""The baseline of docs/BENCHMARKS.md "Host overhead per call": bench_host's timed call, null network,
on the code before sampler plans were cached (commit 0714961, which has no PLANS to clear), timed
in this process's CPU time like ``bench_host.py --clock cpu``.

    git worktree add /tmp/old 0714961
    cd /tmp/old && PYTHONPATH=/tmp/old OMP_NUM_THREADS=1 python /path/to/before_0714961.py TINY.safetensors
"""

import json
import statistics
import sys
import time

import torch

from models.pipeline import Pipeline

torch.set_num_threads(1)
pipe = Pipeline.from_checkpoint(sys.argv[1])
pipe._forward = lambda x, t, y=None: torch.zeros_like(x)
image = torch.zeros(1, *pipe.info.image_shape)
cases = (
    ("sample", "ddim", 1),
    ("sample", "ddim", 10),
    ("sample", "dpm-solver++", 10),
    ("purify", "ddim", 10),
)
for task, sampler, steps in cases:

    def call(task: str = task, sampler: str = sampler, steps: int = steps) -> object:
        if task == "sample":
            return pipe.sample([7], sampler=sampler, steps=steps)
        return pipe.purify(image, [7], t_star=0.1, sampler=sampler, steps=steps)

    call()
    times = []
    for _ in range(100):
        start = time.process_time()
        call()
        times.append(time.process_time() - start)
    row = {
        "task": task,
        "sampler": sampler,
        "steps": steps,
        "call_ms": round(1e3 * statistics.median(times), 4),
    }
    print(json.dumps(row), flush=True)
